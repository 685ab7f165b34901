//! Sparse FFN calibration: neuron statistics, hot/cold neurons, activation thresholds per sparsity
//! level, and the writer of a sparsified model (`pare sparsify`).
//!
//! # Statistics
//! A forward-pass [`Observer`] sees the input of every product: the input of `ffn_down` is the
//! FFN's neuron activations `silu(gate)·up`, the input of `ffn_gate` is the normed `x` entering the
//! FFN. Per layer, |x| and, per neuron, |activation| are counted in log-spaced histograms
//! ([`BINS`] bins, 8 per octave, from 2⁻²⁰ to 2¹²), which give any quantile without keeping the
//! values.
//!
//! # Hot and cold neurons
//! A neuron's *frequency* is the fraction of calibration tokens on which |activation| is above the
//! layer's median |activation| (above the histogram bin holding it: the reference). The `hot_fraction` most frequent neurons are
//! hot: they are computed on every token, with no per-neuron test. The permutation puts hot neurons
//! first, then the cold ones, each by decreasing frequency.
//!
//! # Levels
//! A level S is the fraction of the FFN's weight bytes skipped per token, averaged over the
//! calibration tokens. Each layer skips S of its `gate`/`up` bytes (inputs with |x| under the
//! input threshold) and S of its `down` bytes (cold neurons with |activation| under the neuron
//! threshold). Only codes can be skipped: a group's scales are read whenever any of its inputs is
//! active (nearly always, see [`crate::quant::transposed`]), so to skip S of the bytes a matrix
//! whose codes are a share `c` of its bytes ([`code_shares`]; 0.8 for Q4_1) skips S/c of its
//! inputs: the input threshold is the (S/c)-quantile of |x|, the neuron threshold the quantile of
//! the cold neurons' |activation| that leaves (S/c)·n_ff of them out per token on average (no
//! threshold when the cold ones are too few). Thresholds for a grid of levels are stored, so the
//! level is chosen at run time.
//!
//! # The sparsified file
//! Every tensor of the source is copied as stored (so the dense model is exactly the source's),
//! and each layer gains exact copies of `ffn_gate`, `ffn_up` and `ffn_down` in the
//! transposed-group layout ([`crate::quant::transposed`]): the same quantized values, moved so that
//! each input's codes for every output are contiguous (`blk.N.ffn_gate_tg.weight` etc., stored as
//! 1-dimensional I8 tensors of bytes; the format and shape are the source tensor's). This needs the
//! FFN weights in a pq format (every legacy ggml type but Q8_1 is one); other types (K-quants,
//! floats) are refused with an error that says to convert first.
//!
//! The hot-first permutation is stored as metadata only: applying it to the copies would move
//! `ffn_down`'s inputs across groups (inexact), so the copies keep the source's neuron order and
//! the first `n_hot` entries of the permutation name the hot set. Metadata (`pare.sparse.*`) is
//! documented in the README and read by [`crate::model::sparse_ffn`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::convert::Source;
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::format::gguf_writer::{self, GgufWriter, TensorSpec};
use crate::model::sparse_ffn::SkipRule;
use crate::model::{Config, Logits, Model, Observer, State};
use crate::plot::{Chart, Series, Style};
use crate::quant::kernels::sparse::weighted;
use crate::quant::matmul::QMatrix;
use crate::quant::transposed::Layout;
use crate::quant::{format, GgmlType, Pq};

/// Histogram bins of |value|.
pub const BINS: usize = 256;
/// Exponent offset of bin 0: values below 2^-20 (zero included) fall in bin 0.
const BIN_BASE: u32 = (127 - 20) << 3;

/// The sparsity levels a sparsified file carries by default.
pub const DEFAULT_LEVELS: [f32; 18] = [
    0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85,
    0.9,
];

/// Metadata keys of a sparsified file (see the README).
pub mod keys {
    pub const VERSION: &str = "pare.sparse.version";
    pub const LEVELS: &str = "pare.sparse.levels";
    pub const HOT_FRACTION: &str = "pare.sparse.hot_fraction";
    pub const CALIBRATION_TOKENS: &str = "pare.sparse.calibration_tokens";
    pub const CALIBRATION_TEXT: &str = "pare.sparse.calibration_text";
    pub fn layer(l: usize, what: &str) -> String {
        format!("pare.sparse.blk.{l}.{what}")
    }
    pub const N_HOT: &str = "n_hot";
    pub const INPUT_THRESHOLDS: &str = "input_thresholds";
    pub const NEURON_THRESHOLDS: &str = "neuron_thresholds";
    pub const PERMUTATION: &str = "permutation";
    pub const REFERENCE: &str = "reference";
    /// How the skipped bytes were shared among layers and matrices (`uniform` or `kl-greedy`);
    /// absent in files written before the allocation existed (they are uniform).
    pub const ALLOCATION: &str = "pare.sparse.allocation";
    pub const INPUT_SKIP: &str = "input_skip";
    pub const NEURON_SKIP: &str = "neuron_skip";
    /// Per layer, the weight of each input's |x| (`n_embd` values) and of each neuron's
    /// |activation| (`n_ff`) in the threshold tests; absent: 1 (files calibrated on |value|
    /// alone).
    pub const INPUT_SCALE: &str = "input_scale";
    pub const NEURON_SCALE: &str = "neuron_scale";
}

