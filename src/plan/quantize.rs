//! `pare quantize`: the planner's job from end to end. Calibrate on text, measure every matrix
//! (embeddings and output head included) under every allowed format, choose one format per tensor
//! with a [`Strategy`] within a [`Budget`], and write the GGUF, each tensor quantized with the
//! importance its calibration inputs gave it (the same weighting its error was measured with).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use crate::convert::{self, ConvertOptions, Planned, Role, Source};
use crate::error::{Error, Result};
use crate::format::gguf::Value;
use crate::format::gguf_writer::{self, TensorSpec};
use crate::model::Model;
use crate::plan::allocate::{allocate, Allocation, Candidate, Strategy};
use crate::plan::budget::Budget;
use crate::plan::calibrate::{calibrate, Calibration};
use crate::plan::sensitivity::{
    composite_scores, format_errors, sample_rows, weight_stats, ScoreInputs, WeightStats,
};
use crate::quant::quantize::{can_quantize, Method};
use crate::quant::{format, GgmlType};

/// The default calibration text, compiled in (see data/README.md: a WikiText-2 slice disjoint from
/// the part quality is measured on).
pub const DEFAULT_CALIBRATION_TEXT: &str = include_str!("../../data/calibration.txt");

/// `REGEX=FORMAT`: tensors whose name matches get that format, whatever the strategy.
#[derive(Debug, Clone)]
pub struct Override {
    pub pattern: regex::Regex,
    pub format: GgmlType,
}

impl std::str::FromStr for Override {
    type Err = Error;
    fn from_str(s: &str) -> Result<Override> {
        let (re, f) = s.rsplit_once('=').ok_or_else(|| {
            Error::Invalid(format!(
                "override {s:?}: expected REGEX=FORMAT, e.g. 'ffn_down=q6_g64'"
            ))
        })?;
        let pattern = regex::Regex::new(re)
            .map_err(|e| Error::Invalid(format!("override {s:?}: bad regex: {e}")))?;
        Ok(Override {
            pattern,
            format: format::parse(f)?,
        })
    }
}

/// Everything `pare quantize` can be told.
#[derive(Debug, Clone)]
pub struct Options {
    pub strategy: Strategy,
    pub budget: Option<Budget>,
    /// Allowed code bits per weight (f16 counts as 16).
    pub min_bits: Option<u32>,
    pub max_bits: Option<u32>,
    pub overrides: Vec<Override>,
    pub calibration_text: String,
    pub n_ctx: usize,
    pub max_chunks: usize,
    /// Rows per tensor the errors are measured on.
    pub sample_rows: usize,
    pub method: Method,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            strategy: Strategy::Optimal,
            budget: None,
            min_bits: None,
            max_bits: None,
            overrides: Vec::new(),
            calibration_text: DEFAULT_CALIBRATION_TEXT.to_string(),
            n_ctx: 512,
            max_chunks: 8,
            sample_rows: 64,
            method: Method::Search,
        }
    }
}

/// The code bits of a format, for `--min-bits/--max-bits`.
pub fn code_bits(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 32,
        GgmlType::F16 | GgmlType::BF16 => 16,
        GgmlType::Pq(p) => p.bits as u32,
        other => crate::quant::pq::Pq::of_ggml(other).map_or(32, |p| p.bits as u32),
    }
}

/// The formats the planner considers by default: every format pare writes except bf16 and f32
/// (f16 holds what they would, in as few bytes or fewer, for weights this size).
pub fn candidate_formats(min_bits: Option<u32>, max_bits: Option<u32>) -> Vec<GgmlType> {
    format::all()
        .into_iter()
        .filter(|&f| can_quantize(f) && !matches!(f, GgmlType::BF16 | GgmlType::F32))
        .filter(|&f| min_bits.is_none_or(|b| code_bits(f) >= b))
        .filter(|&f| max_bits.is_none_or(|b| code_bits(f) <= b))
        .collect()
}

/// One tensor the planner chooses a format for.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub role: Role,
    /// Set by an override.
    pub pinned: bool,
    pub candidates: Vec<Candidate>,
    pub weights: WeightStats,
    /// Largest |input| seen in calibration (0 when the tensor saw none).
    pub activation_range: f32,
    /// Mean importance (mean square input) over columns.
    pub importance_mean: f64,
    pub score: f64,
}

