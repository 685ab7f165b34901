//! The GGUF writer: what it writes reads back equal (metadata of every type, tensors of every pq
//! format on odd row lengths and of the standard types, bit-identical); it rewrites the `gguf`
//! package's fixture byte for byte; the `gguf` package reads its files and dequantizes them as pare
//! does; and a failed, cancelled or abandoned write leaves nothing at the target.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use pare::format::gguf::{Gguf, Value};
use pare::format::gguf_writer::{write_gguf, GgufWriter, TensorSpec, FORMAT_VERSION_KEY};
use pare::quant::dequant::dequantize_tensor;
use pare::quant::pq::Pq;
use pare::quant::quantize::{quantize_rows, Options};
use pare::quant::GgmlType;
use pare::Error;

/// Deterministic pseudo-random values (an LCG): weights with a few outliers.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % 97 == 0 {
                8.0 * u
            } else {
                u
            }
        })
        .collect()
}

/// A tensor of `ty` with dims `[cols, rows]`, quantized by pare from pseudo-random values.
fn quantized(
    name: &str,
    ty: GgmlType,
    cols: usize,
    rows: usize,
    seed: u64,
) -> (TensorSpec, Vec<u8>) {
    let x = values(cols * rows, seed);
    let spec = TensorSpec::new(name, &[cols as u64, rows as u64], ty);
    let mut out = vec![0u8; spec.n_bytes().unwrap() as usize];
    quantize_rows(ty, &x, cols, &Options::default(), &mut out).unwrap();
    (spec, out)
}

fn every_value_type() -> Vec<(String, Value)> {
    let s = |v: &str| Value::String(v.into());
    vec![
        ("general.alignment".into(), Value::U32(64)),
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.f32".into(), Value::F32(-1.5e-7)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.string".into(), s("héllo, wörld")),
        ("t.empty_string".into(), s("")),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(i64::MIN)),
        ("t.f64".into(), Value::F64(-2.25e300)),
        (
            "t.arr_u8".into(),
            Value::Array(vec![Value::U8(1), Value::U8(255)]),
        ),
        (
            "t.arr_bool".into(),
            Value::Array(vec![Value::Bool(false), Value::Bool(true)]),
        ),
        (
            "t.arr_str".into(),
            Value::Array(vec![s("a"), s(""), s("ccc")]),
        ),
        ("t.arr_empty".into(), Value::Array(vec![])),
        (
            "t.arr_f64".into(),
            Value::Array(vec![Value::F64(3.0), Value::F64(-0.125)]),
        ),
        (
            "t.arr_arr".into(),
            Value::Array(vec![
                Value::Array(vec![s("x"), s("yy")]),
                Value::Array(vec![Value::I32(7), Value::I32(-8)]),
                Value::Array(vec![]),
            ]),
        ),
        (
            "t.arr_arr_arr".into(),
            Value::Array(vec![Value::Array(vec![Value::Array(vec![Value::I64(-1)])])]),
        ),
    ]
}

/// Tensors of every pq format with odd row lengths (a short last group, a tail not a multiple of
/// 32), and of the standard types, including types pare reads but does not write (raw bytes).
fn every_tensor_type() -> Vec<(TensorSpec, Vec<u8>)> {
    let mut v = Vec::new();
    for (i, p) in Pq::all().enumerate() {
        let cols = [77, 161, 300][i % 3];
        let name = format!("pq.{}", p.name());
        v.push(quantized(&name, GgmlType::Pq(p), cols, 3, i as u64));
    }
    for (i, ty) in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q1_0,
    ]
    .into_iter()
    .enumerate()
    {
        v.push(quantized(&format!("std.{ty}"), ty, 256, 2, 100 + i as u64));
    }
    let spec = TensorSpec::new("std.Q6_K.raw", &[512, 1, 1], GgmlType::Q6K);
    let bytes: Vec<u8> = (0..spec.n_bytes().unwrap())
        .map(|i| (i * 7) as u8)
        .collect();
    v.push((spec, bytes));
    v
}

fn borrowed(t: &[(TensorSpec, Vec<u8>)]) -> Vec<(TensorSpec, &[u8])> {
    t.iter().map(|(s, b)| (s.clone(), b.as_slice())).collect()
}

/// Files in `dir` whose name starts with `prefix` (temporary files left behind).
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn round_trip_every_metadata_type_and_tensor_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.gguf");
    let meta = every_value_type();
    let tensors = every_tensor_type();
    let size = write_gguf(&path, &meta, &borrowed(&tensors)).unwrap();
    assert_eq!(size, std::fs::metadata(&path).unwrap().len());
    assert!(leftovers(dir.path()).is_empty());

    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    // The metadata as given, then the pq layout version (the file holds pq tensors).
    assert_eq!(&g.metadata[..meta.len()], &meta[..]);
    assert_eq!(
        &g.metadata[meta.len()..],
        &[(FORMAT_VERSION_KEY.to_string(), Value::U32(1))]
    );
    assert_eq!(g.tensors.len(), tensors.len());
    let mut expected_offset = 0;
    for ((spec, bytes), t) in tensors.iter().zip(&g.tensors) {
        assert_eq!(t.name, spec.name);
        assert_eq!(t.dims, spec.dims);
        assert_eq!(t.ggml_type, spec.ggml_type, "{}", t.name);
        // Offsets follow one another with exactly the padding llama.cpp expects.
        assert_eq!(t.offset, expected_offset, "{}", t.name);
        expected_offset += (bytes.len() as u64).next_multiple_of(64);
        assert!(g.tensor_data(t) == bytes.as_slice(), "{} differs", t.name);
    }
    assert_eq!(g.data_offset + expected_offset, size);
}