/// The version of the sparse layout and metadata this build writes and reads (1: re-quantized
/// input-major copies, no longer read; 2: exact transposed-group copies).
pub const VERSION: u32 = 2;

/// The FFN matrices that get a transposed-group copy.
pub const FFN: [&str; 3] = ["ffn_gate", "ffn_up", "ffn_down"];

/// Tensor name of the transposed-group copy of layer `l`'s matrix `m` (one of [`FFN`]).
pub fn tg_name(l: usize, m: &str) -> String {
    format!("blk.{l}.{m}_tg.weight")
}

/// The histogram bin of |v|.
#[inline]
pub fn bin(v: f32) -> usize {
    let b = (v.abs().to_bits() >> 20) as i64 - BIN_BASE as i64;
    b.clamp(0, BINS as i64 - 1) as usize
}

/// The lower edge of bin `k` (0 for bin 0).
pub fn bin_edge(k: usize) -> f32 {
    if k == 0 {
        0.0
    } else {
        f32::from_bits((k as u32 + BIN_BASE) << 20)
    }
}

/// The value under which a fraction `q` of a histogram's counts lie (linear within a bin);
/// infinity for `q >= 1`, 0 for `q <= 0` or an empty histogram.
pub fn quantile<T: Copy + Into<u64>>(hist: &[T], q: f64) -> f32 {
    if q >= 1.0 {
        return f32::INFINITY;
    }
    let total: u64 = hist.iter().map(|&c| c.into()).sum();
    if q <= 0.0 || total == 0 {
        return 0.0;
    }
    let target = q * total as f64;
    let mut cum = 0.0;
    for (k, &c) in hist.iter().enumerate() {
        let c = c.into() as f64;
        if c > 0.0 && cum + c >= target {
            let f = ((target - cum) / c) as f32;
            let (lo, hi) = (bin_edge(k), bin_edge(k + 1));
            return lo + f * (hi - lo);
        }
        cum += c;
    }
    bin_edge(hist.len())
}

/// The sum of v² over a histogram's values |v| ≤ `t` (each bin's values at its middle, a bin
/// that `t` cuts in proportion), the energy that skipping them takes out of a product's input.
pub fn energy_below<T: Copy + Into<u64>>(hist: &[T], t: f32) -> f64 {
    let mut e = 0.0;
    for (k, &c) in hist.iter().enumerate() {
        let (lo, hi) = (bin_edge(k) as f64, bin_edge(k + 1) as f64);
        let share = if hi <= t as f64 {
            1.0
        } else if lo < t as f64 {
            (t as f64 - lo) / (hi - lo)
        } else {
            break;
        };
        let mid = 0.5 * (lo + hi);
        e += share * c.into() as f64 * mid * mid;
    }
    e
}

/// Histograms of one layer.
#[derive(Debug, Clone)]
pub struct LayerStats {
    /// |x| entering gate/up, over all inputs and tokens.
    pub input_hist: Vec<u64>,
    /// |activation| per neuron: `neuron_hist[j * BINS + k]`.
    pub neuron_hist: Vec<u32>,
}

impl LayerStats {
    fn new(n_ff: usize) -> Self {
        LayerStats {
            input_hist: vec![0; BINS],
            neuron_hist: vec![0; n_ff * BINS],
        }
    }

    pub fn neuron(&self, j: usize) -> &[u32] {
        &self.neuron_hist[j * BINS..(j + 1) * BINS]
    }
}

/// Neuron and input statistics of every layer over the calibration tokens.
#[derive(Debug, Clone)]
pub struct NeuronStats {
    pub tokens: usize,
    pub n_ff: usize,
    pub layers: Vec<LayerStats>,
    /// Per layer, the weights the histogrammed values were multiplied by (empty: none).
    pub scales: Vec<Scales>,
}

