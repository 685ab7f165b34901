//! Splitting a model's layers into contiguous pipeline stages, balanced by cost.
//!
//! Each layer has a weight size and a cost (seconds per token, measured on this machine by
//! [`Costs::measure`], or multiply-accumulates per token from the shapes by [`Costs::estimate`],
//! which touches no weights so that every MPI rank derives the same plan without reading the
//! others' layers). The token embeddings count on the first stage and the output head on the last.
//! [`partition`] picks the contiguous split that minimises the most expensive stage (a small
//! dynamic programme), subject to a memory limit per worker when one is given; [`plan_for`]
//! prices a split given by hand (`--stage-layers 0-9,10-19,20-29`).

use std::ops::Range;
use std::time::Instant;

use super::schedule::{self, max_in_flight, Schedule};
use crate::error::{Error, Result};
use crate::model::backward::{LayerTape, Trainable};
use crate::model::forward::scratch_bytes;
use crate::model::{Batch, Logits, Lora, LoraConfig, Model, State};
use crate::train::checkpointing::Checkpoint;
use crate::train::memory;
use crate::train::trainer::TrainOptions;

/// What each part of the model weighs and costs.
#[derive(Debug, Clone, PartialEq)]
pub struct Costs {
    /// Weight bytes of each layer (matrices and norms).
    pub layer_bytes: Vec<u64>,
    /// Cost of each layer per token (seconds when measured, multiply-accumulates when estimated).
    pub layer_cost: Vec<f64>,
    /// The token embeddings: on the first stage.
    pub embed_bytes: u64,
    pub embed_cost: f64,
    /// Output norm and head: on the last stage (the embedding matrix again when tied).
    pub head_bytes: u64,
    pub head_cost: f64,
    /// Whether the costs are seconds measured on this machine.
    pub measured: bool,
    /// Training's backward costs (then the costs above are training's forward: the last stage's
    /// head includes the loss and its gradient, which its forward computes).
    pub backward: Option<BackwardCosts>,
}

/// The backward pass's cost of each part (unit as in [`Costs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct BackwardCosts {
    pub layer: Vec<f64>,
    pub embed: f64,
    pub head: f64,
}

impl Costs {
    /// Costs from the shapes alone: multiply-accumulates per token of every matrix.
    pub fn estimate(model: &Model) -> Costs {
        let w = &model.weights;
        let macs = |m: &crate::quant::matmul::QMatrix| (m.rows * m.cols) as f64;
        let layer_cost = w
            .layers
            .iter()
            .map(|l| l.matrices().map(macs).iter().sum())
            .collect();
        Costs {
            layer_bytes: layer_bytes(model),
            layer_cost,
            embed_bytes: w.token_embd.n_bytes() as u64,
            embed_cost: model.config.n_embd as f64,
            head_bytes: head_bytes(model),
            head_cost: macs(&w.output),
            measured: false,
            backward: None,
        }
    }

    /// Training's costs from the shapes alone: a layer's backward does about its forward's
    /// multiply-accumulates (the frozen weights need only the gradient at their input); the
    /// last stage's forward does the head twice (logits, and the gradient at its input).
    pub fn estimate_training(model: &Model) -> Costs {
        let c = Costs::estimate(model);
        Costs {
            head_cost: 2.0 * c.head_cost,
            backward: Some(BackwardCosts {
                layer: c.layer_cost.clone(),
                embed: 0.0,
                head: 0.0,
            }),
            ..c
        }
    }

    /// Training's costs measured on this machine, in seconds per token of a sequence of
    /// `n_tokens`: each layer's forward (keeping its tape) and backward with adapters `lora`,
    /// the embedding lookup, and the head with the loss and its gradient (best of two runs), on
    /// one thread as a stage runs them when the stages share the cores (the head's share of
    /// the work differs with the thread count). Touches every weight: for threads, not for an
    /// MPI rank.
    pub fn measure_training(model: &Model, lora: &LoraConfig, n_tokens: usize) -> Result<Costs> {
        crate::parallel::with_threads(1, || Self::measure_training_here(model, lora, n_tokens))
    }

