//! Quantization-aware training: the adapters are trained merged into their base weight and
//! fake-quantized in the forward pass, `W_eff = Q(W + s·B·A)`, where `Q` quantizes to the base
//! tensor's own format and dequantizes again, exactly as `pare merge` will store it (same
//! quantizer, same group layout). The rounding has no useful derivative, so the backward pass
//! uses a straight-through estimator:
//!
//! - `ste`: the gradient passes through `Q` unchanged;
//! - `clipped`: it passes only where the value lies inside its group's representable range (half
//!   a step beyond the extreme codes), since outside it a small change does not change the output.

use half::f16;

use crate::error::{Error, Result};
use crate::model::backward::MergedWeight;
use crate::model::dense;
use crate::model::lora::{Adapter, Target};
use crate::quant::matmul::QMatrix;
use crate::quant::pq::Pq;
use crate::quant::quantize::{quantize_group, Method};
use crate::quant::{format, GgmlType};

/// `--qat`: how (and whether) the adapters see quantization while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QatMode {
    /// Adapters unmerged, in f32 beside the quantized base (plain LoRA).
    None,
    Ste,
    Clipped,
}

impl QatMode {
    pub fn parse(s: &str) -> Result<QatMode> {
        match s {
            "none" => Ok(QatMode::None),
            "ste" => Ok(QatMode::Ste),
            "clipped" => Ok(QatMode::Clipped),
            _ => Err(Error::Invalid(format!(
                "--qat {s:?}: expected none, ste or clipped"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QatMode::None => "none",
            QatMode::Ste => "ste",
            QatMode::Clipped => "clipped",
        }
    }
}

/// What [`FakeQuant::per_group`] runs on a group: (format, values, d, m, codes).
type GroupFn = dyn Fn(Pq, &mut [f32], f32, f32, &[u8]) + Sync;

/// The fake quantizer: [`MergedWeight`] for QAT modes.
#[derive(Debug, Clone, Copy)]
pub struct FakeQuant {
    pub mode: QatMode,
    /// The quantizer's method (the one `pare merge` uses).
    pub method: Method,
}

/// How values of a base tensor's format are rounded.
#[derive(Clone, Copy)]
enum Grid {
    Pq(Pq),
    F16,
    Bf16,
    F32,
}

fn grid(w: &QMatrix) -> Result<Grid> {
    match w.ty {
        GgmlType::F32 => Ok(Grid::F32),
        GgmlType::F16 => Ok(Grid::F16),
        GgmlType::BF16 => Ok(Grid::Bf16),
        ty => Pq::of_ggml(ty).map(Grid::Pq).ok_or_else(|| {
            Error::UnsupportedType(format!(
                "{}: quantization-aware training needs a base format pare can write, not {}",
                w.name,
                format::name(ty)
            ))
        }),
    }
}

/// Checks that every matrix QAT would fake-quantize has a format pare can write.
pub fn check_base(model: &crate::model::Model, targets: &[Target]) -> Result<()> {
    for lw in &model.weights.layers {
        for &t in targets {
            grid(matrix(lw, t))?;
        }
    }
    Ok(())
}

/// The base weight an adapter target sits on.
pub fn matrix(lw: &crate::model::LayerWeights, t: Target) -> &QMatrix {
    match t {
        Target::Q => &lw.wq,
        Target::K => &lw.wk,
        Target::V => &lw.wv,
        Target::O => &lw.wo,
        Target::Gate => &lw.gate,
        Target::Up => &lw.up,
        Target::Down => &lw.down,
    }
}

impl FakeQuant {
    /// `V = W + s·B·A` (rows × cols).
    fn merged(w: &QMatrix, ad: &Adapter, s: f32, out: &mut Vec<f32>) -> Result<()> {
        dense::dequantize(w, out)?;
        let mut delta = vec![0.0f32; w.rows * w.cols];
        ad.delta(s, &mut delta);
        for (o, d) in out.iter_mut().zip(&delta) {
            *o += d;
        }
        Ok(())
    }

    /// Runs `f(row, group start, group values, (d, m), codes)` for every group of every row of
    /// `v`, after quantizing it; rows spread over the worker threads. For float grids the whole
    /// row is one group with `codes` empty.
    fn per_group(&self, g: Grid, rows: usize, cols: usize, v: &mut [f32], f: &GroupFn) {
        let method = self.method;
        let ptr = crate::parallel::DisjointMut::new(v);
        crate::parallel::for_each(rows, &|r| {
            // SAFETY: task r touches only row r.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(r * cols), cols) };
            match g {
                Grid::Pq(p) => {
                    let gs = p.group as usize;
                    let ones = vec![1.0f32; gs];
                    let mut codes = vec![0u8; gs];
                    for xg in row.chunks_mut(gs) {
                        let n = xg.len();
                        let (d, m) = quantize_group(p, xg, &ones[..n], method, &mut codes[..n]);
                        f(p, xg, d, m, &codes[..n]);
                    }
                }
                Grid::F16 => row.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
                Grid::Bf16 => row
                    .iter_mut()
                    .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
                Grid::F32 => {}
            }
        });
    }
}

impl MergedWeight for FakeQuant {
    fn effective(
        &self,
        _layer: usize,
        _t: Target,
        w: &QMatrix,
        ad: &Adapter,
        s: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let g = grid(w)?;
        Self::merged(w, ad, s, out)?;
        self.per_group(g, w.rows, w.cols, out, &|p, xg, d, m, codes| {
            for (x, &c) in xg.iter_mut().zip(codes) {
                *x = p.value(c, d, m);
            }
        });
        Ok(())
    }

    fn backward(
        &self,
        _layer: usize,
        _t: Target,
        w: &QMatrix,
        ad: &Adapter,
        s: f32,
        grad: &mut [f32],
    ) -> Result<()> {
        if self.mode != QatMode::Clipped {
            return Ok(());
        }
        let g = grid(w)?;
        if !matches!(g, Grid::Pq(_)) {
            return Ok(());
        }
        // Replace V by its pass-through mask (1 inside the group's range, 0 outside), then
        // multiply it into the gradient.
        let mut v = Vec::new();
        Self::merged(w, ad, s, &mut v)?;
        self.per_group(g, w.rows, w.cols, &mut v, &|p, xg, d, m, _| {
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            for c in [0, p.max_code()] {
                let val = p.value(c, d, m);
                lo = lo.min(val);
                hi = hi.max(val);
            }
            let half_step = 0.5 * d.abs() * if p.bits == 1 && p.sym { 2.0 } else { 1.0 };
            for x in xg.iter_mut() {
                *x = f32::from(*x >= lo - half_step && *x <= hi + half_step);
            }
        });
        for (gr, m) in grad.iter_mut().zip(&v) {
            *gr *= m;
        }
        Ok(())
    }
}
