//! The multiple-choice knapsack: pick one option per item (one format per tensor) minimising the
//! total cost (predicted error) with total size (bytes) at most a budget.
//!
//! Solved by dynamic programming over a grid of byte units: sizes are rounded *up* to whole units,
//! so every solution the DP finds truly fits the budget. The rounding can only cost optimality,
//! never feasibility, and how much it may have cost is bounded by the Lagrangian dual: for any
//! λ ≥ 0, Σ_items min_option (cost + λ·size) − λ·budget is a lower bound on the optimum, so the
//! gap between the DP's cost and the best such bound is reported with the solution.

use crate::error::{Error, Result};

/// One choice for an item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub bytes: u64,
    pub cost: f64,
}

/// A solution: the chosen option index per item, its totals, and a proven bound on how far its
/// cost can be from the optimum.
#[derive(Debug, Clone, PartialEq)]
pub struct Solution {
    pub picks: Vec<usize>,
    pub bytes: u64,
    pub cost: f64,
    /// Best Lagrangian lower bound on the optimal cost.
    pub lower_bound: f64,
}

impl Solution {
    /// `cost - lower_bound`, never negative.
    pub fn gap(&self) -> f64 {
        (self.cost - self.lower_bound).max(0.0)
    }
}

/// Grid units the budget is divided into: finer is closer to optimal, and costs time and memory
/// proportional to items × units.
pub const DEFAULT_UNITS: usize = 20_000;

/// Solves the problem; `items[i]` lists item i's options. Errors when an item has no option or
/// when even the smallest choice of every item exceeds the budget (the error gives that size).
pub fn solve(items: &[Vec<Choice>], budget: u64, units: usize) -> Result<Solution> {
    if items.is_empty() {
        return Err(Error::Invalid("nothing to plan: no tensors".into()));
    }
    if let Some(i) = items.iter().position(|c| c.is_empty()) {
        return Err(Error::Invalid(format!("item {i} has no allowed format")));
    }
    let min_total: u64 = items
        .iter()
        .map(|c| c.iter().map(|o| o.bytes).min().unwrap_or(0))
        .sum();
    if min_total > budget {
        return Err(Error::Invalid(format!(
            "budget of {budget} bytes is infeasible: the smallest allowed formats take {min_total} bytes"
        )));
    }
    let units = units.max(1);
    let unit = budget.div_ceil(units as u64).max(1);
    let cap = (budget / unit) as usize;
    let size = |b: u64| b.div_ceil(unit) as usize;
    // best[u] = least cost of the items so far using exactly... at most u units.
    let mut best = vec![0.0f64; cap + 1];
    let mut next = vec![f64::INFINITY; cap + 1];
    let mut choice: Vec<Vec<u8>> = Vec::with_capacity(items.len());
    for opts in items {
        if opts.len() > u8::MAX as usize {
            return Err(Error::Invalid("too many formats for one tensor".into()));
        }
        next.fill(f64::INFINITY);
        let mut ch = vec![u8::MAX; cap + 1];
        for (k, o) in opts.iter().enumerate() {
            let s = size(o.bytes);
            if s > cap {
                continue;
            }
            for u in s..=cap {
                let c = best[u - s] + o.cost;
                if c < next[u] {
                    next[u] = c;
                    ch[u] = k as u8;
                }
            }
        }
        std::mem::swap(&mut best, &mut next);
        choice.push(ch);
    }
    if !best[cap].is_finite() {
        return Err(Error::Invalid(format!(
            "budget of {budget} bytes is too tight for the byte grid (smallest size {min_total}); \
             try a finer grid or a larger budget"
        )));
    }
    // Walk back from the full budget.
    let mut picks = vec![0usize; items.len()];
    let mut u = cap;
    for i in (0..items.len()).rev() {
        let k = choice[i][u] as usize;
        picks[i] = k;
        u -= size(items[i][k].bytes);
    }
    improve(items, budget, &mut picks);
    let bytes = picks.iter().zip(items).map(|(&k, o)| o[k].bytes).sum();
    let cost = picks.iter().zip(items).map(|(&k, o)| o[k].cost).sum();
    Ok(Solution {
        picks,
        bytes,
        cost,
        lower_bound: lagrangian_bound(items, budget),
    })
}

