//! SIMD kernels for the pq formats (and the ggml types identical to one), shared by the AVX2 and
//! AVX-512 paths: each equals [`super::scalar::dot_pq`] up to float summation order.
//!
//! Each chunk of 32 codes is unpacked once into 32 bytes and multiplied with the 8-bit activations
//! of up to four tokens. Bit planes unpack without tables: a 4-bit plane splits nibbles, a 2-bit
//! plane broadcasts its 8 bytes to four 64-bit lanes shifted by 0, 2, 4 and 6, a 1-bit plane spreads
//! each byte over 8 lanes and tests one bit per lane (AVX-512 loads it as a mask register instead).
//!
//! The integer product needs one unsigned operand (`vpmaddubsw`/`vpdpbusd` take u8 × i8):
//! - asymmetric codes `c` are that operand; the `m·xd·Σq` term is added per group in f32;
//! - symmetric codes are made signed (`c − 2^(k−1)`, or ±1 for 1 bit) and their sign moved onto
//!   the activations (`vpsignb`), so the sum is the exact integer the format defines, with no
//!   offset term to cancel in floating point;
//! - 8-bit asymmetric codes reach 255, where `vpmaddubsw`'s i16 pair sums saturate: without VNNI
//!   they are multiplied as `c − 128` (signed, as above) and `128·Σq` is added back exactly in i32;
//!   `vpdpbusd` does not saturate, so VNNI multiplies them as they are.
//!
//! Groups of 64 or 128 weights share their scale: chunk products are accumulated per group (scaled
//! by each chunk's activation scale) and multiplied by the weight scale once per group. The
//! asymmetric minimum's term `m·Σ xd·Σq` needs the activations' scaled sums per group, which are
//! computed once per tile for all its rows ([`group_sums`]).

use std::arch::x86_64::*;
use std::cell::RefCell;

use crate::quant::activation::Q8Row;

/// A 4-bit plane (16 bytes; byte `j` holds code `j` low, code `j + 16` high) to 32 bytes of codes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn plane4(p: *const u8) -> __m256i {
    // Both halves from one broadcast load; the upper half shifted right by 4 (64-bit lanes, so
    // bits cross bytes, but the mask keeps each byte's own nibble).
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    let s = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 0, 4, 4));
    _mm256_and_si256(s, _mm256_set1_epi8(0x0F))
}

/// A 2-bit plane (8 bytes; byte `j` holds code `j + 8i` in bits `2i..2i+2`) to 32 bytes of 0..=3.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn plane2(p: *const u8) -> __m256i {
    let v = _mm256_set1_epi64x((p as *const i64).read_unaligned());
    // Lane i (bytes 8i..8i+8) shifted right by 2i: the low two bits of each byte are code j + 8i.
    let s = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 2, 4, 6));
    _mm256_and_si256(s, _mm256_set1_epi8(3))
}

/// A 1-bit plane (4 bytes; bit `j mod 8` of byte `j / 8` is code `j`'s) to 32 bytes of 0xFF (set) or
/// 0 (clear).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn plane1_mask(p: *const u8) -> __m256i {
    let v = _mm256_set1_epi32((p as *const i32).read_unaligned());
    // Byte i takes source byte i / 8 (each 128-bit lane holds all four), then tests bit i mod 8.
    let idx = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let b = _mm256_and_si256(_mm256_shuffle_epi8(v, idx), bit);
    _mm256_cmpeq_epi8(b, bit)
}

thread_local! {
    static GROUP_SUMS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Calls `f` with `Σ xd·Σq` over each group of `per_group` chunks of each token's activations:
/// `sums[t * groups + g]` with `groups = nb.div_ceil(per_group)` (the last group may be shorter).
/// A per-thread buffer, so that a tile allocates nothing.
pub(crate) fn group_sums<R>(xs: &[Q8Row], per_group: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    GROUP_SUMS.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.clear();
        for x in xs {
            for (d, isum) in x.d.chunks(per_group).zip(x.isum.chunks(per_group)) {
                buf.push(d.iter().zip(isum).map(|(&d, &i)| d * i as f32).sum());
            }
        }
        f(&buf)
    })
}

