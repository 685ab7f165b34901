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

/// Bytes of the process outside the model and the training buffers (code, tokenizer, tokenized
/// data, allocator slack), as measured for SmolLM2-135M: peak RSS of `pare tune` minus the other
/// parts was 46–51 MiB over the 48 MiB first assumed, in every checkpointing mode (BENCHMARKS.md).
pub const RUNTIME_BYTES: usize = 96 << 20;

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

/// The estimate for `model` trained with `opts`.
pub fn estimate(model: &Model, opts: &TrainOptions) -> Estimate {
    let c = &model.config;
    let w = &model.weights;
    let n = opts.seq_len;
    let weights =
        w.matrices().map(|m| m.n_bytes()).sum::<usize>() + 4 * c.n_embd * (2 * c.n_layer + 1);
    let largest = w
        .layers
        .iter()
        .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
        .map(|m| m.rows * m.cols)
        .max()
        .unwrap_or(0);
    // The dequantized weight of one product; under QAT also its gradient, the merged weight
    // and the adapter's delta (the backward of clipped and lsq).
    let work_mats = if opts.qat == QatMode::None { 1 } else { 4 };
    // Under QAT each adapted matrix is also held fake-quantized for the step, in its own format;
    // lsq learns a scale (and minimum) per group: value, gradient (twice: the step's and the
    // accumulated) and AdamW's two moments.
    let (mut qat_cache, mut grid_values) = (0, 0);
    if opts.qat != QatMode::None {
        for lw in &w.layers {
            for &t in &opts.lora.targets {
                let m = super::fake_quant::matrix(lw, t);
                qat_cache += m.n_bytes();
                if let (QatMode::Lsq, Some(p)) = (opts.qat, crate::quant::pq::Pq::of_ggml(m.ty)) {
                    grid_values +=
                        m.rows * m.cols.div_ceil(p.group as usize) * (2 - p.sym as usize);
                }
            }
        }
    }
    // Per-layer gradient buffers of the backward (dx, dxn, dgate, dup, dh, dq, dk, dv, datt).
    let grads_live = 4 * n * (3 * c.n_embd + 3 * c.n_ff + 2 * c.q_dim() + 2 * c.kv_dim());
    let work = 4 * largest * work_mats + grads_live;
    // Logits of every position, the head's f32 tile, and the final norm's buffers.
    let head = 4 * n * c.n_vocab + 4 * 4096 * c.n_embd + 4 * 4 * n * c.n_embd;
    let lora_params: usize = opts
        .lora
        .targets
        .iter()
        .map(|&t: &Target| {
            let (r, k) = t.shape(c);
            opts.lora.rank * (r + k)
        })
        .sum::<usize>()
        * c.n_layer;
    Estimate {
        weights: weights + qat_cache,
        activations: opts.checkpoint.activation_bytes(c, n),
        head,
        work,
        adapters: 4 * 4 * lora_params + 5 * 4 * grid_values,
        runtime: RUNTIME_BYTES,
    }
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
