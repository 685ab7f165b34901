//! Model hyper-parameters, read from GGUF metadata (`{arch}.*` keys as llama.cpp names them) or
//! from a Hugging Face `config.json`.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::Gguf;

/// The transformer families pare runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family (Llama 2/3, SmolLM2, ...).
    Llama,
    /// Qwen3: Llama plus per-head RMSNorm of queries and keys.
    Qwen3,
}

/// How RoPE pairs the dimensions of a head (llama.cpp's rope types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (x[2i], x[2i+1]): GGUF Llama weights are permuted for this by the converter.
    Normal,
    /// Split halves (x[i], x[i + d/2]): GPT-NeoX style, used by Qwen.
    Neox,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
}

/// Limits that keep a hostile file from sizing absurd buffers.
const MAX_DIM: u64 = 1 << 20;

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config> {
        let arch_name = g
            .get_str("general.architecture")
            .ok_or_else(|| Error::Model("general.architecture is missing".into()))?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::Model(format!(
                    "architecture {other:?} is not supported (llama, qwen3)"
                )))
            }
        };
        let a = arch_name;
        let dim = |key: &str| -> Result<usize> {
            let full = format!("{a}.{key}");
            let v = g
                .require(&full)?
                .as_u64()
                .ok_or_else(|| Error::Model(format!("{full} is not an unsigned integer")))?;
            if v == 0 || v > MAX_DIM {
                return Err(Error::Model(format!("{full} = {v} is out of range")));
            }
            Ok(v as usize)
        };
        let n_embd = dim("embedding_length")?;
        let n_head = dim("attention.head_count")?;
        let n_head_kv = match g.get(&format!("{a}.attention.head_count_kv")) {
            Some(_) => dim("attention.head_count_kv")?,
            None => n_head,
        };
        let head_dim = match g.get(&format!("{a}.attention.key_length")) {
            Some(_) => dim("attention.key_length")?,
            None => {
                if n_embd % n_head != 0 {
                    return Err(Error::Model(format!(
                        "embedding length {n_embd} is not a multiple of {n_head} heads"
                    )));
                }
                n_embd / n_head
            }
        };
        if n_head % n_head_kv != 0 {
            return Err(Error::Model(format!(
                "{n_head} heads are not a multiple of {n_head_kv} key/value heads"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(Error::Model(format!("head dimension {head_dim} is odd")));
        }
        let n_vocab = match g.get(&format!("{a}.vocab_size")) {
            Some(_) => dim("vocab_size")?,
            None => g
                .array_len("tokenizer.ggml.tokens")
                .or_else(|| g.tensor("token_embd.weight").map(|t| t.n_rows()))
                .ok_or_else(|| Error::Model("cannot tell the vocabulary size".into()))?,
        };
        let rms_eps = g
            .get_f64(&format!("{a}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f32;
        let rope_theta = g.get_f64(&format!("{a}.rope.freq_base")).unwrap_or(10000.0) as f32;
        if !(rms_eps > 0.0 && rms_eps < 1.0 && rope_theta > 0.0 && rope_theta.is_finite()) {
            return Err(Error::Model(format!(
                "rms epsilon {rms_eps} or rope base {rope_theta} out of range"
            )));
        }
        Ok(Config {
            arch,
            n_layer: dim("block_count")?,
            n_embd,
            n_ff: dim("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train: dim("context_length").unwrap_or(2048),
            rms_eps,
            rope_theta,
            rope_style: match arch {
                Arch::Llama => RopeStyle::Normal,
                Arch::Qwen3 => RopeStyle::Neox,
            },
        })
    }

    /// The configuration in a Hugging Face `config.json` (`LlamaForCausalLM`, `Qwen3ForCausalLM`),
    /// read as transformers does, with its defaults. `path` names the file in errors.
    ///
    /// Hugging Face stores Llama's query/key rows in split-halves order (llama.cpp's converter
    /// permutes them to adjacent pairs), so both families run with [`RopeStyle::Neox`] here.
    pub fn from_hf(j: &serde_json::Value, path: &Path) -> Result<Config> {
        let err = |msg: String| Error::HfDir(format!("{}: {msg}", path.display()));
        let arch_name = j
            .get("architectures")
            .and_then(|a| a.as_array())
            .and_then(|a| a.first())
            .and_then(|a| a.as_str())
            .or_else(|| j.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| {
                err("neither architectures nor model_type says what model this is".into())
            })?;
        let arch = match arch_name {
            "LlamaForCausalLM" | "llama" => Arch::Llama,
            "Qwen3ForCausalLM" | "qwen3" => Arch::Qwen3,
            other => {
                return Err(err(format!(
                    "architecture {other:?} is not supported (LlamaForCausalLM, Qwen3ForCausalLM)"
                )))
            }
        };
        let opt_dim = |key: &str| -> Result<Option<usize>> {
            match j.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 && n <= MAX_DIM => Ok(Some(n as usize)),
                    _ => Err(err(format!("{key} = {v} is not a size in 1..={MAX_DIM}"))),
                },
            }
        };
        let dim = |key: &str| -> Result<usize> {
            opt_dim(key)?.ok_or_else(|| err(format!("{key} is missing")))
        };
        let float = |key: &str, default: f64| -> Result<f64> {
            match j.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| err(format!("{key} = {v} is not a number"))),
            }
        };
        let n_embd = dim("hidden_size")?;
        let n_head = dim("num_attention_heads")?;
        let n_head_kv = opt_dim("num_key_value_heads")?.unwrap_or(n_head);
        let head_dim = match opt_dim("head_dim")? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(err(format!(
                    "hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}                      and head_dim is not given"
                )))
            }
        };
        if n_head % n_head_kv != 0 {
            return Err(err(format!(
                "num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(err(format!("head dimension {head_dim} is odd")));
        }
        if let Some(act) = j.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(err(format!("hidden_act {act:?} is not supported (silu)")));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if j.get(key).and_then(|b| b.as_bool()) == Some(true) {
                return Err(err(format!("{key} = true is not supported")));
            }
        }
        // transformers 5 moves rope settings into rope_parameters.
        let rope = j.get("rope_scaling").or_else(|| j.get("rope_parameters"));
        if let Some(r) = rope.filter(|r| !r.is_null()) {
            let kind = r
                .get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("default");
            if kind != "default" {
                return Err(err(format!(
                    "rope scaling {kind:?} is not supported (only plain RoPE)"
                )));
            }
        }
        let rope_theta = match j.get("rope_theta") {
            Some(_) => float("rope_theta", 10000.0)?,
            None => rope
                .and_then(|r| r.get("rope_theta"))
                .and_then(|t| t.as_f64())
                .unwrap_or(10000.0),
        } as f32;
        let rms_eps = float("rms_norm_eps", 1e-6)? as f32;
        if !(rms_eps > 0.0 && rms_eps < 1.0 && rope_theta > 0.0 && rope_theta.is_finite()) {
            return Err(err(format!(
                "rms_norm_eps {rms_eps} or rope_theta {rope_theta} out of range"
            )));
        }
        Ok(Config {
            arch,
            n_layer: dim("num_hidden_layers")?,
            n_embd,
            n_ff: dim("intermediate_size")?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab: dim("vocab_size")?,
            n_ctx_train: opt_dim("max_position_embeddings")?.unwrap_or(2048),
            rms_eps,
            rope_theta,
            rope_style: RopeStyle::Neox,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
