//! x86 kernels of the panel GEMM ([`super::panel`]): AVX-512 VNNI with 16 tokens per vector, and
//! AVX2 with 8. Each computes up to four weight rows against one panel, so every activation load
//! serves four rows and every broadcast weight dword serves all tokens of the panel.

use std::arch::x86_64::*;

use super::panel::{Acts, UnpackedRows};
use crate::quant::activation::QK8;

/// Reads 4 weight codes as one little-endian i32 (for broadcasting).
#[inline(always)]
unsafe fn dword(p: *const u8) -> i32 {
    std::ptr::read_unaligned(p as *const i32)
}

macro_rules! dispatch_rows {
    ($f:ident, $w:expr, $r:expr, $k:expr, $a:expr, $res:expr) => {
        match ($k, $w.sym_shifts.is_some()) {
            (1, false) => $f::<1, false>($w, $r, $a, $res),
            (2, false) => $f::<2, false>($w, $r, $a, $res),
            (3, false) => $f::<3, false>($w, $r, $a, $res),
            (_, false) => $f::<4, false>($w, $r, $a, $res),
            (1, true) => $f::<1, true>($w, $r, $a, $res),
            (2, true) => $f::<2, true>($w, $r, $a, $res),
            (3, true) => $f::<3, true>($w, $r, $a, $res),
            (_, true) => $f::<4, true>($w, $r, $a, $res),
        }
    };
}

/// One panel of 16 tokens × `k` rows from row `r`.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI; the slices must hold the panel's 16-token layout.
pub unsafe fn rows_avx512(
    w: &UnpackedRows,
    r: usize,
    k: usize,
    a: &Acts,
    res: &mut [[f32; 16]; 4],
) {
    dispatch_rows!(avx512_k, w, r, k, a, res)
}

