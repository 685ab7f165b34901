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
    composite_scores, format_errors, sample_rows, weight_stats, FormatError, ScoreInputs,
    WeightStats,
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
    /// How each tensor's output error is turned into a common unit.
    pub sensitivity: Sensitivity,
    /// Calibration tokens the sensitivity is measured on (`None`: the mode's default).
    pub sensitivity_tokens: Option<usize>,
    pub method: Method,
}

/// How the planner puts the errors of different tensors in one unit, so that it can trade them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sensitivity {
    /// Each row's output error weighted by the mean square loss gradient at that row
    /// ([`crate::plan::fisher`]): predicted KL in nats, from one backward pass.
    Fisher,
    /// The output error scaled by KL measured with whole blocks and kinds quantized
    /// ([`apply_kl_rates`]).
    Kl,
    /// The activation-weighted output error alone, in each tensor's own units.
    Output,
}

impl Sensitivity {
    pub fn name(self) -> &'static str {
        match self {
            Sensitivity::Fisher => "fisher",
            Sensitivity::Kl => "kl",
            Sensitivity::Output => "output",
        }
    }

    /// Calibration tokens measured on unless told otherwise: the backward pass is cheap enough for
    /// two 512-token chunks; KL needs one forward per group.
    pub fn default_tokens(self) -> usize {
        match self {
            Sensitivity::Fisher => 1024,
            Sensitivity::Kl => 256,
            Sensitivity::Output => 0,
        }
    }
}

impl std::str::FromStr for Sensitivity {
    type Err = Error;
    fn from_str(s: &str) -> Result<Sensitivity> {
        match s {
            "fisher" => Ok(Sensitivity::Fisher),
            "kl" => Ok(Sensitivity::Kl),
            "output" => Ok(Sensitivity::Output),
            _ => Err(Error::Invalid(format!(
                "sensitivity {s:?}: use fisher, kl or output"
            ))),
        }
    }
}

impl Options {
    /// The formats measured: [`candidate_formats`] within the clamps, and the format `uniform:FMT`
    /// names even below the default clamp (the user asked for it).
    pub fn formats(&self) -> Vec<GgmlType> {
        let mut formats = candidate_formats(self.min_bits, self.max_bits);
        if let Strategy::Uniform(f) = self.strategy {
            if self.min_bits.is_none() && can_quantize(f) && !formats.contains(&f) {
                formats.push(f);
            }
        }
        formats
    }

    fn sensitivity_tokens(&self) -> usize {
        match self.sensitivity {
            Sensitivity::Output => 0,
            s => self.sensitivity_tokens.unwrap_or(s.default_tokens()),
        }
    }
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
            sensitivity: Sensitivity::Fisher,
            sensitivity_tokens: None,
            method: Method::Search,
        }
    }
}

/// The code bits of a format, for `--min-bits/--max-bits`.
pub fn code_bits(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 32,
        GgmlType::F16 | GgmlType::BF16 => 16,
        other => crate::quant::pq::Pq::member(other).map_or(32, |p| p.bits as u32),
    }
}

/// Code bits of the fewest-bit formats the planner considers unless `--min-bits` says otherwise.
/// One-bit formats suit models trained for them (Bonsai's Q1_0); on others, a tensor at one bit
/// does far more harm than the second-order (Fisher) prediction says, and the optimal plan trades
/// them in badly: SmolLM2 at 2.5 bpw gave PPL 2598 with 1-bit formats allowed and 572 without.
pub const DEFAULT_MIN_BITS: u32 = 2;

/// The formats the planner considers: every format pare writes except bf16 and f32 (f16 holds
/// what they would, in as few bytes or fewer, for weights this size), with `min_bits` (default
/// [`DEFAULT_MIN_BITS`]) to `max_bits` code bits.
pub fn candidate_formats(min_bits: Option<u32>, max_bits: Option<u32>) -> Vec<GgmlType> {
    let min_bits = min_bits.unwrap_or(DEFAULT_MIN_BITS);
    format::all()
        .into_iter()
        .filter(|&f| can_quantize(f) && !matches!(f, GgmlType::BF16 | GgmlType::F32))
        .filter(|&f| code_bits(f) >= min_bits)
        .filter(|&f| max_bits.is_none_or(|b| code_bits(f) <= b))
        .collect()
}

/// One tensor the planner chooses a format for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
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
    /// Output error at the KL reference format by round-to-nearest (see [`kl_format`]).
    pub reference_error: f64,
    /// Nats of KL per unit of output error for this tensor's group (1 when not measured, or when
    /// the errors are Fisher-weighted and so in nats already); every candidate's error is already
    /// multiplied by it.
    pub kl_rate: f64,
}

