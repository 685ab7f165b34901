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
        let mut grads = Lora::zeros(&model.config, lora.config.clone());
        grads.keep_layers(layers.clone());
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
#[derive(Debug, Clone)]
pub struct MicroBatch<'a> {
    pub tokens: &'a [u32],
    pub weight: Vec<f32>,
    /// Seed of this micro-batch's dropout masks (`None`: no dropout).
    pub dropout_seed: Option<u64>,
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
    let mut live: BTreeMap<usize, (Stash, Option<Vec<f32>>)> = BTreeMap::new();
    let mut held = 0usize;
    let mut rep = StageReport::default();
    for step in steps {
        let (Step::Forward(i) | Step::Backward(i)) = step;
        let mb = &job.micro[i];
        let len = mb.tokens.len().saturating_sub(1);
        if len == 0 {
            return Err(Error::Invalid(
                "a training sequence needs at least 2 tokens".into(),
            ));
        }
        let tr = Trainable {
            model: job.model,
            lora: &part.lora,
            merged: job.merged,
            dropout_seed: mb.dropout_seed,
        };
        match step {
            Step::Forward(_) => {
                let received = if first {
                    None
                } else {
                    Some(recv_for(t, me - 1, i, false)?)
                };
                let start = secs();
                let mut x = match received {
                    Some(x) => x,
                    None => tr.embed(&mb.tokens[..len])?,
                };
                if x.len() != len * d {
                    return Err(Error::Model(format!(
                        "stage {me}: micro-batch {i} came with {} values for {len} positions",
                        x.len()
                    )));
                }
                let stash = Stash::forward(&tr, part.layers.clone(), job.checkpoint, &mut x)?;
                held += stash.bytes;
                let dy = if last {
                    let mut dx = vec![0.0f32; x.len()];
                    rep.loss += tr.head_loss(&x, &mb.tokens[1..], &mb.weight, Some(&mut dx))?;
                    Some(dx)
                } else {
                    None
                };
                live.insert(i, (stash, dy));
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
                let (stash, dy) = live.remove(&i).ok_or_else(|| {
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
    let n = parts.len();
    if n == 0 || threads.len() != n {
        return Err(Error::Invalid(format!(
            "a pipeline step needs one thread count per stage ({n} stages, {} counts)",
            threads.len()
        )));
    }
    let t0 = Instant::now();
    let mut ts = threads::connect(n);
    if n == 1 {
        return Ok(vec![stage_step(&mut ts[0], &mut parts[0], job, t0)?]);
    }
    let results: Vec<Result<StageReport>> = std::thread::scope(|sc| {
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
                        crate::parallel::with_threads(k, || stage_step(&mut tr, p, job, t0))
                    })
            })
            .collect();
        let r0 =
            crate::parallel::with_threads(threads[0], || stage_step(&mut t_first, p0, job, t0));
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
