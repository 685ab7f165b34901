//! KL divergence of a model's token distributions against a saved base, as llama-perplexity's
//! `--kl-divergence-base FILE` (save) and `--kl-divergence` (compare) do, in pare's own file format.
//!
//! # What is compared
//! The same positions llama-perplexity scores: for each chunk (see [`super::perplexity`]), the logits
//! rows `n_ctx/2 ..= n_ctx-2`. Per position the comparison computes `KL(base || new) = Σ p_base ·
//! (ln p_base − ln p_new)`, whether the argmax agrees ("same top"), both models' NLL of the actual next
//! token (so the base PPL comes out of the file) and `Δp = p_new(target) − p_base(target)`. The
//! summary gives the mean KL with its standard error, its median, 99th percentile and maximum
//! (percentiles interpolated as llama.cpp does), the same-top rate, both perplexities and RMS Δp.
//!
//! # File format (version 1, all little-endian)
//! ```text
//! magic    8 bytes  "PAREKLD\0"
//! version  u32      1
//! n_vocab  u32
//! n_ctx    u32
//! n_chunks u32
//! bos      u32      BOS id placed at the start of each chunk, 0xFFFF_FFFF for none
//! range    f32      R, the log-probability range kept per position (40.0)
//! tokens   u32 × (n_chunks · n_ctx)     the text's tokens as tokenized (before the BOS overwrite)
//! records  n_chunks · (n_ctx − 1 − n_ctx/2) of:
//!          lo    f32   log-probability that code 1 stands for
//!          step  f32   log-probability per code step
//!          nll   f32   exact −ln p(target) of the base model
//!          top   u32   exact argmax of the base logits (lowest id on ties)
//!          codes u16 × n_vocab
//! ```
//! The file size must equal what the header implies, so a truncated file is detected when opened.
//!
//! # Quantization and its error bound
//! Per position, with log-probabilities `lp_i = l_i − logsumexp(l)` and `hi = max lp`, `lo = max(min
//! lp, hi − R)`, `step = (hi − lo) / 65534`: `code_i = 1 + round((lp_i − lo) / step)` when `lp_i ≥ lo`,
//! and `code_i = 0` ("probability below e^(hi−R), treated as 0") otherwise. Decoding gives `lp'_i = lo
//! + step·(code_i − 1)` with `|lp'_i − lp_i| ≤ δ = step/2 ≤ R/131068 ≈ 3.1e-4` nats (plus f32 rounding,
//! ~1e-6), then renormalizes so the decoded base is a proper distribution `q`. If `t` is the true
//! probability mass dropped as code 0 (`t ≤ n_vocab · e^(−R)`, about 2e-13 for 49152 tokens), then
//! `|ln(q_i/p_i)| ≤ η = 2δ + |ln(1 − t)|` for every kept token, and comparing a model with itself gives
//! `KL(q || p) ≤ χ²(q || p) ≤ (e^η − 1)² + t`, about 4e-7 at worst.
//!
//! Differences from llama.cpp's format (`_logits_` magic, 16 log-prob range, u16 codes where values
//! more than 16 below the max are clamped to the floor, KL summed only over base log-probs above −16,
//! argmax and target NLL read from the quantized values): pare keeps a wider range, drops rather than
//! clamps the tail, stores the argmax and the target's NLL exactly, and records the BOS choice, so a
//! saved base says what it was computed on and mismatches are refused with a message.

use super::perplexity::{
    for_each_chunk, perplexity_with, ChunkProgress, LogitsEval, NllStats, PerplexityOptions,
    PerplexityResult,
};
use super::score::{row_kl, row_record, Reduce, Rows};
use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"PAREKLD\0";
const VERSION: u32 = 1;
const NO_BOS: u32 = u32::MAX;
/// Log-probability range kept per position (nats below the most likely token).
pub const LOG_RANGE: f32 = 40.0;
const HEADER_FIXED: usize = 8 + 4 * 6;
const RECORD_FIXED: usize = 16;
const MAX_CODE: u16 = u16::MAX;

/// What a base file was computed on.
#[derive(Debug, Clone, PartialEq)]
pub struct KlHeader {
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub n_chunks: usize,
    pub bos: Option<u32>,
    pub range: f32,
    /// The first `n_chunks · n_ctx` tokens of the text.
    pub tokens: Vec<u32>,
}

