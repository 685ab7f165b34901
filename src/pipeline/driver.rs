//! Stage 0, which drives a pipeline: it embeds the tokens and runs the first layers one
//! micro-batch at a time, sending each on as soon as it is done (so the stages work on different
//! micro-batches at once), then waits for the last stage's logits, or, when scoring a chunk, for
//! the per-row results the last stage reduced its logits to (stage 0 never holds a chunk's
//! logits). Perplexity and generation see it as a model: [`LogitsEval`] and
//! [`crate::infer::generate::Forward`].

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

use super::schedule::{forward_only, Step};
use super::stage::StageStats;
use super::transport::{Header, Message, Transport};
use crate::error::{Error, Result};
use crate::eval::perplexity::{check_scored_rows, LogitsEval};
use crate::eval::score::{check_targets, score_streamed, slices, Reduce, Rows};
use crate::model::{Batch, Logits, Model, State};

/// What a scored request scores: rows `first..first + targets.len()` of it, reduced as `how` says,
/// base records from and results to `rows`.
struct Scoring<'a> {
    how: Reduce,
    first: usize,
    targets: &'a [u32],
    rows: &'a mut dyn Rows,
}

impl<'a> Scoring<'a> {
    /// The targets of the scored rows `r` (positions of the request; empty or within the scored
    /// rows).
    fn targets_of(&self, r: &Range<usize>) -> &'a [u32] {
        if r.is_empty() {
            return &[];
        }
        &self.targets[r.start - self.first..r.end - self.first]
    }
}

/// The slices (positions of the request) in which the rows `first..first + n` of a request that
/// lie in its micro-batch `start..stop` are scored: [`slices`] of them, or one empty slice when
/// none do.
fn pieces(first: usize, n: usize, start: usize, stop: usize) -> Vec<Range<usize>> {
    let (lo, hi) = (first.max(start), (first + n).min(stop));
    if lo >= hi {
        return std::iter::once(start..start).collect();
    }
    slices(hi - lo).map(|r| lo + r.start..lo + r.end).collect()
}

/// One slice of a micro-batch's scored rows for the last stage: `rows` (positions of the
/// request), the first of them within the micro-batch, and whether more of its slices follow.
struct SliceRequest {
    rows: Range<usize>,
    first: usize,
    more: bool,
}

/// The last stage's slices to score not yet sent, in order, and the rows of each one sent and
/// not yet answered.
#[derive(Default)]
struct Pending {
    requests: VecDeque<SliceRequest>,
    awaiting: VecDeque<usize>,
}

pub struct Driver<'m, T: Transport> {
    model: &'m Model,
    t: T,
    state: State,
    hidden: Vec<f32>,
    n_micro: usize,
    /// Logits of the last request (`Model::forward`'s layout).
    pub logits: Vec<f32>,
    stats: StageStats,
}

impl<'m, T: Transport> Driver<'m, T> {
    /// Stage 0 of `t.n_stages()`, running `layers` (which start at 0) with room for `n_ctx`
    /// positions, splitting each request into up to `n_micro` micro-batches.
    pub fn new(
        model: &'m Model,
        t: T,
        layers: Range<usize>,
        n_ctx: usize,
        n_micro: usize,
    ) -> Result<Self> {
        if t.stage() != 0 {
            return Err(Error::Invalid(format!(
                "stage {} cannot drive the pipeline: stage 0 does",
                t.stage()
            )));
        }
        if n_micro == 0 {
            return Err(Error::Invalid("--micro-batches must be at least 1".into()));
        }
        Ok(Driver {
            model,
            state: State::for_layers(model, n_ctx, layers)?,
            t,
            hidden: Vec::new(),
            n_micro,
            logits: Vec::new(),
            stats: StageStats::default(),
        })
    }

    /// Positions in the pipeline's caches.
    pub fn pos(&self) -> usize {
        self.state.pos
    }

    /// Runs `tokens` through every stage at positions `pos()..` (from 0 when `reset`), in up to
    /// `n_micro` micro-batches; leaves the logits `want` asks for in `self.logits`.
    pub fn forward(&mut self, tokens: &[u32], reset: bool, want: Logits) -> Result<()> {
        self.request(tokens, reset, want, None)
    }

