//! Sparse FFN execution on a sparsified model (see [`crate::plan::sparsify`] for how the file is
//! made): per token, gate/up read only the input-major rows of inputs with |x| above the level's
//! input threshold, and down reads the rows of the hot neurons (always, without a test) and of the
//! cold neurons whose |activation| is above the neuron threshold. A skipped input or neuron is a
//! skipped contiguous run of packed bytes ([`crate::quant::kernels::sparse`]); each product's
//! outputs are split across the worker threads.
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
use super::weights::TensorSource;
use super::Model;
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::format::Gguf;
use crate::parallel::DisjointMut;
use crate::plan::sparsify::{down_name, gate_up_name, keys, VERSION};
use crate::quant::kernels::sparse::{axpy_rows, Rows};
use crate::quant::kernels::{self};
use crate::quant::matmul::QMatrix;

/// One layer's input-major FFN copies and thresholds.
#[derive(Debug, Clone)]
pub struct SparseLayer {
    /// `n_embd` rows of `2·n_ff`: gate outputs, then up outputs, neurons permuted.
    pub gate_up: QMatrix,
    /// `n_ff` rows of `n_embd`, in the same neuron order (hot first).
    pub down: QMatrix,
    pub n_hot: usize,
    /// Per stored level.
    pub input_thresholds: Vec<f32>,
    pub neuron_thresholds: Vec<f32>,
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
    /// The sparse FFN a GGUF carries (`pare.sparse.*` metadata and input-major tensors), or
    /// `None` when the file was not sparsified.
    pub fn from_gguf(g: &Arc<Gguf>, c: &Config) -> Result<Option<SparseFfn>> {
        let Some(version) = g.get(keys::VERSION) else {
            return Ok(None);
        };
        if version.as_u64() != Some(VERSION as u64) {
            return Err(Error::Model(format!(
                "{}: sparse layout version {} (this build reads {VERSION})",
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
                let n_hot = g
                    .get_u64(&keys::layer(l, keys::N_HOT))
                    .filter(|&h| h as usize <= ff)
                    .ok_or_else(|| {
                        Error::Model(format!(
                            "{}: missing or above n_ff",
                            keys::layer(l, keys::N_HOT)
                        ))
                    })? as usize;
                let layer = SparseLayer {
                    gate_up: g.matrix(&gate_up_name(l), d, 2 * ff)?,
                    down: g.matrix(&down_name(l), ff, d)?,
                    n_hot,
                    input_thresholds: f32_array(
                        g,
                        &keys::layer(l, keys::INPUT_THRESHOLDS),
                        n_levels,
                    )?,
                    neuron_thresholds: f32_array(
                        g,
                        &keys::layer(l, keys::NEURON_THRESHOLDS),
                        n_levels,
                    )?,
                };
                for m in [&layer.gate_up, &layer.down] {
                    Rows::new(m.ty, m.bytes(), m.rows, m.cols)
                        .map_err(|e| Error::Model(format!("{}: {e}", m.name)))?;
                }
                Ok(layer)
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
        let (gu, dn) = (rows(&layer.gate_up), rows(&layer.down));
        let (d, ff) = (dn.cols, dn.rows);
        BUFFERS.with_borrow_mut(|b| {
            for (x, o) in xn.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                b.active.clear();
                b.active.extend(
                    x.iter()
                        .enumerate()
                        .filter(|(_, v)| v.abs() > t_in)
                        .map(|(i, &v)| (i as u32, v)),
                );
                let read_in = b.active.len();
                b.y.clear();
                b.y.resize(2 * ff, 0.0);
                product(&gu, &b.active, &mut b.y);
                let (gate, up) = b.y.split_at_mut(ff);
                ops::swiglu(gate, up);
                b.active.clear();
                // Hot neurons without a test; cold ones above the threshold.
                b.active.extend(
                    gate[..layer.n_hot]
                        .iter()
                        .enumerate()
                        .map(|(k, &a)| (k as u32, a)),
                );
                b.active.extend(
                    gate.iter()
                        .enumerate()
                        .skip(layer.n_hot)
                        .filter(|(_, a)| a.abs() > t_neu)
                        .map(|(k, &a)| (k as u32, a)),
                );
                o.fill(0.0);
                product(&dn, &b.active, o);
                self.token_layers.fetch_add(1, Relaxed);
                self.bytes_read.fetch_add(
                    (read_in * gu.row_bytes + b.active.len() * dn.row_bytes) as u64,
                    Relaxed,
                );
                self.bytes_dense
                    .fetch_add((d * gu.row_bytes + ff * dn.row_bytes) as u64, Relaxed);
            }
        });
    }
}

fn rows(m: &QMatrix) -> Rows<'_> {
    Rows::new(m.ty, m.bytes(), m.rows, m.cols).expect("checked when the model was loaded")
}

#[derive(Default)]
struct Buffers {
    active: Vec<(u32, f32)>,
    y: Vec<f32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// `y += Σ a·W[i]` over `active`, the outputs split across the worker threads (two ranges per
/// thread, so that a thread slowed by another process's load does not hold the others up).
fn product(w: &Rows, active: &[(u32, f32)], y: &mut [f32]) {
    let isa = kernels::isa();
    let ranges = w.split(2 * crate::parallel::threads());
    let out = DisjointMut::new(y);
    crate::parallel::for_each(ranges.len(), &|k| {
        let r = ranges[k].clone();
        // SAFETY: the ranges are disjoint and inside `y`, which outlives the loop.
        let y = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(r.start), r.len()) };
        axpy_rows(isa, w, active, r, y);
    });
}

impl Model {
    /// Sets the sparsity level S of sparse FFN execution (0: dense). A level above 0 needs a model
    /// written by `pare sparsify`.
    pub fn set_sparsity(&mut self, s: f32) -> Result<()> {
        self.sparse_level(s, false)
    }

    /// As [`Model::set_sparsity`], but the sparse kernels run even at S = 0 (with every threshold
    /// 0): for measuring the input-major copies and the kernels against the dense path.
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
