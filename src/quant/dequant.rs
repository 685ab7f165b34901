//! Dequantization: ggml's stored weight formats back to f32.
//!
//! This is the scalar *reference*: one small function per format that decodes one block, written to
//! be read next to ggml's `dequantize_row_*` (ggml-quants.c) and block layouts (ggml-common.h). The
//! fast kernels that compute on packed weights are tested against it, and everything that needs a
//! plain f32 copy of a tensor (inspection, re-quantization, training on dequantized tiles) uses it.
//!
//! Arithmetic follows ggml's order of operations (`d * q`, `d * q + m`, `d * sc * q`, ...) in f32, so
//! the results are bit-identical to ggml's and to the `gguf` Python package's.
//!
//! Only storage formats of weights are decoded. Q8_1 and Q8_K exist in ggml only to quantize
//! activations for dot products, and the integer and f64 types do not hold weights, so they are
//! rejected with [`Error::UnsupportedType`].

use half::{bf16, f16};

use crate::error::{Error, Result};
use crate::format::gguf::{Gguf, TensorInfo};
use crate::quant::GgmlType;

/// Weights per super-block of the k-quants (ggml's `QK_K`).
const QK_K: usize = 256;

/// Decodes one block: `src` is exactly `type_size` bytes, `dst` exactly `block_size` weights.
type BlockFn = fn(src: &[u8], dst: &mut [f32]);

/// The block decoder for a type, or an error naming a type that has none.
fn block_fn(ty: GgmlType) -> Result<BlockFn> {
    Ok(match ty {
        GgmlType::F32 => block_f32,
        GgmlType::F16 => block_f16,
        GgmlType::BF16 => block_bf16,
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q2K => block_q2_k,
        GgmlType::Q3K => block_q3_k,
        GgmlType::Q4K => block_q4_k,
        GgmlType::Q5K => block_q5_k,
        GgmlType::Q6K => block_q6_k,
        GgmlType::Q1_0 => block_q1_0,
        // Decoded row by row in `dequantize_row` (a pq row's last group may be shorter).
        GgmlType::Pq(_) => block_f32,
        GgmlType::Q8_1
        | GgmlType::Q8K
        | GgmlType::I8
        | GgmlType::I16
        | GgmlType::I32
        | GgmlType::I64
        | GgmlType::F64 => {
            return Err(Error::UnsupportedType(format!(
                "cannot dequantize {ty}: it is not a weight storage format pare decodes"
            )))
        }
    })
}

/// Whether pare can dequantize `ty`: `Ok`, or the error [`dequantize_row`] would give.
pub fn check_supported(ty: GgmlType) -> Result<()> {
    block_fn(ty).map(|_| ())
}

/// Dequantizes `dst.len()` weights of type `ty` from `src`.
///
/// `dst.len()` must be a whole number of blocks and `src` exactly `ty.row_bytes(dst.len())` bytes;
/// anything else is an error (never a panic), since a length mismatch means the caller has the layout
/// wrong and any output would be garbage. For ggml's types several rows laid end to end may be
/// passed as one "row"; a pq row is one row (see [`dequantize_rows`]).
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    if let GgmlType::Pq(p) = ty {
        return p.dequantize_row(src, dst);
    }
    let decode = block_fn(ty)?;
    let (bs, ts) = (ty.block_size(), ty.type_size());
    if !dst.len().is_multiple_of(bs) {
        return Err(Error::Invalid(format!(
            "cannot dequantize {} {ty} weights: not a multiple of the block size {bs}",
            dst.len()
        )));
    }
    let expected = (dst.len() / bs) * ts;
    if src.len() != expected {
        return Err(Error::Invalid(format!(
            "{} {ty} weights take {expected} bytes, but {} bytes were given",
            dst.len(),
            src.len()
        )));
    }
    for (block, out) in src.chunks_exact(ts).zip(dst.chunks_exact_mut(bs)) {
        decode(block, out);
    }
    Ok(())
}

/// Dequantizes consecutive rows of `row_len` weights each (`dst.len()` a multiple of it).
pub fn dequantize_rows(ty: GgmlType, src: &[u8], row_len: usize, dst: &mut [f32]) -> Result<()> {
    if row_len == 0 || !dst.len().is_multiple_of(row_len) {
        return Err(Error::Invalid(format!(
            "{} weights are not whole rows of {row_len}",
            dst.len()
        )));
    }
    let rb = ty.row_bytes(row_len)?;
    let rows = dst.len() / row_len;
    if src.len() != rb * rows {
        return Err(Error::Invalid(format!(
            "{rows} rows of {row_len} {ty} weights take {} bytes, but {} were given",
            rb * rows,
            src.len()
        )));
    }
    for (s, d) in src.chunks_exact(rb).zip(dst.chunks_exact_mut(row_len)) {
        dequantize_row(ty, s, d)?;
    }
    Ok(())
}

