//! Scoring where the logits are computed. Perplexity and KL divergence need, per scored position,
//! only a few numbers (or, for a KL base, one compressed record), never a whole chunk's logits: the
//! model, or a pipeline's last stage, applies the output head to a few hidden rows at a time
//! ([`score_hidden`]) and reduces each row at once ([`reduce_rows`]), with the functions of
//! [`super::perplexity`] and [`super::kl`]. Whoever asked gets the per-row results in row order
//! through [`Rows`].
//!
//! Each row's result starts with its NLL of the next token as a little-endian f64:
//! - [`Reduce::Nll`]: that alone (8 bytes);
//! - [`Reduce::BaseRecord`]: then the row's KL base record ([`super::kl`]'s file format);
//! - [`Reduce::Compare`]: then, against the row's base record, the KL divergence, the base's NLL
//!   and whether both top tokens agree (1.0 or 0.0), each an f64 (32 bytes in all).

use rayon::prelude::*;

use super::kl::{self, PositionKl};
use crate::error::{Error, Result};
use crate::model::{Model, State};

/// Scored rows whose logits exist at once, at most: 32 rows of 49152 floats are 6 MiB.
pub const SLICE_ROWS: usize = 32;

/// `0..n` in slices of at most [`SLICE_ROWS`] rows, of sizes differing by at most one: none
/// smaller than 8 rows unless `n` is (a product over fewer rows than that takes another kernel,
/// whose rounding differs from the one a whole chunk's rows take).
pub fn slices(n: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let k = n.div_ceil(SLICE_ROWS);
    (0..k).map(move |i| i * (n / k) + i.min(n % k)..(i + 1) * (n / k) + (i + 1).min(n % k))
}

/// What each scored logits row is reduced to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    /// The NLL of the row's target.
    Nll,
    /// The NLL and the row's KL base record (saving a base).
    BaseRecord,
    /// The NLL, and the comparison with the row's base record (comparing against a base).
    Compare,
}

impl Reduce {
    /// A small integer for messages.
    pub fn code(self) -> u64 {
        match self {
            Reduce::Nll => 0,
            Reduce::BaseRecord => 1,
            Reduce::Compare => 2,
        }
    }

    pub fn from_code(c: u64) -> Option<Reduce> {
        match c {
            0 => Some(Reduce::Nll),
            1 => Some(Reduce::BaseRecord),
            2 => Some(Reduce::Compare),
            _ => None,
        }
    }

    /// Bytes of one row's result.
    pub fn out_bytes(self, n_vocab: usize) -> usize {
        match self {
            Reduce::Nll => 8,
            Reduce::BaseRecord => 8 + kl::record_len(n_vocab),
            Reduce::Compare => 32,
        }
    }

    /// Bytes of base data one row needs (its record, when comparing).
    pub fn base_bytes(self, n_vocab: usize) -> usize {
        match self {
            Reduce::Compare => kl::record_len(n_vocab),
            _ => 0,
        }
    }
}

/// One row's result: its NLL first.
pub fn row_nll(result: &[u8]) -> f64 {
    f64_at(result, 0)
}

/// A [`Reduce::Compare`] row's result.
pub fn row_kl(result: &[u8]) -> PositionKl {
    PositionKl {
        nll_new: f64_at(result, 0),
        kld: f64_at(result, 8),
        nll_base: f64_at(result, 16),
        same_top: f64_at(result, 24) != 0.0,
    }
}

/// A [`Reduce::BaseRecord`] row's record.
pub fn row_record(result: &[u8]) -> &[u8] {
    &result[8..]
}

