//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it (the `perplexity()` function of
//! `tools/perplexity/perplexity.cpp`, default mode without `--ppl-stride`).
//!
//! The method, step by step:
//! 1. The whole text is tokenized once, with the BOS token prepended when the model adds one
//!    (`common_tokenize(ctx, text, add_special = true)`). That is the caller's job: pass the result as
//!    `tokens`.
//! 2. The text must have at least `2 * n_ctx` tokens, otherwise llama.cpp refuses ("you need at least
//!    {2*n_ctx} tokens to evaluate perplexity with a context of {n_ctx}").
//! 3. `n_chunks = min(requested, n_tokens / n_ctx)`; the tail that does not fill a chunk is dropped.
//! 4. Chunk `i` is `tokens[i*n_ctx .. (i+1)*n_ctx]`, evaluated from an empty context, with its first
//!    token replaced by BOS when the model adds BOS (the replacement is only for evaluation: the
//!    original token is restored, though it is never scored).
//! 5. With `first = n_ctx / 2`, the logits of positions `first ..= n_ctx - 2` score the tokens at
//!    positions `first + 1 ..= n_ctx - 1`: `n_ctx - 1 - first` tokens per chunk (255 for n_ctx 512).
//! 6. Per token, `nll = log(sum(exp(logits))) - logit[target]` (max-shifted log-sum-exp); llama.cpp
//!    sums `nll` and `nll^2` in f64 over all scored tokens.
//! 7. After each chunk it prints the running `exp(sum_nll / count)`.
//! 8. "Final estimate: PPL = X +/- Y" with `mean = sum_nll / N`, `var = sum_nll2 / N - mean^2`,
//!    `X = exp(mean)` and `Y = X * sqrt(var / (N - 1))` (the standard error of the mean NLL,
//!    propagated through `exp`; llama.cpp prints an error instead when `var <= 0`, pare reports 0).

use super::score::{reduce_rows, row_nll, Reduce, Rows};
use crate::error::{Error, Result};

/// Something that turns a chunk of tokens into next-token logits: a model.
pub trait LogitsEval {
    /// Size of a logits row.
    fn n_vocab(&self) -> usize;
    /// Evaluates `tokens` as one sequence starting from an empty context (positions `0..len`) and
    /// fills `logits` with one row of `n_vocab` values per position, row-major
    /// (`logits.len() == tokens.len() * n_vocab` afterwards).
    fn eval_chunk(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<()>;
    /// Evaluates `tokens` as [`eval_chunk`](Self::eval_chunk) does and scores the logits rows
    /// `first..first + targets.len()` (row `first + r` predicting `targets[r]`) as `how` says,
    /// taking their base records from `rows` and handing it their results, in row order. This
    /// default computes the chunk's logits with `eval_chunk`; a model (and a pipeline, on its last
    /// stage) computes only the scored rows' logits, a few at a time.
    fn score_chunk(
        &mut self,
        tokens: &[u32],
        first: usize,
        targets: &[u32],
        how: Reduce,
        rows: &mut dyn Rows,
    ) -> Result<()> {
        let n_vocab = self.n_vocab();
        check_scored_rows(tokens.len(), first, targets.len())?;
        let mut logits = Vec::new();
        self.eval_chunk(tokens, &mut logits)?;
        if logits.len() != tokens.len() * n_vocab {
            return Err(Error::Model(format!(
                "evaluating a chunk of {n} tokens gave {} logits, expected {} ({n} x {n_vocab})",
                logits.len(),
                tokens.len() * n_vocab,
                n = tokens.len(),
            )));
        }
        let mut base = Vec::new();
        if how == Reduce::Compare {
            rows.base(targets.len(), &mut base)?;
        }
        let mut out = Vec::new();
        let scored = &logits[first * n_vocab..(first + targets.len()) * n_vocab];
        reduce_rows(how, n_vocab, scored, targets, &base, &mut out)?;
        rows.put(&out)
    }
}

/// Scored rows `first..first + n` must lie inside a chunk of `len` positions.
pub fn check_scored_rows(len: usize, first: usize, n: usize) -> Result<()> {
    if first.checked_add(n).is_none_or(|end| end > len) {
        return Err(Error::Invalid(format!(
            "rows {first}..{} to score lie outside a chunk of {len} positions",
            first.saturating_add(n)
        )));
    }
    Ok(())
}

/// How to chunk the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerplexityOptions {
    /// Tokens per chunk (llama-perplexity's `-c`, 512 by default there).
    pub n_ctx: usize,
    /// At most this many chunks (`--chunks`); `None` uses every whole chunk of the text.
    pub n_chunks: Option<usize>,
    /// The BOS token id when the model adds BOS (`tokenizer.ggml.add_bos_token`); it replaces the
    /// first token of every chunk. `None` when the model does not add BOS.
    pub bos: Option<u32>,
}

