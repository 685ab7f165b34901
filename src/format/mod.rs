//! Model files: GGUF reading and writing, Hugging Face checkpoint directories (safetensors), the
//! tokenizer and chat template stored in them.

pub mod chat_template;
pub mod gguf;
pub mod gguf_writer;
pub mod hf;
pub mod safetensors;
pub mod tokenizer;

pub use gguf::{Gguf, TensorInfo, Value};
pub use gguf_writer::{GgufWriter, TensorSpec};