/// What the threshold tests compare: |value| alone, or |value| times the norm of the weights it
/// multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Criterion {
    /// |x| for gate/up's inputs, |activation| for down's (TEAL).
    #[default]
    Activation,
    /// |x_j|·‖(W_gate; W_up)[:, j]‖ and |a_i|·‖W_down[:, i]‖ (WINA): skipping a value drops
    /// its column of the product, whose size is the value times the column's norm, so two equal
    /// values meeting columns of different norms are not equally safe to skip. On SmolLM2-135M
    /// (Q4_1) it skipped slightly worse than `Activation` (BENCHMARKS, session 6).
    Weighted,
}

/// Per layer: the weight of each gate/up input's |x| and each neuron's |activation| in the
/// threshold tests (empty: 1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scales {
    pub input: Vec<f32>,
    pub neuron: Vec<f32>,
}

/// Per layer, the column norms of `[W_gate; W_up]` (one per input) and of `W_down` (one per
/// neuron), each vector divided by its root mean square, so that a weighted value stays on the
/// scale of the plain one.
pub fn column_norms(model: &Model) -> Result<Vec<Scales>> {
    fn sq_norms(ws: &[&QMatrix]) -> Result<Vec<f32>> {
        let cols = ws[0].cols;
        let mut acc = vec![0f64; cols];
        let mut row = vec![0f32; cols];
        for w in ws {
            for r in 0..w.rows {
                w.dequantize_row(r, &mut row)?;
                for (a, &v) in acc.iter_mut().zip(&row) {
                    *a += (v as f64) * (v as f64);
                }
            }
        }
        let rms = (acc.iter().sum::<f64>() / cols.max(1) as f64).sqrt();
        Ok(acc
            .iter()
            .map(|&a| {
                if rms > 0.0 {
                    (a.sqrt() / rms) as f32
                } else {
                    1.0
                }
            })
            .collect())
    }
    model
        .weights
        .layers
        .iter()
        .map(|lw| {
            Ok(Scales {
                input: sq_norms(&[&lw.gate, &lw.up])?,
                neuron: sq_norms(&[&lw.down])?,
            })
        })
        .collect()
}

/// Which FFN product a matrix is, by its llama.cpp name.
fn ffn_role(name: &str) -> Option<(usize, bool)> {
    let rest = name.strip_prefix("blk.")?;
    let (l, m) = rest.split_once('.')?;
    let l = l.parse().ok()?;
    match m {
        "ffn_gate.weight" => Some((l, false)),
        "ffn_down.weight" => Some((l, true)),
        _ => None,
    }
}

struct Collector {
    n_ff: usize,
    layers: Vec<Mutex<LayerStats>>,
    scales: Vec<Scales>,
}

impl Observer for Collector {
    fn observe(&self, w: &QMatrix, x: &[f32], _n: usize) {
        let Some((l, down)) = ffn_role(&w.name) else {
            return;
        };
        let Some(layer) = self.layers.get(l) else {
            return;
        };
        let none = Scales::default();
        let sc = self.scales.get(l).unwrap_or(&none);
        let mut s = layer.lock().unwrap_or_else(|p| p.into_inner());
        if down {
            for row in x.chunks_exact(self.n_ff) {
                for (j, &v) in row.iter().enumerate() {
                    s.neuron_hist[j * BINS + bin(weighted(v, &sc.neuron, j))] += 1;
                }
            }
        } else {
            let n = if sc.input.is_empty() {
                x.len()
            } else {
                sc.input.len()
            };
            for row in x.chunks_exact(n.max(1)) {
                for (j, &v) in row.iter().enumerate() {
                    s.input_hist[bin(weighted(v, &sc.input, j))] += 1;
                }
            }
        }
    }
}

/// Runs `tokens` through `model` (dense) in chunks of `n_ctx` tokens, each from an empty context,
/// at most `max_chunks` of them, and collects the statistics of the values `criterion` tests.
/// `progress(done, total)` after each.
pub fn collect_stats(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    criterion: Criterion,
    mut progress: impl FnMut(usize, usize),
) -> Result<NeuronStats> {
    let c = &model.config;
    let chunks = (tokens.len() / n_ctx.max(1)).min(max_chunks.unwrap_or(usize::MAX));
    if n_ctx == 0 || chunks == 0 {
        return Err(Error::Invalid(format!(
            "calibration text has {} tokens, fewer than one chunk of {n_ctx}",
            tokens.len()
        )));
    }
    let scales = match criterion {
        Criterion::Activation => vec![Scales::default(); c.n_layer],
        Criterion::Weighted => column_norms(model)?,
    };
    let collector = Arc::new(Collector {
        n_ff: c.n_ff,
        layers: (0..c.n_layer)
            .map(|_| Mutex::new(LayerStats::new(c.n_ff)))
            .collect(),
        scales,
    });
    let mut state = State::new(model, n_ctx)?;
    state.observer = Some(collector.clone());
    for (i, chunk) in tokens.chunks_exact(n_ctx).take(chunks).enumerate() {
        state.reset();
        model.forward(&mut state, chunk, Logits::None)?;
        progress(i + 1, chunks);
    }
    drop(state);
    let collector = Arc::try_unwrap(collector)
        .map_err(|_| Error::Invalid("calibration observer still in use".into()))?;
    Ok(NeuronStats {
        tokens: chunks * n_ctx,
        n_ff: c.n_ff,
        layers: collector
            .layers
            .into_iter()
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .collect(),
        scales: collector.scales,
    })
}

