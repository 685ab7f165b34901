//! The key/value cache: keys and values of every past position, per layer and KV head. A pipeline
//! stage holds the cache of its own layers only.
//!
//! Layout `[layer][kv head][position][head_dim]`: one head's keys (and values) for every position
//! are one contiguous run, which attention reads front to back (the hardware prefetcher follows
//! it; position-major rows made each head's read a stride of a third of a row).
//!
//! Stored in f16 by default, as llama.cpp does: a decode step reads the whole cache of every layer
//! from memory, and half the bytes is half that time. [`KvType::F32`] keeps full precision (the
//! exact reference path uses it).

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};

use super::config::Config;

/// The element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F16,
    F32,
}

impl KvType {
    /// Bytes per stored value.
    pub fn size(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }

    /// Bytes of keys and values per position and layer.
    pub fn bytes_per_position(self, c: &Config) -> usize {
        2 * self.size() * c.kv_dim()
    }
}

#[derive(Debug, Clone)]
enum Store {
    F16 { k: Vec<f16>, v: Vec<f16> },
    F32 { k: Vec<f32>, v: Vec<f32> },
}

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Positions the cache can hold.
    pub capacity: usize,
    head_dim: usize,
    n_kv_head: usize,
    /// The layers this cache holds (all of them, except in a pipeline stage).
    layers: std::ops::Range<usize>,
    store: Store,
}

/// One KV head's keys and values for positions `0..n`, `n × head_dim` values each, contiguous.
#[derive(Debug, Clone, Copy)]
pub enum HeadKv<'a> {
    F16 { k: &'a [f16], v: &'a [f16] },
    F32 { k: &'a [f32], v: &'a [f32] },
}

impl KvCache {
    pub fn new(c: &Config, capacity: usize, ty: KvType) -> Result<KvCache> {
        Self::for_layers(c, capacity, 0..c.n_layer, ty)
    }

    /// A cache for `layers` only (a pipeline stage's share of the model).
    pub fn for_layers(
        c: &Config,
        capacity: usize,
        layers: std::ops::Range<usize>,
        ty: KvType,
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
        let store = match ty {
            KvType::F16 => Store::F16 {
                k: vec![f16::ZERO; n],
                v: vec![f16::ZERO; n],
            },
            KvType::F32 => Store::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
        };
        Ok(KvCache {
            capacity,
            head_dim: c.head_dim,
            n_kv_head: c.n_head_kv,
            layers,
            store,
        })
    }

    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F16 { .. } => KvType::F16,
            Store::F32 { .. } => KvType::F32,
        }
    }

    /// Bytes held.
    pub fn n_bytes(&self) -> usize {
        let n = self.layers.len() * self.capacity * self.n_kv_head * self.head_dim;
        2 * n * self.kv_type().size()
    }

    /// The layers this cache holds.
    pub fn layers(&self) -> std::ops::Range<usize> {
        self.layers.clone()
    }

    /// Where head `h`'s run for `layer` starts.
    fn head_start(&self, layer: usize, h: usize) -> usize {
        ((layer - self.layers.start) * self.n_kv_head + h) * self.capacity * self.head_dim
    }

    /// Keys and values of `layer`'s KV head `h` for positions `0..n`.
    pub fn head(&self, layer: usize, h: usize, n: usize) -> HeadKv<'_> {
        let start = self.head_start(layer, h);
        let r = start..start + n * self.head_dim;
        match &self.store {
            Store::F16 { k, v } => HeadKv::F16 {
                k: &k[r.clone()],
                v: &v[r],
            },
            Store::F32 { k, v } => HeadKv::F32 {
                k: &k[r.clone()],
                v: &v[r],
            },
        }
    }

    /// Writes keys and values of `n = k.len() / kv_dim` positions from `pos` on (`k` and `v` hold
    /// one row of all KV heads per position).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let kv_dim = self.n_kv_head * hd;
        let n = k.len() / kv_dim;
        assert!(pos + n <= self.capacity, "KV cache overflow");
        for h in 0..self.n_kv_head {
            let at = self.head_start(layer, h) + pos * hd;
            for t in 0..n {
                let src = t * kv_dim + h * hd..t * kv_dim + (h + 1) * hd;
                let dst = at + t * hd..at + (t + 1) * hd;
                match &mut self.store {
                    Store::F16 { k: kc, v: vc } => {
                        kc[dst.clone()].convert_from_f32_slice(&k[src.clone()]);
                        vc[dst].convert_from_f32_slice(&v[src]);
                    }
                    Store::F32 { k: kc, v: vc } => {
                        kc[dst.clone()].copy_from_slice(&k[src.clone()]);
                        vc[dst].copy_from_slice(&v[src]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            arch: super::super::config::Arch::Llama,
            n_layer: 3,
            n_embd: 32,
            n_ff: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 8,
            n_vocab: 10,
            n_ctx_train: 64,
            rms_eps: 1e-5,
            rope_theta: 10000.0,
            rope_style: super::super::config::RopeStyle::Normal,
        }
    }

    /// Values written for a stage's layers come back per head, in position order, rounded to the
    /// cache's type.
    #[test]
    fn stored_rows_come_back_per_head() {
        let c = config();
        let (hd, kvd) = (c.head_dim, c.kv_dim());
        for ty in [KvType::F16, KvType::F32] {
            let mut kv = KvCache::for_layers(&c, 5, 1..3, ty).unwrap();
            assert_eq!(kv.n_bytes(), 2 * 2 * 5 * kvd * ty.size(), "two layers");
            let k: Vec<f32> = (0..2 * kvd).map(|i| i as f32 + 0.25).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            kv.store(2, 1, &k, &v);
            for h in 0..c.n_head_kv {
                let (gk, gv): (Vec<f32>, Vec<f32>) = match kv.head(2, h, 3) {
                    HeadKv::F16 { k, v } => (
                        k.iter().map(|x| x.to_f32()).collect(),
                        v.iter().map(|x| x.to_f32()).collect(),
                    ),
                    HeadKv::F32 { k, v } => (k.to_vec(), v.to_vec()),
                };
                assert!(gk[..hd].iter().all(|&x| x == 0.0), "position 0 untouched");
                for t in 0..2 {
                    for i in 0..hd {
                        let want = k[t * kvd + h * hd + i];
                        let want = match ty {
                            KvType::F16 => f16::from_f32(want).to_f32(),
                            KvType::F32 => want,
                        };
                        assert_eq!(gk[(t + 1) * hd + i], want);
                        assert_eq!(gv[(t + 1) * hd + i], -want);
                    }
                }
            }
        }
    }
}
