//! Hugging Face checkpoint directories: `config.json`, weights in `model.safetensors` or in shards
//! listed by `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json` and an
//! optional `chat_template.jinja`.
//!
//! This module knows the directory's files and the mapping between Hugging Face tensor names and
//! llama.cpp's (the names pare uses everywhere); what the configuration means for the model is
//! decided in `model::config`. Every error names the file at fault.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::safetensors::{SafetensorsFile, TensorEntry};
use crate::error::{Error, Result};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// An open checkpoint directory: configuration parsed, weight files mapped.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    /// `config.json` as written (interpreted by `Config::from_hf`).
    pub config: serde_json::Value,
    pub shards: Vec<Arc<SafetensorsFile>>,
    /// Hugging Face tensor name → index into `shards`.
    tensors: HashMap<String, usize>,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<serde_json::Value>,
    /// The chat template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`.
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn dir_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::HfDir(format!("{}: {msg}", path.display()))
}

/// Reads and parses a JSON file; `None` when it does not exist.
pub fn read_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| dir_err(path, format!("not valid JSON: {e}")))
}

impl HfCheckpoint {
    /// Whether `path` looks like a checkpoint directory (rather than a model file).
    pub fn is_checkpoint_dir(path: &Path) -> bool {
        path.is_dir()
    }

    /// Opens a checkpoint directory: reads its configuration and maps its weight files.
    pub fn open(dir: impl AsRef<Path>) -> Result<HfCheckpoint> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(dir_err(&dir, "not a directory"));
        }
        let config_path = dir.join(CONFIG);
        let config = read_json(&config_path)?.ok_or_else(|| {
            dir_err(
                &config_path,
                "missing: a Hugging Face model directory needs config.json",
            )
        })?;
        if !config.is_object() {
            return Err(dir_err(&config_path, "is not a JSON object"));
        }

        let (shards, tensors) = Self::open_weights(&dir)?;

        let tc_path = dir.join(TOKENIZER_CONFIG);
        let tokenizer_config = read_json(&tc_path)?;
        let jinja = dir.join(CHAT_TEMPLATE);
        let chat_template = match std::fs::read_to_string(&jinja) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match tokenizer_config
                    .as_ref()
                    .and_then(|c| c.get("chat_template"))
                {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    // Several named templates: the one called "default".
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                        .and_then(|t| t.get("template"))
                        .and_then(|t| t.as_str())
                        .map(str::to_string),
                    Some(_) => {
                        return Err(dir_err(
                            &tc_path,
                            "chat_template is neither a string nor a list of named templates",
                        ))
                    }
                }
            }
            Err(e) => return Err(Error::io(&jinja, e)),
        };

        Ok(HfCheckpoint {
            dir,
            config,
            shards,
            tensors,
            tokenizer_config,
            chat_template,
        })
    }

    /// Maps `model.safetensors`, or every shard the index names, checking that the index and the
    /// shards agree.
    #[allow(clippy::type_complexity)]
    fn open_weights(dir: &Path) -> Result<(Vec<Arc<SafetensorsFile>>, HashMap<String, usize>)> {
        let index_path = dir.join(INDEX);
        let mut shards = Vec::new();
        let mut tensors = HashMap::new();
        match read_json(&index_path)? {
            Some(index) => {
                let map = index
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| dir_err(&index_path, "has no weight_map object"))?;
                let mut files = BTreeSet::new();
                for (name, file) in map {
                    let file = file.as_str().ok_or_else(|| {
                        dir_err(
                            &index_path,
                            format!("weight_map[{name:?}] is not a file name"),
                        )
                    })?;
                    files.insert(file);
                }
                let mut by_file = HashMap::new();
                for file in files {
                    // Shards live in the directory itself; a path that climbs out is refused.
                    let p = Path::new(file);
                    if p.is_absolute()
                        || p.components()
                            .any(|c| !matches!(c, std::path::Component::Normal(_)))
                    {
                        return Err(dir_err(
                            &index_path,
                            format!("shard name {file:?} is not a plain file name"),
                        ));
                    }
                    let path = dir.join(p);
                    if !path.exists() {
                        return Err(dir_err(
                            &index_path,
                            format!("names shard {file:?}, which the directory lacks"),
                        ));
                    }
                    by_file.insert(file.to_string(), shards.len());
                    shards.push(Arc::new(SafetensorsFile::open(&path)?));
                }
                for (name, file) in map {
                    let i = by_file[file.as_str().unwrap_or_default()];
                    if shards[i].get(name).is_none() {
                        return Err(dir_err(
                            &index_path,
                            format!("says tensor {name:?} is in {file}, which has no such tensor"),
                        ));
                    }
                    tensors.insert(name.clone(), i);
                }
            }
            None => {
                let path = dir.join(WEIGHTS);
                if !path.exists() {
                    return Err(dir_err(
                        dir,
                        format!("has neither {WEIGHTS} nor {INDEX}: no weights to load"),
                    ));
                }
                let f = SafetensorsFile::open(&path)?;
                for (name, _) in &f.tensors {
                    tensors.insert(name.clone(), 0);
                }
                shards.push(Arc::new(f));
            }
        }
        Ok((shards, tensors))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join(CONFIG)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER)
    }

    /// A tensor by its Hugging Face name: the file holding it and its entry.
    pub fn tensor(&self, hf_name: &str) -> Option<(&Arc<SafetensorsFile>, &TensorEntry)> {
        let &i = self.tensors.get(hf_name)?;
        let shard = &self.shards[i];
        shard.get(hf_name).map(|e| (shard, e))
    }

    /// Every Hugging Face tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The text of a special token named in `tokenizer_config.json` (`"bos_token"`,
    /// `"eos_token"`), written either as a string or as an added-token object.
    pub fn special_token_text(&self, key: &str) -> Option<String> {
        let v = self.tokenizer_config.as_ref()?.get(key)?;
        match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    }
}

