//! Gradient checkpointing at layer level (Chen et al. 2016): the layers are cut into segments; the
//! forward pass keeps only each segment's input, and the backward pass re-runs a segment's forward
//! (keeping its tapes this time) just before going back through it. `sqrt` uses segments of
//! ⌈√L⌉ layers, so about 2√L layer-sized buffers are alive at once instead of L.
//!
//! The last segment's tapes are kept from the forward pass (the backward starts there), so it is
//! never recomputed; a recomputation skips the output projection of its segment's last layer,
//! whose result (the next segment's input) is already kept. Recomputation is exact ([`crate::model::dense`]), so every mode gives the same
//! gradients bit for bit.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::model::backward::{LayerTape, Trainable};
use crate::model::{Config, Lora};

/// Which layer inputs the forward pass keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    /// Keep every layer's tape: no recomputation, most memory.
    None,
    /// Segments of this many layers (`every` = 1 layer per segment).
    Every(usize),
    /// Segments of ⌈√L⌉ layers.
    Sqrt,
}

impl Checkpoint {
    /// Parses `none`, `every`, `every:N` or `sqrt`.
    pub fn parse(s: &str) -> Result<Checkpoint> {
        match s {
            "none" => Ok(Checkpoint::None),
            "every" => Ok(Checkpoint::Every(1)),
            "sqrt" => Ok(Checkpoint::Sqrt),
            _ => match s.strip_prefix("every:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Ok(Checkpoint::Every(n)),
                _ => Err(Error::Invalid(format!(
                    "--checkpoint {s:?}: expected none, every, every:N (N ≥ 1) or sqrt"
                ))),
            },
        }
    }

    pub fn name(self) -> String {
        match self {
            Checkpoint::None => "none".into(),
            Checkpoint::Every(1) => "every".into(),
            Checkpoint::Every(n) => format!("every:{n}"),
            Checkpoint::Sqrt => "sqrt".into(),
        }
    }

    /// Layers per segment for a model of `n_layer` layers.
    pub fn segment_len(self, n_layer: usize) -> usize {
        match self {
            Checkpoint::None => n_layer.max(1),
            Checkpoint::Every(n) => n.min(n_layer.max(1)),
            Checkpoint::Sqrt => ((n_layer as f64).sqrt().ceil() as usize).max(1),
        }
    }

    /// The segments, in order.
    pub fn segments(self, n_layer: usize) -> Vec<Range<usize>> {
        let k = self.segment_len(n_layer);
        (0..n_layer)
            .step_by(k)
            .map(|s| s..(s + k).min(n_layer))
            .collect()
    }

    /// Bytes of activations held at the peak of a step of `n` tokens: the segment inputs kept
    /// plus the tapes of one segment (all layers' tapes for `None`).
    pub fn activation_bytes(self, c: &Config, n: usize) -> usize {
        let (tape, x) = (LayerTape::bytes_for(c, n), 4 * n * c.n_embd);
        self.stash_bytes(c.n_layer, tape, x)
            .max(self.recompute_bytes(c.n_layer, tape, x))
    }

    /// Bytes one sequence's [`Stash`] holds over `n_layer` layers between its forward and its
    /// backward, with `tape` bytes of tape per layer and `x` bytes of hidden states: every tape
    /// without checkpointing, else every segment's input and the last segment's tapes.
    pub fn stash_bytes(self, n_layer: usize, tape: usize, x: usize) -> usize {
        self.stash_bytes_keeping(n_layer, tape, x, true)
    }

    /// [`Checkpoint::stash_bytes`], keeping the last segment's tapes or not (see
    /// [`Stash::forward_keeping`]).
    pub fn stash_bytes_keeping(self, n_layer: usize, tape: usize, x: usize, last: bool) -> usize {
        let segs = self.segments(n_layer);
        match self {
            Checkpoint::None => n_layer * tape,
            _ if !last => segs.len() * x,
            _ => segs.len() * x + segs.last().map_or(0, |s| s.len()) * tape,
        }
    }

    /// The most bytes a [`Stash::backward`] over `n_layer` layers holds while re-running a
    /// segment: the inputs still kept and the longest segment's tapes (0 without checkpointing).
    pub fn recompute_bytes(self, n_layer: usize, tape: usize, x: usize) -> usize {
        let segs = self.segments(n_layer);
        match self {
            Checkpoint::None => 0,
            _ => segs.len() * x + segs.iter().map(|s| s.len()).max().unwrap_or(0) * tape,
        }
    }
}

/// What one forward + backward pass measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassStats {
    /// Weighted loss (as [`Trainable::head_loss`] returns it).
    pub loss: f64,
    /// Layers whose forward ran twice.
    pub recomputed_layers: usize,
    /// The most bytes of tapes and segment inputs alive at once.
    pub peak_activation_bytes: usize,
    /// Seconds spent re-running segments' forward passes (the price of checkpointing).
    pub recompute_secs: f64,
}

/// What the forward pass of one sequence through a range of layers leaves for its backward
/// pass: the input of every segment (when checkpointing) and the tapes kept (every segment's
/// without checkpointing, else the last segment's).
pub struct Stash {
    segs: Vec<Range<usize>>,
    mode: Checkpoint,
    inputs: Vec<Vec<f32>>,
    tapes: Vec<Vec<LayerTape>>,
    /// Bytes held now (inputs and tapes).
    pub bytes: usize,
}

