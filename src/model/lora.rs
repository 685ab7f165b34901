//! LoRA adapters (Hu et al. 2021): a targeted weight `W` (rows × cols) acts as `W + s·B·A` with `A`
//! (rank × cols) and `B` (rows × rank), `s = alpha / rank` (or `alpha / √rank` with rsLoRA). `A`
//! starts Kaiming-uniform and `B` at zero, as PEFT initialises them, so a fresh adapter changes
//! nothing. The forward pass adds `s·B(A x)` to a targeted product ([`Lora::add_to`]) without
//! merging; `pare merge` folds the adapters into the weights.
//!
//! Adapters are saved in PEFT's layout, which transformers/PEFT load: `adapter_config.json` and
//! `adapter_model.safetensors` with keys like
//! `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` (`[rank, cols]`) and `…lora_B.weight`
//! (`[rows, rank]`). Those are in Hugging Face's row order: a GGUF Llama stores query/key rows permuted
//! for adjacent-pair RoPE ([`crate::format::hf`]), so `B` of q/k is permuted on save and load.

use std::path::Path;

use serde_json::json;

use super::config::{Config, RopeStyle};
use crate::error::{Error, Result};
use crate::format::hf;
use crate::format::safetensors::{self, Dtype, LazyTensor, SafetensorsFile};
use crate::infer::sampling::Rng;

/// File names of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A linear weight of a transformer block that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's name in Hugging Face models (and PEFT's `target_modules`).
    pub fn hf_module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The module's path inside a Hugging Face decoder layer.
    fn hf_path(self) -> String {
        let block = match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        };
        format!("{block}.{}", self.hf_module())
    }

    /// Parses `q`, `q_proj`, `gate`, `gate_proj`, ...
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        Target::ALL
            .into_iter()
            .find(|t| t.hf_module() == s || t.hf_module().strip_suffix("_proj") == Some(s))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown LoRA target {s:?} (q, k, v, o, gate, up, down)"
                ))
            })
    }

    /// Parses a comma-separated list (`q,v`), without duplicates.
    pub fn parse_list(s: &str) -> Result<Vec<Target>> {
        let mut v: Vec<Target> = s.split(',').map(Target::parse).collect::<Result<_>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            return Err(Error::Invalid("no LoRA targets given".into()));
        }
        Ok(v)
    }

    /// (rows, cols) of this weight in a model with configuration `c`.
    pub fn shape(self, c: &Config) -> (usize, usize) {
        let (d, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        match self {
            Target::Q => (q, d),
            Target::K | Target::V => (kv, d),
            Target::O => (d, q),
            Target::Gate | Target::Up => (ff, d),
            Target::Down => (d, ff),
        }
    }

    /// Whether the rows of this weight are RoPE-permuted in a GGUF Llama.
    fn rope_rows(self) -> bool {
        matches!(self, Target::Q | Target::K)
    }
}

