//! Uniform conversion: every linear weight of a model re-quantized to one format, the token
//! embeddings to another (or the same), everything else kept as it is. This is `pare convert`, the
//! baseline that per-tensor allocation is measured against.
//!
//! The source is anything that can list named tensors, give each as f32 and hand over metadata
//! ([`Source`]); today a GGUF file ([`GgufSource`]), later a Hugging Face directory. The output is
//! written through [`GgufWriter`], one tensor at a time: the source tensor is dequantized, quantized
//! to its target type and streamed out, so memory holds one tensor (in f32 and quantized) at a time.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use crate::error::{Error, Result};
use crate::format::gguf::{Gguf, Value};
use crate::format::gguf_writer::{
    self, GgufWriter, TensorSpec, FORMAT_VERSION, FORMAT_VERSION_KEY,
};
use crate::quant::dequant::dequantize_tensor;
use crate::quant::quantize::{can_quantize, quantize_rows, Method, Options};
use crate::quant::{format, GgmlType};

/// Metadata key naming the format a model was converted to (`q4_0`, `q3_g64`).
pub const FORMAT_KEY: &str = "pare.format";
/// ggml's quantization version (`GGML_QNT_VERSION`), which llama.cpp records in quantized files.
const QNT_VERSION: u32 = 2;

/// One tensor of a source model.
#[derive(Debug, Clone)]
pub struct SourceTensor {
    pub name: String,
    /// ggml order: `dims[0]` is the row length.
    pub dims: Vec<u64>,
    /// The ggml type the source stores it in, when it has one (a GGUF does; safetensors may not).
    pub stored: Option<GgmlType>,
}

/// A model to convert from: metadata in GGUF's terms and named tensors.
pub trait Source: Send + Sync {
    /// What to name in messages (a path).
    fn describe(&self) -> String;
    /// GGUF metadata for the output (llama.cpp's keys).
    fn metadata(&self) -> Vec<(String, Value)>;
    fn tensors(&self) -> &[SourceTensor];
    /// The tensor's values in f32, in ggml order (row after row).
    fn read_f32(&self, name: &str) -> Result<Vec<f32>>;
    /// The tensor's stored bytes, when the source holds it in a ggml type (`stored`), to be copied
    /// unchanged.
    fn stored_bytes(&self, name: &str) -> Option<&[u8]>;
    /// The tensor already quantized to `ty` by the source itself, when it has its own way to
    /// (adapters merged onto the grid they were trained against); `None`: [`write`] quantizes
    /// [`Source::read_f32`].
    fn quantized(&self, _name: &str, _ty: GgmlType) -> Option<Result<Vec<u8>>> {
        None
    }
}

/// The source at `path`, as `pare::model::Model::load` reads it: a GGUF file (tensors copied or
/// re-quantized as stored), or a Hugging Face checkpoint directory ([`ModelSource`]).
pub fn open_source(path: &Path) -> Result<Box<dyn Source>> {
    if path.is_dir() {
        return Ok(Box::new(ModelSource::new(crate::model::Model::load(
            path,
        )?)?));
    }
    Ok(Box::new(GgufSource::open(path)?))
}

/// A loaded model as a conversion source, under llama.cpp's tensor names: how a Hugging Face
/// checkpoint becomes a GGUF. Metadata comes from [`crate::model::Model::gguf_metadata`]; Llama
/// query/key rows, which such a checkpoint holds in split-halves order, are put back in the
/// adjacent-pairs order llama.cpp's converter writes.
pub struct ModelSource {
    model: crate::model::Model,
    metadata: Vec<(String, Value)>,
    tensors: Vec<SourceTensor>,
}