    fn measure_training_here(model: &Model, lora: &LoraConfig, n_tokens: usize) -> Result<Costs> {
        let c = &model.config;
        let n = n_tokens.max(1);
        let tokens: Vec<u32> = (0..=n).map(|i| (i * 7919 % c.n_vocab) as u32).collect();
        let adapters = Lora::zeros(c, lora.clone());
        let mut grads = Lora::zeros(c, lora.clone());
        let tr = Trainable {
            model,
            lora: &adapters,
            merged: None,
            dropout_seed: None,
        };
        let best =
            |f: &mut dyn FnMut() -> Result<f64>| -> Result<f64> { Ok(f()?.min(f()?) / n as f64) };
        let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let t = Instant::now();
            f()?;
            Ok(t.elapsed().as_secs_f64())
        };
        // Each layer and the head take the hidden states the layers before them made: the raw
        // embeddings would give the head logits far apart, whose softmax underflows into
        // subnormal numbers that made it five times slower than in training.
        let mut x0 = tr.embed(&tokens[..n])?;
        let embed_cost = best(&mut || timed(&mut || tr.embed(&tokens[..n]).map(drop)))?;
        let (mut layer_cost, mut layer_back) = (Vec::new(), Vec::new());
        for l in 0..c.n_layer {
            let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
            let mut out = Vec::new();
            for _ in 0..2 {
                let mut x = x0.clone();
                let mut tapes = Vec::new();
                fwd = fwd.min(timed(&mut || {
                    tapes = tr.forward_layers(l..l + 1, &mut x, true)?;
                    Ok(())
                })?);
                let mut dx = vec![1e-3f32; x.len()];
                bwd = bwd.min(timed(&mut || {
                    tr.backward_layers(l..l + 1, &tapes, &mut dx, &mut grads)
                })?);
                out = x;
            }
            x0 = out;
            layer_cost.push(fwd / n as f64);
            layer_back.push(bwd / n as f64);
        }
        let weight = vec![1.0f32; n];
        let mut dx = vec![0.0f32; x0.len()];
        let head_cost = best(&mut || {
            timed(&mut || {
                tr.head_loss(&x0, &tokens[1..], &weight, Some(&mut dx))
                    .map(drop)
            })
        })?;
        Ok(Costs {
            measured: true,
            embed_cost,
            layer_cost,
            head_cost,
            backward: Some(BackwardCosts {
                layer: layer_back,
                embed: 0.0,
                head: 0.0,
            }),
            ..Costs::estimate(model)
        })
    }

    /// Costs measured on this machine: each layer, the embedding and the head run alone on a
    /// batch of `n_tokens` positions (after one warm-up run), in seconds per token. Touches every
    /// weight, so it is for a process that holds the whole model (threads), not for an MPI rank.
    pub fn measure(model: &Model, n_tokens: usize) -> Result<Costs> {
        let c = &model.config;
        let n = n_tokens.max(1);
        let tokens: Vec<u32> = (0..n).map(|i| (i * 7919 % c.n_vocab) as u32).collect();
        let mut hidden = Vec::new();
        let mut embed = State::for_layers(model, n, 0..0)?;
        let time = |state: &mut State, batch: Batch<'_>, out: &mut Vec<f32>| -> Result<f64> {
            let mut best = f64::INFINITY;
            for _ in 0..2 {
                state.reset();
                let t = Instant::now();
                model.forward_stage(state, batch, Logits::All, out)?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best / n as f64)
        };
        let embed_cost = time(&mut embed, Batch::Tokens(&tokens), &mut hidden)?;
        let x = hidden.clone();
        let mut out = Vec::new();
        let mut layer_cost = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let mut st = State::for_layers(model, n, l..l + 1)?;
            layer_cost.push(time(&mut st, Batch::Hidden(&x), &mut out)?);
        }
        let mut head = State::for_layers(model, n, c.n_layer..c.n_layer)?;
        let head_cost = time(&mut head, Batch::Hidden(&x), &mut out)?;
        Ok(Costs {
            measured: true,
            embed_cost,
            layer_cost,
            head_cost,
            ..Costs::estimate(model)
        })
    }

    pub fn n_layer(&self) -> usize {
        self.layer_bytes.len()
    }
}

fn layer_bytes(model: &Model) -> Vec<u64> {
    model
        .weights
        .layers
        .iter()
        .map(|l| {
            let m: usize = l.matrices().iter().map(|m| m.n_bytes()).sum();
            let norms = l.attn_norm.len()
                + l.ffn_norm.len()
                + l.q_norm.as_ref().map_or(0, Vec::len)
                + l.k_norm.as_ref().map_or(0, Vec::len);
            (m + 4 * norms) as u64
        })
        .collect()
}

fn head_bytes(model: &Model) -> u64 {
    (model.weights.output.n_bytes() + 4 * model.weights.output_norm.len()) as u64
}

/// The run the memory estimate is for.
#[derive(Debug, Clone, PartialEq)]
pub struct RunShape {
    /// Positions each stage's KV cache holds (the chunk or context size).
    pub n_ctx: usize,
    /// Positions per micro-batch (the hidden states that travel between stages).
    pub mb_tokens: usize,
    /// Logit rows the last stage holds at once: a slice of scored rows for perplexity
    /// ([`crate::eval::score::SLICE_ROWS`]: it reduces them there and sends on only per-token
    /// numbers), 1 for generation (sent to the first stage, which holds that row too).
    pub logits_rows: usize,
    pub n_vocab: usize,
    /// Bytes of one KV cache position of one layer (keys and values, in the model's cache type).
    pub kv_bytes_per_pos: usize,
    /// Scratch buffers of one stage's state.
    pub scratch_bytes: usize,
    pub n_embd: usize,
    /// A training run (`pare tune --stages`): stages are priced by what training keeps, not by
    /// inference's KV cache, and split to minimise the simulated step.
    pub training: Option<TrainShape>,
}

impl RunShape {
    pub fn new(model: &Model, n_ctx: usize, mb_tokens: usize, logits_rows: usize) -> RunShape {
        let c = &model.config;
        RunShape {
            n_ctx,
            mb_tokens,
            logits_rows,
            n_vocab: c.n_vocab,
            kv_bytes_per_pos: model.cache_type().bytes_per_position(c),
            scratch_bytes: scratch_bytes(c, n_ctx),
            n_embd: c.n_embd,
            training: None,
        }
    }

