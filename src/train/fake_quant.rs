//! Quantization-aware training: the adapters are trained merged into their base weight and
//! fake-quantized in the forward pass, `W_eff = Q(W + s·B·A)`, where `Q` rounds onto the base
//! tensor's own grid: each group keeps its format (bits, group size, symmetry) and its scale `d`
//! and minimum `m`, and every value takes the nearest code, as [`quantize_pq_row_on_grid`] stores
//! it. That is exactly what `pare merge` writes for such adapters ([`crate::train::merge`]), and at
//! the start (`B = 0`) it is exactly the base, so training starts from the model it adapts.
//!
//! `Q` is applied once per optimizer step to each adapted matrix ([`FakeQuant::new`]): the result
//! is kept in the base's packed format and dequantized by every forward pass and recomputation of
//! that step, like any frozen weight. (The error-minimising search is for export; re-running it on
//! every product made a step ~9× slower than plain LoRA.)
//!
//! The rounding has no useful derivative, so the backward pass uses a straight-through estimator:
//!
//! - `ste`: the gradient passes through `Q` unchanged;
//! - `clipped`: it passes only where the value lies inside its group's representable range (half
//!   a step beyond the extreme codes), since outside it a small change does not change the output;
//! - `lsq`: LSQ (Esser et al. 2020) with LSQ+'s learned offsets (Bhalgat et al. 2020): the grid
//!   itself is trained. With `u = (v − m)/d` and `q` the level taken (`d·q + m` is the value),
//!   `∂Q/∂v = 1` inside `[q_min, q_max]` and 0 outside; `∂Q/∂d = q − u` inside and the clamped level
//!   outside; `∂Q/∂m = 0` inside and 1 outside (asymmetric formats only). The step-size gradients
//!   are scaled by LSQ's `1/√(n·Q_p)` (`n` values per group, `Q_p` the largest positive level), which
//!   keeps them commensurate with the adapters' in the clipped global norm. These are the exact
//!   derivatives of `d·(clamp(u) + r) + m` with the rounding residual `r` held fixed (PyTorch's
//!   `(round(x) − x).detach() + x`), which tests/train_grad.rs checks by finite differences.
//!
//! Learned grids are saved with the adapters ([`save_state`]); `pare merge` stores them as the
//! groups' f16 scales and minimums instead of searching new ones.

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use half::f16;
use serde_json::json;

use crate::error::{Error, Result};
use crate::format::safetensors::{self as st, Dtype, LazyTensor, SafetensorsFile};
use crate::model::backward::MergedWeight;
use crate::model::dense;
use crate::model::lora::{Adapter, Lora, Target};
use crate::quant::format;
use crate::quant::matmul::{QMatrix, WeightBytes};
use crate::quant::pq::Pq;
use crate::quant::quantize::{quantize_pq_row_on_grid, quantize_rows, Options};

/// `--qat`: how (and whether) the adapters see quantization while training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QatMode {
    /// Adapters unmerged, in f32 beside the quantized base (plain LoRA).
    None,
    Ste,
    Clipped,
    /// Straight-through with learned per-group step sizes (and offsets).
    Lsq,
}

