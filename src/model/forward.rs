//! The forward pass over preallocated buffers: a batch of tokens at consecutive positions goes
//! through every layer, appending to the KV cache; logits come out for the positions asked for.

use std::ops::Range;
use std::sync::Arc;

use super::config::Config;
use super::kv_cache::{HeadKv, KvCache};
use super::lora::Target;
use super::ops;
use super::sparse_ffn::FfnMask;
use super::Model;
use crate::error::{Error, Result};
use crate::quant::activation::Q8Acts;
use crate::quant::matmul::{matmul, matmul_many, Input, QMatrix};

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    Last,
    All,
}

/// Tokens per internal micro-batch: bounds the scratch buffers.
pub const MAX_UBATCH: usize = 512;

/// Per-sequence state: the KV cache, the next position, and scratch buffers sized once.
pub struct State {
    pub kv: KvCache,
    /// Number of positions already in the cache.
    pub pos: usize,
    s: Scratch,
    /// Logits of the last forward call, `[n × n_vocab]`.
    pub logits: Vec<f32>,
    /// Sees the input of every matrix product (calibration); `None` in normal runs.
    pub observer: Option<Arc<dyn Observer>>,
    /// Sparse FFN execution simulated on the dense path (calibration measures what thresholds
    /// cost with it); `None` in normal runs.
    pub ffn_mask: Option<Arc<FfnMask>>,
}

/// Receives the f32 input rows of every matrix product of a forward pass, before quantization.
pub trait Observer: Send + Sync {
    /// `x` holds `n` rows of `w.cols` values.
    fn observe(&self, w: &QMatrix, x: &[f32], n: usize);
}

/// Buffers for one micro-batch, allocated once per state.
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    q8: Q8Acts,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Scratch {
    fn new(c: &Config, n: usize) -> Scratch {
        let z = |m: usize| vec![0.0f32; n * m];
        Scratch {
            x: z(c.n_embd),
            xn: z(c.n_embd.max(c.q_dim())),
            q: z(c.q_dim()),
            k: z(c.kv_dim()),
            v: z(c.kv_dim()),
            att: z(c.q_dim()),
            o: z(c.n_embd),
            gate: z(c.n_ff),
            up: z(c.n_ff),
            q8: Q8Acts::default(),
            cos: z(c.head_dim / 2),
            sin: z(c.head_dim / 2),
        }
    }
}

impl Scratch {
    fn n_bytes(&self) -> usize {
        let f = [
            &self.x, &self.xn, &self.q, &self.k, &self.v, &self.att, &self.o, &self.gate, &self.up,
            &self.cos, &self.sin,
        ];
        f.iter().map(|v| v.len() * 4).sum()
    }
}

/// Bytes of the scratch buffers a state for `n_ctx` positions holds (for memory estimates), plus
/// the 8-bit activations at their largest (about 1.25 bytes per value of the widest input).
pub fn scratch_bytes(c: &Config, n_ctx: usize) -> usize {
    let n = MAX_UBATCH.min(n_ctx.max(1));
    Scratch::new(c, n).n_bytes() + n * c.n_ff.max(c.q_dim()) * 5 / 4
}

impl State {
    /// A fresh state that holds up to `n_ctx` positions.
    pub fn new(model: &Model, n_ctx: usize) -> Result<State> {
        Self::for_layers(model, n_ctx, 0..model.config.n_layer)
    }

    /// A state for a pipeline stage that runs only `layers` (and keeps only their KV cache).
    pub fn for_layers(model: &Model, n_ctx: usize, layers: Range<usize>) -> Result<State> {
        if n_ctx == 0 {
            return Err(Error::Invalid("context size must be at least 1".into()));
        }
        Ok(State {
            kv: KvCache::for_layers(&model.config, n_ctx, layers, model.cache_type())?,
            pos: 0,
            s: Scratch::new(&model.config, MAX_UBATCH.min(n_ctx)),
            logits: Vec::new(),
            observer: None,
            ffn_mask: None,
        })
    }

