//! The training loop: AdamW on the adapters, warmup + cosine learning rate, gradient clipping and
//! accumulation, validation loss every N steps, atomic checkpoints every N steps (and whenever the
//! caller's cancel flag is raised), exact resumption, and a PNG loss curve.
//!
//! Every random choice is a function of (seed, step): which samples a step draws
//! ([`data::sample_index`]) and the dropout masks (seeded per micro-batch), so a run resumed from a
//! checkpoint continues exactly as the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde_json::json;

use super::checkpointing::Checkpoint;
use super::data::{self, Sample};
use super::fake_quant::{self, FakeQuant, GridInit, Grids, QatMode};
use super::optimizer::{scale_to_norm, AdamW, Schedule};
use crate::error::{Error, Result};
use crate::format::safetensors::{self as st, Dtype, LazyTensor, SafetensorsFile};
use crate::model::backward::MergedWeight;
use crate::model::{Lora, LoraConfig, Model, Target};
use crate::pipeline::schedule::{self as pipe_schedule, Slot};
use crate::pipeline::train::{self as pipe, EvalJob, MicroBatch, StageReport, StageState, StepJob};
use crate::pipeline::transport::{Message, Transport};

/// Everything that shapes a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub lora: LoraConfig,
    /// Optimizer updates in the whole run.
    pub steps: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per update (gradient accumulation).
    pub accum: usize,
    pub lr: f32,
    pub warmup: usize,
    /// The cosine decays to `lr · min_lr_ratio`.
    pub min_lr_ratio: f32,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0: off).
    pub clip: f32,
    pub checkpoint: Checkpoint,
    pub qat: QatMode,
    /// Peak learning rate of the learned step sizes and offsets (`--qat lsq`), on the same
    /// schedule as `lr`; no weight decay.
    pub lsq_lr: f32,
    /// Under QAT, the fraction of `steps` trained as plain LoRA (adapters unmerged, no fake
    /// quantization) before fake quantization switches on, at step `floor(qat_start · steps)`.
    /// Fake quantization from step 0 makes the adapters' first updates invisible until they cross
    /// a rounding boundary, and at plain LoRA's best rates many then cross at once (the run
    /// diverges); a plain start lets the adapters grow smoothly first. Ignored without QAT.
    pub qat_start: f32,
    /// The grid `lsq` learns from when it switches on after step 0.
    pub lsq_init: GridInit,
    pub seed: u64,
    /// Validation every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Validation sequences used (0: all).
    pub eval_samples: usize,
    /// Checkpoint every this many steps (0: only at the end and on cancel).
    pub save_every: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            lora: LoraConfig::default(),
            steps: 100,
            seq_len: 256,
            accum: 1,
            lr: 1e-3,
            warmup: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            clip: 1.0,
            checkpoint: Checkpoint::None,
            qat: QatMode::None,
            lsq_lr: 1e-4,
            // At 40 steps and lr 1e-2, 0.5 merged better than 0.25, 0.6 and 0.75 (BENCHMARKS.md,
            // 2026-12-07 session 2).
            qat_start: 0.5,
            lsq_init: GridInit::Search,
            seed: 42,
            eval_every: 0,
            eval_samples: 0,
            save_every: 0,
        }
    }
}

