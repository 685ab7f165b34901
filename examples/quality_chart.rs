//! Draws BENCHMARKS' quality-vs-size chart from `scripts/quality-baseline`'s `baseline.json`:
//! perplexity (log scale) against bits per weight of the tensors, one series per kind of
//! format (ggml's types, pare's asymmetric and symmetric groups, the planner's mixed plans), and
//! the source model's perplexity as a line.
//!
//! Usage: `cargo run --release --example quality_chart -- baseline.json out.png [MAX_PPL]`
//! (points above MAX_PPL, default 1000, are left out so that broken formats do not flatten the
//! rest; the chart's title says how many were).

use pare::plot::{write_png, Chart, Series, Style};
use serde::Deserialize;

#[derive(Deserialize)]
struct Doc {
    chunks: usize,
    base: Base,
    rows: Vec<Row>,
}

#[derive(Deserialize)]
struct Base {
    ppl: f64,
}

#[derive(Deserialize)]
struct Row {
    format: String,
    bpw_all: f64,
    ppl: f64,
}

/// Which series a row belongs to, by its name: `plan-…` rows are the planner's, `q3_g64[_sym]`
/// pare's group formats, anything else (q8_0, q4_1, f16, q1_0, …) a ggml type.
fn kind(format: &str) -> &'static str {
    if format.starts_with("plan") {
        "planner (mixed formats)"
    } else if format.contains("_g") && format.ends_with("_sym") {
        "uniform, symmetric groups"
    } else if format.contains("_g") {
        "uniform, asymmetric groups"
    } else {
        "uniform, ggml types"
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3 || args.len() == 4,
        "usage: quality_chart baseline.json OUT.png [MAX_PPL]"
    );
    let doc: Doc = serde_json::from_str(&std::fs::read_to_string(&args[1])?)?;
    let max_ppl: f64 = match args.get(3) {
        Some(s) => s.parse()?,
        None => 1000.0,
    };
    let mut series: Vec<Series> = Vec::new();
    let mut left_out = 0;
    for r in &doc.rows {
        if !(r.ppl.is_finite() && r.ppl <= max_ppl) {
            left_out += 1;
            continue;
        }
        let name = kind(&r.format);
        match series.iter_mut().find(|s| s.name == name) {
            Some(s) => s.points.push((r.bpw_all, r.ppl)),
            None => series.push(Series::new(name, vec![(r.bpw_all, r.ppl)], Style::Points)),
        }
    }
    // The planner's plans are one curve over budgets: join them in order of size.
    for s in &mut series {
        s.points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if s.name.starts_with("planner") {
            s.style = Style::LineAndPoints;
        }
    }
    // The source model's perplexity as a horizontal line across the chart.
    let xs = doc.rows.iter().map(|r| r.bpw_all);
    let (lo, hi) = (
        xs.clone().fold(f64::INFINITY, f64::min),
        xs.fold(0.0, f64::max),
    );
    if lo < hi {
        series.push(Series::new(
            format!("source model, PPL {:.2}", doc.base.ppl),
            vec![(lo, doc.base.ppl), (hi, doc.base.ppl)],
            Style::Line,
        ));
    }
    let chart = Chart {
        title: format!(
            "PPL vs size, WikiText-2 {}x512{}",
            doc.chunks,
            if left_out > 0 {
                format!(" ({left_out} above PPL {max_ppl} not shown)")
            } else {
                String::new()
            }
        ),
        x_label: "bits per weight (all tensors, scales included)".into(),
        y_label: "perplexity".into(),
        log_y: true,
        series,
    };
    write_png(std::path::Path::new(&args[2]), &chart)?;
    Ok(())
}