impl QatMode {
    pub fn parse(s: &str) -> Result<QatMode> {
        match s {
            "none" => Ok(QatMode::None),
            "ste" => Ok(QatMode::Ste),
            "clipped" => Ok(QatMode::Clipped),
            "lsq" => Ok(QatMode::Lsq),
            _ => Err(Error::Invalid(format!(
                "--qat {s:?}: expected none, ste, clipped or lsq"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QatMode::None => "none",
            QatMode::Ste => "ste",
            QatMode::Clipped => "clipped",
            QatMode::Lsq => "lsq",
        }
    }
}

/// `--lsq-init`: the grid `lsq` starts learning from when quantization switches on after step 0
/// (`--qat-start`). At step 0 `W + s·B·A = W` lies exactly on the base's own grid, so that grid is
/// used whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GridInit {
    /// The base's own scales and minimums.
    Base,
    /// The error-minimising search's grid for `W + s·B·A` as it stands at the switch: the grid a
    /// merge of plain adapters would choose, so QAT starts from what that merge would write.
    Search,
}

impl GridInit {
    pub fn parse(s: &str) -> Result<GridInit> {
        match s {
            "base" => Ok(GridInit::Base),
            "search" => Ok(GridInit::Search),
            _ => Err(Error::Invalid(format!(
                "--lsq-init {s:?}: expected base or search"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GridInit::Base => "base",
            GridInit::Search => "search",
        }
    }
}

/// The grid of one matrix in a pq format: per group (row after row, [`GroupGrid::groups`] per row)
/// a scale `d` and a minimum `m` (0 in symmetric formats), as the groups' f16 headers store them.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupGrid {
    pub p: Pq,
    pub rows: usize,
    pub cols: usize,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

impl GroupGrid {
    /// Groups per row.
    pub fn groups(&self) -> usize {
        self.cols.div_ceil(self.p.group as usize)
    }

    /// The grid stored in `bytes`: `rows` rows of `cols` values in format `p`.
    pub fn from_bytes(p: Pq, rows: usize, cols: usize, bytes: &[u8]) -> Result<GroupGrid> {
        let rb = p.row_bytes(cols);
        if bytes.len() != rows * rb {
            return Err(Error::Invalid(format!(
                "{} bytes do not hold {rows}x{cols} {} weights",
                bytes.len(),
                p.name()
            )));
        }
        let (mut d, mut m) = (Vec::new(), Vec::new());
        for row in bytes.chunks_exact(rb.max(1)) {
            for (h, _, _) in p.groups(row, cols) {
                let (dd, mm) = p.header(h);
                d.push(dd);
                m.push(mm);
            }
        }
        Ok(GroupGrid {
            p,
            rows,
            cols,
            d,
            m,
        })
    }

    /// The grid of a stored matrix; `None` for float formats (nothing to learn).
    pub fn of_matrix(w: &QMatrix) -> Result<Option<GroupGrid>> {
        Pq::of_ggml(w.ty)
            .map(|p| GroupGrid::from_bytes(p, w.rows, w.cols, w.bytes()))
            .transpose()
    }

    /// `v` (rows × cols) quantized onto this grid, in the format's packed rows; rows spread over
    /// the worker threads.
    pub fn quantize(&self, v: &[f32]) -> Vec<u8> {
        let (k, rb) = (self.groups(), self.p.row_bytes(self.cols));
        let mut out = vec![0u8; self.rows * rb];
        let ptr = crate::parallel::DisjointMut::new(&mut out);
        crate::parallel::for_each(self.rows, &|r| {
            // SAFETY: task r writes only row r's bytes.
            let o = unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(r * rb), rb) };
            let g = r * k..(r + 1) * k;
            let x = &v[r * self.cols..(r + 1) * self.cols];
            quantize_pq_row_on_grid(self.p, x, &self.d[g.clone()], &self.m[g], o);
        });
        out
    }

    /// The learned tensors (d, and m when asymmetric): the optimizer's view.
    fn params_mut(&mut self) -> Vec<&mut Vec<f32>> {
        if self.p.sym {
            vec![&mut self.d]
        } else {
            vec![&mut self.d, &mut self.m]
        }
    }

    fn params(&self) -> Vec<&[f32]> {
        if self.p.sym {
            vec![&self.d]
        } else {
            vec![&self.d, &self.m]
        }
    }
}

/// The grids of the adapted matrices, `[layer][target as usize]`; `None` where the base is a float
/// format (or the matrix has no adapter).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Grids {
    pub layers: Vec<[Option<GroupGrid>; 7]>,
}

impl Grids {
    /// The base's own grids of every matrix `targets` names. Errors on a format pare cannot write
    /// (QAT must produce what a merge can store), and, for `lsq`, on a float base (no grid to learn).
    pub fn of_base(
        model: &crate::model::Model,
        targets: &[Target],
        mode: QatMode,
    ) -> Result<Grids> {
        let mut layers = Vec::new();
        for lw in &model.weights.layers {
            let mut row: [Option<GroupGrid>; 7] = Default::default();
            for &t in targets {
                let w = matrix(lw, t);
                if !crate::quant::quantize::can_quantize(w.ty) {
                    return Err(Error::UnsupportedType(format!(
                        "{}: quantization-aware training needs a base format pare can write, not {}",
                        w.name,
                        format::name(w.ty)
                    )));
                }
                row[t as usize] = GroupGrid::of_matrix(w)?;
                if mode == QatMode::Lsq && row[t as usize].is_none() {
                    return Err(Error::Invalid(format!(
                        "{}: --qat lsq learns the step sizes of a quantized base, but this one is {}",
                        w.name,
                        format::name(w.ty)
                    )));
                }
            }
            layers.push(row);
        }
        Ok(Grids { layers })
    }

    /// The grids the error-minimising search (as `pare merge` runs it on plain adapters) chooses
    /// for `W + s·B·A` of every matrix that has a grid in `self`; same shapes and formats.
    pub fn searched(&self, model: &crate::model::Model, lora: &Lora) -> Result<Grids> {
        let s = lora.scale();
        let mut out = self.clone();
        let mut v = Vec::new();
        for (l, row) in out.layers.iter_mut().enumerate() {
            for t in Target::ALL {
                let Some(g) = row[t as usize].as_mut() else {
                    continue;
                };
                let ad = lora.layers.get(l).and_then(|r| r[t as usize].as_ref());
                let ad = ad.ok_or_else(|| {
                    Error::Invalid(format!(
                        "no adapter for layer {l} {t:?} to search a grid for"
                    ))
                })?;
                let w = matrix(&model.weights.layers[l], t);
                merged(w, ad, s, &mut v)?;
                let mut bytes = vec![0u8; w.n_bytes()];
                quantize_rows(w.ty, &v, w.cols, &Options::default(), &mut bytes)?;
                *g = GroupGrid::from_bytes(g.p, w.rows, w.cols, &bytes)?;
            }
        }
        Ok(out)
    }

    pub fn get(&self, l: usize, t: Target) -> Option<&GroupGrid> {
        self.layers.get(l)?[t as usize].as_ref()
    }

    /// Every learned tensor, in a fixed order (layer, target, d then m).
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.layers
            .iter_mut()
            .flat_map(|l| l.iter_mut().flatten())
            .flat_map(GroupGrid::params_mut)
    }

    pub fn params(&self) -> impl Iterator<Item = &[f32]> {
        self.layers
            .iter()
            .flat_map(|l| l.iter().flatten())
            .flat_map(GroupGrid::params)
    }

    /// Same shapes, all zero (the container for gradients).
    pub fn zeros_like(&self) -> Grids {
        let mut g = self.clone();
        g.zero();
        g
    }

    pub fn zero(&mut self) {
        for gg in self.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()) {
            gg.d.fill(0.0);
            gg.m.fill(0.0);
        }
    }
}

