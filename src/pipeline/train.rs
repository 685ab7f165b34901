//! Training through pipeline stages (`pare tune --stages N`): each stage holds the adapters of
//! its own layers, their gradients and their optimizer moments ([`StageState`]); a step runs the
//! micro-batches (one training sequence each) in the order a [`Schedule`] gives, hidden states
//! going forward and their gradients coming back through the same [`Transport`] as inference.
//!
//! Stage 0 embeds the tokens; the last stage computes the loss of each micro-batch (its logits
//! never leave it) and starts that micro-batch's backward pass. Gradients accumulate over the
//! micro-batches; after the flush every stage sends its loss and squared gradient norm to stage 0,
//! which sends the totals back, so that every stage clips by the global norm and steps its own
//! optimizer. Gradient checkpointing applies to each stage's layers ([`Stash`]).
//!
//! One worker is the one-stage case of the same code: 1F1B on one stage is forward, loss and
//! backward one sequence at a time, exactly the single-worker loop.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use super::schedule::{
    bubble_fraction, idle_per_stage, max_in_flight, theoretical_bubble, Schedule, Slot, Step,
};
use super::transport::{threads, Message, Transport};
use crate::error::{Error, Result};
use crate::model::backward::{MergedWeight, Trainable};
use crate::model::{Lora, Model};
use crate::train::checkpointing::{Checkpoint, Stash};
use crate::train::optimizer::{scale_to_norm, sum_of_squares, AdamW};

/// One stage's share of what training changes.
#[derive(Debug, Clone)]
pub struct StageState {
    pub layers: Range<usize>,
    /// The adapters of `layers` (the other layers' slots are empty).
    pub lora: Lora,
    /// Their gradients, accumulated over a step's micro-batches.
    pub grads: Lora,
    /// Moments for `lora.params()`, in that order.
    pub opt: AdamW,
}

impl StageState {
    /// The share of `lora` for `layers`, with zero optimizer moments.
    pub fn new(model: &Model, lora: &Lora, layers: Range<usize>, weight_decay: f32) -> StageState {
        let mut mine = lora.clone();
        mine.keep_layers(layers.clone());
        let grads = Lora::zeros_in(&model.config, lora.config.clone(), layers.clone());
        let sizes: Vec<usize> = mine.params().map(|p| p.len()).collect();
        StageState {
            layers,
            lora: mine,
            grads,
            opt: AdamW::new(&sizes, weight_decay),
        }
    }
}

/// One micro-batch: a sequence (`n + 1` token ids, predicting `tokens[1..]`) and the weight of
/// each predicted position in the step's loss.
///
/// Only stage 0 reads `tokens` and `weight`: it embeds the ids and sends the last stage each
/// micro-batch's targets and weights ([`Message::Batch`]), so that under MPI the other ranks
/// never read, tokenize or hold the data (theirs are empty, see [`MicroBatch::fed`]).
#[derive(Debug, Clone)]
pub struct MicroBatch<'a> {
    pub tokens: &'a [u32],
    pub weight: Vec<f32>,
    /// Seed of this micro-batch's dropout masks (`None`: no dropout).
    pub dropout_seed: Option<u64>,
}

impl MicroBatch<'_> {
    /// A micro-batch as a stage other than 0 knows it: no data, only its dropout seed.
    pub fn fed(dropout_seed: Option<u64>) -> MicroBatch<'static> {
        MicroBatch {
            tokens: &[],
            weight: Vec::new(),
            dropout_seed,
        }
    }
}

/// What every stage of a step shares.
pub struct StepJob<'a> {
    pub model: &'a Model,
    /// Quantization-aware training's transform of the targeted weights, if any.
    pub merged: Option<&'a dyn MergedWeight>,
    pub checkpoint: Checkpoint,
    pub schedule: Schedule,
    pub micro: Vec<MicroBatch<'a>>,
    /// Clip the global gradient norm to this (0: off).
    pub clip: f32,
    pub lr: f32,
}

/// What one stage did in one step.
#[derive(Debug, Clone, Default)]
pub struct StageReport {
    /// The step's loss (summed over micro-batches on the last stage; every stage learns it).
    pub loss: f64,
    /// The global gradient norm before clipping (of the adapters' gradients and those of
    /// [`StepJob::merged`]'s own parameters).
    pub grad_norm: f32,
    /// Each forward and backward this stage ran, timed from the step's start (seconds).
    pub ops: Vec<Slot>,
    /// The most micro-batches whose activations this stage held at once.
    pub peak_live: usize,
    /// The most bytes of activations (stashed inputs and tapes) it held at once.
    pub peak_activation_bytes: usize,
    pub recomputed_layers: usize,
    /// Seconds spent re-running checkpointed segments.
    pub recompute_secs: f64,
}

