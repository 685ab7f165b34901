//! Sampler behaviour on synthetic logits: greedy, determinism, filters, penalties, distribution.

use pare::infer::sampling::{apply_repeat_penalty, argmax, Rng, Sampler, SamplingParams};

fn plain(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 64,
        seed,
    }
}

fn random_logits(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (rng.next_f64() as f32 - 0.5) * 2.0 * scale)
        .collect()
}

#[test]
fn greedy_is_argmax() {
    let mut rng = Rng::new(7);
    let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
    for _ in 0..50 {
        let l = random_logits(&mut rng, 49152, 10.0);
        let want = l
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0;
        assert_eq!(s.sample(&l, &[]) as usize, want);
    }
    // Ties go to the lowest id.
    assert_eq!(s.sample(&[0.0, 5.0, 1.0, 5.0], &[]), 1);
}

#[test]
fn same_seed_same_sequence_different_seed_differs() {
    let mut rng = Rng::new(3);
    let rows: Vec<Vec<f32>> = (0..200)
        .map(|_| random_logits(&mut rng, 1000, 3.0))
        .collect();
    let run = |seed| {
        let mut s = Sampler::new(SamplingParams {
            seed,
            ..Default::default()
        })
        .unwrap();
        let mut hist = Vec::new();
        for r in &rows {
            let t = s.sample(r, &hist);
            hist.push(t);
        }
        hist
    };
    let a = run(42);
    assert_eq!(a, run(42));
    let b = run(43);
    assert_ne!(a, b);
    // Reseeding restarts the sequence.
    let mut s = Sampler::new(plain(1.0, 42)).unwrap();
    let first: Vec<u32> = rows.iter().map(|r| s.sample(r, &[])).collect();
    s.reseed(42);
    let again: Vec<u32> = rows.iter().map(|r| s.sample(r, &[])).collect();
    assert_eq!(first, again);
}

#[test]
fn top_k_one_is_greedy() {
    let mut rng = Rng::new(11);
    let mut s = Sampler::new(SamplingParams {
        top_k: 1,
        temperature: 1.5,
        ..Default::default()
    })
    .unwrap();
    for _ in 0..100 {
        let l = random_logits(&mut rng, 5000, 2.0);
        assert_eq!(s.sample(&l, &[]) as usize, argmax(&l));
    }
}

