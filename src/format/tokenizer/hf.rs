//! The tokenizer of a Hugging Face checkpoint (`tokenizer.json` through the `tokenizers` crate,
//! special tokens and BOS/EOS handling from `tokenizer_config.json` and `config.json`), and the
//! other direction: any pare tokenizer written as `tokenizer.json` / `tokenizer_config.json`.

use std::collections::HashMap;

use super::{byte_tables, pre_tokenizer_spec, tk_err, Parts, TokenKind, Tokenizer};
use crate::error::{Error, Result};
use crate::format::hf::HfCheckpoint;

impl Tokenizer {
    /// The tokenizer in a checkpoint directory's `tokenizer.json`.
    pub fn from_hf(h: &HfCheckpoint) -> Result<Tokenizer> {
        let path = h.tokenizer_path();
        let err = |msg: String| Error::Tokenizer(format!("{}: {msg}", path.display()));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(err(
                    "missing: pare reads the fast tokenizer's tokenizer.json".into(),
                ))
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let model_type = raw
            .pointer("/model/type")
            .and_then(|t| t.as_str())
            .unwrap_or("BPE");
        if model_type != "BPE" {
            return Err(err(format!(
                "tokenizer model {model_type:?} is not supported (BPE)"
            )));
        }
        // Byte-level BPE (GPT-2, SmolLM2, Qwen) writes bytes as printable characters; otherwise
        // (SentencePiece-style BPE) '▁' is a space and <0xNN> tokens are bytes.
        let byte_level = ["pre_tokenizer", "decoder"].iter().any(|k| {
            raw.get(*k)
                .is_some_and(|v| v.to_string().contains("\"ByteLevel\""))
        });
        let with_special: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| err(format!("cannot build the tokenizer: {e}")))?;

        let vocab = with_special.get_vocab(true);
        let n_vocab = vocab.values().max().map_or(0, |&m| m as usize + 1);
        if n_vocab == 0 {
            return Err(err("the vocabulary is empty".into()));
        }
        // Ids index tables below; a hostile file must not size them at will.
        if n_vocab > 1 << 24 || n_vocab > 2 * vocab.len() + 1024 {
            return Err(err(format!(
                "token ids reach {} for {} tokens: the ids are not a dense range",
                n_vocab - 1,
                vocab.len()
            )));
        }
        let mut texts = vec![String::new(); n_vocab];
        for (t, &id) in &vocab {
            texts[id as usize] = t.clone();
        }
        let added = with_special.get_added_tokens_decoder();
        let (_, from_char) = byte_tables();
        let mut kinds = Vec::with_capacity(n_vocab);
        let mut pieces = Vec::with_capacity(n_vocab);
        for (id, text) in texts.iter().enumerate() {
            let kind = match added.get(&(id as u32)) {
                Some(a) if a.special => TokenKind::Control,
                Some(_) => TokenKind::UserDefined,
                None if text.is_empty() => TokenKind::Other,
                None => TokenKind::Normal,
            };
            let piece = match kind {
                TokenKind::Normal if byte_level => text
                    .chars()
                    .map(|c| from_char.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| text.as_bytes().to_vec()),
                TokenKind::Normal => match byte_token(text) {
                    Some(b) => vec![b],
                    None => text.replace('\u{2581}', " ").into_bytes(),
                },
                _ => text.as_bytes().to_vec(),
            };
            kinds.push(kind);
            pieces.push(piece);
        }

        // BOS/EOS: tokenizer_config.json names them by text; config.json by id.
        let config_id = |key: &str| -> Option<u32> {
            let v = h.config.get(key)?;
            let v = v.as_array().and_then(|a| a.first()).unwrap_or(v);
            v.as_u64()
                .filter(|&i| (i as usize) < n_vocab)
                .map(|i| i as u32)
        };
        let special = |key: &str, cfg_key: &str| -> Option<u32> {
            h.special_token_text(key)
                .and_then(|t| vocab.get(&t).copied())
                .or_else(|| config_id(cfg_key))
        };
        let bos = special("bos_token", "bos_token_id");
        let eos = special("eos_token", "eos_token_id");