impl TrainOptions {
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        let bad = |m: String| Err(Error::Invalid(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.accum == 0 {
            return bad("gradient accumulation must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} must be positive", self.lr));
        }
        if !(self.lsq_lr.is_finite() && self.lsq_lr >= 0.0) {
            return bad(format!(
                "step-size learning rate {} must not be negative",
                self.lsq_lr
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "min lr ratio {} must be in [0, 1]",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay >= 0.0 && self.clip >= 0.0) {
            return bad("weight decay and clipping must not be negative".into());
        }
        if !(0.0..1.0).contains(&self.qat_start) {
            return bad(format!(
                "--qat-start {} must be a fraction of the steps in [0, 1)",
                self.qat_start
            ));
        }
        if self.qat != QatMode::None && self.lora.dropout > 0.0 {
            return bad("LoRA dropout applies to unmerged adapters; use it with --qat none".into());
        }
        Ok(())
    }

    /// The step at which fake quantization switches on (under QAT): `floor(qat_start · steps)`,
    /// below `steps` for any fraction below 1, so at least the last step is quantization-aware.
    pub fn qat_start_step(&self) -> usize {
        (self.qat_start as f64 * self.steps as f64).floor() as usize
    }

    fn schedule(&self) -> Schedule {
        Schedule {
            peak: self.lr,
            warmup: self.warmup,
            total: self.steps,
            min_ratio: self.min_lr_ratio,
        }
    }

    fn to_json(&self) -> serde_json::Value {
        json!({
            "rank": self.lora.rank, "alpha": self.lora.alpha, "dropout": self.lora.dropout,
            "rslora": self.lora.rslora,
            "targets": self.lora.targets.iter().map(|t| t.hf_module()).collect::<Vec<_>>(),
            "steps": self.steps, "seq_len": self.seq_len, "accum": self.accum, "lr": self.lr,
            "warmup": self.warmup, "min_lr_ratio": self.min_lr_ratio,
            "weight_decay": self.weight_decay, "clip": self.clip,
            "checkpoint": self.checkpoint.name(), "qat": self.qat.name(), "lsq_lr": self.lsq_lr,
            "qat_start": self.qat_start, "lsq_init": self.lsq_init.name(), "seed": self.seed,
            "eval_every": self.eval_every, "eval_samples": self.eval_samples,
            "save_every": self.save_every,
        })
    }

    fn from_json(j: &serde_json::Value) -> Result<TrainOptions> {
        let bad =
            |k: &str| Error::Invalid(format!("trainer state: option {k:?} missing or malformed"));
        let u = |k: &str| {
            j.get(k)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| bad(k))
        };
        let f = |k: &str| {
            j.get(k)
                .and_then(|v| v.as_f64())
                .map(|v| v as f32)
                .ok_or_else(|| bad(k))
        };
        let s = |k: &str| j.get(k).and_then(|v| v.as_str()).ok_or_else(|| bad(k));
        let targets = j
            .get("targets")
            .and_then(|v| v.as_array())
            .ok_or_else(|| bad("targets"))?
            .iter()
            .map(|t| {
                t.as_str()
                    .ok_or_else(|| bad("targets"))
                    .and_then(Target::parse)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TrainOptions {
            lora: LoraConfig {
                rank: u("rank")?,
                alpha: f("alpha")?,
                targets,
                dropout: f("dropout")?,
                rslora: j
                    .get("rslora")
                    .and_then(|v| v.as_bool())
                    .ok_or_else(|| bad("rslora"))?,
            },
            steps: u("steps")?,
            seq_len: u("seq_len")?,
            accum: u("accum")?,
            lr: f("lr")?,
            warmup: u("warmup")?,
            min_lr_ratio: f("min_lr_ratio")?,
            weight_decay: f("weight_decay")?,
            clip: f("clip")?,
            checkpoint: Checkpoint::parse(s("checkpoint")?)?,
            qat: QatMode::parse(s("qat")?)?,
            // Absent from checkpoints written before `--qat lsq` existed.
            lsq_lr: j
                .get("lsq_lr")
                .and_then(|v| v.as_f64())
                .map_or(TrainOptions::default().lsq_lr, |v| v as f32),
            // Absent from checkpoints written before `--qat-start`: QAT from step 0.
            qat_start: j
                .get("qat_start")
                .and_then(|v| v.as_f64())
                .map_or(0.0, |v| v as f32),
            lsq_init: match j.get("lsq_init").and_then(|v| v.as_str()) {
                Some(v) => GridInit::parse(v)?,
                None => GridInit::Base,
            },
            seed: j
                .get("seed")
                .and_then(|v| v.as_u64())
                .ok_or_else(|| bad("seed"))?,
            eval_every: u("eval_every")?,
            eval_samples: u("eval_samples")?,
            save_every: u("save_every")?,
        })
    }
}

/// One optimizer step, as logged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record {
    /// Steps done after this one.
    pub step: usize,
    /// Mean loss per scored token of the step's sequences.
    pub loss: f64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// Tokens through the model in this step, and the seconds it took.
    pub tokens: usize,
    pub secs: f64,
    pub recomputed_layers: usize,
    pub peak_activation_bytes: usize,
    /// Seconds of `secs` spent fake-quantizing the adapted weights (QAT; 0 otherwise).
    pub fake_quant_secs: f64,
    /// Seconds of `secs` spent recomputing checkpointed segments.
    pub recompute_secs: f64,
    /// Validation loss, when this step ran one.
    pub val_loss: Option<f64>,
}

impl Record {
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.secs.max(1e-9)
    }
}

/// How a step is spread over workers: pipeline stages, each with its layers and threads.
#[derive(Debug, Clone, PartialEq)]
pub struct Stages {
    pub layers: Vec<std::ops::Range<usize>>,
    /// Threads per stage.
    pub threads: Vec<usize>,
    pub schedule: pipe_schedule::Schedule,
}

/// A training run in progress.
pub struct Trainer<'m> {
    pub model: &'m Model,
    pub opts: TrainOptions,
    /// The adapters, their gradients and optimizer moments: one share per pipeline stage (one
    /// share for a single worker).
    parts: Vec<StageState>,
    stages: Stages,
    /// What each stage did in the last step (its timeline and activation memory); under MPI,
    /// this rank's stage only.
    pub last_step: Vec<StageReport>,
    /// Under MPI: this rank's transport, `parts` then holding its own stage's share only.
    rank: Option<&'m mut dyn Transport>,
    /// The grids QAT rounds onto (the base's; learned under `lsq`); empty without QAT.
    pub grids: Grids,
    /// Moments of the learned grids (`lsq`; empty otherwise), stepped at `--lsq-lr`.
    grid_opt: AdamW,
    /// The step at which fake quantization switched on (`None`: plain LoRA so far, or no QAT).
    /// Kept in the checkpoint, so a resume with other `--steps` does not move a switch made.
    pub qat_from: Option<usize>,
    /// Steps done.
    pub step: usize,
    pub history: Vec<Record>,
    train: Vec<Sample>,
    val: Vec<Sample>,
    /// This process holds no data (an MPI rank other than 0, [`Trainer::fed`]): rank 0 sends its
    /// stage what it needs of each micro-batch.
    fed: bool,
}

