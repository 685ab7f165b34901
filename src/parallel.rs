//! The worker pool that runs the forward pass's parallel loops.
//!
//! A decode step is ~150 small parallel loops of a few tens of microseconds each; waking sleeping
//! threads for each (as a general-purpose pool does) costs as much as the work. So, as ggml does,
//! the workers spin on an epoch counter between loops and only sleep after about a millisecond
//! without work. The calling thread takes part in every loop. `set_threads` sizes the pool once
//! (the CLI's `-t`); by default it has one thread per core.
//!
//! Pipeline stages that run as threads of one process each need their own share of the cores, not
//! a turn on the one global pool (which runs one loop at a time): [`with_threads`] gives the
//! calling thread a private pool of its own size for the duration of a closure.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering::*};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The loop body, with its lifetime erased: only dereferenced while `run` keeps it alive.
type Job = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per loop; workers watch it.
    epoch: AtomicUsize,
    /// Next index to hand out in the current loop.
    next: AtomicUsize,
    /// Indices in the current loop.
    len: AtomicUsize,
    /// Workers still inside the current loop.
    active: AtomicUsize,
    job: UnsafeCell<Option<Job>>,
    sleeping: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// One loop at a time (callers from several threads queue here).
    caller: Mutex<()>,
    workers: usize,
    /// Set (with an epoch bump) when a private pool ends: its workers exit.
    shutdown: std::sync::atomic::AtomicBool,
}

// SAFETY: `job` is written only by the thread holding `caller`, before the epoch is bumped
// (Release), and read by workers after they observe the bump (Acquire).
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

static POOL: OnceLock<&'static Shared> = OnceLock::new();

thread_local! {
    /// The private pool of this thread, set by [`with_threads`].
    static LOCAL: std::cell::Cell<Option<&'static Shared>> = const { std::cell::Cell::new(None) };
}
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

const SPIN: Duration = Duration::from_millis(2);
/// Spins (~10–20 µs) before a waiting thread starts yielding its core on every check.
const YIELD_AFTER: u32 = 4096;

/// Sets the number of threads (the caller included); it takes effect if called before the pool's
/// first use, and returns whether the pool has (or will have) that size.
pub fn set_threads(n: usize) -> bool {
    REQUESTED.store(n.max(1), SeqCst);
    POOL.get().is_none_or(|p| p.workers + 1 == n.max(1))
}

/// Threads that run each loop, the caller included.
pub fn threads() -> usize {
    pool().workers + 1
}

/// Runs `f` with this thread's parallel loops on a private pool of `n` threads (this one
/// included; `n = 1` runs them inline), whose workers exit when `f` returns.
pub fn with_threads<R>(n: usize, f: impl FnOnce() -> R) -> R {
    let shared = spawn_pool(n.max(1));
    let previous = LOCAL.replace(Some(shared));
    struct Restore(Option<&'static Shared>, &'static Shared);
    impl Drop for Restore {
        fn drop(&mut self) {
            LOCAL.set(self.0);
            let s = self.1;
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.shutdown.store(true, SeqCst);
            s.epoch.fetch_add(1, SeqCst);
            s.wake.notify_all();
        }
    }
    let _restore = Restore(previous, shared);
    f()
}

fn pool() -> &'static Shared {
    if let Some(local) = LOCAL.get() {
        return local;
    }
    POOL.get_or_init(|| {
        let n = match REQUESTED.load(SeqCst) {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        spawn_pool(n)
    })
}

/// A pool of `n` threads (the caller counts as one). Its few bytes are leaked: the global pool
/// lives for the process, and a private one is made once per pipeline run.
fn spawn_pool(n: usize) -> &'static Shared {
    {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            epoch: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            job: UnsafeCell::new(None),
            sleeping: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            caller: Mutex::new(()),
            workers: n - 1,
            shutdown: std::sync::atomic::AtomicBool::new(false),
        }));
        for i in 0..n - 1 {
            std::thread::Builder::new()
                .name(format!("pare-worker-{i}"))
                .spawn(move || worker(shared))
                .expect("spawning a worker thread");
        }
        shared
    }
}

