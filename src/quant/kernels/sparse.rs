//! The sparse-input product on input-major weights: `y += Σ_{(i, a) ∈ active} a · W[i]`, where
//! row `i` of `W` holds the weights that input `i` contributes to every output. Skipping an input
//! (a near-zero activation) then skips one contiguous run of packed bytes, which is what makes
//! sparse FFN execution read fewer weight bytes (see `crate::model::sparse_ffn`).
//!
//! Each caller computes a range of output columns (its share of the outputs), so one product is
//! split across threads by columns, every thread reading its part of every active row. A range
//! starts at a multiple of [`split_unit`] and ends at one or at the row's end, so it holds whole
//! groups of a pq row.
//!
//! [`axpy_rows_reference`] is the definition: dequantize the row, multiply, add. The SIMD paths
//! (`sparse_x86.rs`) decode groups in place and fold each group's offset into one sum per group;
//! they equal the reference up to float summation order.

use std::ops::Range;

use super::Isa;
use crate::error::{Error, Result};
use crate::quant::dequant::dequantize_row;
use crate::quant::pq::Pq;
use crate::quant::GgmlType;

/// Weight types the sparse product runs on: every pq format (and the ggml types identical to one)
/// and the float types.
pub fn supports(ty: GgmlType) -> bool {
    Pq::of_ggml(ty).is_some() || matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// Output ranges start at multiples of this many columns: a pq format's group, else 32.
pub fn split_unit(ty: GgmlType) -> usize {
    Pq::of_ggml(ty).map_or(32, |p| p.group as usize)
}

/// Input-major packed rows: `rows` rows of `cols` weights of type `ty`.
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub ty: GgmlType,
    pub bytes: &'a [u8],
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
}

impl<'a> Rows<'a> {
    /// Checks that `bytes` holds exactly `rows` rows of `cols` weights of a supported type.
    pub fn new(ty: GgmlType, bytes: &'a [u8], rows: usize, cols: usize) -> Result<Rows<'a>> {
        if !supports(ty) {
            return Err(Error::UnsupportedType(format!(
                "sparse products run on pq and float weights, not {ty}"
            )));
        }
        let row_bytes = ty.row_bytes(cols)?;
        if rows.checked_mul(row_bytes) != Some(bytes.len()) {
            return Err(Error::Invalid(format!(
                "{} bytes do not hold {rows} rows of {cols} {ty} weights",
                bytes.len()
            )));
        }
        Ok(Rows {
            ty,
            bytes,
            rows,
            cols,
            row_bytes,
        })
    }

    pub fn row(&self, i: usize) -> &'a [u8] {
        &self.bytes[i * self.row_bytes..(i + 1) * self.row_bytes]
    }

    /// Splits the columns into at most `parts` ranges of whole split units, as even as possible.
    pub fn split(&self, parts: usize) -> Vec<Range<usize>> {
        let unit = split_unit(self.ty);
        let units = self.cols.div_ceil(unit);
        let parts = parts.clamp(1, units.max(1));
        (0..parts)
            .map(|k| {
                let (a, b) = (units * k / parts, units * (k + 1) / parts);
                (a * unit).min(self.cols)..(b * unit).min(self.cols)
            })
            .filter(|r| !r.is_empty())
            .collect()
    }

    fn check(&self, active: &[(u32, f32)], cols: &Range<usize>, y: &[f32]) {
        let unit = split_unit(self.ty);
        assert!(
            cols.start.is_multiple_of(unit)
                && (cols.end.is_multiple_of(unit) || cols.end == self.cols)
                && cols.start <= cols.end
                && cols.end <= self.cols,
            "column range {cols:?} is not made of whole groups of {unit} in {}",
            self.cols
        );
        assert_eq!(y.len(), cols.len(), "output length");
        assert!(
            active.iter().all(|&(i, _)| (i as usize) < self.rows),
            "active row out of range"
        );
    }
}

/// The scalar reference: for every active `(i, a)`, `y[j - cols.start] += a · W[i][j]` for `j` in
/// `cols`, with row `i` dequantized whole.
pub fn axpy_rows_reference(w: &Rows, active: &[(u32, f32)], cols: Range<usize>, y: &mut [f32]) {
    w.check(active, &cols, y);
    let mut row = vec![0.0f32; w.cols];
    for &(i, a) in active {
        dequantize_row(w.ty, w.row(i as usize), &mut row)
            .expect("the type was checked when the rows were made");
        for (yj, &wj) in y.iter_mut().zip(&row[cols.clone()]) {
            *yj += a * wj;
        }
    }
}

/// `y[j - cols.start] += Σ_{(i, a) ∈ active} a · W[i][j]` for `j` in `cols`, on the given
/// instruction set (the scalar path is the reference).
pub fn axpy_rows(isa: Isa, w: &Rows, active: &[(u32, f32)], cols: Range<usize>, y: &mut [f32]) {
    w.check(active, &cols, y);
    match (isa, Pq::of_ggml(w.ty)) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` names only instruction sets the CPU has (see `kernels::isa`); the ranges
        // were checked above.
        (Isa::Avx512, Some(p)) => unsafe {
            super::sparse_x86::axpy_pq_avx512(p, w, active, cols, y)
        },
        #[cfg(target_arch = "x86_64")]
        (Isa::Avx2, Some(p)) => unsafe { super::sparse_x86::axpy_pq_avx2(p, w, active, cols, y) },
        _ => axpy_rows_reference(w, active, cols, y),
    }
}

/// The affine map of a pq group's codes to values, `w = A·c + B`, from its scale and minimum.
#[inline(always)]
pub(crate) fn affine(p: Pq, d: f32, m: f32) -> (f32, f32) {
    if !p.sym {
        (d, m)
    } else if p.bits == 1 {
        (2.0 * d, -d)
    } else {
        (d, -d * (1u32 << (p.bits - 1)) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_whole_groups() {
        let bytes = vec![0u8; Pq::parse("q3_g128").unwrap().row_bytes(576) * 3];
        let ty = GgmlType::Pq(Pq::parse("q3_g128").unwrap());
        let w = Rows::new(ty, &bytes, 3, 576).unwrap();
        assert_eq!(w.split(2), vec![0..256, 256..576]);
        assert_eq!(w.split(100).len(), 5);
        assert_eq!(w.split(100).last(), Some(&(512..576)));
    }

    #[test]
    fn affine_matches_the_format() {
        for p in Pq::all() {
            let (d, m) = (0.37f32, -1.25f32);
            let (a, b) = affine(p, d, m);
            for c in 0..=p.max_code() {
                assert!(
                    (a * c as f32 + b - p.value(c, d, if p.sym { 0.0 } else { m })).abs() < 1e-5
                );
            }
        }
    }
}