/// llama.cpp's name for a Hugging Face Llama/Qwen3 tensor name, and back: the one table both
/// directions use.
const NAME_MAP: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];
const LAYER_MAP: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The Hugging Face name of a llama.cpp tensor name (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); `None` for a name outside the table.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let base = gguf_name.strip_suffix(".weight")?;
    if let Some(rest) = base.strip_prefix("blk.") {
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, hf) = LAYER_MAP.iter().find(|(g, _)| *g == part)?;
        return Some(format!("model.layers.{layer}.{hf}.weight"));
    }
    let (_, hf) = NAME_MAP.iter().find(|(g, _)| *g == base)?;
    Some(format!("{hf}.weight"))
}

/// For q/k projection rows stored for adjacent-pair RoPE (llama.cpp's converter permutes Hugging
/// Face Llama weights this way), the source row of each row in Hugging Face's split-halves order.
///
/// The converter's `permute` reshapes the rows of each head to `(2, head_dim/2)` and swaps the
/// axes, so GGUF row `h*d + 2i + j` is Hugging Face row `h*d + j*d/2 + i`. Pairing dimensions
/// `(2i, 2i+1)` on the GGUF rows is the same as pairing `(i, i + d/2)` on the Hugging Face rows,
/// with the same frequency for pair `i`; query and key get the same permutation, so their dot
/// products (all attention uses) are unchanged.
pub fn halves_from_adjacent_rows(rows: usize, head_dim: usize) -> Vec<usize> {
    let half = head_dim / 2;
    (0..rows)
        .map(|r| {
            let (h, k) = (r / head_dim, r % head_dim);
            let (j, i) = (k / half, k % half);
            h * head_dim + 2 * i + j
        })
        .collect()
}

/// The inverse of [`halves_from_adjacent_rows`]: for rows in Hugging Face's split-halves order,
/// the source row of each row in llama.cpp's adjacent-pair order (what a GGUF writer needs for a
/// Llama model loaded from a checkpoint directory).
pub fn adjacent_from_halves_rows(rows: usize, head_dim: usize) -> Vec<usize> {
    let fwd = halves_from_adjacent_rows(rows, head_dim);
    let mut inv = vec![0; rows];
    for (dst, &src) in fwd.iter().enumerate() {
        inv[src] = dst;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(hf_name("output.weight").as_deref(), Some("lm_head.weight"));
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }

    #[test]
    fn rope_row_orders_are_inverse_and_match_llama_cpp_permute() {
        // llama.cpp: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2).reshape(...): GGUF row
        // (h, i, j) flattened is HF row (h, j, i).
        let (heads, d) = (3, 8);
        let adj_from_hf = adjacent_from_halves_rows(heads * d, d);
        for h in 0..heads {
            for i in 0..d / 2 {
                for j in 0..2 {
                    assert_eq!(adj_from_hf[h * d + 2 * i + j], h * d + j * d / 2 + i);
                }
            }
        }
        let hf_from_adj = halves_from_adjacent_rows(heads * d, d);
        for r in 0..heads * d {
            assert_eq!(hf_from_adj[adj_from_hf[r]], r);
        }
    }
}
