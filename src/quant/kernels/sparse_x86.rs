//! AVX2 and AVX-512 paths of the sparse-input product on transposed-group matrices
//! ([`super::sparse`]). Both keep a tile of outputs in registers across every active input (no
//! loads or stores of the outputs until the tile is done) and apply a weight group's scale and
//! minimum once per group and tile.
//!
//! - AVX-512 (with VNNI), 64 outputs per tile: four active inputs at a time, each input's 64 codes
//!   unpacked to bytes, the four byte vectors interleaved so that each 32-bit lane holds one
//!   output's four codes, and `vpdpbusd` multiplies them with the four 8-bit activations
//!   (broadcast) into 32-bit sums: 256 multiply-adds per four instructions, exact. The interleave
//!   leaves lane `L` of accumulator `k` holding outputs `16L + 4k ..+4`; a 4×4 transpose of 128-bit
//!   lanes per group and tile puts them back in order before the scales are applied. 4-bit codes
//!   (Q4_0, Q4_1, `q4_*`) unpack 64 at a time from one 32-byte load; their lanes come out as
//!   outputs 0-15, 32-47, 16-31, 48-63, which only changes which scales each lane meets.
//! - AVX2, codes of up to 4 bits ([`columns256`]): pairs of active inputs' codes interleaved and
//!   multiplied with their 8-bit activations by `vpmaddubsw` into exact 16-bit sums, widened once
//!   per block; each active input's codes read as one run over the whole output range.
//! - AVX2, 5 to 8 bits, 32 outputs per tile: each active input's codes converted to f32 and added
//!   with one FMA per 8 outputs, scaled by its activation (`s_b·q_j`, so the block sum is not
//!   kept apart).

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::ops::Range;

use super::pq_simd::{plane1_mask, plane2, plane4};
use super::sparse::{affine, Active};
use crate::quant::activation::QK8;
use crate::quant::pq::CHUNK;
use crate::quant::transposed::{Layout, TgMatrix};

thread_local! {
    /// Byte offsets of each quad's four inputs' codes.
    static OFFSETS: RefCell<Vec<[usize; 4]>> = const { RefCell::new(Vec::new()) };
    /// [`columns256`]'s outputs and group sums.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// [`columns256`]'s 16-bit sums of one block, per tile.
    static ACCS: RefCell<Vec<__m256i>> = const { RefCell::new(Vec::new()) };
}

/// A 1-bit plane as bytes `v` where set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bit(p: *const u8, v: i8) -> __m256i {
    _mm256_and_si256(plane1_mask(p), _mm256_set1_epi8(v))
}

/// One chunk's 32 unsigned codes (`c`, not the signed value) as bytes, in output order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn codes<const BITS: u32, const SYM: bool>(p: *const u8) -> __m256i {
    match BITS {
        1 => bit(p, 1),
        2 => plane2(p),
        3 => _mm256_or_si256(bit(p, 4), plane2(p.add(4))),
        4 => plane4(p),
        5 => _mm256_or_si256(bit(p, 16), plane4(p.add(4))),
        6 => _mm256_or_si256(_mm256_slli_epi16(plane2(p), 4), plane4(p.add(8))),
        _ => {
            let b = _mm256_loadu_si256(p as *const __m256i);
            // Symmetric 8-bit codes are stored as c − 128.
            if SYM {
                _mm256_xor_si256(b, _mm256_set1_epi8(-128))
            } else {
                b
            }
        }
    }
}

/// Runs `f` with the code offsets of every quad of `act` in `l`.
fn with_offsets<R>(l: &Layout, act: &Active, f: impl FnOnce(&[[usize; 4]]) -> R) -> R {
    OFFSETS.with_borrow_mut(|offs| {
        offs.clear();
        // `Layout::code_offset` with shifts: pq groups are powers of two (a division per input
        // and tile range was a visible part of the sparse path's time).
        let g = l.group();
        debug_assert!(g.is_power_of_two());
        let (shift, (gb, sb, cb)) = (
            g.trailing_zeros(),
            (l.group_bytes(), l.scale_bytes(), l.code_row_bytes()),
        );
        offs.extend(act.quads.iter().map(|q| {
            q.inputs.map(|j| {
                let j = j as usize;
                (j >> shift) * gb + sb + (j & (g - 1)) * cb
            })
        }));
        debug_assert!(offs
            .iter()
            .zip(&act.quads)
            .all(|(o, q)| (0..4).all(|k| o[k] == l.code_offset(q.inputs[k] as usize))));
        f(offs)
    })
}