/// Stages a progress callback hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Calibrate,
    Measure,
}

/// A complete plan: what each tensor becomes and the file that will be written.
pub struct Plan {
    pub source: Box<dyn Source>,
    pub options: Options,
    pub tensors: Vec<TensorPlan>,
    pub allocation: Allocation,
    /// Every output tensor in order with its type.
    pub planned: Vec<Planned>,
    pub metadata: Vec<(String, Value)>,
    /// Bytes outside the chosen tensors: header plus kept tensors (padded when the budget is a file).
    pub fixed_bytes: u64,
    /// What the chosen tensors may take.
    pub capacity: Option<u64>,
    pub alignment: u64,
    pub n_weights: u64,
    pub calibration: Calibration,
}

impl Plan {
    /// The candidate chosen for tensor `i`.
    pub fn chosen(&self, i: usize) -> &Candidate {
        &self.tensors[i].candidates[self.allocation.picks[i]]
    }

    pub fn candidates(&self) -> Vec<Vec<Candidate>> {
        self.tensors.iter().map(|t| t.candidates.clone()).collect()
    }

    /// The output file's size in bytes (exact: header, data and padding).
    pub fn file_bytes(&self) -> Result<u64> {
        let specs: Vec<TensorSpec> = self.planned.iter().map(|p| p.spec.clone()).collect();
        let (header, align) = gguf_writer::layout(&self.metadata, &specs)?;
        let mut total = header;
        for s in &specs {
            total += s.n_bytes()?.next_multiple_of(align);
        }
        Ok(total)
    }

    /// Tensor data bytes (unpadded) over all tensors.
    pub fn data_bytes(&self) -> Result<u64> {
        self.planned.iter().map(|p| p.spec.n_bytes()).sum()
    }

    /// Bits per weight over every tensor.
    pub fn bits_per_weight(&self) -> Result<f64> {
        Ok(8.0 * self.data_bytes()? as f64 / self.n_weights.max(1) as f64)
    }

    /// Re-plans with another strategy or budget on the same measurements (no recalibration).
    pub fn with_allocation(
        &self,
        strategy: &Strategy,
        capacity: Option<u64>,
    ) -> Result<Allocation> {
        let scores: Vec<f64> = self.tensors.iter().map(|t| t.score).collect();
        allocate(&self.candidates(), strategy, capacity, &scores)
    }

    /// Writes the planned model to `out` atomically.
    pub fn write(
        &self,
        out: &Path,
        cancel: Option<&AtomicBool>,
        progress: impl FnMut(convert::Progress),
    ) -> Result<convert::Report> {
        let importance = |name: &str| self.calibration.inputs.get(name).map(|s| s.importance());
        let report = convert::write(
            self.source.as_ref(),
            out,
            &self.planned,
            &self.metadata,
            self.options.method,
            &importance,
            cancel,
            progress,
        )?;
        if let Some(Budget::FileBytes(b)) = self.options.budget {
            if report.file_bytes > b {
                return Err(Error::Invalid(format!(
                    "internal error: wrote {} bytes over a budget of {b}",
                    report.file_bytes
                )));
            }
        }
        Ok(report)
    }
}

fn first_override(overrides: &[Override], name: &str) -> Option<GgmlType> {
    overrides
        .iter()
        .find(|o| o.pattern.is_match(name))
        .map(|o| o.format)
}

/// Calibrates `model_path` on the options' text, measures every choosable tensor and allocates.
pub fn plan(
    model_path: &Path,
    opts: &Options,
    mut progress: impl FnMut(Stage, usize, usize),
) -> Result<Plan> {
    let model = Model::load(model_path)?;
    let tokens = model
        .tokenizer()?
        .encode(&opts.calibration_text, false, false)?;
    if tokens.is_empty() {
        return Err(Error::Invalid("the calibration text is empty".into()));
    }
    let n_ctx = opts.n_ctx.min(tokens.len());
    let calibration = calibrate(
        &model,
        &tokens,
        n_ctx,
        Some(opts.max_chunks.max(1)),
        |d, t| progress(Stage::Calibrate, d, t),
    )?;
    drop(model);
    let source = convert::open_source(model_path)?;
    plan_from(source, calibration, opts, progress)
}

