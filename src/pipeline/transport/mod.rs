//! How pipeline stages talk: one interface, two carriers. [`threads`] connects the stages of one
//! process by channels; `mpi` (cargo feature `mpi`) connects one stage per MPI rank by
//! point-to-point messages. Stage 0 drives: it holds the input, and the last stage sends it the
//! results.

pub mod threads;

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::Result;
use crate::eval::score::Reduce;
use crate::model::Logits;

/// What a micro-batch's hidden states come with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Positions in the micro-batch.
    pub n_tokens: usize,
    /// The micro-batch starts a new sequence: every stage empties its KV cache first.
    pub reset: bool,
    /// Which of its positions need logits.
    pub want: Logits,
    /// The last micro-batch of a request: the last stage sends the logits gathered since the
    /// previous reply to stage 0.
    pub reply: bool,
    /// The micro-batch is scored instead (`want` is `None`): stage 0 sends the last stage a
    /// [`Message::Score`] for it, and the last stage answers with a [`Message::Scores`].
    pub score: bool,
}

/// A message between stages.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// A micro-batch's hidden states, `n_tokens × n_embd`, to the next stage.
    Forward { header: Header, hidden: Vec<f32> },
    /// The logits of a request, from the last stage to stage 0.
    Logits(Vec<f32>),
    /// A slice of rows to score in a micro-batch, from stage 0 straight to the last stage, sent
    /// after that micro-batch's hidden states: its rows `first..first + targets.len()` predict
    /// `targets`, reduced as `how` says (with `base` holding their base records when comparing).
    /// A micro-batch's scored rows come as [`crate::eval::score::slices`], in order, `more` on
    /// all but the last (one empty slice when none of its rows is scored), so that no message
    /// carries more than a slice's base records or results.
    Score {
        how: Reduce,
        first: usize,
        targets: Vec<u32>,
        base: Vec<u8>,
        more: bool,
    },
    /// The per-row results of one [`Message::Score`] ([`crate::eval::score`]), from the last stage
    /// to stage 0.
    Scores(Vec<u8>),
    /// The job is over: each stage passes it on and ends.
    Stop,
    /// Training: micro-batch `micro`'s hidden states leaving a stage, to the next.
    Activations { micro: usize, hidden: Vec<f32> },
    /// Training: the gradient of the loss with respect to those hidden states, to the previous
    /// stage.
    Gradient { micro: usize, grad: Vec<f32> },
    /// Training: numbers each stage contributes to a total (its squared gradient norm, its
    /// loss), sent to stage 0, which sends the totals back.
    Sums(Vec<f64>),
    /// Training under MPI: a stage's adapters and optimizer moments, flattened, to stage 0, which
    /// saves the whole set.
    Share(Vec<f32>),
    /// Training and validation: what the last stage needs of micro-batch `micro` to compute its
    /// loss, from stage 0, which alone reads the data: the token each position predicts and that
    /// position's weight in the loss (0 where it is not scored).
    Batch {
        micro: usize,
        targets: Vec<u32>,
        weight: Vec<f32>,
    },
}

impl Message {
    /// What kind of message this is, for errors about an unexpected one.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Forward { .. } => "hidden states",
            Message::Logits(_) => "logits",
            Message::Score { .. } => "rows to score",
            Message::Scores(_) => "scores",
            Message::Stop => "a stop",
            Message::Activations { .. } => "training activations",
            Message::Gradient { .. } => "a gradient",
            Message::Sums(_) => "sums",
            Message::Share(_) => "a stage's adapters",
            Message::Batch { .. } => "a micro-batch's targets",
        }
    }
}

/// Point-to-point messages between the stages of one pipeline.
pub trait Transport {
    /// This stage's index.
    fn stage(&self) -> usize;
    fn n_stages(&self) -> usize;
    /// Sends `msg` to stage `to` (it may return before `to` has received it).
    fn send(&mut self, to: usize, msg: Message) -> Result<()>;
    /// The next message from stage `from`; an error when that stage has gone.
    fn recv(&mut self, from: usize) -> Result<Message>;
}

/// A borrowed transport is one too (a stage run over a transport that outlives it, as an MPI
/// rank's does).
impl<T: Transport + ?Sized> Transport for &mut T {
    fn stage(&self) -> usize {
        (**self).stage()
    }
    fn n_stages(&self) -> usize {
        (**self).n_stages()
    }
    fn send(&mut self, to: usize, msg: Message) -> Result<()> {
        (**self).send(to, msg)
    }
    fn recv(&mut self, from: usize) -> Result<Message> {
        (**self).recv(from)
    }
}