    /// Forgets all positions (the buffers stay allocated).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

/// The input of a forward pass: token ids (embedded first), or the hidden states (`n × n_embd`)
/// that the previous pipeline stage produced.
#[derive(Debug, Clone, Copy)]
pub enum Batch<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
}

impl Batch<'_> {
    fn len(&self, n_embd: usize) -> usize {
        match self {
            Batch::Tokens(t) => t.len(),
            Batch::Hidden(h) => h.len() / n_embd,
        }
    }

    fn slice(&self, rows: Range<usize>, n_embd: usize) -> Self {
        match self {
            Batch::Tokens(t) => Batch::Tokens(&t[rows]),
            Batch::Hidden(h) => Batch::Hidden(&h[rows.start * n_embd..rows.end * n_embd]),
        }
    }
}

impl Model {
    /// Runs `tokens` at positions `state.pos..`, appends them to the cache, and leaves the
    /// requested logits in `state.logits` (`Last`: one row; `All`: one row per token).
    pub fn forward(&self, state: &mut State, tokens: &[u32], want: Logits) -> Result<()> {
        if state.kv.layers() != (0..self.config.n_layer) {
            return Err(Error::Invalid(format!(
                "this state holds layers {:?} of {}: run it with forward_stage",
                state.kv.layers(),
                self.config.n_layer
            )));
        }
        self.run(state, Batch::Tokens(tokens), want, None)
    }

    /// Runs one pipeline stage: the layers of `state` on `batch` at positions `state.pos..`. A
    /// stage that ends with the model's last layer also applies the output head and leaves the
    /// requested logits in `state.logits`; any other stage writes the hidden states of every
    /// position to `hidden` (`n × n_embd`) for the next stage. Token input is embedded first.
    pub fn forward_stage(
        &self,
        state: &mut State,
        batch: Batch<'_>,
        want: Logits,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        let last = state.kv.layers().end == self.config.n_layer;
        self.run(state, batch, want, (!last).then_some(hidden))
    }

    /// Runs the layers of `state` on `batch` at positions `state.pos..` and writes the hidden
    /// states they leave (`n × n_embd`) to `hidden`, without the output head even on the last
    /// stage: scoring applies [`Model::output_head`] to the rows it needs, a few at a time.
    pub fn forward_hidden(
        &self,
        state: &mut State,
        batch: Batch<'_>,
        hidden: &mut Vec<f32>,
    ) -> Result<()> {
        self.run(state, batch, Logits::None, Some(hidden))
    }

    /// The output head (final norm, output matrix) on hidden rows `x` that the model's last layer
    /// left (`m × n_embd`): `m × n_vocab` logits into `out`, computed as the forward pass computes
    /// them, in pieces of the state's micro-batch size (its scratch buffers).
    pub fn output_head(&self, state: &mut State, x: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let (d, v) = (self.config.n_embd, self.config.n_vocab);
        if !x.len().is_multiple_of(d) {
            return Err(Error::Invalid(format!(
                "{} hidden values are not whole rows of {d}",
                x.len()
            )));
        }
        let m = x.len() / d;
        out.resize(m * v, 0.0);
        let ub = state.s.x.len() / d;
        let obs = state.observer.clone();
        for r0 in (0..m).step_by(ub.max(1)) {
            let r1 = (r0 + ub).min(m);
            self.head_rows(
                &mut state.s,
                obs.as_deref(),
                &x[r0 * d..r1 * d],
                &mut out[r0 * v..r1 * v],
            );
        }
        Ok(())
    }

    /// Final norm and output matrix on the rows `x` (at most the scratch's micro-batch size).
    fn head_rows(&self, s: &mut Scratch, obs: Option<&dyn Observer>, x: &[f32], out: &mut [f32]) {
        let c = &self.config;
        let w = &self.weights;
        let m = x.len() / c.n_embd;
        let xn = &mut s.xn[..m * c.n_embd];
        ops::rms_norm(x, &w.output_norm, c.rms_eps, xn);
        matmul(
            &w.output,
            &input_for(self.exact_activations, obs, &mut s.q8, xn, m, &[&w.output]),
            out,
        );
    }