enum ModelTensor<'a> {
    Matrix(&'a crate::quant::matmul::QMatrix, bool),
    Vector(&'a [f32]),
}

impl ModelSource {
    pub fn new(model: crate::model::Model) -> Result<ModelSource> {
        let metadata = model.gguf_metadata()?;
        let mut s = ModelSource {
            model,
            metadata,
            tensors: Vec::new(),
        };
        s.tensors = s
            .named()
            .into_iter()
            .map(|(name, t)| SourceTensor {
                name,
                dims: match t {
                    ModelTensor::Matrix(m, _) => vec![m.cols as u64, m.rows as u64],
                    ModelTensor::Vector(v) => vec![v.len() as u64],
                },
                stored: None,
            })
            .collect();
        Ok(s)
    }

    /// Every tensor under its GGUF name, in llama.cpp's order.
    fn named(&self) -> Vec<(String, ModelTensor<'_>)> {
        let w = &self.model.weights;
        let mut v = vec![(
            "token_embd.weight".to_string(),
            ModelTensor::Matrix(&w.token_embd, false),
        )];
        for (i, l) in w.layers.iter().enumerate() {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            v.push((n("attn_norm"), ModelTensor::Vector(&l.attn_norm)));
            v.push((n("attn_q"), ModelTensor::Matrix(&l.wq, true)));
            v.push((n("attn_k"), ModelTensor::Matrix(&l.wk, true)));
            v.push((n("attn_v"), ModelTensor::Matrix(&l.wv, false)));
            v.push((n("attn_output"), ModelTensor::Matrix(&l.wo, false)));
            if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
                v.push((n("attn_q_norm"), ModelTensor::Vector(q)));
                v.push((n("attn_k_norm"), ModelTensor::Vector(k)));
            }
            v.push((n("ffn_norm"), ModelTensor::Vector(&l.ffn_norm)));
            v.push((n("ffn_gate"), ModelTensor::Matrix(&l.gate, false)));
            v.push((n("ffn_up"), ModelTensor::Matrix(&l.up, false)));
            v.push((n("ffn_down"), ModelTensor::Matrix(&l.down, false)));
        }
        v.push((
            "output_norm.weight".to_string(),
            ModelTensor::Vector(&w.output_norm),
        ));
        if !self.model.weights.tied_output() {
            v.push((
                "output.weight".to_string(),
                ModelTensor::Matrix(&w.output, false),
            ));
        }
        v
    }
}

impl Source for ModelSource {
    fn describe(&self) -> String {
        self.model.source.path().display().to_string()
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        self.metadata.clone()
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let named = self.named();
        let (_, t) = named
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| Error::Model(format!("{}: no tensor {name:?}", self.describe())))?;
        match t {
            ModelTensor::Vector(v) => Ok(v.to_vec()),
            ModelTensor::Matrix(m, rope_rows) => {
                let permute = *rope_rows && self.model.qk_rows_need_gguf_permutation();
                let order = permute.then(|| {
                    crate::format::hf::adjacent_from_halves_rows(m.rows, self.model.config.head_dim)
                });
                let mut out = vec![0f32; m.rows * m.cols];
                for (r, row) in out.chunks_exact_mut(m.cols.max(1)).enumerate() {
                    m.dequantize_row(order.as_ref().map_or(r, |o| o[r]), row)?;
                }
                Ok(out)
            }
        }
    }

    fn stored_bytes(&self, _name: &str) -> Option<&[u8]> {
        None
    }
}

/// A GGUF file as a conversion source.
pub struct GgufSource {
    gguf: Gguf,
    tensors: Vec<SourceTensor>,
}

impl GgufSource {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufSource> {
        Ok(GgufSource::new(Gguf::open(path)?))
    }

    pub fn new(gguf: Gguf) -> GgufSource {
        let tensors = gguf
            .tensors
            .iter()
            .map(|t| SourceTensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                stored: Some(t.ggml_type),
            })
            .collect();
        GgufSource { gguf, tensors }
    }

    fn info(&self, name: &str) -> Result<&crate::format::TensorInfo> {
        self.gguf.tensor(name).ok_or_else(|| {
            Error::Model(format!("{}: no tensor {name:?}", self.gguf.path.display()))
        })
    }
}

impl Source for GgufSource {
    fn describe(&self) -> String {
        self.gguf.path.display().to_string()
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        self.gguf.metadata.clone()
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        dequantize_tensor(&self.gguf, self.info(name)?).map_err(|e| {
            Error::Model(format!(
                "{}: tensor {name:?}: {e}",
                self.gguf.path.display()
            ))
        })
    }

    fn stored_bytes(&self, name: &str) -> Option<&[u8]> {
        self.gguf.tensor(name).map(|t| self.gguf.tensor_data(t))
    }
}

/// What a tensor is, for conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Role {
    /// One of the seven matrices of a transformer block, or the output head: takes `--format`.
    Linear,
    /// The token embeddings: takes `--embeddings`.
    Embeddings,
    /// Norms, biases and anything else: copied as stored.
    Keep,
}

