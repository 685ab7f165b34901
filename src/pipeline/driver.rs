//! Stage 0, which drives a pipeline: it embeds the tokens and runs the first layers one
//! micro-batch at a time, sending each on as soon as it is done (so the stages work on different
//! micro-batches at once), then waits for the last stage's logits. Perplexity and generation see
//! it as a model: [`LogitsEval`] and [`crate::infer::generate::Forward`].

use std::ops::Range;
use std::time::{Duration, Instant};

use super::schedule::{forward_only, Step};
use super::stage::StageStats;
use super::transport::{Header, Message, Transport};
use crate::error::{Error, Result};
use crate::eval::perplexity::LogitsEval;
use crate::model::{Batch, Logits, Model, State};

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
            };
            let t0 = Instant::now();
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
                let hidden = std::mem::take(&mut self.hidden);
                self.t.send(1, Message::Forward { header, hidden })?;
            }
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
        // A chunk's logits are large (512 x 49152 floats = 96 MiB): free the caller's previous
        // buffer and ours before the next arrives, so that one is alive at a time, not three.
        *logits = Vec::new();
        self.forward(tokens, true, Logits::All)?;
        std::mem::swap(logits, &mut self.logits);
        Ok(())
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
