//! The memory a training run needs, estimated before it starts: the mapped weights, the layer
//! activations the checkpointing mode keeps ([`Checkpoint::activation_bytes`]), the output head's
//! logits, the f32 work buffers of the dense products, and the adapters with their gradients and
//! AdamW moments. `--memory-budget` refuses a run whose estimate exceeds the budget and names a
//! checkpointing mode (or a shorter sequence) that would fit.

use super::checkpointing::Checkpoint;
use super::fake_quant::QatMode;
use super::trainer::TrainOptions;
use crate::error::{Error, Result};
use crate::model::{Model, Target};

/// Bytes of a training process outside the model and the training buffers (code and shared
/// libraries, MPI's, the packed data, allocator slack), as measured for SmolLM2-135M with the
/// tokenizer dropped after tokenizing and the file opened lean (BENCHMARKS.md, 2026-12-07
/// session 3): peak RSS minus the estimate's other parts was 16.5 MiB for one worker, 24–31 MiB
/// for MPI ranks past the first and 40–41 MiB for rank 0, which reads the data. The largest, so
/// that a budget does not accept a rank 0 that cannot fit.
pub const RUNTIME_BYTES: usize = 41 << 20;

/// An estimate, by part, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub weights: usize,
    pub activations: usize,
    pub head: usize,
    pub work: usize,
    pub adapters: usize,
    pub runtime: usize,
}

impl Estimate {
    pub fn total(&self) -> usize {
        self.weights + self.activations + self.head + self.work + self.adapters + self.runtime
    }

    /// One line, in MiB.
    pub fn describe(&self) -> String {
        let m = |b: usize| b as f64 / (1 << 20) as f64;
        format!(
            "{:.1} MiB = weights {:.1} + activations {:.1} + head {:.1} + work {:.1} + adapters \
             and optimizer {:.1} + runtime {:.1}",
            m(self.total()),
            m(self.weights),
            m(self.activations),
            m(self.head),
            m(self.work),
            m(self.adapters),
            m(self.runtime)
        )
    }
}

/// The estimate for `model` trained with `opts` by one worker (one sequence's activations at a
/// time, every layer).
pub fn estimate(model: &Model, opts: &TrainOptions) -> Estimate {
    let c = &model.config;
    let w = &model.weights;
    let n = opts.seq_len;
    let weights =
        w.matrices().map(|m| m.n_bytes()).sum::<usize>() + 4 * c.n_embd * (2 * c.n_layer + 1);
    let state = layer_state_bytes(model, opts);
    Estimate {
        weights: weights + state.qat.iter().sum::<usize>(),
        activations: opts.checkpoint.activation_bytes(c, n),
        head: head_bytes(model, n),
        work: work_bytes(model, opts),
        adapters: state.adapters.iter().sum(),
        runtime: RUNTIME_BYTES,
    }
}

/// What training keeps per layer besides the base weights, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerState {
    /// The adapters, their gradients and AdamW's two moments (and under `--qat lsq` each group's
    /// learned scale and minimum with the same four, plus the step's gradient).
    pub adapters: Vec<usize>,
    /// Under QAT, each adapted matrix held fake-quantized for the step, in its own format.
    pub qat: Vec<usize>,
}

/// [`LayerState`] of every layer of `model` under `opts`.
pub fn layer_state_bytes(model: &Model, opts: &TrainOptions) -> LayerState {
    let c = &model.config;
    let lora_params: usize = opts
        .lora
        .targets
        .iter()
        .map(|&t: &Target| {
            let (r, k) = t.shape(c);
            opts.lora.rank * (r + k)
        })
        .sum();
    let (mut adapters, mut qat) = (Vec::new(), Vec::new());
    for lw in &model.weights.layers {
        // lsq learns a scale (and minimum) per group: value, gradient (twice: the step's and the
        // accumulated) and AdamW's two moments.
        let (mut cache, mut grid_values) = (0, 0);
        if opts.qat != QatMode::None {
            for &t in &opts.lora.targets {
                let m = super::fake_quant::matrix(lw, t);
                cache += m.n_bytes();
                if let (QatMode::Lsq, Some(p)) = (opts.qat, crate::quant::pq::Pq::of_ggml(m.ty)) {
                    grid_values +=
                        m.rows * m.cols.div_ceil(p.group as usize) * (2 - p.sym as usize);
                }
            }
        }
        adapters.push(4 * 4 * lora_params + 5 * 4 * grid_values);
        qat.push(cache);
    }
    LayerState { adapters, qat }
}