/// The pq kernel bodies. The invoking module must have in scope, with its target features:
/// `hsum`, `load_x`, `plane4`, `plane2`, `group_sums`; `madd_u8_i8(u, s) -> __m256i` (Σ u8 × i8
/// over 32 bytes into 8 i32 lanes, 4 bytes per lane); `plane1(p, v)` (a 1-bit plane as bytes `v`
/// where set, else 0); `signs1(p)` (−1 where set, +1 where clear); and `const U8_NO_SATURATION:
/// bool` (whether `madd_u8_i8` is exact for u8 operands up to 255).
macro_rules! pq_kernels {
    ($features:literal) => {
        /// `out[t * ldo + r] = W[r] · xs[t]` for every row `r` of `w` (rows of `row_bytes` bytes of
        /// format `p`) and every token `t` of `xs`.
        ///
        /// # Safety
        /// The CPU must support the enabled features; `w`'s rows and `xs` must agree in length
        /// (`row_bytes == p.row_bytes(32 * x.d.len())`); `out` must be valid for writes at every
        /// `t * ldo + r`.
        #[target_feature(enable = $features)]
        pub unsafe fn gemm_tile_pq(
            p: Pq,
            w: &[u8],
            row_bytes: usize,
            xs: &[Q8Row],
            out: *mut f32,
            ldo: usize,
        ) {
            macro_rules! go {
                ($bits:literal, $sym:literal) => {
                    match p.group {
                        32 => pq_tile::<$bits, $sym, 1>(w, row_bytes, xs, out, ldo),
                        64 => pq_tile::<$bits, $sym, 2>(w, row_bytes, xs, out, ldo),
                        _ => pq_tile::<$bits, $sym, 4>(w, row_bytes, xs, out, ldo),
                    }
                };
            }
            match (p.bits, p.sym) {
                (1, false) => go!(1, false),
                (1, true) => go!(1, true),
                (2, false) => go!(2, false),
                (2, true) => go!(2, true),
                (3, false) => go!(3, false),
                (3, true) => go!(3, true),
                (4, false) => go!(4, false),
                (4, true) => go!(4, true),
                (5, false) => go!(5, false),
                (5, true) => go!(5, true),
                (6, false) => go!(6, false),
                (6, true) => go!(6, true),
                (8, false) => go!(8, false),
                (8, true) => go!(8, true),
                _ => unreachable!("{p} is not a pq format"),
            }
        }

        /// Every row of the tile, four tokens at a time; `G` chunks per group.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn pq_tile<const BITS: u32, const SYM: bool, const G: usize>(
            w: &[u8],
            row_bytes: usize,
            xs: &[Q8Row],
            out: *mut f32,
            ldo: usize,
        ) {
            let groups = xs.get_unchecked(0).d.len().div_ceil(G);
            // Symmetric formats have no minimum, so no use for the sums.
            let xs_for_sums = if SYM { &xs[..0] } else { xs };
            group_sums(xs_for_sums, G, |sums| {
                let mut res = [0.0f32; 4];
                // Decode (one token): four rows at a time, then the rows left over one by one.
                let four = if xs.len() == 1 {
                    w.len() / row_bytes / 4 * 4
                } else {
                    0
                };
                for r in (0..four).step_by(4) {
                    let wr = w.as_ptr().add(r * row_bytes);
                    // The four rows after the next four, as `q4_1_rows4` fetches them.
                    let ahead = wr.wrapping_add(8 * row_bytes);
                    for off in (0..4 * row_bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
                    }
                    pq_rows4::<BITS, SYM, G>(wr, row_bytes, &xs[0], sums.as_ptr(), &mut res);
                    for (i, &v) in res.iter().enumerate() {
                        *out.add(r + i) = v;
                    }
                }
                let w = w.get_unchecked(four * row_bytes..);
                let out = out.add(four);
                for (r, wr) in w.chunks_exact(row_bytes).enumerate() {
                    // Fetch the row after next while this one computes (see `q4_1_rows4`).
                    let ahead = wr.as_ptr().wrapping_add(2 * row_bytes);
                    for off in (0..row_bytes).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off) as *const i8);
                    }
                    let mut t0 = 0;
                    while t0 < xs.len() {
                        let k = (xs.len() - t0).min(4);
                        let x = xs.get_unchecked(t0..t0 + k);
                        let s = sums.as_ptr().add(if SYM { 0 } else { t0 * groups });
                        match k {
                            1 => pq_row::<BITS, SYM, G, 1>(wr, x, s, groups, &mut res),
                            2 => pq_row::<BITS, SYM, G, 2>(wr, x, s, groups, &mut res),
                            3 => pq_row::<BITS, SYM, G, 3>(wr, x, s, groups, &mut res),
                            _ => pq_row::<BITS, SYM, G, 4>(wr, x, s, groups, &mut res),
                        }
                        for (i, &v) in res[..k].iter().enumerate() {
                            *out.add((t0 + i) * ldo + r) = v;
                        }
                        t0 += k;
                    }
                }
            })
        }

        /// One chunk's codes as the operand `madd_u8_i8` multiplies: unsigned codes, or (see
        /// `pq_group`) signed values whose sign goes onto the activations.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn pq_codes<const BITS: u32, const SYM: bool>(p: *const u8) -> __m256i {
            let c = match BITS {
                1 if SYM => return signs1(p),
                1 => plane1(p, 1),
                2 => plane2(p),
                3 => _mm256_or_si256(plane1(p, 4), plane2(p.add(4))),
                4 => plane4(p),
                5 => _mm256_or_si256(plane1(p, 16), plane4(p.add(4))),
                6 => _mm256_or_si256(_mm256_slli_epi16(plane2(p), 4), plane4(p.add(8))),
                _ => {
                    let b = _mm256_loadu_si256(p as *const __m256i);
                    // Stored: c as u8 (asymmetric), c − 128 as i8 (symmetric).
                    return if SYM || U8_NO_SATURATION {
                        b
                    } else {
                        _mm256_xor_si256(b, _mm256_set1_epi8(-128))
                    };
                }
            };
            if SYM {
                _mm256_sub_epi8(c, _mm256_set1_epi8(1 << (BITS - 1)))
            } else {
                c
            }
        }

        /// Four consecutive rows (from `w`, `row_bytes` apart) times one token. The activation
        /// chunk and its scale are loaded once for the four rows, and the rows' integer chunk
        /// sums are reduced into one vector (lanes `r` and `r + 4` hold row `r`'s halves), so that
        /// a chunk costs one conversion and one multiply-add for all four rows instead of one per
        /// row; the weight scales are applied per group to the four rows' lanes at once.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn pq_rows4<const BITS: u32, const SYM: bool, const G: usize>(
            w: *const u8,
            row_bytes: usize,
            x: &Q8Row,
            sums: *const f32,
            out: &mut [f32; 4],
        ) {
            let signed = SYM || (BITS == 8 && !U8_NO_SATURATION);
            let minus128 = BITS == 8 && !SYM && !U8_NO_SATURATION;
            let flip = BITS == 1 && SYM;
            // Where `madd_u8_i8` is two instructions (`vpmaddubsw` + `vpmaddwd`), the four rows'
            // 16-bit pair sums are reduced in 16 bits (two `vphaddw`) and widened once, one
            // `vpmaddwd` per chunk instead of four, while 8 products (|q| ≤ 127) of the largest
            // unsigned operand fit in i16: up to 32 (asymmetric codes of ≤ 5 bits; symmetric
            // |c − 2^(k−1)| of ≤ 6 bits; 1-bit ±1).
            let max_operand = match (BITS, SYM) {
                (8, _) => 255,
                (1, true) => 1,
                (_, true) => 1 << (BITS - 1),
                _ => (1 << BITS) - 1,
            };
            let i16_sums = !U8_NO_SATURATION && 8 * max_operand * 127 <= i16::MAX as u32;
            let hb = if SYM { 2 } else { 4 };
            let cb = 4 * BITS as usize;
            let nb = x.d.len();
            let groups = nb.div_ceil(G);
            let mut acc = _mm256_setzero_ps();
            // Lane r: row r's minimum term.
            let mut offs = _mm_setzero_ps();
            let mut off = 0usize;
            for g in 0..groups {
                let count = if g + 1 < groups || nb.is_multiple_of(G) {
                    G
                } else {
                    nb % G
                };
                let mut part = [_mm256_setzero_ps(); 2];
                let mut q = off + hb;
                for k in 0..count {
                    let c = g * G + k;
                    let xq = load_x(x, c);
                    // Each row's operands: unsigned codes and activations, or |w| and the
                    // activations carrying w's sign (symmetric), or 1 and x·sign (1-bit).
                    let mut u = [_mm256_setzero_si256(); 4];
                    let mut sx = [_mm256_setzero_si256(); 4];
                    for r in 0..4 {
                        let wv = pq_codes::<BITS, SYM>(w.add(r * row_bytes + q));
                        (u[r], sx[r]) = if flip {
                            (_mm256_set1_epi8(1), _mm256_sign_epi8(xq, wv))
                        } else if signed {
                            (_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xq, wv))
                        } else {
                            (wv, xq)
                        };
                    }
                    // [row 0's sums, row 1's, row 2's, row 3's | the same again], 4 lanes each.
                    let mut pi = if i16_sums {
                        let mut m = [_mm256_setzero_si256(); 4];
                        for r in 0..4 {
                            m[r] = _mm256_maddubs_epi16(u[r], sx[r]);
                        }
                        let h = _mm256_hadd_epi16(
                            _mm256_hadd_epi16(m[0], m[1]),
                            _mm256_hadd_epi16(m[2], m[3]),
                        );
                        _mm256_madd_epi16(h, _mm256_set1_epi16(1))
                    } else {
                        let mut p = [_mm256_setzero_si256(); 4];
                        for r in 0..4 {
                            p[r] = madd_u8_i8(u[r], sx[r]);
                        }
                        _mm256_hadd_epi32(
                            _mm256_hadd_epi32(p[0], p[1]),
                            _mm256_hadd_epi32(p[2], p[3]),
                        )
                    };
                    if minus128 {
                        // 128·Σq over the chunk, half in each of a row's two lanes, exactly.
                        let k = *x.isum.get_unchecked(c) << 6;
                        pi = _mm256_add_epi32(pi, _mm256_set1_epi32(k));
                    }
                    let xd = _mm256_set1_ps(*x.d.get_unchecked(c));
                    let pf = _mm256_cvtepi32_ps(pi);
                    part[k & 1] = _mm256_fmadd_ps(pf, xd, part[k & 1]);
                    q += cb;
                }
                // The four rows' group headers: d (and m) as f32, row r in lane r.
                let h = |r: usize| (w.add(r * row_bytes + off) as *const u32).read_unaligned();
                let (d, m) = if SYM {
                    let v = _mm_setr_epi32(
                        (h(0) & 0xFFFF | h(1) << 16) as i32,
                        (h(2) & 0xFFFF | h(3) << 16) as i32,
                        0,
                        0,
                    );
                    (_mm_cvtph_ps(v), _mm_setzero_ps())
                } else {
                    // [d0 m0 d1 m1 d2 m2 d3 m3] as f16 pairs, to f32, then split.
                    let v = _mm_setr_epi32(h(0) as i32, h(1) as i32, h(2) as i32, h(3) as i32);
                    let dm = _mm256_cvtph_ps(v);
                    let d = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0));
                    let m = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(1, 3, 5, 7, 0, 0, 0, 0));
                    (_mm256_castps256_ps128(d), _mm256_castps256_ps128(m))
                };
                let d = if flip {
                    _mm_sub_ps(_mm_setzero_ps(), d)
                } else {
                    d
                };
                let dd = _mm256_set_m128(d, d);
                acc = _mm256_fmadd_ps(_mm256_add_ps(part[0], part[1]), dd, acc);
                if !SYM {
                    offs = _mm_fmadd_ps(m, _mm_set1_ps(*sums.add(g)), offs);
                }
                off = q;
            }
            let r = _mm_add_ps(
                _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1)),
                offs,
            );
            _mm_storeu_ps(out.as_mut_ptr(), r);
        }

        /// One row times `N` tokens; `sums` holds the tokens' group sums (`groups` per token).
        /// Groups alternate between two accumulators so that consecutive groups' additions do not
        /// wait on each other.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn pq_row<const BITS: u32, const SYM: bool, const G: usize, const N: usize>(
            w: &[u8],
            xs: &[Q8Row],
            sums: *const f32,
            groups: usize,
            out: &mut [f32],
        ) {
            let nb = xs.get_unchecked(0).d.len();
            let full = nb / G;
            let mut acc0 = [_mm256_setzero_ps(); N];
            let mut acc1 = [_mm256_setzero_ps(); N];
            let mut offs0 = [_mm_setzero_ps(); N];
            let mut offs1 = [_mm_setzero_ps(); N];
            let mut p = w.as_ptr();
            let mut g = 0;
            while g + 2 <= full {
                p = pq_group::<BITS, SYM, G, N>(p, G, g, xs, sums, groups, &mut acc0, &mut offs0);
                p = pq_group::<BITS, SYM, G, N>(
                    p,
                    G,
                    g + 1,
                    xs,
                    sums,
                    groups,
                    &mut acc1,
                    &mut offs1,
                );
                g += 2;
            }
            if g < full {
                p = pq_group::<BITS, SYM, G, N>(p, G, g, xs, sums, groups, &mut acc0, &mut offs0);
            }
            if !nb.is_multiple_of(G) {
                pq_group::<BITS, SYM, G, N>(
                    p,
                    nb % G,
                    full,
                    xs,
                    sums,
                    groups,
                    &mut acc1,
                    &mut offs1,
                );
            }
            for t in 0..N {
                // `offs` holds the minimum's term in lane 1 and zeros elsewhere (see `pq_group`).
                let o = _mm256_zextps128_ps256(_mm_add_ps(offs0[t], offs1[t]));
                out[t] = hsum(_mm256_add_ps(_mm256_add_ps(acc0[t], acc1[t]), o));
            }
        }

        /// Group `g`, of `n` chunks (`G`, or fewer for a row's tail group), at `p` in the row: adds
        /// its products to `acc` and its minimum's term to lane 1 of `offs`; returns the next
        /// group's start.
        #[inline]
        #[target_feature(enable = $features)]
        #[allow(clippy::too_many_arguments)]
        unsafe fn pq_group<const BITS: u32, const SYM: bool, const G: usize, const N: usize>(
            p: *const u8,
            n: usize,
            g: usize,
            xs: &[Q8Row],
            sums: *const f32,
            groups: usize,
            acc: &mut [__m256; N],
            offs: &mut [__m128; N],
        ) -> *const u8 {
            // Whether `pq_codes` gives signed values (multiplied by sign trick), and whether those
            // are 8-bit asymmetric codes less 128 (then 128·Σq is added back).
            let signed = SYM || (BITS == 8 && !U8_NO_SATURATION);
            let minus128 = BITS == 8 && !SYM && !U8_NO_SATURATION;
            // 1-bit symmetric signs are −(2c − 1); the scale takes the sign back.
            let flip = BITS == 1 && SYM;
            let hb = if SYM { 2 } else { 4 };
            let cb = 4 * BITS as usize;
            let mut q = p.add(hb);
            // Two partial sums within the group, so that its chunks do not form one chain.
            let mut part = [[_mm256_setzero_ps(); N]; 2];
            let count = if n == G { G } else { n };
            for k in 0..count {
                let c = g * G + k;
                let wv = pq_codes::<BITS, SYM>(q);
                q = q.add(cb);
                let aw = if flip {
                    _mm256_set1_epi8(1)
                } else if signed {
                    _mm256_sign_epi8(wv, wv)
                } else {
                    wv
                };
                for t in 0..N {
                    let x = xs.get_unchecked(t);
                    let xq = load_x(x, c);
                    let mut pi = if signed {
                        madd_u8_i8(aw, _mm256_sign_epi8(xq, wv))
                    } else {
                        madd_u8_i8(aw, xq)
                    };
                    if minus128 {
                        // 128·Σq spread over the 8 lanes, exactly.
                        let k = *x.isum.get_unchecked(c) << 4;
                        pi = _mm256_add_epi32(pi, _mm256_set1_epi32(k));
                    }
                    let xd = _mm256_set1_ps(*x.d.get_unchecked(c));
                    let pf = _mm256_cvtepi32_ps(pi);
                    part[k & 1][t] = if k < 2 {
                        _mm256_mul_ps(pf, xd)
                    } else {
                        _mm256_fmadd_ps(pf, xd, part[k & 1][t])
                    };
                }
            }
            let d = _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()));
            let d = if flip {
                _mm256_sub_ps(_mm256_setzero_ps(), d)
            } else {
                d
            };
            // [0, m, 0, 0] (the header's d bits cleared): lane 1 of `offs` accumulates m times the
            // group sum, the other lanes stay zero.
            let dm = if SYM {
                _mm_setzero_ps()
            } else {
                let h = (p as *const u32).read_unaligned() & 0xFFFF_0000;
                _mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))
            };
            for t in 0..N {
                let s = if G > 1 && count > 1 {
                    _mm256_add_ps(part[0][t], part[1][t])
                } else {
                    part[0][t]
                };
                acc[t] = _mm256_fmadd_ps(s, d, acc[t]);
                if !SYM {
                    let gs = _mm_set1_ps(*sums.add(t * groups + g));
                    offs[t] = _mm_fmadd_ps(dm, gs, offs[t]);
                }
            }
            q
        }
    };
}
pub(crate) use pq_kernels;
