//! The key/value cache: keys and values of every past position, per layer, in f32. A pipeline
//! stage holds the cache of its own layers only.

use crate::error::{Error, Result};

use super::config::Config;

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Positions the cache can hold.
    pub capacity: usize,
    kv_dim: usize,
    /// The layers this cache holds (all of them, except in a pipeline stage).
    layers: std::ops::Range<usize>,
    /// `[layer][pos][kv_dim]`
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    pub fn new(c: &Config, capacity: usize) -> Result<KvCache> {
        Self::for_layers(c, capacity, 0..c.n_layer)
    }

    /// A cache for `layers` only (a pipeline stage's share of the model).
    pub fn for_layers(
        c: &Config,
        capacity: usize,
        layers: std::ops::Range<usize>,
    ) -> Result<KvCache> {
        if layers.start > layers.end || layers.end > c.n_layer {
            return Err(Error::Invalid(format!(
                "layers {}..{} are not inside the model's {} layers",
                layers.start, layers.end, c.n_layer
            )));
        }
        let n = layers
            .len()
            .checked_mul(capacity)
            .and_then(|v| v.checked_mul(c.kv_dim()))
            .filter(|&n| n <= 1 << 36)
            .ok_or_else(|| Error::Invalid(format!("context of {capacity} is too large")))?;
        Ok(KvCache {
            capacity,
            kv_dim: c.kv_dim(),
            layers,
            k: vec![0.0; n],
            v: vec![0.0; n],
        })
    }

    /// Bytes held.
    pub fn n_bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * 4
    }

    /// The layers this cache holds.
    pub fn layers(&self) -> std::ops::Range<usize> {
        self.layers.clone()
    }

    fn range(&self, layer: usize, pos: usize, n: usize) -> std::ops::Range<usize> {
        let start = ((layer - self.layers.start) * self.capacity + pos) * self.kv_dim;
        start..start + n * self.kv_dim
    }

    /// Keys of `layer` for positions `0..n`.
    pub fn keys(&self, layer: usize, n: usize) -> &[f32] {
        &self.k[self.range(layer, 0, n)]
    }

    pub fn values(&self, layer: usize, n: usize) -> &[f32] {
        &self.v[self.range(layer, 0, n)]
    }

    /// Writes keys and values of `n = k.len() / kv_dim` positions from `pos` on.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let r = self.range(layer, pos, k.len() / self.kv_dim);
        self.k[r.clone()].copy_from_slice(k);
        self.v[r].copy_from_slice(v);
    }
}
