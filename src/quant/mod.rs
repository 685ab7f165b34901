//! Weight formats: ggml's storage types, dequantization and the compute kernels on packed weights.

pub mod dequant;
pub mod ggml_type;

pub use ggml_type::GgmlType;
