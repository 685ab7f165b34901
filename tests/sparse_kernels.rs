//! The sparse-input product on transposed-group matrices: every instruction set the CPU supports
//! equals the scalar reference, and the reference equals an f64 sum of the active 8-bit
//! activations times the dequantized weights, for every pq format, output and input counts that
//! are not multiples of 32 or of the group (tails), every output range a split can give, and no /
//! all / some inputs active.

use pare::quant::activation::Q8Acts;
use pare::quant::kernels::sparse::{bytes_read, product, product_reference, Active};
use pare::quant::kernels::Isa;
use pare::quant::matmul::WeightBytes;
use pare::quant::quantize::{quantize_row, Method, Options};
use pare::quant::transposed::{Layout, TgMatrix};
use pare::quant::{GgmlType, Pq};
use proptest::prelude::*;

/// Outputs per tile of the widest SIMD path.
const TILE: usize = 64;

/// Splits `n_out` outputs into at most `parts` ranges of whole tiles, as even as possible: the
/// output ranges a caller may compute (each starts at a multiple of 32).
fn split(n_out: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let tiles = n_out.div_ceil(TILE);
    let parts = parts.clamp(1, tiles.max(1));
    (0..parts)
        .map(|k| {
            let (a, b) = (tiles * k / parts, tiles * (k + 1) / parts);
            (a * TILE).min(n_out)..(b * TILE).min(n_out)
        })
        .filter(|r| !r.is_empty())
        .collect()
}

#[test]
fn split_keeps_whole_tiles() {
    assert_eq!(split(576, 2), vec![0..256, 256..576]);
    assert_eq!(split(576, 100).len(), 9);
    assert_eq!(split(100, 4), vec![0..64, 64..100]);
}

