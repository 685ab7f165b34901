//! The GGUF reader on a fixture with every metadata value type (tests/fixtures/gguf/meta.gguf, written
//! by scripts/gen_quant_fixtures.py with the `gguf` package), on its version-2 twin, and on malformed
//! files built here from its bytes: each must give an error that names the problem, never a panic.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use half::f16;
use pare::format::gguf::{Gguf, Value};
use pare::quant::dequant::dequantize_tensor;
use pare::quant::GgmlType;

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/meta.gguf")
}

fn fixture_bytes() -> Vec<u8> {
    std::fs::read(fixture_path()).expect("read meta.gguf")
}

/// Opens `bytes` as a GGUF file, turning a panic into a test failure that names the case.
fn open_bytes(bytes: &[u8], case: &str) -> pare::Result<Gguf> {
    open_bytes_with(bytes, case, |p| Gguf::open(p))
}

/// As [`open_bytes`], with `open` (`Gguf::open` or `Gguf::open_lean`).
fn open_bytes_with(
    bytes: &[u8],
    case: &str,
    open: fn(&std::path::Path) -> pare::Result<Gguf>,
) -> pare::Result<Gguf> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    match catch_unwind(AssertUnwindSafe(|| open(f.path()))) {
        Ok(r) => r,
        Err(_) => panic!("opening panicked on {case}"),
    }
}

/// Opens patched bytes and returns the error message, failing if the file was accepted.
fn open_err(bytes: &[u8], case: &str) -> String {
    match open_bytes(bytes, case) {
        Ok(_) => panic!("{case}: malformed file was accepted"),
        Err(e) => e.to_string(),
    }
}

fn expect_err(bytes: &[u8], case: &str, needles: &[&str]) {
    let msg = open_err(bytes, case);
    assert!(
        needles.iter().all(|n| msg.contains(n)),
        "{case}: error {msg:?} does not mention {needles:?}"
    );
}

// ------------------------------------------------------------------ an independent header walker

/// Byte positions of the fields of one metadata entry.
#[derive(Debug)]
struct KvPos {
    key: String,
    key_len: usize,
    ty: usize,
    /// Start of the value (for an array: its element type; the length follows at +4).
    value: usize,
}

/// Byte positions of the fields of one tensor info.
#[derive(Debug)]
struct TensorPos {
    n_dims: usize,
    dims: usize,
    ty: usize,
    offset: usize,
}

struct Layout {
    kvs: Vec<KvPos>,
    tensors: Vec<(String, TensorPos)>,
}

fn rd_u32(b: &[u8], p: usize) -> u32 {
    u32::from_le_bytes(b[p..p + 4].try_into().unwrap())
}
fn rd_u64(b: &[u8], p: usize) -> u64 {
    u64::from_le_bytes(b[p..p + 8].try_into().unwrap())
}
fn put_u32(b: &mut [u8], p: usize, v: u32) {
    b[p..p + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], p: usize, v: u64) {
    b[p..p + 8].copy_from_slice(&v.to_le_bytes());
}

/// Skips a value of type `ty` at `p`, returning the position after it.
fn skip_value(b: &[u8], ty: u32, p: usize) -> usize {
    match ty {
        0 | 1 | 7 => p + 1,
        2 | 3 => p + 2,
        4..=6 => p + 4,
        10..=12 => p + 8,
        8 => p + 8 + rd_u64(b, p) as usize,
        9 => {
            let elem = rd_u32(b, p);
            let n = rd_u64(b, p + 4);
            let mut q = p + 12;
            for _ in 0..n {
                q = skip_value(b, elem, q);
            }
            q
        }
        _ => panic!("walker: unknown type {ty}"),
    }
}