impl KlHeader {
    fn scored_per_chunk(&self) -> usize {
        self.n_ctx - 1 - self.n_ctx / 2
    }

    fn record_len(&self) -> usize {
        RECORD_FIXED + 2 * self.n_vocab
    }

    fn header_len(&self) -> u64 {
        HEADER_FIXED as u64 + 4 * self.tokens.len() as u64
    }

    fn file_len(&self) -> u64 {
        self.header_len()
            + (self.n_chunks * self.scored_per_chunk()) as u64 * self.record_len() as u64
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.header_len() as usize);
        b.extend_from_slice(MAGIC);
        for v in [
            VERSION,
            self.n_vocab as u32,
            self.n_ctx as u32,
            self.n_chunks as u32,
            self.bos.unwrap_or(NO_BOS),
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.range.to_le_bytes());
        for t in &self.tokens {
            b.extend_from_slice(&t.to_le_bytes());
        }
        b
    }
}

/// Bytes of one position's record in a base file of `n_vocab` tokens.
pub fn record_len(n_vocab: usize) -> usize {
    RECORD_FIXED + 2 * n_vocab
}

/// Quantizes one logits row into a record (`RECORD_FIXED + 2 · n_vocab` bytes).
pub(crate) fn encode_row(row: &[f32], target: u32, range: f32, out: &mut [u8]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let min = row.iter().copied().fold(f32::INFINITY, f32::min);
    let sum: f64 = row.iter().map(|&l| (l as f64 - max as f64).exp()).sum();
    let lse = sum.ln();
    // Log-probabilities relative to the max logit: lp = (l - max) - lse.
    let hi = -lse;
    let lo = ((min as f64 - max as f64) - lse).max(hi - range as f64);
    let step = (hi - lo) / (MAX_CODE - 1) as f64;
    let nll = lse - (row[target as usize] as f64 - max as f64);
    let top = super::super::infer::sampling::argmax(row) as u32;
    let lo32 = lo as f32;
    let step32 = step as f32;
    out[0..4].copy_from_slice(&lo32.to_le_bytes());
    out[4..8].copy_from_slice(&step32.to_le_bytes());
    out[8..12].copy_from_slice(&(nll as f32).to_le_bytes());
    out[12..16].copy_from_slice(&top.to_le_bytes());
    let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
    for (&l, c) in row.iter().zip(out[RECORD_FIXED..].chunks_exact_mut(2)) {
        let lp = (l as f64 - max as f64) - lse;
        // NaN and anything below the floor (incl. -inf) are dropped as code 0.
        let code: u16 = if lp >= lo {
            (1.0 + ((lp - lo) * inv).round()).min(MAX_CODE as f64) as u16
        } else {
            0
        };
        c.copy_from_slice(&code.to_le_bytes());
    }
}

/// Writes a base file; the file appears (atomically, by rename) only when [`finish`](Self::finish)
/// succeeds. Dropping the writer before that removes the temporary file.
pub struct KlBaseWriter {
    header: KlHeader,
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    records_written: usize,
}

impl KlBaseWriter {
    /// Starts a base file for `n_chunks` chunks of the options' context over `tokens`.
    pub fn create(
        path: &Path,
        n_vocab: usize,
        opts: &PerplexityOptions,
        n_chunks: usize,
        tokens: &[u32],
    ) -> Result<Self> {
        let n_tok = n_chunks * opts.n_ctx;
        if tokens.len() < n_tok {
            return Err(Error::Invalid(format!(
                "KL base: {n_chunks} chunks of {} tokens need {n_tok} tokens, got {}",
                opts.n_ctx,
                tokens.len()
            )));
        }
        if n_vocab == 0 || n_vocab > u32::MAX as usize || opts.n_ctx > u32::MAX as usize {
            return Err(Error::Invalid(format!(
                "KL base: unsupported sizes (n_vocab {n_vocab}, n_ctx {})",
                opts.n_ctx
            )));
        }
        let header = KlHeader {
            n_vocab,
            n_ctx: opts.n_ctx,
            n_chunks,
            bos: opts.bos,
            range: LOG_RANGE,
            tokens: tokens[..n_tok].to_vec(),
        };
        let tmp = crate::atomic_file::temp_path(path)?;
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&header.encode())
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(KlBaseWriter {
            header,
            path: path.to_path_buf(),
            tmp,
            out: Some(out),
            records_written: 0,
        })
    }

    pub fn header(&self) -> &KlHeader {
        &self.header
    }

    /// Appends the record of the next scored position (in chunk and row order).
    pub fn write_record(&mut self, record: &[u8]) -> Result<()> {
        let h = &self.header;
        if record.len() != h.record_len() {
            return Err(Error::Invalid(format!(
                "KL base: a record of {} bytes, expected {} for {} tokens",
                record.len(),
                h.record_len(),
                h.n_vocab
            )));
        }
        if self.records_written >= h.n_chunks * h.scored_per_chunk() {
            return Err(Error::Invalid(format!(
                "KL base: more than the announced {} chunks written",
                h.n_chunks
            )));
        }
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(record).map_err(|e| Error::io(&self.tmp, e))?;
        self.records_written += 1;
        Ok(())
    }

    /// Checks that every chunk was written, syncs and renames the file into place.
    pub fn finish(mut self) -> Result<()> {
        let expected = self.header.n_chunks * self.header.scored_per_chunk();
        if self.records_written != expected {
            return Err(Error::Invalid(format!(
                "KL base: {} of {} positions written; the file was not created",
                self.records_written, expected
            )));
        }
        let out = self.out.take().expect("finish called twice");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        drop(file);
        crate::atomic_file::persist(&self.tmp, &self.path)?;
        Ok(())
    }
}

