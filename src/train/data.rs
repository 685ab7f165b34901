//! Training data: plain text or JSONL chat samples, tokenized and packed into fixed-length
//! sequences with a per-position loss weight (1 where the next token is scored, 0 where not),
//! split into training and validation parts, and visited in an order that is a pure function of
//! (seed, step) so a resumed run sees exactly what an uninterrupted one would.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::chat_template::{ChatTemplate, Message};
use crate::format::tokenizer::Tokenizer;

/// One packed sequence: `tokens` (len + 1 ids) and for each of the first len positions whether the
/// next token is scored.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub scored: Vec<bool>,
}

impl Sample {
    pub fn n_scored(&self) -> usize {
        self.scored.iter().filter(|&&s| s).count()
    }
}

/// A token stream with a flag per token: whether it is a target the loss scores.
#[derive(Debug, Default)]
struct Stream {
    ids: Vec<u32>,
    target: Vec<bool>,
}

impl Stream {
    fn push(&mut self, ids: &[u32], target: bool) {
        self.ids.extend_from_slice(ids);
        self.target.extend(std::iter::repeat_n(target, ids.len()));
    }

    /// Cuts the stream into sequences of `len` positions (len + 1 ids, consecutive windows sharing
    /// one id; the last may be shorter); drops windows without a scored token.
    fn pack(&self, len: usize) -> Vec<Sample> {
        let mut out = Vec::new();
        let mut s = 0;
        while s + 1 < self.ids.len() {
            let end = (s + len + 1).min(self.ids.len());
            let tokens = self.ids[s..end].to_vec();
            let scored = self.target[s + 1..end].to_vec();
            if scored.iter().any(|&b| b) {
                out.push(Sample { tokens, scored });
            }
            s += len;
        }
        out
    }
}

/// Plain text: the whole file as one stream (BOS first when the model adds one), every token scored.
pub fn pack_text(tok: &Tokenizer, text: &str, seq_len: usize) -> Result<Vec<Sample>> {
    check_len(seq_len)?;
    let ids = tok.encode(text, tok.add_bos(), false)?;
    let mut st = Stream::default();
    st.push(&ids, true);
    Ok(st.pack(seq_len))
}

/// JSONL chat: one `{"messages": [{"role": ..., "content": ...}, ...]}` per line, rendered with the
/// model's chat template; only the tokens of assistant messages (and the template's end-of-turn
/// after each) are scored. Conversations are concatenated and packed.
pub fn pack_chat(
    tok: &Tokenizer,
    template: &ChatTemplate,
    jsonl: &str,
    seq_len: usize,
) -> Result<Vec<Sample>> {
    check_len(seq_len)?;
    let mut st = Stream::default();
    for (i, line) in jsonl.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| Error::Invalid(format!("line {}: {m}", i + 1));
        let j: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let msgs = j
            .get("messages")
            .and_then(|m| m.as_array())
            .ok_or_else(|| bad("no \"messages\" array".into()))?;
        let mut messages = Vec::new();
        for m in msgs {
            let role = m.get("role").and_then(|v| v.as_str());
            let content = m.get("content").and_then(|v| v.as_str());
            match (role, content) {
                (Some(r), Some(c)) => messages.push(Message::new(r, c)),
                _ => return Err(bad("a message without string role and content".into())),
            }
        }
        // The template is rendered for growing prefixes; the tokens each assistant message adds
        // are the scored ones. Token boundaries at the template's special tokens are stable, so
        // the prefix's tokens are a prefix of the whole conversation's.
        let encode = |ms: &[Message], gen: bool| -> Result<Vec<u32>> {
            tok.encode(&template.apply(ms, gen)?, false, true)
        };
        let mut done = 0;
        let mut any = false;
        for k in 0..messages.len() {
            if messages[k].role != "assistant" {
                continue;
            }
            let prompt = encode(&messages[..k], true)?;
            let full = encode(&messages[..=k], false)?;
            if prompt.len() < done
                || full.len() < prompt.len()
                || full[..prompt.len()] != prompt[..]
            {
                return Err(bad(
                    "the chat template does not render this conversation prefix by prefix".into(),
                ));
            }
            st.push(&full[done..prompt.len()], false);
            st.push(&full[prompt.len()..], true);
            done = full.len();
            any = true;
        }
        if !any {
            return Err(bad("no assistant message to learn from".into()));
        }
        let all = encode(&messages, false)?;
        if all.len() > done {
            st.push(&all[done..], false);
        }
    }
    Ok(st.pack(seq_len))
}