/// Walks a well-formed file (the fixture), written independently of pare's reader.
fn layout(b: &[u8]) -> Layout {
    let n_tensors = rd_u64(b, 8);
    let n_kv = rd_u64(b, 16);
    let mut p = 24;
    let mut kvs = Vec::new();
    for _ in 0..n_kv {
        let key_len = p;
        let n = rd_u64(b, p) as usize;
        let key = String::from_utf8(b[p + 8..p + 8 + n].to_vec()).unwrap();
        let ty = p + 8 + n;
        let value = ty + 4;
        p = skip_value(b, rd_u32(b, ty), value);
        kvs.push(KvPos {
            key,
            key_len,
            ty,
            value,
        });
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let n = rd_u64(b, p) as usize;
        let name = String::from_utf8(b[p + 8..p + 8 + n].to_vec()).unwrap();
        let n_dims = p + 8 + n;
        let dims = n_dims + 4;
        let ty = dims + 8 * rd_u32(b, n_dims) as usize;
        let offset = ty + 4;
        p = offset + 8;
        tensors.push((
            name,
            TensorPos {
                n_dims,
                dims,
                ty,
                offset,
            },
        ));
    }
    Layout { kvs, tensors }
}

impl Layout {
    fn kv(&self, key: &str) -> &KvPos {
        self.kvs.iter().find(|k| k.key == key).unwrap()
    }
    fn tensor(&self, name: &str) -> &TensorPos {
        &self.tensors.iter().find(|(n, _)| n == name).unwrap().1
    }
}

// ------------------------------------------------------------------ (a) values, dims, offsets

fn s(v: &str) -> Value {
    Value::String(v.into())
}

fn check_fixture(g: &Gguf) {
    use Value::*;
    let expected: Vec<(&str, Value)> = vec![
        ("general.architecture", s("pare-test")),
        ("general.alignment", U32(64)),
        ("t.u8", U8(200)),
        ("t.i8", I8(-100)),
        ("t.u16", U16(60000)),
        ("t.i16", I16(-30000)),
        ("t.u32", U32(4_000_000_000)),
        ("t.i32", I32(-2_000_000_000)),
        ("t.f32", F32(1.5)),
        ("t.bool_true", Bool(true)),
        ("t.bool_false", Bool(false)),
        ("t.string", s("héllo, wörld")),
        ("t.empty_string", s("")),
        ("t.u64", U64(18_000_000_000_000_000_000)),
        ("t.i64", I64(-9_000_000_000_000_000_000)),
        ("t.f64", F64(-2.25e300)),
        ("t.arr_u8", Array(vec![U8(1), U8(2), U8(255)])),
        ("t.arr_i16", Array(vec![I16(-1), I16(2), I16(-3)])),
        ("t.arr_f32", Array(vec![F32(0.5), F32(-1.0)])),
        ("t.arr_u64", Array(vec![U64(0), U64(u64::MAX)])),
        ("t.arr_f64", Array(vec![F64(3.0), F64(-0.125)])),
        (
            "t.arr_bool",
            Array(vec![Bool(true), Bool(false), Bool(true)]),
        ),
        ("t.arr_str", Array(vec![s("a"), s(""), s("ccc")])),
        (
            "t.arr_arr_str",
            Array(vec![Array(vec![s("x"), s("yy")]), Array(vec![s("zzz")])]),
        ),
        (
            "t.arr_arr_int",
            Array(vec![
                Array(vec![I32(1), I32(-2), I32(3)]),
                Array(vec![I32(4)]),
            ]),
        ),
        (
            "t.arr_arr_mixed",
            Array(vec![Array(vec![s("s")]), Array(vec![I32(7), I32(8)])]),
        ),
    ];
    let got: Vec<(&str, &Value)> = g.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let want: Vec<(&str, &Value)> = expected.iter().map(|(k, v)| (*k, v)).collect();
    assert_eq!(got, want);
    for (k, v) in &expected {
        assert_eq!(g.get(k), Some(v), "{k}");
    }
    assert_eq!(g.get_u64("t.u64"), Some(18_000_000_000_000_000_000));
    assert_eq!(g.get_f64("t.i8"), Some(-100.0));
    assert_eq!(g.get_str_array("t.arr_str").unwrap(), vec!["a", "", "ccc"]);
    assert!(g.get_str_array("t.arr_arr_str").is_err());
    assert!(g.get("missing").is_none());

    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    assert!(g.data_offset > 0);

    let dims: Vec<(&str, &[u64], GgmlType, u64)> = g
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice(), t.ggml_type, t.offset))
        .collect();
    assert_eq!(
        dims,
        vec![
            ("a", &[5u64, 3][..], GgmlType::F32, 0),
            ("b", &[4, 3, 2][..], GgmlType::F16, 64),
            ("c", &[32, 2][..], GgmlType::Q8_0, 128),
            ("d", &[2, 2, 1, 1][..], GgmlType::F32, 256),
        ]
    );

    let a = g.tensor("a").unwrap();
    let a_vals: Vec<f32> = g
        .tensor_data(a)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(a_vals, (0..15).map(|i| i as f32).collect::<Vec<_>>());
    let b = g.tensor("b").unwrap();
    let b_vals: Vec<f32> = g
        .tensor_data(b)
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(b_vals, (0..24).map(|i| i as f32 - 10.0).collect::<Vec<_>>());
    let c = g.tensor("c").unwrap();
    assert_eq!(g.tensor_data(c).len(), 68);
    // Q8_0 of linspace(-1, 1, 64): each weight within half a quantization step (1/127) of its value.
    let c_vals = dequantize_tensor(g, c).unwrap();
    for (i, v) in c_vals.iter().enumerate() {
        let want = -1.0 + 2.0 * i as f32 / 63.0;
        assert!(
            (v - want).abs() <= 0.5 / 127.0 + 1e-3,
            "c[{i}] = {v}, want {want}"
        );
    }
    let d = g.tensor("d").unwrap();
    assert_eq!(d.n_elements(), 4);
    assert_eq!(dequantize_tensor(g, d).unwrap(), vec![0.0, 1.0, 2.0, 3.0]);
}