// Indexing by row keeps the K accumulators in registers, unrolled per const K.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn avx512_k<const K: usize, const SYM: bool>(
    w: &UnpackedRows,
    r: usize,
    a: &Acts,
    res: &mut [[f32; 16]; 4],
) {
    let Acts { xq, dx, sx, xi } = *a;
    const T: usize = 16;
    let nb = w.nb;
    assert!(xq.len() >= nb * QK8 * T && dx.len() >= nb * T && sx.len() >= nb * T);
    assert!(xi.len() >= nb * T);
    let (sc, sq) = w.sym_shifts.unwrap_or((0, 0));
    assert!((r + K) * nb <= w.dw.len() && (r + K) * nb * QK8 <= w.codes.len());
    let mut acc = [_mm512_setzero_ps(); K];
    let codes = w.codes.as_ptr();
    let xp = xq.as_ptr();
    for b in 0..nb {
        let mut isum = [_mm512_setzero_si512(); K];
        let xb = xp.add(b * QK8 * T);
        for g in 0..QK8 / 4 {
            let xv = _mm512_loadu_si512(xb.add(g * 4 * T) as *const __m512i);
            for i in 0..K {
                let c = dword(codes.add(((r + i) * nb + b) * QK8 + g * 4));
                isum[i] = _mm512_dpbusd_epi32(isum[i], _mm512_set1_epi32(c), xv);
            }
        }
        let dxv = _mm512_loadu_ps(dx.as_ptr().add(b * T));
        if SYM {
            let xiv = _mm512_loadu_si512(xi.as_ptr().add(b * T) as *const __m512i);
            let off = _mm512_sll_epi32(xiv, _mm_cvtsi32_si128(sq as i32));
            for i in 0..K {
                let j = (r + i) * nb + b;
                let s =
                    _mm512_sub_epi32(_mm512_sll_epi32(isum[i], _mm_cvtsi32_si128(sc as i32)), off);
                let p = _mm512_mul_ps(_mm512_cvtepi32_ps(s), dxv);
                acc[i] = _mm512_fmadd_ps(p, _mm512_set1_ps(*w.dw.get_unchecked(j)), acc[i]);
            }
        } else {
            let sxv = _mm512_loadu_ps(sx.as_ptr().add(b * T));
            for i in 0..K {
                let j = (r + i) * nb + b;
                let p = _mm512_mul_ps(_mm512_cvtepi32_ps(isum[i]), dxv);
                acc[i] = _mm512_fmadd_ps(p, _mm512_set1_ps(*w.dw.get_unchecked(j)), acc[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(*w.mw.get_unchecked(j)), sxv, acc[i]);
            }
        }
    }
    for i in 0..K {
        _mm512_storeu_ps(res[i].as_mut_ptr(), acc[i]);
    }
}

/// One panel of 8 tokens × `k` rows from row `r` (codes below 128, see [`super::panel::supports`]).
///
/// # Safety
/// The CPU must support AVX2 and FMA; the slices must hold the panel's 8-token layout.
pub unsafe fn rows_avx2(w: &UnpackedRows, r: usize, k: usize, a: &Acts, res: &mut [[f32; 16]; 4]) {
    dispatch_rows!(avx2_k, w, r, k, a, res)
}

#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_k<const K: usize, const SYM: bool>(
    w: &UnpackedRows,
    r: usize,
    a: &Acts,
    res: &mut [[f32; 16]; 4],
) {
    let Acts { xq, dx, sx, xi } = *a;
    const T: usize = 8;
    let nb = w.nb;
    assert!(xq.len() >= nb * QK8 * T && dx.len() >= nb * T && sx.len() >= nb * T);
    assert!(xi.len() >= nb * T);
    let (sc, sq) = w.sym_shifts.unwrap_or((0, 0));
    assert!((r + K) * nb <= w.dw.len() && (r + K) * nb * QK8 <= w.codes.len());
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); K];
    let codes = w.codes.as_ptr();
    let xp = xq.as_ptr();
    for b in 0..nb {
        let mut isum = [_mm256_setzero_si256(); K];
        let xb = xp.add(b * QK8 * T);
        for g in 0..QK8 / 4 {
            let xv = _mm256_loadu_si256(xb.add(g * 4 * T) as *const __m256i);
            for i in 0..K {
                let c = dword(codes.add(((r + i) * nb + b) * QK8 + g * 4));
                // Codes < 128: a pair of products is at most 2·127·128, inside i16.
                let p16 = _mm256_maddubs_epi16(_mm256_set1_epi32(c), xv);
                isum[i] = _mm256_add_epi32(isum[i], _mm256_madd_epi16(p16, ones));
            }
        }
        let dxv = _mm256_loadu_ps(dx.as_ptr().add(b * T));
        if SYM {
            let xiv = _mm256_loadu_si256(xi.as_ptr().add(b * T) as *const __m256i);
            let off = _mm256_sll_epi32(xiv, _mm_cvtsi32_si128(sq as i32));
            for i in 0..K {
                let j = (r + i) * nb + b;
                let s =
                    _mm256_sub_epi32(_mm256_sll_epi32(isum[i], _mm_cvtsi32_si128(sc as i32)), off);
                let p = _mm256_mul_ps(_mm256_cvtepi32_ps(s), dxv);
                acc[i] = _mm256_fmadd_ps(p, _mm256_set1_ps(*w.dw.get_unchecked(j)), acc[i]);
            }
        } else {
            let sxv = _mm256_loadu_ps(sx.as_ptr().add(b * T));
            for i in 0..K {
                let j = (r + i) * nb + b;
                let p = _mm256_mul_ps(_mm256_cvtepi32_ps(isum[i]), dxv);
                acc[i] = _mm256_fmadd_ps(p, _mm256_set1_ps(*w.dw.get_unchecked(j)), acc[i]);
                acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(*w.mw.get_unchecked(j)), sxv, acc[i]);
            }
        }
    }
    for i in 0..K {
        _mm256_storeu_ps(res[i].as_mut_ptr(), acc[i]);
    }
}
