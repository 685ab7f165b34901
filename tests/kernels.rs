//! Every SIMD kernel the CPU supports equals the scalar reference, and the scalar reference equals
//! a plain f32 dot product of the dequantized weights with the dequantized activations.

use pare::quant::activation::Q8Acts;
use pare::quant::dequant::dequantize_row;
use pare::quant::kernels::{self, Isa};
use pare::quant::{GgmlType, Pq};
use proptest::prelude::*;

const TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

/// A random but valid row: finite f16 scales (sometimes zero or extreme), random quant bytes.
fn random_row(ty: GgmlType, cols: usize, seed: u64, extreme: bool) -> Vec<u8> {
    let mut next = rng(seed);
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

/// A random but valid pq row of `cols` weights: finite f16 scales (and minimums), random code bytes
/// (the padding of a last chunk included: it meets zero activations); with `extreme`, groups cycle
/// through zero, huge and tiny scales, and every fourth group has all codes at their maximum.
fn random_pq_row(p: Pq, cols: usize, seed: u64, extreme: bool) -> Vec<u8> {
    let mut next = rng(seed);
    let g = p.group as usize;
    let mut out = Vec::with_capacity(p.row_bytes(cols));
    for (i, g0) in (0..cols).step_by(g).enumerate() {
        let w = (cols - g0).min(g);
        let scale = match (extreme, i % 4) {
            (true, 0) => 0.0,
            (true, 1) => 60000.0,
            (true, 2) => 1e-7,
            _ => ((next() % 2000) as f32 - 1000.0) / 20000.0,
        };
        out.extend_from_slice(&half::f16::from_f32(scale).to_le_bytes());
        if !p.sym {
            let m = if extreme && i % 4 == 1 {
                -30000.0
            } else {
                ((next() % 2000) as f32 - 1000.0) / 10000.0
            };
            out.extend_from_slice(&half::f16::from_f32(m).to_le_bytes());
        }
        for _ in 0..w.div_ceil(32) * p.chunk_bytes() {
            out.push(if extreme && i % 4 == 3 {
                0xFF
            } else {
                next() as u8
            });
        }
    }
    assert_eq!(out.len(), p.row_bytes(cols));
    out
}

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// A random row of any type with a kernel: pq types and their ggml twins through [`random_pq_row`].
fn any_row(ty: GgmlType, cols: usize, seed: u64, extreme: bool) -> Vec<u8> {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => random_row(ty, cols, seed, extreme),
        _ => random_pq_row(Pq::of_ggml(ty).unwrap(), cols, seed, extreme),
    }
}

/// Bound on the magnitude of the terms a pq row's product sums: Σ (|d|·2^k + |m|)·|x| over the
/// row's weights. Float errors are stated relative to it (the format's own sum `d·c·x + m·x` may
/// cancel to far less).
fn pq_magnitude(p: Pq, w: &[u8], xf: &[f32]) -> f64 {
    let cols = xf.len();
    p.groups(w, cols)
        .enumerate()
        .map(|(i, (h, _, n))| {
            let (d, m) = p.header(h);
            let bound = d.abs() as f64 * (1u32 << p.bits) as f64 + m.abs() as f64;
            let g0 = i * p.group as usize;
            bound * xf[g0..g0 + n].iter().map(|v| v.abs() as f64).sum::<f64>()
        })
        .sum()
}

