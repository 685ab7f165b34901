//! Fine-tuning: LoRA adapters trained through the frozen quantized model ([`crate::model::backward`]),
//! optionally quantization-aware, with gradient checkpointing, within a memory budget.

pub mod checkpointing;
pub mod data;
pub mod fake_quant;
pub mod memory;
pub mod merge;
pub mod optimizer;
pub mod trainer;