/// Quads ahead whose codes a tile fetches while it computes the current one: the active inputs
/// jump through the matrix, which the hardware prefetcher does not follow (the dense kernels'
/// prefetch made dense decode ~1.8x cheaper and left the sparse path slower than dense). Twelve
/// quads (~200 cycles of work) cover a miss to L3 or memory: S = 0.5 against dense at 1 thread
/// (`pare bench --levels 0,0.5`, alternating binaries) was 3-7% faster with 12 than with 4 in
/// each of five pairs, and 24 was no better than 12.
const AHEAD: usize = 12;

/// Hints the cache to fetch the codes of quad `k + AHEAD` of this tile (nothing past the last).
#[inline(always)]
unsafe fn prefetch_quad(base: *const u8, offs: &[[usize; 4]], k: usize) {
    if let Some(next) = offs.get(k + AHEAD) {
        for &at in next {
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at) as *const i8);
        }
    }
}

/// Quads ahead whose runs [`columns256`] fetches as it goes along the current quad's.
const QUADS_AHEAD: usize = 2;

/// Blocks ahead whose group's scales a tile fetches: a group's scales sit apart from its codes
/// and are read once per group and tile, so they missed the cache on most groups (the loads of the
/// scales took ~40% of the AVX2 tile's samples in a 1-thread profile at S = 0.5 before this).
const AHEAD_BLOCKS: usize = 4;

/// Hints the cache to fetch the scales (and minimums) of outputs `o .. o + n` of the group of
/// block `k + AHEAD_BLOCKS` (nothing past the last block).
#[inline(always)]
unsafe fn prefetch_scales(l: &Layout, tg: *const u8, act: &Active, k: usize, o: usize, n: usize) {
    if let Some(b) = act.blocks.get(k + AHEAD_BLOCKS) {
        prefetch_group_scales(l, tg, b.index as usize * QK8 / l.group(), o, n);
    }
}

/// Hints the cache to fetch the scales (and minimums) of outputs `o .. o + n` of group `gi`.
#[inline(always)]
unsafe fn prefetch_group_scales(l: &Layout, tg: *const u8, gi: usize, o: usize, n: usize) {
    let sp = tg.wrapping_add(l.scales_offset(gi) + 2 * o);
    for plane in 0..if l.pq.sym { 1 } else { 2 } {
        prefetch_span(sp.wrapping_add(plane * 2 * l.n_out_pad()), 2 * n);
    }
}

/// Hints the cache to fetch every line of `p .. p + len` (`len` > 0), whatever its alignment.
#[inline(always)]
unsafe fn prefetch_span(p: *const u8, len: usize) {
    for at in (0..len).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(at) as *const i8);
    }
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(len - 1) as *const i8);
}

/// Calls `$inner::<BITS, SYM>` for the matrix's format.
macro_rules! by_format {
    ($inner:ident, $w:expr, $($arg:expr),*) => {{
        let p = $w.layout.pq;
        macro_rules! go {
            ($bits:literal) => {
                if p.sym {
                    $inner::<$bits, true>($($arg),*)
                } else {
                    $inner::<$bits, false>($($arg),*)
                }
            };
        }
        match p.bits {
            1 => go!(1),
            2 => go!(2),
            3 => go!(3),
            4 => go!(4),
            5 => go!(5),
            6 => go!(6),
            _ => go!(8),
        }
    }};
}

// ---------------------------------------------------------------------------------------------
// AVX-512