#[test]
fn pq_ids_follow_the_documented_formula() {
    for (name, id) in [
        ("q2_g32", 4128),
        ("q2_g32_sym", 4129),
        ("q2_g64", 4130),
        ("q2_g128_sym", 4133),
        ("q3_g64", 4146),
        ("q4_g128", 4164),
        ("q6_g32", 4192),
        ("q8_g128_sym", 4229),
    ] {
        assert_eq!(Pq::parse(name).unwrap().id(), id, "{name}");
    }
}

#[test]
fn rewrites_the_gguf_package_fixture_byte_for_byte() {
    let fixture = common::root().join("tests/fixtures/gguf/meta.gguf");
    let g = Gguf::open(&fixture).unwrap();
    let tensors: Vec<(TensorSpec, &[u8])> = g
        .tensors
        .iter()
        .map(|t| {
            (
                TensorSpec::new(t.name.clone(), &t.dims, t.ggml_type),
                g.tensor_data(t),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.gguf");
    write_gguf(&path, &g.metadata, &tensors).unwrap();
    let ours = std::fs::read(&path).unwrap();
    let theirs = std::fs::read(&fixture).unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(
        ours == theirs,
        "the rewrite differs from the gguf package's file"
    );
}

#[test]
fn the_gguf_package_reads_pare_files_and_dequantizes_them_as_pare_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("std.gguf");
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String("llama".into()),
        ),
        ("t.u32".to_string(), Value::U32(123456)),
        ("t.f32".to_string(), Value::F32(0.25)),
        ("t.str".to_string(), Value::String("héllo".into())),
    ];
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
    let tensors: Vec<(TensorSpec, Vec<u8>)> = types
        .iter()
        .enumerate()
        .map(|(i, &ty)| quantized(&format!("w.{ty}"), ty, 96, 5, 7 + i as u64))
        .collect();
    write_gguf(&path, &meta, &borrowed(&tensors)).unwrap();

    let out = dir.path().join("py");
    let json = common::run_script(
        "gguf_py_dequant.py",
        &[path.to_str().unwrap(), out.to_str().unwrap()],
    );
    let seen: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(seen["metadata"]["t.u32"], 123456);
    assert_eq!(seen["metadata"]["t.f32"], 0.25);
    assert_eq!(seen["metadata"]["t.str"], "héllo");
    let g = Gguf::open(&path).unwrap();
    for t in &g.tensors {
        assert_eq!(seen["tensors"][&t.name]["type"], t.ggml_type.name());
        let theirs = std::fs::read(out.join(format!("{}.f32", t.name))).unwrap();
        let ours: Vec<u8> = dequantize_tensor(&g, t)
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert!(ours == theirs, "{}: gguf's dequantization differs", t.name);
    }
}

#[test]
fn failures_leave_no_file_and_keep_an_existing_target() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.gguf");
    std::fs::write(&path, b"keep me").unwrap();
    let (spec, bytes) = quantized("w", GgmlType::Q8_0, 64, 2, 1);
    let specs = [spec.clone()];

    // Wrong size: an error naming the tensor.
    let mut w = GgufWriter::create(&path, &[], &specs, None).unwrap();
    let e = w.write_tensor("w", &bytes[1..]).unwrap_err().to_string();
    assert!(e.contains("\"w\""), "{e}");
    drop(w);
    // Wrong order / unknown name, then finishing with a tensor missing.
    let mut w = GgufWriter::create(&path, &[], &specs, None).unwrap();
    assert!(w.write_tensor("v", &bytes).is_err());
    assert!(w.finish().is_err());
    // Cancelled before a tensor.
    let cancel = AtomicBool::new(true);
    let mut w = GgufWriter::create(&path, &[], &specs, Some(&cancel)).unwrap();
    assert!(matches!(
        w.write_tensor("w", &bytes),
        Err(Error::Interrupted)
    ));
    drop(w);
    // Abandoned: dropped before finish.
    let w = GgufWriter::create(&path, &[], &specs, None).unwrap();
    drop(w);
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    assert!(
        leftovers(dir.path()).is_empty(),
        "{:?}",
        leftovers(dir.path())
    );

    // Metadata the reader or llama.cpp would reject is refused before anything is written.
    let bad = [
        vec![
            ("a".to_string(), Value::U8(1)),
            ("a".to_string(), Value::U8(2)),
        ],
        vec![(
            "mixed".to_string(),
            Value::Array(vec![Value::U8(1), Value::I8(2)]),
        )],
        vec![("general.alignment".to_string(), Value::U32(48))],
        vec![("general.alignment".to_string(), Value::U64(64))],
    ];
    for meta in bad {
        assert!(
            GgufWriter::create(&path, &meta, &specs, None).is_err(),
            "{meta:?}"
        );
    }
    // Dimensions that do not fit the type, and duplicate names.
    let odd = TensorSpec::new("odd", &[33, 2], GgmlType::Q8_0);
    assert!(GgufWriter::create(&path, &[], &[odd], None).is_err());
    assert!(GgufWriter::create(&path, &[], &[spec.clone(), spec], None).is_err());
    // A directory that does not exist: an error naming the path.
    let missing = dir.path().join("no/such/dir/out.gguf");
    let e = GgufWriter::create(&missing, &[], &specs, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no/such/dir"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    assert!(leftovers(dir.path()).is_empty());
}
