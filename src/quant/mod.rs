//! Weight formats: ggml's storage types, dequantization and the compute kernels on packed weights.

pub mod activation;
pub mod dequant;
pub mod format;
pub mod ggml_type;
pub mod kernels;
pub mod matmul;
pub mod pq;
pub mod quantize;
pub mod transposed;

pub use ggml_type::GgmlType;
pub use pq::Pq;