/// The output head's part (on the last stage) for a sequence of `n` tokens: one tile of the head
/// in f32 and that tile's logits (the loss is computed tile by tile, never holding a position's
/// whole row of logits), and the final norm's buffers.
pub fn head_bytes(model: &Model, n: usize) -> usize {
    let c = &model.config;
    let tile = crate::model::backward::HEAD_TILE.min(c.n_vocab);
    // A tile of the head in f32 and its logits, the positions' hidden states (selected,
    // normalized, and their gradients), and per position the running log-sum-exp.
    4 * tile * c.n_embd + 4 * n * tile + 4 * 4 * n * c.n_embd + 24 * n
}

/// The f32 work buffers of the dense products (every worker): the dequantized weight of one
/// product (under QAT also its gradient, the merged weight and the adapter's delta, for the
/// backward of clipped and lsq) and the backward's per-layer gradient buffers (dx, dxn, dgate,
/// dup, dh, dq, dk, dv, datt).
pub fn work_bytes(model: &Model, opts: &TrainOptions) -> usize {
    let c = &model.config;
    let n = opts.seq_len;
    let largest = model
        .weights
        .layers
        .iter()
        .flat_map(crate::model::LayerWeights::matrices)
        .map(|m| m.rows * m.cols)
        .max()
        .unwrap_or(0);
    let work_mats = if opts.qat == QatMode::None { 1 } else { 4 };
    let grads_live = 4 * n * (3 * c.n_embd + 3 * c.n_ff + 2 * c.q_dim() + 2 * c.kv_dim());
    4 * largest * work_mats + grads_live
}

/// Checks the estimate against `budget`; when it does not fit, the error gives the estimate and
/// the first strategy that would (checkpointing modes from least to most recomputation, then
/// shorter sequences).
pub fn check_budget(model: &Model, opts: &TrainOptions, budget: usize) -> Result<Estimate> {
    let e = estimate(model, opts);
    if e.total() <= budget {
        return Ok(e);
    }
    let mb = |b: usize| b as f64 / (1 << 20) as f64;
    let modes = [
        Checkpoint::None,
        Checkpoint::Every(8),
        Checkpoint::Every(4),
        Checkpoint::Sqrt,
        Checkpoint::Every(2),
        Checkpoint::Every(1),
    ];
    let mut seq = opts.seq_len;
    let suggestion = loop {
        let fit = modes.iter().find_map(|&m| {
            let o = TrainOptions {
                checkpoint: m,
                seq_len: seq,
                ..opts.clone()
            };
            let t = estimate(model, &o).total();
            (t <= budget).then_some((m, t))
        });
        if let Some((m, t)) = fit {
            break Some(format!(
                "--checkpoint {} --seq-len {seq} would need {:.1} MiB",
                m.name(),
                mb(t)
            ));
        }
        if seq <= 16 {
            break None;
        }
        seq /= 2;
    };
    Err(Error::Invalid(format!(
        "the run needs about {} but the budget is {:.1} MiB; {}",
        e.describe(),
        mb(budget),
        suggestion.unwrap_or_else(|| {
            format!(
                "nothing fits: the weights alone take {:.1} MiB (quantize the model further)",
                mb(e.weights + e.runtime)
            )
        })
    )))
}

/// Parses a size: `300MiB`, `1.5GiB`, `512M`, `2G`, `1000000` (bytes); powers of 1024.
pub fn parse_size(s: &str) -> Result<usize> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| {
        Error::Invalid(format!(
            "size {s:?}: expected a number and a unit (e.g. 300MiB)"
        ))
    })?;
    let k = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        u => {
            return Err(Error::Invalid(format!(
                "size {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB)"
            )))
        }
    };
    let b = v * k;
    if !(b.is_finite() && b >= 1.0) {
        return Err(Error::Invalid(format!("size {s:?} is not a positive size")));
    }
    Ok(b as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("300MiB").unwrap(), 300 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 2 kib ").unwrap(), 2048);
        for bad in ["", "MiB", "3 parsecs", "0", "-1M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