#[test]
fn reads_every_value_type_nested_arrays_and_alignment() {
    let g = Gguf::open(fixture_path()).unwrap();
    assert_eq!(g.version, 3);
    check_fixture(&g);
}

// ------------------------------------------------------------------ (b) versions 2 and 3

#[test]
fn reads_version_2_and_3() {
    let bytes = fixture_bytes();
    assert_eq!(rd_u32(&bytes, 4), 3, "the gguf package writes v3");
    for version in [2u32, 3] {
        let mut b = bytes.clone();
        put_u32(&mut b, 4, version);
        let g = open_bytes(&b, &format!("version {version}")).unwrap();
        assert_eq!(g.version, version);
        check_fixture(&g);
    }
}

// ------------------------------------------------------------------ (c) malformed inputs

/// The file's last byte that a tensor needs; past it there is only padding.
fn needed_len(bytes: &[u8]) -> usize {
    let g = open_bytes(bytes, "fixture").unwrap();
    g.tensors
        .iter()
        .map(|t| (g.data_offset + t.offset) as usize + t.n_bytes())
        .max()
        .unwrap()
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = fixture_bytes();
    let needed = needed_len(&bytes);
    assert!(needed < bytes.len(), "fixture should end with padding");
    for cut in 0..bytes.len() {
        let r = open_bytes(&bytes[..cut], &format!("truncation at {cut}"));
        if cut >= needed {
            // Only trailing padding is missing: the file is still whole.
            assert!(r.is_ok(), "cut at {cut} (needed {needed}): {:?}", r.err());
            continue;
        }
        let msg = match r {
            Ok(_) => panic!("truncation at {cut} of {} was accepted", bytes.len()),
            Err(e) => e.to_string(),
        };
        assert!(
            msg.contains("truncated") || msg.contains("more than the"),
            "truncation at {cut}: unhelpful error {msg:?}"
        );
    }
}

#[test]
fn bad_magic_and_versions() {
    let bytes = fixture_bytes();
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    expect_err(&b, "bad magic", &["bad magic", "not a GGUF file"]);

    for (v, needle) in [
        (1u32, "version 1 is not supported"),
        (0, "unknown GGUF version 0"),
        (4, "unknown GGUF version 4"),
        (u32::MAX, "unknown GGUF version"),
        (3u32.swap_bytes(), "big-endian"),
    ] {
        let mut b = bytes.clone();
        put_u32(&mut b, 4, v);
        expect_err(&b, &format!("version {v}"), &[needle]);
    }
}

