//! Every SIMD kernel the CPU supports equals the scalar reference, and the scalar reference equals
//! a plain f32 dot product of the dequantized weights with the dequantized activations.

use pare::quant::activation::Q8Acts;
use pare::quant::dequant::dequantize_row;
use pare::quant::kernels::{self, Isa};
use pare::quant::GgmlType;
use proptest::prelude::*;

const TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

/// A random but valid row: finite f16 scales (sometimes zero or extreme), random quant bytes.
fn random_row(ty: GgmlType, cols: usize, seed: u64, extreme: bool) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let nb = cols / ty.block_size();
    let mut out = Vec::with_capacity(nb * ty.type_size());
    for b in 0..nb {
        let scale = match (extreme, b % 4) {
            (true, 0) => 0.0,
            (true, 1) => 60000.0,
            (true, 2) => 1e-7,
            _ => ((next() % 2000) as f32 - 1000.0) / 20000.0,
        };
        out.extend_from_slice(&half::f16::from_f32(scale).to_le_bytes());
        if ty == GgmlType::Q4_1 {
            let m = ((next() % 2000) as f32 - 1000.0) / 10000.0;
            out.extend_from_slice(&half::f16::from_f32(m).to_le_bytes());
        }
        let n_q = ty.type_size() - out.len() % ty.type_size();
        for _ in 0..n_q {
            out.push(next() as u8);
        }
    }
    out
}

/// `w` holds `w.len() / row_bytes` rows; every path's tile product is checked element by element.
fn check(ty: GgmlType, w: &[u8], x: &[f32], n: usize, cols: usize) {
    let row_bytes = ty.row_bytes(cols).unwrap();
    let n_rows = w.len() / row_bytes;
    let mut acts = Q8Acts::default();
    acts.quantize(x, n, cols);
    let rows: Vec<_> = (0..n).map(|t| acts.row(t)).collect();
    let run = |isa: Isa| {
        // Output with a row stride wider than the tile, as inside a larger matrix; the padding
        // must stay untouched.
        let ldo = n_rows + 3;
        let mut out = vec![f32::NAN; n * ldo];
        unsafe { kernels::gemm_tile(isa, ty, w, row_bytes, &rows, out.as_mut_ptr(), ldo) };
        for t in 0..n {
            assert!(out[t * ldo + n_rows..(t + 1) * ldo]
                .iter()
                .all(|v| v.is_nan()));
        }
        out
    };
    let reference = run(Isa::Scalar);
    let ldo = n_rows + 3;
    for r in 0..n_rows {
        let mut wf = vec![0.0f32; cols];
        dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut wf).unwrap();
        for t in 0..n {
            // The scalar reference equals the f64 dot of the dequantized operands.
            let a = acts.row(t);
            let xf: Vec<f32> = (0..cols).map(|j| a.d[j / 32] * a.qs[j] as f32).collect();
            let mut exact: f64 = wf.iter().zip(&xf).map(|(a, b)| *a as f64 * *b as f64).sum();
            if ty == GgmlType::Q4_1 {
                // Q4_1's offset term uses the block sum as stored (f16, as ggml's Q8_1 keeps it),
                // not the sum of the dequantized activations.
                let wr = &w[r * row_bytes..(r + 1) * row_bytes];
                for (b, blk) in wr.chunks_exact(20).enumerate() {
                    let m = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32() as f64;
                    let xsum: f64 = xf[b * 32..b * 32 + 32].iter().map(|&v| v as f64).sum();
                    exact += m * (a.s[b] as f64 - xsum);
                }
            }
            let mag: f64 = wf
                .iter()
                .zip(&xf)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let tol = 1e-5 * mag + 1e-6;
            let want = reference[t * ldo + r] as f64;
            assert!(
                (want - exact).abs() <= tol,
                "{ty} scalar {want} vs exact {exact}"
            );
            for isa in Isa::supported() {
                let got = run(isa)[t * ldo + r] as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{ty} {} row {r} token {t}/{n}: {got} vs scalar {want} (tol {tol})",
                    isa.name()
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn simd_equals_scalar(
        ty_i in 0usize..3, blocks in 1usize..24, n in 1usize..=9, n_rows in 1usize..6,
        seed in any::<u64>(), extreme in any::<bool>(),
        xs in prop::collection::vec(-100.0f32..100.0, 32 * 24 * 9)
    ) {
        let ty = TYPES[ty_i];
        let cols = blocks * 32;
        let cols = cols.next_multiple_of(ty.block_size());
        let w: Vec<u8> = (0..n_rows)
            .flat_map(|r| random_row(ty, cols, seed.wrapping_add(r as u64), extreme))
            .collect();
        let mut x = xs[..n * cols].to_vec();
        if extreme {
            // An all-zero activation block and a block with one huge outlier.
            x[..32].fill(0.0);
            if cols >= 64 { x[40] = 1e6; }
        }
        check(ty, &w, &x, n, cols);
    }
}

#[test]
fn all_zero_inputs_give_zero() {
    for ty in TYPES {
        let w = vec![0u8; ty.row_bytes(576).unwrap()];
        let x = vec![0.0f32; 576 * 2];
        check(ty, &w, &x, 2, 576);
    }
}

#[test]
fn smollm2_shapes() {
    for ty in TYPES {
        for (i, cols) in [576usize, 1536].into_iter().enumerate() {
            let w: Vec<u8> = (0..3)
                .flat_map(|r| random_row(ty, cols, 7 + i as u64 + r, false))
                .collect();
            let x: Vec<f32> = (0..cols * 5)
                .map(|j| ((j * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            check(ty, &w, &x, 5, cols);
        }
    }
}
