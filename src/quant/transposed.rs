//! The transposed-group layout of a pq matrix: the *same* quantized values as the row-major
//! source, reordered so that each input's codes for every output are contiguous. Sparse FFN
//! execution (`crate::model::sparse_ffn`) reads it to skip inputs whose activation is near zero:
//! a skipped input is a skipped contiguous run of codes.
//!
//! # Why not transpose and re-quantize
//! A source matrix `W` (rows = outputs, groups of `g` weights along the input dimension, each with
//! its scale `d[o, gi]` and minimum `m[o, gi]`) cannot simply be transposed and quantized again:
//! the transposed rows would group weights of different source groups under new scales, and
//! re-quantizing an already 4-bit model that way costs as much perplexity as skipping 30% of the
//! FFN (measured in BENCHMARKS.md, issue 7). Keeping the source's groups and moving only the bytes
//! makes the copy exact: every weight dequantizes to the bit-identical value.
//!
//! # Layout
//! For a matrix of `n_out` outputs by `n_in` inputs in pq format `p` (group `g`, `k` bits), with
//! outputs padded to `n_out_pad = 32·⌈n_out/32⌉`, the bytes are the input groups `gi = 0, 1, …` in
//! order; group `gi` covers inputs `gi·g .. min((gi+1)·g, n_in)` (the last one shorter, as in the
//! source's rows) and is:
//! 1. its scales: `d[o, gi]` for `o < n_out_pad` as f16 (padding outputs 0), then, when `p` is
//!    asymmetric, `m[o, gi]` the same way: `n_out_pad · header_bytes` bytes;
//! 2. for each input `j` of the group in order, the codes `c[o, j]` of every output: `n_out_pad/32`
//!    chunks of 32 outputs, each packed exactly as a pq chunk of 32 weights (bit planes, see
//!    [`crate::quant::pq`]; padding outputs have code 0).
//!
//! Every full group takes the same bytes ([`Layout::group_bytes`]), so input `j`'s codes start at
//! `(j / g)·group_bytes + scale_bytes + (j mod g)·code_row_bytes`. The total equals the source's
//! size when `n_out` is a multiple of 32 and `n_in` one of 32 (the source pads a tail group's
//! codes to 32 inputs; this layout pads outputs to 32 instead).
//!
//! Which outputs and inputs: the copy keeps the source's output and input order. Reordering the
//! inputs across groups would regroup weights under other scales (inexact), so a hot-first neuron
//! order, which permutes `ffn_down`'s inputs, is not applied to the copies: the hot neurons are a
//! set, tested per token (see `crate::model::sparse_ffn`).

use half::f16;

use super::matmul::WeightBytes;
use super::pq::{Pq, CHUNK};
use crate::error::{Error, Result};

/// Shape and format of a transposed-group matrix, and where each part of it lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub pq: Pq,
    pub n_out: usize,
    pub n_in: usize,
}

impl Layout {
    pub fn new(pq: Pq, n_out: usize, n_in: usize) -> Result<Layout> {
        if n_out == 0 || n_in == 0 {
            return Err(Error::Invalid(format!(
                "a transposed-group matrix needs outputs and inputs, got {n_out}x{n_in}"
            )));
        }
        Ok(Layout { pq, n_out, n_in })
    }

    /// Chunks of 32 outputs per input.
    pub fn out_chunks(&self) -> usize {
        self.n_out.div_ceil(CHUNK)
    }

    pub fn n_out_pad(&self) -> usize {
        self.out_chunks() * CHUNK
    }

    /// Inputs per group (the last group may be shorter).
    pub fn group(&self) -> usize {
        self.pq.group as usize
    }

    pub fn n_groups(&self) -> usize {
        self.n_in.div_ceil(self.group())
    }

    /// Bytes of one group's scales (and minimums).
    pub fn scale_bytes(&self) -> usize {
        self.n_out_pad() * self.pq.header_bytes()
    }

