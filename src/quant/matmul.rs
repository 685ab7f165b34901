//! Matrix products of packed weight matrices with activations, rows split across threads.

use std::sync::Arc;

use super::activation::{Q8Acts, Q8Row};
use super::dequant::dequantize_row;
use super::kernels;
use super::kernels::panel::{self, PanelActs, UnpackedRows};
use super::GgmlType;
use crate::error::{Error, Result};
use crate::parallel::DisjointMut;

/// Bytes owned by something that outlives the matrix: a memory-mapped model file or a buffer.
#[derive(Clone)]
pub struct WeightBytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
}

impl WeightBytes {
    /// A window of `owner`'s bytes; errors when it does not lie inside.
    pub fn new(
        owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
        start: usize,
        len: usize,
    ) -> Result<Self> {
        let total = (*owner).as_ref().len();
        if start.checked_add(len).is_none_or(|end| end > total) {
            return Err(Error::Invalid(format!(
                "weight bytes {start}..+{len} outside a buffer of {total}"
            )));
        }
        Ok(WeightBytes { owner, start, len })
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        WeightBytes {
            owner: Arc::new(v),
            start: 0,
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

/// A weight matrix of `rows` × `cols` stored row by row in a ggml type (y = W x, one row per output).
#[derive(Clone)]
pub struct QMatrix {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    bytes: WeightBytes,
    row_bytes: usize,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QMatrix({} {} {}x{})",
            self.name, self.ty, self.rows, self.cols
        )
    }
}

impl QMatrix {
    pub fn new(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: WeightBytes,
    ) -> Result<Self> {
        let row_bytes = ty.row_bytes(cols)?;
        if rows.checked_mul(row_bytes) != Some(bytes.len) {
            return Err(Error::Model(format!(
                "{name}: {} bytes do not hold {rows}x{cols} {ty} weights",
                bytes.len
            )));
        }
        Ok(QMatrix {
            name: name.to_string(),
            ty,
            rows,
            cols,
            bytes,
            row_bytes,
        })
    }

    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    pub fn n_bytes(&self) -> usize {
        self.bytes.len
    }