#[test]
fn absurd_counts_and_lengths_are_rejected_before_allocating() {
    let bytes = fixture_bytes();
    let l = layout(&bytes);
    let huge = [u64::MAX, u64::MAX / 2, 1 << 40, bytes.len() as u64];
    for n in huge {
        let mut b = bytes.clone();
        put_u64(&mut b, 8, n);
        expect_err(&b, &format!("tensor count {n}"), &["tensor count"]);

        let mut b = bytes.clone();
        put_u64(&mut b, 16, n);
        expect_err(&b, &format!("metadata count {n}"), &["metadata count"]);

        let mut b = bytes.clone();
        put_u64(&mut b, l.kvs[0].key_len, n);
        expect_err(&b, &format!("key length {n}"), &["key of metadata entry 0"]);

        let mut b = bytes.clone();
        put_u64(&mut b, l.kv("t.string").value, n);
        expect_err(
            &b,
            &format!("string length {n}"),
            &["string length", "t.string"],
        );

        let mut b = bytes.clone();
        put_u64(&mut b, l.kv("t.arr_u8").value + 4, n);
        expect_err(
            &b,
            &format!("array length {n}"),
            &["array length", "t.arr_u8"],
        );

        // The first inner array of an array of arrays: outer elem type (4) + outer length (8),
        // then the inner array's elem type (4) and its length.
        let mut b = bytes.clone();
        put_u64(&mut b, l.kv("t.arr_arr_str").value + 12 + 4, n);
        expect_err(
            &b,
            &format!("inner array length {n}"),
            &["array length", "t.arr_arr_str"],
        );

        let name_len = l.tensor("a").n_dims - 8 - 1;
        let mut b = bytes.clone();
        put_u64(&mut b, name_len, n);
        expect_err(
            &b,
            &format!("tensor name length {n}"),
            &["name of tensor 0"],
        );
    }
}

#[test]
fn absurd_dimensions_are_rejected() {
    let bytes = fixture_bytes();
    let l = layout(&bytes);
    let b_dims = l.tensor("b").dims;
    for (i, v) in [(0, 0u64), (1, 0), (2, 0), (0, u64::MAX), (2, 1 << 40)] {
        let mut b = bytes.clone();
        put_u64(&mut b, b_dims + 8 * i, v);
        expect_err(
            &b,
            &format!("dim {i} = {v}"),
            &["\"b\"", "absurd dimensions"],
        );
    }
    // Each dimension alone is plausible, the product overflows u64.
    let mut b = bytes.clone();
    put_u64(&mut b, b_dims + 8, 1 << 32);
    put_u64(&mut b, b_dims + 16, 1 << 32);
    expect_err(&b, "dims product overflow", &["absurd dimensions"]);

    // A Q8_0 row that is not a whole number of blocks.
    let mut b = bytes.clone();
    put_u64(&mut b, l.tensor("c").dims, 33);
    expect_err(&b, "partial block", &["\"c\"", "multiple of 32"]);

    for n in [0u32, 5, 1000, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, l.tensor("a").n_dims, n);
        expect_err(
            &b,
            &format!("n_dims {n}"),
            &["\"a\"", "dimensions (1 to 4 allowed)"],
        );
    }
}

#[test]
fn unknown_types_are_named() {
    let bytes = fixture_bytes();
    let l = layout(&bytes);
    for (id, needle) in [
        (99u32, "unknown ggml type id 99"),
        (16, "IQ2_XXS"),
        (4, "Q4_2"),
    ] {
        let mut b = bytes.clone();
        put_u32(&mut b, l.tensor("c").ty, id);
        expect_err(&b, &format!("tensor type {id}"), &["\"c\"", needle]);
    }
    for ty in [13u32, 255, u32::MAX] {
        let mut b = bytes.clone();
        put_u32(&mut b, l.kv("t.u8").ty, ty);
        expect_err(
            &b,
            &format!("value type {ty}"),
            &["t.u8", "unknown value type"],
        );

        let mut b = bytes.clone();
        put_u32(&mut b, l.kv("t.arr_u8").value, ty);
        expect_err(
            &b,
            &format!("array element type {ty}"),
            &["t.arr_u8", "unknown array element type"],
        );
    }
    // A bool that is neither 0 nor 1.
    let mut b = bytes.clone();
    b[l.kv("t.bool_true").value] = 2;
    expect_err(&b, "bool 2", &["t.bool_true", "bool"]);
}

