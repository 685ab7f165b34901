//! Writing any loaded model as a Hugging Face checkpoint directory (config.json, safetensors,
//! tokenizer.json, tokenizer_config.json with the chat template), the layout transformers, PEFT,
//! llama.cpp's converter and mlx-lm read.
//!
//! Low-bit weights are dequantized; Llama query/key rows that a GGUF stores in llama.cpp's
//! adjacent-pair RoPE order are put back in Hugging Face's split-halves order. Everything is written
//! into a temporary directory beside the target, which is renamed into place only when complete,
//! so an interrupted or failed export never leaves a half-written checkpoint.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::hf::{self, halves_from_adjacent_rows};
use crate::format::safetensors::{self, Dtype, LazyTensor};
use crate::model::{Arch, Model, RopeStyle};
use crate::quant::matmul::QMatrix;

/// transformers' default shard size (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The dtype of every tensor: F32, F16 or BF16.
    pub dtype: Dtype,
    /// Start a new shard when the next tensor would take a shard past this size.
    pub max_shard_bytes: u64,
    /// Replace an existing directory at the target.
    pub overwrite: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            dtype: Dtype::F32,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            overwrite: false,
        }
    }
}

/// Parses a dtype name as the command line gives it (`f32`, `f16`, `bf16`).
pub fn parse_dtype(s: &str) -> Result<Dtype> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(Dtype::F32),
        "f16" | "float16" => Ok(Dtype::F16),
        "bf16" | "bfloat16" => Ok(Dtype::BF16),
        other => Err(Error::Invalid(format!(
            "dtype {other:?} is not one of f32, f16, bf16"
        ))),
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub files: Vec<String>,
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// One tensor to write: its Hugging Face name and how to produce it.
struct Planned<'a> {
    name: String,
    tensor: LazyTensor<'a>,
}