/// Dequantizes a whole tensor of `g` into a new vector, in ggml order (row after row).
///
/// `t` must describe a tensor of `g` (its data range is checked against the file, so a foreign
/// `TensorInfo` gives an error rather than a panic). The allocation is fallible: a tensor too large
/// for memory is an error, not an abort.
pub fn dequantize_tensor(g: &Gguf, t: &TensorInfo) -> Result<Vec<f32>> {
    let n = usize::try_from(t.n_elements())
        .map_err(|_| Error::Invalid(format!("tensor {:?} has too many elements", t.name)))?;
    let n_bytes = t
        .ggml_type
        .row_bytes(t.row_len())
        .ok()
        .and_then(|rb| rb.checked_mul(t.n_rows()))
        .ok_or_else(|| Error::Invalid(format!("tensor {:?}: impossible dimensions", t.name)))?;
    let start = g.data_offset.checked_add(t.offset);
    let in_file = start
        .and_then(|s| s.checked_add(n_bytes as u64))
        .is_some_and(|end| end <= g.bytes().len() as u64);
    if !in_file {
        return Err(Error::Invalid(format!(
            "tensor {:?} ({} bytes at offset {}) is not inside {}",
            t.name,
            n_bytes,
            t.offset,
            g.path.display()
        )));
    }
    // Reject unsupported types before allocating.
    block_fn(t.ggml_type)?;
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| {
        Error::Invalid(format!(
            "tensor {:?}: cannot allocate {n} f32 values to dequantize it",
            t.name
        ))
    })?;
    out.resize(n, 0.0);
    dequantize_rows(t.ggml_type, g.tensor_data(t), t.row_len().max(1), &mut out)?;
    Ok(out)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn block_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn block_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn block_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// `block_q4_0`: f16 d, 16 bytes of nibbles. Low nibbles are weights 0..16, high nibbles 16..32;
/// w = d * (q - 8).
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

/// `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles (as Q4_0); w = d * q + m.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0xF) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The fifth bits of a Q5 block: bit j of the little-endian u32 `qh` belongs to weight j.
fn q5_high_bits(qh: &[u8]) -> u32 {
    u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]])
}

/// `block_q5_0`: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles (as Q4_0); w = d * (q - 16).
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = q5_high_bits(&b[2..6]);
    let qs = &b[6..22];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = ((qs[j] as u32 & 0xF | h0) as i32 - 16) as f32 * d;
        y[j + 16] = ((qs[j] as u32 >> 4 | h1) as i32 - 16) as f32 * d;
    }
}

/// `block_q5_1`: f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles; w = d * q + m.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = q5_high_bits(&b[4..8]);
    let qs = &b[8..24];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) << 4;
        let h1 = ((qh >> (j + 16)) & 1) << 4;
        y[j] = (qs[j] as u32 & 0xF | h0) as f32 * d + m;
        y[j + 16] = (qs[j] as u32 >> 4 | h1) as f32 * d + m;
    }
}

/// `block_q8_0`: f16 d, 32 signed bytes; w = d * q.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = q as i8 as f32 * d;
    }
}

/// `block_q2_K`: 16 bytes of 4-bit scale|min pairs (low nibble scale, high nibble min) for the 16
/// groups of 16 weights, 64 bytes of 2-bit quants, f16 d, f16 dmin. Each 32-byte run of quants holds
/// 128 weights as four 2-bit planes (shift 0, 2, 4, 6), each plane two groups of 16.
/// w = d * scale * q - dmin * min.
fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    let mut is = 0;
    let mut out = 0;
    for half in 0..QK_K / 128 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for &ql in &q[part * 16..part * 16 + 16] {
                    y[out] = dl * ((ql >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// Unpacks Q3_K's sixteen 6-bit scales from 12 bytes: bytes 0..8 hold the low nibbles (byte k has
/// scale k in its low nibble and scale k+8 in its high one), bytes 8..12 the top two bits (byte 8+k
/// has scales k, k+4, k+8, k+12 at bit positions 0, 2, 4, 6). Returned with the bias of 32 removed.
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (k, o) in out.iter_mut().enumerate() {
        let low = if k < 8 { s[k] & 0xF } else { s[k - 8] >> 4 };
        let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        *o = (low | high << 4) as i32 - 32;
    }
    out
}

/// `block_q3_K`: 32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes of 6-bit scales,
/// f16 d. The 2-bit planes are laid out as in Q2_K; the third bit of weight (plane p, position l)
/// is bit p of `hmask[l]` (p counting across both 128-weight halves), and a *clear* bit subtracts 4.
/// w = d * (scale - 32) * (q - 4 * !h).
fn block_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let scales = q3_k_scales(&b[96..108]);
    let d = f16_at(b, 108);
    let mut is = 0;
    let mut out = 0;
    let mut m: u8 = 1;
    for half in 0..QK_K / 128 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * scales[is] as f32;
                is += 1;
                for l in part * 16..part * 16 + 16 {
                    let low = ((q[l] >> shift) & 3) as i32;
                    let sub = if hmask[l] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - sub) as f32;
                    out += 1;
                }
            }
            m = m.wrapping_shl(1);
        }
    }
}

