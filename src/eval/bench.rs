//! Throughput the way llama-bench measures it: pp (a prompt of N tokens in one batch, from an empty
//! context) and tg (N single-token decode steps from an empty context), each repeated, after one
//! warm-up run; reported as the median tokens/s, with peak resident memory.

use std::time::Instant;

use crate::error::Result;
use crate::model::{Logits, Model, State};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub pp_tokens: usize,
    pub tg_tokens: usize,
    /// Median prompt-processing tokens/s over the repetitions.
    pub pp: f64,
    /// Median generation tokens/s.
    pub tg: f64,
    pub pp_runs: Vec<f64>,
    pub tg_runs: Vec<f64>,
    pub threads: usize,
    pub peak_rss_bytes: Option<u64>,
}

/// Deterministic pseudo-random token ids (llama-bench also feeds random tokens).
fn tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = crate::infer::sampling::Rng::new(seed);
    (0..n)
        .map(|_| (rng.next_u64() % n_vocab as u64) as u32)
        .collect()
}

/// Runs pp`pp_tokens` and tg`tg_tokens`, `reps` times each (after a warm-up), in the current
/// worker pool. `on_run` is called after each timed run (for progress).
pub fn bench(
    model: &Model,
    pp_tokens: usize,
    tg_tokens: usize,
    reps: usize,
    mut on_run: impl FnMut(&str, f64),
) -> Result<BenchResult> {
    let n_vocab = model.config.n_vocab;
    let mut state = State::new(model, pp_tokens.max(tg_tokens).max(1))?;
    let mut pp_runs = Vec::new();
    let mut tg_runs = Vec::new();
    for rep in 0..=reps {
        if pp_tokens > 0 {
            let prompt = tokens(pp_tokens, n_vocab, rep as u64);
            state.reset();
            let t = Instant::now();
            model.forward(&mut state, &prompt, Logits::Last)?;
            let tps = pp_tokens as f64 / t.elapsed().as_secs_f64();
            if rep > 0 {
                pp_runs.push(tps);
                on_run("pp", tps);
            }
        }
        if tg_tokens > 0 {
            let gen = tokens(tg_tokens, n_vocab, 1000 + rep as u64);
            state.reset();
            let t = Instant::now();
            for &tok in &gen {
                model.forward(&mut state, &[tok], Logits::Last)?;
            }
            let tps = tg_tokens as f64 / t.elapsed().as_secs_f64();
            if rep > 0 {
                tg_runs.push(tps);
                on_run("tg", tps);
            }
        }
    }
    Ok(BenchResult {
        pp_tokens,
        tg_tokens,
        pp: median(&pp_runs),
        tg: median(&tg_runs),
        pp_runs,
        tg_runs,
        threads: crate::parallel::threads(),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// One sparsity level of [`bench_levels`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct LevelResult {
    /// The level S asked for (0: the dense path).
    pub sparsity: f32,
    /// Generation tokens/s of each repetition, and their median.
    pub tg_runs: Vec<f64>,
    pub tg: f64,
    /// FFN weight bytes skipped, over every timed token (0 on the dense path).
    pub achieved: f64,
    /// Weight bytes a decoded token reads (every layer's matrices and the output head), at this
    /// level.
    pub bytes_per_token: f64,
    /// Median over the repetitions of this level's tokens/s over the first level's in the same
    /// repetition.
    pub speedup: f64,
    /// The speedup the bytes predict: the first level's bytes per token over this level's.
    pub predicted: f64,
}

/// tg`tg_tokens` at each sparsity level of a sparsified `model`, `reps` times, the levels
/// interleaved within each repetition (after one warm-up round), so that a shared machine's
/// drift falls on every level alike and each level is compared with the first in the same
/// repetition. Leaves the model at the first level.
pub fn bench_levels(
    model: &mut Model,
    levels: &[f32],
    tg_tokens: usize,
    reps: usize,
    mut on_run: impl FnMut(f32, f64),
) -> Result<Vec<LevelResult>> {
    if levels.is_empty() || tg_tokens == 0 {
        return Err(crate::error::Error::Invalid(
            "sparsity levels need at least one level and -n above 0".into(),
        ));
    }
    let w = &model.weights;
    let dense_bytes: u64 = w
        .layers
        .iter()
        .flat_map(crate::model::LayerWeights::matrices)
        .chain([&w.output])
        .map(|m| m.n_bytes() as u64)
        .sum();
    let n_vocab = model.config.n_vocab;
    let mut state = State::new(model, tg_tokens)?;
    let mut runs = vec![Vec::new(); levels.len()];
    let mut skipped = vec![(0u64, 0u64, 0u64); levels.len()];
    for rep in 0..=reps {
        let gen = tokens(tg_tokens, n_vocab, 1000 + rep as u64);
        for (i, &s) in levels.iter().enumerate() {
            model.set_sparsity(s)?;
            if let Some(sp) = &model.sparse {
                sp.reset_stats();
            }
            state.reset();
            let t = Instant::now();
            for &tok in &gen {
                model.forward(&mut state, &[tok], Logits::Last)?;
            }
            let tps = tg_tokens as f64 / t.elapsed().as_secs_f64();
            if rep == 0 {
                continue;
            }
            runs[i].push(tps);
            on_run(s, tps);
            if let Some(st) = model
                .sparse
                .as_ref()
                .filter(|_| s > 0.0)
                .map(|sp| sp.stats())
            {
                let k = &mut skipped[i];
                k.0 += st.bytes_dense - st.bytes_read;
                k.1 += st.bytes_dense;
                k.2 += st.token_layers;
            }
        }
    }
    model.set_sparsity(levels[0])?;
    let n_layer = model.config.n_layer as f64;
    let results: Vec<(f32, Vec<f64>, f64, f64)> = levels
        .iter()
        .zip(runs)
        .zip(&skipped)
        .map(|((&s, r), &(skip, dense, token_layers))| {
            let per_token = if token_layers > 0 {
                skip as f64 / (token_layers as f64 / n_layer)
            } else {
                0.0
            };
            let achieved = if dense > 0 {
                skip as f64 / dense as f64
            } else {
                0.0
            };
            (s, r, achieved, dense_bytes as f64 - per_token)
        })
        .collect();
    let (first_runs, first_bytes) = (results[0].1.clone(), results[0].3);
    Ok(results
        .into_iter()
        .map(|(sparsity, tg_runs, achieved, bytes_per_token)| {
            let ratios: Vec<f64> = tg_runs
                .iter()
                .zip(&first_runs)
                .map(|(a, b)| a / b)
                .collect();
            LevelResult {
                sparsity,
                tg: median(&tg_runs),
                speedup: median(&ratios),
                tg_runs,
                achieved,
                bytes_per_token,
                predicted: first_bytes / bytes_per_token,
            }
        })
        .collect())
}

/// The median (0 for no runs, so a skipped test reads as 0 tok/s in JSON rather than null).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    super::kl::percentile(&s, 0.5)
}

/// The process's peak resident set size (Linux: VmHWM in /proc/self/status).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Hands the heap's free pages back to the system (glibc's `malloc_trim`; nothing elsewhere).
/// For after a phase of many small allocations that were then freed, such as building a
/// tokenizer (tens of MiB of strings and maps): the allocator keeps such pages resident, and the
/// large buffers allocated later are mapped apart and never reuse them.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers and only returns free memory to the system.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Serves every buffer of 256 KiB or more from a mapping of its own, handed back to the system
/// when freed (glibc's `M_MMAP_THRESHOLD`, fixed; nothing elsewhere). Left to itself glibc raises
/// that threshold to the largest buffer freed (up to 32 MiB) and then serves such buffers from
/// the heap, whose freed middle stays resident. For a process whose resident memory should
/// follow what it holds: an MPI rank training its stage (measured 2.5–3.5 MiB lower per rank).
pub fn map_large_buffers_apart() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        // SAFETY: mallopt takes no pointers; it only changes how later allocations are served.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 10);
        }
    }
}
