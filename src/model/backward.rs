//! The training pass: a forward pass over whole sequences that keeps what the backward pass needs
//! (a [`LayerTape`] per layer), and the backward pass, op by op as llm.c writes it: RMSNorm, the
//! products through frozen (quantized) weights, RoPE, causal grouped-query attention, SwiGLU, and
//! cross-entropy over the output head. Only LoRA parameters (and whatever a [`MergedWeight`] learns)
//! get gradients, but the gradient flows through every layer down to the embeddings' output.
//!
//! Frozen weights are dequantized to f32 for each product and multiplied with `gemm`; this is the
//! exact reference arithmetic (no 8-bit activations), so finite differences can check it.
//!
//! The layer-level functions ([`Trainable::forward_layers`], [`Trainable::backward_layers`]) take a
//! range of layers with the hidden state in and its gradient out, so that gradient checkpointing
//! ([`crate::train::checkpointing`]) and pipeline stages can drive them segment by segment.

use std::ops::Range;

use super::config::Config;
use super::dense::{self, matmul_nn_scaled, matmul_nt, matmul_nt_scaled, matmul_tn_scaled};
use super::lora::{Adapter, Lora, Target};
use super::{ops, Model};
use crate::error::{Error, Result};
use crate::quant::matmul::QMatrix;

/// How a targeted weight enters the product when the adapters are trained merged into it
/// (quantization-aware training, [`crate::train::fake_quant`]): the effective weight is
/// `f(W + s·B·A)` and the gradient passes back through `f`.
pub trait MergedWeight: Sync {
    /// Writes the effective weight (rows × cols, f32) of base `w` with adapter `ad` into `out`.
    fn effective(
        &self,
        layer: usize,
        t: Target,
        w: &QMatrix,
        ad: &Adapter,
        s: f32,
        out: &mut Vec<f32>,
    ) -> Result<()>;
    /// Turns `g` = dL/d(effective weight) into dL/d(W + s·B·A) in place (the straight-through
    /// estimator and its variants), accumulating the gradient of any parameter of `f` itself.
    fn backward(
        &self,
        layer: usize,
        t: Target,
        w: &QMatrix,
        ad: &Adapter,
        s: f32,
        g: &mut [f32],
    ) -> Result<()>;
    /// Σ g² of the gradients of `f`'s own parameters in `layers`, accumulated so far: their share
    /// of the global norm that clipping uses (zero where `f` learns nothing).
    fn grad_sq(&self, _layers: Range<usize>) -> f64 {
        0.0
    }
}

/// A model with adapters, as the training pass sees it.
pub struct Trainable<'a> {
    pub model: &'a Model,
    pub lora: &'a Lora,
    /// `Some`: targeted weights are merged and transformed (QAT); `None`: adapters stay unmerged.
    pub merged: Option<&'a dyn MergedWeight>,
    /// Seed of this micro-batch's dropout masks on adapter inputs; `None` turns dropout off
    /// (evaluation, gradient checks). Masks are a function of (seed, layer, target, index), so a
    /// recomputed forward draws the same ones.
    pub dropout_seed: Option<u64>,
}

/// What the backward pass of one layer needs from its forward pass (`n` tokens).
pub struct LayerTape {
    /// The layer's input.
    pub x: Vec<f32>,
    xn1: Vec<f32>,
    /// Q and K before their per-head norm (Qwen3 only; empty otherwise).
    q_raw: Vec<f32>,
    k_raw: Vec<f32>,
    /// Q, K after RoPE; V.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities, `n_head × n × n` (row t holds positions 0..=t).
    probs: Vec<f32>,
    att: Vec<f32>,
    /// The hidden state after the attention block.
    x2: Vec<f32>,
    xn2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    h: Vec<f32>,
}