/// ggml's `get_scale_min_k4`: scale and min `j` (0..8) of Q4_K/Q5_K, 6 bits each, packed in 12 bytes.
/// Pairs 0..4 sit in the low 6 bits of bytes j and j+4; pairs 4..8 take their low 4 bits from byte
/// j+4 (scale: low nibble, min: high nibble) and their top 2 bits from the spare top bits of bytes
/// j-4 (scale) and j (min).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K`: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 groups of 32, 128 bytes
/// of nibbles. Each 32-byte run holds 64 weights: the low nibbles are group 2i, the high nibbles
/// group 2i+1. w = d * scale * q - dmin * min.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (i, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

/// `block_q5_K`: as Q4_K with 32 bytes of fifth bits between the scales and the nibbles: the fifth
/// bit of weight l of group g is bit g of `qh[l]`.
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for (i, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * i, scales);
        let (sc2, m2) = scale_min_k4(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * i), 2u8 << (2 * i));
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
            y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
        }
    }
}

/// `block_q6_K`: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 signed 8-bit scales (one
/// per 16 weights), f16 d. Per 128 weights: 64 `ql` bytes, 32 `qh` bytes, 8 scales; weight l + 32k
/// (k = 0..4) takes nibble (k / 2) of `ql[l + 32 * (k % 2)]` and bits 2k..2k+2 of `qh[l]`.
/// w = d * scale * (q - 32).
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let sc_all = &b[192..208];
    let d = f16_at(b, 208);
    for n in 0..QK_K / 128 {
        let ql = &ql_all[n * 64..n * 64 + 64];
        let qh = &qh_all[n * 32..n * 32 + 32];
        let sc = &sc_all[n * 8..n * 8 + 8];
        let y = &mut y[n * 128..n * 128 + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * sc[is] as i8 as f32 * q1 as f32;
            y[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
            y[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
            y[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
        }
    }
}

/// `block_q1_0` (Bonsai's 1-bit format): f16 d, then 16 bytes holding one sign bit per weight, least
/// significant bit first within each byte; a set bit is +d, a clear bit -d.
fn block_q1_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, yj) in y.iter_mut().enumerate() {
        let bit = (b[2 + j / 8] >> (j % 8)) & 1;
        *yj = if bit == 1 { d } else { -d };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_lengths_and_types() {
        let mut dst = [0f32; 32];
        assert!(dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut dst).is_ok());
        let e = dequantize_row(GgmlType::Q4_0, &[0u8; 17], &mut dst).unwrap_err();
        assert!(e.to_string().contains("18 bytes"), "{e}");
        let e = dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut dst[..31]).unwrap_err();
        assert!(e.to_string().contains("block size 32"), "{e}");
        for ty in [GgmlType::Q8_1, GgmlType::Q8K, GgmlType::I32, GgmlType::F64] {
            let e = dequantize_row(ty, &[], &mut []).unwrap_err();
            assert!(matches!(e, Error::UnsupportedType(_)), "{e}");
            assert!(e.to_string().contains(ty.name()), "{e}");
        }
    }

    #[test]
    fn q3_k_scale_unpacking_matches_ggml_bit_twiddling() {
        // ggml's version: four u32 words rearranged with masks.
        let s: [u8; 12] = [
            0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xF0, 0x1B, 0xE4, 0x72, 0xC9,
        ];
        let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
        let (k1, k2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
        let (a0, a1, tmp) = (w(0), w(1), w(2));
        let aux = [
            (a0 & k2) | ((tmp & k1) << 4),
            (a1 & k2) | (((tmp >> 2) & k1) << 4),
            ((a0 >> 4) & k2) | (((tmp >> 4) & k1) << 4),
            ((a1 >> 4) & k2) | (((tmp >> 6) & k1) << 4),
        ];
        let bytes: Vec<i32> = aux
            .iter()
            .flat_map(|a| a.to_le_bytes())
            .map(|b| b as i8 as i32 - 32)
            .collect();
        assert_eq!(q3_k_scales(&s).to_vec(), bytes);
    }
}
