//! What `pare quantize` did, for people (a table and a summary) and for programs (JSON).

use serde::Serialize;

use crate::error::Result;
use crate::plan::quantize::{format_counts, Plan};
use crate::quant::format;

/// One row of the per-tensor table.
#[derive(Debug, Clone, Serialize)]
pub struct TensorRow {
    pub name: String,
    pub params: u64,
    pub format: String,
    /// The stored type (the format's twin at this row length).
    pub stored: String,
    pub bytes: u64,
    pub bits_per_weight: f64,
    pub predicted_error: f64,
    /// Predicted error at the smallest and largest candidate: the tensor's sensitivity range.
    pub error_at_fewest_bits: f64,
    pub error_at_most_bits: f64,
    pub score: f64,
    pub weight_variance: f64,
    pub weight_max_abs: f32,
    pub weight_outliers: f64,
    pub activation_range: f32,
    pub importance_mean: f64,
    /// Nats of KL per unit of output error for the tensor's group (1 when not measured).
    pub kl_rate: f64,
    pub pinned: bool,
}

/// The whole-plan summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub strategy: String,
    pub budget: Option<String>,
    pub file_bytes: u64,
    pub data_bytes: u64,
    pub n_weights: u64,
    pub bits_per_weight: f64,
    /// File size relative to the same model in f16 / f32 (data only, same header).
    pub compression_vs_f16: f64,
    pub compression_vs_f32: f64,
    pub formats: Vec<(String, usize)>,
    pub predicted_error: f64,
    /// For `optimal`: cost minus the Lagrangian lower bound (0 means proven optimal).
    pub optimality_gap: Option<f64>,
    pub calibration_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct QuantizeReport {
    pub summary: Summary,
    pub tensors: Vec<TensorRow>,
}

impl QuantizeReport {
    pub fn new(plan: &Plan) -> Result<QuantizeReport> {
        let tensors: Vec<TensorRow> = plan
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let c = plan.chosen(i);
                let params = (t.rows * t.cols) as u64;
                let bytes = c
                    .storage
                    .row_bytes(t.cols)
                    .map_or(0, |rb| (rb * t.rows) as u64);
                let by_size = |pick_max: bool| {
                    let it = t.candidates.iter();
                    let o = if pick_max {
                        it.max_by_key(|c| c.bytes)
                    } else {
                        it.min_by_key(|c| c.bytes)
                    };
                    o.map_or(0.0, |c| c.error)
                };
                TensorRow {
                    name: t.name.clone(),
                    params,
                    format: format::name(c.format),
                    stored: format::name(c.storage),
                    bytes,
                    bits_per_weight: 8.0 * bytes as f64 / params.max(1) as f64,
                    predicted_error: c.error,
                    error_at_fewest_bits: by_size(false),
                    error_at_most_bits: by_size(true),
                    score: t.score,
                    weight_variance: t.weights.variance,
                    weight_max_abs: t.weights.max_abs,
                    weight_outliers: t.weights.outliers,
                    activation_range: t.activation_range,
                    importance_mean: t.importance_mean,
                    kl_rate: t.kl_rate,
                    pinned: t.pinned,
                }
            })
            .collect();
        let file_bytes = plan.file_bytes()?;
        let data_bytes = plan.data_bytes()?;
        let header = file_bytes - data_bytes;
        let predicted_error = tensors.iter().map(|t| t.predicted_error).sum::<f64>();
        Ok(QuantizeReport {
            summary: Summary {
                strategy: match &plan.options.strategy {
                    crate::plan::allocate::Strategy::Uniform(f) => {
                        format!("uniform:{}", format::name(*f))
                    }
                    crate::plan::allocate::Strategy::Thresholds { .. } => "thresholds".into(),
                    crate::plan::allocate::Strategy::Optimal => "optimal".into(),
                },
                budget: plan.options.budget.map(|b| b.to_string()),
                file_bytes,
                data_bytes,
                n_weights: plan.n_weights,
                bits_per_weight: plan.bits_per_weight()?,
                compression_vs_f16: (header + 2 * plan.n_weights) as f64 / file_bytes as f64,
                compression_vs_f32: (header + 4 * plan.n_weights) as f64 / file_bytes as f64,
                formats: format_counts(plan),
                predicted_error,
                optimality_gap: plan
                    .allocation
                    .lower_bound
                    .map(|lb| (predicted_error - lb).max(0.0)),
                calibration_tokens: plan.calibration.tokens,
            },
            tensors,
        })
    }

    /// The per-tensor table and the summary as text.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<28} {:>9} {:<12} {:>9} {:>6} {:>11} {:>11} {:>6}",
            "tensor", "params", "format", "bytes", "bpw", "pred. error", "at fewest", "score"
        );
        for t in &self.tensors {
            let _ = writeln!(
                s,
                "{:<28} {:>9} {:<12} {:>9} {:>6.3} {:>11.4e} {:>11.4e} {:>6.3}{}",
                t.name,
                t.params,
                t.format,
                t.bytes,
                t.bits_per_weight,
                t.predicted_error,
                t.error_at_fewest_bits,
                t.score,
                if t.pinned { "  (pinned)" } else { "" }
            );
        }
        let m = &self.summary;
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "strategy {}{}",
            m.strategy,
            m.budget
                .as_ref()
                .map_or(String::new(), |b| format!(", budget {b}"))
        );
        let _ = writeln!(
            s,
            "file {} bytes ({:.2} MiB), {:.3} bits per weight over {} weights; {:.2}x smaller than f16, {:.2}x than f32",
            m.file_bytes,
            m.file_bytes as f64 / 1048576.0,
            m.bits_per_weight,
            m.n_weights,
            m.compression_vs_f16,
            m.compression_vs_f32
        );
        let counts: Vec<String> = m.formats.iter().map(|(f, n)| format!("{f} ×{n}")).collect();
        let _ = writeln!(s, "formats: {}", counts.join(", "));
        let _ = write!(s, "predicted error {:.5e}", m.predicted_error);
        if let Some(g) = m.optimality_gap {
            let _ = write!(
                s,
                " (optimality gap ≤ {:.3e}, {:.3}%)",
                g,
                100.0 * g / m.predicted_error.max(f64::MIN_POSITIVE)
            );
        }
        let _ = writeln!(s, "; calibrated on {} tokens", m.calibration_tokens);
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plain data serializes")
    }
}
