//! Sparse FFN execution on a sparsified model (see [`crate::plan::sparsify`] for how the file is
//! made): per token, gate/up read only the codes of inputs with |x| above the level's input
//! threshold, and down reads the codes of the hot neurons (always) and of the cold neurons whose
//! |activation| is above the neuron threshold. The copies are the source's own quantized weights
//! in the transposed-group layout ([`crate::quant::transposed`]), so with nothing skipped the
//! sparse path computes the dense model (the same weights and the same 8-bit activations, up to
//! float summation order). A skipped input or neuron is a skipped contiguous run of codes
//! ([`crate::quant::kernels::sparse`]); each product is split across the worker threads by inputs.
//!
//! Neurons keep their original order: permuting `ffn_down`'s inputs would regroup its weights
//! under other scales (see [`crate::quant::transposed`]), so the hot neurons are a set, tested with
//! the threshold in one branch-free pass over the activations that builds the active list.
//!
//! The level S (fraction of FFN weight bytes skipped per token on the calibration text) is chosen
//! at run time: thresholds are interpolated linearly between the stored levels (and S = 0, where
//! every threshold is 0). S = 0 is the dense model: the forward pass then uses the source's own
//! FFN tensors, which the sparsified file keeps unchanged. Only batches of at most
//! [`SparseFfn::max_batch`] tokens take the sparse path (by default 1: decoding), so prompts stay
//! dense unless the caller asks otherwise (perplexity does, to measure what decoding computes).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::config::Config;
use super::ops;
use super::Model;
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::format::Gguf;
use crate::parallel::DisjointMut;
use crate::plan::sparsify::{keys, tg_name, FFN, VERSION};
use crate::quant::activation::Q8Acts;
use crate::quant::kernels::sparse::{bytes_read, product, Active, Keep};
use crate::quant::kernels::{self};
use crate::quant::matmul::WeightBytes;
use crate::quant::transposed::{Layout, TgMatrix};
use crate::quant::Pq;

/// One layer's transposed-group FFN copies and thresholds.
#[derive(Debug, Clone)]
pub struct SparseLayer {
    /// `ffn_gate`, `ffn_up`, `ffn_down`, transposed.
    pub gate: TgMatrix,
    pub up: TgMatrix,
    pub down: TgMatrix,
    /// Hot neurons and the weights of the threshold tests.
    pub rule: SkipRule,
    /// Per stored level.
    pub input_thresholds: Vec<f32>,
    pub neuron_thresholds: Vec<f32>,
}

/// What a layer's thresholds are compared with: which neurons are hot (read whenever their
/// activation is not 0), and the weight each |value| is multiplied by before the test, per input
/// of gate/up and per neuron of down (the norm of the weights it meets, see
/// [`crate::plan::sparsify`]; empty: 1, the plain |activation| test of files calibrated without
/// weights).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SkipRule {
    pub hot: Vec<bool>,
    pub input_scale: Vec<f32>,
    pub neuron_scale: Vec<f32>,
}

impl SkipRule {
    /// The test of gate/up's inputs at threshold `t`.
    pub fn inputs(&self, t: f32) -> Keep<'_> {
        Keep {
            t,
            hot: &[],
            scale: &self.input_scale,
        }
    }

    /// The test of down's inputs (the neurons) at threshold `t`.
    pub fn neurons(&self, t: f32) -> Keep<'_> {
        Keep {
            t,
            hot: &self.hot,
            scale: &self.neuron_scale,
        }
    }
}

/// Bytes the sparse path read, against what a dense pass over the same copies reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct SparseStats {
    /// Token-layers computed on the sparse path.
    pub token_layers: u64,
    pub bytes_read: u64,
    pub bytes_dense: u64,
}

impl SparseStats {
    /// Fraction of FFN weight bytes skipped.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.bytes_read as f64 / self.bytes_dense.max(1) as f64
    }
}