#[test]
fn tensor_data_outside_the_file_or_misaligned() {
    let bytes = fixture_bytes();
    let l = layout(&bytes);
    let d_off = l.tensor("d").offset;
    for off in [
        64 * 1000,
        (bytes.len() as u64).next_multiple_of(64),
        u64::MAX - 63,
        1 << 62,
    ] {
        let mut b = bytes.clone();
        put_u64(&mut b, d_off, off);
        expect_err(&b, &format!("offset {off}"), &["\"d\"", "outside the file"]);
    }
    // Growing a tensor so that its data runs past the end of the file.
    let mut b = bytes.clone();
    put_u64(&mut b, l.tensor("d").dims + 8, 1000);
    expect_err(&b, "tensor too long", &["\"d\"", "outside the file"]);

    for off in [1u64, 32, 65, 100] {
        let mut b = bytes.clone();
        put_u64(&mut b, l.tensor("b").offset, off);
        expect_err(
            &b,
            &format!("misaligned offset {off}"),
            &["\"b\"", "not a multiple of the alignment 64"],
        );
    }
}

#[test]
fn bad_alignment_duplicates_and_utf8() {
    let bytes = fixture_bytes();
    let l = layout(&bytes);
    for a in [0u32, 3, 48, 1 << 30] {
        let mut b = bytes.clone();
        put_u32(&mut b, l.kv("general.alignment").value, a);
        expect_err(
            &b,
            &format!("alignment {a}"),
            &["general.alignment", "power of two"],
        );
    }

    // Rename key "t.i16" to "t.u16" (same length): a duplicate.
    let mut b = bytes.clone();
    let k = l.kv("t.i16").key_len + 8;
    b[k..k + 5].copy_from_slice(b"t.u16");
    expect_err(&b, "duplicate key", &["duplicate metadata key", "t.u16"]);

    // Rename tensor "b" to "a".
    let mut b = bytes.clone();
    b[l.tensor("b").n_dims - 1] = b'a';
    expect_err(&b, "duplicate tensor", &["duplicate tensor name", "\"a\""]);

    let mut b = bytes.clone();
    b[l.kv("t.string").value + 8] = 0xFF;
    expect_err(&b, "bad utf-8", &["t.string", "UTF-8"]);
}

/// A minimal GGUF v3 with no tensors and the given raw metadata entries (key, type, value bytes).
fn kv_only_file(kvs: &[(&str, u32, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, ty, v) in kvs {
        b.extend_from_slice(&(k.len() as u64).to_le_bytes());
        b.extend_from_slice(k.as_bytes());
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(v);
    }
    b
}

#[test]
fn deeply_nested_arrays_are_rejected() {
    // depth d: ARRAY of ARRAY of ... of one u8, nested d times.
    let nested = |depth: usize| {
        let mut v = vec![7u8];
        let mut elem = 0u32; // u8
        for _ in 0..depth {
            let mut outer = Vec::new();
            outer.extend_from_slice(&elem.to_le_bytes());
            outer.extend_from_slice(&1u64.to_le_bytes());
            outer.extend_from_slice(&v);
            v = outer;
            elem = 9;
        }
        v
    };
    let ok = kv_only_file(&[("deep", 9, nested(8))]);
    let g = open_bytes(&ok, "depth 8").unwrap();
    let mut v = g.get("deep").unwrap();
    for _ in 0..8 {
        v = &v.as_array().unwrap()[0];
    }
    assert_eq!(v, &Value::U8(7));

    let bad = kv_only_file(&[("deep", 9, nested(9))]);
    expect_err(&bad, "depth 9", &["deep", "nested more than 8"]);
    let very = kv_only_file(&[("deep", 9, nested(10_000))]);
    expect_err(&very, "depth 10000", &["nested more than 8"]);
}

/// A string array's value bytes: element type 8, length, then each string.
fn str_array(items: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&8u32.to_le_bytes());
    v.extend_from_slice(&(items.len() as u64).to_le_bytes());
    for it in items {
        v.extend_from_slice(&(it.len() as u64).to_le_bytes());
        v.extend_from_slice(it);
    }
    v
}