/// One layer's plan.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// `perm[k]` is the original neuron at position `k`: hot neurons first.
    pub perm: Vec<u32>,
    pub n_hot: usize,
    /// Per original neuron: fraction of tokens with |activation| ≥ `reference`.
    pub freq: Vec<f32>,
    /// The layer's median |activation|, rounded up to the upper edge of its histogram bin.
    pub reference: f32,
    /// Per level: inputs with |x| ≤ this are skipped in gate/up.
    pub input_thresholds: Vec<f32>,
    /// Per level: cold neurons with |activation| ≤ this are skipped in down.
    pub neuron_thresholds: Vec<f32>,
    /// Per level: the planned fraction of the layer's inputs skipped in gate/up (on calibration
    /// tokens), which `input_thresholds` realises.
    pub input_skip: Vec<f32>,
    /// Per level: the planned fraction of the layer's `n_ff` neurons skipped in down.
    pub neuron_skip: Vec<f32>,
    /// The weights of |x| and |activation| in the tests the thresholds are for.
    pub scales: Scales,
}

impl LayerPlan {
    /// The rule the sparse path applies with this plan's thresholds.
    pub fn rule(&self) -> SkipRule {
        let mut hot = vec![false; self.perm.len()];
        for &j in &self.perm[..self.n_hot] {
            hot[j as usize] = true;
        }
        SkipRule {
            hot,
            input_scale: self.scales.input.clone(),
            neuron_scale: self.scales.neuron.clone(),
        }
    }

    /// The cold neurons' |activation| histogram, pooled.
    pub fn cold_hist(&self, ls: &LayerStats) -> Vec<u64> {
        let mut cold = vec![0u64; BINS];
        for &j in &self.perm[self.n_hot..] {
            for (p, &c) in cold.iter_mut().zip(ls.neuron(j as usize)) {
                *p += c as u64;
            }
        }
        cold
    }

    /// The largest fraction of the `n_ff` neurons that down can skip: the cold ones.
    pub fn max_neuron_skip(&self) -> f32 {
        (self.perm.len() - self.n_hot) as f32 / self.perm.len().max(1) as f32
    }

    /// `(input threshold, neuron threshold)` that skip on average a fraction `f_in` of the inputs
    /// and `f_neu` of the `n_ff` neurons on the calibration tokens of `ls`: the `f_in`-quantile of
    /// |x|, and the quantile of the cold neurons' |activation| that leaves `f_neu·n_ff` of them
    /// out per token (0 when there are no cold neurons; infinite past all of them).
    pub fn thresholds(&self, ls: &LayerStats, f_in: f32, f_neu: f32) -> (f32, f32) {
        let n_ff = self.perm.len();
        let n_cold = n_ff - self.n_hot;
        let t_in = quantile(&ls.input_hist, f_in as f64);
        let t_neu = if n_cold == 0 {
            0.0
        } else {
            quantile(
                &self.cold_hist(ls),
                f_neu as f64 * n_ff as f64 / n_cold as f64,
            )
        };
        (t_in, t_neu)
    }
}

/// Hot neurons, permutation and thresholds of every layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityPlan {
    pub levels: Vec<f32>,
    /// How the skipped bytes of each level are shared ([`keys::ALLOCATION`]).
    pub allocation: String,
    pub hot_fraction: f32,
    pub tokens: usize,
    pub layers: Vec<LayerPlan>,
}

