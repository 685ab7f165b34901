//! What a stage other than the first does: receive a micro-batch's hidden states, run its own
//! layers on them (keeping the KV cache of those layers only), and pass the result on, or, on the
//! last stage, apply the output head and send the logits of a finished request to stage 0, or, for
//! a scored micro-batch, score the rows stage 0 names a few at a time and send it only their
//! results.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::transport::{Message, Transport};
use crate::error::{Error, Result};
use crate::eval::score::score_hidden;
use crate::model::{Batch, Model, State};

/// What a stage did in one run.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageStats {
    /// Time spent computing (not waiting for messages).
    pub busy: Duration,
    pub micro_batches: usize,
}

/// Serves stage `t.stage()` (not 0) with `layers` until stage 0 says stop.
pub fn serve(
    model: &Model,
    t: &mut dyn Transport,
    layers: Range<usize>,
    n_ctx: usize,
) -> Result<StageStats> {
    let (me, n) = (t.stage(), t.n_stages());
    if me == 0 || me >= n {
        return Err(Error::Invalid(format!(
            "stage {me} of {n} cannot serve: stage 0 drives the pipeline"
        )));
    }
    let last = me + 1 == n;
    let mut state = State::for_layers(model, n_ctx, layers)?;
    let mut hidden = Vec::new();
    let mut gathered = Vec::new();
    let mut scores = Vec::new();
    let mut stats = StageStats::default();
    loop {
        match t.recv(me - 1)? {
            Message::Forward { header, hidden: x } => {
                let t0 = Instant::now();
                if header.reset {
                    state.reset();
                    gathered.clear();
                }
                if x.len() != header.n_tokens * model.config.n_embd {
                    return Err(Error::Model(format!(
                        "stage {me}: a micro-batch of {} positions came with {} values",
                        header.n_tokens,
                        x.len()
                    )));
                }
                if last && header.score {
                    model.forward_hidden(&mut state, Batch::Hidden(&x), &mut hidden)?;
                    stats.busy += t0.elapsed();
                    stats.micro_batches += 1;
                    // The micro-batch's scored rows, a slice at a time: one slice's base
                    // records in, one slice's results out.
                    loop {
                        let (how, first, targets, base, more) = match t.recv(0)? {
                            Message::Score {
                                how,
                                first,
                                targets,
                                base,
                                more,
                            } => (how, first, targets, base, more),
                            other => {
                                return Err(Error::Model(format!(
                                    "stage {me}: expected the rows to score from stage 0, got {}",
                                    other.kind()
                                )))
                            }
                        };
                        let t0 = Instant::now();
                        let d = model.config.n_embd;
                        crate::eval::perplexity::check_scored_rows(
                            header.n_tokens,
                            first,
                            targets.len(),
                        )?;
                        let rows = &hidden[first * d..(first + targets.len()) * d];
                        scores.clear();
                        score_hidden(model, &mut state, rows, how, &targets, &base, &mut scores)?;
                        drop(base);
                        stats.busy += t0.elapsed();
                        t.send(0, Message::Scores(scores.clone()))?;
                        if !more {
                            break;
                        }
                    }
                    continue;
                }
                model.forward_stage(&mut state, Batch::Hidden(&x), header.want, &mut hidden)?;
                stats.busy += t0.elapsed();
                stats.micro_batches += 1;
                if last {
                    gathered.extend_from_slice(&state.logits);
                    if header.reply {
                        t.send(0, Message::Logits(std::mem::take(&mut gathered)))?;
                    }
                } else {
                    // The received buffer becomes the next one to fill: no allocation per step.
                    let out = std::mem::replace(&mut hidden, x);
                    t.send(
                        me + 1,
                        Message::Forward {
                            header,
                            hidden: out,
                        },
                    )?;
                }
            }
            Message::Stop => {
                if !last {
                    t.send(me + 1, Message::Stop)?;
                }
                return Ok(stats);
            }
            other => {
                return Err(Error::Model(format!(
                    "stage {me}: {} arrived from stage {}, which sends hidden states",
                    other.kind(),
                    me - 1
                )))
            }
        }
    }
}
