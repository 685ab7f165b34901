//! Pipeline schedules: for each stage, the order in which it runs the forward (F) and backward (B)
//! passes of the micro-batches of one step.
//!
//! - GPipe: every stage runs all forwards, then all backwards; the backward pass visits the stages
//!   from last to first (its data dependency), so a stage holds the activations of all M
//!   micro-batches at once.
//! - 1F1B (PipeDream-Flush): stage `s` of `S` runs `min(S - 1 - s, M)` warm-up forwards, then
//!   alternates one forward and one backward, then drains the remaining backwards; a stage holds
//!   at most `S - s` micro-batches' activations, however large M is. Both flush at the end of the
//!   step, so gradients accumulate over all M micro-batches before the optimizer steps.
//!
//! Evaluation and generation run [`forward_only`]; training (`pare tune --schedule`) runs the
//! others. [`simulate`] plays a schedule against the data dependencies (F of a micro-batch needs
//! the previous stage's F; B needs the next stage's B and its own F) to give each step's start
//! and end, from which the bubble fraction and a timeline chart follow.

use crate::error::{Error, Result};
use crate::plot::{Bar, Timeline};

/// One step of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Forward(usize),
    Backward(usize),
}

/// Which schedule a training step uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    GPipe,
    OneFOneB,
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gpipe" => Ok(Schedule::GPipe),
            "1f1b" | "pipedream-flush" => Ok(Schedule::OneFOneB),
            _ => Err(Error::Invalid(format!(
                "unknown schedule {s:?} (gpipe, 1f1b)"
            ))),
        }
    }
}

impl Schedule {
    /// Per stage, its ordered steps for `n_micro` micro-batches over `n_stages` stages.
    pub fn steps(self, n_stages: usize, n_micro: usize) -> Vec<Vec<Step>> {
        match self {
            Schedule::GPipe => gpipe(n_stages, n_micro),
            Schedule::OneFOneB => one_f_one_b(n_stages, n_micro),
        }
    }
}

/// Forwards only, in micro-batch order (evaluation and generation).
pub fn forward_only(n_stages: usize, n_micro: usize) -> Vec<Vec<Step>> {
    vec![(0..n_micro).map(Step::Forward).collect(); n_stages]
}

/// GPipe: all forwards, then all backwards.
pub fn gpipe(n_stages: usize, n_micro: usize) -> Vec<Vec<Step>> {
    let one: Vec<Step> = (0..n_micro)
        .map(Step::Forward)
        .chain((0..n_micro).map(Step::Backward))
        .collect();
    vec![one; n_stages]
}

/// 1F1B (PipeDream-Flush): warm-up forwards, one-forward-one-backward, cool-down backwards.
pub fn one_f_one_b(n_stages: usize, n_micro: usize) -> Vec<Vec<Step>> {
    (0..n_stages)
        .map(|s| {
            let warm = (n_stages - 1 - s).min(n_micro);
            let mut steps: Vec<Step> = (0..warm).map(Step::Forward).collect();
            for i in 0..n_micro - warm {
                steps.push(Step::Forward(warm + i));
                steps.push(Step::Backward(i));
            }
            steps.extend((n_micro - warm..n_micro).map(Step::Backward));
            steps
        })
        .collect()
}

/// Largest number of micro-batches whose activations a stage holds at once (forward done,
/// backward not yet) under `steps`.
pub fn max_in_flight(steps: &[Step]) -> usize {
    let mut live = 0usize;
    let mut most = 0;
    for s in steps {
        match s {
            Step::Forward(_) => {
                live += 1;
                most = most.max(live);
            }
            Step::Backward(_) => live = live.saturating_sub(1),
        }
    }
    most
}

/// One executed step of a simulated schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slot {
    pub stage: usize,
    pub step: Step,
    pub start: f64,
    pub end: f64,
}

