//! Gradient (Fisher) sensitivity, from backprop of the language-model loss.
//!
//! To second order, the KL divergence a small weight error `ΔW` causes is `½ ΔWᵀ F ΔW` with `F`
//! the Fisher information of the model's own next-token distribution. For a product `y = W x`,
//! the Fisher of `W` is approximated, as K-FAC's diagonal does, by the outer product of the output
//! gradient's mean square per row and the input's mean square per column:
//! `F_rj ≈ E[dy_r²] · E[x_j²]`, so a tensor's predicted KL (nats per token) is
//! `½ Σ_r G_r Σ_j imp_j ΔW_rj²`: the planner's activation-weighted output error, with each row
//! weighted by its gradient `G_r`. Unlike the output error alone, it is in one unit (nats) for
//! every tensor, so errors of an early and a late tensor can be traded against each other.
//!
//! The gradients are those of the true Fisher: targets are drawn from the model's own predictions,
//! not read from the text, so that `E[g gᵀ]` is the KL's curvature (the empirical Fisher of the
//! text's tokens is not). For the output head the expectation is taken exactly: a logit's gradient
//! `p − onehot` has mean square `p(1 − p)`.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::infer::sampling::Rng;
use crate::model::backward::Trainable;
use crate::model::lora::{Lora, LoraConfig};
use crate::model::{Logits, Model, State};
use crate::train::fake_quant::matrix;

/// Mean squares of the loss gradient, per token, for every matrix of a model.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fisher {
    /// Tokens the means are over.
    pub tokens: usize,
    /// `E[dy_r²]` per output row of each matrix (by name), the output head included.
    pub rows: BTreeMap<String, Vec<f64>>,
    /// `E[dx_j²]` per column of the hidden state entering the first layer: what a token
    /// embedding's error is weighed by.
    pub embedding_input: Vec<f64>,
}

impl Fisher {
    /// The per-row gradient weights of matrix `name`, as f32.
    pub fn row_weights(&self, name: &str) -> Option<Vec<f32>> {
        self.rows
            .get(name)
            .map(|v| v.iter().map(|&x| x as f32).collect())
    }

    pub fn embedding_weights(&self) -> Vec<f32> {
        self.embedding_input.iter().map(|&x| x as f32).collect()
    }
}

/// Samples an index from the softmax of `logits`.
fn sample(logits: &[f32], rng: &mut Rng) -> (u32, Vec<f64>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut p: Vec<f64> = logits.iter().map(|&v| ((v - max) as f64).exp()).collect();
    let sum: f64 = p.iter().sum();
    p.iter_mut().for_each(|v| *v /= sum);
    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let mut acc = 0.0;
    let mut pick = p.len() - 1;
    for (i, &v) in p.iter().enumerate() {
        acc += v;
        if u < acc {
            pick = i;
            break;
        }
    }
    (pick as u32, p)
}

