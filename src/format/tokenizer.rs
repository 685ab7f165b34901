//! The tokenizer stored in a GGUF file, behaving the way llama.cpp's does.
//!
//! Only byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are supported. The vocabulary,
//! merges and token types come from the file; the pre-tokenizer split expressions are the ones
//! llama.cpp (`src/llama-vocab.cpp`) uses for the file's `tokenizer.ggml.pre`. The BPE itself runs
//! in the `tokenizers` crate.
//!
//! Control and user-defined tokens are "special": their text in the input becomes their id. As in
//! llama.cpp, `parse_special = false` leaves control-token text as plain text, but user-defined tokens
//! are always matched. Decoding renders every token's text, special ones included.

use std::collections::HashMap;

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::format::gguf::Gguf;

mod hf;

/// llama.cpp's `llama_token_type` values in `tokenizer.ggml.token_type`.
mod token_type {
    pub const UNDEFINED: i64 = 0;
    pub const NORMAL: i64 = 1;
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
    pub const UNUSED: i64 = 5;
    pub const BYTE: i64 = 6;
}

/// What kind of text a token stands for, which decides how it is matched and rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Byte-level BPE piece: its characters map back to bytes through the GPT-2 byte table.
    Normal,
    /// Control token (`<|im_start|>`): matched in the input only when special parsing is on.
    Control,
    /// User-defined token: always matched in the input, its text is literal.
    UserDefined,
    /// Unknown, unused or byte tokens: rendered literally, never matched.
    Other,
}

/// The GPT-2 / llama.cpp split expressions for each pre-tokenizer family, applied one after another.
const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split expressions and flags llama.cpp uses for a `tokenizer.ggml.pre` value.
struct PreTokenizerSpec {
    regexes: Vec<&'static str>,
    /// A word that is itself in the vocabulary becomes that token without merging.
    ignore_merges: bool,
    /// llama.cpp's default for adding BOS when the file does not say.
    default_add_bos: bool,
}

fn pre_tokenizer_spec(pre: &str) -> Result<PreTokenizerSpec> {
    let spec = |regexes: Vec<&'static str>, ignore_merges, default_add_bos| PreTokenizerSpec {
        regexes,
        ignore_merges,
        default_add_bos,
    };
    Ok(match pre {
        "" | "default" => spec(
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                RE_GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => {
            spec(vec![RE_LLAMA3], true, true)
        }
        "dbrx" | "smaug-bpe" => spec(vec![RE_LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" => spec(vec![RE_QWEN2], false, false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            spec(vec![r"\p{N}", RE_GPT2], false, false)
        }
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => spec(vec![RE_GPT2], false, false),
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported pre-tokenizer '{other}' (tokenizer.ggml.pre); supported: default, \
                 llama3/llama-bpe, dbrx, smaug-bpe, qwen2, stablelm2, smollm, starcoder, refact, \
                 command-r, codeshell, exaone, gpt-2, mpt, olmo, jais"
            )))
        }
    })
}

/// Bytes of text [`Tokenizer::encode`] tokenizes at a time: the `tokenizers` crate keeps tens of
/// bytes of working state per input byte (offsets, alignments, token strings), about 100 MiB for
/// the 1.1 MB WikiText-2 file at once; 64 KiB pieces keep that to a few MiB.
pub const PIECE_BYTES: usize = 64 << 10;

