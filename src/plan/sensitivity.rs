//! How much a tensor suffers under a format, measured: the activation-weighted output error
//! `E‖(W − Q(W)) x‖²` over the calibration inputs, which with per-column input importance
//! `imp_j = E[x_j²]` (diagonal approximation) is `Σ_rows Σ_j imp_j (W − Q(W))²_rj`.
//!
//! Quantizing every row of every tensor under every candidate format would take minutes on a
//! laptop, so the error is measured on an evenly spaced sample of rows and scaled to the whole
//! tensor; the sample is the same for every format, so formats are compared on equal terms.

use crate::error::Result;
use crate::quant::dequant::dequantize_row;
use crate::quant::format::storage_type;
use crate::quant::quantize::{quantize_row, Method, Options};
use crate::quant::GgmlType;

/// Predicted output error and stored size of one tensor under one format.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FormatError {
    /// The format as the user names it (the stored type may be its twin, see [`storage_type`]).
    pub format: GgmlType,
    pub bytes: u64,
    pub error: f64,
}

/// Evenly spaced row indices: all rows when there are at most `max` of them.
pub fn sample_rows(rows: usize, max: usize) -> Vec<usize> {
    if rows <= max {
        return (0..rows).collect();
    }
    (0..max).map(|i| i * rows / max).collect()
}

/// The error of each format in `formats` for the matrix `w` (`rows × cols`, f32, row-major),
/// weighted by `importance` (one value per column; `None` weighs all columns alike) and by
/// `row_weight` (one value per row, e.g. its gradient's mean square; `None`: all alike), measured
/// on the rows `sample` and scaled to all rows.
#[allow(clippy::too_many_arguments)]
pub fn format_errors(
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
    row_weight: Option<&[f32]>,
    formats: &[GgmlType],
    sample: &[usize],
    method: Method,
) -> Result<Vec<FormatError>> {
    // With row weights the sample is scaled by weight (a ratio estimate: rows of large gradient
    // count for more whatever their number), else by count.
    let scale = match row_weight {
        Some(rw) => {
            let all: f64 = rw.iter().map(|&v| v as f64).sum();
            let part: f64 = sample.iter().map(|&r| rw[r] as f64).sum();
            if part > 0.0 {
                all / part
            } else {
                0.0
            }
        }
        None => rows as f64 / sample.len().max(1) as f64,
    };
    let opts = Options { importance, method };
    use rayon::prelude::*;
    formats
        .par_iter()
        .map(|&f| {
            let mut deq = vec![0f32; cols];
            let ty = storage_type(f, cols);
            let rb = ty.row_bytes(cols)?;
            let mut q = vec![0u8; rb];
            let mut err = 0.0f64;
            for &r in sample {
                let row = &w[r * cols..(r + 1) * cols];
                quantize_row(ty, row, &opts, &mut q)?;
                dequantize_row(ty, &q, &mut deq)?;
                let mut row_err = 0.0f64;
                for (j, (&a, &b)) in row.iter().zip(&deq).enumerate() {
                    let e = (a - b) as f64;
                    row_err += e * e * importance.map_or(1.0, |imp| imp[j] as f64);
                }
                err += row_err * row_weight.map_or(1.0, |rw| rw[r] as f64);
            }
            Ok(FormatError {
                format: f,
                bytes: (rb * rows) as u64,
                error: err * scale,
            })
        })
        .collect()
}

/// Statistics of a weight matrix: the seed's "weight variance" and how heavy its tails are.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightStats {
    pub variance: f64,
    pub max_abs: f32,
    /// Fraction of weights more than 6 standard deviations from the mean.
    pub outliers: f64,
}

pub fn weight_stats(w: &[f32]) -> WeightStats {
    let n = w.len().max(1) as f64;
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
    let variance = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let lim = 6.0 * variance.sqrt();
    let outliers = w.iter().filter(|&&v| (v as f64 - mean).abs() > lim).count() as f64 / n;
    WeightStats {
        variance,
        max_abs: w.iter().fold(0.0, |m, &v| m.max(v.abs())),
        outliers,
    }
}

/// What the seed's composite score is made of, for one tensor.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScoreInputs {
    /// Gradient (Fisher) sensitivity, when measured.
    pub grad: Option<f64>,
    pub weight_variance: f64,
    pub activation_range: f64,
    /// Output sensitivity: the activation-weighted error at a reference format.
    pub output: f64,
    pub embedding: bool,
    pub final_layer: bool,
}