/// The base weight an adapter target sits on.
pub fn matrix(lw: &crate::model::LayerWeights, t: Target) -> &QMatrix {
    match t {
        Target::Q => &lw.wq,
        Target::K => &lw.wk,
        Target::V => &lw.wv,
        Target::O => &lw.wo,
        Target::Gate => &lw.gate,
        Target::Up => &lw.up,
        Target::Down => &lw.down,
    }
}

/// `V = W + s·B·A` (rows × cols).
fn merged(w: &QMatrix, ad: &Adapter, s: f32, out: &mut Vec<f32>) -> Result<()> {
    dense::dequantize(w, out)?;
    let mut delta = vec![0.0f32; w.rows * w.cols];
    ad.delta(s, &mut delta);
    for (o, d) in out.iter_mut().zip(&delta) {
        *o += d;
    }
    Ok(())
}

/// What [`FakeQuant::per_group`] runs on a group: (format, values, d, m, group index).
type GroupFn<'a> = dyn Fn(Pq, &mut [f32], f32, f32, usize) + Sync + 'a;

/// One optimizer step's fake quantizer: the quantized effective weight of every adapted matrix,
/// made once, and (for `lsq`) the gradients of the grids, accumulated by the backward passes.
pub struct FakeQuant<'g> {
    pub mode: QatMode,
    grids: &'g Grids,
    /// `[layer][target]`: `Q(W + s·B·A)` in the base's own format.
    cache: Vec<[Option<QMatrix>; 7]>,
    grid_grads: Mutex<Grids>,
}

