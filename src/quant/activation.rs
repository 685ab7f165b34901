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
            a.quantize_plain(x, rows, cols)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn avx2(a: &mut Q8Acts, x: &[f32], rows: usize, cols: usize) {
            a.quantize_plain(x, rows, cols)
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
                let (d, s, isum) = quantize_block(xb, &mut self.qs[b * QK8..(b + 1) * QK8]);
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
    // same way more often). Values past f16's range stay f32.
    let f16 = |v: f32| {
        let h = half::f16::from_f32(v).to_f32();
        if h.is_finite() {
            h
        } else {
            v
        }
    };
    (f16(d), f16(d * sum as f32), sum)
}