impl Stash {
    /// Runs `layers` on `x` in place, keeping what `mode` keeps (segments of `mode`'s length
    /// within `layers`, so a pipeline stage checkpoints inside its own layers).
    pub fn forward(
        t: &Trainable,
        layers: Range<usize>,
        mode: Checkpoint,
        x: &mut [f32],
    ) -> Result<Stash> {
        Self::forward_keeping(t, layers, mode, x, true)
    }

    /// [`Stash::forward`]; with `keep_last` false a checkpointing stash keeps the last segment's
    /// input instead of its tapes, and the backward re-runs it like the others. For a pipeline
    /// stage that holds several micro-batches at once: each would keep a segment's tapes that
    /// its backward needs only briefly, where re-running costs one set of tapes at a time.
    pub fn forward_keeping(
        t: &Trainable,
        layers: Range<usize>,
        mode: Checkpoint,
        x: &mut [f32],
        keep_last: bool,
    ) -> Result<Stash> {
        let segs: Vec<Range<usize>> = mode
            .segments(layers.len())
            .into_iter()
            .map(|s| s.start + layers.start..s.end + layers.start)
            .collect();
        let mut st = Stash {
            inputs: Vec::with_capacity(segs.len()),
            tapes: Vec::new(),
            bytes: 0,
            segs,
            mode,
        };
        for (i, seg) in st.segs.iter().enumerate() {
            let keep = (keep_last && i + 1 == st.segs.len()) || mode == Checkpoint::None;
            if mode != Checkpoint::None {
                st.inputs.push(x.to_vec());
                st.bytes += 4 * x.len();
            }
            let tapes = t.forward_layers(seg.clone(), x, keep)?;
            st.bytes += tapes.iter().map(LayerTape::bytes).sum::<usize>();
            if keep {
                st.tapes.push(tapes);
            }
        }
        Ok(st)
    }

    /// Back through the stashed layers: `dx` holds the gradient at their output and leaves
    /// holding it at their input; adapter gradients are added to `grads`.
    pub fn backward(
        mut self,
        t: &Trainable,
        dx: &mut [f32],
        grads: &mut Lora,
    ) -> Result<StashBackward> {
        let mut out = StashBackward::default();
        let x_bytes = 4 * dx.len();
        let n = self.segs.len();
        for (i, seg) in self.segs.iter().enumerate().rev() {
            let tapes = match self.tapes.pop() {
                Some(tp) => {
                    debug_assert!(self.mode == Checkpoint::None || i + 1 == n);
                    tp
                }
                None => {
                    let start = std::time::Instant::now();
                    let mut xs = self.inputs[i].clone();
                    out.recomputed_layers += seg.len();
                    let tp = t.recompute_layers(seg.clone(), &mut xs)?;
                    out.recompute_secs += start.elapsed().as_secs_f64();
                    let bytes = tp.iter().map(LayerTape::bytes).sum::<usize>();
                    out.peak_bytes = out.peak_bytes.max(bytes + (i + 1) * x_bytes);
                    tp
                }
            };
            t.backward_layers(seg.clone(), &tapes, dx, grads)?;
            drop(tapes);
            self.inputs.truncate(i);
        }
        Ok(out)
    }
}

/// What one [`Stash::backward`] cost.
#[derive(Default, Clone, Copy, Debug)]
pub struct StashBackward {
    /// Layers whose forward pass was re-run.
    pub recomputed_layers: usize,
    /// The most bytes alive at once while recomputing (the stash's inputs and one segment's
    /// tapes).
    pub peak_bytes: usize,
    /// Seconds spent recomputing.
    pub recompute_secs: f64,
}

/// Loss and gradients for one sequence: `tokens` (n + 1 ids) predicts `tokens[1..]` with the
/// per-position `weight`s; adapter gradients are added to `grads`.
pub fn loss_and_grad(
    t: &Trainable,
    tokens: &[u32],
    weight: &[f32],
    mode: Checkpoint,
    grads: &mut Lora,
) -> Result<PassStats> {
    if tokens.len() < 2 {
        return Err(Error::Invalid(
            "a training sequence needs at least 2 tokens".into(),
        ));
    }
    let n = tokens.len() - 1;
    let mut x = t.embed(&tokens[..n])?;
    let stash = Stash::forward(t, 0..t.model.config.n_layer, mode, &mut x)?;
    let mut stats = PassStats {
        peak_activation_bytes: stash.bytes,
        ..PassStats::default()
    };
    let mut dx = vec![0.0f32; x.len()];
    stats.loss = t.head_loss(&x, &tokens[1..], weight, Some(&mut dx))?;
    drop(x);
    let back = stash.backward(t, &mut dx, grads)?;
    stats.recomputed_layers = back.recomputed_layers;
    stats.recompute_secs = back.recompute_secs;
    stats.peak_activation_bytes = stats.peak_activation_bytes.max(back.peak_bytes);
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_cut_segments() {
        assert_eq!(Checkpoint::parse("none").unwrap(), Checkpoint::None);
        assert_eq!(Checkpoint::parse("every").unwrap(), Checkpoint::Every(1));
        assert_eq!(Checkpoint::parse("every:4").unwrap(), Checkpoint::Every(4));
        assert_eq!(Checkpoint::parse("sqrt").unwrap(), Checkpoint::Sqrt);
        for bad in ["every:0", "every:x", "some", ""] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Checkpoint::Sqrt.segments(30).len(), 5);
        assert_eq!(Checkpoint::Sqrt.segments(30)[4], 24..30);
        assert_eq!(Checkpoint::Every(4).segments(10), vec![0..4, 4..8, 8..10]);
        assert_eq!(Checkpoint::None.segments(3), vec![0..3]);
        assert_eq!(Checkpoint::Every(1).segments(2), vec![0..1, 1..2]);
    }
}