    /// [`forward`](Self::forward), or, with `score`, the scoring of rows of the request on the
    /// last stage (each micro-batch's rows there, its results back here).
    fn request(
        &mut self,
        tokens: &[u32],
        reset: bool,
        want: Logits,
        mut score: Option<Scoring<'_>>,
    ) -> Result<()> {
        let want = if score.is_some() { Logits::None } else { want };
        if reset {
            self.state.reset();
        }
        self.logits = Vec::new();
        let n = tokens.len();
        if n == 0 {
            return Ok(());
        }
        if self.state.pos + n > self.state.kv.capacity {
            return Err(Error::Invalid(format!(
                "context full: {} positions + {n} tokens exceed the context of {}",
                self.state.pos, self.state.kv.capacity
            )));
        }
        let n_stages = self.t.n_stages();
        let m = self.n_micro.min(n);
        // Stage 0's steps of the forward-only schedule: micro-batch i holds positions
        // starts[i]..starts[i + 1] (sizes differing by at most one).
        let starts: Vec<usize> = (0..=m).map(|i| i * (n / m) + i.min(n % m)).collect();
        let mut pending = Pending::default();
        for step in &forward_only(n_stages, m)[0] {
            let Step::Forward(i) = *step else {
                return Err(Error::Model(
                    "a forward-only schedule has a backward step".into(),
                ));
            };
            let len = starts[i + 1] - starts[i];
            let piece = &tokens[starts[i]..starts[i + 1]];
            let last_piece = i + 1 == m;
            let header = Header {
                n_tokens: len,
                reset: reset && i == 0,
                want: match want {
                    Logits::All => Logits::All,
                    Logits::Last if last_piece => Logits::Last,
                    _ => Logits::None,
                },
                reply: last_piece,
                score: score.is_some(),
            };
            // This micro-batch's scored rows, in slices (positions of the request).
            let scored = score
                .as_ref()
                .map(|s| pieces(s.first, s.targets.len(), starts[i], starts[i + 1]));
            let t0 = Instant::now();
            if let (Some(s), Some(scored), 1) = (score.as_mut(), scored.as_ref(), n_stages) {
                // One stage: score here, the same way the last stage does.
                let m = self.model;
                m.forward_hidden(&mut self.state, Batch::Tokens(piece), &mut self.hidden)?;
                let d = m.config.n_embd;
                // The scored rows' span; `score_streamed` slices it as `pieces` did.
                let (lo, hi) = (scored[0].start, scored[scored.len() - 1].end);
                let h = &self.hidden[(lo - starts[i]) * d..(hi - starts[i]) * d];
                let targets = s.targets_of(&(lo..hi));
                score_streamed(m, &mut self.state, h, s.how, targets, &mut *s.rows)?;
                self.stats.busy += t0.elapsed();
                self.stats.micro_batches += 1;
                continue;
            }
            self.model.forward_stage(
                &mut self.state,
                Batch::Tokens(piece),
                header.want,
                &mut self.hidden,
            )?;
            self.stats.busy += t0.elapsed();
            self.stats.micro_batches += 1;
            if n_stages == 1 {
                self.logits.extend_from_slice(&self.state.logits);
            } else {
                if let (Some(s), 2) = (score.as_mut(), n_stages) {
                    // The last stage takes this micro-batch after every slice of the one before.
                    self.flush_requests(s, &mut pending)?;
                }
                let hidden = std::mem::take(&mut self.hidden);
                self.t.send(1, Message::Forward { header, hidden })?;
            }
            if let (Some(s), Some(scored)) = (score.as_mut(), scored) {
                for (j, r) in scored.iter().enumerate() {
                    pending.requests.push_back(SliceRequest {
                        rows: r.clone(),
                        first: r.start - starts[i],
                        more: j + 1 < scored.len(),
                    });
                }
                self.send_requests(s, &mut pending)?;
            }
        }
        if let Some(mut s) = score {
            self.flush_requests(&mut s, &mut pending)?;
            while !pending.awaiting.is_empty() {
                self.recv_scores(&mut s, &mut pending)?;
            }
            return Ok(());
        }
        if n_stages > 1 {
            match self.t.recv(n_stages - 1)? {
                Message::Logits(l) => self.logits = l,
                other => {
                    return Err(Error::Model(format!(
                        "stage 0 expected logits from the last stage, got {}",
                        other.kind()
                    )))
                }
            }
        }
        let rows = match want {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => n,
        };
        if self.logits.len() != rows * self.model.config.n_vocab {
            return Err(Error::Model(format!(
                "the last stage sent {} logits, expected {rows} rows of {}",
                self.logits.len(),
                self.model.config.n_vocab
            )));
        }
        Ok(())
    }

