//! Dequantization against values computed independently of pare.
//!
//! `tests/fixtures/quant/quant.gguf` holds, per ggml type, tensors of valid blocks (quantized from
//! edge-case weights by the `gguf` package where it can, random block bytes with sane and extreme f16
//! scales otherwise); `quant_expected.gguf` holds `<name>.expected`, the same tensors dequantized by
//! `gguf.quants.dequantize` (or, for Q1_0, the numpy reference in the script). Regenerate both with
//! `scripts/gen_quant_fixtures.py`.
//!
//! The comparison is bit-exact for every type: pare evaluates each weight with the same f32
//! operations in the same order as ggml and the numpy reference (`d * q`, `d * q + m`,
//! `(d * sc) * q - dmin * m`), and IEEE f32 arithmetic is deterministic, so any difference is a bug.
//! Bits are compared (not values) so that -0.0, infinities and NaN are checked too.

use std::path::PathBuf;

use pare::format::gguf::Gguf;
use pare::quant::dequant::{dequantize_row, dequantize_tensor};
use pare::quant::GgmlType;
use pare::Error;

fn fixture(name: &str) -> Gguf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quant")
        .join(name);
    Gguf::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every type the fixture must cover, with the tensors that hold it.
const CASES: &[(GgmlType, &[&str])] = &[
    (GgmlType::F32, &["F32"]),
    (GgmlType::F16, &["F16"]),
    (GgmlType::BF16, &["BF16"]),
    (GgmlType::Q4_0, &["Q4_0", "Q4_0.random"]),
    (GgmlType::Q4_1, &["Q4_1", "Q4_1.random"]),
    (GgmlType::Q5_0, &["Q5_0", "Q5_0.random"]),
    (GgmlType::Q5_1, &["Q5_1", "Q5_1.random"]),
    (GgmlType::Q8_0, &["Q8_0", "Q8_0.random"]),
    (GgmlType::Q2K, &["Q2_K"]),
    (GgmlType::Q3K, &["Q3_K"]),
    (GgmlType::Q4K, &["Q4_K"]),
    (GgmlType::Q5K, &["Q5_K"]),
    (GgmlType::Q6K, &["Q6_K"]),
    (GgmlType::Q1_0, &["Q1_0", "Q1_0.random"]),
];

fn assert_bits_eq(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let bad: Vec<usize> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{name}: {} of {} values differ; first at {i}: got {} ({:#010x}), want {} ({:#010x})",
            bad.len(),
            got.len(),
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits()
        );
    }
}

#[test]
fn every_type_matches_the_reference_bit_for_bit() {
    let q = fixture("quant.gguf");
    let e = fixture("quant_expected.gguf");
    for &(ty, names) in CASES {
        for &name in names {
            let t = q
                .tensor(name)
                .unwrap_or_else(|| panic!("fixture lacks {name}"));
            assert_eq!(t.ggml_type, ty, "{name}: type in fixture");
            let want_t = e
                .tensor(&format!("{name}.expected"))
                .unwrap_or_else(|| panic!("fixture lacks {name}.expected"));
            assert_eq!(want_t.ggml_type, GgmlType::F32);
            assert_eq!(t.dims, want_t.dims, "{name}: dims");
            let want = dequantize_tensor(&e, want_t).unwrap();
            let got = dequantize_tensor(&q, t).unwrap();
            assert_bits_eq(name, &got, &want);

            // Row by row gives the same as the whole tensor at once.
            let data = q.tensor_data(t);
            let rb = ty.row_bytes(t.row_len()).unwrap();
            let mut row = vec![0f32; t.row_len()];
            for r in 0..t.n_rows() {
                dequantize_row(ty, &data[r * rb..(r + 1) * rb], &mut row).unwrap();
                assert_bits_eq(
                    &format!("{name} row {r}"),
                    &row,
                    &want[r * t.row_len()..(r + 1) * t.row_len()],
                );
            }
        }
    }
}