/// The matrices of a block, by llama.cpp's names (`blk.N.NAME.weight`).
const BLOCK_LINEAR: [&str; 7] = [
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// A tensor's role from its name and shape (a matrix name with one dimension is kept as it is).
pub fn role(name: &str, dims: &[u64]) -> Role {
    if dims.len() < 2 {
        return Role::Keep;
    }
    if name == "token_embd.weight" {
        return Role::Embeddings;
    }
    if name == "output.weight" {
        return Role::Linear;
    }
    let block_matrix = name
        .strip_prefix("blk.")
        .and_then(|rest| rest.split_once('.'))
        .filter(|(layer, _)| !layer.is_empty() && layer.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|(_, rest)| rest.strip_suffix(".weight"))
        .is_some_and(|m| BLOCK_LINEAR.contains(&m));
    if block_matrix {
        Role::Linear
    } else {
        Role::Keep
    }
}

/// Options of a conversion.
#[derive(Debug, Clone, Copy)]
pub struct ConvertOptions<'a> {
    /// The format of every linear weight.
    pub format: GgmlType,
    /// The format of the token embeddings (`None`: `format`).
    pub embeddings: Option<GgmlType>,
    pub method: Method,
    /// Checked between tensors: once true, the conversion stops with [`Error::Interrupted`] and
    /// leaves no output.
    pub cancel: Option<&'a AtomicBool>,
}

impl ConvertOptions<'_> {
    pub fn new(format: GgmlType) -> Self {
        ConvertOptions {
            format,
            embeddings: None,
            method: Method::default(),
            cancel: None,
        }
    }
}

/// One tensor of the output and how it is made.
#[derive(Debug, Clone)]
pub struct Planned {
    pub spec: TensorSpec,
    pub role: Role,
    /// Copied from the source's stored bytes (rather than quantized from f32).
    pub copied: bool,
}

/// Progress after each tensor.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub done: usize,
    pub total: usize,
    pub tensor: &'a Planned,
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Report {
    pub path: PathBuf,
    pub file_bytes: u64,
    pub tensors: Vec<Planned>,
    /// Weights (elements) and data bytes over all tensors.
    pub n_weights: u64,
    pub data_bytes: u64,
    /// Weights and data bytes of the linear weights only.
    pub linear_weights: u64,
    pub linear_bytes: u64,
}

impl Report {
    /// Bits per weight over every tensor (embeddings and norms included).
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.data_bytes as f64 / self.n_weights.max(1) as f64
    }

    /// Bits per weight of the linear weights.
    pub fn linear_bits_per_weight(&self) -> f64 {
        8.0 * self.linear_bytes as f64 / self.linear_weights.max(1) as f64
    }
}

fn check_format(ty: GgmlType, what: &str) -> Result<()> {
    if can_quantize(ty) {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "pare cannot write {what} as {}",
            format::name(ty)
        )))
    }
}

/// The output's tensors: every source tensor, in source order, with its output type.
pub fn plan(src: &dyn Source, opts: &ConvertOptions) -> Result<Vec<Planned>> {
    check_format(opts.format, "the linear weights")?;
    let emb = opts.embeddings.unwrap_or(opts.format);
    check_format(emb, "the token embeddings")?;
    src.tensors()
        .iter()
        .map(|t| {
            let role = role(&t.name, &t.dims);
            let cols = t.dims.first().copied().unwrap_or(1) as usize;
            let (ty, copied) = match (role, t.stored) {
                (Role::Linear, _) => (format::storage_type(opts.format, cols), false),
                (Role::Embeddings, _) => (format::storage_type(emb, cols), false),
                (Role::Keep, Some(stored)) => (stored, true),
                // A source without a ggml type (safetensors) gives f32 for what is kept.
                (Role::Keep, None) => (GgmlType::F32, false),
            };
            let spec = TensorSpec::new(t.name.clone(), &t.dims, ty);
            spec.n_bytes()?;
            Ok(Planned { spec, role, copied })
        })
        .collect()
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) for a model whose linear weights are all `ty`;
/// `None` for types it has no value for (pare's own formats).
pub fn llama_ftype(ty: GgmlType) -> Option<u32> {
    Some(match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::BF16 => 32,
        GgmlType::Q1_0 => 40,
        _ => return None,
    })
}

/// The output's metadata: the source's, with the file type, pare's format keys (`pare.format` set
/// to `label`: a format name, or `mixed` for a per-tensor plan) and the quantization version brought
/// up to date.
pub fn output_metadata(src: &dyn Source, planned: &[Planned], label: &str) -> Vec<(String, Value)> {
    let mut meta = src.metadata();
    // llama.cpp reads general.file_type only to print it ("mostly Q4_0"), and guesses one from the
    // tensors when the key is absent; a stale value would mislead, so it is set where the linear
    // weights share one type llama.cpp names and removed otherwise.
    let mut linear = planned
        .iter()
        .filter(|p| p.role == Role::Linear)
        .map(|p| p.spec.ggml_type);
    let uniform = linear
        .next()
        .filter(|first| linear.all(|t| t == *first))
        .and_then(llama_ftype);
    meta.retain(|(k, _)| k != "general.file_type");
    if let Some(ft) = uniform {
        gguf_writer::set(&mut meta, "general.file_type", Value::U32(ft));
    }
    let quantized = planned.iter().any(|p| {
        !p.copied
            && !matches!(
                p.spec.ggml_type,
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16
            )
    });
    if quantized
        && !meta
            .iter()
            .any(|(k, _)| k == "general.quantization_version")
    {
        meta.push((
            "general.quantization_version".into(),
            Value::U32(QNT_VERSION),
        ));
    }
    gguf_writer::set(&mut meta, FORMAT_VERSION_KEY, Value::U32(FORMAT_VERSION));
    gguf_writer::set(&mut meta, FORMAT_KEY, Value::String(label.to_string()));
    meta
}

