//! The size-vs-error frontier of a measured model: every uniform format against the optimal plan
//! at a sweep of budgets, from the same measurements (no re-calibration), as numbers and a chart.

use crate::error::Result;
use crate::plan::allocate::Strategy;
use crate::plan::quantize::{Plan, Sensitivity};
use crate::plot::{self, Chart, Series, Style};
use crate::quant::format;

/// One point: bits per weight over the whole model and total predicted error.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub label: String,
    pub bits_per_weight: f64,
    pub predicted_error: f64,
}

/// Uniform formats (those every unpinned tensor allows) and optimal plans at `n` budgets spanning
/// the uniform sizes.
pub fn frontier(plan: &Plan, n: usize) -> Result<(Vec<Point>, Vec<Point>)> {
    let cands = plan.candidates();
    let bpw = |bytes: u64| 8.0 * (bytes + plan.fixed_bytes) as f64 / plan.n_weights as f64;
    let mut uniform = Vec::new();
    let formats: Vec<_> = cands
        .iter()
        .find(|c| c.len() > 1)
        .map(|c| c.iter().map(|o| o.format).collect())
        .unwrap_or_default();
    for f in formats {
        if let Ok(a) = plan.with_allocation(&Strategy::Uniform(f), None) {
            uniform.push(Point {
                label: format::name(f),
                bits_per_weight: bpw(a.bytes(&cands)),
                predicted_error: a.error(&cands),
            });
        }
    }
    uniform.sort_by(|a, b| a.bits_per_weight.total_cmp(&b.bits_per_weight));
    let min: u64 = cands
        .iter()
        .map(|c| c.iter().map(|o| o.bytes).min().unwrap_or(0))
        .sum();
    let max: u64 = cands
        .iter()
        .map(|c| c.iter().map(|o| o.bytes).max().unwrap_or(0))
        .sum();
    let mut optimal = Vec::new();
    for k in 0..n {
        // Geometric spacing: most of the interesting range is at few bits.
        let t = k as f64 / (n.max(2) - 1) as f64;
        let cap = (min as f64 * (max as f64 / min.max(1) as f64).powf(t)) as u64;
        if let Ok(a) = plan.with_allocation(&Strategy::Optimal, Some(cap.max(min))) {
            optimal.push(Point {
                label: "optimal".into(),
                bits_per_weight: bpw(a.bytes(&cands)),
                predicted_error: a.error(&cands),
            });
        }
    }
    Ok((uniform, optimal))
}

/// Draws the frontier, with the plan's own choice marked. Where the errors are predicted KL
/// (nats per token, the `fisher` and `kl` sensitivities) and calibration measured the text's own
/// loss, the y axis is the predicted perplexity on the calibration text, `exp(nll + KL)`, beside
/// the unquantized model's; otherwise it is the predicted error in the tensors' own units.
pub fn write_chart(plan: &Plan, path: &std::path::Path) -> Result<()> {
    let (uniform, optimal) = frontier(plan, 16)?;
    let cands = plan.candidates();
    let own = Point {
        label: "this plan".into(),
        bits_per_weight: 8.0 * (plan.allocation.bytes(&cands) + plan.fixed_bytes) as f64
            / plan.n_weights as f64,
        predicted_error: plan.allocation.error(&cands),
    };
    let nll = match plan.options.sensitivity {
        Sensitivity::Fisher | Sensitivity::Kl => plan.calibration.text_nll,
        Sensitivity::Output => None,
    };
    let y = |e: f64| match nll {
        Some(n) => (n + e).exp(),
        None => e,
    };
    let pts = |v: &[Point]| {
        v.iter()
            .map(|p| (p.bits_per_weight, y(p.predicted_error)))
            .collect()
    };
    let mut series = vec![
        Series::new("uniform formats", pts(&uniform), Style::Points),
        Series::new("optimal", pts(&optimal), Style::LineAndPoints),
        Series::new("this plan", pts(std::slice::from_ref(&own)), Style::Points),
    ];
    let (title, y_label) = match nll {
        Some(n) => {
            let xs = uniform.iter().chain(&optimal).map(|p| p.bits_per_weight);
            let (lo, hi) = xs.fold((f64::INFINITY, 0.0f64), |(a, b), x| (a.min(x), b.max(x)));
            series.push(Series::new(
                "unquantized",
                vec![(lo, n.exp()), (hi, n.exp())],
                Style::Line,
            ));
            (
                "predicted perplexity vs size: uniform formats and optimal plans",
                "predicted perplexity (calibration text)",
            )
        }
        None => (
            "predicted error vs size: uniform formats and optimal plans",
            "predicted output error",
        ),
    };
    let chart = Chart {
        title: title.into(),
        x_label: "bits per weight (whole model)".into(),
        y_label: y_label.into(),
        log_y: true,
        series,
    };
    plot::write_png(path, &chart)
}