/// Whether the text may be cut before byte `p` (`0 < p < text.len()`) and the two sides
/// tokenized apart with the same ids as together: `p` starts a line with exactly one space
/// before an ASCII letter (`"…\n Word"`, as most lines of WikiText start), or `p` is an ASCII
/// letter starting a line whose newline follows a visible ASCII character (`"speak.\nAll"`, as
/// most lines of plays and prose start).
///
/// Why that is exact for every split expression of [`pre_tokenizer_spec`]: the whitespace run
/// around the cut ends with the space at `p` and a letter after it. In the whole text GPT-2's
/// `\s+(?!\S)` takes the run up to but not including that last space (which goes with the word
/// after it, `" ?\p{L}+"`), and llama3's / qwen2's `\s*[\r\n]+` takes it up to its last
/// newline, at `p - 1` (a punctuation word's `[\r\n]*` tail also stops there); so a word ends at
/// `p` either way. The left side alone ends with the same run minus that space, which the same
/// alternatives take whole (nothing follows to look ahead at), and the right side starts at `p`
/// exactly as the whole text's matching resumed there: the expressions look only ahead, never
/// behind. A letter, not any non-space: the expressions that split first (smollm's `\p{N}`, the
/// default's punctuation) would otherwise end a piece after the space, where `\s+(?!\S)` then
/// takes the whole run, space included. Byte-level BPE merges within words only.
///
/// The second form, a lone newline between a visible character and a letter: no expression
/// takes a newline together with a letter after it (the optional prefixes of words are a space,
/// or in llama3 / qwen2 a character other than `\r` and `\n`), nor a newline with a
/// non-whitespace character before it into the same run (punctuation's `[\r\n]*` tail only
/// appends newlines, and stops at the letter). So in the whole text the newline is a piece of
/// its own (GPT-2: unmatched, since `\s+(?!\S)` fails before the letter, and kept as a piece; a
/// llama3 / qwen2 `\s*[\r\n]+`) or the end of the punctuation before it, and the left side alone
/// ends with the same piece (`\s+(?!\S)` matching it at the end); the right side starts at the
/// letter either way. The character before must not be whitespace: `" \n"` or `"\n\n"` is one
/// run at the end of the left side but two pieces in the whole text.
pub fn safe_cut(text: &str, p: usize) -> bool {
    let b = text.as_bytes();
    let spaced_word = p >= 1
        && p + 1 < b.len()
        && b[p - 1] == b'\n'
        && b[p] == b' '
        && b[p + 1].is_ascii_alphabetic();
    let bare_word = p >= 2
        && p < b.len()
        && b[p - 1] == b'\n'
        && b[p].is_ascii_alphabetic()
        && b[p - 2].is_ascii_graphic();
    spaced_word || bare_word
}

/// The end of the next piece of `text` for [`Tokenizer::encode_pieces`]: the first [`safe_cut`]
/// at or after `min` bytes, or the whole text when there is none.
fn next_cut(text: &str, min: usize) -> usize {
    if text.len() <= min {
        return text.len();
    }
    let b = text.as_bytes();
    // A cut's byte before is `\n`: look only at those (never inside a multi-byte character).
    let mut from = min.max(1);
    while let Some(i) = b[from - 1..].iter().position(|&c| c == b'\n') {
        let p = from + i;
        if safe_cut(text, p) {
            return p;
        }
        from = p + 1;
        if from > b.len() {
            break;
        }
    }
    text.len()
}

/// GPT-2's table from bytes to printable characters, and its inverse.
fn byte_tables() -> ([char; 256], HashMap<char, u8>) {
    let mut to_char = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        to_char[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid code point")
        };
    }
    let from_char = to_char
        .iter()
        .enumerate()
        .map(|(b, &c)| (c, b as u8))
        .collect();
    (to_char, from_char)
}

/// What a tokenizer is made of, whichever file it came from (see [`Tokenizer::assemble`]).
struct Parts {
    /// The BPE with special (control) and user-defined tokens added.
    with_special: tokenizers::Tokenizer,
    /// Each token's vocabulary text.
    texts: Vec<String>,
    pieces: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    token_ids: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eom: Option<u32>,
    eot: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    pre: String,
    /// Whether long texts may be tokenized a piece at a time, cut where [`safe_cut`] says (the
    /// split expressions are known and no token matched in the input contains a newline).
    cut_lines: bool,
}