impl SparsityPlan {
    /// The plan for `stats`: `hot_fraction` of the neurons hot, thresholds for each of `levels`
    /// (increasing, in (0, 1)); `shares[l]` is layer `l`'s share of code bytes in gate/up and in
    /// down ([`code_shares`]).
    pub fn new(
        stats: &NeuronStats,
        hot_fraction: f32,
        levels: &[f32],
        shares: &[(f32, f32)],
    ) -> Result<SparsityPlan> {
        if !(0.0..=1.0).contains(&hot_fraction) {
            return Err(Error::Invalid(format!(
                "the hot fraction must be between 0 and 1, got {hot_fraction}"
            )));
        }
        if levels.is_empty()
            || levels.windows(2).any(|w| w[0] >= w[1])
            || levels.iter().any(|&s| !(s > 0.0 && s < 1.0))
        {
            return Err(Error::Invalid(format!(
                "sparsity levels must increase within (0, 1), got {levels:?}"
            )));
        }
        if stats.tokens == 0 {
            return Err(Error::Invalid("no calibration tokens".into()));
        }
        if shares.len() != stats.layers.len()
            || shares
                .iter()
                .any(|&(a, b)| !(a > 0.0 && a <= 1.0 && b > 0.0 && b <= 1.0))
        {
            return Err(Error::Invalid(format!(
                "code shares must be in (0, 1], one pair per layer ({}), got {shares:?}",
                stats.layers.len()
            )));
        }
        let n_ff = stats.n_ff;
        let n_hot = ((hot_fraction as f64 * n_ff as f64).round() as usize).min(n_ff);
        if stats.scales.len() != stats.layers.len() {
            return Err(Error::Invalid(
                "the statistics need one set of scales per layer".into(),
            ));
        }
        let layers = stats
            .layers
            .iter()
            .zip(&stats.scales)
            .zip(shares)
            .map(|((ls, scales), &(share_in, share_dn))| {
                let mut pooled = vec![0u64; BINS];
                for j in 0..n_ff {
                    for (p, &c) in pooled.iter_mut().zip(ls.neuron(j)) {
                        *p += c as u64;
                    }
                }
                let total: u64 = pooled.iter().sum();
                // The bin holding the median: frequencies count the bins above it (a bin holding
                // most of the mass would otherwise make every neuron look always active).
                let mut cum = 0;
                let ref_bin = pooled
                    .iter()
                    .position(|&c| {
                        cum += c;
                        2 * cum >= total
                    })
                    .unwrap_or(0);
                let freq: Vec<f32> = (0..n_ff)
                    .map(|j| {
                        let above: u32 = ls.neuron(j)[ref_bin + 1..].iter().sum();
                        above as f32 / stats.tokens as f32
                    })
                    .collect();
                let mut perm: Vec<u32> = (0..n_ff as u32).collect();
                // Stable: ties keep the original order, so the permutation is deterministic.
                perm.sort_by(|&a, &b| freq[b as usize].total_cmp(&freq[a as usize]));
                let mut lp = LayerPlan {
                    perm,
                    n_hot,
                    freq,
                    reference: bin_edge(ref_bin + 1),
                    input_thresholds: Vec::new(),
                    neuron_thresholds: Vec::new(),
                    input_skip: Vec::new(),
                    neuron_skip: Vec::new(),
                    scales: scales.clone(),
                };
                // Uniform: every layer skips S of its gate/up bytes and S of its down bytes, so
                // S/c of the inputs where codes are a share c of the bytes.
                let max_neu = lp.max_neuron_skip();
                let fractions: Vec<(f32, f32)> = levels
                    .iter()
                    .map(|&s| ((s / share_in).min(1.0), (s / share_dn).min(max_neu)))
                    .collect();
                lp.set_fractions(ls, &fractions);
                lp
            })
            .collect();
        Ok(SparsityPlan {
            levels: levels.to_vec(),
            allocation: "uniform".into(),
            hot_fraction,
            tokens: stats.tokens,
            layers,
        })
    }

    /// Replaces the uniform allocation by `fractions[k][l]`: the planned `(input, neuron)` skip
    /// fractions of layer `l` at level `k` (see [`LayerPlan::thresholds`]), named `allocation`.
    pub fn set_allocation(
        &mut self,
        stats: &NeuronStats,
        allocation: &str,
        fractions: &[Vec<(f32, f32)>],
    ) -> Result<()> {
        let n_layer = self.layers.len();
        if fractions.len() != self.levels.len()
            || fractions.iter().any(|f| f.len() != n_layer)
            || stats.layers.len() != n_layer
        {
            return Err(Error::Invalid(format!(
                "an allocation needs {} levels of {n_layer} layers",
                self.levels.len()
            )));
        }
        for (l, (lp, ls)) in self.layers.iter_mut().zip(&stats.layers).enumerate() {
            let per_level: Vec<(f32, f32)> = fractions.iter().map(|f| f[l]).collect();
            if per_level.iter().any(|&(a, b)| {
                !(0.0..=1.0).contains(&a) || !(0.0..=lp.max_neuron_skip()).contains(&b)
            }) {
                return Err(Error::Invalid(format!(
                    "layer {l}: skip fractions outside [0, 1] or above the cold neurons: \
                     {per_level:?}"
                )));
            }
            lp.set_fractions(ls, &per_level);
        }
        self.allocation = allocation.to_string();
        Ok(())
    }

