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
