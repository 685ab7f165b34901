//! Dense f32 matrix products (row-major slices) through the `gemm` crate, for training: the
//! products of the frozen weights' dequantized values with activations and their gradients, and the
//! small LoRA products. Inference keeps its own packed-weight kernels ([`crate::quant::matmul`]).
//!
//! The split of work depends only on the shapes, so the same product on the same inputs gives the
//! same bits every time (gradient checkpointing relies on recomputation being exact).

use crate::error::Result;
use crate::quant::matmul::QMatrix;

/// `dst (m×n) = s·(a (m×k) · b (k×n))`, plus the old `dst` when `acc`; `a` and `b` given by row and
/// column strides so transposed views cost nothing.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    s: f32,
    acc: bool,
) {
    assert!(dst.len() >= m * n, "gemm: destination too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let (a, a_rs, a_cs) = a;
    let (b, b_rs, b_cs) = b;
    assert!(
        a.len() > (m - 1) * a_rs + (k - 1) * a_cs,
        "gemm: lhs too small"
    );
    assert!(
        b.len() > (k - 1) * b_rs + (n - 1) * b_cs,
        "gemm: rhs too small"
    );
    let work = m * n * k;
    let par = if work >= 1 << 18 {
        gemm::Parallelism::Rayon(crate::parallel::threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index the strides reach inside the slices; dst is
    // exclusively borrowed and does not alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            acc,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            s,
            false,
            false,
            false,
            par,
        )
    }
}

/// `y (n×m) = x (n×k) · wᵀ` with `w` (m×k): a linear layer's forward.
pub fn matmul_nt(x: &[f32], w: &[f32], y: &mut [f32], n: usize, k: usize, m: usize, acc: bool) {
    matmul_nt_scaled(x, w, y, n, k, m, 1.0, acc)
}

/// `y = s·x·wᵀ` (+ y when `acc`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_nt_scaled(
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    n: usize,
    k: usize,
    m: usize,
    s: f32,
    acc: bool,
) {
    gemm_f32(n, m, k, y, (x, k, 1), (w, 1, k), s, acc)
}

/// `y (n×m) = s·a (n×k) · b (k×m)` (+ y when `acc`): a linear layer's input gradient `dx = dy·W`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_nn_scaled(
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    n: usize,
    k: usize,
    m: usize,
    s: f32,
    acc: bool,
) {
    gemm_f32(n, m, k, y, (a, k, 1), (b, m, 1), s, acc)
}

/// `y (n×m) = s·aᵀ · b` with `a` (k×n) and `b` (k×m): a weight gradient `dW = dyᵀ·x` over k tokens.
#[allow(clippy::too_many_arguments)]
pub fn matmul_tn_scaled(
    a: &[f32],
    b: &[f32],
    y: &mut [f32],
    n: usize,
    k: usize,
    m: usize,
    s: f32,
    acc: bool,
) {
    gemm_f32(n, m, k, y, (a, 1, n), (b, m, 1), s, acc)
}

/// Rows `r0..r1` of `w` as f32, row after row, into `out` (`(r1 - r0) × w.cols`), rows spread over
/// the worker threads.
pub fn dequantize_rows(w: &QMatrix, r0: usize, r1: usize, out: &mut [f32]) -> Result<()> {
    let cols = w.cols;
    assert_eq!(out.len(), (r1 - r0) * cols, "{}: dequantize size", w.name);
    // Types are checked when the model is loaded; check the first row here so a failure is an
    // error rather than a panic inside the pool.
    if r1 > r0 {
        w.dequantize_row(r0, &mut out[..cols])?;
    }
    let ptr = crate::parallel::DisjointMut::new(out);
    crate::parallel::for_each(r1 - r0, &|i| {
        // SAFETY: task i writes only its own row.
        let row = unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(i * cols), cols) };
        w.dequantize_row(r0 + i, row)
            .expect("matrix types are checked when the model is loaded");
    });
    Ok(())
}

/// The whole of `w` as f32 (`rows × cols`).
pub fn dequantize(w: &QMatrix, out: &mut Vec<f32>) -> Result<()> {
    out.resize(w.rows * w.cols, 0.0);
    dequantize_rows(w, 0, w.rows, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; n * m];
        for i in 0..n {
            for j in 0..m {
                y[i * m + j] = (0..k).map(|p| a[i * k + p] * b[p * m + j]).sum();
            }
        }
        y
    }

    fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
        let mut t = vec![0.0; r * c];
        for i in 0..r {
            for j in 0..c {
                t[j * r + i] = a[i * c + j];
            }
        }
        t
    }

    #[test]
    fn products_agree_with_the_naive_triple_loop() {
        let mut rng = crate::infer::sampling::Rng::new(7);
        for &(n, k, m) in &[(1, 1, 1), (3, 5, 7), (17, 64, 33), (70, 90, 50)] {
            let mut r = |len: usize| -> Vec<f32> {
                (0..len).map(|_| rng.next_f64() as f32 - 0.5).collect()
            };
            let a = r(n * k);
            let b = r(k * m);
            let y0 = r(n * m);
            let want = naive(&a, &b, n, k, m);
            let close = |got: &[f32], want: &[f32]| {
                for (g, w) in got.iter().zip(want) {
                    assert!((g - w).abs() < 1e-4, "{g} vs {w}");
                }
            };
            let mut y = vec![0.0; n * m];
            matmul_nn_scaled(&a, &b, &mut y, n, k, m, 1.0, false);
            close(&y, &want);
            let bt = transpose(&b, k, m);
            matmul_nt(&a, &bt, &mut y, n, k, m, false);
            close(&y, &want);
            let at = transpose(&a, n, k);
            let mut y2 = y0.clone();
            matmul_tn_scaled(&at, &b, &mut y2, n, k, m, 2.0, true);
            let want2: Vec<f32> = y0.iter().zip(&want).map(|(o, w)| o + 2.0 * w).collect();
            close(&y2, &want2);
        }
    }
}