/// Plays `schedule` with every forward taking `f` and every backward `b` time units (per stage:
/// `f[stage]`, `b[stage]`), each stage running its steps in order as soon as their inputs exist.
/// Errors when the schedule deadlocks or misses a step.
pub fn simulate(schedule: &[Vec<Step>], f: &[f64], b: &[f64]) -> Result<Vec<Slot>> {
    let n = schedule.len();
    let key = |st: Step| match st {
        Step::Forward(m) => (0, m),
        Step::Backward(m) => (1, m),
    };
    let mut done: std::collections::HashMap<(usize, (u8, usize)), f64> = Default::default();
    let mut next = vec![0usize; n];
    let mut free = vec![0.0f64; n];
    let mut out = Vec::new();
    loop {
        let mut progressed = false;
        for s in 0..n {
            while let Some(&step) = schedule[s].get(next[s]) {
                let deps: Vec<(usize, (u8, usize))> = match step {
                    Step::Forward(m) if s > 0 => vec![(s - 1, (0, m))],
                    Step::Forward(_) => vec![],
                    Step::Backward(m) if s + 1 < n => vec![(s + 1, (1, m)), (s, (0, m))],
                    Step::Backward(m) => vec![(s, (0, m))],
                };
                let Some(ready) = deps
                    .iter()
                    .map(|d| done.get(d).copied())
                    .try_fold(0.0f64, |a, t| t.map(|t| a.max(t)))
                else {
                    break;
                };
                let start = ready.max(free[s]);
                let end = start
                    + match step {
                        Step::Forward(_) => f[s],
                        Step::Backward(_) => b[s],
                    };
                let (k0, m) = key(step);
                done.insert((s, (k0, m)), end);
                free[s] = end;
                out.push(Slot {
                    stage: s,
                    step,
                    start,
                    end,
                });
                next[s] += 1;
                progressed = true;
            }
        }
        if (0..n).all(|s| next[s] == schedule[s].len()) {
            break;
        }
        if !progressed {
            return Err(Error::Invalid(format!(
                "the schedule deadlocks: stages wait at steps {:?}",
                (0..n).map(|s| schedule[s].get(next[s])).collect::<Vec<_>>()
            )));
        }
    }
    Ok(out)
}

/// Fraction of stage-time idle between the first start and the last end of `slots`.
pub fn bubble_fraction(slots: &[Slot], n_stages: usize) -> f64 {
    idle_per_stage(slots, n_stages).iter().sum::<f64>() / n_stages as f64
}

/// A chart of `slots` (stage × time, forwards and backwards in two colours, each bar labelled
/// with its micro-batch), for `crate::plot::write_timeline_png`.
pub fn timeline(slots: &[Slot], n_stages: usize, title: String, x_label: &str) -> Timeline {
    Timeline {
        title,
        x_label: x_label.into(),
        rows: (0..n_stages).map(|s| format!("stage {s}")).collect(),
        classes: vec!["forward".into(), "backward".into()],
        bars: slots
            .iter()
            .map(|s| {
                let (class, mb) = match s.step {
                    Step::Forward(i) => (0, i),
                    Step::Backward(i) => (1, i),
                };
                Bar {
                    row: s.stage,
                    start: s.start,
                    end: s.end,
                    class,
                    label: mb.to_string(),
                }
            })
            .collect(),
    }
}

/// Each stage's idle share of the span from the first start to the last end of `slots`.
pub fn idle_per_stage(slots: &[Slot], n_stages: usize) -> Vec<f64> {
    let t0 = slots.iter().map(|s| s.start).fold(f64::INFINITY, f64::min);
    let t1 = slots.iter().map(|s| s.end).fold(0.0, f64::max);
    (0..n_stages)
        .map(|st| {
            let busy: f64 = slots
                .iter()
                .filter(|s| s.stage == st)
                .map(|s| s.end - s.start)
                .sum();
            1.0 - busy / (t1 - t0)
        })
        .collect()
}

