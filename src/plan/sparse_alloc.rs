//! Allocation of a sparsity level's skipped bytes among layers and matrices by measured error, in
//! the spirit of TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language
//! Models"): the bytes are skipped where skipping costs least.
//!
//! # Units
//! Each layer has two *units* whose skip fraction is chosen: the inputs of gate/up (one fraction
//! for both, since the sparse path builds one list of active inputs per token and gate and up read
//! the same inputs) and the cold neurons of down (a fraction of the layer's `n_ff` neurons; the hot
//! ones are never skipped, so at most the cold share).
//!
//! # Measured error
//! The error of a unit at a skip fraction is the mean KL divergence of the model's next-token
//! distributions from the dense model's, on calibration chunks, with only that unit skipping (its
//! threshold from the calibration histograms, [`LayerPlan::thresholds`]). Measuring at the output
//! rather than at the matrix's own output counts what an error does downstream: an early layer's
//! error travels through every later layer, and the same squared error matters differently in a
//! small residual stream than in a large one. The skipping is simulated on the dense path
//! ([`FfnMask`]), which computes what the sparse kernels would for a whole chunk at once; the
//! layers before the unit's are run once per chunk and their output reused.
//!
//! # Greedy
//! TEAL raises, step by step, the sparsity of the matrix whose increase costs least in measured
//! error, until the target average is met. Re-measuring after every step is out of reach on a few
//! CPU cores, so the errors are taken as additive across units (each unit measured alone at a few
//! fractions, linear in between, or with [`Options::energy_interpolation`] linear in the input
//! energy skipped, [`Curve::grid`]) and each unit's curve is replaced by its lower convex hull; then
//! the greedy's order is the order of the hull segments by error per byte skipped, which one pass
//! walks. Every level of the grid is a point on that one path, so a unit's fraction (and
//! threshold) never decreases from one level to the next, and interpolating thresholds between
//! levels at run time stays meaningful. Bytes count only codes (a group's scales are read
//! whenever any of its inputs is active), as the uniform levels do: the level is the average
//! fraction of all FFN weight bytes skipped, `Σ skipped codes / Σ bytes`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::sparse_ffn::{FfnMask, SkipRule};
use crate::model::{Batch, Logits, Model, State};
use crate::plan::sparsify::{energy_below, LayerBytes, NeuronStats, SparsityPlan};

/// Name of this allocation in the file ([`crate::plan::sparsify::keys::ALLOCATION`]).
pub const NAME: &str = "kl-greedy";

/// Skip fractions each unit is measured at, as fractions of its largest (1 for gate/up inputs,
/// the cold share for down): denser where the levels people use fall (a quarter to two thirds
/// of the inputs), and the end point, which the highest levels need (300 measurements for
/// SmolLM2-135M's 30 layers).
pub const DEFAULT_POINTS: [f32; 5] = [0.25, 0.45, 0.6, 0.75, 1.0];

/// Which part of a layer's FFN skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Unit {
    /// Inputs of gate and up (|x| under the input threshold).
    Inputs,
    /// Cold neurons of down (|activation| under the neuron threshold).
    Neurons,
}

/// The measured error of one unit against its skip fraction.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Curve {
    pub layer: usize,
    pub unit: Unit,
    /// Skip fractions, increasing, the first 0.
    pub fractions: Vec<f32>,
    /// Mean KL (nats per token) at each fraction; 0 at 0.
    pub kl: Vec<f64>,
    /// Bytes skipped per token at fraction 1 (the unit's codes).
    pub bytes: f64,
    /// The input energy skipped at each of `fractions` (Σ v² of the skipped values on the
    /// calibration tokens, from the histograms).
    pub energy: Vec<f64>,
    /// A fine grid of fractions from 0 to the largest, and the energy skipped at each (empty:
    /// interpolate in fraction): between measured points the error is interpolated linearly in
    /// skipped energy. Skipping the smallest values first, the energy (and, to first order, the
    /// error) rises slowly at first and faster later; linear in fraction overprices a little
    /// skipping everywhere against much skipping in a few places.
    pub grid: Vec<(f32, f64)>,
}

/// Steps of [`Curve::grid`].
pub const GRID: usize = 40;

