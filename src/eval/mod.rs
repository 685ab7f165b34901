//! Quality measurement: perplexity and KL divergence the way llama.cpp's `llama-perplexity` measures
//! them.
//!
//! [`perplexity`] holds the chunking and scoring (model-agnostic, through [`perplexity::LogitsEval`]);
//! [`kl`] saves a base model's token distributions and compares another model against them.

pub mod kl;
pub mod perplexity;