/// See the module docs.
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C; the range must be checked as
/// [`super::sparse::product`] does.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn product_avx512(w: &TgMatrix, act: &Active, outs: Range<usize>, y: &mut [f32]) {
    let l = &w.layout;
    with_offsets(l, act, |offs| {
        let mut o = outs.start;
        while o < outs.end {
            let valid = (outs.end - o).min(64);
            let out = y.as_mut_ptr().add(o - outs.start);
            if valid > CHUNK {
                by_format!(tile512, w, l, w.bytes(), act, offs, o, valid, out, 2);
            } else {
                by_format!(tile512, w, l, w.bytes(), act, offs, o, valid, out, 1);
            }
            o += 64;
        }
    });
}

/// 64 (`nc` = 2) or 32 (`nc` = 1) codes of one input from `p` (its first chunk in the tile), and
/// which 16 outputs each 128-bit lane holds (in units of 16 from the tile's start).
#[inline(always)]
unsafe fn decode512<const BITS: u32, const SYM: bool>(
    p: *const u8,
    cb: usize,
    nc: usize,
) -> __m512i {
    if BITS == 4 {
        // Chunks of 32 outputs are 16 adjacent bytes each: low nibbles hold the first 16 outputs
        // of a chunk, high nibbles the next 16.
        let v = if nc == 2 {
            _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i))
        } else {
            _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i))
        };
        let v = _mm512_mask_srli_epi16(v, 0xFFFF_0000, v, 4);
        _mm512_and_si512(v, _mm512_set1_epi8(0x0F))
    } else {
        let lo = codes::<BITS, SYM>(p);
        let hi = if nc == 2 {
            codes::<BITS, SYM>(p.add(cb))
        } else {
            _mm256_setzero_si256()
        };
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }
}

/// Lane `L` of the decoded codes holds outputs `16·LANES[L] ..+16` of the tile.
const fn lanes(bits: u32) -> [usize; 4] {
    if bits == 4 {
        [0, 2, 1, 3]
    } else {
        [0, 1, 2, 3]
    }
}

/// `r[L]` = lane L of each of `a[0..4]`, in order (a 4×4 transpose of 128-bit lanes).
#[inline(always)]
unsafe fn transpose4(a: [__m512; 4]) -> [__m512; 4] {
    let t0 = _mm512_shuffle_f32x4(a[0], a[1], 0x44);
    let t1 = _mm512_shuffle_f32x4(a[0], a[1], 0xEE);
    let t2 = _mm512_shuffle_f32x4(a[2], a[3], 0x44);
    let t3 = _mm512_shuffle_f32x4(a[2], a[3], 0xEE);
    [
        _mm512_shuffle_f32x4(t0, t2, 0x88),
        _mm512_shuffle_f32x4(t0, t2, 0xDD),
        _mm512_shuffle_f32x4(t1, t3, 0x88),
        _mm512_shuffle_f32x4(t1, t3, 0xDD),
    ]
}

/// Adds group `gi`'s contribution `A·acc + B·gq` (per output) to `y`: `acc` straight from the
/// accumulators (lanes as [`lanes`] and [`transpose4`] leave them).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn flush512<const BITS: u32, const SYM: bool>(
    l: &Layout,
    tg: *const u8,
    gi: usize,
    o: usize,
    nc: usize,
    acc: [__m512; 4],
    gq: f32,
    y: &mut [__m512; 4],
) {
    let r = transpose4(acc);
    let sp = tg.add(l.scales_offset(gi) + 2 * o);
    let mp = sp.add(2 * l.n_out_pad());
    let (ka, kb) = affine(l.pq, 1.0, 0.0);
    let gq = _mm512_set1_ps(gq);
    for (lane, &blk) in lanes(BITS).iter().enumerate() {
        if blk >= 2 * nc {
            continue;
        }
        let d = _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(32 * blk) as *const __m256i));
        y[blk] = if SYM {
            let t = _mm512_fmadd_ps(
                r[lane],
                _mm512_set1_ps(ka),
                _mm512_mul_ps(gq, _mm512_set1_ps(kb)),
            );
            _mm512_fmadd_ps(d, t, y[blk])
        } else {
            let m = _mm512_cvtph_ps(_mm256_loadu_si256(mp.add(32 * blk) as *const __m256i));
            _mm512_fmadd_ps(m, gq, _mm512_fmadd_ps(d, r[lane], y[blk]))
        };
    }
}

