//! Pipeline stages: the layers split into contiguous stages ([`partition`]), each run by its own
//! worker (a thread, or an MPI rank with the `mpi` feature, see [`transport`]), with micro-batches
//! flowing from stage to stage in the order a [`schedule`] gives. Stage 0 ([`driver`]) holds the
//! input and gets the results; the others run [`stage::serve`]. Training steps run through
//! [`train`].

pub mod driver;
pub mod partition;
pub mod schedule;
pub mod stage;
pub mod train;
pub mod transport;

use std::ops::Range;
use std::time::{Duration, Instant};

pub use driver::Driver;
pub use stage::StageStats;

use crate::error::{Error, Result};
use crate::eval::perplexity::LogitsEval;
use crate::infer::generate::Forward;
use crate::model::Model;
use partition::{Costs, Plan, RunShape};
use transport::threads::{self, Threads};

/// Stage 0 as the evaluation and generation code see it (any transport).
pub trait Stage0: LogitsEval + Forward {}
impl<T: transport::Transport> Stage0 for Driver<'_, T> {}

/// How the user asked for stages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub n_stages: usize,
    /// Micro-batches each request (a perplexity chunk, a prompt) is split into.
    pub n_micro: usize,
    /// `--stage-layers 0-9,10-19,20-29` instead of the balanced split.
    pub stage_layers: Option<String>,
    /// Refuse plans whose estimated peak memory per worker exceeds this.
    pub memory_per_worker: Option<u64>,
}

/// The MPI rank of this process when mpirun started it (from the environment Open MPI sets, so it
/// is known before MPI is initialized).
pub fn mpi_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok())
        .and_then(|v| v.parse().ok())
}

/// The plan for `opts`: the given layers, or the split balanced by cost per layer, measured on
/// this machine for threads, estimated from the shapes under MPI (every rank must derive the same
/// plan without touching the other stages' weights).
pub fn plan(model: &Model, opts: &Options, shape: &RunShape) -> Result<Plan> {
    let costs = match (&shape.training, mpi_rank().is_some()) {
        (None, true) => Costs::estimate(model),
        (None, false) => Costs::measure(model, 64)?,
        (Some(_), true) => Costs::estimate_training(model),
        // Only the split needs the costs: with --stage-layers they are not measured.
        (Some(_), false) if opts.stage_layers.is_some() => Costs::estimate_training(model),
        (Some(t), false) => Costs::measure_training(model, &t.lora, shape.mb_tokens)?,
    };
    let Some(layers) = &opts.stage_layers else {
        return partition::partition(&costs, shape, opts.n_stages, opts.memory_per_worker);
    };
    let ranges = partition::parse_stage_layers(layers, model.config.n_layer)?;
    if ranges.len() != opts.n_stages {
        return Err(Error::Invalid(format!(
            "--stage-layers gives {} stages but --stages is {}",
            ranges.len(),
            opts.n_stages
        )));
    }
    let plan = partition::plan_for(&costs, shape, &ranges)?;
    if let Some(limit) = opts.memory_per_worker {
        if let Some((i, s)) = plan
            .stages
            .iter()
            .enumerate()
            .find(|(_, s)| s.peak_bytes > limit)
        {
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            return Err(Error::Invalid(format!(
                "stage {i} (layers {}-{}) needs about {:.1} MiB, more than {:.1} MiB per worker; {}",
                s.layers.start,
                s.layers.end - 1,
                mib(s.peak_bytes),
                mib(limit),
                partition::what_fits(&costs, shape, limit)
            )));
        }
    }
    Ok(plan)
}