/// The seed's composite score: 0.4·grad + 0.3·weight variance + 0.2·activation range + 0.1·output
/// sensitivity, each min-max normalised over the tensors, +1 for embeddings, +0.5 for the final
/// layer. Without gradients their 0.4 is left out (the other weights keep their values).
pub fn composite_scores(t: &[ScoreInputs]) -> Vec<f64> {
    let norm = |get: &dyn Fn(&ScoreInputs) -> f64| -> Vec<f64> {
        let v: Vec<f64> = t.iter().map(get).collect();
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        v.iter()
            .map(|&x| if hi > lo { (x - lo) / (hi - lo) } else { 0.0 })
            .collect()
    };
    let grad = norm(&|s| s.grad.unwrap_or(0.0));
    let var = norm(&|s| s.weight_variance);
    let range = norm(&|s| s.activation_range);
    let out = norm(&|s| s.output);
    t.iter()
        .enumerate()
        .map(|(i, s)| {
            0.4 * grad[i]
                + 0.3 * var[i]
                + 0.2 * range[i]
                + 0.1 * out[i]
                + if s.embedding { 1.0 } else { 0.0 }
                + if s.final_layer { 0.5 } else { 0.0 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::format;

    #[test]
    fn more_bits_less_error_and_importance_steers_it() {
        let (rows, cols) = (40, 96);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.1)
            .collect();
        let fmts: Vec<GgmlType> = ["q2_g32", "q4_g32", "q8_0"]
            .iter()
            .map(|n| format::parse(n).unwrap())
            .collect();
        let all = sample_rows(rows, 1000);
        let e = format_errors(&w, rows, cols, None, None, &fmts, &all, Method::Search).unwrap();
        assert!(e[0].error > e[1].error && e[1].error > e[2].error);
        assert!(e[0].bytes < e[1].bytes && e[1].bytes < e[2].bytes);
        // A sample predicts the whole within a factor.
        let part = format_errors(
            &w,
            rows,
            cols,
            None,
            None,
            &fmts,
            &sample_rows(rows, 10),
            Method::Search,
        )
        .unwrap();
        assert!((part[1].error / e[1].error - 1.0).abs() < 0.5);
        // Columns that never see input cost nothing.
        let imp: Vec<f32> = (0..cols).map(|j| if j < 48 { 1.0 } else { 0.0 }).collect();
        let weighted = format_errors(
            &w,
            rows,
            cols,
            Some(&imp),
            None,
            &fmts,
            &all,
            Method::Search,
        )
        .unwrap();
        assert!(weighted[1].error < e[1].error);
        // Row weights: doubling every row's weight doubles the error; a sample of weighted rows
        // is scaled by weight, so rows of zero weight outside the sample change nothing.
        let two = vec![2.0f32; rows];
        let doubled = format_errors(
            &w,
            rows,
            cols,
            None,
            Some(&two),
            &fmts,
            &all,
            Method::Search,
        )
        .unwrap();
        assert!((doubled[1].error / e[1].error - 2.0).abs() < 1e-9);
        let few = sample_rows(rows, 10);
        let mut rw = vec![0.0f32; rows];
        for &r in &few {
            rw[r] = 1.0;
        }
        let sampled =
            format_errors(&w, rows, cols, None, Some(&rw), &fmts, &few, Method::Search).unwrap();
        let exact =
            format_errors(&w, rows, cols, None, Some(&rw), &fmts, &all, Method::Search).unwrap();
        assert!((sampled[1].error / exact[1].error - 1.0).abs() < 1e-9);
    }

    #[test]
    fn weight_stats_and_composite_scores() {
        let mut w = vec![0.01f32; 1000];
        for (i, v) in w.iter_mut().enumerate() {
            *v = if i % 2 == 0 { 0.01 } else { -0.01 };
        }
        w[7] = 5.0;
        let st = weight_stats(&w);
        assert_eq!(st.max_abs, 5.0);
        assert!((st.outliers - 0.001).abs() < 1e-12);
        let base = ScoreInputs {
            weight_variance: 1.0,
            activation_range: 1.0,
            output: 1.0,
            ..Default::default()
        };
        let s = composite_scores(&[
            base,
            ScoreInputs {
                weight_variance: 3.0,
                ..base
            },
            ScoreInputs {
                embedding: true,
                ..base
            },
            ScoreInputs {
                final_layer: true,
                ..base
            },
        ]);
        assert!((s[1] - 0.3).abs() < 1e-12 && s[0] == 0.0);
        assert!((s[2] - 1.0).abs() < 1e-12 && (s[3] - 0.5).abs() < 1e-12);
    }
}