fn worker(s: &'static Shared) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Acquire);
            if s.shutdown.load(Acquire) {
                return;
            }
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if !spins.is_multiple_of(1024) || start.elapsed() < SPIN {
                if spins < YIELD_AFTER {
                    std::hint::spin_loop();
                } else {
                    // As in the caller's wait: let a thread that shares this core run.
                    std::thread::yield_now();
                }
                continue;
            }
            // Idle for a while: sleep until the next loop is published.
            let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleeping.fetch_add(1, SeqCst);
            while s.epoch.load(SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleeping.fetch_sub(1, SeqCst);
        }
        // SAFETY: published before the epoch bump we observed; alive until `active` reaches 0.
        let job = unsafe { &*(*s.job.get()).expect("a job is published with each epoch") };
        claim(s, job);
        s.active.fetch_sub(1, Release);
    }
}

fn claim(s: &Shared, job: &(dyn Fn(usize) + Sync)) {
    let len = s.len.load(Acquire);
    loop {
        let i = s.next.fetch_add(1, AcqRel);
        if i >= len {
            return;
        }
        job(i);
    }
}

/// Runs `f(i)` for every `i` in `0..len`, spread over the pool; returns when all are done.
/// A panic in `f` aborts the process (the loop bodies are plain arithmetic that cannot panic on
/// checked inputs).
pub fn for_each(len: usize, f: &(dyn Fn(usize) + Sync)) {
    let s = pool();
    if len == 0 {
        return;
    }
    if s.workers == 0 || len == 1 {
        (0..len).for_each(f);
        return;
    }
    let _one_at_a_time = s.caller.lock().unwrap_or_else(|e| e.into_inner());
    let abort_on_panic = AbortOnPanic;
    // SAFETY: `f` outlives this call, and workers touch it only until `active` drops to 0 below.
    let erased: Job = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Job>(f) };
    unsafe { *s.job.get() = Some(erased) };
    s.len.store(len, Release);
    s.next.store(0, Release);
    s.active.store(s.workers, Release);
    s.epoch.fetch_add(1, SeqCst);
    if s.sleeping.load(SeqCst) > 0 {
        let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_all();
    }
    claim(s, f);
    let mut spins = 0u32;
    while s.active.load(Acquire) != 0 {
        // A worker that has not finished may be descheduled (another process busy on its core):
        // after a short spin, give the core away so it can run, instead of spinning a whole tick.
        spins += 1;
        if spins < YIELD_AFTER {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    std::mem::forget(abort_on_panic);
}

/// Workers may still hold the loop body while the caller unwinds; abort instead of letting them
/// use a dead closure.
struct AbortOnPanic;
impl Drop for AbortOnPanic {
    fn drop(&mut self) {
        eprintln!("pare: panic inside a parallel loop");
        std::process::abort();
    }
}

/// A pointer to a buffer that the tasks of one parallel loop write at disjoint elements (each task
/// its own rows or heads), which `&mut` slices cannot express across tasks.
pub struct DisjointMut<T = f32>(*mut T);

impl<T> Clone for DisjointMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for DisjointMut<T> {}

// SAFETY: users write only elements no other task of the same loop touches (checked by each
// call site's indexing), and the buffer outlives the loop.
unsafe impl<T: Send> Send for DisjointMut<T> {}
unsafe impl<T: Send> Sync for DisjointMut<T> {}

impl<T> DisjointMut<T> {
    pub fn new(buf: &mut [T]) -> Self {
        DisjointMut(buf.as_mut_ptr())
    }

    /// The start of the buffer.
    pub fn ptr(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_exactly_once() {
        for len in [0usize, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..50 {
                for_each(len, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Relaxed) == 50), "len {len}");
        }
    }

    #[test]
    fn loops_from_several_threads_and_after_sleeping() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    for _ in 0..100 {
                        for_each(64, &|i| {
                            total.fetch_add(i, Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Relaxed), 3 * 100 * (63 * 64 / 2));
        std::thread::sleep(SPIN * 3);
        let n = AtomicUsize::new(0);
        for_each(10, &|_| {
            n.fetch_add(1, Relaxed);
        });
        assert_eq!(n.load(Relaxed), 10);
    }

    #[test]
    fn private_pools_have_their_size_and_run_every_index() {
        std::thread::scope(|sc| {
            for n in [1usize, 2, 3] {
                sc.spawn(move || {
                    for _ in 0..3 {
                        with_threads(n, || {
                            assert_eq!(threads(), n);
                            let hits: Vec<AtomicUsize> =
                                (0..257).map(|_| AtomicUsize::new(0)).collect();
                            for_each(257, &|i| {
                                hits[i].fetch_add(1, Relaxed);
                            });
                            assert!(hits.iter().all(|h| h.load(Relaxed) == 1));
                        });
                    }
                });
            }
        });
    }
}
