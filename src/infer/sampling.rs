//! Token sampling from logits, with llama.cpp's semantics and order.
//!
//! The chain is the one llama.cpp's `common_sampler` builds by default, restricted to the stages pare
//! offers: repetition penalty → top-k → top-p → min-p → temperature → draw from the softmax.
//! The filters run on the *untempered* logits (temperature is applied after them, as in llama.cpp), so
//! changing the temperature never changes which tokens survive the filters.
//!
//! * repetition penalty: every distinct token among the last `repeat_last_n` tokens of the history has
//!   its logit divided by `repeat_penalty` when positive and multiplied by it when zero or negative
//!   (`llama_sampler_penalties_apply`).
//! * top-k keeps the `k` highest logits (ties broken by lower token id).
//! * top-p keeps the smallest prefix of the candidates sorted by probability whose cumulative
//!   probability reaches `top_p` (the token that crosses the threshold is kept).
//! * min-p keeps the tokens whose probability is at least `min_p` times the largest one, i.e. whose
//!   logit is at least `max_logit + ln(min_p)`.
//! * temperature `<= 0` means greedy: the argmax of the penalized logits, ties going to the lowest id.
//!
//! The sampler owns reusable buffers, so a call allocates nothing once the buffers have grown to the
//! vocabulary size, and copies the logits only when a repetition penalty is on. Top-k is one
//! streaming pass with a small bounded buffer (no sort of the vocabulary); top-p without top-k sorts
//! a growing most-likely prefix (256, 1024, 4096, ... tokens, each found by an O(n) selection) and
//! sorts everything only when the nucleus needs it. On a 49152-token vocabulary the default chain
//! costs some tens of microseconds per token.

use crate::error::{Error, Result};
use std::cmp::Ordering;

/// Sampling settings. `Default` gives llama.cpp's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` (or any value `<= 0` that [`validate`](Self::validate) lets through:
    /// only `0`) means greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns the filter off.
    pub top_k: usize,
    /// Nucleus sampling threshold in `(0, 1]`; `1` turns the filter off.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in `[0, 1]`; `0` turns it off.
    pub min_p: f32,
    /// Repetition penalty (`> 0`); `1` turns it off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the repetition penalty looks at; `0` turns it off.
    pub repeat_last_n: usize,
    /// Seed of the random generator; the same seed and inputs give the same tokens.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0); the other settings are left at their defaults and have no
    /// effect on the result except the repetition penalty.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every field's range; the error names the field and the accepted range.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Invalid(format!(
                "temperature must be a finite number >= 0 (0 = greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Invalid(format!(
                "top_p must be in (0, 1] (1 = off), got {}",
                self.top_p
            )));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(Error::Invalid(format!(
                "min_p must be in [0, 1] (0 = off), got {}",
                self.min_p
            )));
        }
        if !self.repeat_penalty.is_finite()
            || self.repeat_penalty <= 0.0
            || !(1.0 / self.repeat_penalty).is_finite()
        {
            return Err(Error::Invalid(format!(
                "repeat_penalty must be a finite number > 0 (1 = off), got {}",
                self.repeat_penalty
            )));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A candidate token: its (possibly penalized) logit and id.
#[derive(Debug, Clone, Copy)]
struct Cand {
    logit: f32,
    id: u32,
}

/// Descending logit, then ascending id: a total order, so every selection is deterministic.
#[inline]
fn by_logit_desc(a: &Cand, b: &Cand) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// How many of the most likely tokens top-p looks at before falling back to a full sort.
const TOP_P_PARTIAL: usize = 256;

/// A seeded sampler with reusable buffers. See the module documentation for the semantics.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    work: Vec<f32>,
    cands: Vec<Cand>,
    probs: Vec<f64>,
    recent: Vec<u32>,
}