impl<'g> FakeQuant<'g> {
    /// Quantizes `W + s·B·A` of every adapter of `lora` onto `grids` (float bases: rounds to their
    /// float format).
    pub fn new(
        model: &crate::model::Model,
        lora: &Lora,
        mode: QatMode,
        grids: &'g Grids,
    ) -> Result<FakeQuant<'g>> {
        let s = lora.scale();
        let mut cache = Vec::with_capacity(lora.layers.len());
        let mut v = Vec::new();
        for (l, layer) in lora.layers.iter().enumerate() {
            let mut row: [Option<QMatrix>; 7] = Default::default();
            for t in Target::ALL {
                let Some(ad) = &layer[t as usize] else {
                    continue;
                };
                let w = matrix(&model.weights.layers[l], t);
                merged(w, ad, s, &mut v)?;
                let bytes = match grids.get(l, t) {
                    Some(g) => g.quantize(&v),
                    None => {
                        let mut b = vec![0u8; w.n_bytes()];
                        quantize_rows(w.ty, &v, w.cols, &Options::default(), &mut b)?;
                        b
                    }
                };
                row[t as usize] = Some(QMatrix::new(
                    &w.name,
                    w.ty,
                    w.rows,
                    w.cols,
                    WeightBytes::from_vec(bytes),
                )?);
            }
            cache.push(row);
        }
        Ok(FakeQuant {
            mode,
            grids,
            cache,
            grid_grads: Mutex::new(grids.zeros_like()),
        })
    }

    /// The gradients of the grids' parameters accumulated so far (`lsq`; zero otherwise).
    pub fn grid_grads(self) -> Grids {
        self.grid_grads
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f(p, values, d, m, group index)` on every group of every row of `v`, with the
    /// grid's f16-rounded `d` and `m` (as stored and used by the forward); rows spread over the
    /// worker threads.
    fn per_group(g: &GroupGrid, v: &mut [f32], f: &GroupFn<'_>) {
        let (cols, k, gs) = (g.cols, g.groups(), g.p.group as usize);
        let ptr = crate::parallel::DisjointMut::new(v);
        crate::parallel::for_each(g.rows, &|r| {
            // SAFETY: task r touches only row r.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.ptr().add(r * cols), cols) };
            for (j, xg) in row.chunks_mut(gs).enumerate() {
                let i = r * k + j;
                let m = if g.p.sym { 0.0 } else { f16_round(g.m[i]) };
                f(g.p, xg, f16_round(g.d[i]), m, i);
            }
        });
    }
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// LSQ's backward for one group of values `v` quantized with scale `d` and minimum `m`: turns
/// `g` = dL/dQ(v) into dL/dv in place and returns (dL/dd, dL/dm) before the gradient scale (see
/// the module documentation).
pub fn lsq_group_backward(p: Pq, v: &[f32], d: f32, m: f32, g: &mut [f32]) -> (f32, f32) {
    let (qlo, qhi) = (p.value(0, 1.0, 0.0), p.value(p.max_code(), 1.0, 0.0));
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (mut gd, mut gm) = (0.0f64, 0.0f64);
    for (gi, &x) in g.iter_mut().zip(v) {
        let u = (x - m) * id;
        let outside = if u < qlo {
            Some(qlo)
        } else if u > qhi {
            Some(qhi)
        } else {
            None
        };
        match outside {
            Some(q) => {
                gd += (*gi * q) as f64;
                gm += *gi as f64;
                *gi = 0.0;
            }
            None => {
                let q = p.value(p.code(x, id, m), 1.0, 0.0);
                gd += (*gi * (q - u)) as f64;
            }
        }
    }
    (gd as f32, gm as f32)
}

/// LSQ's gradient scale for a group of `n` values in format `p`: `1/√(n·Q_p)`.
pub fn lsq_grad_scale(p: Pq, n: usize) -> f32 {
    let qp = p.value(p.max_code(), 1.0, 0.0).max(1.0);
    1.0 / (n as f32 * qp).sqrt()
}

impl MergedWeight for FakeQuant<'_> {
    fn grad_sq(&self, layers: Range<usize>) -> f64 {
        let all = self.grid_grads.lock().unwrap_or_else(|p| p.into_inner());
        all.layers
            .get(layers)
            .into_iter()
            .flatten()
            .flat_map(|l| l.iter().flatten())
            .flat_map(GroupGrid::params)
            .flatten()
            .map(|&v| v as f64 * v as f64)
            .sum()
    }

    fn effective(
        &self,
        layer: usize,
        t: Target,
        _w: &QMatrix,
        _ad: &Adapter,
        _s: f32,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let q = self.cache.get(layer).and_then(|r| r[t as usize].as_ref());
        let q = q.ok_or_else(|| {
            Error::Invalid(format!("no fake-quantized weight for layer {layer} {t:?}"))
        })?;
        dense::dequantize(q, out)
    }

    fn backward(
        &self,
        layer: usize,
        t: Target,
        w: &QMatrix,
        ad: &Adapter,
        s: f32,
        grad: &mut [f32],
    ) -> Result<()> {
        if matches!(self.mode, QatMode::None | QatMode::Ste) {
            return Ok(());
        }
        // Float bases round only to their float format: nothing is clipped, nothing learned.
        let Some(g) = self.grids.get(layer, t) else {
            return Ok(());
        };
        let mut v = Vec::new();
        merged(w, ad, s, &mut v)?;
        if self.mode == QatMode::Clipped {
            // Replace V by its pass-through mask (1 inside the group's range, 0 outside), then
            // multiply it into the gradient.
            Self::per_group(g, &mut v, &|p, xg, d, m, _| {
                let (a, b) = (p.value(0, d, m), p.value(p.max_code(), d, m));
                let (lo, hi) = (a.min(b), a.max(b));
                let half_step = 0.5 * d.abs() * if p.bits == 1 && p.sym { 2.0 } else { 1.0 };
                for x in xg.iter_mut() {
                    *x = f32::from(*x >= lo - half_step && *x <= hi + half_step);
                }
            });
            for (gr, m) in grad.iter_mut().zip(&v) {
                *gr *= m;
            }
            return Ok(());
        }
        // LSQ: per group, dL/dv in place of the gradient and dL/dd, dL/dm into the grid's.
        let (cols, k, gs) = (g.cols, g.groups(), g.p.group as usize);
        let mut gd = vec![0.0f32; g.d.len()];
        let mut gm = vec![0.0f32; g.m.len()];
        {
            let (gdp, gmp) = (
                crate::parallel::DisjointMut::new(&mut gd),
                crate::parallel::DisjointMut::new(&mut gm),
            );
            let gp = crate::parallel::DisjointMut::new(grad);
            Self::per_group(g, &mut v, &|p, xg, d, m, i| {
                let (r, j) = (i / k, i % k);
                let n = xg.len();
                // SAFETY: group i is visited by one task only; its gradient slice and its entries
                // of gd and gm are its own.
                let gg =
                    unsafe { std::slice::from_raw_parts_mut(gp.ptr().add(r * cols + j * gs), n) };
                let (a, b) = lsq_group_backward(p, xg, d, m, gg);
                let sc = lsq_grad_scale(p, n);
                // SAFETY: as above; i < rows · groups, the length of gd and gm.
                unsafe {
                    *gdp.ptr().add(i) = a * sc;
                    *gmp.ptr().add(i) = b * sc;
                }
            });
        }
        let mut all = self.grid_grads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(acc) = all.layers[layer][t as usize].as_mut() {
            for (a, b) in acc.d.iter_mut().zip(&gd) {
                *a += b;
            }
            if !acc.p.sym {
                for (a, b) in acc.m.iter_mut().zip(&gm) {
                    *a += b;
                }
            }
        }
        Ok(())
    }
}

/// The file beside the PEFT adapter that says how it was trained.
pub const STATE_FILE: &str = "pare_qat.json";
/// Key suffixes of the learned grids in `adapter_model.safetensors` (after the module's key).
const SCALE_KEY: &str = "pare_qat_scale";
const MIN_KEY: &str = "pare_qat_min";

/// How an adapter directory's adapters were trained, as `pare merge` and `--resume` need it.
#[derive(Debug, Clone, PartialEq)]
pub struct QatState {
    pub mode: QatMode,
    /// `lsq`: the learned grid tensors by key (other modes train against the base's own grid).
    learned: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl QatState {
    /// The grid the adapter of `(l, t)` was trained against, given the base's grid there: the
    /// base's own, or (`lsq`) the learned one, checked against the base's shape.
    pub fn grid(&self, l: usize, t: Target, base: &GroupGrid) -> Result<GroupGrid> {
        let mut g = base.clone();
        if self.mode != QatMode::Lsq {
            return Ok(g);
        }
        let shape = vec![g.rows, g.groups()];
        let read = |key: &str, out: &mut Vec<f32>| -> Result<()> {
            let name = format!("{}.{key}", Lora::module_key(l, t));
            match self.learned.get(&name) {
                Some((s, v)) if *s == shape => {
                    out.copy_from_slice(v);
                    Ok(())
                }
                Some((s, _)) => Err(Error::Invalid(format!(
                    "learned grid {name:?} has shape {s:?}, the base's is {shape:?}"
                ))),
                None => Err(Error::Invalid(format!(
                    "learned grid {name:?} is missing from the adapter"
                ))),
            }
        };
        read(SCALE_KEY, &mut g.d)?;
        if !g.p.sym {
            read(MIN_KEY, &mut g.m)?;
        }
        Ok(g)
    }

    /// Replaces each of `grids` by the one its adapter was trained against.
    pub fn apply(&self, grids: &mut Grids) -> Result<()> {
        for (l, layer) in grids.layers.iter_mut().enumerate() {
            for t in Target::ALL {
                if let Some(g) = layer[t as usize].as_mut() {
                    *g = self.grid(l, t, g)?;
                }
            }
        }
        Ok(())
    }
}

/// The extra tensors [`Lora::save_with`] stores for learned grids: `<module>.pare_qat_scale` and,
/// for asymmetric formats, `<module>.pare_qat_min`, each `[rows, groups]` f32 in the GGUF base's
/// own row order.
pub fn grid_tensors(grids: &Grids) -> Vec<(String, LazyTensor<'static>)> {
    let mut out = Vec::new();
    for (l, layer) in grids.layers.iter().enumerate() {
        for t in Target::ALL {
            let Some(g) = &layer[t as usize] else {
                continue;
            };
            let shape = vec![g.rows, g.groups()];
            let mut put = |key: &str, v: &[f32]| {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                out.push((
                    format!("{}.{key}", Lora::module_key(l, t)),
                    LazyTensor::new(Dtype::F32, shape.clone(), move || bytes.clone()),
                ));
            };
            put(SCALE_KEY, &g.d);
            if !g.p.sym {
                put(MIN_KEY, &g.m);
            }
        }
    }
    out
}

/// Writes [`STATE_FILE`] into an adapter directory (the grid tensors go into the adapter file).
pub fn save_state(dir: &Path, mode: QatMode, grids: &Grids) -> Result<()> {
    let learned = mode == QatMode::Lsq;
    let j = json!({
        "qat": mode.name(),
        "grid": if learned { "learned" } else { "base" },
        "note": if learned {
            format!(
                "Trained by pare tune --qat lsq against Q(W + s·B·A) on learned grids. \
                 {} also holds, per adapted module, `<module>.{SCALE_KEY}` (f32 [rows, groups]: \
                 the learned scale d of each group) and, for asymmetric formats, \
                 `<module>.{MIN_KEY}` (the learned minimum m), rows in the GGUF base's order. \
                 pare merge stores them as the groups' f16 scale/min and rounds W + s·B·A onto \
                 them. PEFT ignores these keys.",
                crate::model::lora::WEIGHTS_FILE
            )
        } else {
            format!(
                "Trained by pare tune --qat {} against Q(W + s·B·A) on the base's own grid (its \
                 groups' scales and minimums): pare merge rounds onto that grid.",
                mode.name()
            )
        },
        "formats": grids.layers.iter().flat_map(|l| l.iter().flatten()).map(|g| g.p.name())
            .collect::<std::collections::BTreeSet<_>>(),
    });
    let text = serde_json::to_string_pretty(&j).expect("a JSON value serializes");
    crate::atomic_file::write(&dir.join(STATE_FILE), text.as_bytes())
}

/// Reads how the adapters in `dir` were trained: `None` for plain LoRA (no [`STATE_FILE`]).
pub fn load_state(dir: &Path) -> Result<Option<QatState>> {
    let path = dir.join(STATE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let mode = QatMode::parse(j["qat"].as_str().unwrap_or_default())
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let mut learned = std::collections::HashMap::new();
    if mode == QatMode::Lsq {
        let file = SafetensorsFile::open(dir.join(crate::model::lora::WEIGHTS_FILE))?;
        for (name, e) in &file.tensors {
            if name.ends_with(SCALE_KEY) || name.ends_with(MIN_KEY) {
                let mut v = vec![0.0f32; e.n_elements()];
                st::to_f32(e.dtype, file.data(e), &mut v)
                    .map_err(|e| Error::Invalid(format!("{}: {name}: {e}", file.path.display())))?;
                learned.insert(name.clone(), (e.shape.clone(), v));
            }
        }
    }
    Ok(Some(QatState { mode, learned }))
}
