//! The model's tensors, looked up by llama.cpp's names and checked against the config's shapes,
//! from a GGUF file or a Hugging Face checkpoint directory. Matrices stay in the memory-mapped
//! file; only the small norm vectors are copied out as f32.

use std::sync::Arc;

use super::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::format::hf::{self, HfCheckpoint};
use crate::format::safetensors::{self, Dtype, SafetensorsFile, TensorEntry};
use crate::format::Gguf;
use crate::quant::dequant::{check_supported, dequantize_row};
use crate::quant::matmul::{QMatrix, WeightBytes};
use crate::quant::GgmlType;

/// One transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub wq: QMatrix,
    pub wk: QMatrix,
    pub wv: QMatrix,
    pub wo: QMatrix,
    /// Qwen3's per-head RMSNorm weights for queries and keys (length head_dim).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub gate: QMatrix,
    pub up: QMatrix,
    pub down: QMatrix,
}

impl LayerWeights {
    /// The block's seven matrices: attention q, k, v, o, then the FFN's gate, up, down.
    pub fn matrices(&self) -> [&QMatrix; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
    }
}

#[derive(Debug, Clone)]
pub struct Weights {
    /// Token embeddings, one row per token (n_vocab × n_embd).
    pub token_embd: QMatrix,
    pub layers: Vec<LayerWeights>,
    pub output_norm: Vec<f32>,
    /// The output head (n_vocab × n_embd); the token embeddings when the model ties them.
    pub output: QMatrix,
}

impl Weights {
    pub fn from_gguf(g: &Arc<Gguf>, c: &Config) -> Result<Weights> {
        Self::from_source(g, c)
    }

    /// Builds the weights from any source, looking tensors up by llama.cpp's names and checking
    /// each against the configuration's shapes.
    pub fn from_source(src: &dyn TensorSource, c: &Config) -> Result<Weights> {
        let (d, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            let (q_norm, k_norm) = match c.arch {
                Arch::Qwen3 => (
                    Some(src.vector(&p("attn_q_norm"), c.head_dim)?),
                    Some(src.vector(&p("attn_k_norm"), c.head_dim)?),
                ),
                Arch::Llama => (None, None),
            };
            layers.push(LayerWeights {
                attn_norm: src.vector(&p("attn_norm"), d)?,
                wq: src.matrix(&p("attn_q"), q, d)?,
                wk: src.matrix(&p("attn_k"), kv, d)?,
                wv: src.matrix(&p("attn_v"), kv, d)?,
                wo: src.matrix(&p("attn_output"), d, q)?,
                q_norm,
                k_norm,
                ffn_norm: src.vector(&p("ffn_norm"), d)?,
                gate: src.matrix(&p("ffn_gate"), ff, d)?,
                up: src.matrix(&p("ffn_up"), ff, d)?,
                down: src.matrix(&p("ffn_down"), d, ff)?,
            });
        }
        let token_embd = src.matrix("token_embd.weight", c.n_vocab, d)?;
        let output = if src.tied_output()? {
            token_embd.clone()
        } else {
            src.matrix("output.weight", c.n_vocab, d)?
        };
        Ok(Weights {
            token_embd,
            layers,
            output_norm: src.vector("output_norm.weight", d)?,
            output,
        })
    }

    /// Whether the output head is the token embedding matrix (tied embeddings).
    pub fn tied_output(&self) -> bool {
        self.output.name == self.token_embd.name
    }

    /// Every matrix called `name`: two when the output head is the tied token embeddings (so a
    /// caller that swaps one swaps both), none when there is no such matrix.
    pub fn matrices_named_mut(&mut self, name: &str) -> Vec<&mut QMatrix> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.wq,
                    &mut l.wk,
                    &mut l.wv,
                    &mut l.wo,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]
            })
            .chain([&mut self.token_embd, &mut self.output])
            .filter(|m| m.name == name)
            .collect()
    }

    /// Every matrix, for inspection and byte counts.
    pub fn matrices(&self) -> impl Iterator<Item = &QMatrix> {
        self.layers
            .iter()
            .flat_map(LayerWeights::matrices)
            .chain([&self.token_embd])
    }
}

/// Where a model's tensors come from, looked up by llama.cpp's tensor names.
pub trait TensorSource {
    /// A matrix of `rows` outputs × `cols` inputs, its data left where it is stored.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix>;
    /// A vector of `n` values (norm weights), converted to f32.
    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>>;
    /// Whether the model has no output head of its own and uses the token embeddings.
    fn tied_output(&self) -> Result<bool>;
}

