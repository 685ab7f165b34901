use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};
use pare::model::{Lora, LoraConfig, Target};
use pare::pipeline::schedule::{self, Schedule};
use pare::train::checkpointing::Checkpoint;
use pare::train::fake_quant::{GridInit, QatMode};
use pare::train::trainer::{Stages, TrainOptions, Trainer};
use pare::train::{data, memory};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    common: super::Common,
    /// Training data: plain text, or JSONL chat ({"messages": [...]} per line; loss on assistant
    /// tokens only).
    #[arg(long)]
    data: std::path::PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Output directory: the PEFT adapter, loss.png, and checkpoint/.
    #[arg(short = 'o', long = "output")]
    output: std::path::PathBuf,
    /// Quantization-aware training: none (plain LoRA); ste or clipped (straight-through estimators
    /// through rounding onto the base's own grid); lsq (also learns each group's scale and
    /// minimum, saved with the adapters and used by pare merge).
    #[arg(long, default_value = "none")]
    qat: String,
    /// Peak learning rate of lsq's step sizes and minimums (same schedule as --lr).
    #[arg(long, default_value_t = 1e-4)]
    lsq_lr: f32,
    /// With --qat: the fraction of --steps trained as plain LoRA before fake quantization
    /// switches on after floor(F·steps) steps (default 0.5; 0: quantization-aware from the first
    /// step). Lets QAT use plain LoRA's rates, at which it diverges when it quantizes from the
    /// start.
    #[arg(long, value_name = "F")]
    qat_start: Option<f32>,
    /// With --qat lsq and a --qat-start after step 0: the grid learning starts from at the switch:
    /// search (the error-minimising grid of W + s·BA at that point, what merging the plain
    /// adapters trained so far would write; the default) or base (the base's own).
    #[arg(long)]
    lsq_init: Option<String>,
    /// Gradient checkpointing: none, every, every:N or sqrt.
    #[arg(long, default_value = "none")]
    checkpoint: String,
    /// Refuse to start when the estimated memory exceeds this (e.g. 400MiB), suggesting what fits.
    #[arg(long)]
    memory_budget: Option<String>,
    #[arg(long, default_value_t = 8)]
    rank: usize,
    #[arg(long, default_value_t = 16.0)]
    alpha: f32,
    /// Modules to adapt: q,k,v,o,gate,up,down.
    #[arg(long, default_value = "q,v")]
    targets: String,
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// Scale adapters by alpha/√rank (rsLoRA) instead of alpha/rank.
    #[arg(long)]
    rslora: bool,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, default_value_t = 10)]
    warmup: usize,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Clip the gradient norm to this (0: off).
    #[arg(long, default_value_t = 1.0)]
    clip: f32,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Sequences per step (gradient accumulation). With --stages, each sequence is one
    /// micro-batch, so --micro-batches M means M sequences per step.
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Pipeline schedule with --stages: gpipe (all forwards, then all backwards) or 1f1b
    /// (PipeDream-Flush: at most N micro-batches' activations per stage).
    #[arg(long)]
    schedule: Option<String>,
    /// With --stages: draw the last step's timeline (stage × time, forward and backward) here.
    #[arg(long)]
    timeline: Option<std::path::PathBuf>,
    /// Fraction of the packed sequences held out for validation (the tail of the file).
    #[arg(long, default_value_t = 0.05)]
    val_split: f32,
    /// Validate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Validation sequences per evaluation (0: all held out).
    #[arg(long, default_value_t = 8)]
    eval_samples: usize,
    /// Checkpoint every N steps (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Continue the run checkpointed in this directory (same data; --steps may extend it).
    #[arg(long)]
    resume: Option<std::path::PathBuf>,
    #[command(flatten)]
    stages: super::stages::StageArgs,
}

