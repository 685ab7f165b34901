//! The transformer's element-wise and row-wise operations (RMSNorm, RoPE, SwiGLU, softmax), each a
//! plain function over slices so the forward pass (and its backward) read as a list of steps.

use super::config::RopeStyle;

/// `1 / sqrt(mean(x²) + eps)`, the sum taken in f64 as ggml does, in eight independent partial
/// sums: one chain of dependent f64 additions made the two norms of a decode step's layer ~1% of
/// its time, on the calling thread while the others wait.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let mut part = [0.0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum();
    for c in chunks {
        for (p, &v) in part.iter_mut().zip(c) {
            *p += (v as f64) * (v as f64);
        }
    }
    let ss = part.iter().sum::<f64>() + tail;
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

#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `e^x` in plain arithmetic (no library call), so that loops over it vectorize: `x = k·ln 2 + r`
/// with `k` rounded to nearest and `|r| ≤ ln 2 / 2`, `e^r` by its Taylor polynomial to degree 7
/// (relative error below 2e-7: one or two ulps), `2^k` built in the exponent bits. Inputs are
/// clamped to where `2^k` is a normal float (results from about 1e-38 to 2e38); NaN stays NaN.
/// Rust never fuses its multiplies and adds, so every instruction set computes the same bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two (Cody and Waite; Cephes' constants): LN2_HI has 9 significant bits, so
    // k·LN2_HI is exact for |k| ≤ 127.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^k from k + 127 (1..=254) in the exponent bits. Added to 2^23, k + 127 lands in the low
    // mantissa bits, which the shift moves into the exponent (the rest shifts out): float
    // arithmetic and a bit cast, so the loops over `exp` stay vectorized (`k as i32`, with its
    // saturating NaN rule, made the compiler convert lane by lane). A NaN's bits shift to 0, and
    // 0 · NaN stays NaN.
    f32::from_bits((k + (127.0 + 8_388_608.0)).to_bits() << 23) * p
}

/// `gate = silu(gate) * up`, in place; vectorized with the best instruction set the CPU has
/// (every path gives the same bits).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    #[inline(always)]
    fn plain(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = silu(*g) * u;
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
    unsafe fn avx512(gate: &mut [f32], up: &[f32]) {
        plain(gate, up)
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(gate: &mut [f32], up: &[f32]) {
        plain(gate, up)
    }
    match crate::quant::kernels::isa() {
        // SAFETY: `isa` names only instruction sets the CPU has.
        #[cfg(target_arch = "x86_64")]
        crate::quant::kernels::Isa::Avx512 => unsafe { avx512(gate, up) },
        #[cfg(target_arch = "x86_64")]
        crate::quant::kernels::Isa::Avx2 => unsafe { avx2(gate, up) },
        _ => plain(gate, up),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulps_and_clamps() {
        let mut worst = 0.0f64;
        for i in -870_000..=880_000 {
            let x = i as f32 * 1e-4;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
        assert!(exp(f32::NAN).is_nan());
        // silu's limits: x for large x, -0 (tiny) for very negative x.
        assert_eq!(silu(100.0), 100.0);
        assert!(silu(-200.0).abs() < 1e-30);
    }

    #[test]
    fn swiglu_paths_agree_bit_for_bit() {
        let g: Vec<f32> = (0..1000)
            .map(|i| ((i * 37 % 201) as f32 - 100.0) * 0.173)
            .collect();
        let u: Vec<f32> = (0..1000)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.05)
            .collect();
        let mut fast = g.clone();
        swiglu(&mut fast, &u);
        for ((&a, &gi), &ui) in fast.iter().zip(&g).zip(&u) {
            assert_eq!(a.to_bits(), (silu(gi) * ui).to_bits());
            let want = gi as f64 / (1.0 + (-gi as f64).exp()) * ui as f64;
            assert!((a as f64 - want).abs() <= 1e-6 * want.abs().max(1e-3));
        }
    }
}