impl PerplexityOptions {
    pub fn new(n_ctx: usize, bos: Option<u32>) -> Self {
        PerplexityOptions {
            n_ctx,
            n_chunks: None,
            bos,
        }
    }

    /// First scored logits row of a chunk (`n_ctx / 2`).
    pub fn first_scored(&self) -> usize {
        self.n_ctx / 2
    }

    /// Tokens scored per chunk (`n_ctx - 1 - n_ctx / 2`).
    pub fn scored_per_chunk(&self) -> usize {
        self.n_ctx - 1 - self.first_scored()
    }

    /// Validates the options against a text of `n_tokens` tokens and returns the number of chunks.
    pub fn chunks_for(&self, n_tokens: usize) -> Result<usize> {
        if self.n_ctx < 3 {
            return Err(Error::Invalid(format!(
                "perplexity context must be at least 3 tokens (it scores positions n_ctx/2+1 .. n_ctx-1), got {}",
                self.n_ctx
            )));
        }
        if n_tokens < 2 * self.n_ctx {
            return Err(Error::Invalid(format!(
                "you need at least {} tokens to evaluate perplexity with a context of {}; \
                 the text tokenizes to only {} tokens",
                2 * self.n_ctx,
                self.n_ctx,
                n_tokens
            )));
        }
        let max = n_tokens / self.n_ctx;
        match self.n_chunks {
            Some(0) => Err(Error::Invalid(
                "the number of chunks must be at least 1".into(),
            )),
            Some(n) => Ok(n.min(max)),
            None => Ok(max),
        }
    }
}

/// Progress after one chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkProgress {
    /// Chunks done so far (1-based index of the chunk just finished).
    pub done: usize,
    pub n_chunks: usize,
    /// Running perplexity over every token scored so far (what llama.cpp prints as `[i]x.xxxx`).
    pub ppl: f64,
    pub tokens_scored: usize,
}

/// The result of a perplexity run.
#[derive(Debug, Clone, PartialEq)]
pub struct PerplexityResult {
    /// `exp(nll_mean)`: llama.cpp's "Final estimate: PPL".
    pub ppl: f64,
    /// llama.cpp's "+/-" value: `ppl * nll_stderr`.
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll_mean: f64,
    /// Standard error of `nll_mean`: `sqrt((E[nll^2] - E[nll]^2) / (N - 1))`, 0 when the variance is
    /// not positive.
    pub nll_stderr: f64,
    pub chunks: usize,
    pub tokens_scored: usize,
    /// Running perplexity after each chunk.
    pub chunk_ppl: Vec<f64>,
}