    /// Bytes of one input's codes for every output.
    pub fn code_row_bytes(&self) -> usize {
        self.out_chunks() * self.pq.chunk_bytes()
    }

    /// Bytes of a full group.
    pub fn group_bytes(&self) -> usize {
        self.scale_bytes() + self.group() * self.code_row_bytes()
    }

    /// Inputs in group `gi`.
    pub fn group_len(&self, gi: usize) -> usize {
        (self.n_in - gi * self.group()).min(self.group())
    }

    /// Total bytes.
    pub fn bytes(&self) -> usize {
        let (full, tail) = (self.n_in / self.group(), self.n_in % self.group());
        full * self.group_bytes()
            + if tail == 0 {
                0
            } else {
                self.scale_bytes() + tail * self.code_row_bytes()
            }
    }

    /// Where group `gi`'s scales start.
    pub fn scales_offset(&self, gi: usize) -> usize {
        gi * self.group_bytes()
    }

    /// Where input `j`'s codes start.
    pub fn code_offset(&self, j: usize) -> usize {
        let g = self.group();
        j / g * self.group_bytes() + self.scale_bytes() + j % g * self.code_row_bytes()
    }

    /// The transposed-group bytes of a row-major pq matrix (`n_out` rows of `n_in` weights, rows
    /// of [`Pq::row_bytes`]): the same scales and codes, moved.
    pub fn from_rows(&self, src: &[u8]) -> Result<Vec<u8>> {
        let p = self.pq;
        let rb = p.row_bytes(self.n_in);
        if src.len() != self.n_out * rb {
            return Err(Error::Invalid(format!(
                "{} bytes do not hold {} rows of {} {} weights",
                src.len(),
                self.n_out,
                self.n_in,
                p.name()
            )));
        }
        let (np, hb, cb) = (self.n_out_pad(), p.header_bytes(), p.chunk_bytes());
        let mut out = vec![0u8; self.bytes()];
        // Codes of one output chunk (32 outputs) for every input, gathered before packing.
        let mut codes = vec![[0u8; CHUNK]; self.n_in];
        let mut unpacked = [0u8; CHUNK];
        for oc in 0..self.out_chunks() {
            for c in codes.iter_mut() {
                c.fill(0);
            }
            for o in oc * CHUNK..((oc + 1) * CHUNK).min(self.n_out) {
                let row = &src[o * rb..(o + 1) * rb];
                for (gi, (h, chunks, w)) in p.groups(row, self.n_in).enumerate() {
                    let s = self.scales_offset(gi);
                    out[s + 2 * o..s + 2 * o + 2].copy_from_slice(&h[..2]);
                    if hb == 4 {
                        out[s + 2 * np + 2 * o..s + 2 * np + 2 * o + 2].copy_from_slice(&h[2..4]);
                    }
                    for (k, ch) in chunks.chunks_exact(cb).enumerate() {
                        p.unpack_chunk(ch, &mut unpacked);
                        let j0 = gi * self.group() + k * CHUNK;
                        for (t, &c) in unpacked.iter().enumerate().take(w - k * CHUNK) {
                            codes[j0 + t][o - oc * CHUNK] = c;
                        }
                    }
                }
            }
            for (j, c) in codes.iter().enumerate() {
                let at = self.code_offset(j) + oc * cb;
                p.pack_chunk(c, &mut out[at..at + cb]);
            }
        }
        Ok(out)
    }

    /// Scale and minimum of output `o` in group `gi` (the minimum is 0 for symmetric formats).
    pub fn scale(&self, tg: &[u8], gi: usize, o: usize) -> (f32, f32) {
        let s = self.scales_offset(gi);
        let h = |at: usize| f16::from_le_bytes([tg[at], tg[at + 1]]).to_f32();
        let m = if self.pq.sym {
            0.0
        } else {
            h(s + 2 * self.n_out_pad() + 2 * o)
        };
        (h(s + 2 * o), m)
    }