/// A model's tokenizer (from a GGUF's vocabulary or a Hugging Face `tokenizer.json`).
pub struct Tokenizer {
    /// Splits special-token text out of the input.
    with_special: tokenizers::Tokenizer,
    /// Leaves control-token text as plain text (user-defined tokens are still matched).
    without_special: tokenizers::Tokenizer,
    /// Each token's decoded bytes.
    pieces: Vec<Vec<u8>>,
    kinds: Vec<TokenKind>,
    token_ids: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    pre: String,
    cut_lines: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.pieces.len())
            .field("pre", &self.pre)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Builds the tokenizer from the file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        let model = g
            .get_str("tokenizer.ggml.model")
            .ok_or_else(|| Error::Tokenizer("the model file has no tokenizer.ggml.model".into()))?;
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "unsupported tokenizer model '{model}' (only byte-level BPE, 'gpt2', is supported)"
            )));
        }
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("default");
        let spec = pre_tokenizer_spec(pre)?;

        let tokens = g.get_str_array("tokenizer.ggml.tokens")?;
        if tokens.is_empty() {
            return Err(Error::Tokenizer("tokenizer.ggml.tokens is empty".into()));
        }
        let n_vocab = tokens.len();
        let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
            None => vec![token_type::NORMAL; n_vocab],
            Some(v) => {
                let arr = v.as_array().ok_or_else(|| {
                    Error::Tokenizer("tokenizer.ggml.token_type is not an array".into())
                })?;
                if arr.len() != n_vocab {
                    return Err(Error::Tokenizer(format!(
                        "tokenizer.ggml.token_type has {} entries for {n_vocab} tokens",
                        arr.len()
                    )));
                }
                arr.iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.as_i64().ok_or_else(|| {
                            Error::Tokenizer(format!(
                                "tokenizer.ggml.token_type[{i}] is not an integer"
                            ))
                        })
                    })
                    .collect::<Result<_>>()?
            }
        };
        let merges_raw = g.get_str_array("tokenizer.ggml.merges")?;

        let (_, from_char) = byte_tables();
        let mut kinds = Vec::with_capacity(n_vocab);
        let mut pieces = Vec::with_capacity(n_vocab);
        for (i, (&text, &ty)) in tokens.iter().zip(&types).enumerate() {
            let kind = match ty {
                token_type::NORMAL | token_type::UNDEFINED => TokenKind::Normal,
                token_type::CONTROL => TokenKind::Control,
                token_type::USER_DEFINED => TokenKind::UserDefined,
                token_type::UNKNOWN | token_type::UNUSED | token_type::BYTE => TokenKind::Other,
                other => {
                    return Err(Error::Tokenizer(format!(
                        "token {i} ({text:?}) has unknown token type {other}"
                    )))
                }
            };
            let piece = match kind {
                TokenKind::Normal => text
                    .chars()
                    .map(|c| from_char.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    // llama.cpp keeps a piece with a character outside the byte table as its text.
                    .unwrap_or_else(|| text.as_bytes().to_vec()),
                _ => text.as_bytes().to_vec(),
            };
            kinds.push(kind);
            pieces.push(piece);
        }

        let mut token_ids = HashMap::with_capacity(n_vocab);
        for (i, &t) in tokens.iter().enumerate() {
            // The first of duplicate texts wins, as in llama.cpp's token_to_id map.
            token_ids.entry(t.to_string()).or_insert(i as u32);
        }
        let vocab: Vocab = token_ids.iter().map(|(k, &v)| (k.clone(), v)).collect();
        let mut merges = Vec::with_capacity(merges_raw.len());
        for (i, m) in merges_raw.iter().enumerate() {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                Error::Tokenizer(format!(
                    "merge {i} ({m:?}) is not two tokens separated by a space"
                ))
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building BPE: {e}")))?;

        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for re in &spec.regexes {
            let split = Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex {re:?}: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());

        let mut with_special = tokenizers::Tokenizer::new(bpe);
        with_special.with_pre_tokenizer(Some(Sequence::new(steps)));
        let special: Vec<AddedToken> = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == TokenKind::Control)
            .map(|(i, _)| AddedToken::from(tokens[i], true).normalized(false))
            .collect();
        let user: Vec<AddedToken> = kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == TokenKind::UserDefined)
            .map(|(i, _)| AddedToken::from(tokens[i], false).normalized(false))
            .collect();
        with_special.add_special_tokens(&special);
        with_special.add_tokens(&user);

        let id = |key: &str| -> Result<Option<u32>> {
            match g.get_u64(key) {
                None => Ok(None),
                Some(v) if (v as usize) < n_vocab => Ok(Some(v as u32)),
                // "No such token" is written as -1 (read as None above) or as u32::MAX.
                Some(v) if v == u32::MAX as u64 => Ok(None),
                Some(v) => Err(Error::Tokenizer(format!(
                    "{key} = {v} is outside the vocabulary of {n_vocab} tokens"
                ))),
            }
        };
        let bos = id("tokenizer.ggml.bos_token_id")?;
        let eos = id("tokenizer.ggml.eos_token_id")?;
        let eom = id("tokenizer.ggml.eom_token_id")?;
        let eot = id("tokenizer.ggml.eot_token_id")?;
        let add_bos = g
            .get_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(spec.default_add_bos);
        let add_eos = g.get_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
        // llama.cpp's split expressions (all of `pre_tokenizer_spec`) are what `safe_cut` was
        // worked out for; a special or user-defined token could itself hold a newline.
        let cut_lines = !tokens
            .iter()
            .zip(&kinds)
            .any(|(t, k)| *k != TokenKind::Normal && t.contains(['\n', '\r']));
        Ok(Self::assemble(Parts {
            with_special,
            texts: tokens.iter().map(|t| t.to_string()).collect(),
            pieces,
            kinds,
            token_ids,
            bos,
            eos,
            eom,
            eot,
            add_bos,
            add_eos,
            pre: pre.to_string(),
            cut_lines,
        }))
    }

    /// The tokenizer from its parts, whatever file they came from: finds the end-of-turn and
    /// end-of-generation tokens as llama.cpp does.
    fn assemble(p: Parts) -> Tokenizer {
        let Parts {
            with_special,
            texts,
            mut pieces,
            mut kinds,
            token_ids,
            bos,
            eos,
            eom,
            mut eot,
            add_bos,
            add_eos,
            pre,
            cut_lines,
        } = p;
        let mut without_special = with_special.clone();
        without_special.set_encode_special_tokens(true);

        // llama.cpp recognises end-of-turn / end-of-generation tokens by their text.
        const EOT_TEXTS: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "<end_of_utterance>",
        ];
        const EOG_TEXTS: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "<|end_of_text|>",
            "<end_of_utterance>",
        ];
        if eot.is_none() {
            eot = EOT_TEXTS.iter().find_map(|t| token_ids.get(*t).copied());
        }
        let mut eog: Vec<u32> = EOG_TEXTS
            .iter()
            .filter_map(|t| token_ids.get(*t).copied())
            .collect();
        eog.extend([eos, eot, eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        for &t in &eog {
            // A token that ends generation is a control token, whatever the file says.
            if kinds[t as usize] == TokenKind::Normal {
                kinds[t as usize] = TokenKind::Control;
                pieces[t as usize] = texts[t as usize].as_bytes().to_vec();
            }
        }
        Tokenizer {
            with_special,
            without_special,
            pieces,
            kinds,
            token_ids,
            bos,
            eos,
            eot,
            eog,
            add_bos,
            add_eos,
            pre,
            cut_lines,
        }
    }

    /// Token ids for `text`. `add_bos` asks for the model's own special tokens (llama.cpp's
    /// `add_special`): BOS if the file's `add_bos_token` says so, EOS if `add_eos_token` does.
    /// With `parse_special`, control-token text such as `<|im_start|>` becomes that token.
    /// A long text is tokenized [`PIECE_BYTES`] at a time (see [`encode_pieces`](Self::encode_pieces)):
    /// the same ids as at once, without the tokenizer's per-byte working memory for all of it.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        self.encode_pieces(text, add_bos, parse_special, PIECE_BYTES, |p| {
            ids.extend_from_slice(p);
            Ok(())
        })?;
        Ok(ids)
    }

    /// [`encode`](Self::encode)'s ids handed to `each` a piece at a time: the text is cut at the
    /// first [`safe_cut`] at least `piece_bytes` after the previous cut, and each piece is
    /// tokenized alone. The ids are exactly those of tokenizing the whole text at once (a cut is
    /// made only where the split expressions end a word whatever follows the cut); a tokenizer
    /// whose splitting is not known here (from a `tokenizer.json`) takes the text whole.
    pub fn encode_pieces(
        &self,
        text: &str,
        add_bos: bool,
        parse_special: bool,
        piece_bytes: usize,
        mut each: impl FnMut(&[u32]) -> Result<()>,
    ) -> Result<()> {
        let tok = if parse_special {
            &self.with_special
        } else {
            &self.without_special
        };
        if add_bos && self.add_bos {
            each(&[self.bos.ok_or_else(|| {
                Error::Tokenizer("the model asks for BOS but has no BOS token".into())
            })?])?;
        }
        let mut rest = text;
        while !rest.is_empty() {
            let end = if self.cut_lines {
                next_cut(rest, piece_bytes.max(1))
            } else {
                rest.len()
            };
            let enc = tok.encode_fast(&rest[..end], false).map_err(tk_err)?;
            each(enc.get_ids())?;
            rest = &rest[end..];
        }
        if add_bos && self.add_eos {
            each(&[self.eos.ok_or_else(|| {
                Error::Tokenizer("the model asks for EOS but has no EOS token".into())
            })?])?;
        }
        Ok(())
    }

    /// The text of `ids`, special tokens rendered as their text; bytes that are not valid UTF-8
    /// become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::new();
        for &id in ids {
            bytes.extend_from_slice(self.piece(id)?);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn piece(&self, id: u32) -> Result<&[u8]> {
        self.pieces
            .get(id as usize)
            .map(Vec::as_slice)
            .ok_or_else(|| {
                Error::Tokenizer(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.pieces.len()
                ))
            })
    }

    /// The raw bytes a token stands for (its text for special tokens); empty for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.pieces.get(id as usize).cloned().unwrap_or_default()
    }

    /// How a token is treated; `None` for an id outside the vocabulary.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Whether a token is a control or user-defined token.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_kind(id),
            Some(TokenKind::Control | TokenKind::UserDefined)
        )
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token, from the file or found by its text as llama.cpp does.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Whether generation stops at this token: EOS, EOT, EOM and tokens such as `<|im_end|>` and
    /// `<|endoftext|>`, as llama.cpp's `llama_vocab_is_eog`.
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation tokens, sorted.
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Whether the model wants BOS at the start of its input (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether the model wants EOS at the end of its input (`tokenizer.ggml.add_eos_token`).
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The id of a token given its vocabulary text (`"<|im_end|>"`, `"Ġthe"`).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.token_ids.get(s).copied()
    }

    /// The `tokenizer.ggml.pre` name this tokenizer splits text like.
    pub fn pre_tokenizer(&self) -> &str {
        &self.pre
    }

    /// A fresh incremental decoder.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            pending: Vec::new(),
        }
    }
}