/// Runs the chunk loop of llama-perplexity: each chunk's scored rows (positions `first ..= n_ctx -
/// 2`, predicting the tokens at `first + 1 ..= n_ctx - 1`) are reduced as `how` says where their
/// logits are computed, and their results go to `rows` in order; `done(rows, index, n_chunks)` is
/// called after each chunk. The number of chunks evaluated is returned. [`perplexity`] and the KL
/// divergence functions are built on this.
pub fn for_each_chunk<R: Rows>(
    eval: &mut dyn LogitsEval,
    tokens: &[u32],
    opts: &PerplexityOptions,
    how: Reduce,
    rows: &mut R,
    mut done: impl FnMut(&mut R, usize, usize) -> Result<()>,
) -> Result<usize> {
    let n_chunks = opts.chunks_for(tokens.len())?;
    let n_ctx = opts.n_ctx;
    let n_vocab = eval.n_vocab();
    if n_vocab == 0 {
        return Err(Error::Invalid(
            "the model reports an empty vocabulary".into(),
        ));
    }
    if let Some((pos, &t)) = tokens
        .iter()
        .take(n_chunks * n_ctx)
        .enumerate()
        .find(|(_, &t)| t as usize >= n_vocab)
    {
        return Err(Error::Invalid(format!(
            "token {t} at position {pos} is outside the vocabulary of {n_vocab} tokens"
        )));
    }
    let first = opts.first_scored();
    let mut input = Vec::with_capacity(n_ctx);
    for i in 0..n_chunks {
        let chunk = &tokens[i * n_ctx..(i + 1) * n_ctx];
        input.clear();
        input.extend_from_slice(chunk);
        if let Some(bos) = opts.bos {
            input[0] = bos;
        }
        let mut counted = Counted {
            inner: &mut *rows,
            bytes: 0,
        };
        eval.score_chunk(&input, first, &chunk[first + 1..], how, &mut counted)?;
        let want = (n_ctx - 1 - first) * how.out_bytes(n_vocab);
        if counted.bytes != want {
            return Err(Error::Model(format!(
                "scoring a chunk gave {} bytes of results, expected {want} ({} rows)",
                counted.bytes,
                n_ctx - 1 - first
            )));
        }
        done(rows, i, n_chunks)?;
    }
    Ok(n_chunks)
}

/// Passes rows on, counting the result bytes.
struct Counted<'a, R: Rows> {
    inner: &'a mut R,
    bytes: usize,
}

impl<R: Rows> Rows for Counted<'_, R> {
    fn base(&mut self, n: usize, out: &mut Vec<u8>) -> Result<()> {
        self.inner.base(n, out)
    }
    fn put(&mut self, results: &[u8]) -> Result<()> {
        self.bytes += results.len();
        self.inner.put(results)
    }
}

/// Negative log-likelihood of `target` under `softmax(row)`, with the log-sum-exp accumulated in f64
/// around the row maximum. Returns `+inf` when the target's logit is `-inf` (or the row is NaN).
pub fn nll(row: &[f32], target: u32) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return f64::INFINITY;
    }
    let max = max as f64;
    let sum: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
    sum.ln() - (row[target as usize] as f64 - max)
}

/// Accumulates `nll` and `nll^2` like llama.cpp and turns them into the final estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NllStats {
    pub sum: f64,
    pub sum2: f64,
    pub count: usize,
}

impl NllStats {
    pub fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum2 += nll * nll;
        self.count += 1;
    }

    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }

    /// `sqrt((E[x^2] - E[x]^2) / (N - 1))`, 0 when that variance is not positive or `N < 2`.
    pub fn stderr(&self) -> f64 {
        if self.count < 2 {
            return 0.0;
        }
        let mean = self.mean();
        let var = self.sum2 / self.count as f64 - mean * mean;
        if var > 0.0 {
            (var / (self.count - 1) as f64).sqrt()
        } else {
            0.0
        }
    }

    pub fn ppl(&self) -> f64 {
        self.mean().exp()
    }
}

/// llama-perplexity's perplexity over `tokens` (already tokenized with BOS, see the module docs).
/// `on_chunk` is called after every chunk with the running value.
pub fn perplexity(
    eval: &mut dyn LogitsEval,
    tokens: &[u32],
    opts: &PerplexityOptions,
    on_chunk: impl FnMut(ChunkProgress),
) -> Result<PerplexityResult> {
    perplexity_with(eval, tokens, opts, Reduce::Nll, on_chunk, |_| Ok(()))
}

