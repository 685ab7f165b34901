use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use pare::plan::quantize::{self, Options, Override, Stage};
use pare::plan::report::QuantizeReport;
use pare::plan::{allocate::Strategy, budget::Budget, frontier};
use pare::quant::quantize::Method;

#[derive(clap::Args)]
pub struct Args {
    /// Model to quantize: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// Output GGUF; written under a temporary name and renamed when complete.
    #[arg(short = 'o', long = "output")]
    output: Option<std::path::PathBuf>,
    /// The whole output file's size (61865984, 59MiB, 0.06GB) or bits per weight (3.0bpw).
    #[arg(long)]
    budget: Option<Budget>,
    /// optimal (least predicted error within the budget), thresholds (the seed's score rule) or
    /// uniform:FORMAT.
    #[arg(long, default_value = "optimal")]
    strategy: Strategy,
    /// Fewest code bits a tensor may get (default 2: one-bit formats only when asked for).
    #[arg(long)]
    min_bits: Option<u32>,
    /// Most code bits a tensor may get (f16 counts as 16).
    #[arg(long)]
    max_bits: Option<u32>,
    /// Pin tensors whose name matches REGEX to FORMAT (repeatable; the first match wins).
    #[arg(long = "override", value_name = "REGEX=FORMAT")]
    overrides: Vec<Override>,
    /// Calibration text (default: the WikiText-2 slice compiled into pare, see data/README.md).
    #[arg(long)]
    calib: Option<std::path::PathBuf>,
    /// Calibration chunks of --ctx tokens.
    #[arg(long, default_value_t = 8)]
    calib_chunks: usize,
    /// Calibration context length.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Rows per tensor the errors are measured on.
    #[arg(long, default_value_t = 64)]
    sample_rows: usize,
    /// How errors of different tensors are made comparable: fisher (rows weighted by the loss
    /// gradient: predicted KL), kl (rates from KL measured per block and kind) or output (none).
    #[arg(long, default_value = "fisher")]
    sensitivity: quantize::Sensitivity,
    /// Calibration tokens the sensitivity is measured on (default: 1024 for fisher, 256 for kl).
    #[arg(long)]
    sensitivity_tokens: Option<usize>,
    /// How group scales are chosen: search (least importance-weighted error) or rtn.
    #[arg(long, default_value = "search")]
    method: String,
    /// Also write the report as JSON.
    #[arg(long)]
    report: Option<std::path::PathBuf>,
    /// Draw the size-vs-predicted-perplexity frontier (uniform formats vs optimal) as a PNG.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Reuse the calibration and measurements saved in this file when they are of the same model
    /// and options (re-planning at another budget then takes seconds); save them there otherwise.
    #[arg(long)]
    measurements: Option<std::path::PathBuf>,
    /// Plan and report only; write no model.
    #[arg(long)]
    dry_run: bool,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn bar(template: &str) -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(ProgressStyle::with_template(template).expect("valid template"));
    pb
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.output.is_some() || a.dry_run,
        "give -o OUT.gguf (or --dry-run to plan only)"
    );
    if matches!(a.strategy, Strategy::Optimal | Strategy::Thresholds { .. }) {
        anyhow::ensure!(
            a.budget.is_some(),
            "--strategy {} needs --budget (e.g. --budget 3.5bpw or --budget 59MiB)",
            if a.strategy == Strategy::Optimal {
                "optimal"
            } else {
                "thresholds"
            }
        );
    }
    if let (Some(lo), Some(hi)) = (a.min_bits, a.max_bits) {
        anyhow::ensure!(lo <= hi, "--min-bits {lo} is above --max-bits {hi}");
    }
    if let Some(t) = a.threads {
        anyhow::ensure!(
            (1..=1024).contains(&t),
            "--threads must be between 1 and 1024, got {t}"
        );
        pare::parallel::set_threads(t);
    }
    let calibration_text = match &a.calib {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?
        }
        None => quantize::DEFAULT_CALIBRATION_TEXT.to_string(),
    };
    anyhow::ensure!(
        !calibration_text.trim().is_empty(),
        "the calibration text is empty"
    );
    let opts = Options {
        strategy: a.strategy.clone(),
        budget: a.budget,
        min_bits: a.min_bits,
        max_bits: a.max_bits,
        overrides: a.overrides.clone(),
        calibration_text,
        n_ctx: a.ctx,
        max_chunks: a.calib_chunks,
        sample_rows: a.sample_rows,
        sensitivity: a.sensitivity,
        sensitivity_tokens: a.sensitivity_tokens,
        method: match a.method.as_str() {
            "search" => Method::Search,
            "rtn" => Method::Rtn,
            m => anyhow::bail!("--method {m}: use search or rtn"),
        },
    };
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))?;
    let t0 = std::time::Instant::now();
    let pb = bar("{prefix:>10} {bar:30} {pos}/{len} [{elapsed} < {eta}]");
    let mut stages: Vec<(&str, f64)> = Vec::new();
    let plan = quantize::plan(
        &a.model,
        &opts,
        a.measurements.as_deref(),
        |stage, done, total| {
            let name = match stage {
                Stage::Calibrate => "calibrate",
                Stage::Measure => "measure",
                Stage::Sensitivity => "sensitivity",
            };
            // Each stage's time runs from the previous stage's last report to its own last one.
            let now = t0.elapsed().as_secs_f64();
            match stages.last_mut() {
                Some((n, end)) if *n == name => *end = now,
                _ => stages.push((name, now)),
            }
            pb.set_prefix(name);
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            if INTERRUPTED.load(Ordering::Relaxed) {
                pb.abandon_with_message("interrupted");
            }
        },
    );
    pb.finish_and_clear();
    anyhow::ensure!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted; nothing written"
    );
    let plan = plan?;
    let planned_s = t0.elapsed().as_secs_f64();
    let report = QuantizeReport::new(&plan)?;
    print!("{}", report.to_text());
    if let Some(out) = &a.output {
        if !a.dry_run {
            let pb = super::TensorBar::new();
            let r = plan.write(out, Some(&INTERRUPTED), |p| pb.update(&p));
            pb.finish();
            let r = r?;
            println!(
                "wrote {}: {} bytes, {:.3} bits per weight",
                r.path.display(),
                r.file_bytes,
                r.bits_per_weight()
            );
        }
    }
    if let Some(p) = &a.report {
        pare::atomic_file::write(p, report.to_json().as_bytes())?;
    }
    if let Some(p) = &a.plot {
        frontier::write_chart(&plan, p)?;
    }
    let mut prev = 0.0;
    let split: Vec<String> = stages
        .iter()
        .map(|&(n, end)| {
            let d = end - std::mem::replace(&mut prev, end);
            format!("{n} {d:.1} s")
        })
        .collect();
    println!(
        "planned in {:.1} s ({}), done in {:.1} s",
        planned_s,
        if split.is_empty() {
            "measurements reused".to_string()
        } else {
            split.join(", ")
        },
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