impl LayerTape {
    /// Bytes this tape holds.
    pub fn bytes(&self) -> usize {
        4 * [
            &self.x,
            &self.xn1,
            &self.q_raw,
            &self.k_raw,
            &self.q,
            &self.k,
            &self.v,
            &self.probs,
            &self.att,
            &self.x2,
            &self.xn2,
            &self.gate,
            &self.up,
            &self.h,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
    }

    /// Bytes of one layer's tape for `n` tokens of a model with configuration `c`.
    pub fn bytes_for(c: &Config, n: usize) -> usize {
        let qk_raw = if c.arch == super::Arch::Qwen3 {
            c.q_dim() + c.kv_dim()
        } else {
            0
        };
        4 * (n * (4 * c.n_embd + 2 * c.q_dim() + 2 * c.kv_dim() + qk_raw + 3 * c.n_ff)
            + c.n_head * n * n)
    }
}

/// Sees, for every product through a frozen weight in a backward pass, the layer, the target and
/// `dy`: the gradient of the loss at the product's output (`n × rows`). The planner's gradient
/// (Fisher) sensitivity is made of these.
pub type GradObserver<'o> = &'o mut dyn FnMut(usize, Target, &[f32]);

/// Scratch buffers reused across products, and the backward pass's observer.
#[derive(Default)]
struct Work<'o> {
    w: Vec<f32>,
    g: Vec<f32>,
    observer: Option<GradObserver<'o>>,
}

