//! One module per command; each parses its arguments and calls the library.

mod bench;
mod convert;
mod export;
mod inspect;
mod merge;
mod perplexity;
mod quantize;
mod run;
mod sparsify;
mod stages;
mod tune;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pare",
    version,
    about = "Fit a language model to a memory budget, adapt it, and run it fast"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prompt-processing and generation speed (tokens/s) and peak memory.
    Bench(bench::Args),
    /// Re-quantize every linear weight to one format and write a new GGUF.
    Convert(convert::Args),
    /// Write a model as a Hugging Face checkpoint directory (config.json, safetensors, tokenizer).
    Export(export::Args),
    /// Tensors, formats, sizes and metadata of a model file.
    Inspect(inspect::Args),
    /// Fold LoRA adapters into a GGUF base and re-quantize, writing a new GGUF.
    Merge(merge::Args),
    /// Perplexity of a text the way llama-perplexity measures it; KL divergence to a saved base.
    Perplexity(perplexity::Args),
    /// Mixed-precision quantization within a memory budget: calibrate, measure each tensor's
    /// error under each format, choose formats (optimal, thresholds or uniform), write a GGUF.
    Quantize(quantize::Args),
    /// Generate text from a prompt, streamed to stdout.
    Run(run::Args),
    /// Calibrate hot/cold neurons and activation thresholds; write a model for sparse FFN execution.
    Sparsify(sparsify::Args),
    /// Fine-tune LoRA adapters (optionally quantization-aware) through the frozen quantized model.
    Tune(tune::Args),
}

/// `--kv-type`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvTypeArg {
    F16,
    F32,
}

/// Options every model-running command shares.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Model: a GGUF file or a Hugging Face checkpoint directory.
    #[arg(short = 'm', long = "model")]
    pub model: std::path::PathBuf,
    /// Worker threads (default: all cores).
    #[arg(short = 't', long = "threads")]
    pub threads: Option<usize>,
    /// Compute every product in f32 on dequantized weights (slow reference path) instead of on
    /// 8-bit activations.
    #[arg(long)]
    pub exact_activations: bool,
    /// How the KV cache stores keys and values: f16 (half the memory and the bytes attention
    /// reads, as llama.cpp's default) or f32. `--exact-activations` always uses f32.
    #[arg(long, value_enum, default_value_t = KvTypeArg::F16)]
    pub kv_type: KvTypeArg,
    /// Sparse FFN execution: the fraction of FFN weight bytes skipped per token (0 = dense). Needs
    /// a model written by `pare sparsify`.
    #[arg(long, default_value_t = 0.0)]
    pub sparsity: f32,
    /// Run the sparse FFN kernels even at --sparsity 0 (measures the sparse copies and kernels).
    #[arg(long, hide = true)]
    pub sparse_path: bool,
    /// Apply the LoRA adapters in this PEFT directory, unmerged.
    #[arg(long)]
    pub lora: Option<std::path::PathBuf>,
    /// Compute on the memory-mapped file instead of reading the model into memory backed by
    /// huge pages (less resident memory when only part of the model is used; slower decoding).
    #[arg(long)]
    pub mmap: bool,
}

impl Common {
    /// Sizes the global thread pool, then loads the model: read into memory backed by huge
    /// pages unless `--mmap` is given.
    pub fn load(&self) -> anyhow::Result<pare::model::Model> {
        self.load_with(!self.mmap)
    }

    /// As [`Common::load`], read into memory only when `resident` (a pipeline stage touches only
    /// its layers, so keeps the map).
    pub fn load_with(&self, resident: bool) -> anyhow::Result<pare::model::Model> {
        if let Some(t) = self.threads {
            anyhow::ensure!(
                (1..=1024).contains(&t),
                "--threads must be between 1 and 1024, got {t}"
            );
            // The forward pass runs on pare's own pool; rayon serves the evaluation helpers.
            pare::parallel::set_threads(t);
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build_global()?;
        }
        let mut model = if resident {
            pare::model::Model::load_resident(&self.model)?
        } else {
            pare::model::Model::load(&self.model)?
        };
        model.exact_activations = self.exact_activations;
        model.kv_type = match self.kv_type {
            KvTypeArg::F16 => pare::model::KvType::F16,
            KvTypeArg::F32 => pare::model::KvType::F32,
        };
        if self.sparse_path {
            model.set_sparse_path(self.sparsity)?;
        } else {
            model.set_sparsity(self.sparsity)?;
        }
        if let Some(dir) = &self.lora {
            let lora = pare::model::Lora::load(dir, &model.config)?;
            model.lora = Some(std::sync::Arc::new(lora));
        }
        Ok(model)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Export(a) => export::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Perplexity(a) => perplexity::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Run(a) => run::run(a),
        Command::Sparsify(a) => sparsify::run(a),
        Command::Tune(a) => tune::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The progress bar of a command that writes a model tensor by tensor.
pub struct TensorBar(indicatif::ProgressBar);

impl TensorBar {
    pub fn new() -> TensorBar {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} tensors {msg} [{elapsed} < {eta}]",
            )
            .expect("valid template"),
        );
        TensorBar(pb)
    }

    /// Shows that `p.done` of `p.total` tensors are written, the last one by name and type.
    pub fn update(&self, p: &pare::convert::Progress) {
        self.0.set_length(p.total as u64);
        self.0.set_position(p.done as u64);
        self.0.set_message(format!(
            "{} {}",
            p.tensor.spec.name,
            pare::quant::format::name(p.tensor.spec.ggml_type)
        ));
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
