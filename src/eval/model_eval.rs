//! The model as a [`LogitsEval`]: each chunk from an empty KV cache, logits for every position.

use super::perplexity::LogitsEval;
use crate::error::Result;
use crate::model::{Logits, Model, State};

pub struct ModelEval<'a> {
    model: &'a Model,
    state: State,
}

impl<'a> ModelEval<'a> {
    /// An evaluator for chunks of up to `n_ctx` tokens.
    pub fn new(model: &'a Model, n_ctx: usize) -> Result<Self> {
        Ok(ModelEval {
            model,
            state: State::new(model, n_ctx)?,
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
}
