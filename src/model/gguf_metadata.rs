//! The GGUF metadata (key/values) that describes a loaded model, for a writer of GGUF files:
//! copied from the GGUF it came from, or, for a Hugging Face checkpoint, built from config.json
//! and the tokenizer the way llama.cpp's `convert_hf_to_gguf.py` does for Llama/Qwen3 with a
//! byte-level BPE ("gpt2") tokenizer.
//!
//! Weights are not described here. One thing a writer must do with them: a Llama model loaded
//! from a checkpoint keeps Hugging Face's split-halves q/k rows (it runs with NEOX RoPE, see
//! [`RopeStyle`]), while a GGUF `llama` is read with adjacent-pair RoPE, so `attn_q`/`attn_k` rows
//! must be written in the order [`crate::format::hf::adjacent_from_halves_rows`] gives, exactly as
//! llama.cpp's converter permutes them.

use super::{Arch, Model, ModelSource, RopeStyle};
use crate::error::{Error, Result};
use crate::format::tokenizer::{TokenKind, Tokenizer};
use crate::format::Value;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

impl Model {
    /// Whether the q/k rows must be permuted to adjacent pairs when written as a GGUF `llama`.
    pub fn qk_rows_need_gguf_permutation(&self) -> bool {
        self.config.arch == Arch::Llama && self.config.rope_style == RopeStyle::Neox
    }

    /// The metadata a GGUF file of this model carries, in writing order.
    pub fn gguf_metadata(&self) -> Result<Vec<(String, Value)>> {
        match &self.source {
            ModelSource::Gguf(g) => g.with_complete(|g| Ok(g.metadata.clone())),
            ModelSource::Hf(h) => {
                let tok = self.tokenizer()?;
                let name = h
                    .dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let pad = h
                    .special_token_text("pad_token")
                    .and_then(|t| tok.token_to_id(&t));
                hf_metadata(self, &tok, &name, pad, h.chat_template.as_deref())
            }
        }
    }
}

fn hf_metadata(
    model: &Model,
    tok: &Tokenizer,
    name: &str,
    pad: Option<u32>,
    chat_template: Option<&str>,
) -> Result<Vec<(String, Value)>> {
    let c = &model.config;
    let arch = match c.arch {
        Arch::Llama => "llama",
        Arch::Qwen3 => "qwen3",
    };
    let mut m: Vec<(String, Value)> = Vec::new();
    let mut put = |k: &str, v: Value| m.push((k.replace("{a}", arch), v));
    let u32v = |v: usize| Value::U32(v as u32);
    put("general.architecture", Value::String(arch.into()));
    put("general.name", Value::String(name.into()));
    put("{a}.vocab_size", u32v(c.n_vocab));
    put("{a}.context_length", u32v(c.n_ctx_train));
    put("{a}.embedding_length", u32v(c.n_embd));
    put("{a}.block_count", u32v(c.n_layer));
    put("{a}.feed_forward_length", u32v(c.n_ff));
    put("{a}.attention.head_count", u32v(c.n_head));
    put("{a}.attention.head_count_kv", u32v(c.n_head_kv));
    put("{a}.rope.freq_base", Value::F32(c.rope_theta));
    put(
        "{a}.attention.layer_norm_rms_epsilon",
        Value::F32(c.rms_eps),
    );
    put("{a}.rope.dimension_count", u32v(c.head_dim));
    if c.head_dim * c.n_head != c.n_embd {
        put("{a}.attention.key_length", u32v(c.head_dim));
        put("{a}.attention.value_length", u32v(c.head_dim));
    }

    let pre = tok.pre_tokenizer();
    if pre == "tokenizer.json" {
        return Err(Error::Tokenizer(
            "cannot tell which llama.cpp pre-tokenizer (tokenizer.ggml.pre) this tokenizer.json's \
             pre_tokenizer is; a GGUF needs one"
                .into(),
        ));
    }
    // As llama.cpp's converter: the vocabulary padded to the model's size with unused tokens.
    let n = c.n_vocab.max(tok.vocab_size());
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n as u32 {
        match tok.token_text(id) {
            Some(t) => {
                tokens.push(Value::String(t));
                types.push(Value::I32(match tok.token_kind(id) {
                    Some(TokenKind::Control) => CONTROL,
                    Some(TokenKind::UserDefined) => USER_DEFINED,
                    Some(TokenKind::Normal) => NORMAL,
                    _ => UNUSED,
                }));
            }
            None => {
                tokens.push(Value::String(format!("[PAD{id}]")));
                types.push(Value::I32(UNUSED));
            }
        }
    }
    let json: serde_json::Value = serde_json::from_str(&tok.to_hf_json()?)
        .map_err(|e| Error::Tokenizer(format!("re-reading tokenizer.json: {e}")))?;
    let merges = json
        .pointer("/model/merges")
        .and_then(|m| m.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|m| match m {
                    // "a b", or ["a", "b"] in newer tokenizer.json files.
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) => Some(
                        p.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => None,
                })
                .map(Value::String)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    put("tokenizer.ggml.model", Value::String("gpt2".into()));
    put("tokenizer.ggml.pre", Value::String(pre.into()));
    put("tokenizer.ggml.tokens", Value::Array(tokens));
    put("tokenizer.ggml.token_type", Value::Array(types));
    put("tokenizer.ggml.merges", Value::Array(merges));
    if let Some(b) = tok.bos() {
        put("tokenizer.ggml.bos_token_id", Value::U32(b));
    }
    if let Some(e) = tok.eos() {
        put("tokenizer.ggml.eos_token_id", Value::U32(e));
    }
    if let Some(p) = pad {
        put("tokenizer.ggml.padding_token_id", Value::U32(p));
    }
    put("tokenizer.ggml.add_bos_token", Value::Bool(tok.add_bos()));
    put("tokenizer.ggml.add_eos_token", Value::Bool(tok.add_eos()));
    if let Some(t) = chat_template {
        put("tokenizer.chat_template", Value::String(t.into()));
    }
    Ok(m)
}
