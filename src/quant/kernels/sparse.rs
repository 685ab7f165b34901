//! The sparse-input product on a transposed-group matrix ([`crate::quant::transposed`]):
//! `y[o] = Σ_{j ∈ J} x̂_j · W[o, j]` over the *active* inputs `J` only, where `x̂` are the 8-bit
//! activations of the dense path (blocks of 32 inputs, `x̂_j = s_b·q_j`, see
//! [`crate::quant::activation`]). Skipping an input skips its contiguous codes; a group's scales are
//! read when any of its inputs is active. With every input active this is the dense product of the
//! same weights and the same 8-bit activations (up to float summation order).
//!
//! Per input group `gi` of the weights (scale `d[o, gi]`, minimum `m[o, gi]`, codes `c`), with the
//! format's affine map `w = A·c + B` ([`affine`]):
//! `y[o] += A[o, gi] · Σ_{b ∈ gi} s_b · Σ_{j ∈ J ∩ b} q_j·c[o, j]  +  B[o, gi] · Σ_{b ∈ gi} s_b · Σ_{j ∈ J ∩ b} q_j`.
//! The inner sums are exact integers; scales are applied once per activation block and once per
//! weight group for every output.
//!
//! [`Active`] holds the active inputs of one activation vector, by block, in quads of four (the
//! AVX-512 path multiplies four inputs' codes at once with `vpdpbusd`; a short quad is padded with
//! `q = 0`). [`product_reference`] is the scalar path and the reference; the SIMD paths
//! (`sparse_x86.rs`) keep a tile of outputs in registers across all active inputs and equal it up
//! to float rounding.
//!
//! A call computes a range of outputs starting at a multiple of 32 (the sparse FFN takes every
//! output and splits a product across threads by inputs instead, see [`Active::split_into`]).

use std::ops::Range;

use super::Isa;
use crate::quant::activation::{Q8Row, QK8};
use crate::quant::pq::{Pq, CHUNK};
use crate::quant::transposed::{Layout, TgMatrix};

/// Four active inputs of one activation block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quad {
    /// Input indices (a short quad repeats its last input, with `q = 0`).
    pub inputs: [u32; 4],
    /// The four 8-bit activations, input `k` in byte `k` (little-endian).
    pub q: i32,
}

impl Quad {
    pub fn q(&self, k: usize) -> i8 {
        (self.q >> (8 * k)) as i8
    }
}

/// One block of 32 inputs with at least one active input.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// Block index: inputs `32·index ..`.
    pub index: u32,
    /// The block's activation scale `s_b`.
    pub d: f32,
    /// `s_b · Σ q_j` over the block's active inputs.
    pub qsum: f32,
    pub quads: Range<u32>,
}

/// Which inputs a threshold keeps: input `j` with value `v` is kept when it is hot or when
/// `|v|·scale[j] > t` (an empty `hot`: no input is hot; an empty `scale`: every weight 1, the
/// plain |activation| test). The sparse FFN's weight-aware rule scales each |value| by the norm
/// of the weights it multiplies (see [`crate::plan::sparsify`]). Both the sparse path and its
/// dense-path simulation decide with [`Keep::keeps`]' arithmetic, so they skip the same inputs.
#[derive(Debug, Clone, Copy)]
pub struct Keep<'a> {
    pub t: f32,
    pub hot: &'a [bool],
    pub scale: &'a [f32],
}

/// The value a [`Keep`] compares with its threshold: `|v|·scale[j]`, or `|v|` for an empty
/// `scale`. Calibration histograms the same value ([`crate::plan::sparsify`]).
#[inline]
pub fn weighted(v: f32, scale: &[f32], j: usize) -> f32 {
    if scale.is_empty() {
        v.abs()
    } else {
        v.abs() * scale[j]
    }
}

impl Keep<'_> {
    /// Whether input `j` of value `v` is kept.
    #[inline]
    pub fn keeps(&self, j: usize, v: f32) -> bool {
        self.hot.get(j).is_some_and(|&h| h) || weighted(v, self.scale, j) > self.t
    }

    /// Whether the rule covers `n` inputs.
    pub fn fits(&self, n: usize) -> bool {
        (self.hot.is_empty() || self.hot.len() >= n)
            && (self.scale.is_empty() || self.scale.len() >= n)
    }
}

/// The active inputs of one activation vector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Active {
    pub n_in: usize,
    /// Blocks with active inputs, increasing.
    pub blocks: Vec<Block>,
    pub quads: Vec<Quad>,
    /// Active inputs (padding not counted).
    pub n_active: usize,
}

