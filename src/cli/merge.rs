use std::sync::atomic::{AtomicBool, Ordering};

use pare::model::Lora;
use pare::quant::format;
use pare::quant::quantize::Method;

#[derive(clap::Args)]
pub struct Args {
    /// Base model (GGUF) the adapters were trained on.
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// PEFT adapter directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    lora: std::path::PathBuf,
    /// Output GGUF; written beside it under a temporary name, then renamed.
    #[arg(short = 'o', long = "output")]
    output: std::path::PathBuf,
    /// Re-quantize every linear weight to this format (default: each adapted matrix to its own
    /// format in the base, everything else copied).
    #[arg(long)]
    format: Option<String>,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    threads: Option<usize>,
}

/// Set by Ctrl-C; the writer checks it between tensors and removes its temporary file.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(t) = a.threads {
        anyhow::ensure!(
            (1..=1024).contains(&t),
            "--threads must be between 1 and 1024, got {t}"
        );
        pare::parallel::set_threads(t);
    }
    let fmt = a.format.as_deref().map(format::parse).transpose()?;
    let gguf = pare::format::Gguf::open(&a.model)?;
    let config = pare::model::Config::from_gguf(&gguf)?;
    drop(gguf);
    let lora = Lora::load(&a.lora, &config)?;
    let qat = pare::train::fake_quant::load_state(&a.lora)?;
    if let Some(q) = &qat {
        eprintln!(
            "{}: trained with --qat {}; merging onto the grid it was trained against",
            a.lora.display(),
            q.mode.name()
        );
    }
    ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))?;
    let pb = super::TensorBar::new();
    let report = pare::train::merge::merge(
        &a.model,
        &lora,
        qat.as_ref(),
        &a.output,
        fmt,
        Method::default(),
        Some(&INTERRUPTED),
        |p| pb.update(&p),
    );
    pb.finish();
    let report = report?;
    println!(
        "wrote {}: {} tensors, {:.2} MiB, {:.3} bits per weight",
        report.path.display(),
        report.tensors.len(),
        report.file_bytes as f64 / (1 << 20) as f64,
        report.bits_per_weight()
    );
    Ok(())
}
