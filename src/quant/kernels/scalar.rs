//! Scalar reference kernels: the definition every SIMD path is tested against.
//!
//! Clarity over speed: the pq kernel unpacks each chunk with [`Pq::unpack_chunk`] and sums in
//! exact integers before scaling, as the format defines.

use crate::quant::activation::Q8Row;
use crate::quant::pq::{Pq, CHUNK};
use crate::quant::GgmlType;

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// `out[t * ldo + r] = W[r] · xs[t]` for every row `r` of `w` (rows of `row_bytes` bytes of Q4_0,
/// Q4_1 or Q8_0 weights) and every token `t`.
///
/// # Safety
/// `out` must be valid for writes at every `t * ldo + r`.
pub unsafe fn gemm_tile(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    xs: &[Q8Row],
    out: *mut f32,
    ldo: usize,
) {
    let dot = match ty {
        GgmlType::Q4_0 => dot_q4_0,
        GgmlType::Q4_1 => dot_q4_1,
        GgmlType::Q8_0 => dot_q8_0,
        other => unreachable!("no 8-bit-activation kernel for {other}"),
    };
    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
        for (t, x) in xs.iter().enumerate() {
            *out.add(t * ldo + r) = dot(wr, x);
        }
    }
}

/// Q4_0 block: f16 d, 16 bytes of nibbles (low nibbles are weights 0..16, high ones 16..32);
/// w = d (q - 8).
pub fn dot_q4_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(18).enumerate() {
        let d = f16_at(blk, 0);
        let xq = &x.qs[b * 32..b * 32 + 32];
        let mut isum = 0i32;
        for j in 0..16 {
            let q = blk[2 + j];
            isum += ((q & 0x0F) as i32 - 8) * xq[j] as i32;
            isum += ((q >> 4) as i32 - 8) * xq[j + 16] as i32;
        }
        sum += d * x.d[b] * isum as f32;
    }
    sum
}

/// Q4_1 block: f16 d, f16 m, 16 bytes of nibbles; w = d q + m.
pub fn dot_q4_1(w: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(20).enumerate() {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let xq = &x.qs[b * 32..b * 32 + 32];
        let mut isum = 0i32;
        for j in 0..16 {
            let q = blk[4 + j];
            isum += (q & 0x0F) as i32 * xq[j] as i32;
            isum += (q >> 4) as i32 * xq[j + 16] as i32;
        }
        sum += d * x.d[b] * isum as f32 + m * x.s[b];
    }
    sum
}

/// Q8_0 block: f16 d, 32 signed bytes; w = d q.
pub fn dot_q8_0(w: &[u8], x: &Q8Row) -> f32 {
    let mut sum = 0.0f32;
    for (b, blk) in w.chunks_exact(34).enumerate() {
        let d = f16_at(blk, 0);
        let xq = &x.qs[b * 32..b * 32 + 32];
        let isum: i32 = blk[2..34]
            .iter()
            .zip(xq)
            .map(|(&q, &xv)| q as i8 as i32 * xv as i32)
            .sum();
        sum += d * x.d[b] * isum as f32;
    }
    sum
}

/// `out[t * ldo + r] = W[r] · xs[t]` for every row `r` of `w` (rows of `row_bytes` bytes of the pq
/// format `p`, each holding `32 * xs[t].d.len()` weights, the last chunk zero-padded) and every token.
///
/// # Safety
/// `out` must be valid for writes at every `t * ldo + r`.
pub unsafe fn gemm_tile_pq(
    p: Pq,
    w: &[u8],
    row_bytes: usize,
    xs: &[Q8Row],
    out: *mut f32,
    ldo: usize,
) {
    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
        for (t, x) in xs.iter().enumerate() {
            *out.add(t * ldo + r) = dot_pq(p, wr, x);
        }
    }
}

/// One pq row times one activation row; the definition the SIMD pq kernels are tested against.
///
/// The row is read as groups of `p.group / 32` chunks, the last group possibly shorter: a tail group
/// padded to whole chunks has exactly the bytes of a group of that many chunks, so the chunk count of
/// the (padded) activation row is all the kernel needs to know. Per chunk, with `S = Σ c·q` exact:
/// asymmetric `d·xd·S + m·xd·Σq`; symmetric `d·xd·(S − 2^(k−1)·Σq)`; symmetric 1-bit
/// `d·xd·(2S − Σq)`.
pub fn dot_pq(p: Pq, w: &[u8], x: &Q8Row) -> f32 {
    let nb = x.d.len();
    let per_group = p.group as usize / CHUNK;
    let (hb, cb) = (p.header_bytes(), p.chunk_bytes());
    let mut codes = [0u8; CHUNK];
    let mut sum = 0.0f32;
    let mut off = 0;
    let mut c0 = 0;
    while c0 < nb {
        let n_chunks = (nb - c0).min(per_group);
        let (d, m) = p.header(&w[off..off + hb]);
        off += hb;
        for c in c0..c0 + n_chunks {
            p.unpack_chunk(&w[off..off + cb], &mut codes);
            off += cb;
            let xq = &x.qs[c * CHUNK..(c + 1) * CHUNK];
            let s: i32 = codes
                .iter()
                .zip(xq)
                .map(|(&c, &q)| c as i32 * q as i32)
                .sum();
            let (xd, isum) = (x.d[c], x.isum[c]);
            sum += if !p.sym {
                d * xd * s as f32 + m * xd * isum as f32
            } else if p.bits == 1 {
                d * xd * (2 * s - isum) as f32
            } else {
                d * xd * (s - (1 << (p.bits - 1)) * isum) as f32
            };
        }
        c0 += n_chunks;
    }
    sum
}

/// Weight `j` of a row of float weights (`ty` is F32, F16 or BF16).
#[inline]
pub(crate) fn float_at(ty: GgmlType, w: &[u8], j: usize) -> f32 {
    match ty {
        GgmlType::F32 => f32::from_le_bytes([w[4 * j], w[4 * j + 1], w[4 * j + 2], w[4 * j + 3]]),
        GgmlType::F16 => f16_at(w, 2 * j),
        _ => half::bf16::from_bits(u16::from_le_bytes([w[2 * j], w[2 * j + 1]])).to_f32(),
    }
}

/// One row of float weights times one row of f32 activations, summed in order.
pub fn dot_float(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    x.iter()
        .enumerate()
        .map(|(j, &v)| float_at(ty, w, j) * v)
        .sum()
}

/// `out[t * ldo + r] = W[r] · x[t]` for every row `r` of `w` (rows of `cols` float weights of
/// type `ty`) and every token `t` of `x` (rows of `cols` floats).
///
/// # Safety
/// `out` must be valid for writes at every `t * ldo + r`.
pub unsafe fn gemm_tile_float(
    ty: GgmlType,
    w: &[u8],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    let row_bytes = cols * ty.type_size();
    for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
        for (t, xt) in x.chunks_exact(cols).enumerate() {
            *out.add(t * ldo + r) = dot_float(ty, wr, xt);
        }
    }
}