    /// The shape of training `opts` (one sequence per micro-batch, `n_micro` of them a step)
    /// under `schedule`.
    pub fn training(
        model: &Model,
        opts: &TrainOptions,
        schedule: Schedule,
        n_micro: usize,
    ) -> RunShape {
        let c = &model.config;
        let n = opts.seq_len;
        let state = memory::layer_state_bytes(model, opts);
        RunShape {
            training: Some(TrainShape {
                schedule,
                n_micro,
                checkpoint: opts.checkpoint,
                lora: opts.lora.clone(),
                tape_bytes: LayerTape::bytes_for(c, n),
                x_bytes: 4 * n * c.n_embd,
                layer_state_bytes: state
                    .adapters
                    .iter()
                    .zip(&state.qat)
                    .map(|(a, q)| (a + q) as u64)
                    .collect(),
                head_bytes: memory::head_bytes(model, n) as u64,
                work_bytes: memory::work_bytes(model, opts) as u64,
                runtime_bytes: memory::RUNTIME_BYTES as u64,
            }),
            ..RunShape::new(model, n, n, n)
        }
    }
}

/// What a training step keeps on each stage, beside its weights (see [`crate::train::memory`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainShape {
    pub schedule: Schedule,
    /// Micro-batches (sequences) per step.
    pub n_micro: usize,
    pub checkpoint: Checkpoint,
    /// The adapters trained (to time the layers with them).
    pub lora: LoraConfig,
    /// One layer's tape for one sequence, and one sequence's hidden states.
    pub tape_bytes: usize,
    pub x_bytes: usize,
    /// Adapters, gradients, AdamW moments (and QAT's copies) of each layer.
    pub layer_state_bytes: Vec<u64>,
    /// The last stage's logits of one sequence and the head's buffers.
    pub head_bytes: u64,
    /// The products' work buffers, on every stage.
    pub work_bytes: u64,
    /// The process beside the model (code, tokenizer, data, allocator), per worker.
    pub runtime_bytes: u64,
}

impl TrainShape {
    /// Micro-batches whose activations stage `index` of `n_stages` holds at once: `n_micro` under
    /// GPipe, `n_stages - index` (at most `n_micro`) under 1F1B.
    pub fn live(&self, index: usize, n_stages: usize) -> usize {
        let steps = self.schedule.steps(n_stages, self.n_micro);
        steps.get(index).map_or(0, |s| max_in_flight(s))
    }
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    pub layers: Range<usize>,
    pub weight_bytes: u64,
    /// Hidden states one micro-batch carries out of (or into) this stage.
    pub activation_bytes: u64,
    pub kv_bytes: u64,
    /// Training: the micro-batches' activations the schedule keeps live on this stage at once
    /// (`live`), stashed between their forward and backward (`stashed_bytes` for all of them);
    /// 0 for inference.
    pub live: usize,
    pub stashed_bytes: u64,
    /// Training: adapters, their gradients and optimizer moments; 0 for inference.
    pub state_bytes: u64,
    /// Inference: weights + KV cache + scratch + two micro-batches of activations in flight +
    /// logits kept. Training: weights + adapter state + stashed activations (and what
    /// checkpointing re-makes) + work buffers + the head's logits (last stage) + runtime.
    pub peak_bytes: u64,
    /// Sum of the stage's costs per token (unit as in [`Costs`]; training: forward and backward).
    pub cost: f64,
}

/// Contiguous stages covering every layer once, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub stages: Vec<StagePlan>,
    pub measured: bool,
    /// Training: the step's simulated time and bubble under its schedule, with each stage's
    /// forward and backward costs (unit as in [`Costs`]).
    pub simulated: Option<(f64, f64)>,
}

impl Plan {
    /// The most expensive stage's cost over the mean: 1 is perfectly balanced.
    pub fn imbalance(&self) -> f64 {
        let max = self.stages.iter().map(|s| s.cost).fold(0.0, f64::max);
        let mean = self.stages.iter().map(|s| s.cost).sum::<f64>() / self.stages.len() as f64;
        max / mean
    }

    /// The plan as a table, one line per stage.
    pub fn describe(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let total: f64 = self.stages.iter().map(|s| s.cost).sum();
        let unit = if self.measured {
            "measured time per layer"
        } else {
            "multiply-accumulates per layer"
        };
        let mut s = match self.simulated {
            Some((_, bubble)) => format!(
                "pipeline plan: {} stages, split for the shortest simulated step by {unit} \
                 (forward and backward; simulated bubble {:.1}%)\n",
                self.stages.len(),
                100.0 * bubble
            ),
            None => format!(
                "pipeline plan: {} stages, balanced by {unit} (slowest stage {:.2}x the mean)\n",
                self.stages.len(),
                self.imbalance()
            ),
        };
        if self.simulated.is_some() {
            s += "  stage  layers   weights MiB  adapters+opt MiB  live  stashed MiB  peak MiB  share of cost\n";
            for (i, st) in self.stages.iter().enumerate() {
                s += &format!(
                    "  {i:5}  {:>6}  {:11.2}  {:16.2}  {:4}  {:11.2}  {:8.2}  {:12.1}%\n",
                    fmt_range(&st.layers),
                    mib(st.weight_bytes),
                    mib(st.state_bytes),
                    st.live,
                    mib(st.stashed_bytes),
                    mib(st.peak_bytes),
                    100.0 * st.cost / total
                );
            }
            return s;
        }
        s += "  stage  layers   weights MiB  act/mb KiB  KV MiB  peak MiB  share of cost\n";
        for (i, st) in self.stages.iter().enumerate() {
            s += &format!(
                "  {i:5}  {:>6}  {:11.2}  {:10.1}  {:6.2}  {:8.2}  {:12.1}%\n",
                fmt_range(&st.layers),
                mib(st.weight_bytes),
                st.activation_bytes as f64 / 1024.0,
                mib(st.kv_bytes),
                mib(st.peak_bytes),
                100.0 * st.cost / total
            );
        }
        s
    }
}