/// `w` holds `w.len() / row_bytes` rows; every path's tile product is checked element by element.
fn check(ty: GgmlType, w: &[u8], x: &[f32], n: usize, cols: usize) {
    let row_bytes = ty.row_bytes(cols).unwrap();
    let n_rows = w.len() / row_bytes;
    let mut acts = Q8Acts::default();
    acts.quantize(x, n, cols);
    let rows: Vec<_> = (0..n).map(|t| acts.row(t)).collect();
    // Output with a row stride wider than the tile, as inside a larger matrix; the padding must
    // stay untouched.
    let ldo = n_rows + 3;
    let run = |isa: Isa| {
        let mut out = vec![f32::NAN; n * ldo];
        // SAFETY: `out` holds n rows of ldo >= n_rows elements.
        unsafe { kernels::gemm_tile(isa, ty, w, row_bytes, &rows, out.as_mut_ptr(), ldo) };
        for t in 0..n {
            assert!(out[t * ldo + n_rows..(t + 1) * ldo]
                .iter()
                .all(|v| v.is_nan()));
        }
        out
    };
    let reference = run(Isa::Scalar);
    let simd: Vec<(Isa, Vec<f32>)> = Isa::supported().into_iter().map(|i| (i, run(i))).collect();
    let special = matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
    for r in 0..n_rows {
        let wr = &w[r * row_bytes..(r + 1) * row_bytes];
        let mut wf = vec![0.0f32; cols];
        dequantize_row(ty, wr, &mut wf).unwrap();
        for t in 0..n {
            // The scalar reference equals the f64 dot of the dequantized operands.
            let a = acts.row(t);
            let xf: Vec<f32> = (0..cols).map(|j| a.d[j / 32] * a.qs[j] as f32).collect();
            let mut exact: f64 = wf.iter().zip(&xf).map(|(a, b)| *a as f64 * *b as f64).sum();
            if ty == GgmlType::Q4_1 {
                // Q4_1's offset term uses the block sum as stored (f16, as ggml's Q8_1 keeps it),
                // not the sum of the dequantized activations.
                for (b, blk) in wr.chunks_exact(20).enumerate() {
                    let m = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32() as f64;
                    let xsum: f64 = xf[b * 32..b * 32 + 32].iter().map(|&v| v as f64).sum();
                    exact += m * (a.s[b] as f64 - xsum);
                }
            }
            let mag: f64 = if special {
                wf.iter()
                    .zip(&xf)
                    .map(|(a, b)| (*a as f64 * *b as f64).abs())
                    .sum()
            } else {
                pq_magnitude(Pq::of_ggml(ty).unwrap(), wr, &xf)
            };
            let tol = 1e-5 * mag + 1e-6;
            let want = reference[t * ldo + r] as f64;
            assert!(
                (want - exact).abs() <= tol,
                "{ty} cols {cols} row {r} token {t}/{n}: scalar {want} vs exact {exact} (tol {tol})"
            );
            for (isa, out) in &simd {
                let got = out[t * ldo + r] as f64;
                assert!(
                    (got - want).abs() <= tol,
                    "{ty} {} cols {cols} row {r} token {t}/{n}: {got} vs scalar {want} (tol {tol})",
                    isa.name()
                );
            }
        }
    }
}