/// Runs `f` on stage 0 of `plan` with KV caches of `n_ctx` positions: over threads of this
/// process (each stage with its share of the pool's threads), or, when mpirun started this
/// process, one stage per rank, where only rank 0 runs `f` (the others serve their stage and
/// return `None`). Under MPI a failing rank prints its error and aborts the whole job.
pub fn run<R>(
    model: &Model,
    plan: &Plan,
    n_ctx: usize,
    n_micro: usize,
    f: impl FnOnce(&mut dyn Stage0) -> Result<R>,
) -> Result<Option<(R, RunStats)>> {
    let ranges: Vec<Range<usize>> = plan.stages.iter().map(|s| s.layers.clone()).collect();
    if mpi_rank().is_some() {
        return run_mpi(model, &ranges, n_ctx, n_micro, f);
    }
    let shares = thread_shares(crate::parallel::threads(), ranges.len());
    with_threads(model, &ranges, &shares, n_ctx, n_micro, |d| f(d)).map(Some)
}

fn run_mpi<R>(
    model: &Model,
    ranges: &[Range<usize>],
    n_ctx: usize,
    n_micro: usize,
    f: impl FnOnce(&mut dyn Stage0) -> Result<R>,
) -> Result<Option<(R, RunStats)>> {
    let t0 = Instant::now();
    on_mpi_rank(ranges, |t| {
        let Some(t) = t else {
            return Err(Error::Model("no MPI transport under mpirun".into()));
        };
        let rank = t.stage();
        if rank == 0 {
            let mut d = Driver::new(model, t, ranges[0].clone(), n_ctx, n_micro)?;
            let r = f(&mut d)?;
            let s0 = d.finish()?;
            Ok(Some((
                r,
                RunStats {
                    wall: t0.elapsed(),
                    stages: vec![s0],
                },
            )))
        } else {
            stage::serve(model, t, ranges[rank].clone(), n_ctx)?;
            Ok(None)
        }
    })
}

/// Runs `f` with this rank's transport when mpirun started this process (one stage per rank,
/// stage `i` holding `ranges[i]`), else with `None`. Under MPI, a rank count other than the
/// number of stages is an error, each rank prints its peak RSS at the end, and an error on any
/// rank prints it and ends the whole job (no rank is left waiting for a message).
#[cfg(not(feature = "mpi"))]
pub fn on_mpi_rank<R>(
    _ranges: &[Range<usize>],
    f: impl FnOnce(Option<&mut dyn transport::Transport>) -> Result<R>,
) -> Result<R> {
    if mpi_rank().is_some() {
        return Err(Error::Invalid(
            "this process was started by mpirun, but pare was built without the `mpi` feature \
             (cargo build --features mpi)"
                .into(),
        ));
    }
    f(None)
}

/// Runs `f` with this rank's transport when mpirun started this process (one stage per rank,
/// stage `i` holding `ranges[i]`), else with `None`. Under MPI, a rank count other than the
/// number of stages is an error, each rank prints its peak RSS at the end, and an error on any
/// rank prints it and ends the whole job (no rank is left waiting for a message).
#[cfg(feature = "mpi")]
pub fn on_mpi_rank<R>(
    ranges: &[Range<usize>],
    f: impl FnOnce(Option<&mut dyn transport::Transport>) -> Result<R>,
) -> Result<R> {
    if mpi_rank().is_none() {
        return f(None);
    }
    let mpi = transport::mpi::Mpi::init()?;
    let (rank, size) = (mpi.rank(), mpi.size());
    let mismatch = size != ranges.len();
    let result = (|| {
        if mismatch {
            return Err(Error::Invalid(format!(
                "mpirun started {size} ranks but the plan has {} stages: run mpirun -np {} \
                 (one rank per stage)",
                ranges.len(),
                ranges.len()
            )));
        }
        // Fault injection for the test that a dead rank ends the job instead of hanging it.
        if std::env::var("PARE_TEST_KILL_RANK")
            .ok()
            .and_then(|r| r.parse().ok())
            == Some(rank)
        {
            std::process::abort();
        }
        let mut t = mpi.transport();
        f(Some(&mut t))
    })();
    if result.is_ok() {
        // Each rank's resident memory against its stage's weights: the evidence that a rank
        // touches only its own tensors of the mapped file.
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        // One write per line, so the ranks' lines do not interleave mid-line.
        let line = format!(
            "rank {rank}: layers {}-{}, peak RSS {:.1} MiB\n",
            ranges[rank].start,
            ranges[rank].end - 1,
            mib(crate::eval::bench::peak_rss_bytes().unwrap_or(0))
        );
        eprint!("{line}");
    }
    match result {
        Ok(v) => Ok(v),
        Err(_) if mismatch && rank != 0 => {
            // Every rank sees the same mismatch: let rank 0 alone say so, then end the job.
            mpi.wait_for_abort()
        }
        Err(e) => {
            let line = format!("error: MPI rank {rank} of {size}: {e}\n");
            eprint!("{line}");
            mpi.abort(1)
        }
    }
}