impl Drop for KlBaseWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Reads a base file's records in order, a few positions at a time.
pub struct KlBaseReader {
    header: KlHeader,
    path: PathBuf,
    input: BufReader<File>,
    records_read: usize,
}

fn read_exact(r: &mut impl Read, buf: &mut [u8], path: &Path, what: &str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::Invalid(format!(
                "{}: truncated KL base file ({what})",
                path.display()
            ))
        } else {
            Error::io(path, e)
        }
    })
}

impl KlBaseReader {
    /// Opens and validates a base file: magic, version, sizes, and the exact file length.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut fixed = [0u8; HEADER_FIXED];
        read_exact(&mut input, &mut fixed, path, "header")?;
        if &fixed[..8] != MAGIC {
            return Err(Error::Invalid(format!(
                "{}: not a pare KL base file (bad magic)",
                path.display()
            )));
        }
        let u = |i: usize| u32::from_le_bytes(fixed[8 + 4 * i..12 + 4 * i].try_into().unwrap());
        if u(0) != VERSION {
            return Err(Error::Invalid(format!(
                "{}: KL base file version {} is not supported (expected {VERSION})",
                path.display(),
                u(0)
            )));
        }
        let (n_vocab, n_ctx, n_chunks) = (u(1) as usize, u(2) as usize, u(3) as usize);
        let bos = (u(4) != NO_BOS).then_some(u(4));
        let range = f32::from_bits(u(5));
        if n_vocab == 0 || n_ctx < 3 || n_chunks == 0 || !(range > 0.0 && range.is_finite()) {
            return Err(Error::Invalid(format!(
                "{}: KL base header is malformed (n_vocab {n_vocab}, n_ctx {n_ctx}, n_chunks {n_chunks}, range {range})",
                path.display()
            )));
        }
        let mut header = KlHeader {
            n_vocab,
            n_ctx,
            n_chunks,
            bos,
            range,
            tokens: Vec::new(),
        };
        let n_tok = n_ctx as u64 * n_chunks as u64;
        let header_len = HEADER_FIXED as u64 + 4 * n_tok;
        let expected = header_len
            + n_chunks as u64 * header.scored_per_chunk() as u64 * header.record_len() as u64;
        if len != expected {
            return Err(Error::Invalid(format!(
                "{}: KL base file is {len} bytes but its header describes {expected} bytes ({})",
                path.display(),
                if len < expected {
                    "truncated"
                } else {
                    "trailing data"
                }
            )));
        }
        let mut tok_bytes = vec![0u8; 4 * n_tok as usize];
        read_exact(&mut input, &mut tok_bytes, path, "tokens")?;
        header.tokens = tok_bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        debug_assert_eq!(header.file_len(), expected);
        Ok(KlBaseReader {
            header,
            path: path.to_path_buf(),
            input,
            records_read: 0,
        })
    }

    pub fn header(&self) -> &KlHeader {
        &self.header
    }

    /// Checks that a new run (its model's vocabulary, options and tokenized text) matches what the
    /// base was computed on, and returns how many chunks to compare.
    pub fn check_compatible(
        &self,
        n_vocab: usize,
        opts: &PerplexityOptions,
        tokens: &[u32],
    ) -> Result<usize> {
        let h = &self.header;
        let p = self.path.display();
        if n_vocab != h.n_vocab {
            return Err(Error::Invalid(format!(
                "{p}: base was computed with a vocabulary of {} tokens, this model has {n_vocab}",
                h.n_vocab
            )));
        }
        if opts.n_ctx != h.n_ctx {
            return Err(Error::Invalid(format!(
                "{p}: base was computed with a context of {}, this run uses {}",
                h.n_ctx, opts.n_ctx
            )));
        }
        if opts.bos != h.bos {
            return Err(Error::Invalid(format!(
                "{p}: base put BOS {:?} at the start of each chunk, this run {:?}",
                h.bos, opts.bos
            )));
        }
        let n_chunks = match opts.n_chunks {
            None => h.n_chunks,
            Some(n) if n <= h.n_chunks && n > 0 => n,
            Some(n) => {
                return Err(Error::Invalid(format!(
                    "{p}: {n} chunks requested but the base file has {}",
                    h.n_chunks
                )))
            }
        };
        let need = n_chunks * h.n_ctx;
        if tokens.len() < need {
            return Err(Error::Invalid(format!(
                "{p}: the text tokenizes to {} tokens, fewer than the {need} the base was computed on \
                 (different text or tokenizer?)",
                tokens.len()
            )));
        }
        if let Some(i) = (0..need).find(|&i| tokens[i] != h.tokens[i]) {
            return Err(Error::Invalid(format!(
                "{p}: token {i} differs: base has {}, this text and model give {} \
                 (different text or tokenizer?)",
                h.tokens[i], tokens[i]
            )));
        }
        Ok(n_chunks)
    }

    /// Appends the records of the next `n` positions to `out`.
    pub fn read_rows(&mut self, n: usize, out: &mut Vec<u8>) -> Result<()> {
        let total = self.header.n_chunks * self.header.scored_per_chunk();
        if self.records_read + n > total {
            return Err(Error::Invalid(format!(
                "{}: {n} more positions asked for after {} of the file's {total}",
                self.path.display(),
                self.records_read
            )));
        }
        let at = out.len();
        out.resize(at + n * self.header.record_len(), 0);
        let what = format!("position {}", self.records_read + 1);
        read_exact(&mut self.input, &mut out[at..], &self.path, &what)?;
        self.records_read += n;
        Ok(())
    }
}

