//! Activations quantized to 8-bit blocks before a matrix product, as ggml does (its Q8_0/Q8_1):
//! the integer dot product of packed weights with 8-bit activations is far cheaper than
//! dequantizing the weights to f32.

/// Weights per activation block; every packed weight format pare computes on has blocks that are a
/// multiple of this.
pub const QK8: usize = 32;

/// A matrix of activations (one row per token), quantized in blocks of 32 along each row. A row
/// whose length is not a multiple of 32 is padded with zeros to the next multiple (pq weights pad
/// their last chunk the same way).
///
/// For block `b`: `x[j] ≈ d[b] * qs[32 b + j]`, `s[b] = d[b] * Σ_j qs[32 b + j]` rounded to f16
/// (the block sum as ggml's Q8_1 stores it, used by the Q4_1 kernel to round like llama.cpp) and
/// `isum[b] = Σ_j qs[32 b + j]` exactly (used by the pq kernels for their offsets).
#[derive(Debug, Default, Clone)]
pub struct Q8Acts {
    pub rows: usize,
    pub cols: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub isum: Vec<i32>,
    pub qs: Vec<i8>,
}

impl Q8Acts {
    pub fn blocks_per_row(&self) -> usize {
        self.cols.div_ceil(QK8)
    }

    /// Quantizes `rows` rows of `cols` values each, reusing buffers; vectorized with the best
    /// instruction set the CPU has (the same code on every path, so the same bits).
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
        unsafe fn avx512(a: &mut Q8Acts, x: &[f32], rows: usize, cols: usize) {
            a.quantize_with(x, rows, cols, |xb, q| {
                // SAFETY: the enclosing function's features are enabled; `xb` and `q` are blocks.
                unsafe { quantize_block_avx512(xb, q) }
            })
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2(a: &mut Q8Acts, x: &[f32], rows: usize, cols: usize) {
            a.quantize_with(x, rows, cols, |xb, q| {
                // SAFETY: the enclosing function's features are enabled; `xb` and `q` are blocks.
                unsafe { quantize_block_avx2(xb, q) }
            })
        }
        match super::kernels::isa() {
            // SAFETY: `isa` names only instruction sets the CPU has.
            #[cfg(target_arch = "x86_64")]
            super::kernels::Isa::Avx512 => unsafe { avx512(self, x, rows, cols) },
            #[cfg(target_arch = "x86_64")]
            super::kernels::Isa::Avx2 => unsafe { avx2(self, x, rows, cols) },
            _ => self.quantize_plain(x, rows, cols),
        }
    }

    #[inline(always)]
    fn quantize_plain(&mut self, x: &[f32], rows: usize, cols: usize) {
        self.quantize_with(x, rows, cols, quantize_block)
    }

    /// The blocking and padding around a block quantizer `f` (which must equal [`quantize_block`]).
    #[inline(always)]
    fn quantize_with(
        &mut self,
        x: &[f32],
        rows: usize,
        cols: usize,
        f: impl Fn(&[f32], &mut [i8]) -> (f32, f32, i32),
    ) {
        assert_eq!(x.len(), rows * cols);
        let nbr = cols.div_ceil(QK8);
        let nb = rows * nbr;
        self.rows = rows;
        self.cols = cols;
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.isum.resize(nb, 0);
        self.qs.resize(nb * QK8, 0);
        let mut pad = [0.0f32; QK8];
        for r in 0..rows {
            let xr = &x[r * cols..(r + 1) * cols];
            for i in 0..nbr {
                let b = r * nbr + i;
                let xb = if (i + 1) * QK8 <= cols {
                    &xr[i * QK8..(i + 1) * QK8]
                } else {
                    let n = cols - i * QK8;
                    pad[..n].copy_from_slice(&xr[i * QK8..]);
                    pad[n..].fill(0.0);
                    &pad[..]
                };
                let (d, s, isum) = f(xb, &mut self.qs[b * QK8..(b + 1) * QK8]);
                self.d[b] = d;
                self.s[b] = s;
                self.isum[b] = isum;
            }
        }
    }

    /// Row `r` as a borrowed view.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let nb = self.blocks_per_row();
        Q8Row {
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
            isum: &self.isum[r * nb..(r + 1) * nb],
            qs: &self.qs[r * nb * QK8..(r + 1) * nb * QK8],
        }
    }
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub isum: &'a [i32],
    pub qs: &'a [i8],
}

/// [`quantize_block`] with AVX-512: the same operations on 16 lanes, so the same bits (decode
/// quantizes ~120 activation vectors per token on one thread while the others wait, and the
/// compiler's scalar loop made that ~4% of a token's time).
///
/// # Safety
/// The CPU must have AVX-512 F; `x` and `q` must hold `QK8` elements.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn quantize_block_avx512(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == QK8 && q.len() == QK8);
    let a = _mm512_loadu_ps(x.as_ptr());
    let b = _mm512_loadu_ps(x.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a) | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(b, b);
    let d = amax / 127.0;
    if needs_scalar(amax, nan != 0) {
        return quantize_block(x, q);
    }
    let id = _mm512_set1_ps(1.0 / d);
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    // Clamped like the scalar path, then rounded half to even by the default rounding mode, as
    // its magic-constant add/sub does.
    let qa = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(a, id), lo), hi));
    let qb = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(b, id), lo), hi));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtsepi32_epi8(qb),
    );
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    (f16_or_f32(d), f16_or_f32(d * sum as f32), sum)
}

