//! The panel GEMM: products of many tokens (prompt processing, batches) with packed weights of any
//! format, on 8-bit activations.
//!
//! The per-row kernels ([`super::gemm_tile`]) reduce each 32-weight block to a scalar per token,
//! which costs a horizontal sum, a conversion and a scale per token and block. Here the tokens lie
//! across the SIMD lanes instead: activations of `T` tokens (a *panel*) are interleaved in 4-byte
//! groups, `[block][group of 4 weights][token][4 bytes]`, so that one `vpdpbusd` of a weight dword
//! broadcast to every lane with 64 activation bytes adds 4 products to each of `T` token sums. A block
//! of 32 weights costs 8 such instructions for all `T` tokens, and its scales are applied to whole
//! vectors of tokens.
//!
//! Weights are first unpacked, one tile of rows at a time, to unsigned 8-bit codes with one
//! f32 scale `dw` and one offset term `mw` per 32-weight block, so a single kernel serves every
//! format. Asymmetric formats: row · x = Σ_blocks dw·(dx·Σ c·q) + mw·sx, where `sx` is the block's
//! activation sum (`dx·Σq` exact, or ggml's f16-rounded Q8_1 sum for Q4_1 so rounding matches
//! llama.cpp's). Symmetric formats subtract their offset in integers before scaling,
//! Σ_blocks dw·dx·((Σ c·q << a) − (Σq << b)), because in floats the two large terms would cancel
//! and lose most of the product's precision (the offset 2^b is 8 for Q4_0, 128 for Q8_0; a = 1
//! for 1-bit codes, whose values are 2c − 1).
//! Unsigned codes × signed activations is what `vpdpbusd`/`vpmaddubsw` multiply; with AVX2's
//! `vpmaddubsw` pairs of products must fit in i16, so 8-bit codes there take the per-row kernels.

use super::Isa;
use crate::quant::activation::{Q8Acts, QK8};
use crate::quant::pq::{Pq, CHUNK};
use crate::quant::GgmlType;

/// Tokens per panel on an instruction set (lanes of i32 in its vectors).
pub fn panel_tokens(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => 16,
        _ => 8,
    }
}

/// Whether the panel GEMM computes weights of type `ty` on `isa`.
pub fn supports(isa: Isa, ty: GgmlType) -> bool {
    let Some(p) = Pq::of_ggml(ty) else {
        return false;
    };
    // AVX2's vpmaddubsw would saturate on pairs of 8-bit codes.
    isa != Isa::Avx2 || p.bits < 8
}

/// Activations of `n` tokens in panels of `t` (the last panel padded with zero tokens).
#[derive(Debug, Default)]
pub struct PanelActs {
    pub t: usize,
    pub n: usize,
    /// Blocks of 32 per token row.
    pub nb: usize,
    /// `[panel][block][group][token][4]`.
    pub qs: Vec<i8>,
    /// `[panel][block][token]`: activation scales.
    pub dx: Vec<f32>,
    /// `[panel][block][token]`: exact block sums `dx·Σq`.
    pub sx: Vec<f32>,
    /// `[panel][block][token]`: f16-rounded block sums (ggml's Q8_1 `s`).
    pub sf: Vec<f32>,
    /// `[panel][block][token]`: integer block sums `Σq`.
    pub xi: Vec<i32>,
}

impl PanelActs {
    pub fn panels(&self) -> usize {
        self.n.div_ceil(self.t)
    }

    /// Rearranges 8-bit activations into panels of `t` tokens, reusing buffers.
    pub fn pack(&mut self, q8: &Q8Acts, t: usize) {
        let (n, nb) = (q8.rows, q8.blocks_per_row());
        let np = n.div_ceil(t);
        self.t = t;
        self.n = n;
        self.nb = nb;
        self.qs.clear();
        self.qs.resize(np * nb * QK8 * t, 0);
        for v in [&mut self.dx, &mut self.sx, &mut self.sf] {
            v.clear();
            v.resize(np * nb * t, 0.0);
        }
        self.xi.clear();
        self.xi.resize(np * nb * t, 0);
        for tok in 0..n {
            let (p, lane) = (tok / t, tok % t);
            for b in 0..nb {
                let src = &q8.qs[(tok * nb + b) * QK8..(tok * nb + b + 1) * QK8];
                let base = (p * nb + b) * QK8 * t;
                for g in 0..QK8 / 4 {
                    let dst = base + (g * t + lane) * 4;
                    self.qs[dst..dst + 4].copy_from_slice(&src[g * 4..g * 4 + 4]);
                }
                let i = (p * nb + b) * t + lane;
                let k = tok * nb + b;
                self.dx[i] = q8.d[k];
                self.sx[i] = q8.d[k] * q8.isum[k] as f32;
                self.sf[i] = q8.s[k];
                self.xi[i] = q8.isum[k];
            }
        }
    }
}

/// Weight rows unpacked for the panel GEMM: codes, and per block a scale and an offset term.
#[derive(Debug, Default)]
pub struct UnpackedRows {
    pub nb: usize,
    pub codes: Vec<u8>,
    pub dw: Vec<f32>,
    pub mw: Vec<f32>,
    /// The offset term multiplies ggml's rounded sums (`sf`) rather than the exact ones.
    pub rounded_sums: bool,
    /// Symmetric formats: the integer offset `(a, b)` (see the module docs); `mw` is then zero.
    pub sym_shifts: Option<(u32, u32)>,
}