/// Chi-square statistic of observed counts against expected probabilities.
fn chi2(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(probs)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

fn softmax(l: &[f32], t: f32) -> Vec<f64> {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = l
        .iter()
        .map(|&x| ((x as f64 - m) / t as f64).exp())
        .collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

// 99.99% quantiles of the chi-square distribution: df 7 -> 29.88, df 2 -> 18.42.
const CHI2_DF7: f64 = 29.9;
const CHI2_DF2: f64 = 18.5;

#[test]
fn frequencies_match_softmax_with_temperature() {
    let l = [1.0f32, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2];
    for &t in &[0.7f32, 1.0, 1.8] {
        let mut s = Sampler::new(plain(t, 1234)).unwrap();
        let mut counts = vec![0u64; l.len()];
        for _ in 0..200_000 {
            counts[s.sample(&l, &[]) as usize] += 1;
        }
        let x = chi2(&counts, &softmax(&l, t));
        assert!(x < CHI2_DF7, "T={t}: chi2 {x}, counts {counts:?}");
        // A wrong temperature must be detected by the same statistic.
        let wrong = chi2(&counts, &softmax(&l, t * 1.1));
        assert!(
            wrong > CHI2_DF7,
            "T={t}: test cannot tell T from 1.1 T ({wrong})"
        );
    }
}

#[test]
fn frequencies_after_top_k_renormalize() {
    // top-k 3 keeps tokens 4, 5, 0; the draw is softmax over those at temperature T.
    let l = [1.0f32, 0.5, 0.0, -0.5, 2.0, 1.5, -1.0, 0.2];
    let t = 0.9;
    let mut s = Sampler::new(SamplingParams {
        top_k: 3,
        ..plain(t, 99)
    })
    .unwrap();
    let mut counts = [0u64; 8];
    for _ in 0..100_000 {
        counts[s.sample(&l, &[]) as usize] += 1;
    }
    for i in [1, 2, 3, 6, 7] {
        assert_eq!(counts[i], 0, "token {i} is outside the top 3");
    }
    let kept = [l[4], l[5], l[0]];
    let x = chi2(&[counts[4], counts[5], counts[0]], &softmax(&kept, t));
    assert!(x < CHI2_DF2, "chi2 {x}");
}

#[test]
fn repetition_penalty_math() {
    assert_eq!(apply_repeat_penalty(2.0, 1.25), 1.6);
    assert_eq!(apply_repeat_penalty(-2.0, 1.25), -2.5);
    assert_eq!(apply_repeat_penalty(0.0, 1.25), 0.0);
    // A penalty below 1 rewards repetition in the same way.
    assert_eq!(apply_repeat_penalty(2.0, 0.5), 4.0);
    assert_eq!(apply_repeat_penalty(-2.0, 0.5), -1.0);
}

#[test]
fn repetition_penalty_in_the_sampler() {
    let greedy_pen = |penalty, last_n| {
        Sampler::new(SamplingParams {
            repeat_penalty: penalty,
            repeat_last_n: last_n,
            ..SamplingParams::greedy()
        })
        .unwrap()
    };
    // Positive logit divided: 2.0 / 1.1 = 1.82 < 1.9.
    let l = [2.0f32, 1.9, -1.0];
    assert_eq!(greedy_pen(1.1, 64).sample(&l, &[0]), 1);
    // Each distinct token is penalized once however often it repeats: 2.0 / 1.04 = 1.923 > 1.9,
    // while a double penalty (1.849) would flip the choice.
    assert_eq!(greedy_pen(1.04, 64).sample(&l, &[0, 0, 0]), 0);
    // Negative logit multiplied: -1.0 * 1.1 = -1.1 < -1.05.
    let l = [-1.0f32, -1.05, -3.0];
    assert_eq!(greedy_pen(1.1, 64).sample(&l, &[0]), 1);
    // Only the last n tokens count.
    let l = [2.0f32, 1.9, -1.0];
    assert_eq!(greedy_pen(1.1, 2).sample(&l, &[0, 2, 2]), 0);
    assert_eq!(greedy_pen(1.1, 3).sample(&l, &[0, 2, 2]), 1);
    // last_n = 0 and penalty 1 disable it; out-of-vocabulary history is ignored.
    assert_eq!(greedy_pen(1.1, 0).sample(&l, &[0]), 0);
    assert_eq!(greedy_pen(1.0, 64).sample(&l, &[0]), 0);
    assert_eq!(greedy_pen(1.1, 64).sample(&l, &[99]), 0);
}

#[test]
fn repetition_penalty_changes_the_distribution_as_expected() {
    let l = [1.0f32, 1.0, 1.0];
    let mut s = Sampler::new(SamplingParams {
        repeat_penalty: 2.0,
        ..plain(1.0, 5)
    })
    .unwrap();
    let mut counts = [0u64; 3];
    for _ in 0..60_000 {
        counts[s.sample(&l, &[1]) as usize] += 1;
    }
    let x = chi2(&counts, &softmax(&[1.0, 0.5, 1.0], 1.0));
    assert!(x < CHI2_DF2, "chi2 {x}, {counts:?}");
}

#[test]
fn defaults_match_llama_cpp() {
    let d = SamplingParams::default();
    assert_eq!(
        (
            d.temperature,
            d.top_k,
            d.top_p,
            d.min_p,
            d.repeat_penalty,
            d.repeat_last_n
        ),
        (0.8, 40, 0.95, 0.05, 1.0, 64)
    );
    d.validate().unwrap();
}

#[test]
fn invalid_params_are_rejected() {
    let d = SamplingParams::default();
    let bad = [
        SamplingParams {
            temperature: -0.1,
            ..d.clone()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..d.clone()
        },
        SamplingParams {
            temperature: f32::INFINITY,
            ..d.clone()
        },
        SamplingParams {
            top_p: 0.0,
            ..d.clone()
        },
        SamplingParams {
            top_p: 1.5,
            ..d.clone()
        },
        SamplingParams {
            top_p: f32::NAN,
            ..d.clone()
        },
        SamplingParams {
            min_p: -0.01,
            ..d.clone()
        },
        SamplingParams {
            min_p: 1.01,
            ..d.clone()
        },
        SamplingParams {
            repeat_penalty: 0.0,
            ..d.clone()
        },
        SamplingParams {
            repeat_penalty: -1.0,
            ..d.clone()
        },
        SamplingParams {
            repeat_penalty: f32::INFINITY,
            ..d.clone()
        },
    ];
    for p in bad {
        let e = Sampler::new(p.clone())
            .err()
            .unwrap_or_else(|| panic!("accepted {p:?}"));
        assert!(matches!(e, pare::Error::Invalid(_)), "{e}");
    }
    let ok = SamplingParams {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 1.0,
        ..d
    };
    ok.validate().unwrap();
}

#[test]
fn large_vocab_default_chain_stays_in_top_k() {
    // With the default chain, every draw must come from the 40 highest logits.
    let mut rng = Rng::new(5);
    let mut s = Sampler::new(SamplingParams::default()).unwrap();
    for _ in 0..200 {
        let l = random_logits(&mut rng, 49152, 4.0);
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let kth = sorted[39];
        let t = s.sample(&l, &[]);
        assert!(l[t as usize] >= kth);
        // min-p 0.05 relative to the top.
        assert!(l[t as usize] >= sorted[0] + 0.05f32.ln() - 1e-6);
    }
}
