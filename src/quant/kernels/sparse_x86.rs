//! AVX2 and AVX-512 paths of the sparse-input product ([`super::sparse`]) on pq rows.
//!
//! For each active input `(i, a)` and each group of row `i` in the output range, the group's
//! values are `A·c + B` (see [`super::sparse::affine`]): the codes are unpacked with the same bit
//! plane decoders as the dense pq kernels ([`super::pq_simd`]), converted to f32 and added as
//! `y += (a·A)·c` with one FMA per 8 (AVX2) or 16 (AVX-512) outputs, for up to four rows per load
//! and store of the outputs; the constant `a·B` is summed
//! per group and added to the group's outputs once at the end, which saves an add per vector.
//! A tail chunk shorter than 32 columns (rows whose length is not a multiple of 32) is added one
//! value at a time, so nothing is written past the range.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

use super::pq_simd::{plane1_mask, plane2, plane4};
use super::sparse::{affine, Rows};
use crate::quant::pq::{Pq, CHUNK};

thread_local! {
    /// Per-group sums of `a·B` over the active rows, one per group of the output range.
    static OFFSETS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Scale and minimum of a group from its header (the minimum is garbage for symmetric formats,
/// whose header is 2 bytes: the next two bytes are codes, and `affine` ignores it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn header(g: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((g as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

/// A 1-bit plane as bytes `v` where set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bit(p: *const u8, v: i8) -> __m256i {
    _mm256_and_si256(plane1_mask(p), _mm256_set1_epi8(v))
}

/// One chunk's 32 unsigned codes (`c`, not the signed value) as bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes<const BITS: u32, const SYM: bool>(p: *const u8) -> __m256i {
    match BITS {
        1 => bit(p, 1),
        2 => plane2(p),
        3 => _mm256_or_si256(bit(p, 4), plane2(p.add(4))),
        4 => plane4(p),
        5 => _mm256_or_si256(bit(p, 16), plane4(p.add(4))),
        6 => _mm256_or_si256(_mm256_slli_epi16(plane2(p), 4), plane4(p.add(8))),
        _ => {
            let b = _mm256_loadu_si256(p as *const __m256i);
            // Symmetric 8-bit codes are stored as c − 128.
            if SYM {
                _mm256_xor_si256(b, _mm256_set1_epi8(-128))
            } else {
                b
            }
        }
    }
}

