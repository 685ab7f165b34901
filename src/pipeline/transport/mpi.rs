//! One stage per MPI rank (Open MPI through the `mpi` crate): a message is a header of six
//! integers followed, for hidden states, logits and gradients, by its f32 values (f64 for sums,
//! bytes for rows to score and their scores),
//! both point-to-point on MPI_COMM_WORLD (MPI keeps messages between two ranks in order). A rank
//! that fails calls MPI_Abort, which ends every rank of the job, so no stage waits forever; a rank
//! that dies is noticed by mpirun, which ends the others.

use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use super::{Header, Message, Transport};
use crate::error::{Error, Result};
use crate::eval::score::Reduce;
use crate::model::Logits;

const FORWARD: u64 = 1;
const LOGITS: u64 = 2;
const STOP: u64 = 3;
const ACTIVATIONS: u64 = 4;
const GRADIENT: u64 = 5;
const SUMS: u64 = 6;
const SHARE: u64 = 7;
const SCORE: u64 = 8;
const SCORES: u64 = 9;
const BATCH: u64 = 10;

/// This process's place in an MPI job. Dropping it finalizes MPI.
pub struct Mpi {
    // Dropped last: MPI_Finalize.
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

/// Whether this process was started by mpirun (Open MPI sets these for every rank).
pub fn launched_by_mpirun() -> bool {
    std::env::var_os("OMPI_COMM_WORLD_SIZE").is_some() || std::env::var_os("PMI_SIZE").is_some()
}

impl Mpi {
    /// Initializes MPI; an error when it was initialized already.
    pub fn init() -> Result<Mpi> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::Model("MPI is already initialized in this process".into()))?;
        Ok(Mpi {
            world: universe.world(),
            _universe: universe,
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    pub fn size(&self) -> usize {
        self.world.size() as usize
    }

    /// Ends every rank of the job with `code` (after this rank has printed why).
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Blocks until another rank aborts the job (a barrier that rank never joins).
    pub fn wait_for_abort(&self) -> ! {
        self.world.barrier();
        self.world.barrier();
        self.abort(1)
    }

    /// The transport of this rank's stage.
    pub fn transport(&self) -> MpiTransport<'_> {
        MpiTransport {
            world: &self.world,
            in_flight: Vec::new(),
        }
    }
}

/// A data send and the buffer it reads (leaked until the send completes).
enum InFlight {
    F32(Request<'static, [f32], StaticScope>, *mut [f32]),
    Bytes(Request<'static, [u8], StaticScope>, *mut [u8]),
}

impl InFlight {
    /// `Ok(())` once the send has completed and its buffer is freed; else itself back.
    fn test(self) -> std::result::Result<(), InFlight> {
        match self {
            InFlight::F32(req, buf) => match req.test() {
                Ok(_) => {
                    // SAFETY: `buf` came from `Box::leak` in `send`, and its send is complete.
                    drop(unsafe { Box::from_raw(buf) });
                    Ok(())
                }
                Err(req) => Err(InFlight::F32(req, buf)),
            },
            InFlight::Bytes(req, buf) => match req.test() {
                Ok(_) => {
                    // SAFETY: `buf` came from `Box::leak` in `send_bytes`, and its send is complete.
                    drop(unsafe { Box::from_raw(buf) });
                    Ok(())
                }
                Err(req) => Err(InFlight::Bytes(req, buf)),
            },
        }
    }

    /// Waits for the send to complete and frees its buffer.
    fn wait(self) {
        match self {
            InFlight::F32(req, buf) => {
                req.wait();
                // SAFETY: as in `test`.
                drop(unsafe { Box::from_raw(buf) });
            }
            InFlight::Bytes(req, buf) => {
                req.wait();
                // SAFETY: as in `test`.
                drop(unsafe { Box::from_raw(buf) });
            }
        }
    }
}

pub struct MpiTransport<'a> {
    world: &'a SimpleCommunicator,
    /// Data sends not known to be complete, with the buffers they read. Sends do not wait for
    /// the receiver, so two stages that each send before receiving (1F1B's steady state: a
    /// forward's output one way, a backward's the other) cannot deadlock on MPI's rendezvous.
    in_flight: Vec<InFlight>,
}

impl MpiTransport<'_> {
    /// Frees the buffers of the sends that have completed.
    fn reap(&mut self) {
        for f in std::mem::take(&mut self.in_flight) {
            if let Err(f) = f.test() {
                self.in_flight.push(f);
            }
        }
    }
}

impl Drop for MpiTransport<'_> {
    fn drop(&mut self) {
        for f in self.in_flight.drain(..) {
            f.wait();
        }
    }
}

