//! End-to-end sensitivity, measured: the KL divergence of the model's next-token distributions on
//! calibration text when only one group of tensors (one block, or the embeddings/output head) is
//! quantized to a reference format.
//!
//! Activation-weighted output errors are in each tensor's own units: an error written into the
//! residual stream early, where the stream is small, does far more harm than the same error late.
//! Dividing each group's measured KL by its summed output error at the same format gives the
//! exchange rate from output error to KL; the planner multiplies every candidate's error by its
//! group's rate, so errors of different tensors are compared in one unit (nats).

use crate::error::{Error, Result};
use crate::model::{Logits, Model, State};
use crate::quant::matmul::{QMatrix, WeightBytes};
use crate::quant::quantize::{quantize_rows, Method, Options};
use crate::quant::{format, GgmlType};

/// Mean KL divergence (nats per position) from `base` to `other`, both `[n × vocab]` logits.
pub fn mean_kl(base: &[f32], other: &[f32], vocab: usize) -> f64 {
    let rows = base.len() / vocab.max(1);
    let mut total = 0.0;
    for (p, q) in base.chunks_exact(vocab).zip(other.chunks_exact(vocab)) {
        let lse = |z: &[f32]| {
            let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
        };
        let (lp, lq) = (lse(p), lse(q));
        total += p
            .iter()
            .zip(q)
            .map(|(&a, &b)| {
                let la = a as f64 - lp;
                la.exp() * (la - (b as f64 - lq))
            })
            .sum::<f64>();
    }
    total / rows.max(1) as f64
}

/// `m` with its weights re-quantized to `ty` by round-to-nearest (from its stored values).
fn requantized(m: &QMatrix, ty: GgmlType) -> Result<QMatrix> {
    let ty = format::storage_type(ty, m.cols);
    let mut w = vec![0f32; m.rows * m.cols];
    for (r, row) in w.chunks_exact_mut(m.cols).enumerate() {
        m.dequantize_row(r, row)?;
    }
    let mut q = vec![0u8; ty.row_bytes(m.cols)? * m.rows];
    let opts = Options {
        method: Method::Rtn,
        importance: None,
    };
    quantize_rows(ty, &w, m.cols, &opts, &mut q)?;
    QMatrix::new(&m.name, ty, m.rows, m.cols, WeightBytes::from_vec(q))
}

/// For each group of tensor names, the mean KL over `tokens` (one sequence from an empty
/// context) when only that group is quantized to `ty` by round-to-nearest. The model is restored
/// after each group. `progress` hears (done, total).
pub fn group_kl(
    model: &mut Model,
    tokens: &[u32],
    groups: &[Vec<String>],
    ty: GgmlType,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<f64>> {
    if tokens.is_empty() {
        return Err(Error::Invalid(
            "no tokens to measure KL sensitivity on".into(),
        ));
    }
    let vocab = model.config.n_vocab;
    let mut state = State::new(model, tokens.len())?;
    model.forward(&mut state, tokens, Logits::All)?;
    let base = std::mem::take(&mut state.logits);
    let mut out = Vec::with_capacity(groups.len());
    for (gi, names) in groups.iter().enumerate() {
        let mut saved = Vec::new();
        for name in names {
            let first = model.weights.matrices_named_mut(name);
            let Some(m) = first.first() else {
                return Err(Error::Invalid(format!("no matrix {name:?} in the model")));
            };
            let q = requantized(m, ty)?;
            for m in model.weights.matrices_named_mut(name) {
                saved.push((name.clone(), std::mem::replace(m, q.clone())));
            }
        }
        state.reset();
        let run = model.forward(&mut state, tokens, Logits::All);
        // Restore before looking at the result, so an error leaves the model as it was.
        for (name, orig) in saved.into_iter().rev() {
            for m in model.weights.matrices_named_mut(&name) {
                *m = orig.clone();
            }
        }
        run?;
        out.push(mean_kl(&base, &state.logits, vocab));
        progress(gi + 1, groups.len());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_logits_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
        assert!(mean_kl(&a, &a, 3).abs() < 1e-12);
        let b = [1.0f32, 2.0, 3.5, 0.5, 0.5, 0.5];
        let kl = mean_kl(&a, &b, 3);
        assert!(kl > 0.0);
        // A constant shift of the logits is the same distribution.
        let c = [11.0f32, 12.0, 13.0, 0.0, 0.0, 0.0];
        assert!(mean_kl(&a, &c, 3).abs() < 1e-9);
    }
}
