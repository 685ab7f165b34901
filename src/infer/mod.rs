//! Text generation: turning logits into tokens and tokens into a text stream.
//!
//! [`sampling`] picks the next token from a row of logits (llama.cpp's sampler chain: repetition
//! penalty, top-k, top-p, min-p, temperature, seeded draw); [`stop`] watches the streamed text for
//! stop strings.

pub mod generate;
pub mod sampling;
pub mod stop;
