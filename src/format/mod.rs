//! Model files: GGUF reading, the tokenizer and chat template stored in them.

pub mod chat_template;
pub mod gguf;
pub mod tokenizer;

pub use gguf::{Gguf, TensorInfo, Value};