impl Active {
    /// The inputs `j < n_in` for which `keep(j)` holds and whose 8-bit activation is not 0 (a zero
    /// contributes nothing, so it is skipped whatever `keep` says), reusing buffers.
    pub fn build(&mut self, x: &Q8Row, n_in: usize, keep: impl Fn(usize) -> bool) {
        self.build_by_mask(x, n_in, |lo, hi| {
            (lo..hi).fold(0, |m, j| m | (u32::from(keep(j)) << (j - lo)))
        });
    }

    /// [`Active::build`] with `keep(j) = rule.keeps(j, v[j])`, as the sparse FFN chooses its
    /// inputs, without a branch per input (the per-input test is taken about half the time at the
    /// useful levels, and mispredicted as often).
    pub fn build_thresholded(&mut self, x: &Q8Row, n_in: usize, v: &[f32], rule: Keep) {
        assert!(v.len() >= n_in && rule.fits(n_in));
        let Keep { t, hot, scale } = rule;
        self.build_by_mask(x, n_in, |lo, hi| {
            let mut mask = 0u32;
            if scale.is_empty() {
                for (i, &x) in v[lo..hi].iter().enumerate() {
                    mask |= u32::from(x.abs() > t) << i;
                }
            } else {
                for (i, (&x, &s)) in v[lo..hi].iter().zip(&scale[lo..hi]).enumerate() {
                    mask |= u32::from(x.abs() * s > t) << i;
                }
            }
            if !hot.is_empty() {
                for (i, &h) in hot[lo..hi].iter().enumerate() {
                    mask |= u32::from(h) << i;
                }
            }
            mask
        });
    }

    /// The active inputs, with `keep(lo, hi)` giving the inputs `lo..hi` (one block) to keep as
    /// a bit mask (bit `j - lo`); inputs whose 8-bit activation is 0 are dropped from it. Each
    /// block's kept inputs are visited by their set bits.
    fn build_by_mask(&mut self, x: &Q8Row, n_in: usize, keep: impl Fn(usize, usize) -> u32) {
        assert!(x.qs.len() >= n_in && x.d.len() >= n_in.div_ceil(QK8));
        self.n_in = n_in;
        self.blocks.clear();
        self.quads.clear();
        self.n_active = 0;
        for b in 0..n_in.div_ceil(QK8) {
            let (lo, hi) = (b * QK8, ((b + 1) * QK8).min(n_in));
            let qs = &x.qs[lo..hi];
            let mut nonzero = 0u32;
            for (i, &q) in qs.iter().enumerate() {
                nonzero |= u32::from(q != 0) << i;
            }
            let mut mask = keep(lo, hi) & nonzero;
            if mask == 0 {
                continue;
            }
            let start = self.quads.len() as u32;
            let mut isum = 0i32;
            self.n_active += mask.count_ones() as usize;
            while mask != 0 {
                let mut quad = Quad {
                    inputs: [0; 4],
                    q: 0,
                };
                let mut last = 0;
                for k in 0..4 {
                    if mask == 0 {
                        // A short quad repeats its last input, with q = 0.
                        quad.inputs[k] = last;
                        continue;
                    }
                    let i = mask.trailing_zeros() as usize;
                    mask &= mask - 1;
                    let q = qs[i];
                    isum += q as i32;
                    last = (lo + i) as u32;
                    quad.inputs[k] = last;
                    quad.q |= (q as u8 as i32) << (8 * k);
                }
                self.quads.push(quad);
            }
            self.blocks.push(Block {
                index: b as u32,
                d: x.d[b],
                qsum: x.d[b] * isum as f32,
                quads: start..self.quads.len() as u32,
            });
        }
    }

    /// The quads of a block.
    pub fn quads_of(&self, b: &Block) -> &[Quad] {
        &self.quads[b.quads.start as usize..b.quads.end as usize]
    }