/// Every type with a kernel: the three with llama.cpp-rounding kernels, the ggml twins of pq
/// formats, and all 42 pq formats.
fn kernel_types() -> Vec<GgmlType> {
    let mut v = TYPES.to_vec();
    v.extend([GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q1_0]);
    v.extend(Pq::all().map(GgmlType::Pq));
    assert!(v.iter().all(|&t| kernels::has_q8_kernel(t)));
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn simd_equals_scalar(
        ty_i in 0usize..3, blocks in 1usize..24, n in 1usize..=9, n_rows in 1usize..10,
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
    // Zero activations against random weights, and zero groups (all-zero bytes) in pq rows.
    for ty in kernel_types() {
        let cols = if matches!(ty, GgmlType::Pq(_)) {
            100
        } else {
            256
        };
        let w = any_row(ty, cols, 3, false);
        check(ty, &w, &vec![0.0f32; cols * 3], 3, cols);
        let w = vec![0u8; ty.row_bytes(cols).unwrap()];
        let x: Vec<f32> = (0..cols * 2).map(|j| j as f32 - 50.0).collect();
        check(ty, &w, &x, 2, cols);
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    /// Any kernel type, any row length it allows (pq: any length, tails and padded chunks), 1 to 9
    /// tokens.
    #[test]
    fn every_format_simd_equals_scalar(
        ty_i in 0usize..48, cols in 1usize..1100, n in 1usize..=9, n_rows in 1usize..10,
        seed in any::<u64>(), extreme in any::<bool>(),
        xs in prop::collection::vec(-100.0f32..100.0, 1100 * 9)
    ) {
        let ty = kernel_types()[ty_i];
        let cols = match ty {
            GgmlType::Pq(_) => cols,
            _ => cols.next_multiple_of(ty.block_size()),
        };
        let w: Vec<u8> = (0..n_rows)
            .flat_map(|r| any_row(ty, cols, seed.wrapping_add(r as u64), extreme))
            .collect();
        let mut x: Vec<f32> = (0..n * cols).map(|i| xs[i % xs.len()]).collect();
        if extreme {
            x[..32.min(cols)].fill(0.0);
            if cols >= 64 { x[40] = 1e6; }
        }
        check(ty, &w, &x, n, cols);
    }
}

/// Every pq format (and twin) on the odd shapes of real models, 1 to 5 tokens, plain and extreme.
/// Six rows: one token takes the four-row decode kernels and then the row-by-row tail.
#[test]
fn every_format_odd_shapes() {
    for ty in kernel_types() {
        for cols in [32usize, 40, 100, 128, 576, 1000] {
            if !matches!(ty, GgmlType::Pq(_)) && !cols.is_multiple_of(ty.block_size()) {
                continue;
            }
            for (n, extreme) in [(1, false), (2, true), (3, false), (4, true), (5, false)] {
                let seed = cols as u64 * 31 + n as u64;
                let w: Vec<u8> = (0..6)
                    .flat_map(|r| any_row(ty, cols, seed + r, extreme))
                    .collect();
                let x: Vec<f32> = (0..cols * n)
                    .map(|j| ((j * 37 % 101) as f32 - 50.0) / 7.0)
                    .collect();
                check(ty, &w, &x, n, cols);
            }
        }
    }
}

/// All codes at their maximum with the largest activations: the 8-bit codes of 255 against ±127
/// are where `vpmaddubsw` would saturate.
#[test]
fn max_codes_do_not_saturate() {
    for ty in kernel_types() {
        let cols = 256;
        let mut w = any_row(ty, cols, 1, false);
        // Every kernel type has a pq twin with the same bytes: set each group's codes to all ones.
        let p = Pq::of_ggml(ty).unwrap();
        let (hb, g) = (p.header_bytes(), p.group as usize);
        let gb = p.group_bytes();
        for g0 in 0..cols / g {
            w[g0 * gb + hb..(g0 + 1) * gb].fill(0xFF);
        }
        let x: Vec<f32> = (0..cols * 3)
            .map(|j| if j % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        check(ty, &w, &x, 3, cols);
        // Five copies of the row, one token: the four-row decode kernels, then the tail; with
        // every activation +127 too, so that the 16-bit sums of the four-row kernel meet their
        // bound without cancelling. Symmetric codes are largest in magnitude at 0 (−2^(k−1)).
        check(ty, &w.repeat(5), &x[..cols], 1, cols);
        let ones = vec![1.0f32; cols];
        check(ty, &w.repeat(5), &ones, 1, cols);
        if p.sym {
            for g0 in 0..cols / g {
                w[g0 * gb + hb..(g0 + 1) * gb].fill(0);
            }
            check(ty, &w.repeat(5), &ones, 1, cols);
        }
    }
}

/// `matmul` on pq matrices of any row length takes the 8-bit path (tiles split across threads) and
/// agrees with the exact f32 path on dequantized weights up to the activations' quantization.
#[test]
fn matmul_pq_any_length() {
    use pare::quant::matmul::{matmul, Input, QMatrix, WeightBytes};
    for (ty, cols) in [
        (GgmlType::Pq(Pq::parse("q3_g64").unwrap()), 100),
        (GgmlType::Pq(Pq::parse("q4_g128_sym").unwrap()), 576),
        (GgmlType::Pq(Pq::parse("q8_g32").unwrap()), 40),
        (GgmlType::Q5_1, 96),
        (GgmlType::Q1_0, 256),
    ] {
        let rows = 37;
        let w: Vec<u8> = (0..rows)
            .flat_map(|r| any_row(ty, cols, 11 + r as u64, false))
            .collect();
        let m = QMatrix::new("w", ty, rows, cols, WeightBytes::from_vec(w)).unwrap();
        assert!(m.wants_q8(), "{ty}");
        for n in [1, 3, 6] {
            let x: Vec<f32> = (0..n * cols)
                .map(|j| ((j * 53 % 97) as f32 - 48.0) / 9.0)
                .collect();
            let mut acts = Q8Acts::default();
            acts.quantize(&x, n, cols);
            let mut fast = vec![0.0f32; n * rows];
            let mut exact = vec![0.0f32; n * rows];
            let q8 = Input {
                x: &x,
                q8: Some(&acts),
                n,
            };
            matmul(&m, &q8, &mut fast);
            matmul(&m, &Input { x: &x, q8: None, n }, &mut exact);
            let mut wf = vec![0.0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut wf).unwrap();
                for t in 0..n {
                    // Activations quantized to 8 bits: error up to half a step (amax/254) each.
                    let xs = &x[t * cols..(t + 1) * cols];
                    let step: f32 = xs.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                    let tol: f32 = wf.iter().map(|v| v.abs() * step).sum::<f32>() + 1e-4;
                    let (a, b) = (fast[t * rows + r], exact[t * rows + r]);
                    assert!(
                        (a - b).abs() <= tol,
                        "{ty} {cols} row {r} token {t}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

/// Float weights (f32, f16, bf16): every path equals the scalar reference, which equals the f64 dot
/// of the dequantized row, on odd lengths (SIMD main loop, 8-wide step and scalar tail) and 1 to 5
/// tokens.
#[test]
fn float_kernels_equal_scalar() {
    use pare::quant::quantize::{quantize_row, Options};
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        assert!(kernels::has_float_kernel(ty));
        for cols in [1usize, 7, 8, 15, 16, 24, 100, 576] {
            let rows = 3;
            let row_bytes = ty.row_bytes(cols).unwrap();
            let mut w = vec![0u8; rows * row_bytes];
            let mut next = rng(cols as u64);
            for r in 0..rows {
                let wf: Vec<f32> = (0..cols)
                    .map(|_| ((next() % 20001) as f32 - 10000.0) / 3000.0)
                    .collect();
                quantize_row(
                    ty,
                    &wf,
                    &Options::default(),
                    &mut w[r * row_bytes..(r + 1) * row_bytes],
                )
                .unwrap();
            }
            for n in 1..=5 {
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| ((next() % 20001) as f32 - 10000.0) / 700.0)
                    .collect();
                let ldo = rows + 2;
                let run = |isa: Isa| {
                    let mut out = vec![f32::NAN; n * ldo];
                    // SAFETY: `out` holds n rows of ldo >= rows elements.
                    unsafe {
                        kernels::gemm_tile_float(isa, ty, &w, cols, &x, out.as_mut_ptr(), ldo)
                    };
                    out
                };
                let reference = run(Isa::Scalar);
                for r in 0..rows {
                    let mut wf = vec![0.0f32; cols];
                    dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut wf).unwrap();
                    for t in 0..n {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let exact: f64 =
                            wf.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let mag: f64 = wf
                            .iter()
                            .zip(xt)
                            .map(|(a, b)| (*a as f64 * *b as f64).abs())
                            .sum();
                        let tol = 1e-6 * mag + 1e-9;
                        let want = reference[t * ldo + r] as f64;
                        assert!(
                            (want - exact).abs() <= tol,
                            "{ty} {cols}: {want} vs {exact}"
                        );
                        for isa in Isa::supported() {
                            let got = run(isa)[t * ldo + r] as f64;
                            assert!(
                                (got - want).abs() <= tol,
                                "{ty} {} {cols} r{r} t{t}/{n}: {got} vs {want}",
                                isa.name()
                            );
                        }
                    }
                }
            }
        }
    }
}