/// The fixtures really contain the edge cases the script means to put there; without this check a
/// generator bug could quietly make the comparison above trivial.
#[test]
fn fixture_covers_edge_cases() {
    let e = fixture("quant_expected.gguf");
    let vals = |name: &str| dequantize_tensor(&e, e.tensor(&format!("{name}.expected")).unwrap());
    for &(ty, names) in CASES {
        for &name in names {
            let v = vals(name).unwrap();
            assert!(v.iter().any(|&x| x < 0.0), "{name}: no negative values");
            assert!(v.iter().any(|&x| x > 0.0), "{name}: no positive values");
            let distinct: std::collections::BTreeSet<u32> = v.iter().map(|x| x.to_bits()).collect();
            assert!(
                distinct.len() > 8,
                "{name}: only {} distinct values",
                distinct.len()
            );
            if ty.block_size() > 1 {
                let bs = ty.block_size();
                assert!(
                    v.chunks(bs).any(|b| b.iter().all(|&x| x == 0.0)),
                    "{name}: no all-zero block"
                );
                assert!(
                    v.iter().any(|&x| x.abs() > 1000.0),
                    "{name}: no large-scale block"
                );
            }
        }
    }
    let f16 = vals("F16").unwrap();
    assert!(f16.iter().any(|x| x.is_nan()) && f16.iter().any(|x| x.is_infinite()));
}

#[test]
fn q1_0_signs_by_hand() {
    // d = 0.5 (f16 0x3800); byte 0 = 0b0000_0101: weights 0 and 2 positive; byte 15 = 0x80: weight 127.
    let mut block = [0u8; 18];
    block[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    block[2] = 0b0000_0101;
    block[17] = 0x80;
    let mut y = [0f32; 128];
    dequantize_row(GgmlType::Q1_0, &block, &mut y).unwrap();
    for (j, &v) in y.iter().enumerate() {
        let want = if j == 0 || j == 2 || j == 127 {
            0.5
        } else {
            -0.5
        };
        assert_eq!(v, want, "weight {j}");
    }
}

#[test]
fn q4_0_by_hand() {
    // d = 2; qs[0] = 0xF0: weight 0 = (0 - 8) * 2, weight 16 = (15 - 8) * 2; other bytes 0x88 -> 0.
    let mut block = [0x88u8; 18];
    block[..2].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
    block[2] = 0xF0;
    let mut y = [1f32; 32];
    dequantize_row(GgmlType::Q4_0, &block, &mut y).unwrap();
    assert_eq!(y[0], -16.0);
    assert_eq!(y[16], 14.0);
    assert!(y
        .iter()
        .enumerate()
        .all(|(j, &v)| j == 0 || j == 16 || v == 0.0));
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    for &(ty, _) in CASES {
        let bs = ty.block_size();
        let rb = ty.row_bytes(bs * 2).unwrap();
        let src = vec![0u8; rb + 1];
        let mut dst = vec![0f32; bs * 2];
        assert!(dequantize_row(ty, &src[..rb], &mut dst).is_ok(), "{ty}");
        for bad_src in [&src[..rb - 1], &src[..], &src[..0]] {
            let e = dequantize_row(ty, bad_src, &mut dst).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{ty}: {e}");
            assert!(e.to_string().contains("bytes"), "{ty}: {e}");
        }
        if bs > 1 {
            let e = dequantize_row(ty, &src[..rb], &mut dst[..bs + 1]).unwrap_err();
            assert!(e.to_string().contains("block size"), "{ty}: {e}");
        }
    }
}

#[test]
fn unsupported_types_are_named() {
    for ty in [
        GgmlType::Q8_1,
        GgmlType::Q8K,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
    ] {
        let bs = ty.block_size();
        let src = vec![0u8; ty.type_size()];
        let mut dst = vec![0f32; bs];
        let e = dequantize_row(ty, &src, &mut dst).unwrap_err();
        assert!(matches!(e, Error::UnsupportedType(_)), "{ty}: {e}");
        assert!(e.to_string().contains(ty.name()), "{ty}: {e}");
    }
}

#[test]
fn foreign_tensor_info_is_an_error() {
    let q = fixture("quant.gguf");
    let mut t = q.tensor("Q4_0").unwrap().clone();
    t.offset = q.bytes().len() as u64;
    let e = dequantize_tensor(&q, &t).unwrap_err();
    assert!(e.to_string().contains("not inside"), "{e}");
    t.offset = u64::MAX - 3;
    assert!(dequantize_tensor(&q, &t).is_err());
}