fn lcg(seed: u64) -> impl FnMut() -> f32 {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// A transposed-group matrix of `n_out` × `n_in` weights in `p`, made from row-major rows as
/// `pare sparsify` does: random values with varied magnitudes per row, one all-zero row and one
/// row of a constant (a zero scale with a minimum).
fn matrix(p: Pq, n_out: usize, n_in: usize, seed: u64) -> TgMatrix {
    let mut next = lcg(seed);
    from_values(p, n_out, n_in, |r, _| match r {
        0 => 0.0,
        1 => 0.75,
        _ => next() * [1.0, 0.01, 30.0][r % 3],
    })
}

/// The transposed-group copy of row-major weights `value(row, column)` quantized to `p` (round
/// to nearest), as `pare sparsify` makes it.
fn from_values(
    p: Pq,
    n_out: usize,
    n_in: usize,
    mut value: impl FnMut(usize, usize) -> f32,
) -> TgMatrix {
    let rb = p.row_bytes(n_in);
    let mut rows = vec![0u8; n_out * rb];
    let opts = Options {
        method: Method::Rtn,
        importance: None,
    };
    for (r, o) in rows.chunks_exact_mut(rb).enumerate() {
        let x: Vec<f32> = (0..n_in).map(|j| value(r, j)).collect();
        quantize_row(GgmlType::Pq(p), &x, &opts, o).unwrap();
    }
    let layout = Layout::new(p, n_out, n_in).unwrap();
    let bytes = layout.from_rows(&rows).unwrap();
    TgMatrix::new("test", layout, WeightBytes::from_vec(bytes)).unwrap()
}

/// The f64 truth and the sum of |terms| (the scale of the rounding error) per output in `outs`.
fn truth(
    w: &TgMatrix,
    q8: &Q8Acts,
    act: &Active,
    outs: std::ops::Range<usize>,
) -> (Vec<f64>, Vec<f64>) {
    let l = &w.layout;
    let dense = l.dequantize(w.bytes()).unwrap();
    let (mut y, mut mag) = (vec![0.0f64; outs.len()], vec![0.0f64; outs.len()]);
    let mut seen = std::collections::HashSet::new();
    for q in &act.quads {
        for k in 0..4 {
            let j = q.inputs[k] as usize;
            // A short quad repeats its last input with q = 0: count each input once.
            if q.q(k) == 0 || !seen.insert(j) {
                continue;
            }
            let xj = q8.d[j / 32] as f64 * q8.qs[j] as f64;
            // The kernels sum `d·Σ a·c` and `m·Σ a` apart, which may cancel to far less than
            // Σ |w·x|: bound each term by the format's (|d|·2^k + |m|)·|x| instead.
            let so = l.scales_offset(j / l.group());
            let f16_at = |at: usize| {
                let b = w.bytes();
                half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32().abs() as f64
            };
            for (t, o) in outs.clone().enumerate() {
                let v = xj * dense[o * l.n_in + j] as f64;
                y[t] += v;
                let d = f16_at(so + 2 * o);
                let m = if l.pq.sym {
                    0.0
                } else {
                    f16_at(so + 2 * l.n_out_pad() + 2 * o)
                };
                mag[t] += xj.abs() * (d * (1u32 << l.pq.bits) as f64 + m);
            }
        }
    }
    (y, mag)
}

fn check(p: Pq, n_out: usize, n_in: usize, seed: u64, which: u8, parts: usize) {
    let w = matrix(p, n_out, n_in, seed);
    let mut next = lcg(seed ^ 0x5eed);
    let x: Vec<f32> = (0..n_in).map(|_| next() * 3.0).collect();
    let mut q8 = Q8Acts::default();
    q8.quantize(&x, 1, n_in);
    let mut act = Active::default();
    // none, all, or inputs with |x| above a threshold.
    act.build(&q8.row(0), n_in, |j| match which {
        0 => false,
        1 => true,
        _ => x[j].abs() > 1.2,
    });
    if which == 0 {
        assert_eq!(act.n_active, 0);
        assert_eq!(bytes_read(&w.layout, &act), 0);
    }
    if which == 1 {
        let nonzero = q8.qs[..n_in].iter().filter(|&&q| q != 0).count();
        assert_eq!(act.n_active, nonzero);
    }
    assert!(bytes_read(&w.layout, &act) <= w.layout.bytes());
    for outs in split(n_out, parts) {
        let mut want = vec![f32::NAN; outs.len()];
        product_reference(&w, &act, outs.clone(), &mut want);
        let (t, mag) = truth(&w, &q8, &act, outs.clone());
        for k in 0..outs.len() {
            let tol = 1e-5 * mag[k] + 1e-30;
            assert!(
                (want[k] as f64 - t[k]).abs() <= tol,
                "{p} {n_out}x{n_in} reference vs f64 at {}: {} vs {}",
                outs.start + k,
                want[k],
                t[k]
            );
        }
        for isa in Isa::supported() {
            let mut got = vec![f32::NAN; outs.len()];
            product(isa, &w, &act, outs.clone(), &mut got);
            for k in 0..outs.len() {
                let tol = 1e-5 * mag[k] + 1e-30;
                assert!(
                    (got[k] - want[k]).abs() as f64 <= tol,
                    "{} {p} {n_out}x{n_in} outs {outs:?} which {which} at {}: {} vs {}",
                    isa.name(),
                    outs.start + k,
                    got[k],
                    want[k]
                );
            }
        }
    }
    // The inputs split into parts, as the sparse FFN splits a product across threads: the parts'
    // products over every output sum to the whole, and no weight byte is read twice.
    let mut pieces = Vec::new();
    let used = act.split_into(parts, p.group as usize, &mut pieces);
    assert!(used <= parts && (used > 0) == (act.n_active > 0));
    let pieces = &pieces[..used];
    assert_eq!(
        pieces.iter().map(|a| a.n_active).sum::<usize>(),
        act.n_active
    );
    assert_eq!(
        pieces
            .iter()
            .map(|a| bytes_read(&w.layout, a))
            .sum::<usize>(),
        bytes_read(&w.layout, &act)
    );
    let mut want = vec![f32::NAN; n_out];
    product_reference(&w, &act, 0..n_out, &mut want);
    let (_, mag) = truth(&w, &q8, &act, 0..n_out);
    for isa in Isa::supported() {
        let mut sum = vec![0.0f32; n_out];
        for a in pieces {
            let mut y = vec![f32::NAN; n_out];
            product(isa, &w, a, 0..n_out, &mut y);
            sum.iter_mut().zip(&y).for_each(|(s, v)| *s += v);
        }
        for k in 0..n_out {
            assert!(
                (sum[k] - want[k]).abs() as f64 <= 1e-5 * mag[k] + 1e-30,
                "{} {p} {n_out}x{n_in} {used} parts, which {which} at {k}: {} vs {}",
                isa.name(),
                sum[k],
                want[k]
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn every_path_equals_the_reference(
        fmt in 0usize..42,
        n_out in 1usize..200,
        n_in in 1usize..300,
        seed in any::<u64>(),
        which in 0u8..3,
        parts in 1usize..6,
    ) {
        let p = Pq::all().nth(fmt).unwrap();
        check(p, n_out, n_in, seed, which, parts);
    }
}

#[test]
fn every_format_at_the_models_shapes() {
    for p in Pq::all() {
        for which in 0..3 {
            check(p, 576, 1536, 7, which, 3);
        }
        check(p, 1536, 576, 11, 2, 4);
        check(p, 64, 64, 13, 1, 1);
        check(p, 65, 33, 17, 1, 2);
    }
}

/// The integer sums at their largest: every code at its maximum (but one per group, so the
/// scale is not 0) and every 8-bit activation at ±127, all inputs active, so the 16-bit sums of
/// the paths that keep them (codes of up to 4 bits) meet their bound.
#[test]
fn largest_sums_stay_exact() {
    let (n_out, n_in) = (64, 96);
    for p in Pq::all() {
        let w = from_values(
            p,
            n_out,
            n_in,
            |r, j| if j % 32 == r % 32 { -1.0 } else { 1.0 },
        );
        for sign in [1.0f32, -1.0] {
            let x = vec![sign; n_in];
            let mut q8 = Q8Acts::default();
            q8.quantize(&x, 1, n_in);
            let mut act = Active::default();
            act.build(&q8.row(0), n_in, |_| true);
            assert_eq!(act.n_active, n_in);
            let mut want = vec![0f32; n_out];
            product_reference(&w, &act, 0..n_out, &mut want);
            for isa in Isa::supported() {
                let mut got = vec![f32::NAN; n_out];
                product(isa, &w, &act, 0..n_out, &mut got);
                for o in 0..n_out {
                    assert!(
                        (got[o] - want[o]).abs() <= 1e-5 * want[o].abs().max(1.0),
                        "{} {p} sign {sign} at {o}: {} vs {}",
                        isa.name(),
                        got[o],
                        want[o]
                    );
                }
            }
        }
    }
}
