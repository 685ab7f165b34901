//! The panel GEMM (many tokens per weight row) on every instruction set equals the scalar
//! definition: the f32 dot product of the dequantized weights with the dequantized 8-bit
//! activations, for ggml's legacy types and every pq format, on odd shapes and token counts.

use pare::quant::activation::Q8Acts;
use pare::quant::dequant::dequantize_row;
use pare::quant::kernels::panel::{self, PanelActs, UnpackedRows};
use pare::quant::kernels::Isa;
use pare::quant::quantize::{quantize_row, Options};
use pare::quant::{format, GgmlType};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Relative error of `got` against `want`, measured against the sum of |terms| (the scale at
/// which float rounding acts).
fn check(ty: GgmlType, rows: usize, cols: usize, n: usize, seed: u64) {
    let mut rng = Rng(seed | 1);
    let rb = ty.row_bytes(cols).unwrap();
    let mut w = vec![0u8; rows * rb];
    let mut wf = vec![0f32; rows * cols];
    for r in 0..rows {
        let scale = match r % 5 {
            0 => 0.0,
            1 => 30.0,
            _ => 0.1,
        };
        let x: Vec<f32> = (0..cols).map(|_| rng.f() * scale).collect();
        quantize_row(ty, &x, &Options::default(), &mut w[r * rb..(r + 1) * rb]).unwrap();
        dequantize_row(
            ty,
            &w[r * rb..(r + 1) * rb],
            &mut wf[r * cols..(r + 1) * cols],
        )
        .unwrap();
    }
    let x: Vec<f32> = (0..n * cols)
        .map(|i| if (i / cols) % 7 == 3 { 0.0 } else { rng.f() })
        .collect();
    let mut q8 = Q8Acts::default();
    q8.quantize(&x, n, cols);
    // The activations as the kernels see them.
    let nb = cols.div_ceil(32);
    let xd: Vec<f32> = (0..n)
        .flat_map(|t| {
            let q8 = &q8;
            (0..cols).map(move |j| q8.d[t * nb + j / 32] * q8.qs[(t * nb) * 32 + j] as f32)
        })
        .collect();
    let mut u = UnpackedRows::default();
    u.unpack(ty, &w, rows, cols);
    for isa in Isa::supported() {
        if !panel::supports(isa, ty) {
            continue;
        }
        let mut acts = PanelActs::default();
        acts.pack(&q8, panel::panel_tokens(isa));
        let ldo = rows + 2;
        let mut out = vec![f32::NAN; n * ldo];
        unsafe { panel::gemm(isa, &u, 0..rows, &acts, out.as_mut_ptr(), ldo) };
        for t in 0..n {
            assert!(out[t * ldo + rows..(t + 1) * ldo]
                .iter()
                .all(|v| v.is_nan()));
            for r in 0..rows {
                let (mut want, mut mag) = (0f64, 0f64);
                for j in 0..cols {
                    let p = wf[r * cols + j] as f64 * xd[t * cols + j] as f64;
                    want += p;
                    mag += p.abs();
                }
                let got = out[t * ldo + r] as f64;
                // Q4_1's offset term uses ggml's f16-rounded block sums, as llama.cpp does.
                let tol = if ty == GgmlType::Q4_1 { 2e-3 } else { 2e-5 };
                assert!(
                    (got - want).abs() <= tol * mag + 1e-6,
                    "{ty} {} rows {rows} cols {cols} n {n}: row {r} token {t}: {got} vs {want} (mag {mag})",
                    isa.name()
                );
            }
        }
    }
}

#[test]
fn legacy_types() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        for (rows, n) in [(1, 1), (5, 9), (7, 17), (9, 33)] {
            check(ty, rows, 576, n, rows as u64 * 31 + n as u64);
        }
    }
    check(GgmlType::Q1_0, 6, 256, 20, 5);
}

#[test]
fn every_pq_format_any_row_length() {
    for ty in format::all() {
        if !matches!(ty, GgmlType::Pq(_)) {
            continue;
        }
        for (cols, n) in [(576, 16), (40, 3), (200, 21)] {
            check(ty, 6, cols, n, cols as u64 + n as u64);
        }
    }
}