/// Runs stage `t.stage()`'s part of one training step on `part`, then steps its optimizer.
/// `t0` is the step's start, shared by the stages so their timelines line up.
pub fn stage_step(
    t: &mut dyn Transport,
    part: &mut StageState,
    job: &StepJob,
    t0: Instant,
) -> Result<StageReport> {
    let (me, n) = (t.stage(), t.n_stages());
    let (first, last) = (me == 0, me + 1 == n);
    let m = job.micro.len();
    if m == 0 {
        return Err(Error::Invalid("a training step needs a micro-batch".into()));
    }
    let steps = job.schedule.steps(n, m).swap_remove(me);
    let bound = max_in_flight(&steps);
    let d = job.model.config.n_embd;
    let secs = || t0.elapsed().as_secs_f64();
    part.grads.zero();
    // Micro-batches between their forward and backward: the stash, and on the last stage the
    // gradient at the stage's output that the loss gave.
    let mut live: BTreeMap<usize, Live> = BTreeMap::new();
    let mut held = 0usize;
    let mut rep = StageReport::default();
    for step in steps {
        let (Step::Forward(i) | Step::Backward(i)) = step;
        let mb = &job.micro[i];
        let tr = Trainable {
            model: job.model,
            lora: &part.lora,
            merged: job.merged,
            dropout_seed: mb.dropout_seed,
        };
        match step {
            Step::Forward(_) => {
                let (mut x, targets) = take_input(t, &tr, mb, i)?;
                let start = secs();
                if first {
                    x = tr.embed(&mb.tokens[..mb.tokens.len() - 1])?;
                }
                let len = x.len() / d;
                // With more than one micro-batch held, the last segment's tapes are re-made in
                // its backward rather than kept for each.
                let stash = Stash::forward_keeping(
                    &tr,
                    part.layers.clone(),
                    job.checkpoint,
                    &mut x,
                    bound <= 1,
                )?;
                held += stash.bytes;
                let dy = match &targets {
                    Some((targets, weight)) => {
                        let mut dx = vec![0.0f32; x.len()];
                        rep.loss += tr.head_loss(&x, targets, weight, Some(&mut dx))?;
                        Some(dx)
                    }
                    None => None,
                };
                live.insert(i, Live { stash, dy, len });
                // The schedule's promise, checked where the activations live.
                if live.len() > bound {
                    return Err(Error::Model(format!(
                        "stage {me} holds {} micro-batches' activations, more than the {bound} \
                         its schedule allows",
                        live.len()
                    )));
                }
                rep.peak_live = rep.peak_live.max(live.len());
                rep.peak_activation_bytes = rep.peak_activation_bytes.max(held);
                rep.ops.push(Slot {
                    stage: me,
                    step,
                    start,
                    end: secs(),
                });
                if !last {
                    t.send(
                        me + 1,
                        Message::Activations {
                            micro: i,
                            hidden: x,
                        },
                    )?;
                }
            }
            Step::Backward(_) => {
                let Live { stash, dy, len } = live.remove(&i).ok_or_else(|| {
                    Error::Model(format!(
                        "stage {me}: backward of micro-batch {i} before its forward"
                    ))
                })?;
                let mut dx = match dy {
                    Some(dx) => dx,
                    None => recv_for(t, me + 1, i, true)?,
                };
                let start = secs();
                if dx.len() != len * d {
                    return Err(Error::Model(format!(
                        "stage {me}: the gradient of micro-batch {i} has {} values for {len} \
                         positions",
                        dx.len()
                    )));
                }
                held -= stash.bytes;
                let back = stash.backward(&tr, &mut dx, &mut part.grads)?;
                rep.recomputed_layers += back.recomputed_layers;
                rep.recompute_secs += back.recompute_secs;
                rep.peak_activation_bytes = rep.peak_activation_bytes.max(held + back.peak_bytes);
                rep.ops.push(Slot {
                    stage: me,
                    step,
                    start,
                    end: secs(),
                });
                if !first {
                    t.send(me - 1, Message::Gradient { micro: i, grad: dx })?;
                }
            }
        }
    }
    // After the flush: the global norm from every stage's share, then each stage's own update.
    let mut g: Vec<&mut Vec<f32>> = part.grads.params_mut().collect();
    // The transform's learned parameters (LSQ's grids) count towards the global norm; the caller
    // scales and steps them (see `StageReport::grad_norm`).
    let own_sq = sum_of_squares(&g) + job.merged.map_or(0.0, |m| m.grad_sq(part.layers.clone()));
    let totals = sum_over_stages(t, vec![own_sq, rep.loss])?;
    rep.loss = totals[1];
    rep.grad_norm = totals[0].sqrt() as f32;
    scale_to_norm(&mut g, rep.grad_norm, job.clip);
    if !rep.loss.is_finite() {
        return Err(Error::Invalid(format!(
            "the loss is {}; lower the learning rate",
            rep.loss
        )));
    }
    let grads: Vec<&[f32]> = part.grads.params().collect();
    let mut params: Vec<&mut Vec<f32>> = part.lora.params_mut().collect();
    part.opt.step(&mut params, &grads, job.lr)?;
    Ok(rep)
}

