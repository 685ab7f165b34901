//! AdamW (Loshchilov & Hutter) over a list of parameter tensors, the learning-rate schedule
//! (linear warmup, then cosine decay to a floor) and gradient clipping by global norm.

use crate::error::{Error, Result};

/// AdamW's hyper-parameters and its moment estimates, one pair per parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Updates taken so far (for bias correction).
    pub t: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for tensors of the given sizes.
    pub fn new(sizes: &[usize], weight_decay: f32) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every tensor `params[i]` by its gradient `grads[i]` at learning rate `lr`;
    /// weight decay is decoupled (applied to the parameter, not the gradient).
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[&[f32]], lr: f32) -> Result<()> {
        let wd = self.weight_decay;
        self.step_each(params, grads, &|_| (lr, wd))
    }

    /// [`AdamW::step`] with a learning rate and weight decay per tensor: `rate(i)` gives them for
    /// tensor `i` (learned quantization scales take their own rate and no decay).
    pub fn step_each(
        &mut self,
        params: &mut [&mut Vec<f32>],
        grads: &[&[f32]],
        rate: &dyn Fn(usize) -> (f32, f32),
    ) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::Invalid(format!(
                "optimizer holds {} tensors, given {} parameters and {} gradients",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        self.t += 1;
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.t as i32);
        let bc2 = 1.0 - (self.beta2 as f64).powi(self.t as i32);
        for (k, (((p, g), m), v)) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
            .enumerate()
        {
            let (lr, wd) = rate(k);
            if p.len() != g.len() || p.len() != m.len() {
                return Err(Error::Invalid(format!(
                    "parameter of {} values, gradient of {}, moments of {}",
                    p.len(),
                    g.len(),
                    m.len()
                )));
            }
            for i in 0..p.len() {
                m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * g[i];
                v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * g[i] * g[i];
                let mh = m[i] as f64 / bc1;
                let vh = v[i] as f64 / bc2;
                let upd = mh / (vh.sqrt() + self.eps as f64) + wd as f64 * p[i] as f64;
                p[i] -= (lr as f64 * upd) as f32;
            }
        }
        Ok(())
    }
}

/// Learning rate at a step: linear warmup over `warmup` steps to `peak`, then cosine decay to
/// `peak · min_ratio` at `total`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub peak: f32,
    pub warmup: usize,
    pub total: usize,
    pub min_ratio: f32,
}

impl Schedule {
    /// The rate for update number `step` (0-based).
    pub fn lr(&self, step: usize) -> f32 {
        if step < self.warmup {
            return self.peak * (step + 1) as f32 / self.warmup as f32;
        }
        let span = self.total.saturating_sub(self.warmup).max(1);
        let p = ((step - self.warmup) as f32 / span as f32).min(1.0);
        let cos = 0.5 * (1.0 + (std::f32::consts::PI * p).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cos)
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (when `max_norm > 0`);
/// returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [&mut Vec<f32>], max_norm: f32) -> f32 {
    let norm = sum_of_squares(grads).sqrt() as f32;
    scale_to_norm(grads, norm, max_norm);
    norm
}

/// Σ g² over every gradient tensor: a worker's share of the squared global norm (pipeline stages
/// add theirs up before clipping, since the norm is global).
pub fn sum_of_squares(grads: &[&mut Vec<f32>]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&v| v as f64 * v as f64)
        .sum()
}

/// Scales gradients whose global norm is `norm` down to `max_norm` (when `max_norm > 0` and the
/// norm exceeds it).
pub fn scale_to_norm(grads: &mut [&mut Vec<f32>], norm: f32, max_norm: f32) {
    if max_norm > 0.0 && norm > max_norm {
        let k = max_norm / norm;
        for g in grads.iter_mut() {
            for v in g.iter_mut() {
                *v *= k;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_minimises_a_quadratic_and_matches_one_hand_computed_step() {
        // First step: m̂ = g, v̂ = g², so the update is lr·(sign(g) + wd·p) up to eps.
        let mut opt = AdamW::new(&[2], 0.1);
        let mut p = vec![1.0f32, -2.0];
        opt.step(&mut [&mut p], &[&[0.5, -3.0]], 0.01).unwrap();
        assert!((p[0] - (1.0 - 0.01 * (1.0 + 0.1))).abs() < 1e-6, "{p:?}");
        assert!(
            (p[1] - (-2.0 + 0.01 * (1.0 + 0.1 * 2.0))).abs() < 1e-6,
            "{p:?}"
        );
        // And it converges on (p - 3)².
        let mut opt = AdamW::new(&[1], 0.0);
        let mut p = vec![0.0f32];
        for _ in 0..2000 {
            let g = 2.0 * (p[0] - 3.0);
            opt.step(&mut [&mut p], &[&[g]], 0.01).unwrap();
        }
        assert!((p[0] - 3.0).abs() < 1e-2, "{p:?}");
        assert!(opt.step(&mut [&mut p], &[], 0.1).is_err());
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            peak: 1.0,
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.55).abs() < 1e-5);
        assert!((s.lr(110) - 0.1).abs() < 1e-6);
        assert!((s.lr(500) - 0.1).abs() < 1e-6);
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let (mut a, mut b) = (vec![3.0f32], vec![4.0f32]);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(n, 5.0);
        assert!((a[0] - 0.6).abs() < 1e-6 && (b[0] - 0.8).abs() < 1e-6);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 10.0);
        assert!((n - 1.0).abs() < 1e-6 && (a[0] - 0.6).abs() < 1e-6);
    }
}
