//! The model as a [`LogitsEval`]: each chunk from an empty KV cache; scoring computes the logits
//! of the scored rows only, a few at a time.

use super::perplexity::{check_scored_rows, LogitsEval};
use super::score::{score_streamed, Reduce, Rows};
use crate::error::Result;
use crate::model::{Batch, Logits, Model, State};

pub struct ModelEval<'a> {
    model: &'a Model,
    state: State,
    hidden: Vec<f32>,
}

impl<'a> ModelEval<'a> {
    /// An evaluator for chunks of up to `n_ctx` tokens.
    pub fn new(model: &'a Model, n_ctx: usize) -> Result<Self> {
        Ok(ModelEval {
            model,
            state: State::new(model, n_ctx)?,
            hidden: Vec::new(),
        })
    }
}

impl LogitsEval for ModelEval<'_> {
    fn n_vocab(&self) -> usize {
        self.model.config.n_vocab
    }

    fn eval_chunk(&mut self, tokens: &[u32], logits: &mut Vec<f32>) -> Result<()> {
        self.state.reset();
        self.model.forward(&mut self.state, tokens, Logits::All)?;
        std::mem::swap(logits, &mut self.state.logits);
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
        self.state.reset();
        let m = self.model;
        m.forward_hidden(&mut self.state, Batch::Tokens(tokens), &mut self.hidden)?;
        let d = m.config.n_embd;
        let h = &self.hidden[first * d..(first + targets.len()) * d];
        score_streamed(m, &mut self.state, h, how, targets, rows)
    }
}