impl Curve {
    /// The error predicted at each grid point: measured errors interpolated linearly in skipped
    /// energy (the measured points themselves when there is no grid).
    pub fn predicted(&self) -> Vec<(f32, f64)> {
        if self.grid.is_empty() || self.energy.len() != self.fractions.len() {
            return self
                .fractions
                .iter()
                .copied()
                .zip(self.kl.iter().copied())
                .collect();
        }
        self.grid
            .iter()
            .map(|&(f, e)| {
                let k = self
                    .energy
                    .iter()
                    .position(|&x| x >= e)
                    .unwrap_or(self.energy.len() - 1)
                    .max(1);
                let (e0, e1) = (self.energy[k - 1], self.energy[k]);
                let t = if e1 > e0 {
                    ((e - e0) / (e1 - e0)).clamp(0.0, 1.0)
                } else {
                    1.0
                };
                (f, self.kl[k - 1] + t * (self.kl[k] - self.kl[k - 1]))
            })
            .collect()
    }
}

/// Options of [`measure_curves`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Tokens per chunk (each from an empty context).
    pub n_ctx: usize,
    /// Chunks of the calibration tokens to measure on (the first ones).
    pub chunks: usize,
    /// Fractions of each unit's largest skip to measure at, increasing within (0, 1].
    pub points: Vec<f32>,
    /// Interpolate between measured points linearly in the skipped input energy
    /// ([`Curve::grid`]) instead of in the fraction. On SmolLM2-135M it allocated worse (one
    /// measurement each, BENCHMARKS 2026-12-07 session 2), so it is off by default.
    pub energy_interpolation: bool,
}

/// Per layer, the rule the sparse path applies with `plan`'s thresholds.
pub fn rules(plan: &SparsityPlan) -> Arc<Vec<SkipRule>> {
    Arc::new(plan.layers.iter().map(|lp| lp.rule()).collect())
}

/// The dense model on one chunk: each layer's input and the log-probabilities at every position.
struct Reference {
    /// `hidden[l]`: the input of layer `l` (`hidden[0]` unused: layer 0 starts from the tokens).
    hidden: Vec<Vec<f32>>,
    logp: Vec<f32>,
    /// `exp(logp)`, kept: the KL of every measurement needs it.
    p: Vec<f32>,
}

impl Reference {
    fn new(hidden: Vec<Vec<f32>>, mut logits: Vec<f32>, vocab: usize) -> Reference {
        log_softmax_rows(&mut logits, vocab);
        let p = logits.iter().map(|&v| v.exp()).collect();
        Reference {
            hidden,
            logp: logits,
            p,
        }
    }
}

fn chunks_of(tokens: &[u32], n_ctx: usize, chunks: usize) -> Result<Vec<&[u32]>> {
    let c: Vec<&[u32]> = tokens.chunks_exact(n_ctx.max(1)).take(chunks).collect();
    if n_ctx == 0 || c.is_empty() {
        return Err(Error::Invalid(format!(
            "allocation needs at least one chunk of {n_ctx} calibration tokens, got {}",
            tokens.len()
        )));
    }
    Ok(c)
}

fn log_softmax_rows(z: &mut [f32], vocab: usize) {
    for row in z.chunks_exact_mut(vocab) {
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m as f64
            + row
                .iter()
                .map(|&v| ((v - m) as f64).exp())
                .sum::<f64>()
                .ln();
        for v in row.iter_mut() {
            *v = (*v as f64 - lse) as f32;
        }
    }
}

/// Mean over rows of KL(reference ‖ softmax(logits)), rows in parallel.
fn mean_kl(reference: &Reference, logits: &[f32], vocab: usize) -> f64 {
    let (logp, prob) = (&reference.logp, &reference.p);
    let rows = logp.len() / vocab;
    let out: Vec<AtomicU64> = (0..rows).map(|_| AtomicU64::new(0)).collect();
    crate::parallel::for_each(rows, &|r| {
        let row = r * vocab..(r + 1) * vocab;
        let (lp, p, q) = (&logp[row.clone()], &prob[row.clone()], &logits[row]);
        let m = q.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let lse = m as f64 + q.iter().map(|&v| (v - m).exp() as f64).sum::<f64>().ln();
        // Σ p·(log p − z) + lse, since Σ p = 1.
        let cross: f64 = lp
            .iter()
            .zip(p)
            .zip(q)
            .map(|((&l, &p), &z)| (p * (l - z)) as f64)
            .sum();
        let kl = cross + lse;
        out[r].store(kl.max(0.0).to_bits(), Relaxed);
    });
    out.iter()
        .map(|v| f64::from_bits(v.load(Relaxed)))
        .sum::<f64>()
        / rows.max(1) as f64
}