    /// Sends the last stage the next of `p.requests` while fewer than a window of them wait for
    /// an answer: every one at once when a row's result is a number, one at a time when rows
    /// carry base records (98 KB a row for SmolLM2's vocabulary: a chunk's would otherwise wait
    /// in messages, 25 MB, on this stage when comparing or on the last when saving a base).
    fn send_requests(&mut self, s: &mut Scoring<'_>, p: &mut Pending) -> Result<()> {
        let window = if s.how == Reduce::Nll { usize::MAX } else { 1 };
        while p.awaiting.len() < window {
            let Some(q) = p.requests.pop_front() else {
                return Ok(());
            };
            let mut base = Vec::new();
            if s.how == Reduce::Compare {
                s.rows.base(q.rows.len(), &mut base)?;
            }
            let msg = Message::Score {
                how: s.how,
                first: q.first,
                targets: s.targets_of(&q.rows).to_vec(),
                base,
                more: q.more,
            };
            self.t.send(self.t.n_stages() - 1, msg)?;
            p.awaiting.push_back(q.rows.len());
        }
        Ok(())
    }

    /// Sends every request of `p`, taking answers as the window needs.
    fn flush_requests(&mut self, s: &mut Scoring<'_>, p: &mut Pending) -> Result<()> {
        self.send_requests(s, p)?;
        while !p.requests.is_empty() {
            self.recv_scores(s, p)?;
            self.send_requests(s, p)?;
        }
        Ok(())
    }

    /// The last stage's answer to the oldest request waiting, handed to `s.rows`.
    fn recv_scores(&mut self, s: &mut Scoring<'_>, p: &mut Pending) -> Result<()> {
        let per = s.how.out_bytes(self.model.config.n_vocab);
        let rows = p
            .awaiting
            .pop_front()
            .ok_or_else(|| Error::Model("stage 0 waits for scores it did not ask for".into()))?;
        match self.t.recv(self.t.n_stages() - 1)? {
            Message::Scores(v) if v.len() == rows * per => s.rows.put(&v),
            Message::Scores(v) => Err(Error::Model(format!(
                "the last stage sent {} bytes of scores for {rows} rows of {per}",
                v.len(),
            ))),
            other => Err(Error::Model(format!(
                "stage 0 expected scores from the last stage, got {}",
                other.kind()
            ))),
        }
    }

    /// Tells the other stages to end; returns this stage's statistics.
    pub fn finish(mut self) -> Result<StageStats> {
        if self.t.n_stages() > 1 {
            self.t.send(1, Message::Stop)?;
        }
        Ok(self.stats)
    }

    /// Time this stage has spent computing.
    pub fn busy(&self) -> Duration {
        self.stats.busy
    }
}

impl<T: Transport> LogitsEval for Driver<'_, T> {
    fn n_vocab(&self) -> usize {
        self.model.config.n_vocab
    }

    fn eval_chunk(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<()> {
        // Every row's logits, shipped from the last stage (perplexity and KL do not come here:
        // they score on the last stage through `score_chunk`). A chunk's logits are large (512 x
        // 49152 floats = 96 MiB): free the caller's previous buffer and ours before the next
        // arrives, so that one is alive at a time, not three.
        *logits = Vec::new();
        self.forward(tokens, true, Logits::All)?;
        std::mem::swap(logits, &mut self.logits);
        Ok(())
    }

    fn score_chunk(
        &mut self,
        tokens: &[u32],
        first: usize,
        targets: &[u32],
        how: Reduce,
        rows: &mut dyn Rows,
    ) -> Result<()> {
        check_scored_rows(tokens.len(), first, targets.len())?;
        // Checked here too, so that a bad target fails on stage 0 before any stage runs.
        check_targets(self.model.config.n_vocab, targets)?;
        self.logits = Vec::new();
        let score = Scoring {
            how,
            first,
            targets,
            rows,
        };
        self.request(tokens, true, Logits::None, Some(score))
    }
}

impl<T: Transport> crate::infer::generate::Forward for Driver<'_, T> {
    fn forward_last(&mut self, tokens: &[u32]) -> Result<()> {
        let reset = self.pos() == 0;
        self.forward(tokens, reset, Logits::Last)
    }
    fn logits(&self) -> &[f32] {
        &self.logits
    }
    fn pos(&self) -> usize {
        self.pos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one slice, a Vec of one range
    fn pieces_cover_the_scored_rows_of_each_micro_batch() {
        // A chunk of 512 scoring rows 256..511, in 4 micro-batches of 128.
        assert_eq!(pieces(256, 255, 0, 128), [0..0]);
        assert_eq!(pieces(256, 255, 128, 256), [128..128]);
        assert_eq!(
            pieces(256, 255, 256, 384),
            [256..288, 288..320, 320..352, 352..384]
        );
        let last = pieces(256, 255, 384, 512);
        assert_eq!((last[0].start, last[3].end, last.len()), (384, 511, 4));
        // Scored rows before, inside and after a micro-batch.
        assert_eq!(pieces(10, 5, 20, 30), [20..20]);
        assert_eq!(pieces(22, 3, 20, 30), [22..25]);
        assert_eq!(pieces(18, 40, 20, 30), [20..30]);
    }
}