/// A scalar array's value bytes: element type, length, then the raw elements.
fn scalar_array(elem: u32, n: u64, raw: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&elem.to_le_bytes());
    v.extend_from_slice(&n.to_le_bytes());
    v.extend_from_slice(raw);
    v
}

#[test]
fn lean_open_leaves_out_the_tokenizer_arrays_and_still_checks_them() {
    let i32s: Vec<u8> = [1i32, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
    let nested = {
        let mut v = scalar_array(9, 2, &[]);
        v.extend(scalar_array(0, 1, &[5]));
        v.extend(str_array(&[b"x", b"yz"]));
        v
    };
    let kvs = |tokens: Vec<u8>, types: Vec<u8>| {
        kv_only_file(&[
            ("general.ids", 9, scalar_array(0, 2, &[4, 2])),
            ("tokenizer.ggml.tokens", 9, tokens),
            ("tokenizer.ggml.model", 8, {
                let mut v = 4u64.to_le_bytes().to_vec();
                v.extend_from_slice(b"gpt2");
                v
            }),
            ("tokenizer.ggml.token_type", 9, types),
            ("tokenizer.nested", 9, nested.clone()),
            ("tokenizer.flags", 9, scalar_array(7, 2, &[0, 1])),
        ])
    };
    let bytes = kvs(str_array(&[b"a", b"", b"ccc"]), scalar_array(5, 3, &i32s));
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&bytes).unwrap();
    f.flush().unwrap();

    let full = Gguf::open(f.path()).unwrap();
    let lean = Gguf::open_lean(f.path()).unwrap();
    assert!(full.is_complete() && !lean.is_complete());
    // Kept: everything but the tokenizer's arrays.
    assert_eq!(lean.get("general.ids"), full.get("general.ids"));
    assert_eq!(lean.get_str("tokenizer.ggml.model"), Some("gpt2"));
    assert_eq!(lean.metadata.len(), 2);
    for (key, n) in [
        ("tokenizer.ggml.tokens", 3),
        ("tokenizer.ggml.token_type", 3),
        ("tokenizer.nested", 2),
        ("tokenizer.flags", 2),
        ("general.ids", 2),
    ] {
        assert_eq!(lean.array_len(key), Some(n), "{key}");
        assert_eq!(full.array_len(key), Some(n), "{key}");
    }
    assert!(lean.get("tokenizer.ggml.tokens").is_none());
    let e = lean
        .require("tokenizer.ggml.tokens")
        .unwrap_err()
        .to_string();
    assert!(e.contains("left out"), "{e}");
    assert!(full.require("tokenizer.ggml.tokens").is_ok());
    // with_complete parses the whole header again, in file order.
    let again = lean
        .with_complete(|g| {
            assert!(g.is_complete());
            Ok(g.metadata.clone())
        })
        .unwrap();
    assert_eq!(again, full.metadata);
    assert_eq!(lean.with_complete(|g| Ok(g.metadata.len())).unwrap(), 6);
    assert_eq!(full.with_complete(|g| Ok(g.metadata.len())).unwrap(), 6);

    // What open checks in the arrays, open_lean checks too, though it keeps none of them.
    let lean_err = |b: &[u8], case: &str, needles: &[&str]| {
        let msg = match open_bytes_with(b, case, |p| Gguf::open_lean(p)) {
            Ok(_) => panic!("{case}: accepted by open_lean"),
            Err(e) => e.to_string(),
        };
        assert!(
            needles.iter().all(|n| msg.contains(n)),
            "{case}: {msg:?} lacks {needles:?}"
        );
        assert!(open_bytes(b, case).is_err(), "{case}: accepted by open");
    };
    lean_err(
        &kvs(str_array(&[b"a", b"\xff", b"c"]), scalar_array(5, 3, &i32s)),
        "bad utf-8",
        &["tokenizer.ggml.tokens", "UTF-8"],
    );
    lean_err(
        &kvs(str_array(&[b"a"]), scalar_array(5, 1 << 40, &i32s)),
        "absurd length",
        &["tokenizer.ggml.token_type", "more than the"],
    );
    lean_err(
        &kvs(str_array(&[b"a"]), scalar_array(77, 3, &i32s)),
        "unknown element type",
        &["tokenizer.ggml.token_type", "unknown array element type 77"],
    );
    let mut bad_bool = bytes.clone();
    let at = bad_bool.len() - 1;
    bad_bool[at] = 2;
    lean_err(
        &bad_bool,
        "bool byte 2",
        &["tokenizer.flags", "bool byte is 2"],
    );
    for cut in 0..bytes.len() {
        let r = open_bytes_with(&bytes[..cut], &format!("lean cut {cut}"), |p| {
            Gguf::open_lean(p)
        });
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("truncated") || msg.contains("more than the"),
            "lean truncation at {cut}: {msg:?}"
        );
    }
}