fn want_code(w: Logits) -> u64 {
    match w {
        Logits::None => 0,
        Logits::Last => 1,
        Logits::All => 2,
    }
}

impl MpiTransport<'_> {
    /// Sends a header and then `data` without waiting for the receiver (as `send` does for f32
    /// data).
    fn send_bytes(&mut self, to: usize, head: [u64; 6], data: Vec<u8>) -> Result<()> {
        self.world.process_at_rank(to as i32).send(&head[..]);
        self.send_data(to, data);
        Ok(())
    }

    /// Sends `data` without waiting for the receiver; the buffer lives until the send completes.
    fn send_data(&mut self, to: usize, data: Vec<u8>) {
        let p = self.world.process_at_rank(to as i32);
        self.reap();
        let buf: &'static mut [u8] = Box::leak(data.into_boxed_slice());
        let ptr: *mut [u8] = buf;
        let req = p.immediate_send(StaticScope, &*buf);
        self.in_flight.push(InFlight::Bytes(req, ptr));
    }
}

impl Transport for MpiTransport<'_> {
    fn stage(&self) -> usize {
        self.world.rank() as usize
    }

    fn n_stages(&self) -> usize {
        self.world.size() as usize
    }

    fn send(&mut self, to: usize, msg: Message) -> Result<()> {
        let p = self.world.process_at_rank(to as i32);
        let (head, data) = match msg {
            Message::Forward { header: h, hidden } => (
                [
                    FORWARD,
                    h.n_tokens as u64,
                    u64::from(h.reset),
                    want_code(h.want) | u64::from(h.score) << 2,
                    u64::from(h.reply),
                    hidden.len() as u64,
                ],
                hidden,
            ),
            Message::Logits(l) => ([LOGITS, 0, 0, 0, 0, l.len() as u64], l),
            Message::Stop => ([STOP, 0, 0, 0, 0, 0], Vec::new()),
            Message::Score {
                how,
                first,
                targets,
                base,
                more,
            } => {
                let mut bytes = Vec::with_capacity(4 * targets.len());
                targets
                    .iter()
                    .for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
                let head = [
                    SCORE,
                    how.code() | u64::from(more) << 8,
                    first as u64,
                    targets.len() as u64,
                    base.len() as u64,
                    (bytes.len() + base.len()) as u64,
                ];
                self.send_bytes(to, head, bytes)?;
                // The base records (a slice's are megabytes) follow as a message of their own,
                // sent from their buffer rather than copied after the targets.
                if !base.is_empty() {
                    self.send_data(to, base);
                }
                return Ok(());
            }
            Message::Scores(v) => {
                return self.send_bytes(to, [SCORES, 0, 0, 0, 0, v.len() as u64], v)
            }
            Message::Activations { micro, hidden } => (
                [ACTIVATIONS, micro as u64, 0, 0, 0, hidden.len() as u64],
                hidden,
            ),
            Message::Gradient { micro, grad } => {
                ([GRADIENT, micro as u64, 0, 0, 0, grad.len() as u64], grad)
            }
            Message::Share(v) => ([SHARE, 0, 0, 0, 0, v.len() as u64], v),
            Message::Batch {
                micro,
                targets,
                weight,
            } => {
                if targets.len() != weight.len() {
                    return Err(Error::Model(format!(
                        "micro-batch {micro}: {} targets but {} weights",
                        targets.len(),
                        weight.len()
                    )));
                }
                // One message: the targets, then the weights, little-endian (a few KB).
                let mut bytes = Vec::with_capacity(8 * targets.len());
                targets
                    .iter()
                    .for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
                weight
                    .iter()
                    .for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
                let head = [
                    BATCH,
                    micro as u64,
                    targets.len() as u64,
                    0,
                    0,
                    bytes.len() as u64,
                ];
                return self.send_bytes(to, head, bytes);
            }
            Message::Sums(v) => {
                p.send(&[SUMS, 0, 0, 0, 0, v.len() as u64][..]);
                p.send(&v[..]);
                return Ok(());
            }
        };
        p.send(&head[..]);
        if head[0] != STOP {
            self.reap();
            // The buffer lives until the send completes (`reap`, or `drop` at the latest).
            let buf: &'static mut [f32] = Box::leak(data.into_boxed_slice());
            let ptr: *mut [f32] = buf;
            let req = p.immediate_send(StaticScope, &*buf);
            self.in_flight.push(InFlight::F32(req, ptr));
        }
        Ok(())
    }

    fn recv(&mut self, from: usize) -> Result<Message> {
        let p = self.world.process_at_rank(from as i32);
        let (head, _) = p.receive_vec::<u64>();
        let bad = || {
            Error::Model(format!(
                "rank {from} sent a malformed message header {head:?}"
            ))
        };
        if head.len() != 6 {
            return Err(bad());
        }
        let data = |len: u64| -> Result<Vec<f32>> {
            let (v, _) = p.receive_vec::<f32>();
            if v.len() as u64 != len {
                return Err(Error::Model(format!(
                    "rank {from} announced {len} values and sent {}",
                    v.len()
                )));
            }
            Ok(v)
        };
        let bytes = |len: u64| -> Result<Vec<u8>> {
            let (v, _) = p.receive_vec::<u8>();
            if v.len() as u64 != len {
                return Err(Error::Model(format!(
                    "rank {from} announced {len} bytes and sent {}",
                    v.len()
                )));
            }
            Ok(v)
        };
        match head[0] {
            FORWARD => {
                let want = match head[3] & 3 {
                    0 => Logits::None,
                    1 => Logits::Last,
                    2 => Logits::All,
                    _ => return Err(bad()),
                };
                let header = Header {
                    n_tokens: head[1] as usize,
                    reset: head[2] != 0,
                    want,
                    reply: head[4] != 0,
                    score: head[3] & 4 != 0,
                };
                Ok(Message::Forward {
                    header,
                    hidden: data(head[5])?,
                })
            }
            LOGITS => Ok(Message::Logits(data(head[5])?)),
            SCORE => {
                let how = Reduce::from_code(head[1] & 0xff).ok_or_else(bad)?;
                let (n, base_len) = (head[3], head[4]);
                if n.checked_mul(4).and_then(|b| b.checked_add(base_len)) != Some(head[5]) {
                    return Err(bad());
                }
                let v = bytes(4 * n)?;
                let base = if base_len > 0 {
                    bytes(base_len)?
                } else {
                    Vec::new()
                };
                let targets = v
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(Message::Score {
                    how,
                    first: head[2] as usize,
                    targets,
                    base,
                    more: head[1] & 0x100 != 0,
                })
            }
            SCORES => Ok(Message::Scores(bytes(head[5])?)),
            ACTIVATIONS => Ok(Message::Activations {
                micro: head[1] as usize,
                hidden: data(head[5])?,
            }),
            GRADIENT => Ok(Message::Gradient {
                micro: head[1] as usize,
                grad: data(head[5])?,
            }),
            SHARE => Ok(Message::Share(data(head[5])?)),
            BATCH => {
                let n = head[2];
                if n.checked_mul(8) != Some(head[5]) {
                    return Err(bad());
                }
                let v = bytes(head[5])?;
                let (t, w) = v.split_at(4 * n as usize);
                let word = |b: &[u8]| [b[0], b[1], b[2], b[3]];
                Ok(Message::Batch {
                    micro: head[1] as usize,
                    targets: t
                        .chunks_exact(4)
                        .map(|b| u32::from_le_bytes(word(b)))
                        .collect(),
                    weight: w
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(word(b)))
                        .collect(),
                })
            }
            SUMS => {
                let (v, _) = p.receive_vec::<f64>();
                if v.len() as u64 != head[5] {
                    return Err(bad());
                }
                Ok(Message::Sums(v))
            }
            STOP => Ok(Message::Stop),
            _ => Err(bad()),
        }
    }
}
