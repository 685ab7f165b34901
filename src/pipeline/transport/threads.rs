//! Stages as threads of one process, connected by channels (a message moves its buffer, nothing is
//! copied).

use std::sync::mpsc::{channel, Receiver, Sender};

use super::{Message, Transport};
use crate::error::{Error, Result};

/// One stage's ends of the channels to every other stage.
pub struct Threads {
    stage: usize,
    to: Vec<Sender<Message>>,
    from: Vec<Receiver<Message>>,
}

/// Connected transports for `n` stages, index = stage.
pub fn connect(n: usize) -> Vec<Threads> {
    // chans[a][b] carries a → b.
    let mut senders: Vec<Vec<Sender<Message>>> = (0..n).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Receiver<Message>>> = (0..n).map(|_| Vec::new()).collect();
    for s in senders.iter_mut() {
        for r in receivers.iter_mut() {
            let (tx, rx) = channel();
            s.push(tx);
            r.push(rx);
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(stage, (to, from))| Threads { stage, to, from })
        .collect()
}

impl Transport for Threads {
    fn stage(&self) -> usize {
        self.stage
    }

    fn n_stages(&self) -> usize {
        self.to.len()
    }

    fn send(&mut self, to: usize, msg: Message) -> Result<()> {
        self.to[to].send(msg).map_err(|_| {
            Error::Model(format!(
                "pipeline stage {to} has stopped (stage {} could not send to it)",
                self.stage
            ))
        })
    }

    fn recv(&mut self, from: usize) -> Result<Message> {
        self.from[from].recv().map_err(|_| {
            Error::Model(format!(
                "pipeline stage {from} has stopped (stage {} was waiting for it)",
                self.stage
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_arrive_in_order_and_a_gone_stage_is_an_error() {
        let mut t = connect(3);
        let mut c = t.pop().unwrap();
        let b = t.pop().unwrap();
        let mut a = t.pop().unwrap();
        for i in 0..5 {
            a.send(2, Message::Logits(vec![i as f32])).unwrap();
        }
        for i in 0..5 {
            assert_eq!(c.recv(0).unwrap(), Message::Logits(vec![i as f32]));
        }
        assert_eq!((a.stage(), c.n_stages()), (0, 3));
        drop(b);
        let e = c.recv(1).unwrap_err().to_string();
        assert!(e.contains("stage 1 has stopped"), "{e}");
    }
}