/// The textbook bubble fraction of GPipe and 1F1B with equal stages: `(S - 1) / (S - 1 + M)`.
pub fn theoretical_bubble(n_stages: usize, n_micro: usize) -> f64 {
    (n_stages - 1) as f64 / (n_stages - 1 + n_micro) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn each_step_once(sched: &[Vec<Step>], m: usize, backward: bool) {
        for steps in sched {
            let mut seen = std::collections::HashSet::new();
            for s in steps {
                assert!(seen.insert(*s), "{s:?} twice");
            }
            let want = if backward { 2 * m } else { m };
            assert_eq!(seen.len(), want);
            // A micro-batch's backward follows its forward on the same stage.
            for mb in 0..m {
                let f = steps.iter().position(|&s| s == Step::Forward(mb)).unwrap();
                if backward {
                    let b = steps.iter().position(|&s| s == Step::Backward(mb)).unwrap();
                    assert!(f < b);
                }
            }
        }
    }

    #[test]
    fn gpipe_all_forwards_then_all_backwards() {
        for s in 1..5 {
            for m in 1..9 {
                let g = gpipe(s, m);
                each_step_once(&g, m, true);
                for steps in &g {
                    let first_b = steps
                        .iter()
                        .position(|x| matches!(x, Step::Backward(_)))
                        .unwrap();
                    assert!(steps[..first_b]
                        .iter()
                        .all(|x| matches!(x, Step::Forward(_))));
                    assert!(steps[first_b..]
                        .iter()
                        .all(|x| matches!(x, Step::Backward(_))));
                    assert_eq!(max_in_flight(steps), m);
                }
                // Backwards visit stages last to first: stage s's B(mb) ends before s-1's starts.
                let slots = simulate(&g, &vec![1.0; s], &vec![2.0; s]).unwrap();
                for mb in 0..m {
                    let b = |st: usize| {
                        slots
                            .iter()
                            .find(|x| x.stage == st && x.step == Step::Backward(mb))
                            .unwrap()
                    };
                    for st in 1..s {
                        assert!(b(st).end <= b(st - 1).start);
                    }
                }
            }
        }
    }

    #[test]
    fn one_f_one_b_bounds_activations_in_flight() {
        for s in 1..6 {
            for m in 1..12 {
                let sch = one_f_one_b(s, m);
                each_step_once(&sch, m, true);
                for (i, steps) in sch.iter().enumerate() {
                    assert!(max_in_flight(steps) <= s, "S {s} M {m} stage {i}");
                    assert_eq!(max_in_flight(steps), (s - i).min(m));
                }
                simulate(&sch, &vec![1.0; s], &vec![2.0; s]).unwrap();
            }
        }
    }

    #[test]
    fn equal_stages_give_the_textbook_bubble() {
        for s in 1..5 {
            for m in [1, 2, 4, 8] {
                for sched in [Schedule::GPipe, Schedule::OneFOneB] {
                    let slots = simulate(&sched.steps(s, m), &vec![1.0; s], &vec![2.0; s]).unwrap();
                    let bubble = bubble_fraction(&slots, s);
                    assert!(
                        (bubble - theoretical_bubble(s, m)).abs() < 1e-12,
                        "{sched:?} S {s} M {m}: {bubble}"
                    );
                }
                let fwd = simulate(&forward_only(s, m), &vec![1.0; s], &vec![0.0; s]).unwrap();
                assert!((bubble_fraction(&fwd, s) - theoretical_bubble(s, m)).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn a_deadlocking_order_is_reported() {
        // Stage 0 wants B(0) before F(1) but stage 1 needs F(1)... run backwards first.
        let bad = vec![
            vec![Step::Backward(0), Step::Forward(0)],
            vec![Step::Forward(0), Step::Backward(0)],
        ];
        assert!(simulate(&bad, &[1.0; 2], &[1.0; 2]).is_err());
        assert_eq!("1F1B".parse::<Schedule>().unwrap(), Schedule::OneFOneB);
        assert!("zigzag".parse::<Schedule>().is_err());
    }
}