/// Per-position comparison of a base record with a new logits row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PositionKl {
    pub kld: f64,
    pub nll_base: f64,
    pub nll_new: f64,
    pub same_top: bool,
}

/// Compares one record (as written by `encode_row`) with the new model's logits row.
pub(crate) fn compare_row(rec: &[u8], row: &[f32], target: u32) -> PositionKl {
    let f = |i: usize| f32::from_le_bytes(rec[i..i + 4].try_into().unwrap());
    let (lo, step, nll_base) = (f(0) as f64, f(4) as f64, f(8) as f64);
    let top = u32::from_le_bytes(rec[12..16].try_into().unwrap());
    let codes = || {
        rec[RECORD_FIXED..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
    };

    // New model: log-softmax in f64 around the max.
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse_new = row
        .iter()
        .map(|&l| (l as f64 - max as f64).exp())
        .sum::<f64>()
        .ln();
    let nll_new = lse_new - (row[target as usize] as f64 - max as f64);
    let top_new = crate::infer::sampling::argmax(row) as u32;

    // Base: decode, renormalize over the kept codes.
    let max_code = codes().max().unwrap_or(0);
    let lp_of = |c: u16| lo + step * (c as f64 - 1.0);
    let base_max = lp_of(max_code);
    let norm = codes()
        .filter(|&c| c != 0)
        .map(|c| (lp_of(c) - base_max).exp())
        .sum::<f64>()
        .ln()
        + base_max;
    let mut kld = 0.0f64;
    for (c, &l) in codes().zip(row) {
        if c == 0 {
            continue;
        }
        let lq = lp_of(c) - norm;
        let lp_new = (l as f64 - max as f64) - lse_new;
        kld += lq.exp() * (lq - lp_new);
    }
    PositionKl {
        kld: kld.max(0.0),
        nll_base,
        nll_new,
        same_top: top == top_new,
    }
}

/// Summary of a comparison against a base.
#[derive(Debug, Clone, PartialEq)]
pub struct KlStats {
    pub chunks: usize,
    pub positions: usize,
    /// Mean `KL(base || new)` per position (nats).
    pub kld_mean: f64,
    /// Standard error of `kld_mean` (llama.cpp's formula: 0 for 10 positions or fewer).
    pub kld_stderr: f64,
    pub kld_median: f64,
    pub kld_p99: f64,
    pub kld_max: f64,
    /// Fraction of positions where both models' most likely token agrees.
    pub same_top: f64,
    pub same_top_stderr: f64,
    /// The base model's perplexity on the same positions (from the exact NLLs in the file).
    pub ppl_base: f64,
    pub ppl_base_stderr: f64,
    /// The new model's perplexity (equals what [`super::perplexity::perplexity`] gives).
    pub ppl_new: f64,
    pub ppl_new_stderr: f64,
    /// Root mean square of `p_new(target) − p_base(target)`.
    pub rms_dp: f64,
}

/// Progress after one compared chunk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KlProgress {
    pub done: usize,
    pub n_chunks: usize,
    pub kld_mean: f64,
    pub same_top: f64,
    pub ppl_new: f64,
}