    /// The metadata a sparsified file carries.
    pub fn metadata(&self, calibration_text: &str) -> Vec<(String, Value)> {
        let f32s = |v: &[f32]| Value::Array(v.iter().map(|&x| Value::F32(x)).collect());
        let mut m = vec![
            (keys::VERSION.to_string(), Value::U32(VERSION)),
            (keys::LEVELS.to_string(), f32s(&self.levels)),
            (
                keys::HOT_FRACTION.to_string(),
                Value::F32(self.hot_fraction),
            ),
            (
                keys::CALIBRATION_TOKENS.to_string(),
                Value::U64(self.tokens as u64),
            ),
            (
                keys::CALIBRATION_TEXT.to_string(),
                Value::String(calibration_text.to_string()),
            ),
            (
                keys::ALLOCATION.to_string(),
                Value::String(self.allocation.clone()),
            ),
        ];
        for (l, lp) in self.layers.iter().enumerate() {
            m.push((keys::layer(l, keys::N_HOT), Value::U32(lp.n_hot as u32)));
            m.push((keys::layer(l, keys::REFERENCE), Value::F32(lp.reference)));
            m.push((
                keys::layer(l, keys::INPUT_THRESHOLDS),
                f32s(&lp.input_thresholds),
            ));
            m.push((
                keys::layer(l, keys::NEURON_THRESHOLDS),
                f32s(&lp.neuron_thresholds),
            ));
            m.push((keys::layer(l, keys::INPUT_SKIP), f32s(&lp.input_skip)));
            m.push((keys::layer(l, keys::NEURON_SKIP), f32s(&lp.neuron_skip)));
            if !lp.scales.input.is_empty() {
                m.push((keys::layer(l, keys::INPUT_SCALE), f32s(&lp.scales.input)));
            }
            if !lp.scales.neuron.is_empty() {
                m.push((keys::layer(l, keys::NEURON_SCALE), f32s(&lp.scales.neuron)));
            }
            m.push((
                keys::layer(l, keys::PERMUTATION),
                Value::Array(lp.perm.iter().map(|&p| Value::U32(p)).collect()),
            ));
        }
        m
    }

    /// A chart of the per-layer frequency distributions: each neuron's frequency against its rank
    /// (neurons sorted by decreasing frequency), for a spread of layers.
    pub fn chart(&self) -> Chart {
        let n = self.layers.len();
        let picks: Vec<usize> = if n <= 8 {
            (0..n).collect()
        } else {
            (0..8).map(|k| k * (n - 1) / 7).collect()
        };
        Chart {
            title: format!(
                "FFN neuron activation frequency (|a| above the layer median), {} tokens",
                self.tokens
            ),
            x_label: "neuron rank / n_ff (hot first)".into(),
            y_label: "frequency".into(),
            log_y: false,
            series: picks
                .into_iter()
                .map(|l| {
                    let lp = &self.layers[l];
                    let nf = lp.perm.len().max(1) as f64;
                    Series::new(
                        format!("layer {l}"),
                        lp.perm
                            .iter()
                            .enumerate()
                            .map(|(k, &j)| (k as f64 / nf, lp.freq[j as usize] as f64))
                            .collect(),
                        Style::Line,
                    )
                })
                .collect(),
        }
    }
}

/// Per-layer summary for a report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerSummary {
    pub layer: usize,
    pub reference: f32,
    pub n_hot: usize,
    pub hot_mean_freq: f32,
    pub cold_mean_freq: f32,
    /// Fraction of neurons that are (almost) never at or above the reference: frequency < 1%.
    pub rarely_active: f32,
}

impl LayerPlan {
    /// Sets the planned skip fractions (one pair per level) and the thresholds that realise them.
    fn set_fractions(&mut self, ls: &LayerStats, fractions: &[(f32, f32)]) {
        let th: Vec<(f32, f32)> = fractions
            .iter()
            .map(|&(a, b)| self.thresholds(ls, a, b))
            .collect();
        self.input_skip = fractions.iter().map(|f| f.0).collect();
        self.neuron_skip = fractions.iter().map(|f| f.1).collect();
        self.input_thresholds = th.iter().map(|t| t.0).collect();
        self.neuron_thresholds = th.iter().map(|t| t.1).collect();
    }

    pub fn summary(&self, layer: usize) -> LayerSummary {
        let mean = |js: &[u32]| {
            js.iter().map(|&j| self.freq[j as usize]).sum::<f32>() / js.len().max(1) as f32
        };
        LayerSummary {
            layer,
            reference: self.reference,
            n_hot: self.n_hot,
            hot_mean_freq: mean(&self.perm[..self.n_hot]),
            cold_mean_freq: mean(&self.perm[self.n_hot..]),
            rarely_active: self.freq.iter().filter(|&&f| f < 0.01).count() as f32
                / self.freq.len().max(1) as f32,
        }
    }
}