    /// The one forward loop behind [`Model::forward`], [`Model::forward_stage`] and
    /// [`Model::forward_hidden`] (and the checks of their input): hidden states
    /// go to `hidden` when given, else through the output head.
    fn run(
        &self,
        state: &mut State,
        batch: Batch<'_>,
        want: Logits,
        mut hidden: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let c = &self.config;
        if let Batch::Hidden(h) = batch {
            if !h.len().is_multiple_of(c.n_embd) {
                return Err(Error::Invalid(format!(
                    "{} hidden values are not whole rows of {}",
                    h.len(),
                    c.n_embd
                )));
            }
        }
        let n = batch.len(c.n_embd);
        if state.pos + n > state.kv.capacity {
            return Err(Error::Invalid(format!(
                "context full: {} positions + {} tokens exceed the context of {}",
                state.pos, n, state.kv.capacity
            )));
        }
        if let Batch::Tokens(tokens) = batch {
            if state.kv.layers().start != 0 {
                return Err(Error::Invalid(format!(
                    "token ids go to the stage that starts at layer 0, not {}",
                    state.kv.layers().start
                )));
            }
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
                return Err(Error::Invalid(format!(
                    "token id {t} is outside the vocabulary of {}",
                    c.n_vocab
                )));
            }
        }
        let want = if hidden.is_some() { Logits::None } else { want };
        let n_out = match want {
            Logits::None => 0,
            Logits::Last => usize::from(n > 0),
            Logits::All => n,
        };
        state.logits.resize(n_out * c.n_vocab, 0.0);
        if let Some(h) = hidden.as_deref_mut() {
            h.resize(n * c.n_embd, 0.0);
        }
        let ub = state.s.x.len() / c.n_embd;
        let mut done = 0;
        while done < n {
            let len = ub.min(n - done);
            let last_chunk = done + len == n;
            let rows = match want {
                Logits::None => 0..0,
                Logits::Last if last_chunk => len - 1..len,
                Logits::Last => 0..0,
                Logits::All => 0..len,
            };
            let out_off = match want {
                Logits::All => done * c.n_vocab,
                _ => 0,
            };
            self.forward_ubatch(
                state,
                batch.slice(done..done + len, c.n_embd),
                rows,
                out_off,
            )?;
            if let Some(h) = hidden.as_deref_mut() {
                let d = c.n_embd;
                h[done * d..(done + len) * d].copy_from_slice(&state.s.x[..len * d]);
            }
            done += len;
        }
        Ok(())
    }

    /// One micro-batch through the state's layers; logits for `rows` of it go to
    /// `state.logits[out_off..]`.
    fn forward_ubatch(
        &self,
        st: &mut State,
        batch: Batch<'_>,
        rows: Range<usize>,
        out_off: usize,
    ) -> Result<()> {
        let c = &self.config;
        let w = &self.weights;
        let (d, hd) = (c.n_embd, c.head_dim);
        let n = batch.len(d);
        let p0 = st.pos;
        let exact = self.exact_activations;
        let obs = st.observer.clone();
        let obs = obs.as_deref();
        let mask = st.ffn_mask.clone();
        let s = &mut st.s;

        if let Batch::Hidden(h) = batch {
            s.x[..n * d].copy_from_slice(h);
        }
        for t in 0..n {
            if let Batch::Tokens(tokens) = batch {
                w.token_embd
                    .dequantize_row(tokens[t] as usize, &mut s.x[t * d..(t + 1) * d])?;
            }
            ops::rope_table(
                p0 + t,
                hd,
                c.rope_theta,
                &mut s.cos[t * hd / 2..(t + 1) * hd / 2],
                &mut s.sin[t * hd / 2..(t + 1) * hd / 2],
            );
        }

        for l in st.kv.layers() {
            let lw = &w.layers[l];
            // Attention block.
            let xn = &mut s.xn[..n * d];
            ops::rms_norm(&s.x[..n * d], &lw.attn_norm, c.rms_eps, xn);
            let (q, k, v) = (
                &mut s.q[..n * c.q_dim()],
                &mut s.k[..n * c.kv_dim()],
                &mut s.v[..n * c.kv_dim()],
            );
            let input = input_for(exact, obs, &mut s.q8, xn, n, &[&lw.wq, &lw.wk, &lw.wv]);
            matmul_many(
                &mut [(&lw.wq, &mut *q), (&lw.wk, &mut *k), (&lw.wv, &mut *v)],
                &input,
            );
            if let Some(lora) = &self.lora {
                lora.add_to(l, Target::Q, xn, n, q);
                lora.add_to(l, Target::K, xn, n, k);
                lora.add_to(l, Target::V, xn, n, v);
            }
            if let (Some(qn), Some(kn)) = (&lw.q_norm, &lw.k_norm) {
                ops::rms_norm_inplace(q, qn, c.rms_eps);
                ops::rms_norm_inplace(k, kn, c.rms_eps);
            }
            for t in 0..n {
                let cos = &s.cos[t * hd / 2..(t + 1) * hd / 2];
                let sin = &s.sin[t * hd / 2..(t + 1) * hd / 2];
                ops::rope(
                    &mut q[t * c.q_dim()..][..c.q_dim()],
                    hd,
                    c.rope_style,
                    cos,
                    sin,
                );
                ops::rope(
                    &mut k[t * c.kv_dim()..][..c.kv_dim()],
                    hd,
                    c.rope_style,
                    cos,
                    sin,
                );
            }
            st.kv.store(l, p0, k, v);
            let att = &mut s.att[..n * c.q_dim()];
            attention(c, &st.kv, l, p0, q, att);
            let o = &mut s.o[..n * d];
            matmul(
                &lw.wo,
                &input_for(exact, obs, &mut s.q8, att, n, &[&lw.wo]),
                o,
            );
            if let Some(lora) = &self.lora {
                lora.add_to(l, Target::O, att, n, o);
            }
            add_assign(&mut s.x[..n * d], o);

            // Feed-forward block.
            let xn = &mut s.xn[..n * d];
            ops::rms_norm(&s.x[..n * d], &lw.ffn_norm, c.rms_eps, xn);
            if let Some(sp) = self.sparse.as_ref().filter(|sp| sp.applies(n)) {
                sp.forward(l, xn, o);
            } else {
                if let Some(m) = &mask {
                    m.mask_inputs(l, xn);
                }
                let (gate, up) = (&mut s.gate[..n * c.n_ff], &mut s.up[..n * c.n_ff]);
                let input = input_for(exact, obs, &mut s.q8, xn, n, &[&lw.gate, &lw.up]);
                matmul_many(&mut [(&lw.gate, &mut *gate), (&lw.up, &mut *up)], &input);
                if let Some(lora) = &self.lora {
                    lora.add_to(l, Target::Gate, xn, n, gate);
                    lora.add_to(l, Target::Up, xn, n, up);
                }
                ops::swiglu(gate, up);
                if let Some(m) = &mask {
                    m.mask_neurons(l, gate);
                }
                matmul(
                    &lw.down,
                    &input_for(exact, obs, &mut s.q8, gate, n, &[&lw.down]),
                    o,
                );
                if let Some(lora) = &self.lora {
                    lora.add_to(l, Target::Down, gate, n, o);
                }
            }
            add_assign(&mut s.x[..n * d], o);
        }
        st.pos += n;

        if !rows.is_empty() {
            let m = rows.len();
            // The rows move out of the scratch for the head, which uses the scratch itself.
            let x = std::mem::take(&mut s.x);
            let out = &mut st.logits[out_off..out_off + m * c.n_vocab];
            self.head_rows(s, obs, &x[rows.start * d..rows.end * d], out);
            s.x = x;
        }
        Ok(())
    }
}

