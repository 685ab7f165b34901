//! `pare merge`: folds LoRA adapters into a GGUF base, `W' = W + s·B·A`, and re-quantizes each
//! adapted matrix to the base's own format for that tensor (or every linear weight to one chosen
//! format), writing a new GGUF. Tensors without an adapter are copied byte for byte.
//!
//! Adapters trained with quantization-aware training ([`crate::train::fake_quant`]) were trained
//! against `W + s·B·A` rounded onto a fixed grid: the base's own scales and minimums (`ste`,
//! `clipped`) or learned ones (`lsq`). Their merge rounds onto that same grid instead of searching
//! a new one, so the merged file computes exactly what the training's forward pass computed.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::convert::{
    self, role, write, ConvertOptions, GgufSource, Planned, Progress, Report, Source, SourceTensor,
};
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::format::gguf_writer::TensorSpec;
use crate::model::lora::{Lora, Target};
use crate::quant::pq::Pq;
use crate::quant::quantize::{can_quantize, Method};
use crate::quant::{format, GgmlType};
use crate::train::fake_quant::{GroupGrid, QatState};

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
    /// How the adapters were trained: `Some` for QAT (merge onto the trained grid).
    qat: Option<&'a QatState>,
}

impl MergedSource<'_> {
    /// The layer and target of an adapted tensor.
    fn target_of(&self, name: &str) -> Option<(usize, Target)> {
        (0..self.lora.layers.len()).find_map(|l| {
            Target::ALL
                .into_iter()
                .find(|&t| gguf_name(l, t) == name && self.lora.adapter(l, t).is_some())
                .map(|t| (l, t))
        })
    }

    fn adapter_of(&self, name: &str) -> Option<&crate::model::lora::Adapter> {
        self.target_of(name)
            .and_then(|(l, t)| self.lora.adapter(l, t))
    }

    /// The grid a QAT adapter of tensor `name` was trained against, when its output type `ty` is
    /// the base's own format (a chosen `--format` re-quantizes as usual).
    fn grid_of(&self, name: &str, ty: GgmlType) -> Result<Option<GroupGrid>> {
        let (Some(qat), Some((l, t))) = (self.qat, self.target_of(name)) else {
            return Ok(None);
        };
        let Some(st) = self.base.tensors().iter().find(|s| s.name == name) else {
            return Ok(None);
        };
        let (Some(stored), Some(bytes)) = (st.stored, self.base.stored_bytes(name)) else {
            return Ok(None);
        };
        let (Some(p), Some(out)) = (Pq::of_ggml(stored), Pq::of_ggml(ty)) else {
            return Ok(None);
        };
        if p != out {
            return Ok(None);
        }
        let cols = st.dims.first().copied().unwrap_or(1) as usize;
        let rows = st.dims.iter().skip(1).product::<u64>() as usize;
        let base = GroupGrid::from_bytes(p, rows, cols, bytes)?;
        qat.grid(l, t, &base).map(Some)
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

    fn quantized(&self, name: &str, ty: GgmlType) -> Option<Result<Vec<u8>>> {
        match self.grid_of(name, ty) {
            Ok(Some(g)) => Some(self.read_f32(name).map(|v| g.quantize(&v))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    }
}

/// Merges `lora` into the GGUF at `base` and writes `out`. `format`: `None` re-quantizes each
/// adapted matrix to its own stored format and copies the rest; `Some(f)` converts every linear
/// weight (and the embeddings) to `f`, as `pare convert` does. `qat`: how the adapters were
/// trained ([`crate::train::fake_quant::load_state`]); QAT adapters are rounded onto the grid
/// they were trained against wherever the output keeps the base's format.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    base: &Path,
    lora: &Lora,
    qat: Option<&QatState>,
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
        qat,
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