impl Trainable<'_> {
    fn config(&self) -> &Config {
        &self.model.config
    }

    /// The token embeddings of `tokens` (n × n_embd): the hidden state entering layer 0.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let c = self.config();
        let d = c.n_embd;
        let mut x = vec![0.0f32; tokens.len() * d];
        for (t, &tok) in tokens.iter().enumerate() {
            if tok as usize >= c.n_vocab {
                return Err(Error::Invalid(format!(
                    "token id {tok} is outside the vocabulary of {}",
                    c.n_vocab
                )));
            }
            self.model
                .weights
                .token_embd
                .dequantize_row(tok as usize, &mut x[t * d..(t + 1) * d])?;
        }
        Ok(x)
    }

    /// Runs layers `layers` on the hidden state `x` (n × n_embd, positions 0..n) in place; returns
    /// each layer's tape when `keep` (else an empty list: the caller recomputes when it needs them).
    pub fn forward_layers(
        &self,
        layers: Range<usize>,
        x: &mut [f32],
        keep: bool,
    ) -> Result<Vec<LayerTape>> {
        let mut tapes = Vec::new();
        let mut work = Work::default();
        for l in layers {
            let tape = self.layer_forward(l, x, true, &mut work)?;
            if keep {
                tapes.push(tape);
            }
        }
        Ok(tapes)
    }

    /// The tapes of layers `layers` recomputed from their input `x` for the backward pass
    /// (gradient checkpointing): [`Self::forward_layers`] keeping them, except that the last
    /// layer's output projection (`down`), which no tape holds and whose result the caller
    /// already has, is skipped; `x` is left holding a partial sum, not the segments' output.
    pub fn recompute_layers(&self, layers: Range<usize>, x: &mut [f32]) -> Result<Vec<LayerTape>> {
        let mut tapes = Vec::with_capacity(layers.len());
        let mut work = Work::default();
        let last = layers.end.saturating_sub(1);
        for l in layers {
            tapes.push(self.layer_forward(l, x, l != last, &mut work)?);
        }
        Ok(tapes)
    }

    /// Back through layers `layers` (the tapes of exactly those layers, in order): `dx` holds the
    /// gradient of the loss at their output and leaves holding it at their input. Adapter
    /// gradients are added to `grads`.
    pub fn backward_layers(
        &self,
        layers: Range<usize>,
        tapes: &[LayerTape],
        dx: &mut [f32],
        grads: &mut Lora,
    ) -> Result<()> {
        self.backward_layers_observed(layers, tapes, dx, grads, None)
    }

    /// [`Self::backward_layers`], with `observer` seeing the output gradient of every product.
    pub fn backward_layers_observed(
        &self,
        layers: Range<usize>,
        tapes: &[LayerTape],
        dx: &mut [f32],
        grads: &mut Lora,
        observer: Option<GradObserver>,
    ) -> Result<()> {
        assert_eq!(tapes.len(), layers.len(), "one tape per layer");
        let mut work = Work {
            observer,
            ..Work::default()
        };
        for (l, tape) in layers.zip(tapes).rev() {
            self.layer_backward(l, tape, dx, grads, &mut work)?;
        }
        Ok(())
    }

    fn rope_tables(&self, n: usize) -> (Vec<f32>, Vec<f32>) {
        let c = self.config();
        let half = c.head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0; n * half], vec![0.0; n * half]);
        for t in 0..n {
            ops::rope_table(
                t,
                c.head_dim,
                c.rope_theta,
                &mut cos[t * half..(t + 1) * half],
                &mut sin[t * half..(t + 1) * half],
            );
        }
        (cos, sin)
    }

    /// One layer on `x` in place, returning its tape; `output: false` stops before the output
    /// projection (everything the tape holds is computed, `x` is not finished).
    fn layer_forward(
        &self,
        l: usize,
        x: &mut [f32],
        output: bool,
        work: &mut Work,
    ) -> Result<LayerTape> {
        let c = self.config();
        let lw = &self.model.weights.layers[l];
        let (d, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        let n = x.len() / d;
        let z = |m: usize| vec![0.0f32; n * m];
        let mut xn1 = z(d);
        ops::rms_norm(x, &lw.attn_norm, c.rms_eps, &mut xn1);
        let (mut q, mut k, mut v) = (z(qd), z(kvd), z(kvd));
        self.linear(l, Target::Q, &lw.wq, &xn1, &mut q, work)?;
        self.linear(l, Target::K, &lw.wk, &xn1, &mut k, work)?;
        self.linear(l, Target::V, &lw.wv, &xn1, &mut v, work)?;
        let (mut q_raw, mut k_raw) = (Vec::new(), Vec::new());
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            q_raw = q.clone();
            k_raw = k.clone();
            ops::rms_norm_inplace(&mut q, qn, c.rms_eps);
            ops::rms_norm_inplace(&mut k, kn, c.rms_eps);
        }
        let (cos, sin) = self.rope_tables(n);
        for t in 0..n {
            let (cs, sn) = (&cos[t * hd / 2..][..hd / 2], &sin[t * hd / 2..][..hd / 2]);
            ops::rope(&mut q[t * qd..][..qd], hd, c.rope_style, cs, sn);
            ops::rope(&mut k[t * kvd..][..kvd], hd, c.rope_style, cs, sn);
        }
        let mut probs = vec![0.0f32; c.n_head * n * n];
        let mut att = z(qd);
        attention_forward(c, &q, &k, &v, &mut probs, &mut att);
        let mut o = z(d);
        self.linear(l, Target::O, &lw.wo, &att, &mut o, work)?;
        let x_in = x.to_vec();
        for (a, b) in x.iter_mut().zip(&o) {
            *a += b;
        }
        let x2 = x.to_vec();
        let mut xn2 = z(d);
        ops::rms_norm(x, &lw.ffn_norm, c.rms_eps, &mut xn2);
        let (mut gate, mut up) = (z(ff), z(ff));
        self.linear(l, Target::Gate, &lw.gate, &xn2, &mut gate, work)?;
        self.linear(l, Target::Up, &lw.up, &xn2, &mut up, work)?;
        let mut h = gate.clone();
        ops::swiglu(&mut h, &up);
        if output {
            self.linear(l, Target::Down, &lw.down, &h, &mut o, work)?;
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
        }
        Ok(LayerTape {
            x: x_in,
            xn1,
            q_raw,
            k_raw,
            q,
            k,
            v,
            probs,
            att,
            x2,
            xn2,
            gate,
            up,
            h,
        })
    }

    fn layer_backward(
        &self,
        l: usize,
        tp: &LayerTape,
        dx: &mut [f32],
        grads: &mut Lora,
        work: &mut Work,
    ) -> Result<()> {
        let c = self.config();
        let lw = &self.model.weights.layers[l];
        let (d, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
        let n = dx.len() / d;
        let z = |m: usize| vec![0.0f32; n * m];
        // Feed-forward block: x_out = x2 + down(swiglu(gate(xn2), up(xn2))).
        let mut dh = z(ff);
        self.linear_backward(
            l,
            Target::Down,
            &lw.down,
            &tp.h,
            dx,
            &mut dh,
            false,
            grads,
            work,
        )?;
        let (mut dgate, mut dup) = (z(ff), z(ff));
        swiglu_backward(&tp.gate, &tp.up, &dh, &mut dgate, &mut dup);
        drop(dh);
        let mut dxn = z(d);
        self.linear_backward(
            l,
            Target::Gate,
            &lw.gate,
            &tp.xn2,
            &dgate,
            &mut dxn,
            false,
            grads,
            work,
        )?;
        self.linear_backward(
            l,
            Target::Up,
            &lw.up,
            &tp.xn2,
            &dup,
            &mut dxn,
            true,
            grads,
            work,
        )?;
        drop((dgate, dup));
        rms_norm_backward(&tp.x2, &lw.ffn_norm, c.rms_eps, &dxn, dx, true);
        // Attention block: x2 = x + o(attention(rope(q(xn1)), rope(k(xn1)), v(xn1))).
        let mut datt = z(qd);
        self.linear_backward(
            l,
            Target::O,
            &lw.wo,
            &tp.att,
            dx,
            &mut datt,
            false,
            grads,
            work,
        )?;
        let (mut dq, mut dk, mut dv) = (z(qd), z(kvd), z(kvd));
        attention_backward(
            c, &tp.q, &tp.k, &tp.v, &tp.probs, &datt, &mut dq, &mut dk, &mut dv,
        );
        drop(datt);
        let (cos, sin) = self.rope_tables(n);
        for t in 0..n {
            let (cs, sn) = (&cos[t * hd / 2..][..hd / 2], &sin[t * hd / 2..][..hd / 2]);
            rope_backward(&mut dq[t * qd..][..qd], hd, c.rope_style, cs, sn);
            rope_backward(&mut dk[t * kvd..][..kvd], hd, c.rope_style, cs, sn);
        }
        if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
            let (mut dq2, mut dk2) = (z(qd), z(kvd));
            rms_norm_backward(&tp.q_raw, qn, c.rms_eps, &dq, &mut dq2, false);
            rms_norm_backward(&tp.k_raw, kn, c.rms_eps, &dk, &mut dk2, false);
            dq = dq2;
            dk = dk2;
        }
        self.linear_backward(
            l,
            Target::Q,
            &lw.wq,
            &tp.xn1,
            &dq,
            &mut dxn,
            false,
            grads,
            work,
        )?;
        self.linear_backward(
            l,
            Target::K,
            &lw.wk,
            &tp.xn1,
            &dk,
            &mut dxn,
            true,
            grads,
            work,
        )?;
        self.linear_backward(
            l,
            Target::V,
            &lw.wv,
            &tp.xn1,
            &dv,
            &mut dxn,
            true,
            grads,
            work,
        )?;
        rms_norm_backward(&tp.x, &lw.attn_norm, c.rms_eps, &dxn, dx, true);
        Ok(())
    }

    /// The adapter input: `x`, or `x` with this micro-batch's dropout mask applied.
    fn adapter_input<'x>(&self, l: usize, t: Target, x: &'x [f32]) -> std::borrow::Cow<'x, [f32]> {
        let p = self.lora.config.dropout;
        match self.dropout_seed {
            Some(seed) if p > 0.0 => {
                let keep = 1.0 / (1.0 - p);
                std::borrow::Cow::Owned(
                    x.iter()
                        .enumerate()
                        .map(|(i, &v)| {
                            if dropout_keeps(seed, l, t, i, p) {
                                v * keep
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                )
            }
            _ => std::borrow::Cow::Borrowed(x),
        }
    }

    /// `y = W_eff x` for the `n` rows of `x`, with the adapter of `(l, t)` unmerged or merged.
    fn linear(
        &self,
        l: usize,
        t: Target,
        w: &QMatrix,
        x: &[f32],
        y: &mut [f32],
        work: &mut Work,
    ) -> Result<()> {
        let n = x.len() / w.cols;
        let ad = self.lora.adapter(l, t);
        let s = self.lora.scale();
        match (ad, self.merged) {
            (Some(ad), Some(m)) => m.effective(l, t, w, ad, s, &mut work.w)?,
            _ => dense::dequantize(w, &mut work.w)?,
        }
        matmul_nt(x, &work.w, y, n, w.cols, w.rows, false);
        if let (Some(ad), None) = (ad, self.merged) {
            let xd = self.adapter_input(l, t, x);
            let mut u = vec![0.0f32; n * ad.rank];
            ad.down(&xd, n, &mut u);
            ad.up_add(&u, n, s, y);
        }
        Ok(())
    }

    /// Backward of [`Self::linear`]: `dx (+)= dyᵀ-product`, adapter gradients into `grads`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: usize,
        t: Target,
        w: &QMatrix,
        x: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        acc: bool,
        grads: &mut Lora,
        work: &mut Work,
    ) -> Result<()> {
        let (rows, cols) = (w.rows, w.cols);
        let n = x.len() / cols;
        if let Some(obs) = work.observer.as_mut() {
            obs(l, t, dy);
        }
        let ad = self.lora.adapter(l, t);
        let s = self.lora.scale();
        match (ad, self.merged) {
            (Some(ad), Some(m)) => {
                m.effective(l, t, w, ad, s, &mut work.w)?;
                matmul_nn_scaled(dy, &work.w, dx, n, rows, cols, 1.0, acc);
                // G = dyᵀ x is dL/dW_eff; through f it becomes dL/dV with V = W + s·B·A.
                work.g.resize(rows * cols, 0.0);
                matmul_tn_scaled(dy, x, &mut work.g, rows, n, cols, 1.0, false);
                m.backward(l, t, w, ad, s, &mut work.g)?;
                let ga = grad_of(grads, l, t)?;
                // dB = s·G·Aᵀ, dA = s·Bᵀ·G.
                matmul_nt_scaled(&work.g, &ad.a, &mut ga.b, rows, cols, ad.rank, s, true);
                matmul_tn_scaled(&ad.b, &work.g, &mut ga.a, ad.rank, rows, cols, s, true);
            }
            _ => {
                dense::dequantize(w, &mut work.w)?;
                matmul_nn_scaled(dy, &work.w, dx, n, rows, cols, 1.0, acc);
                if let Some(ad) = ad {
                    let xd = self.adapter_input(l, t, x);
                    let r = ad.rank;
                    let mut u = vec![0.0f32; n * r];
                    ad.down(&xd, n, &mut u);
                    let ga = grad_of(grads, l, t)?;
                    // y += s·B·u: dB = s·dyᵀ·u, du = s·dy·B, dA = duᵀ·xd, dxd = du·A.
                    matmul_tn_scaled(dy, &u, &mut ga.b, rows, n, r, s, true);
                    let mut du = vec![0.0f32; n * r];
                    matmul_nn_scaled(dy, &ad.b, &mut du, n, rows, r, s, false);
                    matmul_tn_scaled(&du, &xd, &mut ga.a, r, n, cols, 1.0, true);
                    let mut dxd = vec![0.0f32; n * cols];
                    matmul_nn_scaled(&du, &ad.a, &mut dxd, n, r, cols, 1.0, false);
                    let p = self.lora.config.dropout;
                    match self.dropout_seed {
                        Some(seed) if p > 0.0 => {
                            let keep = 1.0 / (1.0 - p);
                            for (i, (d, g)) in dx.iter_mut().zip(&dxd).enumerate() {
                                if dropout_keeps(seed, l, t, i, p) {
                                    *d += g * keep;
                                }
                            }
                        }
                        _ => {
                            for (d, g) in dx.iter_mut().zip(&dxd) {
                                *d += g;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The output head and the loss: `Σ_t weight[t] · (−log p(target[t] | x[t]))` over the final
    /// hidden state `x` (n × n_embd). Positions of weight 0 are skipped entirely. When `dx` is
    /// given it receives the gradient of that loss with respect to `x`.
    pub fn head_loss(
        &self,
        x: &[f32],
        targets: &[u32],
        weight: &[f32],
        dx: Option<&mut [f32]>,
    ) -> Result<f64> {
        self.head_loss_tiled(x, targets, weight, dx, HEAD_TILE)
    }

    /// [`Self::head_loss`] with the head taken `tile` rows at a time (the result does not depend
    /// on it beyond rounding; a test checks the running log-sum-exp across tiles with small ones).
    pub fn head_loss_tiled(
        &self,
        x: &[f32],
        targets: &[u32],
        weight: &[f32],
        dx: Option<&mut [f32]>,
        tile: usize,
    ) -> Result<f64> {
        if tile == 0 {
            return Err(Error::Invalid(
                "the head's tile needs at least one row".into(),
            ));
        }
        let c = self.config();
        let w = &self.model.weights;
        let (d, nv) = (c.n_embd, c.n_vocab);
        let n = x.len() / d;
        if targets.len() != n || weight.len() != n {
            return Err(Error::Invalid(format!(
                "{n} positions but {} targets and {} weights",
                targets.len(),
                weight.len()
            )));
        }
        if let Some(&t) = targets.iter().find(|&&t| t as usize >= nv) {
            return Err(Error::Invalid(format!(
                "target token {t} is outside the vocabulary of {nv}"
            )));
        }
        let rows: Vec<usize> = (0..n).filter(|&t| weight[t] != 0.0).collect();
        let m = rows.len();
        let mut xs = vec![0.0f32; m * d];
        for (i, &t) in rows.iter().enumerate() {
            xs[i * d..(i + 1) * d].copy_from_slice(&x[t * d..(t + 1) * d]);
        }
        let mut xn = vec![0.0f32; m * d];
        ops::rms_norm(&xs, &w.output_norm, c.rms_eps, &mut xn);
        // The logits are never held whole (m × n_vocab: 25 MB for 128 positions of a 49152-word
        // vocabulary, the largest buffer of a training step): they are made one tile of the head
        // at a time, twice. The first pass keeps each row's running max and sum of exponentials
        // (the log-sum-exp, online) and its target's logit; the second remakes each tile's
        // logits, turns them into dlogits = weight · (softmax − onehot) and accumulates their
        // product with the tile into dxn.
        let mut tile_w = Vec::new();
        let mut tile_y = Vec::new();
        let head_tile =
            |v0: usize, tile_w: &mut Vec<f32>, tile_y: &mut Vec<f32>| -> Result<usize> {
                let tn = (v0 + tile).min(nv) - v0;
                tile_w.resize(tn * d, 0.0);
                dense::dequantize_rows(&w.output, v0, v0 + tn, tile_w)?;
                tile_y.resize(m * tn, 0.0);
                matmul_nt(&xn, tile_w, tile_y, m, d, tn, false);
                Ok(tn)
            };
        let mut max = vec![f32::NEG_INFINITY; m];
        let mut sum = vec![0.0f64; m];
        let mut target_logit = vec![0.0f32; m];
        for v0 in (0..nv).step_by(tile) {
            let tn = head_tile(v0, &mut tile_w, &mut tile_y)?;
            for (i, &t) in rows.iter().enumerate() {
                let row = &tile_y[i * tn..(i + 1) * tn];
                let tile_max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                if tile_max > max[i] {
                    sum[i] *= ((max[i] - tile_max) as f64).exp();
                    max[i] = tile_max;
                }
                sum[i] += row
                    .iter()
                    .map(|&v| ((v - max[i]) as f64).exp())
                    .sum::<f64>();
                let k = targets[t] as usize;
                if (v0..v0 + tn).contains(&k) {
                    target_logit[i] = row[k - v0];
                }
            }
        }
        let lse: Vec<f64> = (0..m).map(|i| max[i] as f64 + sum[i].ln()).collect();
        let mut loss = 0.0f64;
        for (i, &t) in rows.iter().enumerate() {
            loss += weight[t] as f64 * (lse[i] - target_logit[i] as f64);
        }
        let Some(dx) = dx else {
            return Ok(loss);
        };
        let mut dxn = vec![0.0f32; m * d];
        for v0 in (0..nv).step_by(tile) {
            let tn = head_tile(v0, &mut tile_w, &mut tile_y)?;
            for (i, &t) in rows.iter().enumerate() {
                let row = &mut tile_y[i * tn..(i + 1) * tn];
                for v in row.iter_mut() {
                    *v = (weight[t] as f64 * ((*v as f64 - lse[i]).exp())) as f32;
                }
                let k = targets[t] as usize;
                if (v0..v0 + tn).contains(&k) {
                    row[k - v0] -= weight[t];
                }
            }
            matmul_nn_scaled(&tile_y, &tile_w, &mut dxn, m, tn, d, 1.0, true);
        }
        let mut dxs = vec![0.0f32; m * d];
        rms_norm_backward(&xs, &w.output_norm, c.rms_eps, &dxn, &mut dxs, false);
        dx.fill(0.0);
        for (i, &t) in rows.iter().enumerate() {
            dx[t * d..(t + 1) * d].copy_from_slice(&dxs[i * d..(i + 1) * d]);
        }
        Ok(loss)
    }
}

/// Rows of the output head dequantized at a time: its f32 copy (n_embd floats a row) and the
/// logits of a tile (one row per position) are the head's buffers during training.
pub const HEAD_TILE: usize = 2048;

fn grad_of(grads: &mut Lora, l: usize, t: Target) -> Result<&mut Adapter> {
    grads.layers[l][t as usize]
        .as_mut()
        .ok_or_else(|| Error::Invalid(format!("no gradient slot for layer {l} {t:?}")))
}

/// Whether dropout keeps element `i` of the adapter input of `(l, t)`: a hash of all four, so the
/// mask needs no stored state and recomputation draws the same one.
fn dropout_keeps(seed: u64, l: usize, t: Target, i: usize, p: f32) -> bool {
    let mut z = seed
        ^ (l as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ ((t as u64) << 56)
        ^ (i as u64).wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    ((z >> 40) as f32 / (1u64 << 24) as f32) >= p
}

/// Backward of [`ops::rms_norm`] on rows of `w.len()`: `dx (+)= r·w⊙dy − x·r³/n·Σ x⊙w⊙dy`.
pub fn rms_norm_backward(x: &[f32], w: &[f32], eps: f32, dy: &[f32], dx: &mut [f32], acc: bool) {
    let n = w.len();
    for ((xr, dyr), dxr) in x
        .chunks_exact(n)
        .zip(dy.chunks_exact(n))
        .zip(dx.chunks_exact_mut(n))
    {
        let ss: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum();
        let r = 1.0 / (ss / n as f64 + eps as f64).sqrt();
        let dot: f64 = xr
            .iter()
            .zip(w)
            .zip(dyr)
            .map(|((&xi, &wi), &gi)| xi as f64 * wi as f64 * gi as f64)
            .sum();
        let k = r * r * r * dot / n as f64;
        for (((o, &xi), &wi), &gi) in dxr.iter_mut().zip(xr).zip(w).zip(dyr) {
            let g = (r * wi as f64 * gi as f64 - xi as f64 * k) as f32;
            if acc {
                *o += g
            } else {
                *o = g
            }
        }
    }
}

/// Backward of [`ops::rope`]: the rotation is orthogonal, so its gradient is the inverse rotation.
pub fn rope_backward(
    dx: &mut [f32],
    head_dim: usize,
    style: super::RopeStyle,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    for h in dx.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = match style {
                super::RopeStyle::Normal => (2 * i, 2 * i + 1),
                super::RopeStyle::Neox => (i, i + half),
            };
            let (g0, g1) = (h[a], h[b]);
            h[a] = g0 * cos[i] + g1 * sin[i];
            h[b] = -g0 * sin[i] + g1 * cos[i];
        }
    }
}

/// Backward of `h = silu(g)·u`.
pub fn swiglu_backward(g: &[f32], u: &[f32], dh: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for i in 0..g.len() {
        let sig = 1.0 / (1.0 + (-g[i]).exp());
        let silu = g[i] * sig;
        du[i] = dh[i] * silu;
        dg[i] = dh[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
    }
}

/// Causal grouped-query attention over positions 0..n: `probs` (n_head × n × n) receives the
/// softmax rows, `out` (n × q_dim) the weighted values. One task per head.
pub fn attention_forward(
    c: &Config,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &mut [f32],
    out: &mut [f32],
) {
    let (hd, nh, qd, kvd) = (c.head_dim, c.n_head, c.q_dim(), c.kv_dim());
    let group = nh / c.n_head_kv;
    let n = q.len() / qd;
    let scale = 1.0 / (hd as f32).sqrt();
    let pp = crate::parallel::DisjointMut::new(probs);
    let op = crate::parallel::DisjointMut::new(out);
    crate::parallel::for_each(nh, &|h| {
        let kvo = (h / group) * hd;
        // SAFETY: head h writes only its own n × n block of probs and its own columns of out.
        let p = unsafe { std::slice::from_raw_parts_mut(pp.ptr().add(h * n * n), n * n) };
        for t in 0..n {
            let qt = &q[t * qd + h * hd..][..hd];
            let row = &mut p[t * n..t * n + t + 1];
            for (j, s) in row.iter_mut().enumerate() {
                *s = crate::quant::matmul::dot_f32(qt, &k[j * kvd + kvo..][..hd]) * scale;
            }
            ops::softmax(row);
            let mut o = vec![0.0f32; hd];
            for (j, &pj) in row.iter().enumerate() {
                for (oi, &vi) in o.iter_mut().zip(&v[j * kvd + kvo..][..hd]) {
                    *oi += pj * vi;
                }
            }
            // SAFETY: as above.
            let dst = unsafe { std::slice::from_raw_parts_mut(op.ptr().add(t * qd + h * hd), hd) };
            dst.copy_from_slice(&o);
        }
    });
}

/// Backward of [`attention_forward`]; one task per KV head (its query heads write its dk, dv).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    c: &Config,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (hd, nh, qd, kvd) = (c.head_dim, c.n_head, c.q_dim(), c.kv_dim());
    let group = nh / c.n_head_kv;
    let n = q.len() / qd;
    let scale = 1.0 / (hd as f32).sqrt();
    let (dqp, dkp, dvp) = (
        crate::parallel::DisjointMut::new(dq),
        crate::parallel::DisjointMut::new(dk),
        crate::parallel::DisjointMut::new(dv),
    );
    crate::parallel::for_each(c.n_head_kv, &|g| {
        let kvo = g * hd;
        // SAFETY: KV head g writes only its own columns of dk and dv, and the columns of dq of
        // its own query heads; each slice below lies inside its buffer.
        let col = |p: crate::parallel::DisjointMut, stride: usize, t: usize, off: usize| unsafe {
            std::slice::from_raw_parts_mut(p.ptr().add(t * stride + off), hd)
        };
        let mut ds = vec![0.0f32; n];
        for h in g * group..(g + 1) * group {
            for t in 0..n {
                let p = &probs[h * n * n + t * n..][..t + 1];
                let dot_ = &dout[t * qd + h * hd..][..hd];
                // dp_j = do·v_j; ds_j = p_j (dp_j − Σ p·dp).
                let mut sum = 0.0f32;
                for j in 0..=t {
                    let dp = crate::quant::matmul::dot_f32(dot_, &v[j * kvd + kvo..][..hd]);
                    ds[j] = dp;
                    sum += p[j] * dp;
                }
                let dqt = col(dqp, qd, t, h * hd);
                dqt.fill(0.0);
                let qt = &q[t * qd + h * hd..][..hd];
                for j in 0..=t {
                    let dsj = p[j] * (ds[j] - sum) * scale;
                    let kj = &k[j * kvd + kvo..][..hd];
                    for i in 0..hd {
                        dqt[i] += dsj * kj[i];
                    }
                    let dkj = col(dkp, kvd, j, kvo);
                    for i in 0..hd {
                        dkj[i] += dsj * qt[i];
                    }
                    let dvj = col(dvp, kvd, j, kvo);
                    for i in 0..hd {
                        dvj[i] += p[j] * dot_[i];
                    }
                }
            }
        }
    });
}