#[test]
fn headers_longer_than_the_first_read_are_read_whole() {
    // One string past the reader's first 1 MiB piece, and a token list spanning pieces.
    let long: Vec<u8> = (0..(3 << 20)).map(|i| b'a' + (i % 26) as u8).collect();
    let tokens: Vec<Vec<u8>> = (0..200_000)
        .map(|i| format!("tok{i}").into_bytes())
        .collect();
    let refs: Vec<&[u8]> = tokens.iter().map(|t| t.as_slice()).collect();
    let bytes = kv_only_file(&[
        ("tokenizer.ggml.tokens", 9, str_array(&refs)),
        ("general.long", 8, {
            let mut v = (long.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(&long);
            v
        }),
    ]);
    let g = open_bytes(&bytes, "long header").unwrap();
    assert_eq!(g.get_str("general.long").map(str::len), Some(long.len()));
    assert!(g.get_str("general.long").unwrap().as_bytes() == long.as_slice());
    let t = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!((t.len(), t[199_999]), (200_000, "tok199999"));
    let lean = open_bytes_with(&bytes, "long header, lean", |p| Gguf::open_lean(p)).unwrap();
    assert_eq!(lean.array_len("tokenizer.ggml.tokens"), Some(200_000));
    assert_eq!(lean.get("general.long"), g.get("general.long"));
}

// ------------------------------------------------------------------ (d) read into memory

/// `Gguf::open_resident` reads the file into memory instead of mapping it: the same bytes, the
/// same parse as `open_lean`, and the same errors on every truncation (no panic on an empty file).
#[test]
fn resident_open_equals_the_mapped_one() {
    let bytes = fixture_bytes();
    let mapped = open_bytes_with(&bytes, "lean", |p| Gguf::open_lean(p)).unwrap();
    let resident = open_bytes_with(&bytes, "resident", |p| Gguf::open_resident(p)).unwrap();
    assert_eq!(resident.bytes(), mapped.bytes());
    assert_eq!(resident.data_offset, mapped.data_offset);
    assert_eq!(
        format!("{:?}", resident.tensors),
        format!("{:?}", mapped.tensors)
    );
    for t in &mapped.tensors {
        assert_eq!(resident.tensor_data(t), mapped.tensor_data(t), "{}", t.name);
    }
    for cut in [0, 3, 8, 24, bytes.len() / 2, needed_len(&bytes) - 1] {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes[..cut]).unwrap();
        f.flush().unwrap();
        let case = format!("resident truncation at {cut}");
        let want = Gguf::open_lean(f.path()).map(|_| ());
        let got = catch_unwind(|| Gguf::open_resident(f.path()).map(|_| ()))
            .unwrap_or_else(|_| panic!("{case} panicked"));
        assert!(got.is_err(), "{case} was accepted");
        assert_eq!(
            got.unwrap_err().to_string(),
            want.unwrap_err().to_string(),
            "{case}"
        );
    }
}
