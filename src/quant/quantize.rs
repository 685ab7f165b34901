//! Quantization: f32 weights to a stored format, by round-to-nearest or by a search for the scale
//! (and minimum) of each group that minimises the squared error, optionally weighted per column by
//! activation importance (the mean square of the inputs each column meets, which the planner
//! collects): then the error minimised is an estimate of the error of the layer's *output*.
//!
//! The search follows the idea of ggml's `make_qx_quants`/`make_qkx2_quants`: try a grid of scales
//! around the round-to-nearest one, assign codes for each, refit scale (and minimum) to those codes
//! by weighted least squares, keep the best. The kept scale and minimum are rounded to f16 as stored
//! and the codes reassigned for them, so the error measured is the error of what is stored.

use half::{bf16, f16};

use super::pq::{Pq, CHUNK};
use super::GgmlType;
use crate::error::{Error, Result};

/// How a group's parameters are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Scale and minimum from the group's range (ggml's reference quantizers).
    Rtn,
    /// Error-minimising search (the default).
    #[default]
    Search,
}

/// Options of a quantization.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options<'a> {
    pub method: Method,
    /// One non-negative weight per column (row position): how much an error there costs.
    pub importance: Option<&'a [f32]>,
}

/// Whether pare can write `ty` (every pq format, the legacy ggml types identical to one, and the
/// float types).
pub fn can_quantize(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) || Pq::of_ggml(ty).is_some()
}

/// Quantizes one row `x` into `out` (exactly `ty.row_bytes(x.len())` bytes).
pub fn quantize_row(ty: GgmlType, x: &[f32], opts: &Options, out: &mut [u8]) -> Result<()> {
    let n = x.len();
    let rb = ty.row_bytes(n)?;
    if out.len() != rb {
        return Err(Error::Invalid(format!(
            "a row of {n} {ty} weights takes {rb} bytes, not {}",
            out.len()
        )));
    }
    if let Some(imp) = opts.importance {
        if imp.len() != n {
            return Err(Error::Invalid(format!(
                "importance has {} values for rows of {n}",
                imp.len()
            )));
        }
    }
    match ty {
        GgmlType::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(x) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(x) {
                o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            let p = Pq::of_ggml(ty)
                .ok_or_else(|| Error::UnsupportedType(format!("pare cannot quantize to {ty}")))?;
            quantize_pq_row(p, x, opts, out);
        }
    }
    Ok(())
}