/// Accumulates per-position comparisons into [`KlStats`].
#[derive(Debug, Clone, Default)]
pub struct KlAccumulator {
    klds: Vec<f64>,
    kld: NllStats,
    base: NllStats,
    new: NllStats,
    same_top: usize,
    dp2: f64,
    chunks: usize,
}

impl KlAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one position.
    pub fn add(&mut self, p: PositionKl) {
        self.klds.push(p.kld);
        self.kld.add(p.kld);
        self.base.add(p.nll_base);
        self.new.add(p.nll_new);
        self.same_top += p.same_top as usize;
        let dp = (-p.nll_new).exp() - (-p.nll_base).exp();
        self.dp2 += dp * dp;
    }

    /// Counts one more compared chunk.
    pub fn end_chunk(&mut self) {
        self.chunks += 1;
    }

    pub fn progress(&self, n_chunks: usize) -> KlProgress {
        KlProgress {
            done: self.chunks,
            n_chunks,
            kld_mean: self.kld.mean(),
            same_top: self.same_top as f64 / self.kld.count as f64,
            ppl_new: self.new.ppl(),
        }
    }

    pub fn finish(mut self) -> KlStats {
        let n = self.klds.len();
        self.klds.sort_by(f64::total_cmp);
        let same_top = self.same_top as f64 / n as f64;
        let llama_stderr = |s: &NllStats| if s.count > 10 { s.stderr() } else { 0.0 };
        let (ppl_base, ppl_new) = (self.base.ppl(), self.new.ppl());
        KlStats {
            chunks: self.chunks,
            positions: n,
            kld_mean: self.kld.mean(),
            kld_stderr: llama_stderr(&self.kld),
            kld_median: percentile(&self.klds, 0.5),
            kld_p99: percentile(&self.klds, 0.99),
            kld_max: self.klds.last().copied().unwrap_or(f64::NAN),
            same_top,
            same_top_stderr: if n > 1 {
                (same_top * (1.0 - same_top) / (n - 1) as f64).sqrt()
            } else {
                0.0
            },
            ppl_base,
            ppl_base_stderr: ppl_base * llama_stderr(&self.base),
            ppl_new,
            ppl_new_stderr: ppl_new * llama_stderr(&self.new),
            rms_dp: (self.dp2 / n as f64).sqrt(),
        }
    }
}

/// llama.cpp's percentile of sorted values: linear interpolation at `fraction · (n − 1)`.
pub fn percentile(sorted: &[f64], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f64;
    let i = p as usize;
    let frac = p - i as f64;
    (1.0 - frac) * sorted[i] + frac * sorted[(i + 1).min(sorted.len() - 1)]
}

/// Runs perplexity over `tokens` and saves the base distributions to `path` (atomically). Returns
/// the perplexity, which is exactly what [`super::perplexity::perplexity`] gives.
pub fn save_base(
    eval: &mut dyn LogitsEval,
    tokens: &[u32],
    opts: &PerplexityOptions,
    path: &Path,
    on_chunk: impl FnMut(ChunkProgress),
) -> Result<PerplexityResult> {
    let n_chunks = opts.chunks_for(tokens.len())?;
    let mut writer = KlBaseWriter::create(path, eval.n_vocab(), opts, n_chunks, tokens)?;
    let result = perplexity_with(eval, tokens, opts, Reduce::BaseRecord, on_chunk, |r| {
        writer.write_record(row_record(r))
    })?;
    writer.finish()?;
    Ok(result)
}

