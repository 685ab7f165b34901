use pare::eval::bench;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: super::Common,
    /// Prompt tokens processed in one batch (pp).
    #[arg(short = 'p', long, default_value_t = 512)]
    n_prompt: usize,
    /// Tokens generated one at a time (tg).
    #[arg(short = 'n', long, default_value_t = 128)]
    n_gen: usize,
    /// Timed repetitions of each test (the median is reported).
    #[arg(short = 'r', long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Sparse FFN levels to compare side by side, e.g. `0,0.2,0.3,0.4,0.5` (a sparsified model):
    /// tg at each level, the levels interleaved in every repetition of this one process, each
    /// level's speed against the first level's in the same repetition, beside the speedup its
    /// bytes predict.
    #[arg(long, value_delimiter = ',', conflicts_with = "sparsity")]
    levels: Vec<f32>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(
        a.n_prompt + a.n_gen > 0,
        "nothing to measure: -p and -n are both 0"
    );
    if !a.levels.is_empty() {
        return levels(a);
    }
    let model = a.common.load()?;
    let r = bench::bench(&model, a.n_prompt, a.n_gen, a.reps, |what, tps| {
        if !a.json {
            eprintln!("  {what}: {tps:.1} tok/s");
        }
    })?;
    let sparse = model
        .sparse
        .as_ref()
        .filter(|sp| sp.level().is_some())
        .map(|sp| (sp.level().unwrap_or(0.0), sp.stats(), sp.layers.len()));
    if let Some((s, st, _)) = sparse {
        eprintln!(
            "  sparse FFN: level {s}, achieved sparsity {:.4} on the generated tokens",
            st.sparsity()
        );
    }
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some((s, st, layers)) = sparse {
            v["sparsity"] = s.into();
            v["achieved_sparsity"] = st.sparsity().into();
            v["ffn_bytes_per_token"] =
                (st.bytes_read as f64 / (st.token_layers.max(1) as f64 / layers as f64)).into();
        }
        v[format!("pp{}", a.n_prompt)] = r.pp.into();
        v[format!("tg{}", a.n_gen)] = r.tg.into();
        println!("{v}");
    } else {
        println!("model: {}", a.common.model.display());
        println!(
            "threads: {}  isa: {}",
            r.threads,
            pare::quant::kernels::isa().name()
        );
        if a.n_prompt > 0 {
            println!(
                "pp{}: {:.2} tok/s (median of {})",
                a.n_prompt,
                r.pp,
                r.pp_runs.len()
            );
        }
        if a.n_gen > 0 {
            println!(
                "tg{}: {:.2} tok/s (median of {})",
                a.n_gen,
                r.tg,
                r.tg_runs.len()
            );
        }
        if let Some(rss) = r.peak_rss_bytes {
            println!("peak RSS: {:.1} MiB", rss as f64 / (1 << 20) as f64);
        }
    }
    Ok(())
}

/// `--levels`: the sparse FFN levels side by side.
fn levels(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(a.n_gen > 0, "--levels measures tg: -n must be above 0");
    let mut model = a.common.load()?;
    anyhow::ensure!(
        model.sparse.is_some(),
        "{} was not sparsified: run `pare sparsify -m {} -o OUT.gguf` and bench OUT.gguf",
        a.common.model.display(),
        a.common.model.display()
    );
    let rs = bench::bench_levels(&mut model, &a.levels, a.n_gen, a.reps, |s, tps| {
        if !a.json {
            eprintln!("  S = {s}: {tps:.1} tok/s");
        }
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "threads": pare::parallel::threads(),
                "tg_tokens": a.n_gen,
                "levels": rs,
            })
        );
        return Ok(());
    }
    println!("model: {}", a.common.model.display());
    println!(
        "threads: {}  isa: {}  tg{}, {} repetitions, levels interleaved",
        pare::parallel::threads(),
        pare::quant::kernels::isa().name(),
        a.n_gen,
        a.reps
    );
    println!("    S  achieved  MB/token  tok/s (median)  speedup  predicted  measured/predicted");
    for r in &rs {
        println!(
            "{:5.2}  {:8.3}  {:8.2}  {:14.2}  {:7.3}  {:9.3}  {:18.3}",
            r.sparsity,
            r.achieved,
            r.bytes_per_token / 1e6,
            r.tg,
            r.speedup,
            r.predicted,
            r.speedup / r.predicted
        );
    }
    Ok(())
}