/// Prices the stages `ranges` (which must cover `0..n_layer` contiguously, in order).
pub fn plan_for(costs: &Costs, shape: &RunShape, ranges: &[Range<usize>]) -> Result<Plan> {
    check_ranges(ranges, costs.n_layer())?;
    let n = ranges.len();
    let stages = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| stage(costs, shape, r.clone(), i, n))
        .collect();
    Ok(Plan {
        stages,
        measured: costs.measured,
        simulated: simulate_step(costs, shape, ranges),
    })
}

/// Stage `index` of `n_stages`, holding `layers`, priced for `shape`.
fn stage(
    costs: &Costs,
    shape: &RunShape,
    layers: Range<usize>,
    index: usize,
    n_stages: usize,
) -> StagePlan {
    let (first, last) = (index == 0, index + 1 == n_stages);
    let weight_bytes: u64 = costs.layer_bytes[layers.clone()].iter().sum::<u64>()
        + if first { costs.embed_bytes } else { 0 }
        + if last { costs.head_bytes } else { 0 };
    let cost = forward_cost(costs, layers.clone(), first, last);
    let activation_bytes = (shape.mb_tokens * shape.n_embd * 4) as u64;
    if let Some(t) = &shape.training {
        let live = t.live(index, n_stages);
        let l = layers.len();
        // A stage holding several micro-batches does not keep their last segments' tapes
        // (`pipeline::train::stage_step`).
        let stash = t
            .checkpoint
            .stash_bytes_keeping(l, t.tape_bytes, t.x_bytes, live <= 1) as u64;
        let recompute = t.checkpoint.recompute_bytes(l, t.tape_bytes, t.x_bytes) as u64;
        let state_bytes: u64 = t.layer_state_bytes[layers.clone()].iter().sum();
        // While a backward re-runs a segment, the other live micro-batches stay stashed.
        let activations = live.saturating_sub(1) as u64 * stash + stash.max(recompute);
        return StagePlan {
            peak_bytes: weight_bytes
                + state_bytes
                + activations
                + 2 * activation_bytes
                + t.work_bytes
                + if last { t.head_bytes } else { 0 }
                + t.runtime_bytes,
            cost: stage_times(costs, t, layers.clone(), index, n_stages)
                .map_or(cost, |(f, b)| f + b),
            layers,
            weight_bytes,
            activation_bytes,
            kv_bytes: 0,
            live,
            stashed_bytes: live as u64 * stash,
            state_bytes,
        };
    }
    let kv_bytes = (layers.len() * shape.n_ctx * shape.kv_bytes_per_pos) as u64;
    // The last stage computes logits (a one-stage plan is also the last).
    let logits = if last {
        (shape.logits_rows * shape.n_vocab * 4) as u64
    } else {
        0
    };
    StagePlan {
        peak_bytes: weight_bytes
            + kv_bytes
            + shape.scratch_bytes as u64
            + 2 * activation_bytes
            + logits,
        layers,
        weight_bytes,
        activation_bytes,
        kv_bytes,
        live: 0,
        stashed_bytes: 0,
        state_bytes: 0,
        cost,
    }
}

/// A training stage's forward and backward cost per micro-batch: its layers, the embeddings on
/// the first, the head with the loss and its gradient on the last (in its forward), and under
/// checkpointing the forward of every layer its backward re-runs (all but the last segment's).
fn stage_times(
    costs: &Costs,
    t: &TrainShape,
    layers: Range<usize>,
    index: usize,
    n_stages: usize,
) -> Option<(f64, f64)> {
    let (first, last) = (index == 0, index + 1 == n_stages);
    let back = costs.backward.as_ref()?;
    let f = forward_cost(costs, layers.clone(), first, last);
    let mut b: f64 = back.layer[layers.clone()].iter().sum();
    if t.checkpoint != Checkpoint::None {
        // The last segment's tapes are kept only by a stage that holds one micro-batch at a
        // time (`pipeline::train::stage_step`); the others re-run it too.
        let kept = match t.live(index, n_stages) {
            0 | 1 => t
                .checkpoint
                .segments(layers.len())
                .last()
                .map_or(0, |s| s.len()),
            _ => 0,
        };
        b += costs.layer_cost[layers.start..layers.end - kept]
            .iter()
            .sum::<f64>();
    }
    b += if first { back.embed } else { 0.0 } + if last { back.head } else { 0.0 };
    Some((f, b))
}

/// A stage's forward cost: its layers, the embeddings on the first, the head on the last.
fn forward_cost(costs: &Costs, layers: Range<usize>, first: bool, last: bool) -> f64 {
    costs.layer_cost[layers].iter().sum::<f64>()
        + if first { costs.embed_cost } else { 0.0 }
        + if last { costs.head_cost } else { 0.0 }
}