/// [`quantize_block`] with AVX2: the same operations on 8 lanes, so the same bits. The compiler
/// does not vectorize the scalar loop's `f32::max` fold (its NaN rule), which left activation
/// quantization ~1.5% of a decode step's samples, on the calling thread while the others wait.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `x` and `q` must hold `QK8` elements.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == QK8 && q.len() == QK8);
    let p = x.as_ptr();
    let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(p.add(i)));
    let sign = _mm256_set1_ps(-0.0);
    let a = v.map(|v| _mm256_andnot_ps(sign, v));
    let m = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let unord = v.map(|v| _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let nan = _mm256_movemask_ps(_mm256_or_ps(
        _mm256_or_ps(unord[0], unord[1]),
        _mm256_or_ps(unord[2], unord[3]),
    ));
    let d = amax / 127.0;
    if needs_scalar(amax, nan != 0) {
        return quantize_block(x, q);
    }
    let id = _mm256_set1_ps(1.0 / d);
    let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
    // Clamped, then rounded half to even by the default rounding mode, as the scalar path does.
    let qi =
        v.map(|v| _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, id), lo), hi)));
    // The packs interleave 128-bit lanes: 4-value runs come out as 0a 1a 2a 3a 0b 1b 2b 3b.
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(qi[0], qi[1]),
        _mm256_packs_epi32(qi[2], qi[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, ordered);
    let s = _mm256_add_epi32(
        _mm256_add_epi32(qi[0], qi[1]),
        _mm256_add_epi32(qi[2], qi[3]),
    );
    let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
    (f16_or_f32(d), f16_or_f32(d * sum as f32), sum)
}

/// Whether a SIMD block quantizer must hand a block (largest |x| `amax`, any NaN in `has_nan`)
/// to the scalar [`quantize_block`] to give its bits: zero, non-finite and NaN-holding blocks,
/// and scales whose inverse overflows. There NaN products become 0 where the vector clamp would
/// make them −127.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn needs_scalar(amax: f32, has_nan: bool) -> bool {
    amax == 0.0 || has_nan || !amax.is_finite() || !(1.0 / (amax / 127.0)).is_finite()
}

/// `v` rounded to f16 precision, as ggml stores block scales and sums; values past f16's range
/// stay f32.
#[inline(always)]
fn f16_or_f32(v: f32) -> f32 {
    let h = half::f16::from_f32(v).to_f32();
    if h.is_finite() {
        h
    } else {
        v
    }
}

/// Symmetric round-to-nearest of one block; returns (scale, scale × sum of quants, sum of quants).
#[inline(always)]
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        return (0.0, 0.0, 0);
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    let mut sum = 0i32;
    for (qi, &xi) in q.iter_mut().zip(x) {
        // Round half to even, as ggml's SIMD quantizer does; the magic constant keeps this a
        // plain add/sub (no libm call) for |v| <= 127.
        let v = ((xi * id).clamp(-127.0, 127.0) + 12582912.0) - 12582912.0;
        *qi = v as i8;
        sum += *qi as i32;
    }
    // Scale and block sum are kept at f16 precision, as ggml stores them in its Q8_0/Q8_1 blocks,
    // so that pare's products round like llama.cpp's (near-ties in greedy decoding then fall the
    // same way more often).
    (f16_or_f32(d), f16_or_f32(d * sum as f32), sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path the CPU has gives the scalar path's bits, on odd lengths (padded tails), zero,
    /// tiny, huge, infinite and NaN-holding blocks.
    #[test]
    fn simd_quantizer_equals_scalar_bit_for_bit() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..400 {
            let cols = 1 + (next() % 200) as usize;
            let rows = 1 + (next() % 3) as usize;
            let scale = [1e-3f32, 1.0, 37.0, 1e30, 1e-40][case % 5];
            let mut x: Vec<f32> = (0..rows * cols)
                .map(|_| ((next() % 20001) as f32 / 10000.0 - 1.0) * scale)
                .collect();
            match case % 7 {
                0 => x[..cols.min(40)].fill(0.0),
                1 => x[0] = f32::INFINITY,
                2 => x[cols / 2] = f32::NAN,
                3 => {
                    // d = 1 exactly, and every other product half-way between two integers.
                    x[0] = 127.0;
                    for (j, v) in x.iter_mut().enumerate().take(cols.min(32)).skip(1) {
                        *v = j as f32 - 16.5;
                    }
                }
                _ => {}
            }
            let mut plain = Q8Acts::default();
            plain.quantize_plain(&x, rows, cols);
            let mut fast = Q8Acts::default();
            fast.quantize(&x, rows, cols);
            assert_eq!(fast.qs, plain.qs, "case {case}");
            assert_eq!(fast.isum, plain.isum, "case {case}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast.d), bits(&plain.d), "case {case}");
            assert_eq!(bits(&fast.s), bits(&plain.s), "case {case}");
        }
    }
}