/// [`perplexity`] from rows reduced as `how` says (whose results start with the NLL), also handing
/// every row's result to `each` in order (the KL base writer saves its records this way).
pub fn perplexity_with(
    eval: &mut dyn LogitsEval,
    tokens: &[u32],
    opts: &PerplexityOptions,
    how: Reduce,
    mut on_chunk: impl FnMut(ChunkProgress),
    each: impl FnMut(&[u8]) -> Result<()>,
) -> Result<PerplexityResult> {
    let mut rows = NllRows {
        per: how.out_bytes(eval.n_vocab()),
        stats: NllStats::default(),
        each,
    };
    let mut chunk_ppl = Vec::new();
    let chunks = for_each_chunk(eval, tokens, opts, how, &mut rows, |rows, i, n_chunks| {
        let ppl = rows.stats.ppl();
        chunk_ppl.push(ppl);
        on_chunk(ChunkProgress {
            done: i + 1,
            n_chunks,
            ppl,
            tokens_scored: rows.stats.count,
        });
        Ok(())
    })?;
    Ok(result_from(&rows.stats, chunks, chunk_ppl))
}

/// Counts each row's NLL (summed in row order, so the result does not depend on where or in how
/// many pieces the rows were scored).
struct NllRows<F> {
    per: usize,
    stats: NllStats,
    each: F,
}

impl<F: FnMut(&[u8]) -> Result<()>> Rows for NllRows<F> {
    fn base(&mut self, _n: usize, _out: &mut Vec<u8>) -> Result<()> {
        Err(Error::Model("perplexity has no base records".into()))
    }
    fn put(&mut self, results: &[u8]) -> Result<()> {
        if !results.len().is_multiple_of(self.per) {
            return Err(Error::Model(format!(
                "{} bytes of results are not whole rows of {}",
                results.len(),
                self.per
            )));
        }
        for r in results.chunks_exact(self.per) {
            self.stats.add(row_nll(r));
            (self.each)(r)?;
        }
        Ok(())
    }
}

pub(crate) fn result_from(
    stats: &NllStats,
    chunks: usize,
    chunk_ppl: Vec<f64>,
) -> PerplexityResult {
    let ppl = stats.ppl();
    let nll_stderr = stats.stderr();
    PerplexityResult {
        ppl,
        ppl_stderr: ppl * nll_stderr,
        nll_mean: stats.mean(),
        nll_stderr,
        chunks,
        tokens_scored: stats.count,
        chunk_ppl,
    }
}

/// Reads an evaluation text as `llama-perplexity -f` does: the whole file, minus one trailing
/// newline.
pub fn read_text(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut text = String::from_utf8(bytes)
        .map_err(|e| Error::Invalid(format!("{}: not UTF-8 text ({e})", path.display())))?;
    if text.ends_with('\n') {
        text.pop();
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_is_stable_for_large_logits() {
        let row = [1000.0f32, 1000.0, 1000.0, 1000.0];
        assert!((nll(&row, 2) - 4f64.ln()).abs() < 1e-12);
        let row = [0.0f32, f32::NEG_INFINITY];
        assert_eq!(nll(&row, 0), 0.0);
        assert_eq!(nll(&row, 1), f64::INFINITY);
    }

    #[test]
    fn stats_match_llama_formula() {
        let xs = [0.5f64, 1.5, 2.0, 3.0, 0.25];
        let mut s = NllStats::default();
        xs.iter().for_each(|&x| s.add(x));
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let pop_var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        assert!((s.mean() - mean).abs() < 1e-12);
        assert!((s.stderr() - (pop_var / (n - 1.0)).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn options_errors() {
        let o = PerplexityOptions::new(512, Some(1));
        let e = o.chunks_for(1023).unwrap_err().to_string();
        assert!(
            e.contains("at least 1024 tokens") && e.contains("only 1023"),
            "{e}"
        );
        assert_eq!(o.chunks_for(1024).unwrap(), 2);
        assert_eq!(o.chunks_for(1600).unwrap(), 3);
        let o2 = PerplexityOptions {
            n_chunks: Some(2),
            ..o.clone()
        };
        assert_eq!(o2.chunks_for(5000).unwrap(), 2);
        assert_eq!(o2.chunks_for(1100).unwrap(), 2);
        let o0 = PerplexityOptions {
            n_chunks: Some(0),
            ..o.clone()
        };
        assert!(o0.chunks_for(5000).is_err());
        assert!(PerplexityOptions::new(2, None).chunks_for(100).is_err());
        assert_eq!(o.scored_per_chunk(), 255);
        assert_eq!(o.first_scored(), 256);
    }
}