/// Options of [`write_sparsified`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions<'a> {
    pub cancel: Option<&'a AtomicBool>,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct WriteReport {
    pub path: PathBuf,
    pub file_bytes: u64,
    /// Bytes of the transposed-group copies.
    pub copy_bytes: u64,
}

/// The layout of the copy of `name` (`n_out` × `n_in` in `src`), or an error naming why there is
/// none.
fn copy_layout(src: &dyn Source, name: &str, n_out: usize, n_in: usize) -> Result<Layout> {
    let t = src
        .tensors()
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| Error::Model(format!("{}: no {name}", src.describe())))?;
    if t.dims != [n_in as u64, n_out as u64] {
        return Err(Error::Model(format!(
            "{}: {name} has dims {:?}, expected [{n_in}, {n_out}]",
            src.describe(),
            t.dims
        )));
    }
    let pq = t.stored.and_then(Pq::of_ggml).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: {name} is {}; sparse FFN copies keep the source's quantized values and need a \
             pq format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q1_0 or pare's qK_gG): convert the model \
             first (e.g. `pare convert --format q4_1`)",
            src.describe(),
            t.stored
                .map_or("not stored in a ggml type".into(), format::name)
        ))
    })?;
    Layout::new(pq, n_out, n_in)
}

/// `(source name, copy name, layout)` of every copy `src` needs; errors when one cannot be made
/// (call it before calibrating, to fail early).
pub fn copies(src: &dyn Source, config: &Config) -> Result<Vec<(String, String, Layout)>> {
    let (d, ff) = (config.n_embd, config.n_ff);
    let mut out = Vec::new();
    for l in 0..config.n_layer {
        for m in FFN {
            let (n_out, n_in) = if m == "ffn_down" { (d, ff) } else { (ff, d) };
            let name = format!("blk.{l}.{m}.weight");
            let layout = copy_layout(src, &name, n_out, n_in)?;
            out.push((name, tg_name(l, m), layout));
        }
    }
    Ok(out)
}

/// Per layer, the share of the copies' bytes that are codes (the part skipping can save) in gate
/// and up together, and in down, from [`copies`]' layouts (three per layer).
pub fn code_shares(copies: &[(String, String, Layout)]) -> Vec<(f32, f32)> {
    layer_bytes(copies)
        .iter()
        .map(|b| {
            (
                (b.codes_in / b.bytes_in) as f32,
                (b.codes_down / b.bytes_down) as f32,
            )
        })
        .collect()
}

/// Bytes of one layer's copies: what skipping can save (codes) and what a dense pass reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerBytes {
    /// Codes of gate and up together (the part input skipping saves).
    pub codes_in: f64,
    /// All bytes of gate and up (codes and scales).
    pub bytes_in: f64,
    pub codes_down: f64,
    pub bytes_down: f64,
}

/// Per layer, the bytes of [`copies`]' layouts (three per layer).
pub fn layer_bytes(copies: &[(String, String, Layout)]) -> Vec<LayerBytes> {
    let codes = |l: &Layout| (l.n_in * l.code_row_bytes()) as f64;
    copies
        .chunks_exact(FFN.len())
        .map(|c| {
            let (g, u, d) = (&c[0].2, &c[1].2, &c[2].2);
            LayerBytes {
                codes_in: codes(g) + codes(u),
                bytes_in: (g.bytes() + u.bytes()) as f64,
                codes_down: codes(d),
                bytes_down: d.bytes() as f64,
            }
        })
        .collect()
}