/// Evaluates `tokens` with a new model and compares it with the base saved at `path`. `opts` must
/// match the base (context, BOS); `opts.n_chunks` may ask for fewer chunks than the base holds.
pub fn compare(
    eval: &mut dyn LogitsEval,
    tokens: &[u32],
    opts: &PerplexityOptions,
    path: &Path,
    mut on_chunk: impl FnMut(KlProgress),
) -> Result<KlStats> {
    let mut reader = KlBaseReader::open(path)?;
    let n_chunks = reader.check_compatible(eval.n_vocab(), opts, tokens)?;
    let run_opts = PerplexityOptions {
        n_chunks: Some(n_chunks),
        ..opts.clone()
    };
    let mut rows = CompareRows {
        reader: &mut reader,
        acc: KlAccumulator::new(),
    };
    let how = Reduce::Compare;
    for_each_chunk(
        eval,
        tokens,
        &run_opts,
        how,
        &mut rows,
        |rows, _, n_chunks| {
            rows.acc.end_chunk();
            on_chunk(rows.acc.progress(n_chunks));
            Ok(())
        },
    )?;
    Ok(rows.acc.finish())
}

/// The base's records in, the comparisons out.
struct CompareRows<'a> {
    reader: &'a mut KlBaseReader,
    acc: KlAccumulator,
}

impl Rows for CompareRows<'_> {
    fn base(&mut self, n: usize, out: &mut Vec<u8>) -> Result<()> {
        self.reader.read_rows(n, out)
    }
    fn put(&mut self, results: &[u8]) -> Result<()> {
        let per = Reduce::Compare.out_bytes(self.reader.header.n_vocab);
        if !results.len().is_multiple_of(per) {
            return Err(Error::Model(format!(
                "{} bytes of comparisons are not whole rows of {per}",
                results.len()
            )));
        }
        results
            .chunks_exact(per)
            .for_each(|r| self.acc.add(row_kl(r)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(row: &[f32]) -> PositionKl {
        let mut rec = vec![0u8; RECORD_FIXED + 2 * row.len()];
        encode_row(row, 0, LOG_RANGE, &mut rec);
        compare_row(&rec, row, 0)
    }

    #[test]
    fn self_kl_within_bound() {
        // Spread of 30 nats: within R, nothing dropped.
        let row: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 3001) as f32 * 0.01 - 15.0)
            .collect();
        let p = roundtrip(&row);
        let delta = 30.0 / 65534.0 / 2.0 + 1e-5;
        let eta: f64 = 2.0 * delta;
        assert!(p.kld <= (eta.exp() - 1.0).powi(2), "kld {}", p.kld);
        assert!(p.same_top);
        assert!((p.nll_base - p.nll_new).abs() < 1e-5);
    }

    #[test]
    fn dropped_tail_is_accounted() {
        // Two tokens far below the range: they are coded 0 and the base keeps the rest.
        let mut row = vec![0.0f32; 100];
        row[7] = -60.0;
        row[8] = -1000.0;
        let mut rec = vec![0u8; RECORD_FIXED + 200];
        encode_row(&row, 0, LOG_RANGE, &mut rec);
        let code = |i: usize| u16::from_le_bytes([rec[16 + 2 * i], rec[17 + 2 * i]]);
        assert_eq!((code(7), code(8)), (0, 0));
        assert_eq!(code(0), MAX_CODE);
        let p = compare_row(&rec, &row, 0);
        let t = 2.0 * (-60f64).exp();
        assert!(p.kld <= 1e-9 + t, "kld {}", p.kld);
    }

    #[test]
    fn constant_row() {
        let p = roundtrip(&[3.0; 10]);
        assert!(p.kld.abs() < 1e-12);
        assert!((p.nll_base - 10f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn percentile_interpolates() {
        let v = [0.0, 1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.0);
        assert!((percentile(&v, 0.99) - 3.96).abs() < 1e-12);
        assert_eq!(percentile(&v, 1.0), 4.0);
    }
}
