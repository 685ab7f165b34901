//! The sparse-input product (`y += Σ a·W[i]` over active input rows) on every instruction set the
//! CPU supports equals the scalar reference, and the reference equals an f64 sum over the
//! dequantized rows; for every pq format, the float types, row lengths that are not multiples of
//! the group or of 32, every column range a split can give, and no / all / some rows active.

use pare::quant::dequant::dequantize_row;
use pare::quant::kernels::sparse::{axpy_rows, axpy_rows_reference, Rows};
use pare::quant::kernels::Isa;
use pare::quant::quantize::{quantize_row, Method, Options};
use pare::quant::{GgmlType, Pq};
use proptest::prelude::*;

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `rows` rows of `cols` weights quantized to `ty`: random values with varied magnitudes per row,
/// one all-zero row and one row of a constant (a zero scale with a minimum).
fn matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut next = lcg(seed);
    let rb = ty.row_bytes(cols).unwrap();
    let mut out = vec![0u8; rows * rb];
    let opts = Options {
        method: Method::Rtn,
        importance: None,
    };
    for (r, o) in out.chunks_exact_mut(rb).enumerate() {
        let mag = [1.0, 0.01, 30.0][r % 3];
        let x: Vec<f32> = (0..cols)
            .map(|_| match r {
                0 => 0.0,
                1 => 0.75,
                _ => next() * mag,
            })
            .collect();
        quantize_row(ty, &x, &opts, o).unwrap();
    }
    out
}

fn types() -> Vec<GgmlType> {
    let mut v: Vec<GgmlType> = Pq::all().map(GgmlType::Pq).collect();
    v.extend([
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
    ]);
    v
}

/// The f64 truth and the sum of |terms| (the scale of the rounding error) per output.
fn truth(w: &Rows, active: &[(u32, f32)], cols: std::ops::Range<usize>) -> (Vec<f64>, Vec<f64>) {
    let mut row = vec![0.0f32; w.cols];
    let (mut y, mut mag) = (vec![0.0f64; cols.len()], vec![0.0f64; cols.len()]);
    for &(i, a) in active {
        dequantize_row(w.ty, w.row(i as usize), &mut row).unwrap();
        for (k, j) in cols.clone().enumerate() {
            let t = a as f64 * row[j] as f64;
            y[k] += t;
            mag[k] += t.abs();
        }
    }
    (y, mag)
}

fn check(ty: GgmlType, rows: usize, cols: usize, seed: u64, which: u8, parts: usize) {
    // ggml's own block types hold whole blocks only.
    let cols = if matches!(ty, GgmlType::Pq(_)) || ty.block_size() == 1 {
        cols
    } else {
        cols.next_multiple_of(ty.block_size())
    };
    let bytes = matrix(ty, rows, cols, seed);
    let w = Rows::new(ty, &bytes, rows, cols).unwrap();
    let mut next = lcg(seed ^ 0x5eed);
    let active: Vec<(u32, f32)> = match which {
        0 => Vec::new(),
        1 => (0..rows as u32).map(|i| (i, next() * 3.0)).collect(),
        _ => (0..rows as u32)
            .filter_map(|i| {
                let keep = next() > 0.2;
                let a = next() * 0.5;
                keep.then_some((i, a))
            })
            .collect(),
    };
    for cols_r in w.split(parts) {
        let (want, mag) = truth(&w, &active, cols_r.clone());
        let mut reference = vec![0.5f32; cols_r.len()];
        axpy_rows_reference(&w, &active, cols_r.clone(), &mut reference);
        for (k, (&r, (&t, &m))) in reference.iter().zip(want.iter().zip(&mag)).enumerate() {
            // The product is added to what y held (0.5 here).
            let err = (r as f64 - 0.5 - t).abs();
            assert!(
                err <= 1e-5 * (m + 1.0),
                "{ty} reference col {k}: {r} vs {t} (+0.5)"
            );
        }
        for isa in Isa::supported() {
            let mut y = vec![0.5f32; cols_r.len()];
            axpy_rows(isa, &w, &active, cols_r.clone(), &mut y);
            for (k, ((&a, &r), &m)) in y.iter().zip(&reference).zip(&mag).enumerate() {
                assert!(
                    ((a - r) as f64).abs() <= 1e-5 * (m + 1.0),
                    "{ty} {} rows {rows} cols {cols} range {cols_r:?} col {k}: {a} vs reference {r}",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn every_type_none_all_and_some_active() {
    for ty in types() {
        for cols in [32, 64, 96, 576, 200, 1] {
            for which in 0..3 {
                check(ty, 9, cols, cols as u64 * 7 + which as u64, which, 3);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn random_shapes_and_splits(
        t in 0usize..48,
        rows in 1usize..40,
        cols in 1usize..700,
        seed in any::<u64>(),
        which in 0u8..3,
        parts in 1usize..6,
    ) {
        let ty = types()[t];
        check(ty, rows, cols, seed, which, parts);
    }
}

#[test]
fn bad_shapes_are_errors() {
    let ty = GgmlType::Q4_1;
    let bytes = vec![0u8; ty.row_bytes(64).unwrap() * 3];
    assert!(Rows::new(ty, &bytes, 4, 64).is_err());
    assert!(Rows::new(GgmlType::Q6K, &bytes, 3, 64).is_err());
    assert!(Rows::new(ty, &bytes, 3, 64).is_ok());
}
