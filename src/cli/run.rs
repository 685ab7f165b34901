use std::io::Write;

use pare::format::chat_template::Message;
use pare::infer::generate::{context_size, generate, generate_on, GenerateOptions};
use pare::infer::sampling::SamplingParams;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: super::Common,
    /// The prompt.
    #[arg(short = 'p', long, conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long)]
    file: Option<std::path::PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    n_predict: usize,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = SamplingParams::default().temperature)]
    temp: f32,
    /// Top-k filter; 0 = off.
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    top_k: usize,
    /// Top-p (nucleus) filter; 1 = off.
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    top_p: f32,
    /// Min-p filter; 0 = off.
    #[arg(long, default_value_t = SamplingParams::default().min_p)]
    min_p: f32,
    /// Repetition penalty; 1 = off.
    #[arg(long, default_value_t = SamplingParams::default().repeat_penalty)]
    repeat_penalty: f32,
    /// Tokens of history the repetition penalty considers.
    #[arg(long, default_value_t = SamplingParams::default().repeat_last_n)]
    repeat_last_n: usize,
    /// Random seed.
    #[arg(short = 's', long, default_value_t = SamplingParams::default().seed)]
    seed: u64,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Context size (default: prompt + n-predict).
    #[arg(short = 'c', long = "ctx-size")]
    ctx_size: Option<usize>,
    /// Do not print timings to stderr.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    stages: super::stages::StageArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let text = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
        }
        (None, None) => anyhow::bail!("give a prompt with -p TEXT or -f FILE"),
    };
    let sampling = SamplingParams {
        temperature: a.temp,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        repeat_last_n: a.repeat_last_n,
        seed: a.seed,
    };
    sampling.validate()?;
    let model = a.common.load()?;
    let tok = model.tokenizer()?;
    let prompt = if a.chat {
        let template = model
            .chat_template()?
            .ok_or_else(|| anyhow::anyhow!("--chat: the model has no chat template"))?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system {
            messages.push(Message::new("system", s.as_str()));
        }
        messages.push(Message::new("user", text.as_str()));
        // The template writes the special tokens as text; parse them back to their ids.
        tok.encode(&template.apply(&messages, true)?, true, true)?
    } else {
        tok.encode(&text, true, true)?
    };
    let opts = GenerateOptions {
        n_predict: a.n_predict,
        sampling,
        stop: a.stop.clone(),
        n_ctx: a.ctx_size,
    };
    let print = |piece: &str| {
        let mut out = std::io::stdout().lock();
        out.write_all(piece.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| pare::Error::io("stdout", e))
    };
    let stats = if a.stages.active() {
        // Every rank tokenizes the prompt (cheap) so that all size their caches alike; rank 0
        // generates and prints.
        let n_ctx = context_size(&model, &prompt, &opts);
        let plan = a.stages.plan(&model, n_ctx, 1)?;
        let micro = a.stages.micro_batches;
        match pare::pipeline::run(&model, &plan, n_ctx, micro, |d| {
            generate_on(d, n_ctx, &tok, &prompt, &opts, print)
        })? {
            Some(((_, stats), run)) => {
                super::stages::report(&run, plan.stages.len());
                stats
            }
            None => return Ok(()),
        }
    } else {
        generate(&model, &tok, &prompt, &opts, print)?.1
    };
    writeln!(std::io::stdout())?;
    if !a.quiet {
        eprintln!(
            "\nprompt: {} tokens, {:.1} tok/s | generated: {} tokens, {:.1} tok/s | stop: {:?} | peak RSS {:.1} MiB",
            stats.prompt_tokens,
            stats.prompt_tps(),
            stats.generated_tokens,
            stats.generation_tps(),
            stats.stop_reason,
            pare::eval::bench::peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
