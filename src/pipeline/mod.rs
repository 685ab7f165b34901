//! Pipeline stages: the layers split into contiguous stages ([`partition`]), each run by its own
//! worker (a thread, or an MPI rank with the `mpi` feature, see [`transport`]), with micro-batches
//! flowing from stage to stage in the order a [`schedule`] gives. Stage 0 ([`driver`]) holds the
//! input and gets the results; the others run [`stage::serve`].

pub mod driver;
pub mod partition;
pub mod schedule;
pub mod stage;
pub mod transport;

use std::ops::Range;
use std::time::{Duration, Instant};

pub use driver::Driver;
pub use stage::StageStats;

use crate::error::{Error, Result};
use crate::model::Model;
use transport::threads::{self, Threads};

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