/// The format the KL sensitivity quantizes a group to: low enough for a measurable effect, high
/// enough to stay where errors add up linearly.
pub fn kl_format() -> GgmlType {
    format::parse("q3_g64").expect("known format")
}

fn clamp_to_median(v: &mut [f64], factor: f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let Some(&med) = s.get(s.len() / 2) else {
        return;
    };
    for x in v.iter_mut() {
        *x = x.clamp(med / factor, med * factor);
    }
}

/// The matrix kind of `blk.N.KIND.weight` names (`attn_q`, `ffn_down`).
fn kind_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("blk.")?;
    let (_, rest) = rest.split_once('.')?;
    rest.strip_suffix(".weight")
}

/// Measures KL at [`kl_format`] on `tokens` for every block (its matrices together), every kind
/// (that matrix in every block together) and every other matrix (embeddings, output head) alone,
/// and scales each tensor's candidate errors into nats by its rate.
///
/// A block's rate varies with depth (an early error meets a small residual stream) and a kind's
/// with what lies after it (a value error is averaged by attention, a down-projection error is
/// written straight into the stream), so a tensor's rate is modelled as a_block · b_kind and fitted
/// to the measured KLs by alternating scaling (the additive model: a group's KL is the sum of its
/// tensors' rate × error).
fn apply_kl_rates(
    tensors: &mut [TensorPlan],
    model: &mut Model,
    tokens: &[u32],
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> Result<()> {
    use std::collections::BTreeMap;
    let mut blocks: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut kinds: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut singles: Vec<usize> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        match (layer_of(&t.name), kind_of(&t.name)) {
            (Some(l), Some(k)) => {
                blocks.entry(l).or_default().push(i);
                kinds.entry(k.to_string()).or_default().push(i);
            }
            _ => singles.push(i),
        }
    }
    let groups: Vec<&Vec<usize>> = blocks.values().chain(kinds.values()).collect();
    let mut names: Vec<Vec<String>> = groups
        .iter()
        .map(|g| g.iter().map(|&i| tensors[i].name.clone()).collect())
        .collect();
    names.extend(singles.iter().map(|&i| vec![tensors[i].name.clone()]));
    let kls = crate::plan::kl_sensitivity::group_kl(model, tokens, &names, kl_format(), |d, t| {
        progress(Stage::Sensitivity, d, t)
    })?;
    let (nb, nk) = (blocks.len(), kinds.len());
    let block_of: Vec<Option<usize>> = {
        let mut v = vec![None; tensors.len()];
        for (bi, g) in blocks.values().enumerate() {
            for &i in g {
                v[i] = Some(bi);
            }
        }
        v
    };
    let kind_idx: Vec<Option<usize>> = {
        let mut v = vec![None; tensors.len()];
        for (ki, g) in kinds.values().enumerate() {
            for &i in g {
                v[i] = Some(ki);
            }
        }
        v
    };
    // A KL at the noise floor keeps a tiny positive value so its tensors still rank among
    // themselves.
    let kl = |g: usize| kls[g].max(1e-9);
    let (mut a, mut b) = (vec![1.0f64; nb], vec![1.0f64; nk]);
    for _ in 0..100 {
        for (bi, g) in blocks.values().enumerate() {
            let e: f64 = g
                .iter()
                .map(|&i| b[kind_idx[i].unwrap()] * tensors[i].reference_error)
                .sum();
            a[bi] = if e > 0.0 { kl(bi) / e } else { 1.0 };
        }
        for (ki, g) in kinds.values().enumerate() {
            let e: f64 = g
                .iter()
                .map(|&i| a[block_of[i].unwrap()] * tensors[i].reference_error)
                .sum();
            b[ki] = if e > 0.0 { kl(nb + ki) / e } else { 1.0 };
        }
    }
    // A block or kind whose KL on a few hundred tokens is near the noise floor would get a rate
    // near zero and all its tensors the fewest bits; measured rates are kept within a factor of
    // the median (4 for blocks, 10 for kinds), which no block or kind of SmolLM2 needed otherwise.
    clamp_to_median(&mut a, 4.0);
    clamp_to_median(&mut b, 10.0);
    for i in 0..tensors.len() {
        let rate = match (block_of[i], kind_idx[i]) {
            (Some(bi), Some(ki)) => a[bi] * b[ki],
            _ => {
                let s = singles
                    .iter()
                    .position(|&j| j == i)
                    .expect("every tensor is grouped");
                let e = tensors[i].reference_error;
                if e > 0.0 {
                    kl(nb + nk + s) / e
                } else {
                    1.0
                }
            }
        };
        tensors[i].kl_rate = rate;
        for c in &mut tensors[i].candidates {
            c.error *= rate;
        }
    }
    Ok(())
}

