//! Weight formats by the names users type (`q3_g64`, `q2_g32_sym`, `q1_0`, `q4_0`, `f16`), and the
//! storage type each becomes for a given row length.
//!
//! A format is a [`GgmlType`]: ggml's float and legacy types, or one of pare's [`Pq`] formats. The
//! legacy types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q1_0 are byte-identical to a pq member on rows that
//! are whole blocks, so pare stores whichever of the two fits: the ggml type where it can (llama.cpp
//! then loads the file), the pq twin where a row has a shorter last group (see [`storage_type`]).

use super::pq::Pq;
use super::GgmlType;
use crate::error::{Error, Result};

/// ggml types a user may name as a format.
const GGML_FORMATS: [GgmlType; 9] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q5_1,
    GgmlType::Q5_0,
    GgmlType::Q4_1,
    GgmlType::Q4_0,
    GgmlType::Q1_0,
];

/// Parses a format name (case-insensitive).
pub fn parse(name: &str) -> Result<GgmlType> {
    if let Some(t) = GGML_FORMATS
        .iter()
        .find(|t| t.name().eq_ignore_ascii_case(name))
    {
        return Ok(*t);
    }
    if let Some(p) = Pq::parse(name) {
        return Ok(GgmlType::Pq(p));
    }
    Err(Error::Invalid(format!(
        "unknown format {name:?}: use q{{1,2,3,4,5,6,8}}_g{{32,64,128}}[_sym] (e.g. q3_g64, \
         q2_g32_sym), q1_0, q4_0, q4_1, q5_0, q5_1, q8_0, f16, bf16 or f32"
    )))
}

/// The name users type for a format: lower case (`q4_1`, `q3_g64`).
pub fn name(ty: GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

/// Every format pare can write, in order of bits per weight (largest first).
pub fn all() -> Vec<GgmlType> {
    let mut v: Vec<GgmlType> = GGML_FORMATS.to_vec();
    v.extend(
        Pq::all()
            .filter(|p| p.ggml_equivalent(p.group as usize).is_none())
            .map(GgmlType::Pq),
    );
    v.sort_by(|a, b| b.bits_per_weight().total_cmp(&a.bits_per_weight()));
    v
}

/// The type to store a matrix with rows of `cols` weights in, when the user asked for `ty`: a pq
/// format becomes its ggml twin where the two are identical for this row length, and a ggml legacy
/// type becomes its pq twin where the row is not a whole number of its blocks.
pub fn storage_type(ty: GgmlType, cols: usize) -> GgmlType {
    match ty {
        GgmlType::Pq(p) => p.ggml_equivalent(cols).unwrap_or(ty),
        _ if !cols.is_multiple_of(ty.block_size()) => match Pq::of_ggml(ty) {
            Some(p) => GgmlType::Pq(p),
            None => ty,
        },
        _ => ty,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_format_and_round_trips_names() {
        for ty in all() {
            assert_eq!(parse(&name(ty)).unwrap(), ty);
        }
        assert_eq!(parse("Q4_1").unwrap(), GgmlType::Q4_1);
        assert!(parse("q4_k").is_err() && parse("").is_err() && parse("q9_g32").is_err());
        assert_eq!(all().len(), 9 + 42 - 6);
    }

    #[test]
    fn storage_types_follow_the_row_length() {
        let q4g32 = parse("q4_g32").unwrap();
        assert_eq!(storage_type(q4g32, 576), GgmlType::Q4_1);
        assert_eq!(storage_type(q4g32, 570), q4g32);
        let q1 = parse("q1_0").unwrap();
        assert_eq!(storage_type(q1, 1536), GgmlType::Q1_0);
        assert_eq!(storage_type(q1, 576), parse("q1_g128_sym").unwrap());
        assert_eq!(storage_type(GgmlType::F16, 7), GgmlType::F16);
    }
}