/// The sparse FFN of a sparsified model.
#[derive(Debug)]
pub struct SparseFfn {
    /// The stored levels, increasing.
    pub levels: Vec<f32>,
    pub layers: Vec<SparseLayer>,
    /// Batches of at most this many tokens take the sparse path.
    pub max_batch: usize,
    /// The level in use and each layer's (input, neuron) thresholds; `None`: dense.
    active: Option<(f32, Vec<(f32, f32)>)>,
    token_layers: AtomicU64,
    bytes_read: AtomicU64,
    bytes_dense: AtomicU64,
}

/// The f32 array at `key`, of `len` values, or an empty one when the key is absent.
fn optional_f32_array(g: &Gguf, key: &str, len: usize) -> Result<Vec<f32>> {
    match g.get(key) {
        None => Ok(Vec::new()),
        Some(_) => f32_array(g, key, len),
    }
}

fn f32_array(g: &Gguf, key: &str, len: usize) -> Result<Vec<f32>> {
    let bad = || Error::Model(format!("{key}: expected an array of {len} f32"));
    let v = g.get(key).and_then(Value::as_array).ok_or_else(bad)?;
    let v: Vec<f32> = v
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    if v.len() != len || v.iter().any(|x| x.is_nan() || *x < 0.0) {
        return Err(bad());
    }
    Ok(v)
}

