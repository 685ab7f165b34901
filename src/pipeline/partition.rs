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

use crate::error::{Error, Result};
use crate::model::forward::scratch_bytes;
use crate::model::{Batch, Logits, Model, State};

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
}

impl Costs {
    /// Costs from the shapes alone: multiply-accumulates per token of every matrix.
    pub fn estimate(model: &Model) -> Costs {
        let w = &model.weights;
        let macs = |m: &crate::quant::matmul::QMatrix| (m.rows * m.cols) as f64;
        let layer_cost = w
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                    .map(macs)
                    .iter()
                    .sum()
            })
            .collect();
        Costs {
            layer_bytes: layer_bytes(model),
            layer_cost,
            embed_bytes: w.token_embd.n_bytes() as u64,
            embed_cost: model.config.n_embd as f64,
            head_bytes: head_bytes(model),
            head_cost: macs(&w.output),
            measured: false,
        }
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
            let m: usize = [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down]
                .iter()
                .map(|m| m.n_bytes())
                .sum();
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Bytes of one KV cache position of one layer (keys and values, f32).
    pub kv_bytes_per_pos: usize,
    /// Scratch buffers of one stage's state.
    pub scratch_bytes: usize,
    pub n_embd: usize,
}

impl RunShape {
    pub fn new(model: &Model, n_ctx: usize, mb_tokens: usize, logits_rows: usize) -> RunShape {
        let c = &model.config;
        RunShape {
            n_ctx,
            mb_tokens,
            logits_rows,
            n_vocab: c.n_vocab,
            kv_bytes_per_pos: 2 * 4 * c.kv_dim(),
            scratch_bytes: scratch_bytes(c, n_ctx),
            n_embd: c.n_embd,
        }
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
    /// Weights + KV cache + scratch + two micro-batches of activations in flight + logits kept.
    pub peak_bytes: u64,
    /// Sum of the stage's costs per token (unit as in [`Costs`]).
    pub cost: f64,
}

/// Contiguous stages covering every layer once, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub stages: Vec<StagePlan>,
    pub measured: bool,
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
        let mut s = format!(
            "pipeline plan: {} stages, balanced by {} (slowest stage {:.2}x the mean)\n",
            self.stages.len(),
            if self.measured {
                "measured time per layer"
            } else {
                "multiply-accumulates per layer"
            },
            self.imbalance()
        );
        s += "  stage  layers   weights MiB  act/mb KiB  KV MiB  peak MiB  share of cost\n";
        for (i, st) in self.stages.iter().enumerate() {
            s += &format!(
                "  {i:5}  {:>6}  {:11.2}  {:10.1}  {:6.2}  {:8.2}  {:12.1}%\n",
                format!("{}-{}", st.layers.start, st.layers.end - 1),
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
        .map(|(i, r)| stage(costs, shape, r.clone(), i == 0, i + 1 == n))
        .collect();
    Ok(Plan {
        stages,
        measured: costs.measured,
    })
}

fn stage(
    costs: &Costs,
    shape: &RunShape,
    layers: Range<usize>,
    first: bool,
    last: bool,
) -> StagePlan {
    let mut weight_bytes: u64 = costs.layer_bytes[layers.clone()].iter().sum();
    let mut cost: f64 = costs.layer_cost[layers.clone()].iter().sum();
    if first {
        weight_bytes += costs.embed_bytes;
        cost += costs.embed_cost;
    }
    if last {
        weight_bytes += costs.head_bytes;
        cost += costs.head_cost;
    }
    let activation_bytes = (shape.mb_tokens * shape.n_embd * 4) as u64;
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
        cost,
    }
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
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            let smallest = smallest_fitting(costs, shape, limit);
            Err(Error::Invalid(match smallest {
                Some(k) => format!(
                    "{n_stages} stages do not fit {:.1} MiB per worker; the smallest number of \
                     stages that fits is {k}",
                    mib(limit)
                ),
                None => {
                    // Both ends exist in any plan of 2 or more stages: the larger of the first
                    // stage with one layer and the last with one layer bounds every plan.
                    let first = stage(costs, shape, 0..1, true, n_layer == 1);
                    let last = stage(costs, shape, n_layer - 1..n_layer, n_layer == 1, true);
                    format!(
                        "no number of stages fits {:.1} MiB per worker (the first or last stage \
                         with a single layer already needs about {:.1} MiB)",
                        mib(limit),
                        mib(first.peak_bytes.max(last.peak_bytes))
                    )
                }
            }))
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
    let fits = |r: Range<usize>, first: bool, last: bool| -> Option<f64> {
        let s = stage(costs, shape, r, first, last);
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
                let Some(c) = fits(i..j, k == 1, k == n_stages && j == n) else {
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

    #[test]
    fn bad_stage_counts_are_errors() {
        let c = costs(&[1.0; 3], 0.0);
        assert!(partition(&c, &shape(), 0, None).is_err());
        assert!(partition(&c, &shape(), 4, None).is_err());
    }
}