/// A micro-batch between its forward and its backward on one stage.
struct Live {
    stash: Stash,
    /// On the last stage: the gradient at the stage's output that the loss gave.
    dy: Option<Vec<f32>>,
    /// Its positions.
    len: usize,
}

/// What stage `t.stage()` starts micro-batch `i`'s forward with: the hidden states from the stage
/// before (empty on stage 0, which embeds `mb`'s ids itself), and on the last stage the targets
/// and loss weights. Stage 0 sends the last stage those first (before its hidden states, which
/// with two stages share the channel), so that only stage 0 reads the data.
#[allow(clippy::type_complexity)]
fn take_input(
    t: &mut dyn Transport,
    tr: &Trainable,
    mb: &MicroBatch,
    i: usize,
) -> Result<(Vec<f32>, Option<(Vec<u32>, Vec<f32>)>)> {
    let (me, n) = (t.stage(), t.n_stages());
    let (first, last) = (me == 0, me + 1 == n);
    let d = tr.model.config.n_embd;
    if first {
        let len = mb.tokens.len().saturating_sub(1);
        if len == 0 {
            return Err(Error::Invalid(
                "a training sequence needs at least 2 tokens".into(),
            ));
        }
        if mb.weight.len() != len {
            return Err(Error::Invalid(format!(
                "micro-batch {i}: {len} positions but {} loss weights",
                mb.weight.len()
            )));
        }
        let targets = (mb.tokens[1..].to_vec(), mb.weight.clone());
        if last {
            return Ok((Vec::new(), Some(targets)));
        }
        t.send(
            n - 1,
            Message::Batch {
                micro: i,
                targets: targets.0,
                weight: targets.1,
            },
        )?;
        return Ok((Vec::new(), None));
    }
    let targets = if last {
        match t.recv(0)? {
            Message::Batch {
                micro,
                targets,
                weight,
            } if micro == i && targets.len() == weight.len() => Some((targets, weight)),
            other => {
                return Err(Error::Model(format!(
                    "stage {me} expected the targets of micro-batch {i} from stage 0, got {}",
                    match other {
                        Message::Batch { micro, .. } => format!("those of micro-batch {micro}"),
                        _ => other.kind().to_string(),
                    }
                )))
            }
        }
    } else {
        None
    };
    let x = recv_for(t, me - 1, i, false)?;
    let len = x.len() / d;
    let bad =
        len == 0 || x.len() != len * d || targets.as_ref().is_some_and(|(t, _)| t.len() != len);
    if bad {
        return Err(Error::Model(format!(
            "stage {me}: micro-batch {i} came with {} values{}",
            x.len(),
            match &targets {
                Some((t, _)) => format!(" for {} positions", t.len()),
                None => format!(", not a multiple of {d}"),
            }
        )));
    }
    Ok((x, targets))
}

/// Validation: the loss of each of `micro`'s sequences, summed, through the stages.
pub struct EvalJob<'a> {
    pub model: &'a Model,
    pub merged: Option<&'a dyn MergedWeight>,
    /// The sequences (with their weights: 1 where scored), on stage 0; the other stages need
    /// none (their count comes from stage 0).
    pub micro: Vec<MicroBatch<'a>>,
}

/// What a validation pass measured, the same on every stage.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EvalTotals {
    pub sequences: usize,
    /// The sum over sequences of each one's weighted loss.
    pub loss: f64,
    /// The weights' sum (the scored positions).
    pub weight: f64,
}