/// Stages a progress callback hears about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Calibrate,
    Measure,
    Sensitivity,
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
    /// The measurements as taken (candidate bytes unpadded), for [`Measurements`].
    pub measured: Vec<TensorPlan>,
}

/// Calibration and measurements saved to re-plan without re-measuring (`--measurements FILE`):
/// valid for the same model file and the same measuring options, which `fingerprint` records.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Measurements {
    pub fingerprint: String,
    pub calibration: Calibration,
    pub tensors: Vec<TensorPlan>,
}

/// What the measurements depend on: the model file (path, size, modification time) and every
/// option that changes what is measured.
pub fn fingerprint(model_path: &Path, opts: &Options) -> String {
    let meta = std::fs::metadata(model_path).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    // FNV-1a of the calibration text.
    let text = opts
        .calibration_text
        .bytes()
        .fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        });
    let overrides: Vec<String> = opts
        .overrides
        .iter()
        .map(|o| format!("{}={}", o.pattern, format::name(o.format)))
        .collect();
    format!(
        "v4 {} {} {mtime} text {text:016x} ctx {} chunks {} rows {} {} {} {:?} formats {} {:?}",
        std::fs::canonicalize(model_path)
            .unwrap_or_else(|_| model_path.to_path_buf())
            .display(),
        meta.map_or(0, |m| m.len()),
        opts.n_ctx,
        opts.max_chunks,
        opts.sample_rows,
        opts.sensitivity.name(),
        opts.sensitivity_tokens(),
        opts.method,
        opts.formats()
            .iter()
            .map(|&f| format::name(f))
            .collect::<Vec<_>>()
            .join(","),
        overrides
    )
}

impl Measurements {
    /// Loads `path` when it exists and matches `fingerprint`; `None` otherwise.
    pub fn load(path: &Path, fingerprint: &str) -> Option<Measurements> {
        let bytes = std::fs::read(path).ok()?;
        let m: Measurements = serde_json::from_slice(&bytes).ok()?;
        (m.fingerprint == fingerprint).then_some(m)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json =
            serde_json::to_vec(self).map_err(|e| Error::Invalid(format!("measurements: {e}")))?;
        crate::atomic_file::write(path, &json)
    }
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
/// With `cache`, measurements saved there for the same model and options are reused, and new
/// ones are saved there.
pub fn plan(
    model_path: &Path,
    opts: &Options,
    cache: Option<&Path>,
    mut progress: impl FnMut(Stage, usize, usize),
) -> Result<Plan> {
    let fp = fingerprint(model_path, opts);
    if let Some(m) = cache.and_then(|c| Measurements::load(c, &fp)) {
        let source = convert::open_source(model_path)?;
        return plan_from(
            source,
            m.calibration,
            Some(m.tensors),
            Gradients::None,
            opts,
            progress,
        );
    }
    let mut model = Model::load(model_path)?;
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
    let source = convert::open_source(model_path)?;
    let sens_tokens = &tokens[..opts.sensitivity_tokens().min(tokens.len())];
    let fisher;
    let sensitivity = match opts.sensitivity {
        _ if sens_tokens.len() < 2 => Gradients::None,
        Sensitivity::Output => Gradients::None,
        Sensitivity::Fisher => {
            fisher = crate::plan::fisher::fisher(
                &model,
                sens_tokens,
                n_ctx.min(sens_tokens.len()),
                usize::MAX,
                FISHER_SEED,
                |d, t| progress(Stage::Sensitivity, d, t),
            )?;
            Gradients::Fisher(&fisher)
        }
        Sensitivity::Kl => Gradients::Kl(&mut model, sens_tokens),
    };
    let plan = plan_from(source, calibration, None, sensitivity, opts, progress)?;
    if let Some(c) = cache {
        Measurements {
            fingerprint: fp,
            calibration: plan.calibration.clone(),
            tensors: plan.measured.clone(),
        }
        .save(c)?;
    }
    Ok(plan)
}

/// Seed of the targets the Fisher pass draws from the model's predictions.
const FISHER_SEED: u64 = 0x5eed_f15e;

/// What turns output errors into a common unit, already measured or ready to measure.
pub enum Gradients<'a> {
    /// Nothing: errors stay in each tensor's own units.
    None,
    /// Per-row loss gradients: errors become predicted KL.
    Fisher(&'a crate::plan::fisher::Fisher),
    /// The model and tokens to measure group KLs on.
    Kl(&'a mut Model, &'a [u32]),
}

/// [`plan`] on a source already calibrated.
pub fn plan_from(
    source: Box<dyn Source>,
    calibration: Calibration,
    measured: Option<Vec<TensorPlan>>,
    sensitivity: Gradients,
    opts: &Options,
    mut progress: impl FnMut(Stage, usize, usize),
) -> Result<Plan> {
    if opts.sample_rows == 0 {
        return Err(Error::Invalid("sample rows must be at least 1".into()));
    }
    let formats = opts.formats();
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
    let mut tensors = match measured {
        Some(t) => {
            let names: Vec<&str> = choosable
                .iter()
                .map(|&i| planned[i].spec.name.as_str())
                .collect();
            if t.len() != names.len() || t.iter().zip(&names).any(|(t, n)| t.name != *n) {
                return Err(Error::Invalid(
                    "the saved measurements are of another model's tensors".into(),
                ));
            }
            t
        }
        None => {
            let fisher = match &sensitivity {
                Gradients::Fisher(f) => Some(*f),
                _ => None,
            };
            let mut t = measure(
                source.as_ref(),
                &calibration,
                fisher,
                &planned,
                &choosable,
                opts,
                &formats,
                &mut progress,
            )?;
            if let Gradients::Kl(model, tokens) = sensitivity {
                apply_kl_rates(&mut t, model, tokens, &mut progress)?;
            }
            t
        }
    };
    let measured = tensors.clone();
    for c in tensors.iter_mut().flat_map(|t| t.candidates.iter_mut()) {
        c.bytes = cost(c.bytes);
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
        measured,
    })
}

