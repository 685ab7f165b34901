//! The transformer's element-wise and row-wise operations (RMSNorm, RoPE, SwiGLU, softmax), each a
//! plain function over slices so the forward pass (and its backward) read as a list of steps.

use super::config::RopeStyle;

/// `1 / sqrt(mean(x²) + eps)`, the sum taken in f64 as ggml does.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
    (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32
}

/// `out = x / sqrt(mean(x²) + eps) * w`, row by row (rows of `w.len()` values).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let scale = rms_scale(xr, eps);
        for ((o, &v), &wi) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * wi;
        }
    }
}

/// In-place RMSNorm of each `w.len()`-sized piece (Qwen3's per-head query/key norm).
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let scale = rms_scale(xr, eps);
        for (v, &wi) in xr.iter_mut().zip(w) {
            *v = *v * scale * wi;
        }
    }
}

/// Cosines and sines of RoPE angles for one position: `angle_i = pos * theta^(-2i/head_dim)`.
pub fn rope_table(pos: usize, head_dim: usize, theta: f32, cos: &mut [f32], sin: &mut [f32]) {
    let half = head_dim / 2;
    for i in 0..half {
        let freq = (theta as f64).powf(-2.0 * i as f64 / head_dim as f64);
        let a = pos as f64 * freq;
        cos[i] = a.cos() as f32;
        sin[i] = a.sin() as f32;
    }
}

/// Rotates every head (`head_dim` values each) of one token's vector in place.
pub fn rope(x: &mut [f32], head_dim: usize, style: RopeStyle, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for h in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = match style {
                RopeStyle::Normal => (2 * i, 2 * i + 1),
                RopeStyle::Neox => (i, i + half),
            };
            let (x0, x1) = (h[a], h[b]);
            h[a] = x0 * cos[i] - x1 * sin[i];
            h[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate = silu(gate) * up`, in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// In-place softmax.
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}
