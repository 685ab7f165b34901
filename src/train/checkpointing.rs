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
        let segs = self.segments(c.n_layer);
        let tape = LayerTape::bytes_for(c, n);
        let longest = segs.iter().map(|s| s.len()).max().unwrap_or(0);
        match self {
            Checkpoint::None => c.n_layer * tape,
            _ => segs.len() * 4 * n * c.n_embd + longest * tape,
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
    let c = &t.model.config;
    let segs = mode.segments(c.n_layer);
    let mut x = t.embed(&tokens[..n])?;
    let mut inputs: Vec<Vec<f32>> = Vec::with_capacity(segs.len());
    let mut last_tapes = Vec::new();
    let mut stats = PassStats::default();
    let x_len = x.len();
    let input_bytes = |k: usize| k * 4 * x_len;
    let mut held = 0usize;
    for (i, seg) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let keep = last || mode == Checkpoint::None;
        if mode != Checkpoint::None {
            inputs.push(x.clone());
        }
        let tapes = t.forward_layers(seg.clone(), &mut x, keep)?;
        held += tapes.iter().map(LayerTape::bytes).sum::<usize>();
        stats.peak_activation_bytes = stats
            .peak_activation_bytes
            .max(held + input_bytes(inputs.len()));
        if keep {
            last_tapes.push(tapes);
        }
    }
    let mut dx = vec![0.0f32; x.len()];
    stats.loss = t.head_loss(&x, &tokens[1..], weight, Some(&mut dx))?;
    drop(x);
    for (i, seg) in segs.iter().enumerate().rev() {
        let tapes = match last_tapes.pop() {
            Some(tp) if mode == Checkpoint::None || i + 1 == segs.len() => tp,
            other => {
                debug_assert!(other.is_none());
                let start = std::time::Instant::now();
                let mut xs = inputs[i].clone();
                stats.recomputed_layers += seg.len();
                let tp = t.recompute_layers(seg.clone(), &mut xs)?;
                stats.recompute_secs += start.elapsed().as_secs_f64();
                let bytes = tp.iter().map(LayerTape::bytes).sum::<usize>();
                stats.peak_activation_bytes =
                    stats.peak_activation_bytes.max(bytes + input_bytes(i + 1));
                tp
            }
        };
        t.backward_layers(seg.clone(), &tapes, &mut dx, grads)?;
        drop(tapes);
        inputs.truncate(i);
    }
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
