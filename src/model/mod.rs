//! The transformer: configuration, weights, KV cache and the one forward pass that inference,
//! evaluation and training all use.

pub mod config;
pub mod forward;
pub mod kv_cache;
pub mod ops;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

pub use config::{Arch, Config, RopeStyle};
pub use forward::{Logits, State};
pub use kv_cache::KvCache;
pub use weights::{LayerWeights, Weights};

use crate::error::Result;
use crate::format::Gguf;

/// A loaded model: its configuration and weights (mapped from the file, not copied).
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub gguf: Arc<Gguf>,
    /// Compute every product in f32 on dequantized weights instead of on 8-bit activations: the
    /// slow reference path (the default, like llama.cpp, quantizes activations).
    pub exact_activations: bool,
}

impl Model {
    /// Loads a GGUF model file.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let gguf = Arc::new(Gguf::open(path)?);
        Self::from_gguf(gguf)
    }

    pub fn from_gguf(gguf: Arc<Gguf>) -> Result<Model> {
        let config = Config::from_gguf(&gguf)?;
        let weights = Weights::from_gguf(&gguf, &config)?;
        Ok(Model {
            config,
            weights,
            gguf,
            exact_activations: false,
        })
    }
}
