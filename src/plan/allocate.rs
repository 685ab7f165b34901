//! Choosing one format per tensor: `uniform` (one format everywhere), `thresholds` (the seed's rule:
//! tensors whose composite score is high get more bits, low get fewer, the rest a base format set as
//! high as the budget allows) and `optimal` (the multiple-choice knapsack over measured errors:
//! least total predicted error within the budget, with its optimality gap).

use crate::error::{Error, Result};
use crate::plan::knapsack::{self, Choice};
use crate::quant::{format, GgmlType};

/// One measured option for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Candidate {
    /// The format as users name it.
    pub format: GgmlType,
    /// The type the tensor is stored in for this format (its twin at this row length).
    pub storage: GgmlType,
    /// What the option costs against the budget (data bytes, padded when the budget is a file).
    pub bytes: u64,
    /// Predicted error (the tensor's sensitivity weight included).
    pub error: f64,
}

/// How formats are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    Uniform(GgmlType),
    /// Tensors whose score is in the top `high` fraction get one step more bits, the bottom `low`
    /// fraction one step fewer, on the ladder [`THRESHOLD_LADDER`].
    Thresholds {
        high: f64,
        low: f64,
    },
    Optimal,
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Strategy> {
        match s {
            "optimal" => Ok(Strategy::Optimal),
            "thresholds" => Ok(Strategy::Thresholds {
                high: 0.25,
                low: 0.25,
            }),
            _ => match s.strip_prefix("uniform") {
                Some(rest) => {
                    let f = rest.trim_start_matches([':', '=', ' ']);
                    if f.is_empty() {
                        return Err(Error::Invalid(
                            "uniform needs a format: uniform:q4_g64".into(),
                        ));
                    }
                    Ok(Strategy::Uniform(format::parse(f)?))
                }
                None => Err(Error::Invalid(format!(
                    "unknown strategy {s:?}: optimal, thresholds or uniform:FORMAT"
                ))),
            },
        }
    }
}

/// The formats `thresholds` moves tensors between, fewest bits first.
pub const THRESHOLD_LADDER: [&str; 7] = [
    "q2_g64", "q3_g64", "q4_g64", "q5_g64", "q6_g64", "q8_0", "f16",
];

/// The chosen candidate per tensor, and for `optimal` a lower bound on the best possible total error.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub picks: Vec<usize>,
    pub lower_bound: Option<f64>,
}

impl Allocation {
    pub fn bytes(&self, tensors: &[Vec<Candidate>]) -> u64 {
        self.picks
            .iter()
            .zip(tensors)
            .map(|(&p, c)| c[p].bytes)
            .sum()
    }

    pub fn error(&self, tensors: &[Vec<Candidate>]) -> f64 {
        self.picks
            .iter()
            .zip(tensors)
            .map(|(&p, c)| c[p].error)
            .sum()
    }
}

fn infeasible(need: u64, capacity: u64, what: &str) -> Error {
    Error::Invalid(format!(
        "budget infeasible: {what} need {need} bytes for the tensors pare chooses formats for, {capacity} are left for them"
    ))
}

