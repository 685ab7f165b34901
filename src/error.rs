//! The library's error type. Every failure names what was wrong and where, so a user can act on it.

use std::path::PathBuf;

/// Everything that can go wrong in the library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that is not well-formed: truncated, bad magic, absurd counts, data out of range.
    #[error("malformed GGUF: {0}")]
    Gguf(String),
    /// A tensor type the library does not know or cannot compute with.
    #[error("unsupported tensor type: {0}")]
    UnsupportedType(String),
    /// Model metadata or tensors that do not describe a model pare can run.
    #[error("model: {0}")]
    Model(String),
    /// A safetensors file that is not well-formed (the message names the file).
    #[error("malformed safetensors: {0}")]
    Safetensors(String),
    /// A Hugging Face checkpoint directory that pare cannot load (the message names the file).
    #[error("Hugging Face checkpoint: {0}")]
    HfDir(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    /// A bad option or argument from the user.
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("interrupted")]
    Interrupted,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
