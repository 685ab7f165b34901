//! Model files: GGUF reading and writing, the tokenizer and chat template stored in them.

pub mod chat_template;
pub mod gguf;
pub mod gguf_writer;
pub mod tokenizer;

pub use gguf::{Gguf, TensorInfo, Value};
pub use gguf_writer::{GgufWriter, TensorSpec};