/// Set by Ctrl-C: the trainer saves a checkpoint and stops.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(a: Args) -> anyhow::Result<()> {
    let model = a.common.load_with(!a.common.mmap && !a.stages.active())?;
    anyhow::ensure!(
        model.lora.is_none(),
        "--lora adapters cannot be trained further; use --resume"
    );
    let checkpoint = Checkpoint::parse(&a.checkpoint)?;
    let accum = sequences_per_step(&a)?;
    let qat = QatMode::parse(&a.qat)?;
    anyhow::ensure!(
        a.qat_start.is_none() || qat != QatMode::None,
        "--qat-start switches fake quantization on part-way; it needs --qat ste, clipped or lsq"
    );
    anyhow::ensure!(
        a.lsq_init.is_none() || qat == QatMode::Lsq,
        "--lsq-init chooses the grid --qat lsq learns from; it needs --qat lsq"
    );
    let opts = TrainOptions {
        lora: LoraConfig {
            rank: a.rank,
            alpha: a.alpha,
            targets: Target::parse_list(&a.targets)?,
            dropout: a.dropout,
            rslora: a.rslora,
        },
        steps: a.steps,
        seq_len: a.seq_len,
        accum,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        clip: a.clip,
        checkpoint,
        qat,
        lsq_lr: a.lsq_lr,
        qat_start: a.qat_start.unwrap_or(TrainOptions::default().qat_start),
        lsq_init: match &a.lsq_init {
            Some(s) => GridInit::parse(s)?,
            None => TrainOptions::default().lsq_init,
        },
        seed: a.seed,
        eval_every: a.eval_every,
        eval_samples: a.eval_samples,
        save_every: a.save_every,
        ..TrainOptions::default()
    };
    // A function, not a closure: under MPI the trainer borrows the rank's transport, which lives
    // shorter than the model. `read`: this process reads the data (under MPI, rank 0 alone).
    fn new_trainer<'m>(
        a: &Args,
        model: &'m pare::model::Model,
        opts: TrainOptions,
        checkpoint: Checkpoint,
        read: bool,
    ) -> pare::Result<Trainer<'m>> {
        let (steps, ck) = (Some(a.steps), Some(checkpoint));
        if !read {
            return match &a.resume {
                Some(dir) => Trainer::resume_fed(model, dir, steps, ck),
                None => Trainer::fed(model, opts),
            };
        }
        let (train, val) = data::load_split(&a.data, model, a.seq_len, a.val_split)?;
        match &a.resume {
            Some(dir) => Trainer::resume(model, dir, steps, ck, train, val),
            None => Trainer::new(model, opts, train, val),
        }
    }
    if !a.stages.active() {
        return train_and_report(&a, new_trainer(&a, &model, opts, checkpoint, true)?);
    }
    let schedule: Schedule = a.schedule.as_deref().unwrap_or("1f1b").parse()?;
    let plan = a.stages.plan_training(&model, &opts, schedule)?;
    let layers: Vec<_> = plan.stages.iter().map(|s| s.layers.clone()).collect();
    let stages = Stages {
        threads: pare::pipeline::thread_shares(pare::parallel::threads(), layers.len()),
        layers: layers.clone(),
        schedule,
    };
    // Under mpirun each rank trains its own stage; an error on any rank ends the job.
    pare::pipeline::on_mpi_rank(&layers, |t| {
        let read = t.as_ref().is_none_or(|t| t.stage() == 0);
        let mut trainer = new_trainer(&a, &model, opts, checkpoint, read)?;
        match t {
            Some(t) => trainer.set_rank(t, stages)?,
            None => trainer.set_stages(stages)?,
        }
        train_and_report(&a, trainer).map_err(|e| pare::Error::Invalid(format!("{e:#}")))
    })?;
    Ok(())
}

