//! The pipeline options that perplexity and run share (`--stages` and friends).

use pare::model::Model;
use pare::pipeline::schedule::Schedule;
use pare::pipeline::{self, partition};
use pare::train::trainer::TrainOptions;

#[derive(clap::Args, Debug, Clone)]
pub struct StageArgs {
    /// Split the layers into N pipeline stages: threads, or one stage per rank under mpirun.
    #[arg(long, default_value_t = 1)]
    pub stages: usize,
    /// Micro-batches each chunk or prompt is split into, flowing through the stages at once.
    #[arg(long, default_value_t = 1)]
    pub micro_batches: usize,
    /// The stages' layers by hand, e.g. 0-9,10-19,20-29 (default: balanced by measured cost).
    #[arg(long)]
    pub stage_layers: Option<String>,
    /// Refuse a plan whose estimated peak memory per worker exceeds SIZE (e.g. 64M, 1.5G).
    #[arg(long, value_name = "SIZE")]
    pub memory_per_worker: Option<String>,
}

impl StageArgs {
    /// Whether to run through the pipeline (otherwise the plain single-worker path).
    pub fn active(&self) -> bool {
        self.stages > 1
            || self.stage_layers.is_some()
            || self.memory_per_worker.is_some()
            || pipeline::mpi_rank().is_some()
    }

    /// The plan for a run with KV caches of `n_ctx` positions keeping `logits_rows` rows of
    /// logits per request; printed to stderr (by rank 0 only under MPI).
    pub fn plan(
        &self,
        model: &Model,
        n_ctx: usize,
        logits_rows: usize,
    ) -> anyhow::Result<partition::Plan> {
        anyhow::ensure!(
            self.micro_batches >= 1,
            "--micro-batches must be at least 1"
        );
        let shape = partition::RunShape::new(
            model,
            n_ctx,
            n_ctx.div_ceil(self.micro_batches),
            logits_rows,
        );
        self.plan_for(model, &shape)
    }

    /// The plan for training `opts` under `schedule` (one sequence per micro-batch), priced by
    /// what training keeps per stage; printed as [`plan`](Self::plan) prints.
    pub fn plan_training(
        &self,
        model: &Model,
        opts: &TrainOptions,
        schedule: Schedule,
    ) -> anyhow::Result<partition::Plan> {
        let shape = partition::RunShape::training(model, opts, schedule, opts.accum);
        self.plan_for(model, &shape)
    }

    fn plan_for(
        &self,
        model: &Model,
        shape: &partition::RunShape,
    ) -> anyhow::Result<partition::Plan> {
        let opts = pipeline::Options {
            n_stages: self.stages,
            n_micro: self.micro_batches,
            stage_layers: self.stage_layers.clone(),
            memory_per_worker: self
                .memory_per_worker
                .as_deref()
                .map(partition::parse_size)
                .transpose()?,
        };
        let plan = pipeline::plan(model, &opts, shape)?;
        if pipeline::mpi_rank().unwrap_or(0) == 0 {
            eprint!("{}", plan.describe());
        }
        Ok(plan)
    }
}

/// Prints how the stages spent the run (threads only: under MPI rank 0 sees its own stage).
pub fn report(stats: &pipeline::RunStats, n_stages: usize) {
    if stats.stages.len() == n_stages && n_stages > 1 {
        let busy: Vec<String> = stats
            .stages
            .iter()
            .map(|s| format!("{:.2}", s.busy.as_secs_f64()))
            .collect();
        eprintln!(
            "pipeline: {:.2} s wall, busy per stage [{}] s, bubble {:.1}%",
            stats.wall.as_secs_f64(),
            busy.join(", "),
            100.0 * stats.bubble()
        );
    }
}