    /// Splits the active inputs into at most `parts` parts of consecutive blocks with about equal
    /// numbers of quads, each part starting at a weight group of `group` inputs (so that no
    /// group's scales are read by two parts), into `out`'s first elements (buffers reused);
    /// returns how many parts are used. The products of the parts sum to the product of `self`.
    pub fn split_into(&self, parts: usize, group: usize, out: &mut Vec<Active>) -> usize {
        let parts = parts.max(1);
        if out.len() < parts {
            out.resize_with(parts, Active::default);
        }
        for a in out.iter_mut() {
            a.n_in = self.n_in;
            a.blocks.clear();
            a.quads.clear();
            a.n_active = 0;
        }
        let total = self.quads.len();
        let (mut k, mut done, mut last_group) = (0, 0, usize::MAX);
        for b in &self.blocks {
            let gi = b.index as usize * QK8 / group;
            // Move on to the next part at a group boundary once this one has its share.
            if gi != last_group && k + 1 < parts && done > 0 && done * parts >= total * (k + 1) {
                k += 1;
            }
            last_group = gi;
            let a = &mut out[k];
            let quads = self.quads_of(b);
            let start = a.quads.len() as u32;
            a.quads.extend_from_slice(quads);
            a.n_active += quads
                .iter()
                .map(|q| q.q.to_le_bytes().iter().filter(|&&v| v != 0).count())
                .sum::<usize>();
            a.blocks.push(Block {
                quads: start..a.quads.len() as u32,
                ..b.clone()
            });
            done += quads.len();
        }
        out[..parts].iter().filter(|a| !a.blocks.is_empty()).count()
    }

    /// Weight groups (of `group` inputs) with an active input, increasing.
    pub fn groups(&self, group: usize) -> impl Iterator<Item = usize> + '_ {
        let mut last = usize::MAX;
        self.blocks.iter().filter_map(move |b| {
            let gi = b.index as usize * QK8 / group;
            (gi != last).then(|| {
                last = gi;
                gi
            })
        })
    }
}

/// Weight bytes a product over `act` reads from `l` (every output): the scales of each group with
/// an active input and the codes of each active input.
pub fn bytes_read(l: &Layout, act: &Active) -> usize {
    act.groups(l.group()).count() * l.scale_bytes() + act.n_active * l.code_row_bytes()
}

fn check(w: &TgMatrix, act: &Active, outs: &Range<usize>, y: &[f32]) {
    let l = &w.layout;
    assert!(
        outs.start.is_multiple_of(CHUNK) && outs.start <= outs.end && outs.end <= l.n_out,
        "output range {outs:?} does not start at a chunk of 32 in {}",
        l.n_out
    );
    assert_eq!(y.len(), outs.len(), "output length");
    assert_eq!(act.n_in, l.n_in, "activations for {} inputs", l.n_in);
}

/// The scalar path and reference: `y[o - outs.start] = Σ_{j active} x̂_j · W[o, j]` for `o` in
/// `outs`, summed as the module docs say (exact integer sums per block).
pub fn product_reference(w: &TgMatrix, act: &Active, outs: Range<usize>, y: &mut [f32]) {
    check(w, act, &outs, y);
    let l = &w.layout;
    let p = l.pq;
    let tg = w.bytes();
    let cb = p.chunk_bytes();
    let (ka, kb) = affine(p, 1.0, 0.0);
    let n = outs.len();
    let (mut gacc, mut iacc) = (vec![0f32; n], vec![0i32; n]);
    let mut codes = [0u8; CHUNK];
    y.fill(0.0);
    let mut blocks = act.blocks.iter().peekable();
    while let Some(first) = blocks.peek() {
        let gi = first.index as usize * QK8 / l.group();
        gacc.fill(0.0);
        let mut gq = 0.0f32;
        while let Some(b) = blocks.next_if(|b| b.index as usize * QK8 / l.group() == gi) {
            iacc.fill(0);
            for quad in act.quads_of(b) {
                for k in 0..4 {
                    let (j, q) = (quad.inputs[k] as usize, quad.q(k) as i32);
                    for oc in outs.start / CHUNK..outs.end.div_ceil(CHUNK) {
                        let at = l.code_offset(j) + oc * cb;
                        p.unpack_chunk(&tg[at..at + cb], &mut codes);
                        for (t, &c) in codes.iter().enumerate() {
                            if let Some(a) = iacc.get_mut(oc * CHUNK + t - outs.start) {
                                *a += q * c as i32;
                            }
                        }
                    }
                }
            }
            for (g, &i) in gacc.iter_mut().zip(&iacc) {
                *g += b.d * i as f32;
            }
            gq += b.qsum;
        }
        for (k, yo) in y.iter_mut().enumerate() {
            let (d, m) = l.scale(tg, gi, outs.start + k);
            *yo += if p.sym {
                d * (ka * gacc[k] + kb * gq)
            } else {
                d * gacc[k] + m * gq
            };
        }
    }
}

