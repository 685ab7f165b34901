//! AVX2 + FMA + F16C kernels; each equals its twin in [`super::scalar`] up to summation order.
//!
//! Weight nibbles are unpacked to 32 unsigned bytes once per block and multiplied with the signed
//! 8-bit activations of up to four tokens by `vpmaddubsw` (u8 × i8 → i16 pairs, which cannot
//! saturate for 4-bit weights), summed to i32 with `vpmaddwd`, then scaled in f32.

use std::arch::x86_64::*;

use super::pq_simd::{group_sums, plane1_mask, plane2, plane4};
use crate::quant::activation::Q8Row;
use crate::quant::pq::Pq;
use crate::quant::GgmlType;

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    let h = u16::from_le_bytes([*p, *p.add(1)]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_x(x: &Q8Row, b: usize) -> __m256i {
    _mm256_loadu_si256(x.qs.as_ptr().add(b * 32) as *const __m256i)
}

/// Σ u8 × i8 over 32 bytes as 8 i32 lanes, converted to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(w, x);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// The kernel bodies, shared with the AVX-512 file: each instruction-set module invokes this with its
/// target features and its own `dot_u8_i8` (u8 × i8 over 32 bytes → 8 f32 lanes) in scope.
macro_rules! q8_kernels {
    ($features:literal) => {
        /// `out[t * ldo + r] = W[r] · xs[t]` for every row `r` of `w` (rows of `row_bytes` bytes) and
        /// every token `t` of `xs`.
        ///
        /// # Safety
        /// The CPU must support the enabled features; `w`'s rows and `xs` must agree in length;
        /// `out` must be valid for writes at every `t * ldo + r`.
        #[target_feature(enable = $features)]
        pub unsafe fn gemm_tile(
            ty: GgmlType,
            w: &[u8],
            row_bytes: usize,
            xs: &[Q8Row],
            out: *mut f32,
            ldo: usize,
        ) {
            macro_rules! rows_by_tokens {
                ($f:ident) => {{
                    let mut res = [0.0f32; 4];
                    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
                        let mut t0 = 0;
                        while t0 < xs.len() {
                            let k = (xs.len() - t0).min(4);
                            let x = xs.get_unchecked(t0..t0 + k);
                            match k {
                                1 => $f::<1>(wr, x, &mut res),
                                2 => $f::<2>(wr, x, &mut res),
                                3 => $f::<3>(wr, x, &mut res),
                                _ => $f::<4>(wr, x, &mut res),
                            }
                            for (i, &v) in res[..k].iter().enumerate() {
                                *out.add((t0 + i) * ldo + r) = v;
                            }
                            t0 += k;
                        }
                    }
                }};
            }
            // Decode (one token): four rows at a time, then the rows left over one by one.
            macro_rules! four_rows_then_tail {
                ($rows4:ident, $one:ident) => {{
                    let four = w.len() / row_bytes / 4 * 4;
                    let mut res = [0.0f32; 4];
                    for r in (0..four).step_by(4) {
                        $rows4(w.as_ptr().add(r * row_bytes), row_bytes, &xs[0], &mut res);
                        for (i, &v) in res.iter().enumerate() {
                            *out.add(r + i) = v;
                        }
                    }
                    let tail = w.get_unchecked(four * row_bytes..);
                    for (i, wr) in tail.chunks_exact(row_bytes).enumerate() {
                        $one::<1>(wr, xs, &mut res);
                        *out.add(four + i) = res[0];
                    }
                }};
            }
            match ty {
                GgmlType::Q4_0 => rows_by_tokens!(q4_0),
                GgmlType::Q4_1 if xs.len() == 1 => four_rows_then_tail!(q4_1_rows4, q4_1),
                GgmlType::Q4_1 => rows_by_tokens!(q4_1),
                GgmlType::Q8_0 if xs.len() == 1 => four_rows_then_tail!(q8_0_rows4, q8_0),
                GgmlType::Q8_0 => rows_by_tokens!(q8_0),
                other => unreachable!("no 8-bit-activation kernel for {other}"),
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q4_1<const N: usize>(w: &[u8], xs: &[Q8Row], out: &mut [f32]) {
            let nb = xs[0].d.len();
            let mut acc = [_mm256_setzero_ps(); N];
            let mut mins = [0.0f32; N];
            let wp = w.as_ptr();
            for b in 0..nb {
                let blk = wp.add(b * 20);
                let d = f16_at(blk);
                let m = f16_at(blk.add(2));
                let wv = plane4(blk.add(4));
                for t in 0..N {
                    let x = xs.get_unchecked(t);
                    let p = dot_u8_i8(wv, load_x(x, b));
                    let scale = _mm256_set1_ps(d * *x.d.get_unchecked(b));
                    acc[t] = _mm256_fmadd_ps(p, scale, acc[t]);
                    mins[t] += m * *x.s.get_unchecked(b);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]) + mins[t];
            }
        }

        /// Four consecutive Q4_1 rows (from `w`, `row_bytes` apart) times one token: the
        /// activation block is loaded once for the four rows, whose accumulation chains run side
        /// by side, and a block's scale and minimum are converted together from f16.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q4_1_rows4(w: *const u8, row_bytes: usize, x: &Q8Row, out: &mut [f32; 4]) {
            let nb = x.d.len();
            let mut acc = [_mm256_setzero_ps(); 4];
            // Lane 1 of each: Σ m · s (lane 0 collects d · x.d, unused).
            let mut mins = [_mm_setzero_ps(); 4];
            // Fetch the four rows after the next four (8 · row_bytes on) while these compute,
            // 4 · 20 bytes a block, so that a core streams weights at the rate it consumes them:
            // the hardware prefetcher alone left decode waiting on loads (one thread: +55%
            // tokens/s with the next four rows; two threads: eight rows ahead beat four by ~17%).
            // Past the matrix's end the hint is dropped, unread.
            let next = w.wrapping_add(8 * row_bytes);
            for b in 0..nb {
                // Two hints 40 bytes apart, so that every 64-byte line of the 80 is covered.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * 80) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * 80 + 40) as *const i8);
                let xv = load_x(x, b);
                let xds = _mm_unpacklo_ps(
                    _mm_load_ss(x.d.as_ptr().add(b)),
                    _mm_load_ss(x.s.as_ptr().add(b)),
                );
                for r in 0..4 {
                    let blk = w.add(r * row_bytes + b * 20);
                    let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()));
                    let prod = _mm_mul_ps(dm, xds);
                    let p = dot_u8_i8(plane4(blk.add(4)), xv);
                    acc[r] = _mm256_fmadd_ps(p, _mm256_broadcastss_ps(prod), acc[r]);
                    mins[r] = _mm_add_ps(mins[r], prod);
                }
            }
            for r in 0..4 {
                out[r] = hsum(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(mins[r]));
            }
        }

        /// Four consecutive Q8_0 rows (from `w`, `row_bytes` apart) times one token: the
        /// activation block and its scale are loaded once for the four rows, whose accumulation
        /// chains run side by side. Each block's scale is `d · x.d` in f32, as in the reference.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q8_0_rows4(w: *const u8, row_bytes: usize, x: &Q8Row, out: &mut [f32; 4]) {
            let nb = x.d.len();
            let mut acc = [_mm256_setzero_ps(); 4];
            // As in `q4_1_rows4`: fetch four rows, eight rows ahead, 4 · 34 bytes a block.
            let next = w.wrapping_add(8 * row_bytes);
            for b in 0..nb {
                // 136 bytes a block: two lines, or every other line would be left out.
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * 136) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(b * 136 + 64) as *const i8);
                let xv = load_x(x, b);
                let xd = _mm256_set1_ps(*x.d.get_unchecked(b));
                for r in 0..4 {
                    let blk = w.add(r * row_bytes + b * 34);
                    let d = _mm256_cvtph_ps(_mm_set1_epi16((blk as *const i16).read_unaligned()));
                    let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    // u8 × i8 products need one unsigned operand: |w|, with w's sign moved onto x.
                    let p = dot_u8_i8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
                    acc[r] = _mm256_fmadd_ps(p, _mm256_mul_ps(d, xd), acc[r]);
                }
            }
            for r in 0..4 {
                out[r] = hsum(acc[r]);
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q4_0<const N: usize>(w: &[u8], xs: &[Q8Row], out: &mut [f32]) {
            let nb = xs[0].d.len();
            let mut acc = [_mm256_setzero_ps(); N];
            let wp = w.as_ptr();
            for b in 0..nb {
                let blk = wp.add(b * 18);
                let d = f16_at(blk);
                // The stored nibble is q + 8; the integer product uses q itself, as in the
                // scalar reference, with the sign moved onto x as for Q8_0.
                let wv = _mm256_sub_epi8(plane4(blk.add(2)), _mm256_set1_epi8(8));
                let aw = _mm256_sign_epi8(wv, wv);
                for t in 0..N {
                    let x = xs.get_unchecked(t);
                    let p = dot_u8_i8(aw, _mm256_sign_epi8(load_x(x, b), wv));
                    let scale = _mm256_set1_ps(d * *x.d.get_unchecked(b));
                    acc[t] = _mm256_fmadd_ps(p, scale, acc[t]);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn q8_0<const N: usize>(w: &[u8], xs: &[Q8Row], out: &mut [f32]) {
            let nb = xs[0].d.len();
            let mut acc = [_mm256_setzero_ps(); N];
            let wp = w.as_ptr();
            for b in 0..nb {
                let blk = wp.add(b * 34);
                let d = f16_at(blk);
                let wv = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                // u8 × i8 products need one unsigned operand: use |w| and move w's sign onto x.
                let aw = _mm256_sign_epi8(wv, wv);
                for t in 0..N {
                    let x = xs.get_unchecked(t);
                    let sx = _mm256_sign_epi8(load_x(x, b), wv);
                    let p = dot_u8_i8(aw, sx);
                    let scale = _mm256_set1_ps(d * *x.d.get_unchecked(b));
                    acc[t] = _mm256_fmadd_ps(p, scale, acc[t]);
                }
            }
            for t in 0..N {
                out[t] = hsum(acc[t]);
            }
        }
    };
}
pub(crate) use q8_kernels;

q8_kernels!("avx2,fma,f16c");

/// Σ u8 × i8 over 32 bytes as 8 i32 lanes (exact while the u8 operand is at most 128: the i16 pair
/// sums of `vpmaddubsw` saturate beyond).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd_u8_i8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// A 1-bit plane as bytes `v` where a bit is set, 0 where clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn plane1(p: *const u8, v: i8) -> __m256i {
    _mm256_and_si256(plane1_mask(p), _mm256_set1_epi8(v))
}

/// A 1-bit plane as −1 where a bit is set, +1 where clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn signs1(p: *const u8) -> __m256i {
    _mm256_or_si256(plane1_mask(p), _mm256_set1_epi8(1))
}

const U8_NO_SATURATION: bool = false;

super::pq_simd::pq_kernels!("avx2,fma,f16c");
