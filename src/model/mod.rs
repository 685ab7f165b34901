//! The transformer: configuration, weights, KV cache and the one forward pass that inference,
//! evaluation and training all use.

pub mod backward;
pub mod config;
pub mod dense;
pub mod forward;
pub mod gguf_metadata;
pub mod kv_cache;
pub mod lora;
pub mod ops;
pub mod sparse_ffn;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

pub use config::{Arch, Config, RopeStyle};
pub use forward::{Batch, Logits, Observer, State};
pub use kv_cache::{KvCache, KvType};
pub use lora::{Lora, LoraConfig, Target};
pub use weights::{LayerWeights, TensorSource, Weights};

use crate::error::Result;
use crate::format::chat_template::ChatTemplate;
use crate::format::hf::HfCheckpoint;
use crate::format::tokenizer::Tokenizer;
use crate::format::Gguf;

/// Where a model was loaded from; its tokenizer and chat template come from the same place.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A GGUF file.
    Gguf(Arc<Gguf>),
    /// A Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json).
    Hf(Arc<HfCheckpoint>),
}

impl ModelSource {
    /// The file or directory the model came from.
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(g) => &g.path,
            ModelSource::Hf(h) => &h.dir,
        }
    }
}

/// A loaded model: its configuration and weights (mapped from the file, not copied).
pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub source: ModelSource,
    /// Compute every product in f32 on dequantized weights instead of on 8-bit activations: the
    /// slow reference path (the default, like llama.cpp, quantizes activations).
    pub exact_activations: bool,
    /// Sparse FFN execution, when the file was written by `pare sparsify`.
    pub sparse: Option<sparse_ffn::SparseFfn>,
    /// LoRA adapters applied unmerged in every forward pass (`pare run --lora`).
    pub lora: Option<Arc<Lora>>,
    /// How a fresh state's KV cache stores keys and values (see [`Model::cache_type`]).
    pub kv_type: KvType,
}

impl Model {
    /// Loads a model: a GGUF file, or a Hugging Face checkpoint directory.
    pub fn load(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        if HfCheckpoint::is_checkpoint_dir(path) {
            return Self::from_hf(Arc::new(HfCheckpoint::open(path)?));
        }
        // Lean: the tokenizer's arrays are parsed again when a tokenizer is built, not kept.
        let gguf = Arc::new(Gguf::open_lean(path)?);
        Self::from_gguf(gguf)
    }

    /// As [`Model::load`], with a GGUF file read into memory backed by huge pages
    /// ([`Gguf::open_resident`]) instead of mapped: faster decoding, for a process that computes
    /// with the whole model.
    pub fn load_resident(path: impl AsRef<Path>) -> Result<Model> {
        let path = path.as_ref();
        if HfCheckpoint::is_checkpoint_dir(path) {
            return Self::load(path);
        }
        Self::from_gguf(Arc::new(Gguf::open_resident(path)?))
    }

    pub fn from_gguf(gguf: Arc<Gguf>) -> Result<Model> {
        let config = Config::from_gguf(&gguf)?;
        let weights = Weights::from_gguf(&gguf, &config)?;
        let sparse = sparse_ffn::SparseFfn::from_gguf(&gguf, &config)?;
        Ok(Model {
            config,
            weights,
            source: ModelSource::Gguf(gguf),
            exact_activations: false,
            sparse,
            lora: None,
            kv_type: KvType::default(),
        })
    }

    pub fn from_hf(ck: Arc<HfCheckpoint>) -> Result<Model> {
        let config = Config::from_hf(&ck.config, &ck.config_path())?;
        let weights = Weights::from_source(&*ck, &config)?;
        Ok(Model {
            config,
            weights,
            source: ModelSource::Hf(ck),
            exact_activations: false,
            sparse: None,
            lora: None,
            kv_type: KvType::default(),
        })
    }

    /// The KV cache type of a fresh state: `kv_type`, except f32 on the exact reference path
    /// (`exact_activations`), which keeps every value at full precision.
    pub fn cache_type(&self) -> KvType {
        if self.exact_activations {
            KvType::F32
        } else {
            self.kv_type
        }
    }

    /// The GGUF file, when the model was loaded from one.
    pub fn gguf(&self) -> Option<&Arc<Gguf>> {
        match &self.source {
            ModelSource::Gguf(g) => Some(g),
            ModelSource::Hf(_) => None,
        }
    }

    /// The model's tokenizer: from the GGUF's vocabulary or from `tokenizer.json`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match &self.source {
            ModelSource::Gguf(g) => g.with_complete(Tokenizer::from_gguf),
            ModelSource::Hf(h) => Tokenizer::from_hf(h),
        }
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        match &self.source {
            ModelSource::Gguf(g) => g.with_complete(ChatTemplate::from_gguf),
            ModelSource::Hf(h) => ChatTemplate::from_hf(h),
        }
    }
}