/// The step's time and bubble when training `shape` over the stages `ranges`: its schedule
/// played with each stage's forward and backward costs ([`schedule::simulate`]).
pub fn simulate_step(
    costs: &Costs,
    shape: &RunShape,
    ranges: &[Range<usize>],
) -> Option<(f64, f64)> {
    let t = shape.training.as_ref()?;
    let n = ranges.len();
    let (f, b): (Vec<f64>, Vec<f64>) = ranges
        .iter()
        .enumerate()
        .map(|(i, r)| stage_times(costs, t, r.clone(), i, n))
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .unzip();
    let slots = schedule::simulate(&t.schedule.steps(n, t.n_micro), &f, &b).ok()?;
    let span = slots.iter().map(|s| s.end).fold(0.0, f64::max);
    Some((span, schedule::bubble_fraction(&slots, n)))
}

fn check_ranges(ranges: &[Range<usize>], n_layer: usize) -> Result<()> {
    let mut next = 0;
    for r in ranges {
        if r.start != next || r.end <= r.start {
            return Err(Error::Invalid(format!(
                "stage layers must be non-empty, contiguous and in order from 0: {} does not \
                 follow layer {}",
                fmt_range(r),
                next as i64 - 1
            )));
        }
        next = r.end;
    }
    if next != n_layer || ranges.is_empty() {
        return Err(Error::Invalid(format!(
            "stage layers must cover all {n_layer} layers (0-{}), they end at {}",
            n_layer - 1,
            next as i64 - 1
        )));
    }
    Ok(())
}

fn fmt_range(r: &Range<usize>) -> String {
    format!("{}-{}", r.start, r.end as i64 - 1)
}

/// Parses `--stage-layers 0-9,10-19,20-29` (inclusive ranges; a single layer may be `7`).
pub fn parse_stage_layers(s: &str, n_layer: usize) -> Result<Vec<Range<usize>>> {
    let bad = |p: &str| {
        Error::Invalid(format!(
            "--stage-layers: {p:?} is not a layer range like 0-9"
        ))
    };
    let ranges = s
        .split(',')
        .map(|p| {
            let p = p.trim();
            let (a, b) = p.split_once('-').unwrap_or((p, p));
            let a: usize = a.trim().parse().map_err(|_| bad(p))?;
            let b: usize = b.trim().parse().map_err(|_| bad(p))?;
            if b < a {
                return Err(bad(p));
            }
            Ok(a..b + 1)
        })
        .collect::<Result<Vec<_>>>()?;
    check_ranges(&ranges, n_layer)?;
    Ok(ranges)
}

/// Parses a memory size: bytes, or with a K/M/G/T suffix (powers of 1024; `KiB`, `MB`, ... too).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| Error::Invalid(format!("{s:?} is not a size like 512M or 1.5GiB")))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(Error::Invalid(format!("{s:?}: unknown size unit {unit:?}"))),
    };
    Ok((x * (1u64 << shift) as f64).round() as u64)
}

/// The contiguous split into `n_stages` that minimises the most expensive stage's cost, with every
/// stage's estimated peak memory within `memory_per_worker` when given. When no split into
/// `n_stages` fits, the error names the smallest number of stages that would.
pub fn partition(
    costs: &Costs,
    shape: &RunShape,
    n_stages: usize,
    memory_per_worker: Option<u64>,
) -> Result<Plan> {
    let n_layer = costs.n_layer();
    if n_stages == 0 || n_stages > n_layer {
        return Err(Error::Invalid(format!(
            "--stages must be between 1 and the model's {n_layer} layers, got {n_stages}"
        )));
    }
    match best_split(costs, shape, n_stages, memory_per_worker) {
        Some(ranges) => plan_for(costs, shape, &ranges),
        None => {
            let limit = memory_per_worker.unwrap_or(u64::MAX);
            Err(Error::Invalid(format!(
                "{n_stages} stages do not fit {:.1} MiB per worker; {}",
                limit as f64 / (1 << 20) as f64,
                what_fits(costs, shape, limit)
            )))
        }
    }
}

/// What would fit `limit` bytes per worker, as advice: the smallest number of stages, and for
/// GPipe training also the smallest under 1F1B (which keeps fewer micro-batches per stage).
pub fn what_fits(costs: &Costs, shape: &RunShape, limit: u64) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let one_f_one_b = match &shape.training {
        Some(t) if t.schedule == Schedule::GPipe => {
            let s = RunShape {
                training: Some(TrainShape {
                    schedule: Schedule::OneFOneB,
                    ..t.clone()
                }),
                ..shape.clone()
            };
            smallest_fitting(costs, &s, limit)
        }
        _ => None,
    };
    let with_1f1b = |k: usize| format!("with --schedule 1f1b the smallest number that fits is {k}");
    match (smallest_fitting(costs, shape, limit), one_f_one_b) {
        (Some(k), Some(j)) if j < k => format!(
            "the smallest number of stages that fits is {k}; {}",
            with_1f1b(j)
        ),
        (Some(k), _) => format!("the smallest number of stages that fits is {k}"),
        (None, Some(j)) => format!("no number of stages fits under gpipe; {}", with_1f1b(j)),
        (None, None) => {
            // Both ends exist in any plan of 2 or more stages: the larger of the first stage
            // with one layer and the last with one layer bounds every plan.
            let n_layer = costs.n_layer();
            let first = stage(costs, shape, 0..1, 0, n_layer);
            let last = stage(costs, shape, n_layer - 1..n_layer, n_layer - 1, n_layer);
            format!(
                "no number of stages fits (the first or last stage with a single layer already \
                 needs about {:.1} MiB)",
                mib(first.peak_bytes.max(last.peak_bytes))
            )
        }
    }
}