impl Sampler {
    /// Validates `params` and seeds the generator with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Sampler {
            rng: Rng::new(params.seed),
            params,
            work: Vec::new(),
            cands: Vec::new(),
            probs: Vec::new(),
            recent: Vec::new(),
        })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Restarts the random sequence from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.params.seed = seed;
        self.rng = Rng::new(seed);
    }

    /// Picks the next token from `logits` (one per vocabulary entry) given the tokens so far
    /// (`history`: prompt and generated tokens, oldest first; only the last `repeat_last_n` matter).
    ///
    /// NaN logits are treated as `-inf`. History ids outside the vocabulary are ignored.
    ///
    /// # Panics
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        assert!(!logits.is_empty(), "Sampler::sample: empty logits");
        let p = &self.params;
        let n = logits.len();

        // The logits with the repetition penalty applied: a working copy only when a penalty is on.
        let penalize = p.repeat_penalty != 1.0 && p.repeat_last_n > 0;
        let src: &[f32] = if penalize {
            self.work.clear();
            self.work.extend_from_slice(logits);
            let from = history.len().saturating_sub(p.repeat_last_n);
            self.recent.clear();
            self.recent.extend_from_slice(&history[from..]);
            self.recent.sort_unstable();
            self.recent.dedup();
            for &t in &self.recent {
                if let Some(l) = self.work.get_mut(t as usize) {
                    *l = apply_repeat_penalty(*l, p.repeat_penalty);
                }
            }
            &self.work
        } else {
            logits
        };

        if p.temperature <= 0.0 {
            return argmax(src) as u32;
        }

        // Candidates after top-k; `sorted` tells whether they are in descending order.
        let mut sorted = false;
        if p.top_k > 0 && p.top_k < n {
            top_k_into(src, p.top_k, &mut self.cands);
            sorted = true;
        } else {
            self.cands.clear();
            self.cands
                .extend(src.iter().enumerate().map(|(i, &l)| Cand {
                    logit: sanitize(l),
                    id: i as u32,
                }));
        }

        if p.top_p < 1.0 {
            top_p(&mut self.cands, &mut sorted, p.top_p);
        }
        if p.min_p > 0.0 {
            min_p(&mut self.cands, p.min_p);
        }

        // Temperature and the draw.
        let inv_t = 1.0 / p.temperature;
        let max = self
            .cands
            .iter()
            .map(|c| c.logit)
            .fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            // Nothing has a finite logit: fall back to the first candidate (the lowest id or the
            // top of the sorted list), which is what greedy would pick.
            return self
                .cands
                .iter()
                .min_by(|a, b| by_logit_desc(a, b))
                .unwrap()
                .id;
        }
        self.probs.clear();
        let mut sum = 0.0f64;
        for c in &self.cands {
            let e = (((c.logit - max) * inv_t) as f64).exp();
            sum += e;
            self.probs.push(e);
        }
        let target = self.rng.next_f64() * sum;
        let mut run = 0.0f64;
        for (c, &e) in self.cands.iter().zip(&self.probs) {
            run += e;
            if run > target {
                return c.id;
            }
        }
        // Rounding left `run` just below `target`: take the last candidate with nonzero mass.
        self.cands
            .iter()
            .zip(&self.probs)
            .rev()
            .find(|(_, &e)| e > 0.0)
            .map(|(c, _)| c.id)
            .unwrap_or(self.cands[0].id)
    }
}

/// llama.cpp's repetition penalty on one logit: positive logits are divided, others multiplied.
#[inline]
pub fn apply_repeat_penalty(logit: f32, penalty: f32) -> f32 {
    if logit <= 0.0 {
        logit * penalty
    } else {
        logit / penalty
    }
}

/// Index of the largest value; ties go to the lowest index. NaN never wins.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

/// NaN ranks as `-inf`.
#[inline]
fn sanitize(l: f32) -> f32 {
    if l.is_nan() {
        f32::NEG_INFINITY
    } else {
        l
    }
}

/// The `k` best candidates of `logits` (by [`by_logit_desc`]), sorted, in one streaming pass: a
/// buffer of up to `4k` entries is pruned back to `k` whenever it fills, and afterwards only logits
/// above the current k-th best can enter. Equal logits arrive in increasing id order, so rejecting
/// a value equal to the threshold keeps the lower id, as the total order requires.
fn top_k_into(logits: &[f32], k: usize, cands: &mut Vec<Cand>) {
    debug_assert!(k > 0);
    cands.clear();
    let cap = (4 * k).max(64);
    let mut threshold: Option<f32> = None;
    for (i, &l) in logits.iter().enumerate() {
        let l = sanitize(l);
        if let Some(t) = threshold {
            if l <= t {
                continue;
            }
        }
        cands.push(Cand {
            logit: l,
            id: i as u32,
        });
        if cands.len() == cap {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands.truncate(k);
            threshold = Some(cands[k - 1].logit);
        }
    }
    if cands.len() > k {
        cands.select_nth_unstable_by(k - 1, by_logit_desc);
        cands.truncate(k);
    }
    cands.sort_unstable_by(by_logit_desc);
}