/// Runs `tokens` in chunks of `n_ctx` (at most `max_chunks`) forward and back through `model`,
/// with targets drawn from its own predictions (seeded by `seed`), and collects the mean square
/// gradient at the output of every matrix product, rows in GGUF order. `progress` hears (done,
/// total) per chunk.
pub fn fisher(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<Fisher> {
    if n_ctx < 2 {
        return Err(Error::Invalid(
            "the gradient sensitivity needs chunks of at least 2 tokens".into(),
        ));
    }
    let chunks = (tokens.len() / n_ctx).min(max_chunks);
    if chunks == 0 {
        return Err(Error::Invalid(format!(
            "calibration text has {} tokens, fewer than one chunk of {n_ctx}",
            tokens.len()
        )));
    }
    let c = &model.config;
    let (d, nv) = (c.n_embd, c.n_vocab);
    // No adapters: the pass only carries gradients back through the frozen weights.
    let lora = Lora::zeros(
        c,
        LoraConfig {
            targets: Vec::new(),
            ..LoraConfig::default()
        },
    );
    let trainable = Trainable {
        model,
        lora: &lora,
        merged: None,
        dropout_seed: None,
    };
    let mut grads = lora.clone();
    let mut rng = Rng::new(seed);
    let mut out = Fisher {
        tokens: chunks * n_ctx,
        embedding_input: vec![0.0; d],
        ..Fisher::default()
    };
    let names: Vec<[String; 7]> = model
        .weights
        .layers
        .iter()
        .map(|lw| crate::model::lora::Target::ALL.map(|t| matrix(lw, t).name.clone()))
        .collect();
    let mut head = vec![0.0f64; nv];
    let mut state = State::new(model, n_ctx)?;
    for ci in 0..chunks {
        let chunk = &tokens[ci * n_ctx..(ci + 1) * n_ctx];
        state.reset();
        model.forward(&mut state, chunk, Logits::All)?;
        let mut targets = Vec::with_capacity(n_ctx);
        for row in state.logits.chunks_exact(nv) {
            let (y, p) = sample(row, &mut rng);
            targets.push(y);
            for (h, &pv) in head.iter_mut().zip(&p) {
                *h += pv * (1.0 - pv);
            }
        }
        // Forward keeping each layer's input; backward recomputing one layer's tape at a time.
        let mut x = trainable.embed(chunk)?;
        let mut inputs = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            inputs.push(x.clone());
            trainable.forward_layers(l..l + 1, &mut x, false)?;
        }
        let mut dx = vec![0.0f32; x.len()];
        trainable.head_loss(&x, &targets, &vec![1.0; n_ctx], Some(&mut dx))?;
        let mut observe = |l: usize, t: crate::model::lora::Target, dy: &[f32]| {
            let name = &names[l][t as usize];
            let rows = dy.len() / n_ctx;
            let acc = out
                .rows
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; rows]);
            for tok in dy.chunks_exact(rows) {
                for (a, &g) in acc.iter_mut().zip(tok) {
                    *a += (g as f64) * (g as f64);
                }
            }
        };
        for l in (0..c.n_layer).rev() {
            let mut xl = std::mem::take(&mut inputs[l]);
            let tape = trainable.forward_layers(l..l + 1, &mut xl, true)?;
            trainable.backward_layers_observed(
                l..l + 1,
                &tape,
                &mut dx,
                &mut grads,
                Some(&mut observe),
            )?;
        }
        for tok in dx.chunks_exact(d) {
            for (a, &g) in out.embedding_input.iter_mut().zip(tok) {
                *a += (g as f64) * (g as f64);
            }
        }
        progress(ci + 1, chunks);
    }
    out.rows.insert(model.weights.output.name.clone(), head);
    // A Llama loaded from a checkpoint directory runs q/k rows in Hugging Face's order; the
    // planner reads them in the GGUF's adjacent-pair order (see `convert::ModelSource`).
    if model.qk_rows_need_gguf_permutation() {
        for lw in &model.weights.layers {
            for m in [&lw.wq, &lw.wk] {
                if let Some(v) = out.rows.get_mut(&m.name) {
                    let order = crate::format::hf::adjacent_from_halves_rows(m.rows, c.head_dim);
                    *v = order.iter().map(|&r| v[r]).collect();
                }
            }
        }
    }
    let n = out.tokens as f64;
    for v in out
        .rows
        .values_mut()
        .chain(std::iter::once(&mut out.embedding_input))
    {
        v.iter_mut().for_each(|x| *x /= n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let mut rng = Rng::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            let (y, p) = sample(&logits, &mut rng);
            counts[y as usize] += 1;
            // ln 3 rounded to f32 puts p[1] within ~1e-7 of 3/4.
            assert!((p[1] - 0.75).abs() < 1e-6 && p[2] == 0.0);
        }
        assert_eq!(counts[2], 0);
        assert!((counts[1] as f64 / 4000.0 - 0.75).abs() < 0.03);
    }
}
