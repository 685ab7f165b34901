use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use pare::convert::open_source;
use pare::plan::sparse_alloc;
use pare::plan::sparsify::{self, Criterion, SparsityPlan, WriteOptions, DEFAULT_LEVELS};

#[derive(clap::Args)]
pub struct Args {
    /// Model to sparsify (GGUF).
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// Calibration text (keep it apart from the text you evaluate on).
    #[arg(long)]
    calib: std::path::PathBuf,
    /// Tokens per calibration chunk.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Calibration chunks (at most; fewer when the text is shorter).
    #[arg(long, default_value_t = 16)]
    chunks: usize,
    /// Fraction of each layer's FFN neurons that are hot (always computed, no per-neuron test).
    #[arg(long, default_value_t = 0.1)]
    hot: f32,
    /// What the thresholds test: `activation` tests each |x| entering gate/up and each neuron's
    /// |activation| alone (TEAL); `weighted` multiplies them by the norm of the weight column
    /// they meet (WINA; on SmolLM2-135M it was slightly worse, see BENCHMARKS).
    #[arg(long, value_enum, default_value_t = CriterionArg::Activation)]
    criterion: CriterionArg,
    /// Sparsity levels to calibrate, comma-separated, increasing within (0, 1).
    #[arg(long, value_delimiter = ',')]
    levels: Option<Vec<f32>>,
    /// How each level's skipped bytes are shared among layers and matrices: `kl` measures each
    /// layer's gate/up and down alone at a few skip fractions (KL to the dense model on the first
    /// `--alloc-chunks` calibration chunks) and skips where it costs least; `uniform` skips the
    /// same share everywhere.
    #[arg(long, value_enum, default_value_t = Allocation::Kl)]
    allocation: Allocation,
    /// Calibration chunks the `kl` allocation measures on (each measurement runs a chunk).
    #[arg(long, default_value_t = 1)]
    alloc_chunks: usize,
    /// Interpolate each measured error curve in skipped input energy instead of in the skipped
    /// fraction (on SmolLM2-135M it allocated worse; see BENCHMARKS).
    #[arg(long)]
    alloc_energy: bool,
    /// Tokens per chunk of the `kl` allocation's measurements (default: --ctx). Shorter chunks
    /// measure faster (the cost is one forward pass of a chunk per measurement).
    #[arg(long)]
    alloc_ctx: Option<usize>,
    /// Also print, for every level up to 0.5, the KL to the dense model with all layers skipping
    /// under the uniform and under the chosen allocation (on the allocation's chunks).
    #[arg(long)]
    compare: bool,
    /// Output file; written beside it under a temporary name, then renamed.
    #[arg(short = 'o', long = "output")]
    output: std::path::PathBuf,
    /// Also draw the per-layer neuron frequency distributions to this PNG.
    #[arg(long)]
    chart: Option<std::path::PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CriterionArg {
    Weighted,
    Activation,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Allocation {
    Kl,
    Uniform,
}

/// Set by Ctrl-C; the writer checks it between tensors and removes its temporary file.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn bar(what: &str) -> ProgressBar {
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed}} < {{eta}}]"
        ))
        .expect("valid template"),
    );
    pb
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let common = super::Common {
        model: a.model.clone(),
        threads: a.threads,
        exact_activations: false,
        kv_type: super::KvTypeArg::F16,
        sparsity: 0.0,
        sparse_path: false,
        lora: None,
        mmap: false,
    };
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))?;
    let model = common.load()?;
    // Fail before calibrating when the copies cannot be made.
    let src = open_source(&a.model)?;
    let copies = sparsify::copies(src.as_ref(), &model.config)?;
    let shares = sparsify::code_shares(&copies);
    let bytes = sparsify::layer_bytes(&copies);
    let text = std::fs::read_to_string(&a.calib)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.calib.display()))?;
    let tokens = model.tokenizer()?.encode(&text, true, false)?;
    let pb = bar("calibration chunks");
    let criterion = match a.criterion {
        CriterionArg::Weighted => Criterion::Weighted,
        CriterionArg::Activation => Criterion::Activation,
    };
    let stats = sparsify::collect_stats(
        &model,
        &tokens,
        a.ctx,
        Some(a.chunks),
        criterion,
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    );
    pb.finish_and_clear();
    let stats = stats?;
    anyhow::ensure!(
        !INTERRUPTED.load(Ordering::Relaxed),
        "interrupted; nothing written"
    );
    let levels = a.levels.clone().unwrap_or_else(|| DEFAULT_LEVELS.to_vec());
    let uniform = SparsityPlan::new(&stats, a.hot, &levels, &shares)?;
    let mut plan = uniform.clone();
    if a.allocation == Allocation::Kl {
        let opts = sparse_alloc::Options {
            n_ctx: a.alloc_ctx.unwrap_or(a.ctx),
            chunks: a.alloc_chunks,
            points: sparse_alloc::DEFAULT_POINTS.to_vec(),
            energy_interpolation: a.alloc_energy,
        };
        let pb = bar("allocation measurements");
        let r = sparse_alloc::allocate_plan(
            &model,
            &mut plan,
            &stats,
            &bytes,
            &tokens,
            &opts,
            |done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            },
        );
        pb.finish_and_clear();
        r?;
        anyhow::ensure!(
            !INTERRUPTED.load(Ordering::Relaxed),
            "interrupted; nothing written"
        );
    }
    println!(
        "calibrated on {} tokens of {}; hot fraction {}",
        stats.tokens,
        a.calib.display(),
        a.hot
    );
    let mid = levels
        .iter()
        .position(|&s| s >= 0.5)
        .unwrap_or(levels.len() - 1);
    println!("allocation: {}", plan.allocation);
    println!(
        "layer  median|a|  hot  hot-freq  cold-freq  rarely-active  t_x@{s}  t_a@{s}  \
         skip_x@{s}  skip_a@{s}",
        s = levels[mid]
    );
    for (l, lp) in plan.layers.iter().enumerate() {
        let s = lp.summary(l);
        println!(
            "{:>5}  {:>8.4}  {:>4}  {:>8.3}  {:>9.3}  {:>13.3}  {:>7.4}  {:>7.4}  {:>9.3}  {:>9.3}",
            l,
            s.reference,
            s.n_hot,
            s.hot_mean_freq,
            s.cold_mean_freq,
            s.rarely_active,
            lp.input_thresholds[mid],
            lp.neuron_thresholds[mid],
            lp.input_skip[mid],
            lp.neuron_skip[mid]
        );
    }
    if a.compare {
        let ks: Vec<usize> = (0..levels.len()).filter(|&k| levels[k] <= 0.5).collect();
        let which: Vec<(&SparsityPlan, usize)> = ks
            .iter()
            .flat_map(|&k| [(&uniform, k), (&plan, k)])
            .collect();
        let n_ctx = a.alloc_ctx.unwrap_or(a.ctx);
        let kl = sparse_alloc::levels_kl(&model, &which, &tokens, n_ctx, a.alloc_chunks)?;
        println!("level  KL uniform  KL {}", plan.allocation);
        for (i, &k) in ks.iter().enumerate() {
            println!(
                "{:>5}  {:>10.4}  {:>8.4}",
                levels[k],
                kl[2 * i],
                kl[2 * i + 1]
            );
        }
    }
    if let Some(path) = &a.chart {
        pare::plot::write_png(path, &plan.chart())?;
        println!("wrote {}", path.display());
    }
    let config = model.config.clone();
    drop(model);
    let opts = WriteOptions {
        cancel: Some(&INTERRUPTED),
    };
    let pb = bar("layers");
    let calib_name = a
        .calib
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let report = sparsify::write_sparsified(
        src.as_ref(),
        &config,
        &plan,
        &calib_name,
        &a.output,
        &opts,
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    );
    pb.finish_and_clear();
    let report = report?;
    println!(
        "wrote {}: {:.2} MiB, of which {:.2} MiB exact transposed-group FFN copies",
        report.path.display(),
        report.file_bytes as f64 / (1 << 20) as f64,
        report.copy_bytes as f64 / (1 << 20) as f64
    );
    Ok(())
}