impl SparseFfn {
    /// The sparse FFN a GGUF carries (`pare.sparse.*` metadata and transposed-group tensors), or
    /// `None` when the file was not sparsified.
    pub fn from_gguf(g: &Arc<Gguf>, c: &Config) -> Result<Option<SparseFfn>> {
        let Some(version) = g.get(keys::VERSION) else {
            return Ok(None);
        };
        if version.as_u64() != Some(VERSION as u64) {
            return Err(Error::Model(format!(
                "{}: sparse layout version {} (this build reads {VERSION}); run \
                 `pare sparsify` again on the original model",
                keys::VERSION,
                version.summary()
            )));
        }
        let n_levels = g
            .get(keys::LEVELS)
            .and_then(Value::as_array)
            .map_or(0, |a| a.len());
        let levels = f32_array(g, keys::LEVELS, n_levels)?;
        if levels.is_empty()
            || levels.windows(2).any(|w| w[0] >= w[1])
            || levels.iter().any(|&s| s >= 1.0 || s <= 0.0)
        {
            return Err(Error::Model(format!(
                "{}: levels must increase within (0, 1)",
                keys::LEVELS
            )));
        }
        let (d, ff) = (c.n_embd, c.n_ff);
        let layers = (0..c.n_layer)
            .map(|l| {
                let key = |what: &str| keys::layer(l, what);
                let n_hot = g
                    .get_u64(&keys::layer(l, keys::N_HOT))
                    .filter(|&h| h as usize <= ff)
                    .ok_or_else(|| {
                        Error::Model(format!(
                            "{}: missing or above n_ff",
                            keys::layer(l, keys::N_HOT)
                        ))
                    })? as usize;
                let perm_key = keys::layer(l, keys::PERMUTATION);
                let perm = g
                    .get(&perm_key)
                    .and_then(Value::as_array)
                    .filter(|a| a.len() == ff)
                    .ok_or_else(|| Error::Model(format!("{perm_key}: expected {ff} neurons")))?;
                let mut hot = vec![false; ff];
                for v in &perm[..n_hot] {
                    let k = v.as_u64().filter(|&k| (k as usize) < ff).ok_or_else(|| {
                        Error::Model(format!(
                            "{perm_key}: neuron {} outside 0..{ff}",
                            v.summary()
                        ))
                    })?;
                    hot[k as usize] = true;
                }
                let [gate, up, down] = FFN.map(|m| {
                    let (n_out, n_in) = if m == "ffn_down" { (d, ff) } else { (ff, d) };
                    tg_matrix(g, l, m, n_out, n_in)
                });
                Ok(SparseLayer {
                    gate: gate?,
                    up: up?,
                    down: down?,
                    rule: SkipRule {
                        hot,
                        input_scale: optional_f32_array(g, &key(keys::INPUT_SCALE), d)?,
                        neuron_scale: optional_f32_array(g, &key(keys::NEURON_SCALE), ff)?,
                    },
                    input_thresholds: f32_array(g, &key(keys::INPUT_THRESHOLDS), n_levels)?,
                    neuron_thresholds: f32_array(g, &key(keys::NEURON_THRESHOLDS), n_levels)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(SparseFfn {
            levels,
            layers,
            max_batch: 1,
            active: None,
            token_layers: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_dense: AtomicU64::new(0),
        }))
    }

    /// Chooses level `s`: 0 is dense unless `force` (then the sparse kernels run with every
    /// threshold 0, which measures the copies and kernels themselves); above the largest stored
    /// level is an error.
    pub fn set_level(&mut self, s: f32, force: bool) -> Result<()> {
        let max = *self.levels.last().unwrap_or(&0.0);
        if !(0.0..=max).contains(&s) {
            return Err(Error::Invalid(format!(
                "sparsity {s} is outside 0..={max} (the levels this file was calibrated for)"
            )));
        }
        if s == 0.0 && !force {
            self.active = None;
            return Ok(());
        }
        // Position among the levels, with an implicit level 0 of zero thresholds.
        let k = self.levels.iter().position(|&l| l >= s).unwrap_or(0);
        let (s0, s1) = (
            if k == 0 { 0.0 } else { self.levels[k - 1] },
            self.levels[k],
        );
        let f = ((s - s0) / (s1 - s0)).clamp(0.0, 1.0);
        let lerp = |v: &[f32]| {
            let a = if k == 0 { 0.0 } else { v[k - 1] };
            if f == 0.0 {
                a
            } else if f == 1.0 {
                v[k]
            } else {
                a + f * (v[k] - a)
            }
        };
        let th = self
            .layers
            .iter()
            .map(|l| (lerp(&l.input_thresholds), lerp(&l.neuron_thresholds)))
            .collect();
        self.active = Some((s, th));
        Ok(())
    }

    /// The level in use (`None`: dense).
    pub fn level(&self) -> Option<f32> {
        self.active.as_ref().map(|a| a.0)
    }

    /// Whether a batch of `n` tokens takes the sparse path.
    pub fn applies(&self, n: usize) -> bool {
        self.active.is_some() && n <= self.max_batch
    }

    pub fn stats(&self) -> SparseStats {
        SparseStats {
            token_layers: self.token_layers.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_dense: self.bytes_dense.load(Relaxed),
        }
    }

    pub fn reset_stats(&self) {
        self.token_layers.store(0, Relaxed);
        self.bytes_read.store(0, Relaxed);
        self.bytes_dense.store(0, Relaxed);
    }

    /// `out = down(silu(gate(x))·up(x))` of layer `l` for each row `x` of `xn` (rows of
    /// `n_embd`), at the level in use (zero thresholds when none is).
    pub fn forward(&self, l: usize, xn: &[f32], out: &mut [f32]) {
        let layer = &self.layers[l];
        let (t_in, t_neu) = self.active.as_ref().map_or((0.0, 0.0), |a| a.1[l]);
        let (d, ff) = (layer.gate.layout.n_in, layer.gate.layout.n_out);
        let dense: usize = [&layer.gate, &layer.up, &layer.down]
            .iter()
            .map(|m| m.layout.bytes())
            .sum();
        BUFFERS.with_borrow_mut(|b| {
            for (x, o) in xn.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                // The dense path's 8-bit activations, restricted to the active inputs.
                b.q8.quantize(x, 1, d);
                b.act
                    .build_thresholded(&b.q8.row(0), d, x, layer.rule.inputs(t_in));
                let mut read =
                    bytes_read(&layer.gate.layout, &b.act) + bytes_read(&layer.up.layout, &b.act);
                // Every output is written by `products`.
                b.y.resize(2 * ff, 0.0);
                let (gate, up) = b.y.split_at_mut(ff);
                products(
                    &mut [(&layer.gate, &mut *gate), (&layer.up, &mut *up)],
                    &b.act,
                    &mut b.parts,
                );
                ops::swiglu(gate, up);
                b.q8.quantize(gate, 1, ff);
                b.act
                    .build_thresholded(&b.q8.row(0), ff, gate, layer.rule.neurons(t_neu));
                read += bytes_read(&layer.down.layout, &b.act);
                products(&mut [(&layer.down, o)], &b.act, &mut b.parts);
                self.token_layers.fetch_add(1, Relaxed);
                self.bytes_read.fetch_add(read as u64, Relaxed);
                self.bytes_dense.fetch_add(dense as u64, Relaxed);
            }
        });
    }
}

/// Sparse FFN execution simulated on the dense path: the inputs of gate/up and the neurons of down
/// that the layer's [`SkipRule`] does not keep at its thresholds are zeroed.
/// The sparse path quantizes a whole row to 8 bits and then leaves inputs out; zeroing them first
/// gives the same 8-bit values for the inputs that stay (a block's scale comes from its largest
/// |x|, which a threshold under it never zeroes, and a block zeroed entirely contributes nothing
/// either way), so the batched dense kernels compute what the sparse path would, for every token
/// of a chunk at once. Calibration ([`crate::plan::sparse_alloc`]) measures with it what
/// thresholds cost, on a model that was not sparsified yet.
#[derive(Debug, Clone)]
pub struct FfnMask {
    /// Per layer: `(input threshold, neuron threshold)`, or `None` for a dense layer.
    pub thresholds: Vec<Option<(f32, f32)>>,
    /// Per layer, as in [`SparseLayer::rule`].
    pub rules: Arc<Vec<SkipRule>>,
}

impl FfnMask {
    /// Zeroes the inputs of layer `l`'s gate/up that the sparse path would skip (`x`: rows of
    /// `n_embd`).
    pub fn mask_inputs(&self, l: usize, x: &mut [f32]) {
        if let (Some(Some((t, _))), Some(r)) = (self.thresholds.get(l), self.rules.get(l)) {
            zero_skipped(x, r.inputs(*t));
        }
    }

    /// Zeroes the neuron activations of layer `l` (rows of `n_ff`) that the sparse path would
    /// skip in down.
    pub fn mask_neurons(&self, l: usize, a: &mut [f32]) {
        if let (Some(Some((_, t))), Some(r)) = (self.thresholds.get(l), self.rules.get(l)) {
            zero_skipped(a, r.neurons(*t));
        }
    }
}

/// Zeroes the values of each row (of the rule's length; any length when it has no per-input
/// parts) that `rule` does not keep.
fn zero_skipped(x: &mut [f32], rule: Keep) {
    let n = rule.hot.len().max(rule.scale.len());
    let n = if n == 0 { x.len() } else { n };
    for row in x.chunks_exact_mut(n) {
        for (j, v) in row.iter_mut().enumerate() {
            if !rule.keeps(j, *v) {
                *v = 0.0;
            }
        }
    }
}

/// The transposed-group copy of layer `l`'s matrix `m` (`n_out` × `n_in`), in its source's format.
fn tg_matrix(g: &Arc<Gguf>, l: usize, m: &str, n_out: usize, n_in: usize) -> Result<TgMatrix> {
    let src = format!("blk.{l}.{m}.weight");
    let ty = g
        .tensor(&src)
        .map(|t| t.ggml_type)
        .ok_or_else(|| Error::Model(format!("tensor {src:?} is missing")))?;
    let pq = Pq::of_ggml(ty)
        .ok_or_else(|| Error::Model(format!("{src}: {ty} has no transposed-group copy")))?;
    let layout = Layout::new(pq, n_out, n_in)?;
    let name = tg_name(l, m);
    let t = g
        .tensor(&name)
        .ok_or_else(|| Error::Model(format!("tensor {name:?} is missing")))?;
    if t.ggml_type != crate::quant::GgmlType::I8 || t.dims.len() != 1 {
        return Err(Error::Model(format!(
            "{name}: expected a 1-dimensional I8 tensor of bytes"
        )));
    }
    let bytes = WeightBytes::new(g.clone(), (g.data_offset + t.offset) as usize, t.n_bytes())?;
    TgMatrix::new(&name, layout, bytes)
}

#[derive(Default)]
struct Buffers {
    q8: Q8Acts,
    act: Active,
    y: Vec<f32>,
    parts: Parts,
}

/// The parts a product is split into across threads ([`products`]), reused.
#[derive(Default)]
struct Parts {
    /// Per job, the active inputs of each part.
    acts: Vec<Vec<Active>>,
    /// Every part's partial sums, one after another.
    sums: Vec<f32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// `y = W·x̂` over the active inputs for each `(W, y)` of `jobs` (products of the same
/// activations), split across the worker threads by *inputs*: each part of a product takes some
/// weight groups' active inputs for every output, into its own partial sums, which are added up
/// after the loop. A split by outputs (as dense products are split) would cut each active input's
/// contiguous run of codes into one piece per part (72 bytes of `ffn_down`'s 288 on two threads
/// with two parts each); split by inputs, every run is read whole, as one stream, and no group's
/// scales are read twice. Two parts per thread and matrix, so that a thread slowed by another
/// process's load does not hold the others up.
fn products(jobs: &mut [(&TgMatrix, &mut [f32])], act: &Active, parts: &mut Parts) {
    let isa = kernels::isa();
    let per = 2 * crate::parallel::threads();
    parts.acts.resize_with(jobs.len(), Vec::new);
    // (job, part, offset of its partial sums in `parts.sums`)
    let mut items = Vec::with_capacity(jobs.len() * per);
    let mut len = 0;
    for (i, (w, y)) in jobs.iter().enumerate() {
        assert_eq!(y.len(), w.layout.n_out);
        let used = act.split_into(per, w.layout.group(), &mut parts.acts[i]);
        for k in 0..used {
            items.push((i, k, len));
            len += w.layout.n_out;
        }
    }
    // Every part writes all its partial sums (no need to clear them).
    if parts.sums.len() < len {
        parts.sums.resize(len, 0.0);
    }
    let sums = DisjointMut::new(&mut parts.sums);
    let acts = &parts.acts;
    let mats: Vec<&TgMatrix> = jobs.iter().map(|(w, _)| *w).collect();
    crate::parallel::for_each(items.len(), &|n| {
        let (i, k, at) = items[n];
        let w = mats[i];
        // SAFETY: each item's partial sums are its own `n_out` elements of `sums`, which outlives
        // the loop.
        let y = unsafe { std::slice::from_raw_parts_mut(sums.ptr().add(at), w.layout.n_out) };
        product(isa, w, &acts[i][k], 0..w.layout.n_out, y);
    });
    for (i, (_, y)) in jobs.iter_mut().enumerate() {
        y.fill(0.0);
        for &(_, _, at) in items.iter().filter(|it| it.0 == i) {
            for (o, v) in y.iter_mut().zip(&parts.sums[at..]) {
                *o += v;
            }
        }
    }
}

impl Model {
    /// Sets the sparsity level S of sparse FFN execution (0: dense). A level above 0 needs a model
    /// written by `pare sparsify`.
    pub fn set_sparsity(&mut self, s: f32) -> Result<()> {
        self.sparse_level(s, false)
    }

    /// As [`Model::set_sparsity`], but the sparse kernels run even at S = 0 (with every threshold
    /// 0): for measuring the transposed-group copies and the kernels against the dense path.
    pub fn set_sparse_path(&mut self, s: f32) -> Result<()> {
        self.sparse_level(s, true)
    }

    fn sparse_level(&mut self, s: f32, force: bool) -> Result<()> {
        match &mut self.sparse {
            Some(sp) => sp.set_level(s, force),
            None if s == 0.0 && !force => Ok(()),
            None => Err(Error::Invalid(format!(
                "{} was not sparsified: run `pare sparsify -m {} -o OUT.gguf` and use OUT.gguf \
                 for sparse FFN execution",
                self.source.path().display(),
                self.source.path().display()
            ))),
        }
    }
}
