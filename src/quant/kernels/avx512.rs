//! AVX-512 VNNI kernels (256-bit vectors, AVX512VL): the AVX2 kernel bodies with the u8 × i8 dot
//! product done by one `vpdpbusd` instead of `vpmaddubsw` + `vpmaddwd`. On Zen 4, 512-bit ops run
//! as two 256-bit halves, so wider vectors would add shuffles without adding throughput.

use std::arch::x86_64::*;

use super::avx2::{f16_at, hsum, load_x};
use super::pq_simd::{group_sums, plane2, plane4};
use crate::quant::activation::Q8Row;
use crate::quant::pq::Pq;
use crate::quant::GgmlType;

/// Σ u8 × i8 over 32 bytes as 8 i32 lanes, converted to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dot_u8_i8(w: __m256i, x: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x))
}

super::avx2::q8_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");

/// Σ u8 × i8 over 32 bytes as 8 i32 lanes; `vpdpbusd` sums in i32, so it never saturates.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn madd_u8_i8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x)
}

/// A 1-bit plane as bytes `v` where a bit is set, 0 where clear: the 4 bytes are a mask register.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn plane1(p: *const u8, v: i8) -> __m256i {
    let k = (p as *const u32).read_unaligned();
    _mm256_maskz_mov_epi8(k, _mm256_set1_epi8(v))
}

/// A 1-bit plane as −1 where a bit is set, +1 where clear.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn signs1(p: *const u8) -> __m256i {
    let k = (p as *const u32).read_unaligned();
    _mm256_mask_blend_epi8(k, _mm256_set1_epi8(1), _mm256_set1_epi8(-1))
}

const U8_NO_SATURATION: bool = true;

super::pq_simd::pq_kernels!("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");