/// The smallest number of stages whose every stage fits `limit` bytes, if any does.
pub fn smallest_fitting(costs: &Costs, shape: &RunShape, limit: u64) -> Option<usize> {
    (1..=costs.n_layer()).find(|&n| best_split(costs, shape, n, Some(limit)).is_some())
}

/// Dynamic programme over (stages used, layers covered): the split with the smallest maximum
/// stage cost among those that fit the memory limit; ties go to the earliest boundaries.
fn best_split(
    costs: &Costs,
    shape: &RunShape,
    n_stages: usize,
    limit: Option<u64>,
) -> Option<Vec<Range<usize>>> {
    let n = costs.n_layer();
    if n_stages == 0 || n_stages > n {
        return None;
    }
    if shape.training.is_some() && costs.backward.is_some() {
        if let Some(r) = fastest_split(costs, shape, n_stages, limit) {
            return r;
        }
    }
    let fits = |r: Range<usize>, index: usize| -> Option<f64> {
        let s = stage(costs, shape, r, index, n_stages);
        limit.is_none_or(|l| s.peak_bytes <= l).then_some(s.cost)
    };
    // best[k][j]: minimal max cost splitting layers 0..j into k stages; from[k][j]: start of the
    // k-th stage.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n + 1]; n_stages + 1];
    let mut from = vec![vec![0usize; n + 1]; n_stages + 1];
    best[0][0] = 0.0;
    for k in 1..=n_stages {
        for j in k..=n {
            for i in k - 1..j {
                if best[k - 1][i] == inf {
                    continue;
                }
                let Some(c) = fits(i..j, k - 1) else {
                    continue;
                };
                let v = best[k - 1][i].max(c);
                if v < best[k][j] {
                    best[k][j] = v;
                    from[k][j] = i;
                }
            }
        }
    }
    if best[n_stages][n] == inf {
        return None;
    }
    let mut ranges = Vec::with_capacity(n_stages);
    let mut j = n;
    for k in (1..=n_stages).rev() {
        let i = from[k][j];
        ranges.push(i..j);
        j = i;
    }
    ranges.reverse();
    Some(ranges)
}

/// Contiguous splits into more stages than this are not searched one by one.
const MAX_SPLITS_SEARCHED: usize = 50_000;

/// Training: of every contiguous split into `n_stages` that fits `limit`, the one whose step,
/// simulated under its schedule with each stage's forward and backward costs, is shortest (ties
/// to the earliest boundaries): balancing forward + backward sums is not enough when a stage's
/// forward and backward weigh differently (the last stage's forward has the head and the loss,
/// its backward little). `None` when there are too many splits to try (the caller balances the
/// sums instead); `Some(None)` when none fits.
fn fastest_split(
    costs: &Costs,
    shape: &RunShape,
    n_stages: usize,
    limit: Option<u64>,
) -> Option<Option<Vec<Range<usize>>>> {
    let n = costs.n_layer();
    if n_choose_k(n - 1, n_stages - 1) > MAX_SPLITS_SEARCHED {
        return None;
    }
    // Boundaries b[1..n_stages] strictly increasing in 1..n, as an odometer.
    let mut cuts: Vec<usize> = (1..n_stages).collect();
    let mut best: Option<(f64, Vec<Range<usize>>)> = None;
    loop {
        let bounds: Vec<usize> = std::iter::once(0)
            .chain(cuts.iter().copied())
            .chain(std::iter::once(n))
            .collect();
        let ranges: Vec<Range<usize>> = bounds.windows(2).map(|w| w[0]..w[1]).collect();
        let fits = limit.is_none_or(|l| {
            ranges
                .iter()
                .enumerate()
                .all(|(i, r)| stage(costs, shape, r.clone(), i, n_stages).peak_bytes <= l)
        });
        if fits {
            if let Some((span, _)) = simulate_step(costs, shape, &ranges) {
                if best.as_ref().is_none_or(|(b, _)| span < *b * (1.0 - 1e-12)) {
                    best = Some((span, ranges));
                }
            }
        }
        // Next combination: the rightmost cut that can move right does, the ones after follow.
        let k = cuts.len();
        let Some(i) = (0..k).rev().find(|&i| cuts[i] < n - (k - i)) else {
            break;
        };
        cuts[i] += 1;
        for j in i + 1..k {
            cuts[j] = cuts[j - 1] + 1;
        }
    }
    Some(best.map(|(_, r)| r))
}