/// Turns ids into text one at a time, holding back a UTF-8 sequence split across tokens until it is
/// complete. Bytes that can never form valid UTF-8 come out as U+FFFD.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Adds a token; returns the text that is complete now (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.pending.extend_from_slice(self.tok.piece(id)?);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return Ok(out);
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).expect("valid"));
                    match e.error_len() {
                        // Incomplete sequence at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return Ok(out);
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// The bytes still held back, as text (an incomplete sequence becomes U+FFFD); clears them.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    /// Whether bytes are being held back.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_printable_chars() {
        let (to_char, from_char) = byte_tables();
        assert_eq!(from_char.len(), 256);
        assert_eq!(to_char[b' ' as usize], 'Ġ');
        assert_eq!(to_char[b'\n' as usize], 'Ċ');
        assert_eq!(to_char[b'a' as usize], 'a');
        for (b, c) in to_char.iter().enumerate() {
            assert_eq!(from_char[c] as usize, b);
            assert!(
                !c.is_whitespace() && !c.is_control(),
                "byte {b} maps to {c:?}"
            );
        }
    }

    #[test]
    fn unknown_pre_tokenizer_is_an_error() {
        let e = pre_tokenizer_spec("no-such-pre").err().expect("error");
        assert!(e.to_string().contains("no-such-pre"), "{e}");
        assert!(pre_tokenizer_spec("smollm").is_ok());
        assert!(pre_tokenizer_spec("llama-bpe").unwrap().ignore_merges);
    }
}