fn f64_at(b: &[u8], at: usize) -> f64 {
    f64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Where a chunk's scored rows come from and go to, in row order.
pub trait Rows {
    /// Appends the base records of the next `n` rows to `out` (asked only for
    /// [`Reduce::Compare`]).
    fn base(&mut self, n: usize, out: &mut Vec<u8>) -> Result<()>;
    /// The results of the next rows, [`Reduce::out_bytes`] each.
    fn put(&mut self, results: &[u8]) -> Result<()>;
}

/// Checks that every target is inside the vocabulary.
pub fn check_targets(n_vocab: usize, targets: &[u32]) -> Result<()> {
    match targets.iter().find(|&&t| t as usize >= n_vocab) {
        Some(&t) => Err(Error::Invalid(format!(
            "target token {t} is outside the vocabulary of {n_vocab} tokens"
        ))),
        None => Ok(()),
    }
}

/// Checks the inputs of `targets.len()` rows: targets inside the vocabulary, base records of the
/// right size.
pub fn check_rows(how: Reduce, n_vocab: usize, targets: &[u32], base: &[u8]) -> Result<()> {
    check_targets(n_vocab, targets)?;
    let want = targets.len() * how.base_bytes(n_vocab);
    if base.len() != want {
        return Err(Error::Invalid(format!(
            "{} rows to score came with {} bytes of base records, expected {want}",
            targets.len(),
            base.len()
        )));
    }
    Ok(())
}

/// Reduces logits rows (`targets.len()` rows of `n_vocab`, row `r` predicting `targets[r]`, with
/// `base` holding their base records when comparing) and appends their results to `out`.
pub fn reduce_rows(
    how: Reduce,
    n_vocab: usize,
    logits: &[f32],
    targets: &[u32],
    base: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    check_rows(how, n_vocab, targets, base)?;
    if logits.len() != targets.len() * n_vocab {
        return Err(Error::Model(format!(
            "{} logits for {} rows of {n_vocab}",
            logits.len(),
            targets.len()
        )));
    }
    let per = how.out_bytes(n_vocab);
    let at = out.len();
    out.resize(at + targets.len() * per, 0);
    let dst = out[at..].par_chunks_exact_mut(per);
    let rows = logits.par_chunks_exact(n_vocab).zip(targets.par_iter());
    match how {
        Reduce::Nll => dst.zip(rows).for_each(|(o, (row, &t))| {
            o.copy_from_slice(&super::perplexity::nll(row, t).to_le_bytes())
        }),
        Reduce::BaseRecord => dst.zip(rows).for_each(|(o, (row, &t))| {
            o[..8].copy_from_slice(&super::perplexity::nll(row, t).to_le_bytes());
            kl::encode_row(row, t, kl::LOG_RANGE, &mut o[8..]);
        }),
        Reduce::Compare => {
            let recs = base.par_chunks_exact(kl::record_len(n_vocab));
            dst.zip(rows).zip(recs).for_each(|((o, (row, &t)), rec)| {
                let p = kl::compare_row(rec, row, t);
                let same = if p.same_top { 1.0 } else { 0.0 };
                for (i, v) in [p.nll_new, p.kld, p.nll_base, same].iter().enumerate() {
                    o[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
                }
            })
        }
    }
    Ok(())
}

/// Scores hidden rows that the model's last layer left (`targets.len()` rows of `n_embd`): the
/// output head on [`slices`] of at most [`SLICE_ROWS`] rows, each slice reduced before the next is computed,
/// so no more than a slice's logits exist. Appends the results to `out`.
pub fn score_hidden(
    model: &Model,
    state: &mut State,
    hidden: &[f32],
    how: Reduce,
    targets: &[u32],
    base: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    let (d, v) = (model.config.n_embd, model.config.n_vocab);
    check_rows(how, v, targets, base)?;
    if hidden.len() != targets.len() * d {
        return Err(Error::Model(format!(
            "{} hidden values for {} rows of {d}",
            hidden.len(),
            targets.len()
        )));
    }
    let rec = how.base_bytes(v);
    let mut logits = Vec::new();
    for r in slices(targets.len()) {
        let (r0, r1) = (r.start, r.end);
        model.output_head(state, &hidden[r0 * d..r1 * d], &mut logits)?;
        reduce_rows(
            how,
            v,
            &logits,
            &targets[r0..r1],
            &base[r0 * rec..r1 * rec],
            out,
        )?;
    }
    Ok(())
}

/// [`score_hidden`] on `hidden` (one row per target) a slice at a time, each slice's base records
/// taken from `rows` and its results handed to it: what a model, or a one-stage pipeline, does
/// with a chunk's scored rows.
pub fn score_streamed(
    model: &Model,
    state: &mut State,
    hidden: &[f32],
    how: Reduce,
    targets: &[u32],
    rows: &mut dyn Rows,
) -> Result<()> {
    let d = model.config.n_embd;
    let (mut base, mut out) = (Vec::new(), Vec::new());
    for r in slices(targets.len()) {
        base.clear();
        if how == Reduce::Compare {
            rows.base(r.len(), &mut base)?;
        }
        out.clear();
        let h = &hidden[r.start * d..r.end * d];
        score_hidden(model, state, h, how, &targets[r], &base, &mut out)?;
        rows.put(&out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_evenly() {
        for n in [0, 1, 7, 31, 32, 33, 64, 65, 127, 255, 512] {
            let v: Vec<_> = slices(n).collect();
            assert_eq!(v.iter().map(|r| r.len()).sum::<usize>(), n, "{n}");
            assert!(v.windows(2).all(|w| w[0].end == w[1].start), "{n}");
            assert!(
                v.iter()
                    .all(|r| r.len() <= SLICE_ROWS && r.len() >= n.min(16)),
                "{n}"
            );
        }
    }
}