fn n_choose_k(n: usize, k: usize) -> usize {
    (0..k.min(n)).fold(1usize, |acc, i| acc.saturating_mul(n - i) / (i + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn costs(layer_cost: &[f64], head_cost: f64) -> Costs {
        Costs {
            layer_bytes: vec![100; layer_cost.len()],
            layer_cost: layer_cost.to_vec(),
            embed_bytes: 1000,
            embed_cost: 0.0,
            head_bytes: 1000,
            head_cost,
            measured: true,
            backward: None,
        }
    }

    fn shape() -> RunShape {
        RunShape {
            n_ctx: 4,
            mb_tokens: 2,
            logits_rows: 4,
            n_vocab: 10,
            kv_bytes_per_pos: 8,
            scratch_bytes: 50,
            n_embd: 3,
            training: None,
        }
    }

    /// Every contiguous split, for the brute-force check.
    fn all_splits(n: usize, k: usize) -> Vec<Vec<Range<usize>>> {
        if k == 1 {
            return vec![vec![0..n]];
        }
        let mut out = Vec::new();
        for cut in k - 1..n {
            for mut head in all_splits(cut, k - 1) {
                head.push(cut..n);
                out.push(head);
            }
        }
        out
    }

    fn max_cost(p: &Plan) -> f64 {
        p.stages.iter().map(|s| s.cost).fold(0.0, f64::max)
    }

    #[test]
    fn partition_is_optimal_against_brute_force() {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) % 1000) as f64 / 100.0
        };
        for n in 1..9 {
            for k in 1..=n {
                let lc: Vec<f64> = (0..n).map(|_| rnd()).collect();
                let c = costs(&lc, rnd() * 3.0);
                let p = partition(&c, &shape(), k, None).unwrap();
                let brute = all_splits(n, k)
                    .iter()
                    .map(|r| max_cost(&plan_for(&c, &shape(), r).unwrap()))
                    .fold(f64::INFINITY, f64::min);
                assert!((max_cost(&p) - brute).abs() < 1e-9, "n {n} k {k}");
                assert_eq!(p.stages.len(), k);
            }
        }
    }

    #[test]
    fn head_on_last_stage_shifts_layers_forward() {
        // Six equal layers and a head worth two layers: the last stage gets fewer layers.
        let c = costs(&[1.0; 6], 2.0);
        let p = partition(&c, &shape(), 2, None).unwrap();
        assert_eq!(p.stages[0].layers, 0..4);
        assert_eq!(p.stages[1].layers, 4..6);
        assert_eq!(p.stages[0].weight_bytes, 4 * 100 + 1000);
        assert_eq!(p.stages[1].weight_bytes, 2 * 100 + 1000);
        assert!((p.imbalance() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn memory_estimate_adds_up() {
        let c = costs(&[1.0; 4], 0.0);
        let p = plan_for(&c, &shape(), &[0..1, 1..3, 3..4]).unwrap();
        let mid = &p.stages[1];
        assert_eq!(mid.activation_bytes, 2 * 3 * 4);
        assert_eq!(mid.kv_bytes, 2 * 4 * 8);
        assert_eq!(mid.peak_bytes, 200 + 64 + 50 + 2 * 24);
        assert_eq!(p.stages[0].peak_bytes, 1100 + 32 + 50 + 48);
        // The last also holds the logits it computes at once (4 rows x 10 x 4 bytes).
        let last = &p.stages[2];
        assert_eq!(
            last.peak_bytes,
            last.weight_bytes + last.kv_bytes + 50 + 48 + 160
        );
    }

    #[test]
    fn memory_limit_refuses_and_names_smallest_n() {
        let c = costs(&[1.0; 8], 0.0);
        let one = partition(&c, &shape(), 1, None).unwrap();
        let two = partition(&c, &shape(), 2, None).unwrap();
        let limit = two.stages.iter().map(|s| s.peak_bytes).max().unwrap();
        assert!(one.stages[0].peak_bytes > limit);
        let e = partition(&c, &shape(), 1, Some(limit))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("smallest number of stages that fits is 2"),
            "{e}"
        );
        assert!(partition(&c, &shape(), 2, Some(limit)).is_ok());
        let e = partition(&c, &shape(), 3, Some(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no number of stages fits"), "{e}");
        // With a limit the plan may trade balance for fitting.
        assert!(partition(&c, &shape(), 3, Some(limit)).is_ok());
    }

    #[test]
    fn stage_layers_parse_and_check() {
        assert_eq!(
            parse_stage_layers("0-9,10-19,20-29", 30).unwrap(),
            vec![0..10, 10..20, 20..30]
        );
        assert_eq!(parse_stage_layers("0,1-2", 3).unwrap(), vec![0..1, 1..3]);
        for bad in [
            "0-9,11-29",
            "0-9,5-29",
            "0-28",
            "0-30",
            "a-b",
            "3-1,2-29",
            "",
        ] {
            assert!(parse_stage_layers(bad, 30).is_err(), "{bad}");
        }
        let e = parse_stage_layers("0-9,11-29", 30).unwrap_err().to_string();
        assert!(e.contains("11-29") && e.contains("layer 9"), "{e}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2kb").unwrap(), 2048);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
    }

    /// Training over `n` layers of forward cost 1 and backward 1 each, a head whose forward
    /// (with the loss and its gradient) costs `head_f`, under `schedule` with `m` micro-batches.
    fn training(n: usize, head_f: f64, schedule: Schedule, m: usize) -> (Costs, RunShape) {
        let c = Costs {
            backward: Some(BackwardCosts {
                layer: vec![1.0; n],
                embed: 0.0,
                head: 0.0,
            }),
            ..costs(&vec![1.0; n], head_f)
        };
        let shape = RunShape {
            training: Some(TrainShape {
                schedule,
                n_micro: m,
                checkpoint: Checkpoint::None,
                lora: LoraConfig::default(),
                tape_bytes: 1000,
                x_bytes: 24,
                layer_state_bytes: vec![10; n],
                head_bytes: 5000,
                work_bytes: 300,
                runtime_bytes: 7,
            }),
            ..shape()
        };
        (c, shape)
    }

    #[test]
    fn training_stages_are_priced_by_what_the_schedule_keeps() {
        let ranges = [0..2, 2..5, 5..6];
        for (schedule, live) in [
            (Schedule::GPipe, [8, 8, 8]),
            (Schedule::OneFOneB, [3, 2, 1]),
        ] {
            let (c, sh) = training(6, 2.0, schedule, 8);
            let p = plan_for(&c, &sh, &ranges).unwrap();
            for (i, st) in p.stages.iter().enumerate() {
                let l = st.layers.len() as u64;
                assert_eq!(st.live, live[i], "{schedule:?} stage {i}");
                assert_eq!(st.stashed_bytes, live[i] as u64 * l * 1000);
                assert_eq!(st.state_bytes, 10 * l);
                assert_eq!(st.kv_bytes, 0);
                let head = if i == 2 { 5000 } else { 0 };
                assert_eq!(
                    st.peak_bytes,
                    st.weight_bytes + st.state_bytes + st.stashed_bytes + 2 * 24 + 300 + head + 7,
                    "{schedule:?} stage {i}"
                );
            }
            assert!(p.simulated.is_some() && p.describe().contains("stashed"));
        }
        // Checkpointing every layer: one layer's input per layer stays stashed, and with one
        // micro-batch held at a time also the last layer's tape; a backward re-makes one layer's
        // tape at a time (and re-runs all but the last forward, or all with several held).
        let (c, mut sh) = training(6, 2.0, Schedule::GPipe, 2);
        sh.training.as_mut().unwrap().checkpoint = Checkpoint::Every(1);
        let p = plan_for(&c, &sh, &[0..3, 3..6]).unwrap();
        assert_eq!(p.stages[0].stashed_bytes, 2 * 3 * 24);
        let with_io = |st: &StagePlan| st.weight_bytes + st.state_bytes + 2 * 24 + 300 + 7;
        assert_eq!(
            p.stages[0].peak_bytes,
            with_io(&p.stages[0]) + 2 * 3 * 24 + 1000
        );
        let (c, mut sh) = training(6, 2.0, Schedule::GPipe, 1);
        sh.training.as_mut().unwrap().checkpoint = Checkpoint::Every(1);
        let p = plan_for(&c, &sh, &[0..3, 3..6]).unwrap();
        assert_eq!(p.stages[0].stashed_bytes, 3 * 24 + 1000);
        assert_eq!(p.stages[0].cost, 3.0 + 3.0 + 2.0);
    }

    #[test]
    fn training_split_is_the_fastest_simulated_step() {
        // A head whose forward weighs 4 layers and whose backward is free: balancing forward +
        // backward sums is not what makes the step shortest.
        for schedule in [Schedule::GPipe, Schedule::OneFOneB] {
            for k in 2..=4 {
                let (c, sh) = training(12, 4.0, schedule, 8);
                let p = partition(&c, &sh, k, None).unwrap();
                let ranges: Vec<_> = p.stages.iter().map(|s| s.layers.clone()).collect();
                let (best, _) = simulate_step(&c, &sh, &ranges).unwrap();
                let brute = all_splits(12, k)
                    .iter()
                    .map(|r| simulate_step(&c, &sh, r).unwrap().0)
                    .fold(f64::INFINITY, f64::min);
                assert!((best - brute).abs() < 1e-9, "{schedule:?} k {k}");
                assert_eq!(p.simulated.unwrap().0, best);
            }
        }
        // GPipe, 3 stages: the split that balances forward + backward sums best is slower than
        // the simulated optimum.
        let (c, sh) = training(12, 4.0, Schedule::GPipe, 8);
        let max_sum = |r: &Vec<Range<usize>>| max_cost(&plan_for(&c, &sh, r).unwrap());
        let balanced = all_splits(12, 3)
            .into_iter()
            .min_by(|a, b| max_sum(a).total_cmp(&max_sum(b)))
            .unwrap();
        let sums = simulate_step(&c, &sh, &balanced).unwrap().0;
        let p = partition(&c, &sh, 3, None).unwrap();
        assert!(
            p.simulated.unwrap().0 < sums,
            "{balanced:?} vs {:?}",
            p.stages
        );
    }

    #[test]
    fn training_memory_limit_names_a_schedule_that_fits() {
        let (c, gpipe) = training(8, 0.0, Schedule::GPipe, 8);
        let (_, one_f_one_b) = training(8, 0.0, Schedule::OneFOneB, 8);
        // 1F1B over 4 stages fits; GPipe keeps 8 micro-batches everywhere and needs more stages.
        let limit = partition(&c, &one_f_one_b, 4, None)
            .unwrap()
            .stages
            .iter()
            .map(|s| s.peak_bytes)
            .max()
            .unwrap();
        let g = smallest_fitting(&c, &gpipe, limit).unwrap_or(usize::MAX);
        let f = smallest_fitting(&c, &one_f_one_b, limit).unwrap();
        assert!(f <= 4 && g > f, "gpipe {g} 1f1b {f}");
        let e = partition(&c, &gpipe, f, Some(limit))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!(
                "with --schedule 1f1b the smallest number that fits is {f}"
            )),
            "{e}"
        );
    }

    #[test]
    fn bad_stage_counts_are_errors() {
        let c = costs(&[1.0; 3], 0.0);
        assert!(partition(&c, &shape(), 0, None).is_err());
        assert!(partition(&c, &shape(), 4, None).is_err());
    }
}