/// Measures every choosable tensor (`planned[i]` for i in `choosable`) under every allowed format
/// and scores it. Candidate bytes are the tensor's data bytes, unpadded. With `fisher`, errors are
/// predicted KL in nats per token (½ of the gradient-weighted output error).
#[allow(clippy::too_many_arguments)]
fn measure(
    source: &dyn Source,
    calibration: &Calibration,
    fisher: Option<&crate::plan::fisher::Fisher>,
    planned: &[Planned],
    choosable: &[usize],
    opts: &Options,
    formats: &[GgmlType],
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> Result<Vec<TensorPlan>> {
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
            None => formats.to_vec(),
        };
        // One candidate per stored type (a format and its twin are the same bytes).
        let mut seen = std::collections::HashSet::new();
        fmts.retain(|&f| seen.insert(format::storage_type(f, cols)));
        let sample = sample_rows(rows, opts.sample_rows);
        let role = planned[i].role;
        let row_weight = match fisher {
            Some(f) if role != Role::Embeddings || tied => {
                let rw = f
                    .row_weights(&name)
                    .ok_or_else(|| Error::Invalid(format!("no gradient statistics for {name}")))?;
                if rw.len() != rows {
                    return Err(Error::Invalid(format!(
                        "gradient statistics of {name} have {} rows, the tensor {rows}",
                        rw.len()
                    )));
                }
                Some(rw)
            }
            _ => None,
        };
        // Fisher: ½ ΔWᵀFΔW is the predicted KL.
        let unit = if fisher.is_some() { 0.5 } else { 1.0 };
        let lookup_weight = fisher.map(|f| f.embedding_weights());
        let errors = |fmts: &[GgmlType], method: Method| -> Result<Vec<FormatError>> {
            let imp = importance.as_deref();
            let mut errs = format_errors(
                &w,
                rows,
                cols,
                imp,
                row_weight.as_deref(),
                fmts,
                &sample,
                method,
            )?;
            if role == Role::Embeddings {
                // A lookup adds one row's error to the residual stream per token: the mean row
                // error (weighted by the gradient entering the first layer when measured), on top
                // of the output head's error when the head is this one.
                let lw = lookup_weight.as_deref();
                let lookup = format_errors(&w, rows, cols, lw, None, fmts, &sample, method)?;
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
            for e in &mut errs {
                e.error *= unit;
            }
            Ok(errs)
        };
        let errs = errors(&fmts, opts.method)?;
        // The error the KL measurement's quantization makes (round-to-nearest at the reference).
        let reference_error = if opts.sensitivity == Sensitivity::Kl {
            errors(&[kl_format()], Method::Rtn)?[0].error
        } else {
            0.0
        };
        let candidates = errs
            .iter()
            .map(|e| Candidate {
                format: e.format,
                storage: format::storage_type(e.format, cols),
                bytes: e.bytes,
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
            reference_error,
            kl_rate: 1.0,
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

    Ok(tensors)
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
