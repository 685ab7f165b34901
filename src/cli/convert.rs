use std::sync::atomic::{AtomicBool, Ordering};

use pare::convert::{convert, open_source, ConvertOptions};
use pare::quant::format;
use pare::quant::quantize::Method;

#[derive(clap::Args)]
pub struct Args {
    /// Model to convert (GGUF).
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// Format of every linear weight: q{1,2,3,4,5,6,8}_g{32,64,128}[_sym], q1_0, q4_0, q4_1, q5_0,
    /// q5_1, q8_0, f16, bf16, f32.
    #[arg(long)]
    format: String,
    /// Format of the token embeddings (default: --format).
    #[arg(long)]
    embeddings: Option<String>,
    /// How group scales are chosen: rtn (from the range) or search (least error).
    #[arg(long, value_enum, default_value_t = MethodArg::Search)]
    method: MethodArg,
    /// Output file; written beside it under a temporary name, then renamed.
    #[arg(short = 'o', long = "output")]
    output: std::path::PathBuf,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum MethodArg {
    Rtn,
    Search,
}

/// Set by Ctrl-C; the writer checks it between tensors and removes its temporary file.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = ConvertOptions {
        format: format::parse(&a.format)?,
        embeddings: a.embeddings.as_deref().map(format::parse).transpose()?,
        method: match a.method {
            MethodArg::Rtn => Method::Rtn,
            MethodArg::Search => Method::Search,
        },
        cancel: Some(&INTERRUPTED),
    };
    if let Some(t) = a.threads {
        anyhow::ensure!(
            (1..=1024).contains(&t),
            "--threads must be between 1 and 1024, got {t}"
        );
        // Quantization runs on pare's own pool (crate::parallel), sized before its first use.
        pare::parallel::set_threads(t);
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))?;
    let src = open_source(&a.model)?;
    let pb = super::TensorBar::new();
    let report = convert(src.as_ref(), &a.output, &opts, |p| pb.update(&p));
    pb.finish();
    let report = report?;
    println!(
        "wrote {}: {} tensors, {:.2} MiB, {:.3} bits per weight ({:.3} in the linear weights)",
        report.path.display(),
        report.tensors.len(),
        report.file_bytes as f64 / (1 << 20) as f64,
        report.bits_per_weight(),
        report.linear_bits_per_weight()
    );
    Ok(())
}