    pub fn row(&self, r: usize) -> &[u8] {
        &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` as f32 values.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        dequantize_row(self.ty, self.row(r), out)
    }

    /// Whether this matrix is computed on 8-bit activations (then [`Input::q8`] must be filled).
    pub fn wants_q8(&self) -> bool {
        // pq rows of any length pad their last chunk with zero codes, as the activations pad theirs.
        kernels::has_q8_kernel(self.ty)
            && (matches!(self.ty, GgmlType::Pq(_)) || self.cols.is_multiple_of(32))
    }
}

/// The activations a product reads: `n` rows of `cols` floats and, when given, the same rows
/// quantized to 8 bits for weights that have an 8-bit kernel. Without `q8`, every product is
/// computed in f32 on dequantized weights (exact but slower: the reference path).
pub struct Input<'a> {
    pub x: &'a [f32],
    pub q8: Option<&'a Q8Acts>,
    pub n: usize,
}

/// Computes several products over the same input in one parallel region (e.g. Q, K and V):
/// for each `(w, out)`, `out[t * w.rows + r] = W[r] · x[t]` for the `input.n` tokens.
pub fn matmul_many(jobs: &mut [(&QMatrix, &mut [f32])], input: &Input) {
    let n = input.n;
    let isa = kernels::isa();
    let threads = crate::parallel::threads();
    let mut outs = Vec::with_capacity(jobs.len());
    for (w, out) in jobs.iter_mut() {
        assert_eq!(out.len(), n * w.rows, "{}: output size", w.name);
        assert_eq!(input.x.len(), n * w.cols, "{}: input size", w.name);
        outs.push(DisjointMut::new(out));
    }
    let tiles = guided_tiles(jobs.iter().map(|(w, _)| (w.rows, w.row_bytes * n)), threads);
    let mats: Vec<&QMatrix> = jobs.iter().map(|(w, _)| *w).collect();
    let q8_rows: Vec<Q8Row> = match input.q8 {
        Some(q8) if mats.iter().any(|w| w.wants_q8()) => (0..n).map(|t| q8.row(t)).collect(),
        _ => Vec::new(),
    };
    let use_panel = |w: &QMatrix| {
        input.q8.is_some() && n >= PANEL_MIN_TOKENS && w.wants_q8() && panel::supports(isa, w.ty)
    };
    // The caller's panel buffer is reused across calls: a fresh one per product would be a
    // zero-filled mapping of a few hundred KiB, ~150 times per micro-batch.
    PANEL_ACTS.with_borrow_mut(|panel_acts| {
        if let Some(q8) = input.q8.filter(|_| mats.iter().any(|w| use_panel(w))) {
            panel_acts.pack(q8, panel::panel_tokens(isa));
        }
        let panel_acts = &*panel_acts;
        crate::parallel::for_each(tiles.len(), &|i| {
            let (j, r0, r1) = tiles[i];
            let w = mats[j];
            let out = outs[j];
            if use_panel(w) {
                UNPACKED.with_borrow_mut(|u| {
                    let bytes = &w.bytes()[r0 * w.row_bytes..r1 * w.row_bytes];
                    u.unpack(w.ty, bytes, r1 - r0, w.cols);
                    // SAFETY: the tile writes out[t * rows + r] for its own rows r0..r1 only, all in
                    // bounds; `isa` is the detected (or a lower, forced) instruction set.
                    unsafe {
                        panel::gemm(isa, u, 0..r1 - r0, panel_acts, out.ptr().add(r0), w.rows)
                    };
                });
            } else if w.wants_q8() && input.q8.is_some() {
                let bytes = &w.bytes()[r0 * w.row_bytes..r1 * w.row_bytes];
                // SAFETY: the tile writes out[t * rows + r] for its own rows r0..r1 only, all in bounds.
                unsafe {
                    kernels::gemm_tile(
                        isa,
                        w.ty,
                        bytes,
                        w.row_bytes,
                        &q8_rows,
                        out.ptr().add(r0),
                        w.rows,
                    )
                };
            } else if kernels::has_float_kernel(w.ty) && w.cols > 0 {
                let bytes = &w.bytes()[r0 * w.row_bytes..r1 * w.row_bytes];
                // SAFETY: as above.
                unsafe {
                    kernels::gemm_tile_float(
                        isa,
                        w.ty,
                        bytes,
                        w.cols,
                        input.x,
                        out.ptr().add(r0),
                        w.rows,
                    )
                };
            } else {
                let mut wrow = vec![0.0f32; w.cols];
                for r in r0..r1 {
                    w.dequantize_row(r, &mut wrow)
                        .expect("matrix types are checked when the model is loaded");
                    for t in 0..n {
                        let v = dot_f32(&wrow, &input.x[t * w.cols..(t + 1) * w.cols]);
                        // SAFETY: as above.
                        unsafe { *out.ptr().add(t * w.rows + r) = v };
                    }
                }
            }
        });
    });
}

/// Splits the rows of several matrices (`(rows, bytes of work per row)` each) into tiles
/// `(matrix, r0, r1)` for threads that claim them in order: each tile takes a share of the rows
/// still left, so the first tiles are large (few claims) and the last small, and the threads finish
/// a loop close together. Equal tiles left a thread idle for up to one tile's time (~7 µs for the
/// FFN's gate and up at decode) at each of the ~150 loops of a token. Tiles are multiples of 4 rows
/// (the decode kernels take four rows at a time) and hold at least [`MIN_TILE_BYTES`] where the
/// matrix allows, so that a claim's cost stays small beside its work.
fn guided_tiles(
    jobs: impl Iterator<Item = (usize, usize)> + Clone,
    threads: usize,
) -> Vec<(usize, usize, usize)> {
    let mut left: usize = jobs.clone().map(|(rows, _)| rows).sum();
    let mut tiles = Vec::new();
    for (j, (rows, row_bytes)) in jobs.enumerate() {
        // Tiny rows (a small test model) would ask for more than the cap.
        let min = MIN_TILE_BYTES
            .div_ceil(row_bytes.max(1))
            .next_multiple_of(4)
            .min(MAX_TILE_ROWS);
        let mut r0 = 0;
        while r0 < rows {
            let share = left.div_ceil(2 * threads);
            let size = share.clamp(min, MAX_TILE_ROWS).next_multiple_of(4);
            let r1 = (r0 + size).min(rows);
            tiles.push((j, r0, r1));
            left -= r1 - r0;
            r0 = r1;
        }
    }
    tiles
}

/// The least work a tile is cut to (see [`guided_tiles`]): ~1 µs of one thread's streaming.
const MIN_TILE_BYTES: usize = 8 << 10;
/// The most rows a tile takes: the prompt's panel GEMM unpacks a tile's rows into a buffer.
const MAX_TILE_ROWS: usize = 256;

/// Products of at least this many tokens use the panel GEMM where it supports the weight type.
const PANEL_MIN_TOKENS: usize = 8;

thread_local! {
    /// Each worker's buffer of weight rows unpacked for the panel GEMM.
    static UNPACKED: std::cell::RefCell<UnpackedRows> = Default::default();
    /// The calling thread's activations rearranged into panels.
    static PANEL_ACTS: std::cell::RefCell<PanelActs> = Default::default();
}

/// `out = W x` for one matrix.
pub fn matmul(w: &QMatrix, input: &Input, out: &mut [f32]) {
    matmul_many(&mut [(w, out)], input)
}

/// Dot product of two f32 slices, with 8 independent accumulators so it vectorises.
#[inline(always)]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiles cover every row of every matrix once, in order; each is a multiple of 4 rows (but at a
    /// matrix's end), at most `MAX_TILE_ROWS`, and at least `MIN_TILE_BYTES` of work unless the
    /// matrix ends first; and they shrink towards the end of the loop.
    #[test]
    fn guided_tiles_cover_every_row_and_shrink() {
        for threads in [1usize, 2, 3, 8] {
            for jobs in [
                vec![(576usize, 360usize), (192, 360), (192, 360)],
                vec![(1536, 360), (1536, 360)],
                vec![(49152, 612)],
                vec![(5, 100_000), (1, 10), (0, 10), (7, 3)],
            ] {
                let tiles = guided_tiles(jobs.iter().copied(), threads);
                let mut next = vec![0usize; jobs.len()];
                let mut last_job = 0;
                for &(j, r0, r1) in &tiles {
                    assert!(j >= last_job, "jobs in order");
                    last_job = j;
                    let (rows, row_bytes) = jobs[j];
                    assert_eq!(r0, next[j], "{jobs:?}: tiles in order, no gap");
                    assert!(r1 > r0 && r1 <= rows);
                    let n = r1 - r0;
                    assert!(n <= MAX_TILE_ROWS);
                    if r1 < rows {
                        assert_eq!(n % 4, 0, "{jobs:?}: tile of {n} rows");
                        assert!(n * row_bytes >= MIN_TILE_BYTES.min(MAX_TILE_ROWS * row_bytes));
                    }
                    next[j] = r1;
                }
                for (j, &(rows, _)) in jobs.iter().enumerate() {
                    assert_eq!(next[j], rows, "{jobs:?}: every row of job {j}");
                }
                // The gate and up of the FFN at decode: the last tile is far smaller than the
                // first.
                if jobs[0] == (1536, 360) && threads == 2 {
                    let first = tiles[0].2 - tiles[0].1;
                    let last = tiles.last().map(|t| t.2 - t.1).unwrap();
                    assert!(last * 4 <= first, "first {first} rows, last {last}");
                }
            }
        }
    }
}
