//! Activations quantized to 8-bit blocks before a matrix product, as ggml does (its Q8_0/Q8_1):
//! the integer dot product of packed weights with 8-bit activations is far cheaper than
//! dequantizing the weights to f32.

/// Weights per activation block; every packed weight format pare computes on has blocks that are a
/// multiple of this.
pub const QK8: usize = 32;

/// A matrix of activations (one row per token), quantized in blocks of 32 along each row.
///
/// For block `b`: `x[j] ≈ d[b] * qs[32 b + j]`, and `s[b] = d[b] * Σ_j qs[32 b + j]` (the block sum,
/// needed by formats with a per-block offset such as Q4_1).
#[derive(Debug, Default, Clone)]
pub struct Q8Acts {
    pub rows: usize,
    pub cols: usize,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

impl Q8Acts {
    pub fn blocks_per_row(&self) -> usize {
        self.cols / QK8
    }

    /// Quantizes `rows` rows of `cols` values each (`cols` a multiple of 32), reusing buffers.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(
            cols.is_multiple_of(QK8),
            "activation rows must be a multiple of {QK8}"
        );
        assert_eq!(x.len(), rows * cols);
        let nb = rows * cols / QK8;
        self.rows = rows;
        self.cols = cols;
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.qs.resize(rows * cols, 0);
        for (b, (xb, qb)) in x
            .chunks_exact(QK8)
            .zip(self.qs.chunks_exact_mut(QK8))
            .enumerate()
        {
            let (d, s) = quantize_block(xb, qb);
            self.d[b] = d;
            self.s[b] = s;
        }
    }

    /// Row `r` as a borrowed view.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let nb = self.blocks_per_row();
        Q8Row {
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
            qs: &self.qs[r * self.cols..(r + 1) * self.cols],
        }
    }
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub qs: &'a [i8],
}

/// Symmetric round-to-nearest of one block; returns (scale, scale × sum of quants).
fn quantize_block(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        return (0.0, 0.0);
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
    (f16(d), f16(d * sum as f32))
}
