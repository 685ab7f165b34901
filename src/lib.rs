//! pare: fit a language model to a memory budget, adapt it, and run it fast.
//!
//! The crate is organised by layers (see DESIGN.md): [`format`] reads model files, [`quant`] holds the
//! weight formats and their kernels, [`model`] is the transformer, [`infer`] generates text and
//! [`eval`] measures perplexity and speed. The `pare` binary is a thin CLI over these.

pub mod atomic_file;
pub mod convert;
pub mod error;
pub mod eval;
pub mod export;
pub mod format;
pub mod infer;
pub mod model;
pub mod parallel;
pub mod pipeline;
pub mod plan;
pub mod plot;
pub mod quant;
pub mod train;

pub use error::{Error, Result};
