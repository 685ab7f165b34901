use pare::export::{export_hf, parse_dtype, ExportOptions, DEFAULT_MAX_SHARD_BYTES};

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(short = 'm', long = "model")]
    model: std::path::PathBuf,
    /// The checkpoint directory to write.
    #[arg(short = 'o', long = "out")]
    out: std::path::PathBuf,
    /// Dtype of the written tensors: f32, f16 or bf16 (low-bit weights are dequantized).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Largest safetensors shard, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_SHARD_BYTES)]
    max_shard_bytes: u64,
    /// Replace the output directory if it exists.
    #[arg(long)]
    overwrite: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = ExportOptions {
        dtype: parse_dtype(&a.dtype)?,
        max_shard_bytes: a.max_shard_bytes,
        overwrite: a.overwrite,
    };
    let t0 = std::time::Instant::now();
    let model = pare::model::Model::load(&a.model)?;
    let r = export_hf(&model, &a.out, &opts)?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MiB of {} weights, files: {}) in {:.2} s",
        r.dir.display(),
        r.tensors,
        r.bytes as f64 / (1 << 20) as f64,
        a.dtype,
        r.files.join(", "),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