        // Whether BOS/EOS are added: tokenizer_config.json's flags, else what the post-processor
        // does to a one-word input.
        let flag = |key: &str| {
            h.tokenizer_config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_bool())
        };
        let plain = with_special.encode_fast("a", false).map_err(tk_err)?;
        let framed = with_special.encode_fast("a", true).map_err(tk_err)?;
        let (plain, framed) = (plain.get_ids(), framed.get_ids());
        let post_bos =
            framed.len() > plain.len() && bos.is_some() && framed.first() == bos.as_ref();
        let post_eos = framed.len() > plain.len() && eos.is_some() && framed.last() == eos.as_ref();
        let add_bos = flag("add_bos_token").unwrap_or(post_bos);
        let add_eos = flag("add_eos_token").unwrap_or(post_eos);

        Ok(Self::assemble(Parts {
            with_special,
            texts,
            pieces,
            kinds,
            token_ids: vocab.into_iter().collect::<HashMap<_, _>>(),
            bos,
            eos,
            eom: None,
            eot: None,
            add_bos,
            add_eos,
            pre: llama_cpp_pre(&raw).unwrap_or_else(|| "tokenizer.json".into()),
            // A tokenizer.json may normalize or pre-tokenize in ways `safe_cut` does not know.
            cut_lines: false,
        }))
    }

    /// This tokenizer as a Hugging Face `tokenizer.json` (the same BPE, split expressions and
    /// special tokens, with a byte-level decoder so that transformers decodes it).
    pub fn to_hf_json(&self) -> Result<String> {
        let mut t = self.with_special.clone();
        if t.get_decoder().is_none() {
            t.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        }
        t.to_string(true).map_err(tk_err)
    }

    /// A token's vocabulary text (`"<|im_end|>"`, `"Ġthe"`).
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.with_special.id_to_token(id)
    }

    /// `tokenizer_config.json` for this tokenizer: BOS/EOS texts, whether they are added, and the
    /// chat template.
    pub fn hf_tokenizer_config(
        &self,
        chat_template: Option<&str>,
        model_max_length: usize,
    ) -> serde_json::Value {
        let text = |id: Option<u32>| id.and_then(|i| self.token_text(i));
        let mut c = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": text(self.bos),
            "eos_token": text(self.eos),
            "clean_up_tokenization_spaces": false,
            "model_max_length": model_max_length,
        });
        if let Some(t) = chat_template {
            c["chat_template"] = t.into();
        }
        c
    }
}

/// The byte of a SentencePiece byte-fallback token `<0xNN>`.
fn byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The `tokenizer.ggml.pre` name llama.cpp gives this tokenizer.json's pre-tokenizer, when it is
/// one of the families pare knows (what a GGUF written from the checkpoint must carry).
///
/// llama.cpp's converter hashes the ids of a test text; here the pre-tokenizer itself is matched:
/// its split expressions (Hugging Face writes the contractions as `(?i:'s|...)`, llama.cpp
/// spells the case variants out) against each family's, or SmolLM's / GPT-2's regex-mode
/// byte-level step.
fn llama_cpp_pre(raw: &serde_json::Value) -> Option<String> {
    let pre = raw.get("pre_tokenizer")?;
    let steps: Vec<&serde_json::Value> = match pre.get("type")?.as_str()? {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let mut regexes = Vec::new();
    let mut byte_level_regex = false;
    let mut digits = false;
    for st in steps {
        match st.get("type")?.as_str()? {
            "Split" => {
                let re = st.pointer("/pattern/Regex")?.as_str()?;
                regexes.push(re.replace(
                    "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
                ));
            }
            "ByteLevel" => {
                byte_level_regex = st.get("use_regex").and_then(|u| u.as_bool()) != Some(false)
            }
            "Digits" => {
                digits = st.get("individual_digits").and_then(|d| d.as_bool()) == Some(true)
            }
            _ => return None,
        }
    }
    match (regexes.is_empty(), digits, byte_level_regex) {
        (true, true, true) => return Some("smollm".into()),
        (true, false, true) => return Some("gpt-2".into()),
        (false, false, false) => {}
        _ => return None,
    }
    let ignore_merges = raw
        .pointer("/model/ignore_merges")
        .and_then(|i| i.as_bool())
        .unwrap_or(false);
    ["default", "llama-bpe", "dbrx", "qwen2", "smollm", "gpt-2"]
        .into_iter()
        .find(|name| {
            pre_tokenizer_spec(name)
                .is_ok_and(|spec| spec.regexes == regexes && spec.ignore_merges == ignore_merges)
        })
        .map(str::to_string)
}