/// Chooses one candidate per tensor (`tensors[i]` lists tensor i's allowed options; a pinned tensor
/// has one) with total bytes at most `capacity` (`None`: no budget, only `uniform` allows that).
/// `scores` are the composite scores `thresholds` ranks by.
pub fn allocate(
    tensors: &[Vec<Candidate>],
    strategy: &Strategy,
    capacity: Option<u64>,
    scores: &[f64],
) -> Result<Allocation> {
    if tensors.is_empty() {
        return Err(Error::Invalid(
            "nothing to plan: the model has no matrices".into(),
        ));
    }
    if let Some(i) = tensors.iter().position(|c| c.is_empty()) {
        return Err(Error::Invalid(format!(
            "tensor {i} has no allowed format (check --min-bits/--max-bits)"
        )));
    }
    match strategy {
        Strategy::Uniform(f) => {
            let want = *f;
            let picks = tensors
                .iter()
                .map(|c| {
                    if c.len() == 1 {
                        return Ok(0); // pinned by an override
                    }
                    // A format and its ggml twin (q4_g32 and q4_1) are one candidate, measured
                    // under whichever name came first.
                    let twin = crate::quant::pq::Pq::member;
                    c.iter()
                        .position(|o| {
                            o.format == want
                                || (twin(o.format).is_some() && twin(o.format) == twin(want))
                        })
                        .ok_or_else(|| {
                            Error::Invalid(format!(
                                "uniform {} is not allowed here (outside --min-bits/--max-bits?)",
                                format::name(want)
                            ))
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            let a = Allocation {
                picks,
                lower_bound: None,
            };
            if let Some(cap) = capacity {
                let need = a.bytes(tensors);
                if need > cap {
                    return Err(infeasible(
                        need,
                        cap,
                        &format!("uniform {}", format::name(want)),
                    ));
                }
            }
            Ok(a)
        }
        Strategy::Thresholds { high, low } => {
            let cap =
                capacity.ok_or_else(|| Error::Invalid("thresholds needs a --budget".into()))?;
            thresholds(tensors, cap, scores, *high, *low)
        }
        Strategy::Optimal => {
            let cap = capacity.ok_or_else(|| Error::Invalid("optimal needs a --budget".into()))?;
            let items: Vec<Vec<Choice>> = tensors
                .iter()
                .map(|c| {
                    c.iter()
                        .map(|o| Choice {
                            bytes: o.bytes,
                            cost: o.error,
                        })
                        .collect()
                })
                .collect();
            let s = knapsack::solve(&items, cap, knapsack::DEFAULT_UNITS).map_err(|e| {
                let min: u64 = tensors
                    .iter()
                    .map(|c| c.iter().map(|o| o.bytes).min().unwrap_or(0))
                    .sum();
                match e {
                    Error::Invalid(_) if min > cap => {
                        infeasible(min, cap, "the smallest allowed formats")
                    }
                    e => e,
                }
            })?;
            Ok(Allocation {
                picks: s.picks,
                lower_bound: Some(s.lower_bound),
            })
        }
    }
}

fn thresholds(
    tensors: &[Vec<Candidate>],
    cap: u64,
    scores: &[f64],
    high: f64,
    low: f64,
) -> Result<Allocation> {
    if scores.len() != tensors.len() {
        return Err(Error::Invalid("one score per tensor is needed".into()));
    }
    let ladder: Vec<GgmlType> = THRESHOLD_LADDER
        .iter()
        .map(|n| format::parse(n).expect("ladder names parse"))
        .collect();
    // Ranks: the top `high` fraction of tensors by score go one step up, the bottom `low` one down.
    let n = scores.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (n_hi, n_lo) = (
        (high * n as f64).round() as usize,
        (low * n as f64).round() as usize,
    );
    let mut tier = vec![0isize; n];
    for (rank, &i) in order.iter().enumerate() {
        if rank < n_hi {
            tier[i] = 1;
        } else if rank >= n.saturating_sub(n_lo) {
            tier[i] = -1;
        }
    }
    // Per tensor, the ladder steps it allows (in ladder order).
    let steps: Vec<Vec<(usize, usize)>> = tensors
        .iter()
        .map(|c| {
            ladder
                .iter()
                .enumerate()
                .filter_map(|(li, f)| c.iter().position(|o| o.format == *f).map(|ci| (li, ci)))
                .collect()
        })
        .collect();
    let pick_at = |base: isize| -> Vec<usize> {
        tensors
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if c.len() == 1 || steps[i].is_empty() {
                    // Pinned, or no ladder format allowed: its smallest option.
                    return (0..c.len()).min_by_key(|&k| c[k].bytes).unwrap_or(0);
                }
                let want = (base + tier[i]).clamp(0, ladder.len() as isize - 1) as usize;
                // The allowed step nearest below the wanted one, else the lowest allowed.
                steps[i]
                    .iter()
                    .rev()
                    .find(|(li, _)| *li <= want)
                    .unwrap_or(&steps[i][0])
                    .1
            })
            .collect()
    };
    let mut smallest = u64::MAX;
    for base in (0..ladder.len() as isize).rev() {
        let a = Allocation {
            picks: pick_at(base),
            lower_bound: None,
        };
        let b = a.bytes(tensors);
        smallest = smallest.min(b);
        if b <= cap {
            return Ok(a);
        }
    }
    Err(infeasible(smallest, cap, "thresholds' smallest ladder"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(errs: &[(&str, u64, f64)]) -> Vec<Candidate> {
        errs.iter()
            .map(|&(n, b, e)| {
                let f = format::parse(n).unwrap();
                Candidate {
                    format: f,
                    storage: f,
                    bytes: b,
                    error: e,
                }
            })
            .collect()
    }

    #[test]
    fn optimal_spends_bytes_where_error_falls_most() {
        // Tensor 0 gains little from more bits, tensor 1 a lot.
        let t = vec![
            cands(&[("q2_g64", 10, 5.0), ("q4_g64", 20, 4.0)]),
            cands(&[("q2_g64", 10, 50.0), ("q4_g64", 20, 1.0)]),
        ];
        let a = allocate(&t, &Strategy::Optimal, Some(30), &[0.0, 0.0]).unwrap();
        assert_eq!(a.picks, vec![0, 1]);
        assert!(a.lower_bound.unwrap() <= a.error(&t) + 1e-9);
        let u = allocate(
            &t,
            &Strategy::Uniform(format::parse("q2_g64").unwrap()),
            Some(30),
            &[],
        )
        .unwrap();
        assert!(a.error(&t) < u.error(&t));
        let e = allocate(&t, &Strategy::Optimal, Some(19), &[0.0, 0.0]).unwrap_err();
        assert!(e.to_string().contains("20 bytes"), "{e}");
        let e = allocate(
            &t,
            &Strategy::Uniform(format::parse("q4_g64").unwrap()),
            Some(30),
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("40 bytes"), "{e}");
    }

    #[test]
    fn thresholds_give_high_scores_more_bits_within_the_budget() {
        let ladder = [
            ("q2_g64", 10, 9.0),
            ("q3_g64", 15, 5.0),
            ("q4_g64", 20, 3.0),
            ("q5_g64", 25, 2.0),
        ];
        let t: Vec<Vec<Candidate>> = (0..4).map(|_| cands(&ladder)).collect();
        let s = [0.9, 0.5, 0.4, 0.1];
        let a = allocate(
            &t,
            &Strategy::Thresholds {
                high: 0.25,
                low: 0.25,
            },
            Some(70),
            &s,
        )
        .unwrap();
        let bits: Vec<u64> = a.picks.iter().zip(&t).map(|(&p, c)| c[p].bytes).collect();
        assert!(bits[0] > bits[1] && bits[1] > bits[3], "{bits:?}");
        assert!(a.bytes(&t) <= 70);
        assert!(allocate(
            &t,
            &Strategy::Thresholds {
                high: 0.25,
                low: 0.25
            },
            Some(39),
            &s
        )
        .is_err());
    }

    #[test]
    fn strategies_parse() {
        assert_eq!("optimal".parse::<Strategy>().unwrap(), Strategy::Optimal);
        assert!(matches!(
            "uniform:q3_g64".parse::<Strategy>().unwrap(),
            Strategy::Uniform(_)
        ));
        assert!("uniform".parse::<Strategy>().is_err());
        assert!("greedy".parse::<Strategy>().is_err());
    }
}