/// Runs `trainer` with a progress bar and prints what it did (rank 0 alone under MPI).
fn train_and_report(a: &Args, mut trainer: Trainer) -> anyhow::Result<()> {
    let mpi = pare::pipeline::mpi_rank();
    let quiet = mpi.unwrap_or(0) != 0;
    let model = trainer.model;
    let n_stages = trainer.stages().layers.len();
    let est = memory::estimate(model, &trainer.opts);
    if let Some(b) = &a.memory_budget {
        memory::check_budget(model, &trainer.opts, memory::parse_size(b)?)?;
    }
    if !quiet {
        eprintln!(
            "{}: {} adapter parameters (rank {}, {}), qat {}, checkpoint {}, {} threads",
            a.common.model.display(),
            Lora::zeros(&model.config, trainer.opts.lora.clone()).n_params(),
            trainer.opts.lora.rank,
            a.targets,
            match (trainer.opts.qat, trainer.opts.qat_start_step()) {
                (QatMode::None, _) | (_, 0) => trainer.opts.qat.name().to_string(),
                (q, k) => format!("{} from step {} (plain LoRA before)", q.name(), k + 1),
            },
            trainer.opts.checkpoint.name(),
            pare::parallel::threads()
        );
        eprintln!("memory estimate: {}", est.describe());
        if n_stages > 1 {
            eprintln!(
                "schedule {}: {} micro-batches (sequences) per step over {n_stages} stages{}",
                a.schedule.as_deref().unwrap_or("1f1b"),
                trainer.opts.accum,
                if mpi.is_some() {
                    " (MPI ranks)"
                } else {
                    " (threads)"
                }
            );
        }
        if trainer.step > 0 {
            eprintln!("resuming at step {}", trainer.step);
        }
    }
    // Under MPI, mpirun ends every rank on Ctrl-C (a checkpoint needs all ranks at one step).
    if mpi.is_none() {
        ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::Relaxed))?;
    }
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(trainer.opts.steps as u64)
    };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed} < {eta}]")
            .expect("valid template"),
    );
    pb.set_position(trainer.step as u64);
    let base = a.common.model.display().to_string();
    let result = trainer.run(&a.output, &base, &INTERRUPTED, |r| {
        pb.set_position(r.step as u64);
        pb.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            r.loss,
            r.lr,
            r.tokens_per_sec()
        ));
        // Every MPI rank learns the validation loss; rank 0 alone prints it.
        if let Some(v) = r.val_loss.filter(|_| !quiet) {
            pb.suspend(|| {
                eprintln!(
                    "step {}: train loss {:.4}, validation loss {v:.4} (ppl {:.3})",
                    r.step,
                    r.loss,
                    v.exp()
                )
            });
        }
    });
    pb.finish_and_clear();
    // Threads: every stage's report (under MPI a rank knows its own stage only).
    if n_stages > 1 && trainer.last_step.len() == n_stages {
        let sched = trainer.stages().schedule;
        eprint!(
            "{}",
            pare::pipeline::train::describe_step(&trainer.last_step, sched)
        );
        if let Some(path) = &a.timeline {
            let title = format!(
                "pare tune, one step: {n_stages} stages, {} micro-batches, {}",
                trainer.opts.accum,
                a.schedule.as_deref().unwrap_or("1f1b")
            );
            let chart = schedule::timeline(
                &trainer.timeline(),
                n_stages,
                title,
                "seconds from the step's start",
            );
            pare::plot::write_timeline_png(path, &chart)?;
        }
    }
    let peak = pare::eval::bench::peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64;
    match result {
        Err(pare::Error::Interrupted) => {
            eprintln!(
                "interrupted at step {}: checkpoint saved in {}; continue with --resume {}",
                trainer.step,
                a.output
                    .join(pare::train::trainer::CHECKPOINT_DIR)
                    .display(),
                a.output.display()
            );
            std::process::exit(130);
        }
        r => r?,
    }
    if quiet {
        return Ok(());
    }
    let h = &trainer.history;
    let (secs, toks): (f64, usize) = h
        .iter()
        .map(|r| (r.secs, r.tokens))
        .fold((0.0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    // Where the step time went, per step: fake quantization (QAT) and recomputation (checkpointing).
    let per_step = |f: fn(&pare::train::trainer::Record) -> f64, what: &str| {
        let v = h.iter().map(f).sum::<f64>() / h.len().max(1) as f64;
        if v > 0.0 {
            format!(", {v:.2} s {what}")
        } else {
            String::new()
        }
    };
    let parts = per_step(|r| r.fake_quant_secs, "fake-quantizing")
        + &per_step(|r| r.recompute_secs, "recomputing");
    println!(
        "trained {} steps: final train loss {:.4}{}; {:.1} tok/s, {:.2} s/step{}; peak RSS \
         {peak:.1} MiB (activations at peak {:.1} MiB); adapters in {}",
        trainer.step,
        h.last().map_or(f64::NAN, |r| r.loss),
        h.last()
            .and_then(|r| r.val_loss)
            .map(|v| format!(", validation loss {v:.4} (ppl {:.3})", v.exp()))
            .unwrap_or_default(),
        toks as f64 / secs.max(1e-9),
        secs / h.len().max(1) as f64,
        match parts.strip_prefix(", ") {
            Some(p) => format!(" ({p})"),
            None => String::new(),
        },
        h.iter().map(|r| r.peak_activation_bytes).max().unwrap_or(0) as f64 / (1 << 20) as f64,
        a.output.display()
    );
    Ok(())
}

/// Sequences per step: `--accum`, or with stages `--micro-batches` (one sequence each); the two
/// must agree when both are given.
fn sequences_per_step(a: &Args) -> anyhow::Result<usize> {
    let m = a.stages.micro_batches;
    anyhow::ensure!(m >= 1, "--micro-batches must be at least 1");
    anyhow::ensure!(a.accum >= 1, "--accum must be at least 1");
    if !a.stages.active() {
        anyhow::ensure!(
            a.timeline.is_none(),
            "--timeline draws pipeline stages: give --stages N (N > 1) too"
        );
        anyhow::ensure!(
            a.schedule.is_none(),
            "--schedule applies to pipeline stages: give --stages N (N > 1) too"
        );
        anyhow::ensure!(
            m == 1,
            "--micro-batches applies to pipeline stages: give --stages N (N > 1), or use --accum"
        );
        return Ok(a.accum);
    }
    anyhow::ensure!(
        a.accum == 1 || m == 1 || a.accum == m,
        "--accum {} and --micro-batches {m} disagree: with stages each sequence of a step is one \
         micro-batch",
        a.accum
    );
    Ok(a.accum.max(m))
}