    /// Every weight as f32, row-major (`w[o·n_in + j]`), from the transposed-group bytes: the
    /// definition the sparse kernels are tested against, and equal bit for bit to the source's
    /// dequantized rows.
    pub fn dequantize(&self, tg: &[u8]) -> Result<Vec<f32>> {
        self.check(tg.len())?;
        let p = self.pq;
        let cb = p.chunk_bytes();
        let mut w = vec![0f32; self.n_out * self.n_in];
        let mut codes = [0u8; CHUNK];
        for j in 0..self.n_in {
            let gi = j / self.group();
            for oc in 0..self.out_chunks() {
                let at = self.code_offset(j) + oc * cb;
                p.unpack_chunk(&tg[at..at + cb], &mut codes);
                for (t, &c) in codes.iter().enumerate() {
                    let o = oc * CHUNK + t;
                    if o < self.n_out {
                        let (d, m) = self.scale(tg, gi, o);
                        w[o * self.n_in + j] = p.value(c, d, m);
                    }
                }
            }
        }
        Ok(w)
    }

    /// Errors unless `len` is this layout's size.
    pub fn check(&self, len: usize) -> Result<()> {
        if len != self.bytes() {
            return Err(Error::Invalid(format!(
                "{len} bytes are not a transposed-group {} matrix of {}x{} ({} bytes)",
                self.pq.name(),
                self.n_out,
                self.n_in,
                self.bytes()
            )));
        }
        Ok(())
    }
}

/// A transposed-group matrix and its bytes (a window of a mapped file, or owned).
#[derive(Clone)]
pub struct TgMatrix {
    pub name: String,
    pub layout: Layout,
    bytes: WeightBytes,
}

impl std::fmt::Debug for TgMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.layout;
        write!(f, "TgMatrix({} {} {}x{})", self.name, l.pq, l.n_out, l.n_in)
    }
}

impl TgMatrix {
    /// Checks that `bytes` has the layout's size.
    pub fn new(name: &str, layout: Layout, bytes: WeightBytes) -> Result<TgMatrix> {
        layout
            .check(bytes.as_slice().len())
            .map_err(|e| Error::Model(format!("{name}: {e}")))?;
        Ok(TgMatrix {
            name: name.to_string(),
            layout,
            bytes,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize::{quantize_row, Method, Options};
    use crate::quant::GgmlType;

    #[test]
    fn transposing_keeps_every_value_bit_for_bit() {
        let opts = Options {
            method: Method::Rtn,
            importance: None,
        };
        let mut s = 1u32;
        let mut next = move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        for p in Pq::all() {
            for (n_out, n_in) in [(1, 1), (33, 70), (64, 160), (5, 300)] {
                let l = Layout::new(p, n_out, n_in).unwrap();
                let rb = p.row_bytes(n_in);
                let mut src = vec![0u8; n_out * rb];
                let mut want = vec![0f32; n_out * n_in];
                for o in 0..n_out {
                    let x: Vec<f32> = (0..n_in).map(|_| next()).collect();
                    quantize_row(GgmlType::Pq(p), &x, &opts, &mut src[o * rb..(o + 1) * rb])
                        .unwrap();
                    p.dequantize_row(&src[o * rb..(o + 1) * rb], &mut want[o * n_in..][..n_in])
                        .unwrap();
                }
                let tg = l.from_rows(&src).unwrap();
                assert_eq!(tg.len(), l.bytes());
                let got = l.dequantize(&tg).unwrap();
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{p} {n_out}x{n_in}"
                );
                if n_out % 32 == 0 && n_in % 32 == 0 {
                    assert_eq!(tg.len(), src.len(), "{p}: same bytes as the source");
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let p = Pq::parse("q4_g32").unwrap();
        let l = Layout::new(p, 32, 64).unwrap();
        assert!(l.from_rows(&[0u8; 7]).is_err());
        assert!(l.dequantize(&[0u8; 7]).is_err());
        assert!(Layout::new(p, 0, 3).is_err());
    }
}