/// Keeps the smallest most-likely prefix whose probability mass reaches `p` (at least one token).
fn top_p(cands: &mut Vec<Cand>, sorted: &mut bool, p: f32) {
    if cands.len() <= 1 {
        return;
    }
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let sum: f64 = cands.iter().map(|c| ((c.logit - max) as f64).exp()).sum();
    let target = p as f64 * sum;
    let keep_prefix = |cands: &[Cand]| -> Option<usize> {
        let mut cum = 0.0f64;
        for (i, c) in cands.iter().enumerate() {
            cum += ((c.logit - max) as f64).exp();
            if cum >= target {
                return Some(i + 1);
            }
        }
        None
    };
    if !*sorted {
        // Grow a sorted most-likely prefix geometrically (256, 1024, ...) until it holds the mass;
        // each step is one O(n) selection, so a flat distribution never costs a full sort per
        // token unless the nucleus really is most of the vocabulary.
        let mut k = TOP_P_PARTIAL;
        while k < cands.len() {
            cands.select_nth_unstable_by(k - 1, by_logit_desc);
            cands[..k].sort_unstable_by(by_logit_desc);
            if let Some(kept) = keep_prefix(&cands[..k]) {
                cands.truncate(kept);
                *sorted = true;
                return;
            }
            k *= 4;
        }
    }
    if !*sorted {
        cands.sort_unstable_by(by_logit_desc);
        *sorted = true;
    }
    // Rounding can leave the total a hair below the target: then everything is kept.
    let k = keep_prefix(cands).unwrap_or(cands.len());
    cands.truncate(k);
}