/// Spends what the grid's rounding left unused: repeatedly makes the single change of one item's
/// option that lowers the cost most while the total still fits (exact bytes, no grid).
fn improve(items: &[Vec<Choice>], budget: u64, picks: &mut [usize]) {
    let mut used: u64 = picks.iter().zip(items).map(|(&k, o)| o[k].bytes).sum();
    for _ in 0..10 * items.len() {
        let mut best: Option<(usize, usize, f64)> = None;
        for (i, opts) in items.iter().enumerate() {
            let cur = opts[picks[i]];
            for (k, o) in opts.iter().enumerate() {
                let fits = used - cur.bytes + o.bytes <= budget;
                let gain = cur.cost - o.cost;
                if fits && gain > 0.0 && best.is_none_or(|b| gain > b.2) {
                    best = Some((i, k, gain));
                }
            }
        }
        let Some((i, k, _)) = best else { break };
        used = used - items[i][picks[i]].bytes + items[i][k].bytes;
        picks[i] = k;
    }
}

/// The best Lagrangian lower bound max_λ L(λ), by golden-section search on the concave L over
/// λ in a log-spaced bracket.
fn lagrangian_bound(items: &[Vec<Choice>], budget: u64) -> f64 {
    // Evaluated as Σ cost + λ·(Σ bytes − budget) over each item's minimiser, so that a huge λ
    // does not swamp the costs in rounding.
    let l = |lam: f64| -> f64 {
        let (mut cost, mut bytes) = (0.0f64, 0i128);
        for opts in items {
            let o = opts
                .iter()
                .min_by(|a, b| {
                    (a.cost + lam * a.bytes as f64).total_cmp(&(b.cost + lam * b.bytes as f64))
                })
                .expect("items are checked to be non-empty");
            cost += o.cost;
            bytes += o.bytes as i128;
        }
        cost + lam * (bytes - budget as i128) as f64
    };
    // Scan λ over many decades, then refine around the best.
    let mut best = (0.0, l(0.0));
    let mut lam = 1e-30;
    while lam < 1e30 {
        let v = l(lam);
        if v > best.1 {
            best = (lam, v);
        }
        lam *= 1.25;
    }
    let (mut a, mut b) = (best.0 / 1.25, best.0 * 1.25);
    for _ in 0..60 {
        let m1 = a + (b - a) / 3.0;
        let m2 = b - (b - a) / 3.0;
        if l(m1) < l(m2) {
            a = m1;
        } else {
            b = m2;
        }
    }
    best.1.max(l((a + b) / 2.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute(items: &[Vec<Choice>], budget: u64) -> Option<f64> {
        let mut best: Option<f64> = None;
        let mut idx = vec![0usize; items.len()];
        loop {
            let bytes: u64 = idx.iter().zip(items).map(|(&k, o)| o[k].bytes).sum();
            if bytes <= budget {
                let c: f64 = idx.iter().zip(items).map(|(&k, o)| o[k].cost).sum();
                best = Some(best.map_or(c, |b: f64| b.min(c)));
            }
            let mut i = 0;
            loop {
                if i == items.len() {
                    return best;
                }
                idx[i] += 1;
                if idx[i] < items[i].len() {
                    break;
                }
                idx[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn matches_brute_force_on_small_problems() {
        let mut s = 12345u64;
        let mut r = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..200 {
            let n = 1 + (r() % 5) as usize;
            let items: Vec<Vec<Choice>> = (0..n)
                .map(|_| {
                    (0..1 + r() % 4)
                        .map(|_| Choice {
                            bytes: 1 + r() % 50,
                            cost: (r() % 1000) as f64 / 10.0,
                        })
                        .collect()
                })
                .collect();
            let budget = 10 + r() % 150;
            let want = brute(&items, budget);
            // A grid of one unit per byte: the DP is then exact.
            match solve(&items, budget, budget as usize) {
                Ok(sol) => {
                    let w = want.expect("solver found a solution brute force did not");
                    assert!(sol.bytes <= budget);
                    assert!((sol.cost - w).abs() < 1e-9, "{} vs {w}", sol.cost);
                    assert!(sol.lower_bound <= sol.cost + 1e-9);
                }
                Err(_) => assert!(want.is_none()),
            }
            // A coarse grid still fits the budget, with a valid bound.
            if let Ok(sol) = solve(&items, budget, 7) {
                assert!(sol.bytes <= budget);
                assert!(sol.lower_bound <= want.unwrap() + 1e-9);
            }
        }
    }

    #[test]
    fn infeasible_budget_names_the_smallest_size() {
        let items = vec![
            vec![Choice {
                bytes: 10,
                cost: 1.0,
            }],
            vec![Choice {
                bytes: 5,
                cost: 1.0,
            }],
        ];
        let e = solve(&items, 14, 100).unwrap_err().to_string();
        assert!(e.contains("15"), "{e}");
        assert!(solve(&[], 10, 10).is_err());
    }
}