/// One tile: outputs `o .. o + valid` (`valid` ≤ 32·`nc`) into `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile512<const BITS: u32, const SYM: bool>(
    l: &Layout,
    tg: &[u8],
    act: &Active,
    offs: &[[usize; 4]],
    o: usize,
    valid: usize,
    out: *mut f32,
    nc: usize,
) {
    let cb = l.pq.chunk_bytes();
    let base = tg.as_ptr().add(o / CHUNK * cb);
    let g = l.group();
    let mut y = [_mm512_setzero_ps(); 4];
    let mut gacc = [_mm512_setzero_ps(); 4];
    let (mut cur, mut gq) = (usize::MAX, 0.0f32);
    for (bi, b) in act.blocks.iter().enumerate() {
        prefetch_scales(l, tg.as_ptr(), act, bi, o, 32 * nc);
        let gi = b.index as usize * QK8 / g;
        if gi != cur {
            if cur != usize::MAX {
                flush512::<BITS, SYM>(l, tg.as_ptr(), cur, o, nc, gacc, gq, &mut y);
            }
            (cur, gq) = (gi, 0.0);
            gacc = [_mm512_setzero_ps(); 4];
        }
        let mut acc = [_mm512_setzero_si512(); 4];
        for k in b.quads.start as usize..b.quads.end as usize {
            prefetch_quad(base, offs, k);
            let off = offs.get_unchecked(k);
            let c: [__m512i; 4] =
                std::array::from_fn(|t| decode512::<BITS, SYM>(base.add(off[t]), cb, nc));
            let ab_lo = _mm512_unpacklo_epi8(c[0], c[1]);
            let ab_hi = _mm512_unpackhi_epi8(c[0], c[1]);
            let cd_lo = _mm512_unpacklo_epi8(c[2], c[3]);
            let cd_hi = _mm512_unpackhi_epi8(c[2], c[3]);
            let q = _mm512_set1_epi32(act.quads.get_unchecked(k).q);
            acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_unpacklo_epi16(ab_lo, cd_lo), q);
            acc[1] = _mm512_dpbusd_epi32(acc[1], _mm512_unpackhi_epi16(ab_lo, cd_lo), q);
            acc[2] = _mm512_dpbusd_epi32(acc[2], _mm512_unpacklo_epi16(ab_hi, cd_hi), q);
            acc[3] = _mm512_dpbusd_epi32(acc[3], _mm512_unpackhi_epi16(ab_hi, cd_hi), q);
        }
        let s = _mm512_set1_ps(b.d);
        for (ga, a) in gacc.iter_mut().zip(acc) {
            *ga = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(a), *ga);
        }
        gq += b.qsum;
    }
    if cur != usize::MAX {
        flush512::<BITS, SYM>(l, tg.as_ptr(), cur, o, nc, gacc, gq, &mut y);
    }
    for (blk, v) in y.iter().enumerate() {
        let start = 16 * blk;
        if valid >= start + 16 {
            _mm512_storeu_ps(out.add(start), *v);
        } else if valid > start {
            _mm512_mask_storeu_ps(out.add(start), ((1u32 << (valid - start)) - 1) as u16, *v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2

/// See the module docs.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; the range must be checked as
/// [`super::sparse::product`] does.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn product_avx2(w: &TgMatrix, act: &Active, outs: Range<usize>, y: &mut [f32]) {
    let l = &w.layout;
    if l.pq.bits <= 4 {
        return with_offsets(l, act, |offs| {
            by_format!(columns256, w, l, w.bytes(), act, offs, outs.clone(), y)
        });
    }
    with_offsets(l, act, |offs| {
        for o in outs.clone().step_by(CHUNK) {
            let valid = (outs.end - o).min(CHUNK);
            let out = y.as_mut_ptr().add(o - outs.start);
            by_format!(tile256, w, l, w.bytes(), act, offs, o, valid, out);
        }
    });
}

/// As [`flush512`], for a tile of 32 outputs.
#[inline(always)]
unsafe fn flush256<const SYM: bool>(
    l: &Layout,
    tg: *const u8,
    gi: usize,
    o: usize,
    gacc: &[__m256; 4],
    gq: f32,
    y: &mut [__m256; 4],
) {
    let sp = tg.add(l.scales_offset(gi) + 2 * o);
    let mp = sp.add(2 * l.n_out_pad());
    let (ka, kb) = affine(l.pq, 1.0, 0.0);
    let gqv = _mm256_set1_ps(gq);
    for q in 0..4 {
        let d = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(16 * q) as *const __m128i));
        y[q] = if SYM {
            let t = _mm256_fmadd_ps(gacc[q], _mm256_set1_ps(ka), _mm256_set1_ps(kb * gq));
            _mm256_fmadd_ps(d, t, y[q])
        } else {
            let m = _mm256_cvtph_ps(_mm_loadu_si128(mp.add(16 * q) as *const __m128i));
            _mm256_fmadd_ps(m, gqv, _mm256_fmadd_ps(d, gacc[q], y[q]))
        };
    }
}

