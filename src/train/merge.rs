//! `pare merge`: folds LoRA adapters into a GGUF base, `W' = W + s·B·A`, and re-quantizes each
//! adapted matrix to the base's own format for that tensor (or every linear weight to one chosen
//! format), writing a new GGUF. Tensors without an adapter are copied byte for byte.
//!
//! Under quantization-aware training the adapters were trained against exactly this re-quantization
//! (same quantizer and method, [`crate::train::fake_quant`]), so the merged file computes what the
//! training's forward pass computed.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::convert::{
    self, role, write, ConvertOptions, GgufSource, Planned, Progress, Report, Source, SourceTensor,
};
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::format::gguf_writer::TensorSpec;
use crate::model::lora::{Lora, Target};
use crate::quant::quantize::{can_quantize, Method};
use crate::quant::{format, GgmlType};

/// llama.cpp's tensor name of an adapter target.
fn gguf_name(layer: usize, t: Target) -> String {
    let part = match t {
        Target::Q => "attn_q",
        Target::K => "attn_k",
        Target::V => "attn_v",
        Target::O => "attn_output",
        Target::Gate => "ffn_gate",
        Target::Up => "ffn_up",
        Target::Down => "ffn_down",
    };
    format!("blk.{layer}.{part}.weight")
}

/// A base model with adapters folded in, as a conversion source.
pub struct MergedSource<'a> {
    base: GgufSource,
    lora: &'a Lora,
}

impl MergedSource<'_> {
    fn adapter_of(&self, name: &str) -> Option<&crate::model::lora::Adapter> {
        (0..self.lora.layers.len()).find_map(|l| {
            Target::ALL
                .into_iter()
                .find(|&t| gguf_name(l, t) == name)
                .and_then(|t| self.lora.adapter(l, t))
        })
    }
}

impl Source for MergedSource<'_> {
    fn describe(&self) -> String {
        format!("{} + adapters", self.base.describe())
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        self.base.metadata()
    }

    fn tensors(&self) -> &[SourceTensor] {
        self.base.tensors()
    }

    fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let mut w = self.base.read_f32(name)?;
        if let Some(ad) = self.adapter_of(name) {
            if w.len() != ad.rows * ad.cols {
                return Err(Error::Model(format!(
                    "{name}: {} values but the adapter is {}x{}",
                    w.len(),
                    ad.rows,
                    ad.cols
                )));
            }
            let mut delta = vec![0.0f32; w.len()];
            ad.delta(self.lora.scale(), &mut delta);
            for (a, d) in w.iter_mut().zip(&delta) {
                *a += d;
            }
        }
        Ok(w)
    }

    fn stored_bytes(&self, name: &str) -> Option<&[u8]> {
        match self.adapter_of(name) {
            Some(_) => None,
            None => self.base.stored_bytes(name),
        }
    }
}

/// Merges `lora` into the GGUF at `base` and writes `out`. `format`: `None` re-quantizes each
/// adapted matrix to its own stored format and copies the rest; `Some(f)` converts every linear
/// weight (and the embeddings) to `f`, as `pare convert` does.
pub fn merge(
    base: &Path,
    lora: &Lora,
    out: &Path,
    format: Option<GgmlType>,
    method: Method,
    cancel: Option<&AtomicBool>,
    progress: impl FnMut(Progress),
) -> Result<Report> {
    if base.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: pare merge needs a GGUF base (convert the checkpoint first)",
            base.display()
        )));
    }
    let src = MergedSource {
        base: GgufSource::open(base)?,
        lora,
    };
    // Every adapter must land on a tensor of the base.
    for (l, layer) in lora.layers.iter().enumerate() {
        for t in Target::ALL {
            if layer[t as usize].is_some()
                && !src.tensors().iter().any(|s| s.name == gguf_name(l, t))
            {
                return Err(Error::Model(format!(
                    "{}: the adapters need tensor {} which the base lacks",
                    base.display(),
                    gguf_name(l, t)
                )));
            }
        }
    }
    let opts = ConvertOptions {
        method,
        cancel,
        ..ConvertOptions::new(format.unwrap_or(GgmlType::F32))
    };
    if format.is_some() {
        return convert::convert(&src, out, &opts, progress);
    }
    let planned = src
        .tensors()
        .iter()
        .map(|t| {
            let cols = t.dims.first().copied().unwrap_or(1) as usize;
            let stored = t.stored.ok_or_else(|| {
                Error::Model(format!(
                    "{}: tensor {} has no stored type",
                    base.display(),
                    t.name
                ))
            })?;
            let adapted = src.adapter_of(&t.name).is_some();
            if adapted && !can_quantize(stored) {
                return Err(Error::UnsupportedType(format!(
                    "{}: pare cannot re-quantize to {}; give --format",
                    t.name,
                    format::name(stored)
                )));
            }
            let ty = if adapted {
                format::storage_type(stored, cols)
            } else {
                stored
            };
            let spec = TensorSpec::new(t.name.clone(), &t.dims, ty);
            spec.n_bytes()?;
            Ok(Planned {
                spec,
                role: role(&t.name, &t.dims),
                copied: !adapted,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = src.metadata();
    write(
        &src,
        out,
        &planned,
        &meta,
        opts.method,
        &|_| None,
        opts.cancel,
        progress,
    )
}
