//! The model's tensors, looked up by llama.cpp's names and checked against the config's shapes.
//! Matrices stay in the memory-mapped file; only the small norm vectors are copied out as f32.

use std::sync::Arc;

use super::config::{Arch, Config};
use crate::error::{Error, Result};
use crate::format::Gguf;
use crate::quant::dequant::{check_supported, dequantize_row};
use crate::quant::matmul::{QMatrix, WeightBytes};

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
        let (d, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            let (q_norm, k_norm) = match c.arch {
                Arch::Qwen3 => (
                    Some(vector(g, &p("attn_q_norm"), c.head_dim)?),
                    Some(vector(g, &p("attn_k_norm"), c.head_dim)?),
                ),
                Arch::Llama => (None, None),
            };
            layers.push(LayerWeights {
                attn_norm: vector(g, &p("attn_norm"), d)?,
                wq: matrix(g, &p("attn_q"), q, d)?,
                wk: matrix(g, &p("attn_k"), kv, d)?,
                wv: matrix(g, &p("attn_v"), kv, d)?,
                wo: matrix(g, &p("attn_output"), d, q)?,
                q_norm,
                k_norm,
                ffn_norm: vector(g, &p("ffn_norm"), d)?,
                gate: matrix(g, &p("ffn_gate"), ff, d)?,
                up: matrix(g, &p("ffn_up"), ff, d)?,
                down: matrix(g, &p("ffn_down"), d, ff)?,
            });
        }
        let token_embd = matrix(g, "token_embd.weight", c.n_vocab, d)?;
        let output = match g.tensor("output.weight") {
            Some(_) => matrix(g, "output.weight", c.n_vocab, d)?,
            None => token_embd.clone(),
        };
        Ok(Weights {
            token_embd,
            layers,
            output_norm: vector(g, "output_norm.weight", d)?,
            output,
        })
    }

    /// Every matrix, for inspection and byte counts.
    pub fn matrices(&self) -> impl Iterator<Item = &QMatrix> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .chain([&self.token_embd])
    }
}

fn find<'a>(g: &'a Gguf, name: &str) -> Result<&'a crate::format::TensorInfo> {
    g.tensor(name)
        .ok_or_else(|| Error::Model(format!("tensor {name:?} is missing")))
}

/// A matrix of `rows` outputs × `cols` inputs (ggml dims [cols, rows]).
fn matrix(g: &Arc<Gguf>, name: &str, rows: usize, cols: usize) -> Result<QMatrix> {
    let t = find(g, name)?;
    if t.dims != [cols as u64, rows as u64] {
        return Err(Error::Model(format!(
            "tensor {name:?} has dims {:?}, expected [{cols}, {rows}]",
            t.dims
        )));
    }
    // Fail at load time, not in the middle of a matrix product, for types pare cannot compute with.
    check_supported(t.ggml_type).map_err(|e| Error::Model(format!("tensor {name:?}: {e}")))?;
    let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = g.clone();
    let start = (g.data_offset + t.offset) as usize;
    let bytes = WeightBytes::new(owner, start, t.n_bytes())?;
    QMatrix::new(name, t.ggml_type, rows, cols, bytes)
}

/// A vector of `n` values (norm weights), converted to f32.
fn vector(g: &Gguf, name: &str, n: usize) -> Result<Vec<f32>> {
    let t = find(g, name)?;
    if t.dims != [n as u64] {
        return Err(Error::Model(format!(
            "tensor {name:?} has dims {:?}, expected [{n}]",
            t.dims
        )));
    }
    let mut v = vec![0.0f32; n];
    dequantize_row(t.ggml_type, g.tensor_data(t), &mut v)
        .map_err(|e| Error::Model(format!("tensor {name:?}: {e}")))?;
    Ok(v)
}