/// The one place a matrix is made: a window of a mapped file, in a storage type pare computes
/// with (checked now rather than in the middle of a matrix product).
fn mapped_matrix(
    name: &str,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
) -> Result<QMatrix> {
    check_supported(ty).map_err(|e| Error::Model(format!("tensor {name:?}: {e}")))?;
    let bytes = WeightBytes::new(owner, start, len)?;
    QMatrix::new(name, ty, rows, cols, bytes)
}

fn find<'a>(g: &'a Gguf, name: &str) -> Result<&'a crate::format::TensorInfo> {
    g.tensor(name)
        .ok_or_else(|| Error::Model(format!("tensor {name:?} is missing")))
}

impl TensorSource for Arc<Gguf> {
    /// ggml dims are [cols, rows].
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let t = find(self, name)?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(Error::Model(format!(
                "tensor {name:?} has dims {:?}, expected [{cols}, {rows}]",
                t.dims
            )));
        }
        let start = (self.data_offset + t.offset) as usize;
        mapped_matrix(
            name,
            t.ggml_type,
            rows,
            cols,
            self.clone(),
            start,
            t.n_bytes(),
        )
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let t = find(self, name)?;
        if t.dims != [n as u64] {
            return Err(Error::Model(format!(
                "tensor {name:?} has dims {:?}, expected [{n}]",
                t.dims
            )));
        }
        let mut v = vec![0.0f32; n];
        // Read, not mapped: a pipeline stage loads every layer's norms but maps only its own
        // layers' matrices (see `Gguf::read_tensor`).
        dequantize_row(t.ggml_type, &self.read_tensor(t)?, &mut v)
            .map_err(|e| Error::Model(format!("tensor {name:?}: {e}")))?;
        Ok(v)
    }

    fn tied_output(&self) -> Result<bool> {
        Ok(self.tensor("output.weight").is_none())
    }
}

/// A checkpoint tensor by its llama.cpp name, with its shape checked against `shape`.
fn hf_tensor<'a>(
    ck: &'a HfCheckpoint,
    name: &str,
    shape: &[usize],
) -> Result<(&'a Arc<SafetensorsFile>, &'a TensorEntry)> {
    let hf = hf::hf_name(name)
        .ok_or_else(|| Error::Model(format!("no Hugging Face name for tensor {name:?}")))?;
    let (file, t) = ck.tensor(&hf).ok_or_else(|| {
        Error::HfDir(format!(
            "{}: tensor {hf:?} is missing (needed by config.json)",
            ck.dir.display()
        ))
    })?;
    if t.shape != shape {
        return Err(Error::HfDir(format!(
            "{}: tensor {hf:?} has shape {:?}, but config.json implies {shape:?}",
            file.path.display(),
            t.shape
        )));
    }
    Ok((file, t))
}

impl TensorSource for HfCheckpoint {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
        let (file, t) = hf_tensor(self, name, &[rows, cols])?;
        let ty = match t.dtype {
            Dtype::F32 => GgmlType::F32,
            Dtype::F16 => GgmlType::F16,
            Dtype::BF16 => GgmlType::BF16,
            other => {
                return Err(Error::HfDir(format!(
                    "{}: tensor {:?} has dtype {other}; pare reads F32, F16 and BF16",
                    file.path.display(),
                    hf::hf_name(name).unwrap_or_default()
                )))
            }
        };
        mapped_matrix(name, ty, rows, cols, file.clone(), t.start, t.len)
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let (file, t) = hf_tensor(self, name, &[n])?;
        let mut v = vec![0.0f32; n];
        safetensors::to_f32(t.dtype, file.data(t), &mut v).map_err(|e| {
            Error::HfDir(format!(
                "{}: tensor {:?}: {e}",
                file.path.display(),
                hf::hf_name(name).unwrap_or_default()
            ))
        })?;
        Ok(v)
    }

    /// As transformers: the head is tied when `tie_word_embeddings` says so (default false for
    /// Llama and Qwen3); then a stored `lm_head.weight` is ignored.
    fn tied_output(&self) -> Result<bool> {
        let tied = match self.config.get("tie_word_embeddings") {
            None | Some(serde_json::Value::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                Error::HfDir(format!(
                    "{}: tie_word_embeddings = {v} is not a boolean",
                    self.config_path().display()
                ))
            })?,
        };
        if !tied && self.tensor("lm_head.weight").is_none() {
            return Err(Error::HfDir(format!(
                "{}: lm_head.weight is missing and config.json does not set \
                 tie_word_embeddings",
                self.dir.display()
            )));
        }
        Ok(tied)
    }
}
