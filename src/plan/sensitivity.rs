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
use crate::quant::quantize::{quantize_row, Options};
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
/// weighted by `importance` (one value per column; `None` weighs all columns alike), measured on
/// the rows `sample` and scaled to all rows.
pub fn format_errors(
    w: &[f32],
    rows: usize,
    cols: usize,
    importance: Option<&[f32]>,
    formats: &[GgmlType],
    sample: &[usize],
) -> Result<Vec<FormatError>> {
    let scale = rows as f64 / sample.len().max(1) as f64;
    let opts = Options {
        importance,
        ..Options::default()
    };
    let mut deq = vec![0f32; cols];
    formats
        .iter()
        .map(|&f| {
            let ty = storage_type(f, cols);
            let rb = ty.row_bytes(cols)?;
            let mut q = vec![0u8; rb];
            let mut err = 0.0f64;
            for &r in sample {
                let row = &w[r * cols..(r + 1) * cols];
                quantize_row(ty, row, &opts, &mut q)?;
                dequantize_row(ty, &q, &mut deq)?;
                for (j, (&a, &b)) in row.iter().zip(&deq).enumerate() {
                    let e = (a - b) as f64;
                    err += e * e * importance.map_or(1.0, |imp| imp[j] as f64);
                }
            }
            Ok(FormatError {
                format: f,
                bytes: (rb * rows) as u64,
                error: err * scale,
            })
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
        let e = format_errors(&w, rows, cols, None, &fmts, &all).unwrap();
        assert!(e[0].error > e[1].error && e[1].error > e[2].error);
        assert!(e[0].bytes < e[1].bytes && e[1].bytes < e[2].bytes);
        // A sample predicts the whole within a factor.
        let part = format_errors(&w, rows, cols, None, &fmts, &sample_rows(rows, 10)).unwrap();
        assert!((part[1].error / e[1].error - 1.0).abs() < 0.5);
        // Columns that never see input cost nothing.
        let imp: Vec<f32> = (0..cols).map(|j| if j < 48 { 1.0 } else { 0.0 }).collect();
        let weighted = format_errors(&w, rows, cols, Some(&imp), &fmts, &all).unwrap();
        assert!(weighted[1].error < e[1].error);
    }
}
