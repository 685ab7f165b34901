//! Draws BENCHMARKS' sparse FFN chart: decode speed relative to dense against perplexity,
//! one line per model over the sparsity levels.
//!
//! Input: a text file of whitespace-separated lines `MODEL S PPL TG_RATIO` (`#` starts a comment).
//! Usage: `cargo run --release --example sparse_chart -- results.txt out.png ["x-axis label"]`

use pare::plot::{write_png, Chart, Series, Style};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3 || args.len() == 4,
        "usage: sparse_chart RESULTS.txt OUT.png [X_LABEL]"
    );
    let text = std::fs::read_to_string(&args[1])?;
    let mut series: Vec<Series> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        anyhow::ensure!(f.len() == 4, "expected MODEL S PPL TG_RATIO: {line:?}");
        let (ppl, ratio): (f64, f64) = (f[2].parse()?, f[3].parse()?);
        match series.iter_mut().find(|s| s.name == f[0]) {
            Some(s) => s.points.push((ppl, ratio)),
            None => series.push(Series::new(f[0], vec![(ppl, ratio)], Style::LineAndPoints)),
        }
    }
    let chart = Chart {
        title: "Sparse FFN decode: speed vs perplexity (S = 0, 0.2 .. 0.5)".into(),
        x_label: args
            .get(3)
            .cloned()
            .unwrap_or_else(|| "perplexity (WikiText-2 valid)".into()),
        y_label: "decode speed relative to dense (1-thread CPU time)".into(),
        log_y: false,
        series,
    };
    write_png(std::path::Path::new(&args[2]), &chart)?;
    Ok(())
}
