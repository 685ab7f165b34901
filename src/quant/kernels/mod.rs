//! Compute kernels on packed weights: products of a tile of weight rows with rows of 8-bit
//! activations (one per token). SIMD paths unpack each weight block once for up to four tokens.
//!
//! Each instruction-set file beside [`scalar`] computes the same results as the scalar reference
//! (up to float summation order); the best path the CPU supports is picked once at run time. The
//! environment variable `PARE_ISA=scalar|avx2|avx512` forces a lower path (for tests and benchmarks).

use std::sync::OnceLock;

use super::activation::Q8Row;
use super::pq::Pq;
use super::GgmlType;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod float_avx2;
pub mod panel;
#[cfg(target_arch = "x86_64")]
mod panel_x86;
#[cfg(target_arch = "x86_64")]
mod pq_simd;
pub mod scalar;
pub mod sparse;
#[cfg(target_arch = "x86_64")]
mod sparse_x86;

/// The instruction sets pare has kernels for, best last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Every path this CPU can run, for tests that compare each against the scalar reference.
    pub fn supported() -> Vec<Isa> {
        let best = detect();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i <= best)
            .collect()
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// The path in use: the best the CPU has, or a lower one forced by `PARE_ISA`.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let best = detect();
        match std::env::var("PARE_ISA").ok().as_deref() {
            Some("scalar") => Isa::Scalar,
            Some("avx2") => best.min(Isa::Avx2),
            _ => best,
        }
    })
}

/// Weight types with an 8-bit-activation kernel; others are computed by dequantizing the row.
///
/// Q4_0, Q4_1 and Q8_0 have kernels of their own that round as llama.cpp does; every pq format, and
/// the ggml types byte-identical to one (Q5_0, Q5_1, Q1_0), use the pq kernels.
pub fn has_q8_kernel(ty: GgmlType) -> bool {
    Pq::of_ggml(ty).is_some()
}

/// `out[t * ldo + r] = W[r] · xs[t]` for every row `r` of `w` (consecutive rows of `row_bytes`
/// bytes of type `ty`, which must satisfy [`has_q8_kernel`]) and every token `t` of `xs`, on the
/// given instruction set. Each row holds `32 * xs[t].d.len()` weights: a pq row whose length is not
/// a multiple of 32 is zero-padded to it, as the activations are.
///
/// # Safety
/// `out` must be valid for writes at every `t * ldo + r`, and nothing else may access those
/// elements during the call.
#[inline]
pub unsafe fn gemm_tile(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    xs: &[Q8Row],
    out: *mut f32,
    ldo: usize,
) {
    let p = Pq::of_ggml(ty).expect("gemm_tile is only called on types with a q8 kernel");
    assert!(row_bytes > 0 && w.len().is_multiple_of(row_bytes));
    // The ggml types' row lengths are whole blocks, so their layout is their pq twin's.
    assert!(xs.iter().all(|x| row_bytes == p.row_bytes(32 * x.d.len())
        && x.qs.len() == 32 * x.d.len()
        && x.s.len() == x.d.len()
        && x.isum.len() == x.d.len()));
    if xs.is_empty() {
        return;
    }
    let special = matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only Avx512/Avx2 when `detect` found the features these paths enable.
        Isa::Avx512 if special => avx512::gemm_tile(ty, w, row_bytes, xs, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::gemm_tile_pq(p, w, row_bytes, xs, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if special => avx2::gemm_tile(ty, w, row_bytes, xs, out, ldo),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::gemm_tile_pq(p, w, row_bytes, xs, out, ldo),
        _ if special => scalar::gemm_tile(ty, w, row_bytes, xs, out, ldo),
        _ => scalar::gemm_tile_pq(p, w, row_bytes, xs, out, ldo),
    }
}

/// Float weight types (f32, f16, bf16), computed directly on f32 activations.
pub fn has_float_kernel(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

/// `out[t * ldo + r] = W[r] · x[t]` for every row `r` of `w` (consecutive rows of `cols` weights
/// of a type satisfying [`has_float_kernel`]) and every token `t` of `x` (rows of `cols` floats).
///
/// # Safety
/// As for [`gemm_tile`].
#[inline]
pub unsafe fn gemm_tile_float(
    isa: Isa,
    ty: GgmlType,
    w: &[u8],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ldo: usize,
) {
    assert!(has_float_kernel(ty) && cols > 0);
    assert!(w.len().is_multiple_of(cols * ty.type_size()) && x.len().is_multiple_of(cols));
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is only Avx512/Avx2 when `detect` found AVX2, FMA and F16C.
        Isa::Avx512 | Isa::Avx2 => float_avx2::gemm_tile_float(ty, w, cols, x, out, ldo),
        _ => scalar::gemm_tile_float(ty, w, cols, x, out, ldo),
    }
}