fn reference(model: &Model, chunk: &[u32]) -> Result<Reference> {
    let n_layer = model.config.n_layer;
    let mut hidden = vec![Vec::new(); n_layer + 1];
    for l in 0..n_layer {
        let mut st = State::for_layers(model, chunk.len(), l..l + 1)?;
        let batch = if l == 0 {
            Batch::Tokens(chunk)
        } else {
            Batch::Hidden(&hidden[l])
        };
        let mut out = Vec::new();
        model.forward_hidden(&mut st, batch, &mut out)?;
        hidden[l + 1] = out;
    }
    let mut st = State::for_layers(model, chunk.len(), n_layer - 1..n_layer)?;
    let last = hidden.pop().unwrap_or_default();
    let mut logits = Vec::new();
    model.output_head(&mut st, &last, &mut logits)?;
    Ok(Reference::new(hidden, logits, model.config.n_vocab))
}

/// Runs layers `state.kv.layers()` (to the last) of `chunk` from the reference's input of the
/// first one with `mask`, and returns the mean KL from the dense model.
fn masked_kl(
    model: &Model,
    state: &mut State,
    reference: &Reference,
    chunk: &[u32],
    mask: Option<Arc<FfnMask>>,
) -> Result<f64> {
    let l0 = state.kv.layers().start;
    let batch = if l0 == 0 {
        Batch::Tokens(chunk)
    } else {
        Batch::Hidden(&reference.hidden[l0])
    };
    state.reset();
    state.ffn_mask = mask;
    let mut unused = Vec::new();
    let run = model.forward_stage(state, batch, Logits::All, &mut unused);
    state.ffn_mask = None;
    run?;
    Ok(mean_kl(reference, &state.logits, model.config.n_vocab))
}