/// Removes the temporary directory unless the export completed.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Writes `model` as a Hugging Face checkpoint directory at `out`.
pub fn export_hf(model: &Model, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    if !matches!(opts.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::Invalid(format!(
            "cannot export as {} (f32, f16, bf16)",
            opts.dtype
        )));
    }
    if out.exists() && !opts.overwrite {
        return Err(Error::Invalid(format!(
            "{} already exists (choose another directory, or overwrite it)",
            out.display()
        )));
    }
    let tok = model.tokenizer()?;
    let template = model.chat_template()?.map(|t| t.source().to_string());

    let name = out
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} has no directory name", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp_path = parent.join(format!(
        ".{}.pare-tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if tmp_path.exists() {
        std::fs::remove_dir_all(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
    }
    std::fs::create_dir(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
    let mut tmp = TempDir(Some(tmp_path.clone()));

    // A failure inside a tensor's producer (called by the writer) is kept here and reported.
    let failure: RefCell<Option<Error>> = RefCell::new(None);
    let planned = plan_tensors(model, opts.dtype, &failure);
    let n_tensors = planned.len();
    let total: u64 = planned.iter().map(|p| p.tensor.n_bytes() as u64).sum();

    // Shards in the planned order, each under the size limit (a tensor larger than the limit
    // gets a shard of its own).
    let mut shards: Vec<Vec<Planned>> = Vec::new();
    let mut size = 0u64;
    for p in planned {
        let b = p.tensor.n_bytes() as u64;
        if shards.is_empty() || (size + b > opts.max_shard_bytes && size > 0) {
            shards.push(Vec::new());
            size = 0;
        }
        size += b;
        shards.last_mut().expect("a shard").push(p);
    }
    let n_shards = shards.len();
    let mut files = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = if n_shards == 1 {
            hf::WEIGHTS.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards)
        };
        for p in &shard {
            weight_map.insert(p.name.clone(), file.clone().into());
        }
        let tensors = shard.into_iter().map(|p| (p.name, p.tensor)).collect();
        safetensors::write(&tmp_path.join(&file), tensors)?;
        if let Some(e) = failure.borrow_mut().take() {
            return Err(e);
        }
        files.push(file);
    }
    if n_shards > 1 {
        let index = serde_json::json!({
            "metadata": { "total_size": total },
            "weight_map": weight_map,
        });
        write_json(&tmp_path.join(hf::INDEX), &index)?;
        files.push(hf::INDEX.into());
    }

    write_json(
        &tmp_path.join(hf::CONFIG),
        &config_json(model, &tok, opts.dtype),
    )?;
    let mut gen = serde_json::json!({ "_from_model_config": true });
    gen["bos_token_id"] = tok.bos().into();
    gen["eos_token_id"] = tok.eos().into();
    write_json(&tmp_path.join(hf::GENERATION_CONFIG), &gen)?;
    write_file(&tmp_path.join(hf::TOKENIZER), tok.to_hf_json()?.as_bytes())?;
    let tc = tok.hf_tokenizer_config(template.as_deref(), model.config.n_ctx_train);
    write_json(&tmp_path.join(hf::TOKENIZER_CONFIG), &tc)?;
    files.extend(
        [
            hf::CONFIG,
            hf::GENERATION_CONFIG,
            hf::TOKENIZER,
            hf::TOKENIZER_CONFIG,
        ]
        .map(String::from),
    );

    // Into place: the old directory (when overwriting) moves aside first and goes last.
    let mut old = None;
    if out.exists() {
        let aside = parent.join(format!(
            ".{}.pare-old-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::rename(out, &aside).map_err(|e| Error::io(out, e))?;
        old = Some(aside);
    }
    std::fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
    tmp.0 = None;
    if let Some(old) = old {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(ExportReport {
        dir: out.to_path_buf(),
        files,
        tensors: n_tensors,
        bytes: total,
    })
}

/// Every tensor of the model under its Hugging Face name, in transformers' order.
fn plan_tensors<'a>(
    model: &'a Model,
    dtype: Dtype,
    failure: &'a RefCell<Option<Error>>,
) -> Vec<Planned<'a>> {
    let c = &model.config;
    let w = &model.weights;
    // A GGUF Llama stores query/key rows for adjacent-pair RoPE; Hugging Face wants split halves.
    let permuted = c.rope_style == RopeStyle::Normal;
    let mut out = Vec::new();
    let mut mat = |gguf_name: String, m: &'a QMatrix, rope_rows: bool| {
        let order = (permuted && rope_rows).then(|| halves_from_adjacent_rows(m.rows, c.head_dim));
        let produce = move || {
            let mut bytes = Vec::with_capacity(m.rows * m.cols * dtype.bitsize() / 8);
            let mut row = vec![0.0f32; m.cols];
            for r in 0..m.rows {
                let src = order.as_ref().map_or(r, |o| o[r]);
                if let Err(e) = m.dequantize_row(src, &mut row) {
                    failure.borrow_mut().get_or_insert(e);
                    row.fill(0.0);
                }
                push(dtype, &row, &mut bytes, failure);
            }
            bytes
        };
        out.push(Planned {
            name: hf::hf_name(&gguf_name).unwrap_or(gguf_name),
            tensor: LazyTensor::new(dtype, vec![m.rows, m.cols], produce),
        });
    };
    mat("token_embd.weight".into(), &w.token_embd, false);
    for (i, l) in w.layers.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        mat(p("attn_q"), &l.wq, true);
        mat(p("attn_k"), &l.wk, true);
        mat(p("attn_v"), &l.wv, false);
        mat(p("attn_output"), &l.wo, false);
        mat(p("ffn_gate"), &l.gate, false);
        mat(p("ffn_up"), &l.up, false);
        mat(p("ffn_down"), &l.down, false);
    }
    if !w.tied_output() {
        mat("output.weight".into(), &w.output, false);
    }
    let mut vec = |gguf_name: String, v: &'a [f32]| {
        out.push(Planned {
            name: hf::hf_name(&gguf_name).unwrap_or(gguf_name),
            tensor: LazyTensor::new(dtype, vec![v.len()], move || {
                let mut bytes = Vec::with_capacity(v.len() * 4);
                push(dtype, v, &mut bytes, failure);
                bytes
            }),
        });
    };
    for (i, l) in w.layers.iter().enumerate() {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        vec(p("attn_norm"), &l.attn_norm);
        vec(p("ffn_norm"), &l.ffn_norm);
        if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
            vec(p("attn_q_norm"), q);
            vec(p("attn_k_norm"), k);
        }
    }
    vec("output_norm.weight".into(), &w.output_norm);
    out
}

fn push(dtype: Dtype, v: &[f32], bytes: &mut Vec<u8>, failure: &RefCell<Option<Error>>) {
    if let Err(e) = safetensors::push_as(dtype, v, bytes) {
        failure.borrow_mut().get_or_insert(e);
    }
}

/// An f32 as the JSON number it was written as (1e-5, not 9.999999747378752e-06).
fn json_f32(v: f32) -> serde_json::Value {
    v.to_string()
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// `config.json` for the model, as transformers writes it for `LlamaForCausalLM` /
/// `Qwen3ForCausalLM`.
fn config_json(
    model: &Model,
    tok: &crate::format::tokenizer::Tokenizer,
    dtype: Dtype,
) -> serde_json::Value {
    let c = &model.config;
    let (arch, model_type) = match c.arch {
        Arch::Llama => ("LlamaForCausalLM", "llama"),
        Arch::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
    };
    let torch_dtype = match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    };
    let mut j = serde_json::json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": c.n_embd,
        "intermediate_size": c.n_ff,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head_kv,
        "head_dim": c.head_dim,
        "vocab_size": c.n_vocab,
        "max_position_embeddings": c.n_ctx_train,
        "rms_norm_eps": json_f32(c.rms_eps),
        "rope_theta": json_f32(c.rope_theta),
        "rope_scaling": null,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": model.weights.tied_output(),
        "torch_dtype": torch_dtype,
        "use_cache": true,
    });
    if c.arch == Arch::Llama {
        j["mlp_bias"] = false.into();
    }
    j["bos_token_id"] = tok.bos().into();
    j["eos_token_id"] = tok.eos().into();
    j
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::Invalid(e.to_string()))?;
    s.push('\n');
    write_file(path, s.as_bytes())
}