/// `y[o - outs.start] = Σ_{j active} x̂_j · W[o, j]` for `o` in `outs`, on the given instruction
/// set (the scalar path is the reference).
pub fn product(isa: Isa, w: &TgMatrix, act: &Active, outs: Range<usize>, y: &mut [f32]) {
    check(w, act, &outs, y);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` names only instruction sets the CPU has (see `kernels::isa`); the ranges
        // were checked above.
        Isa::Avx512 => unsafe { super::sparse_x86::product_avx512(w, act, outs, y) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { super::sparse_x86::product_avx2(w, act, outs, y) },
        _ => product_reference(w, act, outs, y),
    }
}

/// The affine map of a pq group's codes to values, `w = A·c + B`, from its scale and minimum.
#[inline(always)]
pub(crate) fn affine(p: Pq, d: f32, m: f32) -> (f32, f32) {
    if !p.sym {
        (d, m)
    } else if p.bits == 1 {
        (2.0 * d, -d)
    } else {
        (d, -d * (1u32 << (p.bits - 1)) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_matches_the_format() {
        for p in Pq::all() {
            let (d, m) = (0.37f32, -1.25f32);
            let (a, b) = affine(p, d, m);
            for c in 0..=p.max_code() {
                assert!(
                    (a * c as f32 + b - p.value(c, d, if p.sym { 0.0 } else { m })).abs() < 1e-5
                );
            }
        }
    }

    #[test]
    fn active_groups_inputs_in_quads() {
        let qs: Vec<i8> = (0..70)
            .map(|j| if j % 3 == 0 { 0 } else { j as i8 })
            .collect();
        let d = vec![0.5f32; 3];
        let x = Q8Row {
            d: &d,
            s: &d,
            isum: &[0; 3],
            qs: &qs,
        };
        let mut a = Active::default();
        a.build(&x, 70, |j| !(40..64).contains(&j));
        // Block 0: 21 nonzero; block 1 (32..40): 5 of 8 nonzero; block 2: 4 of 6.
        assert_eq!(a.n_active, 21 + 5 + 4);
        assert_eq!(a.blocks.len(), 3);
        assert_eq!(a.quads_of(&a.blocks[0]).len(), 6);
        let last = a.quads_of(&a.blocks[0])[5];
        assert_eq!(last.inputs, [31, 31, 31, 31]);
        assert_eq!((last.q(0), last.q(1)), (31, 0));
        let s: i32 = (1..32).filter(|j| j % 3 != 0).sum();
        assert_eq!(a.blocks[0].qsum, 0.5 * s as f32);
        assert_eq!(a.groups(64).collect::<Vec<_>>(), vec![0, 1]);
        a.build(&x, 70, |_| false);
        assert!(a.blocks.is_empty() && a.n_active == 0);
    }

    #[test]
    fn thresholded_build_equals_build_with_the_same_rule() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for n in [1usize, 31, 32, 33, 70, 576, 1536] {
            let blocks = n.div_ceil(QK8);
            let qs: Vec<i8> = (0..n)
                .map(|_| match next() % 5 {
                    0 => 0,
                    _ => next() as i8,
                })
                .collect();
            let v: Vec<f32> = (0..n)
                .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            let hot: Vec<bool> = (0..n).map(|_| next() % 7 == 0).collect();
            let d: Vec<f32> = (0..blocks).map(|b| 0.25 + b as f32).collect();
            let isum = vec![0; blocks];
            let x = Q8Row {
                d: &d,
                s: &d,
                isum: &isum,
                qs: &qs,
            };
            let scale: Vec<f32> = (0..n).map(|_| (next() % 3000) as f32 / 1000.0).collect();
            // Thresholds from none skipped to all skipped, with and without hot inputs and
            // weights.
            for t in [-1.0f32, 0.0, 0.3, 0.7, 2.0] {
                for h in [&[][..], &hot] {
                    for s in [&[][..], &scale] {
                        let (mut a, mut b) = (Active::default(), Active::default());
                        let w = |j: usize| if s.is_empty() { 1.0 } else { s[j] };
                        let want = |j: usize| h.get(j) == Some(&true) || v[j].abs() * w(j) > t;
                        a.build(&x, n, want);
                        let rule = Keep {
                            t,
                            hot: h,
                            scale: s,
                        };
                        b.build_thresholded(&x, n, &v, rule);
                        assert_eq!(a, b, "n {n} t {t} hot {} scale {}", h.len(), s.len());
                        assert!((0..n).all(|j| rule.keeps(j, v[j]) == want(j)));
                    }
                }
            }
        }
    }
}
