use indicatif::{ProgressBar, ProgressStyle};
use pare::eval::kl;
use pare::eval::model_eval::ModelEval;
use pare::eval::perplexity::{perplexity, read_text, LogitsEval, PerplexityOptions};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: super::Common,
    /// Text file to evaluate.
    #[arg(short = 'f', long)]
    file: std::path::PathBuf,
    /// Tokens per chunk.
    #[arg(short = 'c', long = "ctx", default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks.
    #[arg(long)]
    chunks: Option<usize>,
    /// Save the model's token distributions here (the base for --kl-base).
    #[arg(long, conflicts_with = "kl_base")]
    kl_base_out: Option<std::path::PathBuf>,
    /// Compare against distributions saved with --kl-base-out: KL divergence and same-top rate.
    #[arg(long)]
    kl_base: Option<std::path::PathBuf>,
    /// Print one JSON object as the last line on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    stages: super::stages::StageArgs,
}

fn progress(n: usize) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} chunks {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    pb
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut model = a.common.load_with(!a.common.mmap && !a.stages.active())?;
    if let Some(sp) = model.sparse.as_mut() {
        // Chunks are scored token by token on the sparse path, as decoding would compute them.
        sp.max_batch = usize::MAX;
    }
    if !a.stages.active() {
        let mut eval = ModelEval::new(&model, a.ctx)?;
        return evaluate(&a, &model, &mut eval);
    }
    // The last stage scores the chunk's rows a slice at a time; stage 0 gets per-token numbers.
    let plan = a
        .stages
        .plan(&model, a.ctx, pare::eval::score::SLICE_ROWS.min(a.ctx))?;
    // Under MPI only rank 0 reads the text and prints; an error there stops the pipeline cleanly.
    match pare::pipeline::run(&model, &plan, a.ctx, a.stages.micro_batches, |d| {
        Ok(evaluate(&a, &model, d))
    })? {
        Some((r, stats)) => {
            super::stages::report(&stats, plan.stages.len());
            r
        }
        None => Ok(()),
    }
}

fn evaluate(a: &Args, model: &pare::model::Model, eval: &mut dyn LogitsEval) -> anyhow::Result<()> {
    // As llama-perplexity: BOS first (and at each chunk's start) only when the model adds BOS.
    // The text and the tokenizer are dropped before the chunks run: only the ids stay (under MPI
    // rank 0 then holds little beyond its stage's weights).
    let (tokens, bos) = {
        let tok = model.tokenizer()?;
        let tokens = tok.encode(&read_text(&a.file)?, true, false)?;
        (tokens, if tok.add_bos() { tok.bos() } else { None })
    };
    pare::eval::bench::release_free_memory();
    let opts = PerplexityOptions {
        n_chunks: a.chunks,
        ..PerplexityOptions::new(a.ctx, bos)
    };
    let n_chunks = opts.chunks_for(tokens.len())?;
    eprintln!(
        "{}: {} tokens, {n_chunks} chunks of {}, {} threads",
        a.file.display(),
        tokens.len(),
        a.ctx,
        pare::parallel::threads()
    );
    let pb = progress(n_chunks);
    let summary = if let Some(base) = &a.kl_base {
        let s = kl::compare(eval, &tokens, &opts, base, |p| {
            pb.set_position(p.done as u64);
            pb.set_message(format!("ppl {:.4} kld {:.5}", p.ppl_new, p.kld_mean));
        })?;
        pb.finish_and_clear();
        println!(
            "PPL = {:.4} +/- {:.5} (base {:.4})",
            s.ppl_new, s.ppl_new_stderr, s.ppl_base
        );
        println!(
            "mean KLD = {:.6} +/- {:.6}, 99th percentile {:.6}, max {:.6}",
            s.kld_mean, s.kld_stderr, s.kld_p99, s.kld_max
        );
        println!(
            "same top token: {:.3}% +/- {:.3}%",
            100.0 * s.same_top,
            100.0 * s.same_top_stderr
        );
        serde_json::json!({
            "ppl": s.ppl_new, "ppl_stderr": s.ppl_new_stderr, "chunks": s.chunks,
            "tokens": s.positions, "kld_mean": s.kld_mean, "kld_p99": s.kld_p99,
            "same_top": s.same_top, "ppl_base": s.ppl_base,
        })
    } else {
        let on_chunk = |p: pare::eval::perplexity::ChunkProgress| {
            pb.set_position(p.done as u64);
            pb.set_message(format!("ppl {:.4}", p.ppl));
            pb.suspend(|| eprint!("[{}]{:.4},", p.done, p.ppl));
        };
        let r = match &a.kl_base_out {
            Some(out) => kl::save_base(eval, &tokens, &opts, out, on_chunk)?,
            None => perplexity(eval, &tokens, &opts, on_chunk)?,
        };
        pb.finish_and_clear();
        eprintln!();
        println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
        serde_json::json!({
            "ppl": r.ppl, "ppl_stderr": r.ppl_stderr, "chunks": r.chunks, "tokens": r.tokens_scored,
        })
    };
    let mut summary = summary;
    if let Some(sp) = model.sparse.as_ref().filter(|sp| sp.level().is_some()) {
        let st = sp.stats();
        println!(
            "sparse FFN: level {}, achieved sparsity {:.4}, {:.2} MiB of FFN weights read per token",
            sp.level().unwrap_or(0.0),
            st.sparsity(),
            st.bytes_read as f64 / (st.token_layers.max(1) as f64 / sp.layers.len() as f64)
                / (1 << 20) as f64
        );
        summary["sparsity"] = sp.level().unwrap_or(0.0).into();
        summary["achieved_sparsity"] = st.sparsity().into();
    }
    if a.json {
        println!("{summary}");
    }
    Ok(())
}
