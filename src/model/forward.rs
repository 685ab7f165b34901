//! The forward pass over preallocated buffers: a batch of tokens at consecutive positions goes
//! through every layer, appending to the KV cache; logits come out for the positions asked for.

use std::sync::Arc;

use super::config::Config;
use super::kv_cache::KvCache;
use super::lora::Target;
use super::ops;
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

impl State {
    /// A fresh state that holds up to `n_ctx` positions.
    pub fn new(model: &Model, n_ctx: usize) -> Result<State> {
        if n_ctx == 0 {
            return Err(Error::Invalid("context size must be at least 1".into()));
        }
        Ok(State {
            kv: KvCache::new(&model.config, n_ctx)?,
            pos: 0,
            s: Scratch::new(&model.config, MAX_UBATCH.min(n_ctx)),
            logits: Vec::new(),
            observer: None,
        })
    }

    /// Forgets all positions (the buffers stay allocated).
    pub fn reset(&mut self) {
        self.pos = 0;
    }
}

impl Model {
    /// Runs `tokens` at positions `state.pos..`, appends them to the cache, and leaves the
    /// requested logits in `state.logits` (`Last`: one row; `All`: one row per token).
    pub fn forward(&self, state: &mut State, tokens: &[u32], want: Logits) -> Result<()> {
        let c = &self.config;
        if state.pos + tokens.len() > state.kv.capacity {
            return Err(Error::Invalid(format!(
                "context full: {} positions + {} tokens exceed the context of {}",
                state.pos,
                tokens.len(),
                state.kv.capacity
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(Error::Invalid(format!(
                "token id {t} is outside the vocabulary of {}",
                c.n_vocab
            )));
        }
        let n_out = match want {
            Logits::None => 0,
            Logits::Last => usize::from(!tokens.is_empty()),
            Logits::All => tokens.len(),
        };
        state.logits.resize(n_out * c.n_vocab, 0.0);
        let ub = state.s.x.len() / c.n_embd;
        let mut done = 0;
        for chunk in tokens.chunks(ub) {
            let last_chunk = done + chunk.len() == tokens.len();
            let rows = match want {
                Logits::None => 0..0,
                Logits::Last if last_chunk => chunk.len() - 1..chunk.len(),
                Logits::Last => 0..0,
                Logits::All => 0..chunk.len(),
            };
            let out_off = match want {
                Logits::All => done * c.n_vocab,
                _ => 0,
            };
            self.forward_ubatch(state, chunk, rows, out_off)?;
            done += chunk.len();
        }
        Ok(())
    }

    /// One micro-batch through all layers; logits for `rows` of it go to `state.logits[out_off..]`.
    fn forward_ubatch(
        &self,
        st: &mut State,
        tokens: &[u32],
        rows: std::ops::Range<usize>,
        out_off: usize,
    ) -> Result<()> {
        let c = &self.config;
        let w = &self.weights;
        let n = tokens.len();
        let (d, hd) = (c.n_embd, c.head_dim);
        let p0 = st.pos;
        let exact = self.exact_activations;
        let obs = st.observer.clone();
        let obs = obs.as_deref();
        let s = &mut st.s;

        for (t, &tok) in tokens.iter().enumerate() {
            w.token_embd
                .dequantize_row(tok as usize, &mut s.x[t * d..(t + 1) * d])?;
            ops::rope_table(
                p0 + t,
                hd,
                c.rope_theta,
                &mut s.cos[t * hd / 2..(t + 1) * hd / 2],
                &mut s.sin[t * hd / 2..(t + 1) * hd / 2],
            );
        }

        for (l, lw) in w.layers.iter().enumerate() {
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
            let (gate, up) = (&mut s.gate[..n * c.n_ff], &mut s.up[..n * c.n_ff]);
            let input = input_for(exact, obs, &mut s.q8, xn, n, &[&lw.gate, &lw.up]);
            matmul_many(&mut [(&lw.gate, &mut *gate), (&lw.up, &mut *up)], &input);
            if let Some(lora) = &self.lora {
                lora.add_to(l, Target::Gate, xn, n, gate);
                lora.add_to(l, Target::Up, xn, n, up);
            }
            ops::swiglu(gate, up);
            matmul(
                &lw.down,
                &input_for(exact, obs, &mut s.q8, gate, n, &[&lw.down]),
                o,
            );
            if let Some(lora) = &self.lora {
                lora.add_to(l, Target::Down, gate, n, o);
            }
            add_assign(&mut s.x[..n * d], o);
        }
        st.pos += n;

        if !rows.is_empty() {
            let m = rows.len();
            let xn = &mut s.xn[..m * d];
            let x = &s.x[rows.start * d..rows.end * d];
            ops::rms_norm(x, &w.output_norm, c.rms_eps, xn);
            let out = &mut st.logits[out_off..out_off + m * c.n_vocab];
            matmul(
                &w.output,
                &input_for(exact, obs, &mut s.q8, xn, m, &[&w.output]),
                out,
            );
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
    let (hd, nh, kvd) = (c.head_dim, c.n_head, c.kv_dim());
    let group = c.n_head / c.n_head_kv;
    let n = q.len() / c.q_dim();
    let keys = kv.keys(layer, p0 + n);
    let values = kv.values(layer, p0 + n);
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = crate::parallel::DisjointMut::new(out);
    let isa = crate::quant::kernels::isa();
    crate::parallel::for_each(n * nh, &|i| {
        // SAFETY: task i writes only its own head_dim-sized slice of `out`.
        let o = unsafe { std::slice::from_raw_parts_mut(out_ptr.ptr().add(i * hd), hd) };
        let (t, h) = (i / nh, i % nh);
        let head = Head {
            q: &q[t * c.q_dim() + h * hd..][..hd],
            keys,
            values,
            stride: kvd,
            offset: (h / group) * hd,
            len: p0 + t + 1,
            scale,
        };
        SCORES.with_borrow_mut(|sc| match isa {
            // SAFETY: `isa` names only instruction sets the CPU has.
            #[cfg(target_arch = "x86_64")]
            crate::quant::kernels::Isa::Avx512 => unsafe { head.attend_avx512(sc, o) },
            #[cfg(target_arch = "x86_64")]
            crate::quant::kernels::Isa::Avx2 => unsafe { head.attend_avx2(sc, o) },
            _ => head.attend(sc, o),
        });
    });
}

/// One query head against the cached keys and values of its KV head.
struct Head<'a> {
    q: &'a [f32],
    keys: &'a [f32],
    values: &'a [f32],
    /// Floats between consecutive positions in `keys`/`values`, and this head's offset in them.
    stride: usize,
    offset: usize,
    len: usize,
    scale: f32,
}

impl Head<'_> {
    /// The plain code, compiled once per instruction set below. Rust never fuses a multiply and
    /// an add by itself, so every version computes bit-identical results, only with wider vectors.
    #[inline(always)]
    fn attend(&self, sc: &mut Vec<f32>, o: &mut [f32]) {
        let hd = self.q.len();
        sc.resize(self.len, 0.0);
        for (j, s) in sc.iter_mut().enumerate() {
            let kj = &self.keys[j * self.stride + self.offset..][..hd];
            *s = crate::quant::matmul::dot_f32(self.q, kj) * self.scale;
        }
        ops::softmax(sc);
        o.fill(0.0);
        for (j, &p) in sc.iter().enumerate() {
            let vj = &self.values[j * self.stride + self.offset..][..hd];
            for (oi, &vi) in o.iter_mut().zip(vj) {
                *oi += p * vi;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn attend_avx2(&self, sc: &mut Vec<f32>, o: &mut [f32]) {
        self.attend(sc, o)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn attend_avx512(&self, sc: &mut Vec<f32>, o: &mut [f32]) {
        self.attend(sc, o)
    }
}