fn check_len(seq_len: usize) -> Result<()> {
    if !(2..=1 << 16).contains(&seq_len) {
        return Err(Error::Invalid(format!(
            "sequence length {seq_len} is out of range (2..=65536)"
        )));
    }
    Ok(())
}

/// Reads `path` and packs it: `.jsonl` files as chat (needs `template`), anything else as text.
pub fn load(
    path: &Path,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    seq_len: usize,
) -> Result<Vec<Sample>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let samples = if path.extension().is_some_and(|e| e == "jsonl") {
        let t = template.ok_or_else(|| {
            Error::Invalid(format!(
                "{}: chat data needs a model with a chat template",
                path.display()
            ))
        })?;
        pack_chat(tok, t, &text, seq_len)
            .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?
    } else {
        pack_text(tok, &text, seq_len)?
    };
    if samples.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: too little text for one sequence of {seq_len} tokens",
            path.display()
        )));
    }
    Ok(samples)
}

/// [`load`] with the tokenizer and chat template of `model`, then [`split`]: the training and
/// validation sequences. The tokenizer is dropped before it returns and the heap it used handed
/// back to the system, so that a training process does not keep its tens of MiB resident.
pub fn load_split(
    path: &Path,
    model: &crate::model::Model,
    seq_len: usize,
    val_fraction: f32,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let samples = {
        let tok = model.tokenizer()?;
        let template = model.chat_template()?;
        load(path, &tok, template.as_ref(), seq_len)?
    };
    crate::eval::bench::release_free_memory();
    split(samples, val_fraction)
}

/// Splits off the last `fraction` of the samples (at least one when asked for any) for
/// validation; the training part keeps at least one.
pub fn split(mut samples: Vec<Sample>, fraction: f32) -> Result<(Vec<Sample>, Vec<Sample>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Invalid(format!(
            "validation fraction {fraction} must be in [0, 1)"
        )));
    }
    let n_val = if fraction > 0.0 {
        ((samples.len() as f32 * fraction).round() as usize).max(1)
    } else {
        0
    };
    if n_val >= samples.len() {
        return Err(Error::Invalid(format!(
            "{} sequences are too few to hold out {n_val} for validation",
            samples.len()
        )));
    }
    let val = samples.split_off(samples.len() - n_val);
    Ok((samples, val))
}

/// The index of the `k`-th sample drawn (k = step · accumulation + micro-step): epochs of a
/// permutation of `0..n` that depends only on (seed, epoch).
pub fn sample_index(seed: u64, n: usize, k: usize) -> usize {
    let (epoch, i) = (k / n, k % n);
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = crate::infer::sampling::Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9));
    for j in (1..n).rev() {
        let r = (rng.next_u64() % (j as u64 + 1)) as usize;
        perm.swap(j, r);
    }
    perm[i]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_windows_share_one_token_and_skip_unscored() {
        let mut st = Stream::default();
        st.push(&[1, 2, 3], false);
        st.push(&[4, 5, 6, 7, 8], true);
        let s = st.pack(3);
        // Windows [1,2,3,4] (targets 2,3,4: 4 scored), [4,5,6,7], and the shorter tail [7,8].
        assert_eq!(s.len(), 3);
        assert_eq!(s[2].tokens, vec![7, 8]);
        assert_eq!(s[0].tokens, vec![1, 2, 3, 4]);
        assert_eq!(s[0].scored, vec![false, false, true]);
        assert_eq!(s[1].tokens, vec![4, 5, 6, 7]);
        assert_eq!(s[1].n_scored(), 3);
        let mut st = Stream::default();
        st.push(&[1, 2, 3, 4, 5], false);
        assert!(st.pack(2).is_empty());
    }

    #[test]
    fn order_is_a_permutation_per_epoch_and_reproducible() {
        let n = 7;
        for epoch in 0..3 {
            let mut seen: Vec<usize> = (0..n).map(|i| sample_index(5, n, epoch * n + i)).collect();
            seen.sort();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
        }
        assert_eq!(sample_index(5, n, 9), sample_index(5, n, 9));
        let a: Vec<usize> = (0..n).map(|i| sample_index(5, n, i)).collect();
        let b: Vec<usize> = (0..n).map(|i| sample_index(6, n, i)).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn split_holds_out_the_tail() {
        let s = |i: u32| Sample {
            tokens: vec![i, i],
            scored: vec![true],
        };
        let (t, v) = split((0..10).map(s).collect(), 0.2).unwrap();
        assert_eq!((t.len(), v.len()), (8, 2));
        assert_eq!(v[0].tokens[0], 8);
        assert!(split(vec![s(0)], 0.5).is_err());
        assert!(split(vec![s(0)], 1.5).is_err());
    }
}