/// Converts `src` and writes the result to `out` (atomically: see [`GgufWriter`]). `progress` is
/// called after each tensor.
pub fn convert(
    src: &dyn Source,
    out: &Path,
    opts: &ConvertOptions,
    progress: impl FnMut(Progress),
) -> Result<Report> {
    let planned = plan(src, opts)?;
    let meta = output_metadata(src, &planned, &format::name(opts.format));
    write(
        src,
        out,
        &planned,
        &meta,
        opts.method,
        &|_| None,
        opts.cancel,
        progress,
    )
}

/// Writes `planned` (every tensor of `src` with its output type) to `out` with metadata `meta`:
/// each tensor is read in f32 and quantized with `method`, weighing columns by
/// `importance(name)` when that gives a vector, or copied when planned so. Atomic, cancellable
/// between tensors, `progress` called after each.
#[allow(clippy::too_many_arguments)]
pub fn write(
    src: &dyn Source,
    out: &Path,
    planned: &[Planned],
    meta: &[(String, Value)],
    method: Method,
    importance: &dyn Fn(&str) -> Option<Vec<f32>>,
    cancel: Option<&AtomicBool>,
    mut progress: impl FnMut(Progress),
) -> Result<Report> {
    let specs: Vec<TensorSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let mut w = GgufWriter::create(out, meta, &specs, cancel)?;
    let (mut n_weights, mut data_bytes, mut linear_weights, mut linear_bytes) = (0, 0, 0, 0);
    for (i, p) in planned.iter().enumerate() {
        let name = &p.spec.name;
        let n_bytes = p.spec.n_bytes()?;
        if p.copied {
            let bytes = src.stored_bytes(name).ok_or_else(|| {
                Error::Model(format!(
                    "{}: no stored data for tensor {name:?}",
                    src.describe()
                ))
            })?;
            w.write_tensor(name, bytes)?;
        } else if let Some(q) = src.quantized(name, p.spec.ggml_type) {
            w.write_tensor(name, &q?)?;
        } else {
            let x = src.read_f32(name)?;
            let row_len = p.spec.dims[0] as usize;
            let imp = importance(name).filter(|v| v.len() == row_len);
            let qopts = Options {
                method,
                importance: imp.as_deref(),
            };
            let mut q = vec![0u8; n_bytes as usize];
            quantize_rows(p.spec.ggml_type, &x, row_len, &qopts, &mut q).map_err(|e| {
                Error::Model(format!(
                    "tensor {name:?} to {}: {e}",
                    format::name(p.spec.ggml_type)
                ))
            })?;
            drop(x);
            w.write_tensor(name, &q)?;
        }
        let n: u64 = p.spec.dims.iter().product();
        n_weights += n;
        data_bytes += n_bytes;
        if p.role == Role::Linear {
            linear_weights += n;
            linear_bytes += n_bytes;
        }
        progress(Progress {
            done: i + 1,
            total: planned.len(),
            tensor: p,
        });
    }
    let file_bytes = w.finish()?;
    Ok(Report {
        path: out.to_path_buf(),
        file_bytes,
        tensors: planned.to_vec(),
        n_weights,
        data_bytes,
        linear_weights,
        linear_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_follow_llama_cpp_names() {
        assert_eq!(role("blk.3.attn_q.weight", &[576, 576]), Role::Linear);
        assert_eq!(role("blk.12.ffn_down.weight", &[1536, 576]), Role::Linear);
        assert_eq!(role("output.weight", &[576, 49152]), Role::Linear);
        assert_eq!(role("token_embd.weight", &[576, 49152]), Role::Embeddings);
        assert_eq!(role("blk.3.attn_norm.weight", &[576]), Role::Keep);
        assert_eq!(role("blk.3.attn_q.bias", &[576]), Role::Keep);
        assert_eq!(role("blk.x.attn_q.weight", &[576, 576]), Role::Keep);
        assert_eq!(role("blk.3.attn_q_norm.weight", &[64]), Role::Keep);
        assert_eq!(role("rope_freqs.weight", &[32]), Role::Keep);
    }
}
