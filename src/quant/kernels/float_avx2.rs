//! AVX2 + FMA + F16C kernels for float weights (f32, f16, bf16) on f32 activations; each equals
//! [`super::scalar::dot_float`] up to summation order. The AVX-512 path uses them as they are: the
//! work is converting and multiplying 8 floats at a time, which 256-bit vectors already do at the
//! rate the weights arrive.
//!
//! Eight weights are converted once and multiplied with up to four tokens; two accumulators per
//! token keep consecutive fused multiply-adds independent.

use std::arch::x86_64::*;

use super::avx2::hsum;
use crate::quant::GgmlType;

/// Eight weights at element `i` of a row of `ty` as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const TY: u8>(w: *const u8, i: usize) -> __m256 {
    match TY {
        F32 => _mm256_loadu_ps((w as *const f32).add(i)),
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.add(2 * i) as *const __m128i)),
        _ => {
            // bf16 is the upper half of an f32.
            let h = _mm_loadu_si128(w.add(2 * i) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}

const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// `out[t * ldo + r] = W[r] · x[t]` for every row `r` of `w` (rows of `cols` weights of `ty`:
/// F32, F16 or BF16) and every token `t` of `x` (rows of `cols` floats).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold whole rows; `out` must be valid for
/// writes at every `t * ldo + r`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_tile_float(
    ty: GgmlType,
    w: &[u8],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    match ty {
        GgmlType::F32 => tile::<F32>(w, cols, x, out, ldo),
        GgmlType::F16 => tile::<F16>(w, cols, x, out, ldo),
        GgmlType::BF16 => tile::<BF16>(w, cols, x, out, ldo),
        other => unreachable!("no float kernel for {other}"),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<const TY: u8>(w: &[u8], cols: usize, x: &[f32], out: *mut f32, ldo: usize) {
    let row_bytes = cols * if TY == F32 { 4 } else { 2 };
    let n = x.len() / cols;
    let mut res = [0.0f32; 4];
    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
        let mut t0 = 0;
        while t0 < n {
            let k = (n - t0).min(4);
            let xs = x.get_unchecked(t0 * cols..(t0 + k) * cols);
            match k {
                1 => row::<TY, 1>(wr, cols, xs, &mut res),
                2 => row::<TY, 2>(wr, cols, xs, &mut res),
                3 => row::<TY, 3>(wr, cols, xs, &mut res),
                _ => row::<TY, 4>(wr, cols, xs, &mut res),
            }
            for (i, &v) in res[..k].iter().enumerate() {
                *out.add((t0 + i) * ldo + r) = v;
            }
            t0 += k;
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row<const TY: u8, const N: usize>(w: &[u8], cols: usize, x: &[f32], out: &mut [f32]) {
    let wp = w.as_ptr();
    let xp = x.as_ptr();
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    let mut i = 0;
    while i + 16 <= cols {
        let w0 = load8::<TY>(wp, i);
        let w1 = load8::<TY>(wp, i + 8);
        for t in 0..N {
            let xt = xp.add(t * cols + i);
            acc0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xt), acc0[t]);
            acc1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xt.add(8)), acc1[t]);
        }
        i += 16;
    }
    if i + 8 <= cols {
        let w0 = load8::<TY>(wp, i);
        for (t, a) in acc0.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(t * cols + i)), *a);
        }
        i += 8;
    }
    for t in 0..N {
        let mut s = hsum(_mm256_add_ps(acc0[t], acc1[t]));
        for j in i..cols {
            s += super::scalar::float_at(TY_OF[TY as usize], w, j) * *xp.add(t * cols + j);
        }
        out[t] = s;
    }
}

const TY_OF: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];