/// Stage `t.stage()`'s part of a validation pass: the training forward without tapes, each
/// stage with its own layers and adapters, the last stage summing the losses. No adapters move
/// between stages, and no stage runs another's layers.
pub fn stage_eval(t: &mut dyn Transport, part: &StageState, job: &EvalJob) -> Result<EvalTotals> {
    let me = t.stage();
    let first = me == 0;
    // Only stage 0 knows how many sequences there are: the others learn it as a total to which
    // they add nothing.
    let own = if first { job.micro.len() as f64 } else { 0.0 };
    let k = sum_over_stages(t, vec![own])?[0] as usize;
    let tr = Trainable {
        model: job.model,
        lora: &part.lora,
        merged: job.merged,
        dropout_seed: None,
    };
    let fed = MicroBatch::fed(None);
    let (mut loss, mut weight) = (0.0f64, 0.0f64);
    for i in 0..k {
        let mb = if first { &job.micro[i] } else { &fed };
        let (mut x, targets) = take_input(t, &tr, mb, i)?;
        if first {
            x = tr.embed(&mb.tokens[..mb.tokens.len() - 1])?;
        }
        tr.forward_layers(part.layers.clone(), &mut x, false)?;
        match &targets {
            Some((targets, w)) => {
                loss += tr.head_loss(&x, targets, w, None)?;
                weight += w.iter().map(|&v| f64::from(v)).sum::<f64>();
            }
            None => t.send(
                me + 1,
                Message::Activations {
                    micro: i,
                    hidden: x,
                },
            )?,
        }
    }
    let sums = sum_over_stages(t, vec![loss, weight])?;
    Ok(EvalTotals {
        sequences: k,
        loss: sums[0],
        weight: sums[1],
    })
}

/// The hidden states (or, `backward`, their gradient) of micro-batch `micro` from stage `from`.
fn recv_for(t: &mut dyn Transport, from: usize, micro: usize, backward: bool) -> Result<Vec<f32>> {
    let me = t.stage();
    match (t.recv(from)?, backward) {
        (Message::Activations { micro: k, hidden }, false) if k == micro => Ok(hidden),
        (Message::Gradient { micro: k, grad }, true) if k == micro => Ok(grad),
        (other, _) => Err(Error::Model(format!(
            "stage {me} expected the {} of micro-batch {micro} from stage {from}, got {}",
            if backward { "gradient" } else { "activations" },
            match other {
                Message::Activations { micro: k, .. } | Message::Gradient { micro: k, .. } => {
                    format!("{} of micro-batch {k}", other.kind())
                }
                _ => other.kind().to_string(),
            }
        ))),
    }
}

/// Element-wise totals of every stage's `values`, known to every stage afterwards (stage 0 adds
/// them in stage order, so every stage gets the same numbers).
fn sum_over_stages(t: &mut dyn Transport, values: Vec<f64>) -> Result<Vec<f64>> {
    let (me, n) = (t.stage(), t.n_stages());
    let bad = |from: usize, got: &Message| {
        Error::Model(format!(
            "stage {me} expected sums from stage {from}, got {}",
            got.kind()
        ))
    };
    if me != 0 {
        t.send(0, Message::Sums(values))?;
        return match t.recv(0)? {
            Message::Sums(v) => Ok(v),
            other => Err(bad(0, &other)),
        };
    }
    let mut total = values;
    for s in 1..n {
        match t.recv(s)? {
            Message::Sums(v) if v.len() == total.len() => {
                for (a, b) in total.iter_mut().zip(v) {
                    *a += b;
                }
            }
            other => return Err(bad(s, &other)),
        }
    }
    for s in 1..n {
        t.send(s, Message::Sums(total.clone()))?;
    }
    Ok(total)
}

/// One training step of `parts` (one per stage, in order) as threads of this process, stage `s`
/// with `threads[s]` threads of its own; one part runs on the calling thread as it is. Returns
/// each stage's report; the first error of a stage that failed by itself (not because another
/// stopped) is returned.
pub fn step_threads(
    parts: &mut [StageState],
    job: &StepJob,
    threads: &[usize],
) -> Result<Vec<StageReport>> {
    let t0 = Instant::now();
    on_threads(parts, threads, |t, p| stage_step(t, p, job, t0))
}

/// A validation pass over `parts` as threads of this process, as [`step_threads`] runs a step.
pub fn eval_threads(
    parts: &mut [StageState],
    job: &EvalJob,
    threads: &[usize],
) -> Result<EvalTotals> {
    let totals = on_threads(parts, threads, |t, p| stage_eval(t, p, job))?;
    Ok(totals[0])
}