impl UnpackedRows {
    /// Unpacks `rows` consecutive rows of `cols` weights of type `ty` (which [`supports`]).
    pub fn unpack(&mut self, ty: GgmlType, w: &[u8], rows: usize, cols: usize) {
        let p = Pq::of_ggml(ty).expect("panel GEMM on a type without a pq twin");
        let nb = cols.div_ceil(QK8);
        let rb = w.len() / rows.max(1);
        self.nb = nb;
        self.rounded_sums = ty == GgmlType::Q4_1;
        self.sym_shifts = match (p.sym, p.bits) {
            (false, _) => None,
            (true, 1) => Some((1, 0)),
            (true, k) => Some((0, k as u32 - 1)),
        };
        self.codes.resize(rows * nb * QK8, 0);
        self.dw.resize(rows * nb, 0.0);
        self.mw.resize(rows * nb, 0.0);
        let mut chunk = [0u8; CHUNK];
        for r in 0..rows {
            let row = &w[r * rb..(r + 1) * rb];
            let mut b = r * nb;
            for (h, chunks, _) in p.groups(row, cols) {
                let (dw, mw) = p.header(h);
                for ch in chunks.chunks_exact(p.chunk_bytes()) {
                    p.unpack_chunk(ch, &mut chunk);
                    self.codes[b * QK8..(b + 1) * QK8].copy_from_slice(&chunk);
                    self.dw[b] = dw;
                    self.mw[b] = mw;
                    b += 1;
                }
            }
        }
    }
}

/// `out[t * ldo + r] = row r · token t` for rows `r0..r1` of `w` and every token of `x`.
///
/// # Safety
/// The CPU must support `isa`; `out` must be valid for writes at every `t * ldo + r` for the
/// tokens of `x` and the rows `r0..r1`, with no other access to them during the call.
pub unsafe fn gemm(
    isa: Isa,
    w: &UnpackedRows,
    rows: std::ops::Range<usize>,
    x: &PanelActs,
    out: *mut f32,
    ldo: usize,
) {
    assert_eq!(w.nb, x.nb);
    assert_eq!(x.t, panel_tokens(isa));
    let sums = if w.rounded_sums { &x.sf } else { &x.sx };
    let nb = x.nb;
    for p in 0..x.panels() {
        let xq = &x.qs[p * nb * QK8 * x.t..(p + 1) * nb * QK8 * x.t];
        let dx = &x.dx[p * nb * x.t..(p + 1) * nb * x.t];
        let sx = &sums[p * nb * x.t..(p + 1) * nb * x.t];
        let xi = &x.xi[p * nb * x.t..(p + 1) * nb * x.t];
        let a = Acts { xq, dx, sx, xi };
        let valid = (x.n - p * x.t).min(x.t);
        let mut r = rows.start;
        while r < rows.end {
            let k = (rows.end - r).min(4);
            let mut res = [[0.0f32; 16]; 4];
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => super::panel_x86::rows_avx512(w, r, k, &a, &mut res),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => super::panel_x86::rows_avx2(w, r, k, &a, &mut res),
                _ => rows_scalar(w, r, k, x.t, &a, &mut res),
            }
            for (i, rr) in res[..k].iter().enumerate() {
                for (lane, &v) in rr[..valid].iter().enumerate() {
                    *out.add((p * x.t + lane) * ldo + r + i) = v;
                }
            }
            r += k;
        }
    }
}

/// One panel's activations, as the kernels read them.
pub struct Acts<'a> {
    pub xq: &'a [i8],
    pub dx: &'a [f32],
    /// The float block sums the asymmetric offset term multiplies.
    pub sx: &'a [f32],
    /// The integer block sums symmetric formats subtract.
    pub xi: &'a [i32],
}

/// Scalar reference of one panel × `k` rows starting at `r`.
pub fn rows_scalar(
    w: &UnpackedRows,
    r: usize,
    k: usize,
    t: usize,
    a: &Acts,
    res: &mut [[f32; 16]; 4],
) {
    let Acts { xq, dx, sx, xi } = *a;
    let nb = w.nb;
    for (i, acc) in res[..k].iter_mut().enumerate() {
        let row = r + i;
        for lane in 0..t {
            let mut sum = 0.0f32;
            for b in 0..nb {
                let c = &w.codes[(row * nb + b) * QK8..(row * nb + b + 1) * QK8];
                let mut isum = 0i32;
                for g in 0..QK8 / 4 {
                    for j in 0..4 {
                        let q = xq[((b * (QK8 / 4) + g) * t + lane) * 4 + j];
                        isum += c[g * 4 + j] as i32 * q as i32;
                    }
                }
                let off = match w.sym_shifts {
                    Some((sc, sq)) => {
                        isum = (isum << sc) - (xi[b * t + lane] << sq);
                        0.0
                    }
                    None => w.mw[row * nb + b] * sx[b * t + lane],
                };
                sum += w.dw[row * nb + b] * (dx[b * t + lane] * isum as f32) + off;
            }
            acc[lane] = sum;
        }
    }
}