/// Writes `src` with `plan`'s transposed-group FFN copies and metadata to `out`, atomically.
/// `progress(done, total)` after each layer.
pub fn write_sparsified(
    src: &dyn Source,
    config: &Config,
    plan: &SparsityPlan,
    calibration_text: &str,
    out: &Path,
    opts: &WriteOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<WriteReport> {
    if plan.layers.len() != config.n_layer
        || plan.layers.iter().any(|l| l.perm.len() != config.n_ff)
    {
        return Err(Error::Invalid(
            "the sparsity plan does not match the model's layers".into(),
        ));
    }
    if src
        .metadata()
        .iter()
        .any(|(k, _)| k.starts_with("pare.sparse."))
    {
        return Err(Error::Invalid(format!(
            "{} is already sparsified; sparsify the original model",
            src.describe()
        )));
    }
    let copies = copies(src, config)?;
    let mut specs: Vec<TensorSpec> = src
        .tensors()
        .iter()
        .map(|t| {
            let ty = t.stored.ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: sparsify copies tensors as stored; write the model as a GGUF first \
                     (pare convert)",
                    src.describe()
                ))
            })?;
            Ok(TensorSpec::new(t.name.clone(), &t.dims, ty))
        })
        .collect::<Result<_>>()?;
    for (_, name, layout) in &copies {
        specs.push(TensorSpec::new(
            name.clone(),
            &[layout.bytes() as u64],
            GgmlType::I8,
        ));
    }
    let mut meta = src.metadata();
    for (k, v) in plan.metadata(calibration_text) {
        gguf_writer::set(&mut meta, &k, v);
    }
    let mut w = GgufWriter::create(out, &meta, &specs, opts.cancel)?;
    let stored = |name: &str| {
        src.stored_bytes(name)
            .ok_or_else(|| Error::Model(format!("{}: no data for {name:?}", src.describe())))
    };
    for t in src.tensors() {
        w.write_tensor(&t.name, stored(&t.name)?)?;
    }
    let mut copy_bytes = 0;
    for (k, (name, tg, layout)) in copies.iter().enumerate() {
        let bytes = layout.from_rows(stored(name)?)?;
        copy_bytes += bytes.len() as u64;
        w.write_tensor(tg, &bytes)?;
        if (k + 1) % FFN.len() == 0 {
            progress((k + 1) / FFN.len(), config.n_layer);
        }
    }
    let file_bytes = w.finish()?;
    Ok(WriteReport {
        path: out.to_path_buf(),
        file_bytes,
        copy_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_monotone_and_edges_bound_them() {
        let mut last = 0;
        for e in -24..14 {
            for m in [1.0f32, 1.1, 1.5, 1.9] {
                let v = m * 2f32.powi(e);
                let b = bin(v);
                assert!(b >= last);
                last = b;
                if b > 0 && b < BINS - 1 {
                    assert!(bin_edge(b) <= v && v < bin_edge(b + 1), "{v}");
                }
            }
        }
        assert_eq!(bin(0.0), 0);
        assert_eq!(bin(-3.0), bin(3.0));
    }

    #[test]
    fn quantiles_of_a_known_histogram() {
        let mut h = vec![0u64; BINS];
        for i in 1..=1000 {
            h[bin(i as f32 / 1000.0)] += 1;
        }
        for q in [0.1, 0.5, 0.9] {
            let t = quantile(&h, q);
            // Within a bin width (9%) of the exact quantile.
            assert!((t as f64 / q - 1.0).abs() < 0.1, "q {q}: {t}");
        }
        assert_eq!(quantile(&h, 0.0), 0.0);
        assert_eq!(quantile(&h, 1.0), f32::INFINITY);
    }

    #[test]
    fn plan_puts_frequent_neurons_first() {
        let n_ff = 8;
        let mut ls = LayerStats::new(n_ff);
        let tokens = 100;
        for j in 0..n_ff {
            // Neuron j is large on j·10 of the tokens and tiny on the others.
            let big = (j * 10) as u32;
            ls.neuron_hist[j * BINS + bin(1.0)] += big;
            ls.neuron_hist[j * BINS + bin(1e-3)] += tokens - big;
        }
        ls.input_hist[bin(0.5)] = 50;
        ls.input_hist[bin(2.0)] = 50;
        let stats = NeuronStats {
            tokens: tokens as usize,
            n_ff,
            layers: vec![ls],
            scales: vec![Scales::default()],
        };
        let plan = SparsityPlan::new(&stats, 0.25, &[0.25, 0.5], &[(1.0, 1.0)]).unwrap();
        let lp = &plan.layers[0];
        assert_eq!(lp.perm, vec![7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(lp.n_hot, 2);
        assert!(lp.input_thresholds[0] < 0.6 && lp.input_thresholds[1] < 0.6);
        assert!(lp.neuron_thresholds[0] < 1e-2);
        let one = [(1.0, 1.0)];
        assert!(SparsityPlan::new(&stats, 0.25, &[0.5, 0.25], &one).is_err());
        assert!(SparsityPlan::new(&stats, 1.5, &[0.5], &one).is_err());
        assert!(SparsityPlan::new(&stats, 0.25, &[0.5], &[(0.0, 1.0)]).is_err());
        assert!(SparsityPlan::new(&stats, 0.25, &[0.5], &[]).is_err());
        // Codes are 4/5 of the bytes: S = 0.4 skips half the inputs.
        let p = SparsityPlan::new(&stats, 0.25, &[0.4], &[(0.8, 0.8)]).unwrap();
        assert_eq!(
            p.layers[0].input_thresholds[0],
            quantile(&stats.layers[0].input_hist, 0.5)
        );
    }
}