/// Runs `f` for every stage of `parts` on a thread of its own (stage 0 on the calling thread),
/// connected by channels, stage `s` with `threads[s]` threads; one stage runs as it is. Returns
/// each stage's result; the first error of a stage that failed by itself (not because another
/// stopped) is returned.
fn on_threads<R: Send + std::fmt::Debug>(
    parts: &mut [StageState],
    threads: &[usize],
    f: impl Fn(&mut dyn Transport, &mut StageState) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let n = parts.len();
    if n == 0 || threads.len() != n {
        return Err(Error::Invalid(format!(
            "a pipeline step needs one thread count per stage ({n} stages, {} counts)",
            threads.len()
        )));
    }
    let mut ts = threads::connect(n);
    if n == 1 {
        return Ok(vec![f(&mut ts[0], &mut parts[0])?]);
    }
    let f = &f;
    let results: Vec<Result<R>> = std::thread::scope(|sc| {
        let (p0, rest) = parts.split_first_mut().expect("one stage at least");
        let mut ts = ts.into_iter();
        let mut t_first = ts.next().expect("one transport per stage");
        let workers: Vec<_> = rest
            .iter_mut()
            .zip(ts)
            .zip(&threads[1..])
            .enumerate()
            .map(|(i, ((p, mut tr), &k))| {
                std::thread::Builder::new()
                    .name(format!("pare-train-stage-{}", i + 1))
                    .spawn_scoped(sc, move || {
                        crate::parallel::with_threads(k, || f(&mut tr, p))
                    })
            })
            .collect();
        let r0 = crate::parallel::with_threads(threads[0], || f(&mut t_first, p0));
        // Stage 0's transport goes first, so a stage still waiting on it learns it has stopped.
        drop(t_first);
        let mut out = vec![r0];
        for w in workers {
            out.push(match w {
                Ok(h) => h
                    .join()
                    .unwrap_or_else(|_| Err(Error::Model("a pipeline stage panicked".into()))),
                Err(e) => Err(Error::Model(format!("starting a stage thread: {e}"))),
            });
        }
        out
    });
    let caused = |e: &Error| e.to_string().contains("has stopped");
    if let Some(i) = results
        .iter()
        .position(|r| matches!(r, Err(e) if !caused(e)))
        .or_else(|| results.iter().position(|r| r.is_err()))
    {
        return Err(results
            .into_iter()
            .nth(i)
            .expect("index found")
            .unwrap_err());
    }
    Ok(results.into_iter().map(|r| r.expect("no error")).collect())
}

/// One step's stages in words: the bubble measured from the stages' timestamps against
/// (S − 1)/(S − 1 + M) (equal stages) and against `schedule` simulated with each stage's own mean
/// forward and backward times (the split's imbalance included), and per stage its busy time,
/// idle share, micro-batches held at once and activation memory at its peak.
pub fn describe_step(reports: &[StageReport], schedule: Schedule) -> String {
    let slots: Vec<Slot> = reports.iter().flat_map(|r| r.ops.clone()).collect();
    let n = reports.len();
    let m = reports.first().map_or(0, |r| r.ops.len() / 2);
    let mean = |r: &StageReport, forward: bool| {
        let d: Vec<f64> = r
            .ops
            .iter()
            .filter(|o| matches!(o.step, Step::Forward(_)) == forward)
            .map(|o| o.end - o.start)
            .collect();
        d.iter().sum::<f64>() / d.len().max(1) as f64
    };
    let f: Vec<f64> = reports.iter().map(|r| mean(r, true)).collect();
    let b: Vec<f64> = reports.iter().map(|r| mean(r, false)).collect();
    let simulated = super::schedule::simulate(&schedule.steps(n, m), &f, &b)
        .map(|sl| format!("{:.1}%", 100.0 * bubble_fraction(&sl, n)))
        .unwrap_or_else(|e| e.to_string());
    let idle = idle_per_stage(&slots, n);
    let mut s = format!(
        "pipeline step: {n} stages, {m} micro-batches, bubble {:.1}% (theory {:.1}%, simulated \
         with these stages' times {simulated})\n",
        100.0 * bubble_fraction(&slots, n),
        100.0 * theoretical_bubble(n, m)
    );
    s += "  stage  busy s  idle  F s/mb  B s/mb  live at peak  activations at peak MiB\n";
    for (i, (r, idle)) in reports.iter().zip(idle).enumerate() {
        let busy: f64 = r.ops.iter().map(|o| o.end - o.start).sum();
        s += &format!(
            "  {i:5}  {busy:6.2}  {:4.1}%  {:6.3}  {:6.3}  {:12}  {:23.1}\n",
            100.0 * idle,
            f[i],
            b[i],
            r.peak_live,
            r.peak_activation_bytes as f64 / (1 << 20) as f64
        );
    }
    s
}