/// The input of the next products: activations quantized to 8 bits when one of the matrices
/// `ws` computes on them (unless the model runs with exact activations).
fn input_for<'a>(
    exact: bool,
    obs: Option<&dyn Observer>,
    q8: &'a mut Q8Acts,
    x: &'a [f32],
    n: usize,
    ws: &[&QMatrix],
) -> Input<'a> {
    if let Some(o) = obs {
        for w in ws {
            o.observe(w, x, n);
        }
    }
    let quantize = !exact && ws.iter().any(|w| w.wants_q8());
    if quantize {
        q8.quantize(x, n, x.len() / n);
    }
    Input {
        x,
        q8: quantize.then_some(&*q8),
        n,
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Causal multi-head attention with grouped KV heads for tokens at positions `p0..p0+n`, reading
/// keys and values from the cache; one parallel task per (token, head).
fn attention(c: &Config, kv: &KvCache, layer: usize, p0: usize, q: &[f32], out: &mut [f32]) {
    let (hd, nh) = (c.head_dim, c.n_head);
    let group = c.n_head / c.n_head_kv;
    let n = q.len() / c.q_dim();
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = crate::parallel::DisjointMut::new(out);
    let isa = crate::quant::kernels::isa();
    crate::parallel::for_each(n * nh, &|i| {
        // SAFETY: task i writes only its own head_dim-sized slice of `out`.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add(i * hd), hd) };
        let (t, h) = (i / nh, i % nh);
        let q = &q[t * c.q_dim() + h * hd..][..hd];
        SCORES.with_borrow_mut(|sc| match kv.head(layer, h / group, p0 + t + 1) {
            HeadKv::F16 { k, v } => Head::new(q, k, v, scale).attend_with(isa, sc, o),
            HeadKv::F32 { k, v } => Head::new(q, k, v, scale).attend_with(isa, sc, o),
        });
    });
}

/// A value type the KV cache stores: f32, or f16 (converted as it is read).
trait KvValue: Copy {
    fn to_f32(self) -> f32;

    /// `Σ a[i] · b[i]`.
    fn dot(a: &[f32], b: &[Self]) -> f32;

    /// Eight values at `p` as f32.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `p` must be valid for reads of eight values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl KvValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        crate::quant::matmul::dot_f32(a, b)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
}

impl KvValue for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[inline(always)]
    fn dot(a: &[f32], b: &[half::f16]) -> f32 {
        a.iter().zip(b).map(|(&x, &y)| x * y.to_f32()).sum()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

/// One query head against the cached keys and values of its KV head (`len × head_dim` values
/// each, position after position).
struct Head<'a, T> {
    q: &'a [f32],
    keys: &'a [T],
    values: &'a [T],
    len: usize,
    scale: f32,
}

impl<'a, T: KvValue> Head<'a, T> {
    fn new(q: &'a [f32], keys: &'a [T], values: &'a [T], scale: f32) -> Self {
        let len = keys.len() / q.len().max(1);
        assert!(keys.len() == len * q.len() && values.len() == keys.len());
        Head {
            q,
            keys,
            values,
            len,
            scale,
        }
    }

    /// Writes the head's output to `o` with the best code for `isa`; `sc` holds the scores.
    #[inline(always)]
    fn attend_with(&self, isa: crate::quant::kernels::Isa, sc: &mut Vec<f32>, o: &mut [f32]) {
        match isa {
            // SAFETY: `isa` names only instruction sets the CPU has (AVX2 comes with FMA and
            // F16C in pare's detection).
            #[cfg(target_arch = "x86_64")]
            crate::quant::kernels::Isa::Avx512 | crate::quant::kernels::Isa::Avx2 => unsafe {
                self.attend_avx2(sc, o)
            },
            _ => self.attend(sc, o),
        }
    }

    /// The plain code: the scalar path, and the reference of [`Head::attend_avx2`].
    #[inline(always)]
    fn attend(&self, sc: &mut Vec<f32>, o: &mut [f32]) {
        let hd = self.q.len();
        sc.resize(self.len, 0.0);
        for (j, s) in sc.iter_mut().enumerate() {
            *s = T::dot(self.q, &self.keys[j * hd..][..hd]) * self.scale;
        }
        ops::softmax(sc);
        o.fill(0.0);
        for (j, &p) in sc.iter().enumerate() {
            for (oi, &vi) in o.iter_mut().zip(&self.values[j * hd..][..hd]) {
                *oi += p * vi.to_f32();
            }
        }
    }

    /// [`Head::attend`] in AVX2 registers for head sizes that are a multiple of 64 (others take
    /// the plain code): the scores of four keys at a time (the query chunk loaded once for the
    /// four, the four sums reduced together), and the output kept in 8 registers per 64
    /// dimensions across every value. The plain code, compiled for AVX2, reduced each key's dot
    /// product alone and loaded and stored the output once per value: decoding spent ~8% of its
    /// time here at 128 tokens of context. Sums in another order than the plain code (tested
    /// against it within a tolerance).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn attend_avx2(&self, sc: &mut Vec<f32>, o: &mut [f32]) {
        use std::arch::x86_64::*;
        let hd = self.q.len();
        if !hd.is_multiple_of(64) || o.len() != hd {
            return self.attend(sc, o);
        }
        let n = self.len;
        sc.resize(n, 0.0);
        let (q, kp, vp) = (self.q.as_ptr(), self.keys.as_ptr(), self.values.as_ptr());
        let scale = _mm_set1_ps(self.scale);
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [_mm256_setzero_ps(); 4];
            for c in (0..hd).step_by(8) {
                let qv = _mm256_loadu_ps(q.add(c));
                for (k, a) in acc.iter_mut().enumerate() {
                    let kv = T::load8(kp.add((j + k) * hd + c));
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
            // Lane k of each half: key k's partial sum; the halves added give the four scores.
            let s = _mm256_hadd_ps(
                _mm256_hadd_ps(acc[0], acc[1]),
                _mm256_hadd_ps(acc[2], acc[3]),
            );
            let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            _mm_storeu_ps(sc.as_mut_ptr().add(j), _mm_mul_ps(s, scale));
            j += 4;
        }
        for (t, s) in sc.iter_mut().enumerate().skip(j) {
            *s = T::dot(self.q, &self.keys[t * hd..][..hd]) * self.scale;
        }
        ops::softmax(sc);
        for c0 in (0..hd).step_by(64) {
            let mut acc = [_mm256_setzero_ps(); 8];
            for (t, &p) in sc.iter().enumerate() {
                let (p, v) = (_mm256_set1_ps(p), vp.add(t * hd + c0));
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(p, T::load8(v.add(8 * i)), *a);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * i), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 attention equals the plain code within float rounding, on f32 and f16 caches, for
    /// head sizes of one and two 64-wide slabs (and 48, which takes the plain code) and key
    /// counts around the four-key step.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn attention_avx2_equals_the_plain_code() {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            return;
        }
        let mut seed = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 20001) as f32 / 10000.0 - 1.0
        };
        fn check<T: KvValue>(q: &[f32], keys: &[T], values: &[T], what: &str) {
            let hd = q.len();
            let head = Head::new(q, keys, values, 1.0 / (hd as f32).sqrt());
            let (mut want, mut got) = (vec![0f32; hd], vec![7f32; hd]);
            let (mut s1, mut s2) = (Vec::new(), Vec::new());
            head.attend(&mut s1, &mut want);
            // SAFETY: the CPU has AVX2, FMA and F16C (checked by the caller).
            unsafe { head.attend_avx2(&mut s2, &mut got) };
            assert_eq!(s1.len(), head.len);
            for (a, b) in s1.iter().zip(&s2) {
                assert!((a - b).abs() < 1e-5, "{what}: weights {a} {b}");
            }
            for (a, b) in want.iter().zip(&got) {
                assert!((a - b).abs() < 1e-5, "{what}: output {a} {b}");
            }
        }
        for hd in [64usize, 128, 48] {
            for len in [1usize, 3, 4, 5, 8, 33, 130] {
                let keys: Vec<f32> = (0..len * hd).map(|_| 3.0 * next()).collect();
                let values: Vec<f32> = (0..len * hd).map(|_| next()).collect();
                let q: Vec<f32> = (0..hd).map(|_| next()).collect();
                check(&q, &keys, &values, &format!("f32 hd {hd} len {len}"));
                let h = |v: &[f32]| {
                    v.iter()
                        .map(|&x| half::f16::from_f32(x))
                        .collect::<Vec<_>>()
                };
                check(
                    &q,
                    &h(&keys),
                    &h(&values),
                    &format!("f16 hd {hd} len {len}"),
                );
            }
        }
    }
}