/// Hyper-parameters of a set of adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<Target>,
    /// Dropout on the adapter's input during training (PEFT's `lora_dropout`).
    pub dropout: f32,
    /// rsLoRA: scale by `alpha / √rank` instead of `alpha / rank`.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Q, Target::V],
            dropout: 0.0,
            rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 4096 {
            return Err(Error::Invalid(format!(
                "LoRA rank {} is out of range (1..=4096)",
                self.rank
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Invalid(format!(
                "LoRA alpha {} must be positive",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "LoRA dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid("no LoRA targets given".into()));
        }
        Ok(())
    }

    /// The factor `s` of `W + s·B·A`.
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// One adapter: `A` is `rank × cols`, `B` is `rows × rank`, both row-major, `B`'s rows in the
/// model's own row order.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl Adapter {
    pub fn zeros(rows: usize, cols: usize, rank: usize) -> Adapter {
        Adapter {
            rows,
            cols,
            rank,
            a: vec![0.0; rank * cols],
            b: vec![0.0; rows * rank],
        }
    }

    /// `u = A x` for `n` rows of `x` (`u`: n × rank).
    pub fn down(&self, x: &[f32], n: usize, u: &mut [f32]) {
        crate::model::dense::matmul_nt(x, &self.a, u, n, self.cols, self.rank, false);
    }

    /// `out += s·B·u` for `n` rows of `u` (n × rank).
    pub fn up_add(&self, u: &[f32], n: usize, s: f32, out: &mut [f32]) {
        crate::model::dense::matmul_nt_scaled(u, &self.b, out, n, self.rank, self.rows, s, true);
    }

    /// The dense update `s·B·A` (rows × cols).
    pub fn delta(&self, s: f32, out: &mut [f32]) {
        crate::model::dense::matmul_nn_scaled(
            &self.b, &self.a, out, self.rows, self.rank, self.cols, s, false,
        );
    }
}

/// The adapters of a model: per layer, one optional adapter per [`Target`].
#[derive(Debug, Clone, PartialEq)]
pub struct Lora {
    pub config: LoraConfig,
    /// `layers[l][t as usize]`.
    pub layers: Vec<[Option<Adapter>; 7]>,
    /// Whether the model stores q/k rows for adjacent-pair RoPE (GGUF Llama): PEFT files hold
    /// Hugging Face's order, so `B` of q/k is permuted on save and load.
    adjacent_rows: bool,
    head_dim: usize,
}

impl Lora {
    /// Fresh adapters for every layer and target: `A` Kaiming-uniform as PEFT draws it
    /// (`kaiming_uniform_(a=√5)`, i.e. U(±1/√cols)), `B` zero.
    pub fn new(c: &Config, config: LoraConfig, seed: u64) -> Result<Lora> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let mut lora = Lora::zeros(c, config);
        for layer in &mut lora.layers {
            for ad in layer.iter_mut().flatten() {
                let bound = 1.0 / (ad.cols as f64).sqrt();
                for v in &mut ad.a {
                    *v = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
                }
            }
        }
        Ok(lora)
    }

    /// Adapters of the right shapes, all zero (also the container for gradients).
    pub fn zeros(c: &Config, config: LoraConfig) -> Lora {
        Self::zeros_in(c, config, 0..c.n_layer)
    }

    /// [`Lora::zeros`] with adapters in `layers` only (the other layers' slots empty, as
    /// [`Lora::keep_layers`] leaves them): a pipeline stage's share, never allocating the rest.
    pub fn zeros_in(c: &Config, config: LoraConfig, layers: std::ops::Range<usize>) -> Lora {
        let layers = (0..c.n_layer)
            .map(|l| {
                Target::ALL.map(|t| {
                    (layers.contains(&l) && config.targets.contains(&t)).then(|| {
                        let (r, k) = t.shape(c);
                        Adapter::zeros(r, k, config.rank)
                    })
                })
            })
            .collect();
        Lora {
            config,
            layers,
            adjacent_rows: c.rope_style == RopeStyle::Normal,
            head_dim: c.head_dim,
        }
    }

    pub fn adapter(&self, layer: usize, t: Target) -> Option<&Adapter> {
        self.layers.get(layer)?[t as usize].as_ref()
    }

    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    /// `out += s·B(A x)` for `n` rows of `x` when `(layer, t)` has an adapter (the inference hook).
    pub fn add_to(&self, layer: usize, t: Target, x: &[f32], n: usize, out: &mut [f32]) {
        if let Some(ad) = self.adapter(layer, t) {
            let mut u = vec![0.0f32; n * ad.rank];
            ad.down(x, n, &mut u);
            ad.up_add(&u, n, self.scale(), out);
        }
    }

    /// Every parameter tensor in a fixed order (layer, target, A then B): the optimizer's view.
    pub fn params(&self) -> impl Iterator<Item = &[f32]> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .flat_map(|ad| [ad.a.as_slice(), ad.b.as_slice()])
    }

    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.iter_mut().flatten())
            .flat_map(|ad| [&mut ad.a, &mut ad.b])
    }

    /// Number of trainable values.
    pub fn n_params(&self) -> usize {
        self.params().map(|p| p.len()).sum()
    }

    /// Sets every value to zero (gradients between steps).
    pub fn zero(&mut self) {
        for p in self.params_mut() {
            p.fill(0.0);
        }
    }

    /// Keeps the adapters of `layers` only (a pipeline stage's share): the others are dropped,
    /// so [`Self::params`] lists just this share, in the global order.
    pub fn keep_layers(&mut self, layers: std::ops::Range<usize>) {
        for (l, layer) in self.layers.iter_mut().enumerate() {
            if !layers.contains(&l) {
                *layer = Default::default();
            }
        }
    }

    /// Copies in every adapter `part` holds (joining the stages' shares back into one set).
    pub fn absorb(&mut self, part: &Lora) {
        for (mine, theirs) in self.layers.iter_mut().zip(&part.layers) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                if t.is_some() {
                    m.clone_from(t);
                }
            }
        }
    }

    /// Whether `B` of `t` is stored in a different row order by PEFT than by this model.
    fn permuted(&self, t: Target) -> bool {
        self.adjacent_rows && t.rope_rows()
    }

    /// The PEFT key prefix of the module `(layer, t)`, e.g.
    /// `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn module_key(layer: usize, t: Target) -> String {
        format!("base_model.model.model.layers.{layer}.{}", t.hf_path())
    }

    fn key(layer: usize, t: Target, ab: &str) -> String {
        format!("{}.lora_{ab}.weight", Self::module_key(layer, t))
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if
    /// needed), each file whole or not at all. `base` names the base model in the config.
    pub fn save(&self, dir: &Path, base: &str) -> Result<()> {
        self.save_with(dir, base, Vec::new())
    }

    /// [`Lora::save`], with `extra` tensors stored in the adapter file beside the adapters (keys
    /// without `lora_`, which PEFT does not load and [`Lora::load`] skips).
    pub fn save_with(
        &self,
        dir: &Path,
        base: &str,
        extra: Vec<(String, LazyTensor)>,
    ) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tensors = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                let Some(ad) = &layer[t as usize] else {
                    continue;
                };
                let a = f32_bytes(&ad.a);
                tensors.push((
                    Self::key(l, t, "A"),
                    LazyTensor::new(Dtype::F32, vec![ad.rank, ad.cols], move || a.clone()),
                ));
                let b = if self.permuted(t) {
                    // PEFT row r (split halves) is the model's row `order[r]` (adjacent pairs).
                    let order = hf::halves_from_adjacent_rows(ad.rows, self.head_dim);
                    permute_rows(&ad.b, ad.rank, |r| order[r])
                } else {
                    ad.b.clone()
                };
                let b = f32_bytes(&b);
                tensors.push((
                    Self::key(l, t, "B"),
                    LazyTensor::new(Dtype::F32, vec![ad.rows, ad.rank], move || b.clone()),
                ));
            }
        }
        tensors.extend(extra);
        let weights = dir.join(WEIGHTS_FILE);
        let tmp = crate::atomic_file::temp_path(&weights)?;
        let guard = crate::atomic_file::RemoveOnDrop(Some(tmp.clone()));
        safetensors::write(&tmp, tensors)?;
        crate::atomic_file::persist(&tmp, &weights)?;
        guard.disarm();
        let c = &self.config;
        let config = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "use_rslora": c.rslora,
            "target_modules": c.targets.iter().map(|t| t.hf_module()).collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
        });
        let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
        crate::atomic_file::write(&dir.join(CONFIG_FILE), text.as_bytes())
    }

    /// Reads a PEFT adapter directory for a model with configuration `c`.
    pub fn load(dir: &Path, c: &Config) -> Result<Lora> {
        let cfg_path = dir.join(CONFIG_FILE);
        let j = hf::read_json(&cfg_path)?.ok_or_else(|| {
            Error::Invalid(format!("{}: no adapter config here", cfg_path.display()))
        })?;
        let bad = |m: String| Error::Invalid(format!("{}: {m}", cfg_path.display()));
        if let Some(p) = j.get("peft_type").and_then(|v| v.as_str()) {
            if p != "LORA" {
                return Err(bad(format!("peft_type {p:?} is not LORA")));
            }
        }
        let rank = j
            .get("r")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("r (the rank) is missing".into()))? as usize;
        let alpha = j.get("lora_alpha").and_then(|v| v.as_f64()).unwrap_or(8.0) as f32;
        let targets = match j.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad("target_modules holds a non-string".into()))
                        .and_then(Target::parse)
                })
                .collect::<Result<Vec<_>>>()?,
            Some(serde_json::Value::String(s)) => Target::parse_list(s)?,
            _ => return Err(bad("target_modules is missing".into())),
        };
        let config = LoraConfig {
            rank,
            alpha,
            targets,
            dropout: j
                .get("lora_dropout")
                .and_then(|v| v.as_f64())
                .unwrap_or(0.0) as f32,
            rslora: j
                .get("use_rslora")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        config.validate().map_err(|e| bad(e.to_string()))?;
        let file = SafetensorsFile::open(dir.join(WEIGHTS_FILE))?;
        let mut lora = Lora::zeros(c, config);
        let mut found = 0;
        for l in 0..lora.layers.len() {
            for t in Target::ALL {
                let Some(mut ad) = lora.layers[l][t as usize].take() else {
                    continue;
                };
                read_tensor(&file, &Self::key(l, t, "A"), &[ad.rank, ad.cols], &mut ad.a)?;
                let mut b = vec![0.0f32; ad.rows * ad.rank];
                read_tensor(&file, &Self::key(l, t, "B"), &[ad.rows, ad.rank], &mut b)?;
                ad.b = if lora.permuted(t) {
                    // The model's row r (adjacent pairs) is PEFT's row `order[r]` (split halves).
                    let order = hf::adjacent_from_halves_rows(ad.rows, lora.head_dim);
                    permute_rows(&b, ad.rank, |r| order[r])
                } else {
                    b
                };
                lora.layers[l][t as usize] = Some(ad);
                found += 2;
            }
        }
        // Other keys (learned quantization grids, `crate::train::fake_quant`) are not adapters.
        let adapters = file.tensors.iter().filter(|(k, _)| k.contains(".lora_"));
        let extra = adapters.count().saturating_sub(found);
        if extra > 0 {
            return Err(Error::Invalid(format!(
                "{}: {extra} adapter tensors do not belong to this model's layers/targets",
                file.path.display()
            )));
        }
        Ok(lora)
    }
}

/// Rows of `cols` values, output row `r` taken from input row `src(r)`.
fn permute_rows(x: &[f32], cols: usize, src: impl Fn(usize) -> usize) -> Vec<f32> {
    let rows = x.len() / cols.max(1);
    let mut out = Vec::with_capacity(x.len());
    for r in 0..rows {
        let s = src(r);
        out.extend_from_slice(&x[s * cols..(s + 1) * cols]);
    }
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_tensor(file: &SafetensorsFile, key: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
    let t = file.get(key).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: tensor {key:?} is missing",
            file.path.display()
        ))
    })?;
    if t.shape != shape {
        return Err(Error::Invalid(format!(
            "{}: tensor {key:?} has shape {:?}, expected {shape:?}",
            file.path.display(),
            t.shape
        )));
    }
    safetensors::to_f32(t.dtype, file.data(t), out)
        .map_err(|e| Error::Invalid(format!("{}: {key:?}: {e}", file.path.display())))
}