/// Quantizes consecutive rows of `row_len` weights, rows split across the worker threads.
pub fn quantize_rows(
    ty: GgmlType,
    x: &[f32],
    row_len: usize,
    opts: &Options,
    out: &mut [u8],
) -> Result<()> {
    if row_len == 0 || !x.len().is_multiple_of(row_len) {
        return Err(Error::Invalid(format!(
            "{} weights are not whole rows of {row_len}",
            x.len()
        )));
    }
    let rb = ty.row_bytes(row_len)?;
    let rows = x.len() / row_len;
    if out.len() != rows * rb {
        return Err(Error::Invalid(format!(
            "{rows} rows of {ty} take {} bytes, not {}",
            rows * rb,
            out.len()
        )));
    }
    if !can_quantize(ty) {
        return Err(Error::UnsupportedType(format!(
            "pare cannot quantize to {ty}"
        )));
    }
    let outs = crate::parallel::DisjointMut::new(out);
    let err = std::sync::Mutex::new(None);
    crate::parallel::for_each(rows, &|r| {
        // SAFETY: each row index writes only its own byte range.
        let o = unsafe { std::slice::from_raw_parts_mut(outs.ptr().add(r * rb), rb) };
        if let Err(e) = quantize_row(ty, &x[r * row_len..(r + 1) * row_len], opts, o) {
            *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
    });
    match err.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn quantize_pq_row(p: Pq, x: &[f32], opts: &Options, out: &mut [u8]) {
    let g = p.group as usize;
    let mut off = 0;
    let mut codes = vec![0u8; g];
    let mut w = vec![0f32; g];
    for (gi, xg) in x.chunks(g).enumerate() {
        let n = xg.len();
        let wg = &mut w[..n];
        match opts.importance {
            // A small floor keeps columns that were never active from being ignored entirely.
            Some(imp) => {
                let imp = &imp[gi * g..gi * g + n];
                let mean = imp.iter().sum::<f32>() / n as f32;
                for (wi, &v) in wg.iter_mut().zip(imp) {
                    *wi = v.max(0.0) + 1e-3 * mean + f32::MIN_POSITIVE;
                }
            }
            None => wg.fill(1.0),
        }
        let (d, m) = quantize_group(p, xg, wg, opts.method, &mut codes[..n]);
        off += store_group(p, d, m, &codes[..n], &mut out[off..]);
    }
    debug_assert_eq!(off, out.len());
}

/// Writes one group (header, then its codes packed in chunks) at the start of `out`; returns the
/// bytes written.
fn store_group(p: Pq, d: f32, m: f32, codes: &[u8], out: &mut [u8]) -> usize {
    let (hb, cb) = (p.header_bytes(), p.chunk_bytes());
    let hdr = &mut out[..hb];
    hdr[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    if !p.sym {
        hdr[2..4].copy_from_slice(&f16::from_f32(m).to_le_bytes());
    }
    let mut off = hb;
    for ch in codes.chunks(CHUNK) {
        let mut c = [0u8; CHUNK];
        c[..ch.len()].copy_from_slice(ch);
        p.pack_chunk(&c, &mut out[off..off + cb]);
        off += cb;
    }
    off
}

/// Quantizes one row `x` of format `p` onto a given grid: group `i` gets scale `d[i]` and minimum
/// `m[i]` (rounded to f16 as stored) and the codes nearest to its values for them. This is how
/// adapters trained against a grid ([`crate::train::fake_quant`]) are merged: the grid is kept,
/// not searched anew.
pub fn quantize_pq_row_on_grid(p: Pq, x: &[f32], d: &[f32], m: &[f32], out: &mut [u8]) {
    let g = p.group as usize;
    let mut codes = vec![0u8; g];
    let mut off = 0;
    for (i, xg) in x.chunks(g).enumerate() {
        let (d, m) = (f16_round(d[i]), if p.sym { 0.0 } else { f16_round(m[i]) });
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let cg = &mut codes[..xg.len()];
        for (c, &v) in cg.iter_mut().zip(xg) {
            *c = p.code(v, id, m);
        }
        off += store_group(p, d, m, cg, &mut out[off..]);
    }
    debug_assert_eq!(off, out.len());
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Chooses (d, m) for one group and writes its codes; d and m are returned already rounded to f16,
/// and the codes are those nearest to `x` for the rounded values.
pub fn quantize_group(p: Pq, x: &[f32], w: &[f32], method: Method, codes: &mut [u8]) -> (f32, f32) {
    let nmax = p.max_code() as f32;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in x {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if x.is_empty() || !lo.is_finite() || !hi.is_finite() {
        codes.fill(0);
        return (0.0, 0.0);
    }
    if !p.sym {
        let (mut d, mut m) = ((hi - lo) / nmax, lo);
        if method == Method::Search && hi > lo && p.bits < 8 {
            let (sw, sx, sxx) = weighted_moments(x, w);
            let mut best = f32::INFINITY;
            for is in -20..=20 {
                let iscale = (nmax + 0.05 * is as f32) / (hi - lo);
                if iscale <= 0.0 {
                    continue;
                }
                // One pass per candidate: the codes' weighted moments give the least-squares
                // (d, m) and its error in closed form.
                let [sc, scc, scx] =
                    code_moments(x, w, |v| round_fast((v - lo) * iscale).clamp(0.0, nmax));
                let (sw, sc, scc, sx, scx) =
                    (sw as f64, sc as f64, scc as f64, sx as f64, scx as f64);
                let det = sw * scc - sc * sc;
                if det <= 1e-12 * sw * scc {
                    continue;
                }
                let dd = (sw * scx - sc * sx) / det;
                let mm = (scc * sx - sc * scx) / det;
                let e = dd * dd * scc + 2.0 * dd * mm * sc + mm * mm * sw
                    - 2.0 * dd * scx
                    - 2.0 * mm * sx
                    + sxx as f64;
                if (e as f32) < best {
                    best = e as f32;
                    (d, m) = (dd as f32, mm as f32);
                }
            }
        }
        let (d, m) = (f16_round(d), f16_round(m));
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = p.code(v, id, m);
        }
        return (d, m);
    }
    if p.bits == 1 {
        // Signs are fixed by x; the best scale for them is the weighted mean of |x|.
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for ((c, &v), &wi) in codes.iter_mut().zip(x).zip(w) {
            *c = (v >= 0.0) as u8;
            num += (wi * v.abs()) as f64;
            den += wi as f64;
        }
        let d = if den > 0.0 { (num / den) as f32 } else { 0.0 };
        return (f16_round(d), 0.0);
    }
    let half = (1u32 << (p.bits - 1)) as f32;
    let (qmin, qmax) = (-half, half - 1.0);
    // The value of largest magnitude, with its sign: mapped to -half as ggml's Q4_0 does, except for
    // 8 bits, where ±127 keeps the grid symmetric as in Q8_0.
    let extreme = if hi.abs() > lo.abs() { hi } else { lo };
    let mut d = if p.bits == 8 {
        extreme.abs() / 127.0
    } else {
        extreme / -half
    };
    // At 8 bits the squared-error optimum clips a group's extreme weight, which costs more in
    // perplexity than the rounding it saves (measured: q8_0 +0.78% vs +0.09% with RTN).
    if method == Method::Search && extreme != 0.0 && p.bits < 8 {
        let (_, _, sxx) = weighted_moments(x, w);
        let mut best = f32::INFINITY;
        for is in -20..=20 {
            let iscale = -(half + 0.05 * is as f32) / extreme;
            // sum w·q, Σ w·q², Σ w·q·x for the codes of this scale; error = Σwx² − (Σwqx)²/Σwq².
            let [_, sqq, sxq] = code_moments(x, w, |v| round_fast(v * iscale).clamp(qmin, qmax));
            if sqq <= 0.0 {
                continue;
            }
            let (sqq, sxq) = (sqq as f64, sxq as f64);
            let e = (sxx as f64 - sxq * sxq / sqq) as f32;
            if e < best {
                best = e;
                d = (sxq / sqq) as f32;
            }
        }
    }
    let d = f16_round(d);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = p.code(v, id, 0.0);
    }
    (d, 0.0)
}

/// Round to nearest (ties to even) for |v| < 2²²: adding and subtracting 1.5·2²³ leaves no fraction
/// bits. Two additions vectorize on every x86-64, where `f32::round` is a libm call without SSE4.1.
/// The search only ranks scales with it; stored codes use `round`.
#[inline(always)]
fn round_fast(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// Σw, Σw·x, Σw·x² of a group.
fn weighted_moments(x: &[f32], w: &[f32]) -> (f32, f32, f32) {
    let [a, b, c] = lanes(x, w, |v, wi| [wi, wi * v, wi * v * v]);
    (a, b, c)
}

/// Σw·c, Σw·c², Σw·c·x for the codes `code(x)` of a group.
#[inline(always)]
fn code_moments(x: &[f32], w: &[f32], code: impl Fn(f32) -> f32) -> [f32; 3] {
    let term = |v: f32, wi: f32| {
        let c = code(v);
        let wc = wi * c;
        [wc, wc * c, wc * v]
    };
    #[cfg(target_arch = "x86_64")]
    if crate::quant::kernels::isa() != crate::quant::kernels::Isa::Scalar {
        // SAFETY: isa() reports AVX2 (or better) only when the CPU has it.
        return unsafe { lanes_avx2(x, w, term) };
    }
    lanes(x, w, term)
}

/// [`lanes`] compiled for AVX2: the same operations in the same order (no FMA), so the same sums,
/// eight lanes per instruction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_avx2(x: &[f32], w: &[f32], term: impl Fn(f32, f32) -> [f32; 3]) -> [f32; 3] {
    lanes(x, w, term)
}

/// Three weighted sums over a group, accumulated in 8 independent lanes so the compiler can keep
/// them in vector registers (a single running sum cannot be reordered, so it would not vectorize).
#[inline(always)]
fn lanes(x: &[f32], w: &[f32], term: impl Fn(f32, f32) -> [f32; 3]) -> [f32; 3] {
    let mut acc = [[0f32; 8]; 3];
    let n8 = x.len() / 8 * 8;
    for (xc, wc) in x[..n8].chunks_exact(8).zip(w[..n8].chunks_exact(8)) {
        for l in 0..8 {
            let t = term(xc[l], wc[l]);
            for k in 0..3 {
                acc[k][l] += t[k];
            }
        }
    }
    let mut out = [0f32; 3];
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a.iter().sum();
    }
    for (&v, &wi) in x[n8..].iter().zip(&w[n8..]) {
        let t = term(v, wi);
        for k in 0..3 {
            out[k] += t[k];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequant::dequantize_row;

    fn rng_row(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 0.2
            })
            .collect()
    }

    fn mse(ty: GgmlType, x: &[f32], opts: &Options) -> f32 {
        let mut q = vec![0u8; ty.row_bytes(x.len()).unwrap()];
        quantize_row(ty, x, opts, &mut q).unwrap();
        let mut y = vec![0f32; x.len()];
        dequantize_row(ty, &q, &mut y).unwrap();
        x.iter()
            .zip(&y)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f32>()
            / x.len() as f32
    }

    #[test]
    fn error_falls_with_bits_and_search_beats_rtn() {
        let x = rng_row(576, 7);
        let mut last = f32::INFINITY;
        for bits in [1u8, 2, 3, 4, 5, 6, 8] {
            let ty = GgmlType::Pq(Pq::new(bits, 64, false).unwrap());
            let rtn = mse(
                ty,
                &x,
                &Options {
                    method: Method::Rtn,
                    importance: None,
                },
            );
            let search = mse(ty, &x, &Options::default());
            assert!(search <= rtn * 1.0001, "{ty}: search {search} > rtn {rtn}");
            assert!(search < last, "{ty}: {search} not below {last}");
            last = search;
        }
    }

    #[test]
    fn legacy_types_match_their_pq_twins() {
        let x = rng_row(256, 3);
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q5_1,
            GgmlType::Q8_0,
            GgmlType::Q1_0,
        ] {
            let p = GgmlType::Pq(Pq::of_ggml(ty).unwrap());
            let mut a = vec![0u8; ty.row_bytes(256).unwrap()];
            let mut b = vec![0u8; p.row_bytes(256).unwrap()];
            quantize_row(ty, &x, &Options::default(), &mut a).unwrap();
            quantize_row(p, &x, &Options::default(), &mut b).unwrap();
            assert_eq!(a, b, "{ty}");
            let mut ya = vec![0f32; 256];
            let mut yb = vec![0f32; 256];
            dequantize_row(ty, &a, &mut ya).unwrap();
            dequantize_row(p, &b, &mut yb).unwrap();
            assert_eq!(ya, yb, "{ty}");
        }
    }
}
