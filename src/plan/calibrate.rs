//! Calibration: run the model over text and collect, for every matrix, statistics of the inputs
//! it meets. A column's mean square input is its *importance*: with a diagonal approximation of
//! the inputs' second moment, the expected squared error a weight error `e` causes in the output
//! is `Σ_j importance_j · e_j²` (per row), which is what the quantizer's search and the planner's
//! error estimates weigh by.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::model::{Logits, Model, Observer, State};
use crate::quant::matmul::QMatrix;

/// Input statistics of one matrix, per input column.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputStats {
    /// Rows (tokens) seen.
    pub n: usize,
    /// Σ x² per column.
    pub sum_sq: Vec<f64>,
    /// max |x| per column.
    pub max_abs: Vec<f32>,
}

impl InputStats {
    fn add(&mut self, x: &[f32], n: usize) {
        let cols = x.len() / n.max(1);
        if self.sum_sq.len() != cols {
            self.sum_sq = vec![0.0; cols];
            self.max_abs = vec![0.0; cols];
        }
        for row in x.chunks_exact(cols) {
            for ((s, m), &v) in self.sum_sq.iter_mut().zip(&mut self.max_abs).zip(row) {
                *s += (v as f64) * (v as f64);
                *m = m.max(v.abs());
            }
        }
        self.n += n;
    }

    /// Mean square input per column: the importance of each weight column.
    pub fn importance(&self) -> Vec<f32> {
        let n = self.n.max(1) as f64;
        self.sum_sq.iter().map(|&s| (s / n) as f32).collect()
    }

    /// The largest |input| over all columns (the activation range).
    pub fn range(&self) -> f32 {
        self.max_abs.iter().fold(0.0, |m, &v| m.max(v))
    }
}

/// What calibration collected: input statistics per matrix name.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    pub tokens: usize,
    pub inputs: BTreeMap<String, InputStats>,
    /// Mean negative log-likelihood per predicted token of the calibration text under the model
    /// (`None` in measurements saved before it was recorded): what a predicted perplexity starts
    /// from.
    #[serde(default)]
    pub text_nll: Option<f64>,
}

#[derive(Default)]
struct Collector(Mutex<BTreeMap<String, InputStats>>);

impl Observer for Collector {
    fn observe(&self, w: &QMatrix, x: &[f32], n: usize) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(w.name.clone()).or_default().add(x, n);
    }
}

/// Runs `tokens` through `model` in chunks of `n_ctx` (each from an empty context; at most
/// `max_chunks`), collecting the inputs of every matrix product. `progress` is called after each
/// chunk with (done, total).
pub fn calibrate(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    max_chunks: Option<usize>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Calibration> {
    if n_ctx < 2 {
        return Err(Error::Invalid(
            "calibration context must be at least 2 tokens".into(),
        ));
    }
    let mut chunks = tokens.len() / n_ctx;
    if let Some(m) = max_chunks {
        chunks = chunks.min(m);
    }
    if chunks == 0 {
        return Err(Error::Invalid(format!(
            "calibration text has {} tokens, fewer than one chunk of {n_ctx}",
            tokens.len()
        )));
    }
    let collector = Arc::new(Collector::default());
    let mut state = State::new(model, n_ctx)?;
    state.observer = Some(collector.clone());
    let mut nll = 0.0f64;
    for i in 0..chunks {
        state.reset();
        // All positions' logits, so the output head's inputs are observed too.
        let chunk = &tokens[i * n_ctx..(i + 1) * n_ctx];
        model.forward(&mut state, chunk, Logits::All)?;
        let nv = model.config.n_vocab;
        for (row, &next) in state.logits.chunks_exact(nv).zip(&chunk[1..]) {
            nll += crate::eval::perplexity::nll(row, next);
        }
        progress(i + 1, chunks);
    }
    state.observer = None;
    let inputs = std::mem::take(&mut *collector.0.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Calibration {
        tokens: chunks * n_ctx,
        inputs,
        text_nll: Some(nll / (chunks * (n_ctx - 1)) as f64),
    })
}