/// One tile of 32 outputs (`valid` of them stored), for codes of 5 to 8 bits ([`product_avx2`]
/// gives smaller codes to [`columns256`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile256<const BITS: u32, const SYM: bool>(
    l: &Layout,
    tg: &[u8],
    act: &Active,
    offs: &[[usize; 4]],
    o: usize,
    valid: usize,
    out: *mut f32,
) {
    let base = tg.as_ptr().add(o / CHUNK * l.pq.chunk_bytes());
    let g = l.group();
    let mut y = [_mm256_setzero_ps(); 4];
    let mut gacc = [_mm256_setzero_ps(); 4];
    let (mut cur, mut gq) = (usize::MAX, 0.0f32);
    for (bi, b) in act.blocks.iter().enumerate() {
        prefetch_scales(l, tg.as_ptr(), act, bi, o, CHUNK);
        let gi = b.index as usize * QK8 / g;
        if gi != cur {
            if cur != usize::MAX {
                flush256::<SYM>(l, tg.as_ptr(), cur, o, &gacc, gq, &mut y);
            }
            (cur, gq) = (gi, 0.0);
            gacc = [_mm256_setzero_ps(); 4];
        }
        for k in b.quads.start as usize..b.quads.end as usize {
            prefetch_quad(base, offs, k);
            let (off, quad) = (offs.get_unchecked(k), act.quads.get_unchecked(k));
            for (t, &at) in off.iter().enumerate() {
                let q = quad.q(t);
                if q == 0 {
                    continue;
                }
                let s = _mm256_set1_ps(b.d * q as f32);
                let c = codes::<BITS, SYM>(base.add(at));
                let halves = [_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)];
                for (h, v) in halves.into_iter().enumerate() {
                    for (e, bytes) in [v, _mm_srli_si128(v, 8)].into_iter().enumerate() {
                        let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
                        gacc[2 * h + e] = _mm256_fmadd_ps(s, f, gacc[2 * h + e]);
                    }
                }
            }
        }
        gq += b.qsum;
    }
    if cur != usize::MAX {
        flush256::<SYM>(l, tg.as_ptr(), cur, o, &gacc, gq, &mut y);
    }
    store256(&y, valid, out);
}

/// Stores the first `valid` of a tile's 32 outputs `y` (in order) to `out`.
#[inline(always)]
unsafe fn store256(y: &[__m256; 4], valid: usize, out: *mut f32) {
    for (q, v) in y.iter().enumerate() {
        let start = 8 * q;
        if valid >= start + 8 {
            _mm256_storeu_ps(out.add(start), *v);
        } else if valid > start {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), *v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), out.add(start), valid - start);
        }
    }
}