/// [`plan`] on a source already calibrated.
pub fn plan_from(
    source: Box<dyn Source>,
    calibration: Calibration,
    opts: &Options,
    mut progress: impl FnMut(Stage, usize, usize),
) -> Result<Plan> {
    if opts.sample_rows == 0 {
        return Err(Error::Invalid("sample rows must be at least 1".into()));
    }
    let formats = candidate_formats(opts.min_bits, opts.max_bits);
    if formats.is_empty() {
        return Err(Error::Invalid(format!(
            "no format has between {:?} and {:?} bits",
            opts.min_bits, opts.max_bits
        )));
    }
    for o in &opts.overrides {
        if !can_quantize(o.format) {
            return Err(Error::Invalid(format!(
                "override {}: pare cannot write {}",
                o.pattern,
                format::name(o.format)
            )));
        }
    }
    let mut planned = convert::plan(source.as_ref(), &ConvertOptions::new(GgmlType::F16))?;
    let choosable: Vec<usize> = (0..planned.len())
        .filter(|&i| planned[i].role != Role::Keep)
        .collect();
    if choosable.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no matrices to quantize",
            source.describe()
        )));
    }
    for o in &opts.overrides {
        if !choosable
            .iter()
            .any(|&i| o.pattern.is_match(&planned[i].spec.name))
        {
            return Err(Error::Invalid(format!(
                "override {} matches no tensor (names look like blk.0.attn_q.weight)",
                o.pattern
            )));
        }
    }
    let file_budget = matches!(opts.budget, Some(Budget::FileBytes(_)));
    // The header does not depend on the choices: metadata is fixed ("mixed", file type dropped).
    let mut metadata = convert::output_metadata(source.as_ref(), &planned, "mixed");
    metadata.retain(|(k, _)| k != "general.file_type");
    let specs: Vec<TensorSpec> = planned.iter().map(|p| p.spec.clone()).collect();
    let (header, alignment) = gguf_writer::layout(&metadata, &specs)?;
    let cost = |bytes: u64| {
        if file_budget {
            bytes.next_multiple_of(alignment)
        } else {
            bytes
        }
    };
    let mut fixed = if file_budget { header } else { 0 };
    let mut n_weights = 0u64;
    for p in &planned {
        n_weights += p.spec.dims.iter().product::<u64>();
        if p.role == Role::Keep {
            fixed += cost(p.spec.n_bytes()?);
        }
    }
    let tied = source.tensors().iter().all(|t| t.name != "output.weight");

    let mut tensors = Vec::with_capacity(choosable.len());
    for (k, &i) in choosable.iter().enumerate() {
        let name = planned[i].spec.name.clone();
        let dims = &planned[i].spec.dims;
        let cols = dims[0] as usize;
        let rows = (dims.iter().product::<u64>() / dims[0].max(1)) as usize;
        let w = source.read_f32(&name)?;
        let stats = calibration.inputs.get(&name);
        let importance = stats.map(|s| s.importance());
        let pinned = first_override(&opts.overrides, &name);
        let mut fmts: Vec<GgmlType> = match pinned {
            Some(f) => vec![f],
            None => formats.clone(),
        };
        // One candidate per stored type (a format and its twin are the same bytes).
        let mut seen = std::collections::HashSet::new();
        fmts.retain(|&f| seen.insert(format::storage_type(f, cols)));
        let sample = sample_rows(rows, opts.sample_rows);
        let mut errs = format_errors(&w, rows, cols, importance.as_deref(), &fmts, &sample)?;
        let role = planned[i].role;
        if role == Role::Embeddings {
            // A lookup adds one row's error to the residual stream per token: the mean row error
            // (unweighted), on top of the output head's error when the head is this matrix.
            let lookup = format_errors(&w, rows, cols, None, &fmts, &sample)?;
            let with_head = tied && importance.is_some();
            for (e, l) in errs.iter_mut().zip(&lookup) {
                let per_token = l.error / rows as f64;
                e.error = if with_head {
                    e.error + per_token
                } else {
                    per_token
                };
            }
        }
        let candidates = errs
            .iter()
            .map(|e| Candidate {
                format: e.format,
                storage: format::storage_type(e.format, cols),
                bytes: cost(e.bytes),
                error: e.error,
            })
            .collect();
        let imp_mean = importance.as_ref().map_or(0.0, |v| {
            v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
        });
        tensors.push(TensorPlan {
            name,
            rows,
            cols,
            role,
            pinned: pinned.is_some(),
            candidates,
            weights: weight_stats(&w),
            activation_range: stats.map_or(0.0, |s| s.range()),
            importance_mean: imp_mean,
            score: 0.0,
        });
        progress(Stage::Measure, k + 1, choosable.len());
    }

    // The seed's composite score, for `thresholds` and the report. Output sensitivity is the error
    // at a reference format (q4_g64, or the tensor's middle candidate when that is not allowed).
    let q4 = format::parse("q4_g64").expect("known format");
    let last_layer = tensors
        .iter()
        .filter_map(|t| layer_of(&t.name))
        .max()
        .unwrap_or(0);
    let inputs: Vec<ScoreInputs> = tensors
        .iter()
        .map(|t| ScoreInputs {
            grad: None,
            weight_variance: t.weights.variance,
            activation_range: t.activation_range as f64,
            output: t
                .candidates
                .iter()
                .find(|c| c.format == q4)
                .unwrap_or(&t.candidates[t.candidates.len() / 2])
                .error,
            embedding: t.role == Role::Embeddings,
            final_layer: t.name == "output.weight" || layer_of(&t.name) == Some(last_layer),
        })
        .collect();
    for (t, s) in tensors.iter_mut().zip(composite_scores(&inputs)) {
        t.score = s;
    }

    let capacity = match opts.budget {
        None => None,
        Some(b) => {
            let total = match b {
                Budget::FileBytes(b) => b,
                Budget::BitsPerWeight(bpw) => (bpw * n_weights as f64 / 8.0).floor() as u64,
            };
            let smallest: u64 = tensors
                .iter()
                .map(|t| t.candidates.iter().map(|c| c.bytes).min().unwrap_or(0))
                .sum();
            if total < fixed + smallest {
                let (what, size) = match b {
                    Budget::FileBytes(_) => ("file size", fixed + smallest),
                    Budget::BitsPerWeight(_) => ("tensor data", fixed + smallest),
                };
                return Err(Error::Invalid(format!(
                    "budget {b} is infeasible: the smallest plan allowed takes {size} bytes of {what} ({:.3} bits per weight)",
                    8.0 * (fixed + smallest - if file_budget { header } else { 0 }) as f64 / n_weights as f64
                )));
            }
            Some(total - fixed)
        }
    };
    let candidates: Vec<Vec<Candidate>> = tensors.iter().map(|t| t.candidates.clone()).collect();
    let scores: Vec<f64> = tensors.iter().map(|t| t.score).collect();
    let allocation = allocate(&candidates, &opts.strategy, capacity, &scores)?;
    for (k, &i) in choosable.iter().enumerate() {
        let c = &candidates[k][allocation.picks[k]];
        planned[i].spec = TensorSpec::new(
            planned[i].spec.name.clone(),
            &planned[i].spec.dims,
            c.storage,
        );
        planned[i].copied = false;
    }
    let label = match &opts.strategy {
        Strategy::Uniform(f) => format::name(*f),
        _ => "mixed".to_string(),
    };
    crate::format::gguf_writer::set(&mut metadata, convert::FORMAT_KEY, Value::String(label));
    Ok(Plan {
        source,
        options: opts.clone(),
        tensors,
        allocation,
        planned,
        metadata,
        fixed_bytes: fixed,
        capacity,
        alignment,
        n_weights,
        calibration,
    })
}

/// The block index of `blk.N.…` names.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Per-format counts of a plan's choices, by user name.
pub fn format_counts(plan: &Plan) -> Vec<(String, usize)> {
    let mut m: HashMap<String, usize> = HashMap::new();
    for i in 0..plan.tensors.len() {
        *m.entry(format::name(plan.chosen(i).format)).or_default() += 1;
    }
    let mut v: Vec<_> = m.into_iter().collect();
    v.sort();
    v
}