macro_rules! sparse_kernel {
    ($name:ident, $inner:ident, $features:literal, $fma32:ident) => {
        /// See the module docs.
        ///
        /// # Safety
        /// The CPU must support the enabled features; `w`'s type must be `p`, the range made of
        /// whole groups and `y.len() == cols.len()` (as [`super::sparse::axpy_rows`] checks).
        #[target_feature(enable = $features)]
        pub unsafe fn $name(
            p: Pq,
            w: &Rows,
            active: &[(u32, f32)],
            cols: Range<usize>,
            y: &mut [f32],
        ) {
            macro_rules! go {
                ($bits:literal) => {
                    if p.sym {
                        $inner::<$bits, true>(p, w, active, cols, y)
                    } else {
                        $inner::<$bits, false>(p, w, active, cols, y)
                    }
                };
            }
            match p.bits {
                1 => go!(1),
                2 => go!(2),
                3 => go!(3),
                4 => go!(4),
                5 => go!(5),
                6 => go!(6),
                _ => go!(8),
            }
        }

        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $inner<const BITS: u32, const SYM: bool>(
            p: Pq,
            w: &Rows,
            active: &[(u32, f32)],
            cols: Range<usize>,
            y: &mut [f32],
        ) {
            let g = p.group as usize;
            let (gb, hb, cb) = (p.group_bytes(), p.header_bytes(), p.chunk_bytes());
            let (ga, gz) = (cols.start / g, cols.end.div_ceil(g));
            let yp = y.as_mut_ptr().wrapping_sub(cols.start);
            OFFSETS.with_borrow_mut(|off| {
                off.clear();
                off.resize(gz - ga, 0.0);
                // Up to ROWS active rows at a time: each block of outputs is loaded and stored
                // once for all of them.
                for blk in active.chunks(ROWS) {
                    let nb = blk.len();
                    let mut rows = [std::ptr::null::<u8>(); ROWS];
                    for (r, &(i, _)) in blk.iter().enumerate() {
                        rows[r] = w.row(i as usize).as_ptr();
                    }
                    for gi in ga..gz {
                        let mut s = [0.0f32; ROWS];
                        for (r, &(_, a)) in blk.iter().enumerate() {
                            // Every group before the row's (possibly short) last one is full.
                            let (d, m) = header(rows[r].add(gi * gb));
                            let (ca, cb0) = affine(p, d, m);
                            off[gi - ga] += a * cb0;
                            s[r] = a * ca;
                        }
                        let n = (w.cols - gi * g).min(g);
                        let mut j = 0;
                        while j < n {
                            let at = gi * gb + hb + j / CHUNK * cb;
                            let out = yp.add(gi * g + j);
                            let mut c = [_mm256_setzero_si256(); ROWS];
                            for r in 0..nb {
                                c[r] = codes::<BITS, SYM>(rows[r].add(at));
                            }
                            if n - j >= CHUNK {
                                $fma32(&s, &c, nb, out);
                            } else {
                                for r in 0..nb {
                                    let mut b = [0u8; CHUNK];
                                    _mm256_storeu_si256(b.as_mut_ptr() as *mut __m256i, c[r]);
                                    for (k, &ck) in b.iter().enumerate().take(n - j) {
                                        *out.add(k) += s[r] * ck as f32;
                                    }
                                }
                            }
                            j += CHUNK;
                        }
                    }
                }
                for (k, &o) in off.iter().enumerate() {
                    let gi = ga + k;
                    let n = (w.cols - gi * g).min(g);
                    for jj in 0..n {
                        *yp.add(gi * g + jj) += o;
                    }
                }
            });
        }
    };
}

/// Active rows handled together.
const ROWS: usize = 4;

/// `y[0..32] += Σ_r s[r] · c[r]` over the first `nb` rows' 32 codes, 8 lanes at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fma32_avx2(s: &[f32; ROWS], c: &[__m256i; ROWS], nb: usize, y: *mut f32) {
    let mut acc = [_mm256_setzero_ps(); 4];
    for (q, a) in acc.iter_mut().enumerate() {
        *a = _mm256_loadu_ps(y.add(8 * q));
    }
    for r in 0..nb {
        let sr = _mm256_set1_ps(s[r]);
        let halves = [
            _mm256_castsi256_si128(c[r]),
            _mm256_extracti128_si256(c[r], 1),
        ];
        for (h, v) in halves.into_iter().enumerate() {
            for (q, b) in [v, _mm_srli_si128(v, 8)].into_iter().enumerate() {
                let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                acc[2 * h + q] = _mm256_fmadd_ps(sr, f, acc[2 * h + q]);
            }
        }
    }
    for (q, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(y.add(8 * q), *a);
    }
}

/// As [`fma32_avx2`], 16 lanes at a time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn fma32_avx512(s: &[f32; ROWS], c: &[__m256i; ROWS], nb: usize, y: *mut f32) {
    let mut acc = [_mm512_loadu_ps(y), _mm512_loadu_ps(y.add(16))];
    for r in 0..nb {
        let sr = _mm512_set1_ps(s[r]);
        let halves = [
            _mm256_castsi256_si128(c[r]),
            _mm256_extracti128_si256(c[r], 1),
        ];
        for (h, v) in halves.into_iter().enumerate() {
            let f = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
            acc[h] = _mm512_fmadd_ps(sr, f, acc[h]);
        }
    }
    _mm512_storeu_ps(y, acc[0]);
    _mm512_storeu_ps(y.add(16), acc[1]);
}

sparse_kernel!(axpy_pq_avx2, pq_avx2, "avx2,fma,f16c", fma32_avx2);
sparse_kernel!(
    axpy_pq_avx512,
    pq_avx512,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl",
    fma32_avx512
);