/// File names inside a checkpoint directory (beside the PEFT adapter files).
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Subdirectory of the output directory that holds the latest checkpoint.
pub const CHECKPOINT_DIR: &str = "checkpoint";

impl<'m> Trainer<'m> {
    /// A fresh run: new adapters (seeded), zero optimizer state.
    pub fn new(
        model: &'m Model,
        opts: TrainOptions,
        train: Vec<Sample>,
        val: Vec<Sample>,
    ) -> Result<Trainer<'m>> {
        if train.is_empty() {
            return Err(Error::Invalid("no training sequences".into()));
        }
        Trainer::build(model, opts, train, val, false)
    }

    /// A fresh run on an MPI rank other than 0, which reads no data: rank 0's trainer (made with
    /// [`Trainer::new`]) sends this rank's stage what it needs of each micro-batch, so this
    /// process never builds the tokenizer nor holds the packed sequences. Give it its rank with
    /// [`Trainer::set_rank`].
    pub fn fed(model: &'m Model, opts: TrainOptions) -> Result<Trainer<'m>> {
        Trainer::build(model, opts, Vec::new(), Vec::new(), true)
    }

    fn build(
        model: &'m Model,
        opts: TrainOptions,
        train: Vec<Sample>,
        val: Vec<Sample>,
        fed: bool,
    ) -> Result<Trainer<'m>> {
        opts.validate()?;
        let grids = match opts.qat {
            QatMode::None => Grids::default(),
            mode => Grids::of_base(model, &opts.lora.targets, mode)?,
        };
        let lora = Lora::new(&model.config, opts.lora.clone(), opts.seed)?;
        let stages = Stages {
            layers: std::iter::once(0..model.config.n_layer).collect(),
            threads: vec![crate::parallel::threads()],
            schedule: pipe_schedule::Schedule::OneFOneB,
        };
        let parts = vec![StageState::new(
            model,
            &lora,
            0..model.config.n_layer,
            opts.weight_decay,
        )];
        let grid_sizes: Vec<usize> = match opts.qat {
            QatMode::Lsq => grids.params().map(|p| p.len()).collect(),
            _ => Vec::new(),
        };
        // From step 0 the base's own grid is exact for `W + s·B·A = W` (B = 0): nothing to set up.
        let qat_from = (opts.qat != QatMode::None && opts.qat_start_step() == 0).then_some(0);
        Ok(Trainer {
            model,
            opts,
            parts,
            stages,
            last_step: Vec::new(),
            rank: None,
            grid_opt: AdamW::new(&grid_sizes, 0.0),
            grids,
            qat_from,
            step: 0,
            history: Vec::new(),
            train,
            val,
            fed,
        })
    }

    /// Continues the run checkpointed in `dir` (an output directory holding `checkpoint/`, or a
    /// checkpoint directory itself). `steps` and `checkpoint` may differ from the saved options
    /// (the first extends or shortens the schedule; the second changes no result); everything else
    /// is taken from the checkpoint.
    pub fn resume(
        model: &'m Model,
        dir: &Path,
        steps: Option<usize>,
        checkpoint: Option<Checkpoint>,
        train: Vec<Sample>,
        val: Vec<Sample>,
    ) -> Result<Trainer<'m>> {
        Trainer::resume_with(model, dir, steps, checkpoint, Some((train, val)))
    }

    /// [`Trainer::resume`] on an MPI rank other than 0, which reads no data ([`Trainer::fed`]);
    /// rank 0 checks that the data are the run's.
    pub fn resume_fed(
        model: &'m Model,
        dir: &Path,
        steps: Option<usize>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<Trainer<'m>> {
        Trainer::resume_with(model, dir, steps, checkpoint, None)
    }

    fn resume_with(
        model: &'m Model,
        dir: &Path,
        steps: Option<usize>,
        checkpoint: Option<Checkpoint>,
        data: Option<(Vec<Sample>, Vec<Sample>)>,
    ) -> Result<Trainer<'m>> {
        let dir = find_checkpoint(dir)?;
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let j: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: {e}", state_path.display())))?;
        let mut opts = TrainOptions::from_json(&j["options"])?;
        if let Some(s) = steps {
            opts.steps = s;
        }
        if let Some(c) = checkpoint {
            opts.checkpoint = c;
        }
        let mut t = match data {
            Some((train, val)) => Trainer::new(model, opts, train, val)?,
            None => Trainer::fed(model, opts)?,
        };
        let fp = j["data"]["fingerprint"].as_str().unwrap_or_default();
        if !t.fed && fp != t.data_fingerprint() {
            return Err(Error::Invalid(format!(
                "{}: the training data differ from the run being resumed (same file, --seq-len \
                 and --val-split are needed to continue exactly)",
                dir.display()
            )));
        }
        let lora = Lora::load(&dir, &model.config)?;
        if lora.config != t.opts.lora {
            return Err(Error::Invalid(format!(
                "{}: adapter config differs from the trainer state",
                dir.display()
            )));
        }
        t.parts[0].lora = lora;
        if let Some(state) = fake_quant::load_state(&dir)? {
            state.apply(&mut t.grids)?;
        }
        t.step = j["step"].as_u64().unwrap_or(0) as usize;
        // Written since `--qat-start`: null before the switch; absent before that option, when
        // QAT (if any) ran from step 0, as `Trainer::new` has set.
        if let Some(v) = j.get("qat_from") {
            t.qat_from = v.as_u64().map(|v| v as usize);
        }
        let p = &mut t.parts[0];
        p.opt.t = j["optimizer_t"].as_u64().unwrap_or(0);
        // The grids' optimizer started at the switch (one update per step since).
        t.grid_opt.t = match t.qat_from {
            Some(from) => p.opt.t.saturating_sub(from as u64),
            None => 0,
        };
        let opt_file = SafetensorsFile::open(dir.join(OPTIMIZER_FILE))?;
        let moments = p.opt.m.iter_mut().zip(&mut p.opt.v);
        let grid_moments = t.grid_opt.m.iter_mut().zip(&mut t.grid_opt.v);
        for (i, (m, v)) in moments.chain(grid_moments).enumerate() {
            for (name, buf) in [(format!("m.{i}"), m), (format!("v.{i}"), v)] {
                let e = opt_file.get(&name).ok_or_else(|| {
                    Error::Invalid(format!("{}: {name} missing", opt_file.path.display()))
                })?;
                if e.n_elements() != buf.len() || e.dtype != Dtype::F32 {
                    return Err(Error::Invalid(format!(
                        "{}: {name} has the wrong shape",
                        opt_file.path.display()
                    )));
                }
                st::to_f32(e.dtype, opt_file.data(e), buf).map_err(Error::Invalid)?;
            }
        }
        t.history = j["history"]
            .as_array()
            .map(|a| a.iter().filter_map(record_from_json).collect())
            .unwrap_or_default();
        Ok(t)
    }

    /// A short fingerprint of the packed data, so a resume can tell it is fed the same.
    fn data_fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for s in self.train.iter().chain(&self.val) {
            for &t in &s.tokens {
                h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
            }
            for &b in &s.scored {
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        }
        format!("{}:{}:{h:016x}", self.train.len(), self.val.len())
    }

    /// Spreads the following steps over pipeline stages (`stages.layers`, contiguous from layer
    /// 0 to the last), each stage taking its share of the adapters and optimizer moments.
    pub fn set_stages(&mut self, stages: Stages) -> Result<()> {
        self.split(stages, None)
    }

    /// [`Trainer::set_stages`], keeping only stage `only`'s share when given (an MPI rank's: the
    /// other stages' adapters, gradients and moments are never allocated).
    fn split(&mut self, stages: Stages, only: Option<usize>) -> Result<()> {
        let n_layer = self.model.config.n_layer;
        let contiguous = stages.layers.first().map(|r| r.start) == Some(0)
            && stages.layers.last().map(|r| r.end) == Some(n_layer)
            && stages.layers.windows(2).all(|w| w[0].end == w[1].start)
            && stages.layers.iter().all(|r| !r.is_empty());
        if !contiguous || stages.threads.len() != stages.layers.len() {
            return Err(Error::Invalid(format!(
                "stages {:?} with threads {:?}: expected non-empty contiguous layer ranges \
                 covering 0..{n_layer}, one thread count each",
                stages.layers, stages.threads
            )));
        }
        let Snapshot { lora, t, m, v } = self.snapshot();
        let (mut m, mut v) = (m.into_iter(), v.into_iter());
        let mut parts = Vec::new();
        for (i, r) in stages.layers.iter().enumerate() {
            // Moments come in `lora.params()` order: layer by layer, each adapter's A then B.
            let n: usize = lora.layers[r.clone()]
                .iter()
                .map(|l| 2 * l.iter().flatten().count())
                .sum();
            if only.is_some_and(|s| s != i) {
                m.by_ref().take(n).for_each(drop);
                v.by_ref().take(n).for_each(drop);
                continue;
            }
            let mut p = StageState::new(self.model, &lora, r.clone(), self.opts.weight_decay);
            debug_assert_eq!(p.opt.m.len(), n);
            p.opt.t = t;
            for (pm, pv) in p.opt.m.iter_mut().zip(&mut p.opt.v) {
                *pm = m.next().expect("one moment per parameter");
                *pv = v.next().expect("one moment per parameter");
            }
            parts.push(p);
        }
        self.parts = parts;
        self.stages = stages;
        // The one-process state just dropped was many small buffers: hand their pages back.
        crate::eval::bench::release_free_memory();
        Ok(())
    }

    pub fn stages(&self) -> &Stages {
        &self.stages
    }

    /// The adapters, joined from the stages' shares.
    pub fn lora(&self) -> Lora {
        let mut lora = self.parts[0].lora.clone();
        for p in &self.parts[1..] {
            lora.absorb(&p.lora);
        }
        lora
    }

    /// The last step's gradients (clipped), joined from the stages' shares.
    pub fn grads(&self) -> Lora {
        let mut g = self.parts[0].grads.clone();
        for p in &self.parts[1..] {
            g.absorb(&p.grads);
        }
        g
    }

    /// Makes this process the MPI rank of stage `t.stage()` of `stages`: it keeps only that
    /// stage's share of the adapters and optimizer moments, and its steps exchange hidden states
    /// and gradients with the other ranks through `t`.
    pub fn set_rank(&mut self, t: &'m mut dyn Transport, stages: Stages) -> Result<()> {
        if t.n_stages() != stages.layers.len() {
            return Err(Error::Invalid(format!(
                "{} ranks for {} stages",
                t.n_stages(),
                stages.layers.len()
            )));
        }
        if self.opts.qat == QatMode::Lsq {
            // Each rank would learn its own layers' grids, and saving them needs them gathered
            // like the adapters; until then, learned step sizes train on one process.
            return Err(Error::Invalid(
                "--qat lsq does not run over MPI ranks yet; use --stages over threads, or                  --qat ste|clipped"
                    .into(),
            ));
        }
        if self.fed != (t.stage() != 0) {
            return Err(Error::Invalid(format!(
                "MPI rank {}: {}",
                t.stage(),
                if self.fed {
                    "rank 0 reads the training data: make its trainer with the data"
                } else {
                    "only rank 0 reads the training data: make this rank's trainer with \
                     Trainer::fed"
                }
            )));
        }
        crate::eval::bench::map_large_buffers_apart();
        self.split(stages, Some(t.stage()))?;
        self.rank = Some(t);
        Ok(())
    }

    /// This process's adapters and optimizer moments (all of them but under MPI).
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            lora: self.lora(),
            t: self.parts[0].opt.t,
            m: self.parts.iter().flat_map(|p| p.opt.m.clone()).collect(),
            v: self.parts.iter().flat_map(|p| p.opt.v.clone()).collect(),
        }
    }

    /// Every stage's adapters and moments, on stage 0 (`None` on the other MPI ranks, which
    /// send theirs to it): what saving needs (a few MiB; the callers drop it once written).
    /// Under MPI every rank must call it at the same point.
    fn gather(&mut self) -> Result<Option<Snapshot>> {
        let mut all = self.snapshot();
        let Some(t) = self.rank.as_deref_mut() else {
            return Ok(Some(all));
        };
        if t.stage() != 0 {
            let flat: Vec<f32> = all
                .lora
                .params()
                .chain(all.m.iter().map(|v| v.as_slice()))
                .chain(all.v.iter().map(|v| v.as_slice()))
                .flatten()
                .copied()
                .collect();
            t.send(0, Message::Share(flat))?;
            return Ok(None);
        }
        for s in 1..t.n_stages() {
            let mut share = Lora::zeros(&self.model.config, self.opts.lora.clone());
            share.keep_layers(self.stages.layers[s].clone());
            let sizes: Vec<usize> = share.params().map(|p| p.len()).collect();
            let flat = match t.recv(s)? {
                Message::Share(v) if v.len() == 3 * sizes.iter().sum::<usize>() => v,
                other => {
                    return Err(Error::Model(format!(
                        "rank 0 expected the adapters of stage {s}, got {}",
                        other.kind()
                    )))
                }
            };
            let mut rest = flat.as_slice();
            let mut take = |k: usize| {
                let (a, b) = rest.split_at(k);
                rest = b;
                a.to_vec()
            };
            for p in share.params_mut() {
                *p = take(p.len());
            }
            all.m.extend(sizes.iter().map(|&k| take(k)));
            all.v.extend(sizes.iter().map(|&k| take(k)));
            all.lora.absorb(&share);
        }
        Ok(Some(all))
    }

    /// The last step's forwards and backwards on every stage, timed from the step's start.
    pub fn timeline(&self) -> Vec<Slot> {
        self.last_step.iter().flat_map(|r| r.ops.clone()).collect()
    }

    /// One optimizer update over `accum` sequences: one micro-batch each, through the stages in
    /// the order of their schedule (one stage: one sequence after another).
    pub fn train_step(&mut self) -> Result<Record> {
        let start = Instant::now();
        if self.opts.qat != QatMode::None
            && self.qat_from.is_none()
            && self.step >= self.opts.qat_start_step()
        {
            self.start_qat()?;
        }
        let qat = self.qat_mode();
        let o = &self.opts;
        if self.fed && self.rank.is_none() {
            return Err(Error::Invalid(
                "this trainer holds no data: it runs as an MPI rank other than 0 (set_rank)".into(),
            ));
        }
        let n = self.train.len();
        // On a fed rank, no sample is picked (rank 0 sends what this stage needs).
        let picks: Vec<usize> = match self.fed {
            true => Vec::new(),
            false => (0..o.accum)
                .map(|i| data::sample_index(o.seed, n, self.step * o.accum + i))
                .collect(),
        };
        let total: usize = picks.iter().map(|&i| self.train[i].n_scored()).sum();
        // Under QAT the adapted weights are quantized once per step (under MPI, this rank's).
        let fq_start = Instant::now();
        let fq = match qat {
            QatMode::None => None,
            mode => Some(FakeQuant::new(self.model, &self.lora(), mode, &self.grids)?),
        };
        let fake_quant_secs = match fq {
            Some(_) => fq_start.elapsed().as_secs_f64(),
            None => 0.0,
        };
        let seed = |k: usize| Some(mix(o.seed, (self.step * o.accum + k) as u64));
        let micro = match self.fed {
            true => (0..o.accum).map(|k| MicroBatch::fed(seed(k))).collect(),
            false => picks
                .iter()
                .enumerate()
                .map(|(k, &i)| {
                    let s = &self.train[i];
                    MicroBatch {
                        tokens: &s.tokens,
                        weight: s
                            .scored
                            .iter()
                            .map(|&b| if b { 1.0 / total as f32 } else { 0.0 })
                            .collect(),
                        dropout_seed: seed(k),
                    }
                })
                .collect(),
        };
        let lr = o.schedule().lr(self.step);
        let job = StepJob {
            model: self.model,
            merged: fq.as_ref().map(|f| f as &dyn MergedWeight),
            checkpoint: o.checkpoint,
            schedule: self.stages.schedule,
            micro,
            clip: o.clip,
            lr,
        };
        // Known on rank 0 (a fed rank counts none).
        let tokens = job
            .micro
            .iter()
            .map(|mb| mb.tokens.len().saturating_sub(1))
            .sum();
        let reports = match self.rank.as_deref_mut() {
            Some(t) => {
                pipe::stage_step(t, &mut self.parts[0], &job, Instant::now()).map(|r| vec![r])
            }
            None => pipe::step_threads(&mut self.parts, &job, &self.stages.threads),
        }
        .map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("step {}: {m}", self.step + 1)),
            e => e,
        })?;
        let r0 = &reports[0];
        if let Some(fq) = fq.filter(|_| qat == QatMode::Lsq) {
            // The grids' gradients were counted in the global norm; clip them by it too.
            let mut gg = fq.grid_grads();
            let mut g: Vec<&mut Vec<f32>> = gg.params_mut().collect();
            scale_to_norm(&mut g, r0.grad_norm, o.clip);
            let grads: Vec<&[f32]> = gg.params().collect();
            let mut params: Vec<&mut Vec<f32>> = self.grids.params_mut().collect();
            self.grid_opt
                .step(&mut params, &grads, lr * o.lsq_lr / o.lr)?;
        }
        self.step += 1;
        let rec = Record {
            step: self.step,
            loss: r0.loss,
            lr,
            grad_norm: r0.grad_norm,
            tokens,
            secs: start.elapsed().as_secs_f64(),
            recomputed_layers: reports.iter().map(|r| r.recomputed_layers).sum(),
            peak_activation_bytes: reports
                .iter()
                .map(|r| r.peak_activation_bytes)
                .max()
                .unwrap_or(0),
            fake_quant_secs,
            recompute_secs: reports.iter().map(|r| r.recompute_secs).sum(),
            val_loss: None,
        };
        self.last_step = reports;
        self.history.push(rec);
        Ok(rec)
    }

    /// The QAT mode in force at this point of the run: `opts.qat` once fake quantization has
    /// switched on, `None` (plain LoRA) before.
    pub fn qat_mode(&self) -> QatMode {
        match self.qat_from {
            Some(_) => self.opts.qat,
            None => QatMode::None,
        }
    }

    /// Switches fake quantization on at this step (`--qat-start`). `lsq` with `--lsq-init
    /// search` after step 0 starts from the grid the search chooses for the adapted weights as
    /// they stand, which is what a merge of the plain adapters trained so far would write; its
    /// grids' optimizer starts afresh (moments zero, bias correction from its first update).
    fn start_qat(&mut self) -> Result<()> {
        if self.opts.qat == QatMode::Lsq {
            if self.step > 0 && self.opts.lsq_init == GridInit::Search {
                self.grids = self.grids.searched(self.model, &self.lora())?;
            }
            let sizes: Vec<usize> = self.grids.params().map(|p| p.len()).collect();
            self.grid_opt = AdamW::new(&sizes, 0.0);
        }
        self.qat_from = Some(self.step);
        Ok(())
    }

    /// Mean loss per scored token over the validation sequences (the first `eval_samples`, or
    /// all), with the adapters as trained (fake-quantized under QAT); `None` without any. It runs
    /// through the stages like a training forward, each stage with its own layers and adapters
    /// (under MPI every rank calls it at the same point; every rank learns the result).
    pub fn evaluate(&mut self) -> Result<Option<f64>> {
        let k = match self.opts.eval_samples {
            0 => self.val.len(),
            k => k.min(self.val.len()),
        };
        // Under MPI `self.lora()` is this rank's share: the fake quantizer of its layers.
        let fq = fake_quant_of(self.model, &self.lora(), self.qat_mode(), &self.grids)?;
        let job = EvalJob {
            model: self.model,
            merged: fq.as_ref().map(|f| f as &dyn MergedWeight),
            micro: self.val[..k]
                .iter()
                .map(|s| MicroBatch {
                    tokens: &s.tokens,
                    weight: s.scored.iter().map(|&b| f32::from(b)).collect(),
                    dropout_seed: None,
                })
                .collect(),
        };
        let totals = match self.rank.as_deref_mut() {
            Some(t) => pipe::stage_eval(t, &self.parts[0], &job)?,
            None => pipe::eval_threads(&mut self.parts, &job, &self.stages.threads)?,
        };
        Ok((totals.sequences > 0).then(|| totals.loss / totals.weight.max(1.0)))
    }

    /// Runs until `opts.steps`, validating and checkpointing into `out` as configured; stops
    /// early with a checkpoint (and [`Error::Interrupted`]) once `cancel` is set. `on_step` sees
    /// every record. Writes the adapters and the loss curve into `out` at the end.
    pub fn run(
        &mut self,
        out: &Path,
        base_name: &str,
        cancel: &AtomicBool,
        mut on_step: impl FnMut(&Record),
    ) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        while self.step < self.opts.steps {
            if cancel.load(Ordering::Relaxed) {
                self.save_checkpoint(out, base_name)?;
                return Err(Error::Interrupted);
            }
            let mut rec = self.train_step()?;
            let last = self.step == self.opts.steps;
            let ev = self.opts.eval_every;
            if (ev > 0 && self.step.is_multiple_of(ev)) || last {
                rec.val_loss = self.evaluate()?;
                if let Some(r) = self.history.last_mut() {
                    r.val_loss = rec.val_loss;
                }
            }
            on_step(&rec);
            let se = self.opts.save_every;
            if (se > 0 && self.step.is_multiple_of(se)) || last {
                self.save_checkpoint(out, base_name)?;
            }
        }
        match self.gather()? {
            Some(all) => {
                self.save_adapters(out, base_name, &all.lora)?;
                self.plot(&out.join("loss.png"))
            }
            None => Ok(()),
        }
    }

    /// The PEFT adapter files, and under QAT what `pare merge` needs to store what was trained
    /// ([`fake_quant::save_state`]; `lsq`'s grids go into the adapter file).
    fn save_adapters(&self, dir: &Path, base_name: &str, lora: &Lora) -> Result<()> {
        // Before the switch (`--qat-start`) the adapters are plain LoRA's, and saved as such.
        let qat = self.qat_mode();
        let extra = match qat {
            QatMode::Lsq => fake_quant::grid_tensors(&self.grids),
            _ => Vec::new(),
        };
        lora.save_with(dir, base_name, extra)?;
        let state = dir.join(fake_quant::STATE_FILE);
        match qat {
            QatMode::None if state.exists() => {
                // A plain run must not inherit an earlier QAT run's state in the same directory.
                std::fs::remove_file(&state).map_err(|e| Error::io(&state, e))
            }
            QatMode::None => Ok(()),
            mode => fake_quant::save_state(dir, mode, &self.grids),
        }
    }

    /// Writes `out/checkpoint/` whole: the files go to a fresh directory that then replaces the
    /// old checkpoint by renames, so an interruption leaves the old or the new one complete.
    /// Under MPI every rank calls it; rank 0 writes.
    pub fn save_checkpoint(&mut self, out: &Path, base_name: &str) -> Result<()> {
        let Some(all) = self.gather()? else {
            return Ok(());
        };
        let ck = out.join(CHECKPOINT_DIR);
        let tmp = out.join(format!("{CHECKPOINT_DIR}.tmp"));
        let old = out.join(format!("{CHECKPOINT_DIR}.old"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        self.save_adapters(&tmp, base_name, &all.lora)?;
        let mut tensors = Vec::new();
        // The grids' moments (`lsq`) follow the adapters', as one optimizer's would.
        let (gm, gv) = (self.grid_opt.m.clone(), self.grid_opt.v.clone());
        let (ms, vs) = (all.m.into_iter().chain(gm), all.v.into_iter().chain(gv));
        for (i, (m, v)) in ms.zip(vs).enumerate() {
            for (name, buf) in [(format!("m.{i}"), m), (format!("v.{i}"), v)] {
                let bytes: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push((
                    name,
                    LazyTensor::new(Dtype::F32, vec![buf.len()], move || bytes.clone()),
                ));
            }
        }
        st::write(&tmp.join(OPTIMIZER_FILE), tensors)?;
        let state = json!({
            "step": self.step,
            "optimizer_t": all.t,
            "qat_from": self.qat_from,
            "options": self.opts.to_json(),
            "data": {"fingerprint": self.data_fingerprint()},
            "history": self.history.iter().map(record_to_json).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&state).expect("a JSON value serializes");
        crate::atomic_file::write(&tmp.join(STATE_FILE), text.as_bytes())?;
        sync_dir(&tmp)?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        if ck.exists() {
            std::fs::rename(&ck, &old).map_err(|e| Error::io(&ck, e))?;
        }
        std::fs::rename(&tmp, &ck).map_err(|e| Error::io(&tmp, e))?;
        sync_dir(out)?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        self.plot(&out.join("loss.png"))
    }

    /// The loss curve: training loss per step and validation loss where measured.
    pub fn plot(&self, path: &Path) -> Result<()> {
        use crate::plot::{Chart, Series, Style};
        let train: Vec<(f64, f64)> = self
            .history
            .iter()
            .map(|r| (r.step as f64, r.loss))
            .collect();
        let val: Vec<(f64, f64)> = self
            .history
            .iter()
            .filter_map(|r| r.val_loss.map(|v| (r.step as f64, v)))
            .collect();
        let mut series = vec![Series::new("train", train, Style::Line)];
        if !val.is_empty() {
            series.push(Series::new("validation", val, Style::LineAndPoints));
        }
        let chart = Chart {
            title: format!(
                "pare tune: LoRA r={} on {}, qat {}",
                self.opts.lora.rank,
                self.opts
                    .lora
                    .targets
                    .iter()
                    .map(|t| t.hf_module())
                    .collect::<Vec<_>>()
                    .join(","),
                self.opts.qat.name()
            ),
            x_label: "step".into(),
            y_label: "loss (nats/token)".into(),
            log_y: false,
            series,
        };
        crate::plot::write_png(path, &chart)
    }
}

/// Adapters and optimizer state, as saved.
struct Snapshot {
    lora: Lora,
    /// Optimizer steps taken.
    t: u64,
    /// Moments per parameter tensor, in `lora.params()` order.
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The checkpoint to resume from: `dir/checkpoint`, else the leftover `dir/checkpoint.old` of an
/// interrupted swap, else `dir` itself.
fn find_checkpoint(dir: &Path) -> Result<PathBuf> {
    for c in [
        dir.join(CHECKPOINT_DIR),
        dir.join(format!("{CHECKPOINT_DIR}.old")),
        dir.to_path_buf(),
    ] {
        if c.join(STATE_FILE).exists() {
            return Ok(c);
        }
    }
    Err(Error::Invalid(format!(
        "{}: no checkpoint to resume ({STATE_FILE} not found)",
        dir.display()
    )))
}

/// This step's fake quantizer under QAT: the adapted weights quantized once onto `grids`.
fn fake_quant_of<'g>(
    model: &Model,
    lora: &Lora,
    mode: QatMode,
    grids: &'g Grids,
) -> Result<Option<FakeQuant<'g>>> {
    match mode {
        QatMode::None => Ok(None),
        mode => FakeQuant::new(model, lora, mode, grids).map(Some),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^ (z >> 27)
}

fn record_to_json(r: &Record) -> serde_json::Value {
    json!({
        "step": r.step, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "tokens": r.tokens,
        "secs": r.secs, "recomputed_layers": r.recomputed_layers,
        "peak_activation_bytes": r.peak_activation_bytes, "val_loss": r.val_loss,
        "fake_quant_secs": r.fake_quant_secs, "recompute_secs": r.recompute_secs,
    })
}

fn record_from_json(j: &serde_json::Value) -> Option<Record> {
    Some(Record {
        step: j["step"].as_u64()? as usize,
        loss: j["loss"].as_f64()?,
        lr: j["lr"].as_f64()? as f32,
        grad_norm: j["grad_norm"].as_f64()? as f32,
        tokens: j["tokens"].as_u64()? as usize,
        secs: j["secs"].as_f64()?,
        recomputed_layers: j["recomputed_layers"].as_u64()? as usize,
        peak_activation_bytes: j["peak_activation_bytes"].as_u64()? as usize,
        fake_quant_secs: j["fake_quant_secs"].as_f64().unwrap_or(0.0),
        recompute_secs: j["recompute_secs"].as_f64().unwrap_or(0.0),
        val_loss: j["val_loss"].as_f64(),
    })
}