/// Threads per stage when `total` threads are shared by `n` stages: an even share, the remainder
/// to the first stages, at least one each (more stages than cores then oversubscribe).
pub fn thread_shares(total: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|i| (total / n + usize::from(i < total % n)).max(1))
        .collect()
}

/// What a threaded pipeline run did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStats {
    pub wall: Duration,
    /// Per stage.
    pub stages: Vec<StageStats>,
}

impl RunStats {
    /// Fraction of stage-time the stages spent idle: `1 - Σ busy / (stages × wall)`.
    pub fn bubble(&self) -> f64 {
        let busy: f64 = self.stages.iter().map(|s| s.busy.as_secs_f64()).sum();
        1.0 - busy / (self.stages.len() as f64 * self.wall.as_secs_f64())
    }
}

/// Runs `f` on stage 0 of a pipeline whose stages (`ranges`, one per stage) are threads of this
/// process, each with `threads[i]` threads of its own, KV caches of `n_ctx` positions, and
/// requests split into `n_micro` micro-batches. The other stages end when `f` returns; the first
/// error of any stage is returned.
pub fn with_threads<R>(
    model: &Model,
    ranges: &[Range<usize>],
    threads: &[usize],
    n_ctx: usize,
    n_micro: usize,
    f: impl FnOnce(&mut Driver<'_, Threads>) -> Result<R>,
) -> Result<(R, RunStats)> {
    let n = ranges.len();
    if n == 0 || threads.len() != n || ranges[0].start != 0 {
        return Err(Error::Invalid(format!(
            "a pipeline needs one layer range per stage starting at 0 and one thread count each \
             ({n} ranges, {} thread counts)",
            threads.len()
        )));
    }
    let t0 = Instant::now();
    std::thread::scope(|sc| {
        let mut ts = threads::connect(n).into_iter();
        let first = ts.next().expect("one stage at least");
        let workers: Vec<_> = ts
            .enumerate()
            .map(|(i, mut t)| {
                let (layers, k) = (ranges[i + 1].clone(), threads[i + 1]);
                std::thread::Builder::new()
                    .name(format!("pare-stage-{}", i + 1))
                    .spawn_scoped(sc, move || {
                        crate::parallel::with_threads(k, || {
                            stage::serve(model, &mut t, layers, n_ctx)
                        })
                    })
                    .map_err(|e| Error::Model(format!("starting a stage thread: {e}")))
            })
            .collect::<Result<_>>()?;
        let driven = crate::parallel::with_threads(threads[0], || {
            let mut d = Driver::new(model, first, ranges[0].clone(), n_ctx, n_micro)?;
            let r = f(&mut d)?;
            Ok((r, d.finish()?))
        });
        let mut stages = Vec::with_capacity(n);
        let mut first_err = None;
        for w in workers {
            match w.join() {
                Ok(Ok(s)) => stages.push(s),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Model("a pipeline stage panicked".into()));
                }
            }
        }
        // The driver's own error explains the others (they stop because it did).
        let (r, s0) = driven?;
        if let Some(e) = first_err {
            return Err(e);
        }
        stages.insert(0, s0);
        Ok((
            r,
            RunStats {
                wall: t0.elapsed(),
                stages,
            },
        ))
    })
}