/// Measures every unit's [`Curve`] on the first `opts.chunks` chunks of `tokens`, with `plan`'s
/// hot neurons and `stats`' histograms; `bytes` gives each layer's code bytes. `progress(done,
/// total)` after each measurement.
pub fn measure_curves(
    model: &Model,
    plan: &SparsityPlan,
    stats: &NeuronStats,
    bytes: &[LayerBytes],
    tokens: &[u32],
    opts: &Options,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Curve>> {
    let n_layer = model.config.n_layer;
    if plan.layers.len() != n_layer || stats.layers.len() != n_layer || bytes.len() != n_layer {
        return Err(Error::Invalid(format!(
            "the plan, statistics and byte counts must have the model's {n_layer} layers"
        )));
    }
    if opts.points.is_empty()
        || opts.points.windows(2).any(|w| w[0] >= w[1])
        || opts.points.iter().any(|&p| !(p > 0.0 && p <= 1.0))
    {
        return Err(Error::Invalid(format!(
            "allocation points must increase within (0, 1], got {:?}",
            opts.points
        )));
    }
    let chunks = chunks_of(tokens, opts.n_ctx, opts.chunks)?;
    let rules = rules(plan);
    let units = [Unit::Inputs, Unit::Neurons];
    let mut curves: Vec<Curve> = (0..n_layer)
        .flat_map(|l| {
            let lp = &plan.layers[l];
            units.map(|unit| {
                let (max, b) = match unit {
                    Unit::Inputs => (1.0, bytes[l].codes_in),
                    // A fraction f of the n_ff neurons is f of down's codes.
                    Unit::Neurons => (lp.max_neuron_skip(), bytes[l].codes_down),
                };
                let mut fractions = vec![0.0];
                for &p in &opts.points {
                    let f = p * max;
                    if f > *fractions.last().unwrap_or(&0.0) {
                        fractions.push(f);
                    }
                }
                let ls = &stats.layers[l];
                let cold = lp.cold_hist(ls);
                let energy_at = |f: f32| match unit {
                    Unit::Inputs => energy_below(&ls.input_hist, lp.thresholds(ls, f, 0.0).0),
                    Unit::Neurons => energy_below(&cold, lp.thresholds(ls, 0.0, f).1),
                };
                let grid = if opts.energy_interpolation {
                    (0..=GRID)
                        .map(|j| {
                            let f = max * j as f32 / GRID as f32;
                            (f, energy_at(f))
                        })
                        .collect()
                } else {
                    Vec::new()
                };
                Curve {
                    layer: l,
                    unit,
                    kl: vec![0.0; fractions.len()],
                    energy: fractions.iter().map(|&f| energy_at(f)).collect(),
                    fractions,
                    bytes: b,
                    grid,
                }
            })
        })
        .collect();
    let total: usize = chunks.len() * curves.iter().map(|c| c.fractions.len() - 1).sum::<usize>();
    let mut done = 0;
    for chunk in &chunks {
        let reference = reference(model, chunk)?;
        for l in 0..n_layer {
            let mut state = State::for_layers(model, chunk.len(), l..n_layer)?;
            for curve in curves.iter_mut().filter(|c| c.layer == l) {
                for k in 1..curve.fractions.len() {
                    let f = curve.fractions[k];
                    let (t_in, t_neu) = match curve.unit {
                        Unit::Inputs => {
                            (plan.layers[l].thresholds(&stats.layers[l], f, 0.0).0, 0.0)
                        }
                        Unit::Neurons => {
                            (0.0, plan.layers[l].thresholds(&stats.layers[l], 0.0, f).1)
                        }
                    };
                    let mut thresholds = vec![None; n_layer];
                    thresholds[l] = Some((t_in, t_neu));
                    let mask = Arc::new(FfnMask {
                        thresholds,
                        rules: rules.clone(),
                    });
                    let kl = masked_kl(model, &mut state, &reference, chunk, Some(mask))?;
                    curve.kl[k] += kl / chunks.len() as f64;
                    done += 1;
                    progress(done, total);
                }
            }
        }
    }
    Ok(curves)
}

/// The lower convex hull of a curve's points (from the first), as indices into them.
fn hull(f: &[f32], e: &[f64]) -> Vec<usize> {
    let mut h: Vec<usize> = Vec::new();
    for k in 0..f.len() {
        while h.len() >= 2 {
            let (a, b) = (h[h.len() - 2], h[h.len() - 1]);
            // b lies on or above the segment a–k: drop it.
            let cross = (f[b] - f[a]) as f64 * (e[k] - e[a]) - (f[k] - f[a]) as f64 * (e[b] - e[a]);
            if cross <= 0.0 {
                h.pop();
            } else {
                break;
            }
        }
        h.push(k);
    }
    h
}

/// The greedy allocation: for each of `levels` (increasing, fractions of `total_bytes`, the bytes
/// of all the FFN copies), every curve's skip fraction. A level beyond what all units together
/// can skip gets every unit at its largest fraction.
pub fn allocate(curves: &[Curve], total_bytes: f64, levels: &[f32]) -> Result<Vec<Vec<f32>>> {
    if levels.windows(2).any(|w| w[0] >= w[1]) || levels.iter().any(|&s| !(s > 0.0 && s < 1.0)) {
        return Err(Error::Invalid(format!(
            "sparsity levels must increase within (0, 1), got {levels:?}"
        )));
    }
    if total_bytes.is_nan() || total_bytes <= 0.0 {
        return Err(Error::Invalid("no FFN bytes to allocate".into()));
    }
    // Hull segments of every curve: (cost per byte, curve, from fraction, to fraction).
    let mut segments: Vec<(f64, usize, f32, f32)> = Vec::new();
    for (i, c) in curves.iter().enumerate() {
        if c.fractions.len() != c.kl.len()
            || c.fractions.first() != Some(&0.0)
            || c.fractions.windows(2).any(|w| w[0] >= w[1])
            || c.kl.iter().any(|e| !e.is_finite())
            || c.bytes.is_nan()
            || c.bytes < 0.0
        {
            return Err(Error::Invalid(format!(
                "layer {} {:?}: a curve needs increasing fractions from 0 and finite errors",
                c.layer, c.unit
            )));
        }
        let (fs, es): (Vec<f32>, Vec<f64>) = c.predicted().into_iter().unzip();
        let h = hull(&fs, &es);
        for w in h.windows(2) {
            let (a, b) = (w[0], w[1]);
            let db = (fs[b] - fs[a]) as f64 * c.bytes;
            let cost = if db > 0.0 {
                (es[b] - es[a]) / db
            } else {
                f64::INFINITY
            };
            segments.push((cost, i, fs[a], fs[b]));
        }
    }
    // Hull slopes increase along each curve, so sorting by cost keeps each curve's segments in
    // order (ties: by curve, then by fraction).
    segments.sort_by(|x, y| {
        x.0.total_cmp(&y.0)
            .then(x.1.cmp(&y.1))
            .then(x.2.total_cmp(&y.2))
    });
    let mut f = vec![0.0f32; curves.len()];
    let mut skipped = 0.0;
    let mut out = Vec::with_capacity(levels.len());
    let mut seg = segments.iter();
    let mut current = seg.next();
    for &s in levels {
        let target = s as f64 * total_bytes;
        while skipped < target {
            let Some(&(_, i, _, to)) = current else {
                break;
            };
            let room = (to - f[i]) as f64 * curves[i].bytes;
            if skipped + room <= target {
                skipped += room;
                f[i] = to;
                current = seg.next();
            } else {
                // Part of the segment meets the level; the rest waits for the next level.
                let df = ((target - skipped) / curves[i].bytes) as f32;
                f[i] = (f[i] + df).min(to);
                skipped = target;
            }
        }
        out.push(f.clone());
    }
    Ok(out)
}

/// The planned average byte sparsity of `fractions` (one per curve).
pub fn planned_sparsity(curves: &[Curve], fractions: &[f32], total_bytes: f64) -> f64 {
    curves
        .iter()
        .zip(fractions)
        .map(|(c, &f)| f as f64 * c.bytes)
        .sum::<f64>()
        / total_bytes
}

/// Sum of all the copies' bytes.
pub fn total_bytes(bytes: &[LayerBytes]) -> f64 {
    bytes.iter().map(|b| b.bytes_in + b.bytes_down).sum()
}

/// Measures the curves and replaces `plan`'s uniform allocation by the greedy one. Returns the
/// curves (for a report).
pub fn allocate_plan(
    model: &Model,
    plan: &mut SparsityPlan,
    stats: &NeuronStats,
    bytes: &[LayerBytes],
    tokens: &[u32],
    opts: &Options,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Curve>> {
    let curves = measure_curves(model, plan, stats, bytes, tokens, opts, progress)?;
    let per_level = allocate(&curves, total_bytes(bytes), &plan.levels)?;
    let n_layer = plan.layers.len();
    let mut fractions = vec![vec![(0.0f32, 0.0f32); n_layer]; per_level.len()];
    for (k, f) in per_level.iter().enumerate() {
        for (c, &v) in curves.iter().zip(f) {
            match c.unit {
                Unit::Inputs => fractions[k][c.layer].0 = v,
                Unit::Neurons => fractions[k][c.layer].1 = v,
            }
        }
    }
    plan.set_allocation(stats, NAME, &fractions)?;
    Ok(curves)
}

/// For each `(plan, k)` of `which`, the mean KL from the dense model on the first `chunks` chunks
/// of `tokens` with every layer skipping at `plan`'s level `k` (simulated on the dense path, as the
/// curves are measured): what an allocation costs in full, interactions included. The dense
/// reference is computed once per chunk for all of them.
pub fn levels_kl(
    model: &Model,
    which: &[(&SparsityPlan, usize)],
    tokens: &[u32],
    n_ctx: usize,
    chunks: usize,
) -> Result<Vec<f64>> {
    let mut masks = Vec::with_capacity(which.len());
    for &(plan, k) in which {
        if k >= plan.levels.len() || plan.layers.len() != model.config.n_layer {
            return Err(Error::Invalid(format!(
                "level {k} of a plan with {} levels and {} layers",
                plan.levels.len(),
                plan.layers.len()
            )));
        }
        masks.push(Arc::new(FfnMask {
            thresholds: plan
                .layers
                .iter()
                .map(|lp| Some((lp.input_thresholds[k], lp.neuron_thresholds[k])))
                .collect(),
            rules: rules(plan),
        }));
    }
    let chunks = chunks_of(tokens, n_ctx, chunks)?;
    let mut total = vec![0.0; which.len()];
    for chunk in &chunks {
        let mut state = State::new(model, chunk.len())?;
        model.forward(&mut state, chunk, Logits::All)?;
        let logits = std::mem::take(&mut state.logits);
        let reference = Reference::new(Vec::new(), logits, model.config.n_vocab);
        for (t, mask) in total.iter_mut().zip(&masks) {
            *t += masked_kl(model, &mut state, &reference, chunk, Some(mask.clone()))?
                / chunks.len() as f64;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(layer: usize, f: &[f32], kl: &[f64], bytes: f64) -> Curve {
        Curve {
            layer,
            unit: Unit::Inputs,
            fractions: f.to_vec(),
            kl: kl.to_vec(),
            bytes,
            energy: Vec::new(),
            grid: Vec::new(),
        }
    }

    #[test]
    fn hull_drops_points_above_the_chords() {
        let f = [0.0, 0.25, 0.5, 0.75, 1.0];
        // 0.25 lies above the chord 0–0.5; the rest is convex.
        assert_eq!(hull(&f, &[0.0, 0.3, 0.2, 0.5, 1.0]), vec![0, 2, 3, 4]);
        // Collinear points (exact in binary) add nothing.
        assert_eq!(hull(&f, &[0.0, 0.25, 0.5, 0.75, 1.0]), vec![0, 4]);
    }

    #[test]
    fn greedy_skips_the_cheap_unit_first_and_meets_each_level() {
        let f = [0.0, 0.5, 1.0];
        // Unit 0 costs 10x unit 1 per byte; unit 1's second half costs more than unit 0's first.
        let curves = [
            curve(0, &f, &[0.0, 1.0, 2.0], 100.0),
            curve(1, &f, &[0.0, 0.1, 5.0], 100.0),
        ];
        let total = 400.0;
        let out = allocate(&curves, total, &[0.1, 0.2, 0.3]).unwrap();
        assert_eq!(out[0], vec![0.0, 0.4]);
        // Unit 1 at its first knee (50 bytes = 0.125), then unit 0 (cheaper than 1's second half).
        assert_eq!(out[1], vec![0.3, 0.5]);
        for (s, f) in [0.1, 0.2, 0.3].iter().zip(&out) {
            assert!((planned_sparsity(&curves, f, total) - s).abs() < 1e-6);
        }
        // Fractions never decrease from one level to the next.
        assert!(out
            .windows(2)
            .all(|w| w[0].iter().zip(&w[1]).all(|(a, b)| a <= b)));
        // Beyond what can be skipped: everything at its largest.
        let all = allocate(&curves, total, &[0.6]).unwrap();
        assert_eq!(all[0], vec![1.0, 1.0]);
        assert!(allocate(&curves, total, &[0.3, 0.2]).is_err());
        assert!(allocate(&curves, 0.0, &[0.3]).is_err());
        let bad = [curve(0, &[0.0, 0.5], &[0.0, f64::NAN], 1.0)];
        assert!(allocate(&bad, total, &[0.3]).is_err());
    }

    #[test]
    fn errors_between_points_follow_the_skipped_energy() {
        // Energy f³: half the fraction is an eighth of the energy, so an eighth of the error.
        let mut c = curve(0, &[0.0, 1.0], &[0.0, 8.0], 100.0);
        c.energy = vec![0.0, 1.0];
        c.grid = (0..=4)
            .map(|j| (j as f32 / 4.0, (j as f64 / 4.0).powi(3)))
            .collect();
        let p = c.predicted();
        assert_eq!(p[2], (0.5, 1.0));
        // Two such units: a little of each costs less than all of one, so at half the bytes
        // both skip half (linear in fraction, all of one unit would cost the same).
        let mut d = c.clone();
        d.layer = 1;
        let out = allocate(&[c, d], 200.0, &[0.5]).unwrap();
        assert_eq!(out[0], vec![0.5, 0.5]);
    }
}
