//! The generation loop: prompt in one batch, then one token at a time through the sampler,
//! streamed as text, until an end-of-generation token, a stop string or the token limit.

use std::time::Instant;

use super::sampling::{Sampler, SamplingParams};
use super::stop::StopMatcher;
use crate::error::{Error, Result};
use crate::format::tokenizer::Tokenizer;
use crate::model::{Logits, Model, State};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub n_predict: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these (it is not printed).
    pub stop: Vec<String>,
    /// Context size; default: prompt + n_predict, capped at the model's training context.
    pub n_ctx: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    StopString,
    /// `n_predict` tokens were generated.
    Length,
    /// The context is full.
    ContextFull,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
    pub stop_reason: StopReason,
}

impl GenerateStats {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_seconds.max(1e-9)
    }
    pub fn generation_tps(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_seconds.max(1e-9)
    }
}

/// What generation runs the model on: a [`State`] in this process, or a pipeline of stages.
pub trait Forward {
    /// Runs `tokens` after the positions already cached, leaving the last one's logits.
    fn forward_last(&mut self, tokens: &[u32]) -> Result<()>;
    /// The logits of the last position run.
    fn logits(&self) -> &[f32];
    /// Positions cached.
    fn pos(&self) -> usize;
}

struct Local<'a> {
    model: &'a Model,
    state: State,
}

impl Forward for Local<'_> {
    fn forward_last(&mut self, tokens: &[u32]) -> Result<()> {
        self.model.forward(&mut self.state, tokens, Logits::Last)
    }
    fn logits(&self) -> &[f32] {
        &self.state.logits
    }
    fn pos(&self) -> usize {
        self.state.pos
    }
}

/// The context a generation needs: `opts.n_ctx`, else prompt + n_predict capped at the model's
/// training context; never less than the prompt.
pub fn context_size(model: &Model, prompt: &[u32], opts: &GenerateOptions) -> usize {
    opts.n_ctx
        .unwrap_or_else(|| (prompt.len() + opts.n_predict).min(model.config.n_ctx_train))
        .max(prompt.len())
}

/// Generates from `prompt` (token ids), calling `on_text` with each piece of text as it becomes
/// final. Returns the generated ids (the end-of-generation token excluded) and statistics.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<(Vec<u32>, GenerateStats)> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    let n_ctx = context_size(model, prompt, opts);
    let mut local = Local {
        model,
        state: State::new(model, n_ctx)?,
    };
    generate_on(&mut local, n_ctx, tok, prompt, opts, on_text)
}

/// [`generate`] on any [`Forward`] (a pipeline of stages) whose caches hold `n_ctx` positions.
pub fn generate_on(
    state: &mut dyn Forward,
    n_ctx: usize,
    tok: &Tokenizer,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<(Vec<u32>, GenerateStats)> {
    if prompt.is_empty() {
        return Err(Error::Invalid("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(opts.sampling.clone())?;
    let mut history: Vec<u32> = prompt.to_vec();
    let mut stream = tok.stream_decoder();
    let mut stops = StopMatcher::new(opts.stop.iter().cloned());

    let t0 = Instant::now();
    state.forward_last(prompt)?;
    let prompt_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut generated = Vec::new();
    let reason = loop {
        if generated.len() >= opts.n_predict {
            break StopReason::Length;
        }
        let next = sampler.sample(state.logits(), &history);
        if tok.is_eog(next) {
            break StopReason::EndOfGeneration;
        }
        generated.push(next);
        history.push(next);
        let out = stops.push(&stream.push(next)?);
        on_text(&out.text)?;
        if out.stopped.is_some() {
            break StopReason::StopString;
        }
        if generated.len() >= opts.n_predict {
            break StopReason::Length;
        }
        if state.pos() >= n_ctx {
            break StopReason::ContextFull;
        }
        state.forward_last(&[next])?;
    };
    if reason != StopReason::StopString {
        let tail = stops.push(&stream.finish());
        on_text(&tail.text)?;
        on_text(&stops.finish())?;
    }
    let stats = GenerateStats {
        prompt_tokens: prompt.len(),
        generated_tokens: generated.len(),
        prompt_seconds,
        generation_seconds: t1.elapsed().as_secs_f64(),
        stop_reason: reason,
    };
    Ok((generated, stats))
}
