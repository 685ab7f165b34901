//! Measurement: perplexity and KL divergence the way llama.cpp's `llama-perplexity` measures them,
//! and speed the way `llama-bench` does.
//!
//! [`perplexity`] holds the chunking and scoring (model-agnostic, through [`perplexity::LogitsEval`]);
//! [`kl`] saves a base model's token distributions and compares another model against them;
//! [`score`] reduces scored logits rows where they are computed (a few at a time, on a pipeline's
//! last stage when there are stages), so nobody holds a chunk's logits;
//! [`bench`] measures prompt-processing and generation throughput.

pub mod bench;
pub mod kl;
pub mod model_eval;
pub mod perplexity;
pub mod score;