/// The AVX2 product for codes of at most 4 bits, in 16-bit integers: the codes of a quad's
/// inputs `a, b` (and `c, d`) interleaved byte by byte, so that `vpmaddubsw` multiplies each
/// output's pair of codes with the pair of 8-bit activations and adds them: 2 shuffles, 2
/// multiply-adds and 2 adds per input pair and 32 outputs, where the f32 path ([`tile256`])
/// converts and multiplies every code (4 conversions and 4 FMAs per input). The sums stay exact: a
/// pair is at most 2·15·127 = 3810 in magnitude and one accumulator meets at most 8 pairs per
/// block of 32 inputs (30480 < 2^15); each block's sums are widened to 32 bits once.
///
/// Blocks outside, then quads, then tiles of 32 outputs: each input's codes are read as one
/// sequential run over the output range, the runs of the quad two ahead fetched along the way,
/// and the 16-bit sums of every tile kept in a scratch buffer until the block is done. With tiles
/// outside (as [`tile256`]) each tile met every active input's line cold. In a 1-thread
/// microbenchmark (`cargo bench --bench kernels -- sparse_t1/Q4_1`, 50% of the inputs active,
/// weights from memory) this path reads 4.3-4.8 GiB/s against the f32 path's 2.6-3.6.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn columns256<const BITS: u32, const SYM: bool>(
    l: &Layout,
    tg: &[u8],
    act: &Active,
    offs: &[[usize; 4]],
    outs: Range<usize>,
    y: &mut [f32],
) {
    assert!(BITS <= 4 && QK8 == 32);
    let cb = l.pq.chunk_bytes();
    let tiles = outs.len().div_ceil(CHUNK);
    let base = tg.as_ptr().add(outs.start / CHUNK * cb);
    let g = l.group();
    let ones = _mm256_set1_epi16(1);
    ACCS.with_borrow_mut(|accs| {
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.resize(2 * tiles * CHUNK, 0.0);
            // `ys`: the outputs, in order; `gs`: a group's sums per tile, in the lanes of `vpunpck*`
            // within 128-bit halves (outputs [0-3 | 16-19], [4-7 | 20-23], [8-11 | 24-27],
            // [12-15 | 28-31]), put in order once per group.
            // The 16-bit sums start at 0 and are set back to 0 as each block's are widened.
            accs.clear();
            accs.resize(4 * tiles, _mm256_setzero_si256());
            let (ys, gs) = scratch.split_at_mut(tiles * CHUNK);
            let (ys, gs) = (ys.as_mut_ptr(), gs.as_mut_ptr());
            let blocks = &act.blocks;
            let group_of = |b: &super::sparse::Block| b.index as usize * QK8 / g;
            let mut first = 0;
            while first < blocks.len() {
                let gi = group_of(&blocks[first]);
                let end = first
                    + blocks[first..]
                        .iter()
                        .take_while(|b| group_of(b) == gi)
                        .count();
                let mut gq = 0.0f32;
                for (bi, b) in blocks.iter().enumerate().take(end).skip(first) {
                    let s = _mm256_set1_ps(b.d);
                    // a·b pairs of outputs [0-7 | 16-23] and [8-15 | 24-31], then c·d pairs, per
                    // tile; quads outside, so each quad reads four sequential runs.
                    for k in b.quads.start as usize..b.quads.end as usize {
                        let (off, quad) = (offs.get_unchecked(k), act.quads.get_unchecked(k));
                        let qab = _mm256_set1_epi16(quad.q as i16);
                        let qcd = _mm256_set1_epi16((quad.q >> 16) as i16);
                        let p: [*const u8; 4] = std::array::from_fn(|i| base.add(off[i]));
                        let ahead = offs.get(k + QUADS_AHEAD);
                        // The group's scales, read when the group is done, fetched along its first quad.
                        let scales = bi == first && k == b.quads.start as usize;
                        for t in 0..tiles {
                            if scales {
                                prefetch_group_scales(
                                    l,
                                    tg.as_ptr(),
                                    gi,
                                    outs.start + t * CHUNK,
                                    CHUNK,
                                );
                            }
                            if let Some(next) = ahead.filter(|_| (t * cb).is_multiple_of(64)) {
                                // The next 64 bytes of each of the quad's runs.
                                for &at in next {
                                    prefetch_span(base.wrapping_add(at + t * cb), 64);
                                }
                            }
                            let c: [__m256i; 4] =
                                std::array::from_fn(|i| codes::<BITS, SYM>(p[i].add(t * cb)));
                            let pairs = [
                                (_mm256_unpacklo_epi8(c[0], c[1]), qab),
                                (_mm256_unpackhi_epi8(c[0], c[1]), qab),
                                (_mm256_unpacklo_epi8(c[2], c[3]), qcd),
                                (_mm256_unpackhi_epi8(c[2], c[3]), qcd),
                            ];
                            let acc = accs.get_unchecked_mut(4 * t..4 * t + 4);
                            for (a, (v, q)) in acc.iter_mut().zip(pairs) {
                                *a = _mm256_add_epi16(*a, _mm256_maddubs_epi16(v, q));
                            }
                        }
                    }
                    for t in 0..tiles {
                        let acc: [__m256i; 4] =
                            std::array::from_fn(|i| *accs.get_unchecked(4 * t + i));
                        accs.get_unchecked_mut(4 * t..4 * t + 4)
                            .fill(_mm256_setzero_si256());
                        // Each output's a·b and c·d sums side by side, added into 32 bits.
                        let wide = [
                            _mm256_madd_epi16(_mm256_unpacklo_epi16(acc[0], acc[2]), ones),
                            _mm256_madd_epi16(_mm256_unpackhi_epi16(acc[0], acc[2]), ones),
                            _mm256_madd_epi16(_mm256_unpacklo_epi16(acc[1], acc[3]), ones),
                            _mm256_madd_epi16(_mm256_unpackhi_epi16(acc[1], acc[3]), ones),
                        ];
                        if g == QK8 {
                            // A group of one block: its scales apply now, with no group sums
                            // stored and loaded back (the shipped Q4_1/Q4_0/Q8_0 models).
                            let gacc =
                                in_order(wide.map(|w| _mm256_mul_ps(s, _mm256_cvtepi32_ps(w))));
                            let o = outs.start + t * CHUNK;
                            flush_to::<SYM>(
                                l,
                                tg.as_ptr(),
                                gi,
                                o,
                                &gacc,
                                b.qsum,
                                ys.add(t * CHUNK),
                            );
                            continue;
                        }
                        let gp = gs.add(t * CHUNK);
                        for (i, w) in wide.into_iter().enumerate() {
                            let v = _mm256_mul_ps(s, _mm256_cvtepi32_ps(w));
                            let v = if bi == first {
                                v
                            } else {
                                _mm256_add_ps(v, _mm256_loadu_ps(gp.add(8 * i)))
                            };
                            _mm256_storeu_ps(gp.add(8 * i), v);
                        }
                    }
                    gq += b.qsum;
                }
                if g == QK8 {
                    first = end;
                    continue;
                }
                for t in 0..tiles {
                    let gp = gs.add(t * CHUNK);
                    let gacc = in_order(std::array::from_fn(|i| _mm256_loadu_ps(gp.add(8 * i))));
                    let o = outs.start + t * CHUNK;
                    flush_to::<SYM>(l, tg.as_ptr(), gi, o, &gacc, gq, ys.add(t * CHUNK));
                }
                first = end;
            }
            std::ptr::copy_nonoverlapping(ys, y.as_mut_ptr(), y.len());
        })
    });
}

/// [`flush256`] on the 32 outputs stored at `yp` (loaded, flushed, stored back).
#[inline(always)]
unsafe fn flush_to<const SYM: bool>(
    l: &Layout,
    tg: *const u8,
    gi: usize,
    o: usize,
    gacc: &[__m256; 4],
    gq: f32,
    yp: *mut f32,
) {
    let mut yv: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(yp.add(8 * i)));
    flush256::<SYM>(l, tg, gi, o, gacc, gq, &mut yv);
    for (i, v) in yv.iter().enumerate() {
        _mm256_storeu_ps(yp.add(8 * i), *v);
    }
}

/// [`columns256`]'s group sums of a tile (lanes as `vpunpck*` leave them) in output order.
#[inline(always)]
unsafe fn in_order(g: [__m256; 4]) -> [__m256; 4] {
    [
        _mm256_permute2f128_ps(g[0], g[1], 0x20),
        _mm256_permute2f128_ps(g[2], g[3], 0x20),
        _mm256_permute2f128_ps(g[0], g[1], 0x31),
        _mm256_permute2f128_ps(g[2], g[3], 0x31),
    ]
}