/// Keeps the tokens whose logit is at least `max + ln(p)` (probability at least `p` times the top).
fn min_p(cands: &mut Vec<Cand>, p: f32) {
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let threshold = max + p.ln();
    cands.retain(|c| c.logit >= threshold);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32, k: usize, top_p: f32, min_p: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            top_k: k,
            top_p,
            min_p,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 1,
        }
    }

    /// The set of tokens that survive the filters, found by sampling until every candidate with
    /// non-negligible probability has shown up (the filters' sets are small in these tests).
    fn surviving(logits: &[f32], sp: SamplingParams) -> Vec<u32> {
        let mut s = Sampler::new(sp).unwrap();
        let mut seen = vec![false; logits.len()];
        for _ in 0..4000 {
            seen[s.sample(logits, &[]) as usize] = true;
        }
        (0..logits.len() as u32)
            .filter(|&i| seen[i as usize])
            .collect()
    }

    fn logits_for(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    #[test]
    fn top_p_keeps_the_crossing_token() {
        let l = logits_for(&[0.5, 0.3, 0.15, 0.05]);
        // cumulative: 0.5, 0.8, 0.95, 1.0
        assert_eq!(surviving(&l, params(1.0, 0, 0.45, 0.0)), vec![0]);
        assert_eq!(surviving(&l, params(1.0, 0, 0.75, 0.0)), vec![0, 1]);
        assert_eq!(surviving(&l, params(1.0, 0, 0.85, 0.0)), vec![0, 1, 2]);
        assert_eq!(surviving(&l, params(1.0, 0, 1.0, 0.0)), vec![0, 1, 2, 3]);
    }

    #[test]
    fn top_p_partial_and_full_sort_paths_agree() {
        // 5000 tokens with slowly falling logits: p = 0.1 is decided within the first 256,
        // 0.5 within 1024, 0.9 within 4096, 0.9999 only by the full sort. The ids are shuffled so
        // the selection has work to do.
        let n = 5000u32;
        let perm = |i: u32| (i as u64 * 7919 % n as u64) as u32; // 7919 is prime, n = 5000
        let mut l = vec![0f32; n as usize];
        for i in 0..n {
            l[perm(i) as usize] = -(i as f32) * 0.001;
        }
        for &p in &[0.1f32, 0.5, 0.9, 0.9999] {
            let mut cands: Vec<Cand> = l
                .iter()
                .enumerate()
                .map(|(i, &x)| Cand {
                    logit: x,
                    id: i as u32,
                })
                .collect();
            let mut sorted = false;
            top_p(&mut cands, &mut sorted, p);
            // Brute force: full sort, then the shortest prefix reaching p.
            let mut order: Vec<u32> = (0..n).collect();
            order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            let total: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
            let mut cum = 0.0;
            let mut k = 0;
            for &o in &order {
                cum += (l[o as usize] as f64).exp();
                k += 1;
                if cum >= p as f64 * total {
                    break;
                }
            }
            assert_eq!(cands.len(), k, "p = {p}");
            assert!(cands.iter().zip(&order).all(|(c, &o)| c.id == o), "p = {p}");
            assert!(sorted);
        }
    }

    #[test]
    fn streaming_top_k_matches_a_full_sort() {
        let mut rng = Rng::new(9);
        for &(n, k) in &[
            (10usize, 3usize),
            (1000, 1),
            (1000, 40),
            (49152, 40),
            (3000, 900),
        ] {
            // Few distinct values so that ties are common; a few NaN and -inf.
            let mut l: Vec<f32> = (0..n).map(|_| (rng.next_u64() % 50) as f32).collect();
            l[n / 2] = f32::NAN;
            l[n / 3] = f32::NEG_INFINITY;
            let mut got = Vec::new();
            top_k_into(&l, k, &mut got);
            let mut all: Vec<Cand> = l
                .iter()
                .enumerate()
                .map(|(i, &x)| Cand {
                    logit: sanitize(x),
                    id: i as u32,
                })
                .collect();
            all.sort_by(by_logit_desc);
            let want: Vec<u32> = all[..k].iter().map(|c| c.id).collect();
            assert_eq!(
                got.iter().map(|c| c.id).collect::<Vec<_>>(),
                want,
                "n {n} k {k}"
            );
        }
        // Fewer finite logits than k: the -inf ones fill up, lowest ids first.
        let mut got = Vec::new();
        top_k_into(
            &[f32::NEG_INFINITY, 1.0, f32::NAN, f32::NEG_INFINITY],
            3,
            &mut got,
        );
        assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 0, 2]);
    }

    #[test]
    fn min_p_threshold() {
        let l = logits_for(&[0.4, 0.3, 0.2, 0.1]);
        // relative probabilities: 1, 0.75, 0.5, 0.25
        assert_eq!(surviving(&l, params(1.0, 0, 1.0, 0.6)), vec![0, 1]);
        assert_eq!(surviving(&l, params(1.0, 0, 1.0, 0.4)), vec![0, 1, 2]);
        assert_eq!(surviving(&l, params(1.0, 0, 1.0, 0.9)), vec![0]);
    }

    #[test]
    fn filters_ignore_temperature() {
        // With a huge temperature the survivors are uniform-ish but the set is the same.
        let l = logits_for(&[0.5, 0.3, 0.15, 0.05]);
        assert_eq!(surviving(&l, params(50.0, 0, 0.75, 0.0)), vec![0, 1]);
        assert_eq!(surviving(&l, params(50.0, 3, 1.0, 0.0)), vec![0, 1, 2]);
    }

    #[test]
    fn top_k_ties_go_to_lower_ids() {
        let l = [1.0f32, 2.0, 2.0, 2.0, 0.0];
        assert_eq!(surviving(&l, params(1.0, 2, 1.0, 0.0)), vec![1, 2]);
    }

    #[test]
    fn argmax_ties_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN]), 1);
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[f32::NAN, -1.0, -1.0], &[]), 1);
    }

    #[test]
    fn rng_reference_values() {
        // splitmix64(0) first outputs, as published with the algorithm.
        let mut r = Rng::new(0);
        assert_eq!(r.s[0], 0xe220_a839_7b1d_cdaf);
        // Uniform draws stay in [0, 1).
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
