//! pare's group-wise k-bit weight formats ("pq"): `k` ∈ {1, 2, 3, 4, 5, 6, 8} bits per weight, groups
//! of 32, 64 or 128 weights sharing an f16 scale (and, when asymmetric, an f16 minimum).
//!
//! # Values
//! Each weight is stored as an unsigned code `c` ∈ [0, 2^k):
//! - asymmetric (`q3_g64`): `w = d·c + m`;
//! - symmetric (`q3_g64_sym`), k ≥ 2: `w = d·(c − 2^(k−1))`;
//! - symmetric 1-bit (`q1_g128_sym`): `w = d·(2c − 1)`, i.e. ±d.
//!
//! # Layout of a row
//! A row of `n` weights is `⌊n/g⌋` full groups then, when `g` does not divide `n`, one shorter tail
//! group of `n mod g` weights. A group is its header (f16 `d`, then f16 `m` when asymmetric) followed
//! by its weights in chunks of 32; a tail whose length is not a multiple of 32 is padded with code 0
//! up to the next chunk (the padding multiplies activations that are zero-padded too, so it never
//! contributes). A chunk of 32 codes is stored as bit planes, the plane holding the highest bits
//! first:
//! - a 4-bit plane is 16 bytes: byte `j` holds code `j` in its low nibble and code `j + 16` in its
//!   high nibble (ggml's Q4 order);
//! - a 2-bit plane is 8 bytes: byte `j` holds code `j + 8i` in bits `2i..2i+2`, i = 0..4;
//! - a 1-bit plane is 4 bytes: bit `j mod 8` of byte `j / 8` holds code `j`'s bit;
//! - 3 bits = 1-bit plane (bit 2) + 2-bit plane; 5 = 1 + 4; 6 = 2 + 4;
//! - 8 bits: 32 bytes, `c` as u8 when asymmetric and `c − 128` as i8 when symmetric.
//!
//! This makes five members byte-identical to ggml's legacy types on rows that are whole groups:
//! `q4_g32` = Q4_1, `q4_g32_sym` = Q4_0, `q5_g32` = Q5_1, `q5_g32_sym` = Q5_0, `q8_g32_sym` = Q8_0,
//! and `q1_g128_sym` = Q1_0 (Bonsai's format). Files written by pare store those under ggml's own
//! type ids, which llama.cpp loads; the others use pare's ids ([`Pq::id`]).

use std::sync::OnceLock;

use half::f16;

use crate::error::{Error, Result};

/// Bit widths of the family.
pub const BITS: [u8; 7] = [1, 2, 3, 4, 5, 6, 8];
/// Group sizes of the family.
pub const GROUPS: [u16; 3] = [32, 64, 128];
/// Weights per chunk: codes are packed and multiplied with 8-bit activations 32 at a time.
pub const CHUNK: usize = 32;
/// GGUF type ids of pq formats are `ID_BASE + 16·k + 2·log2(g/32) + sym`, far above ggml's own ids
/// (< 64 as of 2026) so that the two never collide.
pub const ID_BASE: u32 = 4096;

/// One member of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pq {
    pub bits: u8,
    pub group: u16,
    pub sym: bool,
}

impl Pq {
    pub fn new(bits: u8, group: u16, sym: bool) -> Result<Pq> {
        if !BITS.contains(&bits) {
            return Err(Error::Invalid(format!(
                "{bits}-bit weights are not a pare format (bits: 1, 2, 3, 4, 5, 6, 8)"
            )));
        }
        if !GROUPS.contains(&group) {
            return Err(Error::Invalid(format!(
                "group size {group} is not supported (32, 64, 128)"
            )));
        }
        Ok(Pq { bits, group, sym })
    }

    /// All 42 members, ordered by bits, then group, then asymmetric before symmetric.
    pub fn all() -> impl Iterator<Item = Pq> {
        BITS.into_iter().flat_map(|bits| {
            GROUPS.into_iter().flat_map(move |group| {
                [false, true]
                    .into_iter()
                    .map(move |sym| Pq { bits, group, sym })
            })
        })
    }

    fn index(self) -> usize {
        let b = BITS.iter().position(|&b| b == self.bits).unwrap_or(0);
        let g = GROUPS.iter().position(|&g| g == self.group).unwrap_or(0);
        (b * GROUPS.len() + g) * 2 + self.sym as usize
    }

    /// The GGUF type id pare stores this format under.
    pub fn id(self) -> u32 {
        let g = GROUPS.iter().position(|&g| g == self.group).unwrap_or(0) as u32;
        ID_BASE + 16 * self.bits as u32 + 2 * g + self.sym as u32
    }

    pub fn from_id(id: u32) -> Option<Pq> {
        Pq::all().find(|p| p.id() == id)
    }

    /// The name a user types: `q3_g64`, `q2_g32_sym`.
    pub fn name(self) -> &'static str {
        static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
        NAMES.get_or_init(|| {
            Pq::all()
                .map(|p| {
                    let s = format!(
                        "q{}_g{}{}",
                        p.bits,
                        p.group,
                        if p.sym { "_sym" } else { "" }
                    );
                    &*Box::leak(s.into_boxed_str())
                })
                .collect()
        })[self.index()]
    }

    /// Parses `q{bits}_g{group}[_sym]`; `None` when `s` is not of that form.
    pub fn parse(s: &str) -> Option<Pq> {
        Pq::all().find(|p| p.name().eq_ignore_ascii_case(s))
    }

    /// Bytes of a group's header: f16 scale, and f16 minimum when asymmetric.
    pub fn header_bytes(self) -> usize {
        if self.sym {
            2
        } else {
            4
        }
    }

    /// Bytes of one chunk of 32 codes.
    pub fn chunk_bytes(self) -> usize {
        4 * self.bits as usize
    }

    /// Bytes of a full group.
    pub fn group_bytes(self) -> usize {
        self.header_bytes() + self.group as usize / CHUNK * self.chunk_bytes()
    }

    /// Nominal bits per weight, scales included (rows that are whole groups have exactly this).
    pub fn bits_per_weight(self) -> f64 {
        self.bits as f64 + 8.0 * self.header_bytes() as f64 / self.group as f64
    }

    /// Bytes of a row of `n` weights (see the module docs for the tail group).
    pub fn row_bytes(self, n: usize) -> usize {
        let g = self.group as usize;
        let tail = n % g;
        let tail_bytes = if tail == 0 {
            0
        } else {
            self.header_bytes() + tail.div_ceil(CHUNK) * self.chunk_bytes()
        };
        n / g * self.group_bytes() + tail_bytes
    }

    /// Largest code.
    pub fn max_code(self) -> u8 {
        ((1u16 << self.bits) - 1) as u8
    }

    /// The ggml type with this exact layout for rows of `n` weights, if there is one.
    pub fn ggml_equivalent(self, n: usize) -> Option<super::GgmlType> {
        use super::GgmlType as G;
        if !n.is_multiple_of(self.group as usize) {
            return None;
        }
        match (self.bits, self.group, self.sym) {
            (4, 32, false) => Some(G::Q4_1),
            (4, 32, true) => Some(G::Q4_0),
            (5, 32, false) => Some(G::Q5_1),
            (5, 32, true) => Some(G::Q5_0),
            (8, 32, true) => Some(G::Q8_0),
            (1, 128, true) => Some(G::Q1_0),
            _ => None,
        }
    }

    /// The pq member `ty` is: itself for a pq format, its twin for a ggml legacy type.
    pub fn member(ty: super::GgmlType) -> Option<Pq> {
        match ty {
            super::GgmlType::Pq(p) => Some(p),
            other => Pq::of_ggml(other),
        }
    }

    /// The pq member a ggml legacy type is identical to (any row length that type allows).
    pub fn of_ggml(ty: super::GgmlType) -> Option<Pq> {
        use super::GgmlType as G;
        let (bits, group, sym) = match ty {
            G::Q4_1 => (4, 32, false),
            G::Q4_0 => (4, 32, true),
            G::Q5_1 => (5, 32, false),
            G::Q5_0 => (5, 32, true),
            G::Q8_0 => (8, 32, true),
            G::Q1_0 => (1, 128, true),
            G::Pq(p) => return Some(p),
            _ => return None,
        };
        Some(Pq { bits, group, sym })
    }

    /// The value of code `c` in a group with scale `d` and minimum `m`.
    #[inline]
    pub fn value(self, c: u8, d: f32, m: f32) -> f32 {
        if !self.sym {
            d * c as f32 + m
        } else if self.bits == 1 {
            d * (2 * c as i32 - 1) as f32
        } else {
            d * (c as i32 - (1 << (self.bits - 1))) as f32
        }
    }

    /// The code the quantizer stores for `v` in a group with scale `d` (given as `inv_d = 1/d`, 0
    /// when `d` is 0) and minimum `m`: the nearest one, clamped to the format's range. (One-bit
    /// codes are the sign.)
    #[inline]
    pub fn code(self, v: f32, inv_d: f32, m: f32) -> u8 {
        if !self.sym {
            ((v - m) * inv_d).round().clamp(0.0, self.max_code() as f32) as u8
        } else if self.bits == 1 {
            (v >= 0.0) as u8
        } else {
            let half = (1u32 << (self.bits - 1)) as f32;
            ((v * inv_d).round().clamp(-half, half - 1.0) + half) as u8
        }
    }

    /// Unpacks one chunk of `self.chunk_bytes()` bytes into 32 codes.
    pub fn unpack_chunk(self, src: &[u8], codes: &mut [u8; CHUNK]) {
        let planes = |src: &[u8], codes: &mut [u8; CHUNK]| match self.bits {
            1 => unpack1(src, codes, 0),
            2 => unpack2(src, codes, 0),
            3 => {
                unpack1(&src[..4], codes, 2);
                unpack2(&src[4..], codes, 0);
            }
            4 => unpack4(src, codes, 0),
            5 => {
                unpack1(&src[..4], codes, 4);
                unpack4(&src[4..], codes, 0);
            }
            6 => {
                unpack2(&src[..8], codes, 4);
                unpack4(&src[8..], codes, 0);
            }
            _ => {
                let flip = if self.sym { 0x80 } else { 0 };
                for (c, &b) in codes.iter_mut().zip(src) {
                    *c = b ^ flip;
                }
            }
        };
        codes.fill(0);
        planes(src, codes);
    }

    /// Packs 32 codes (each ≤ [`Pq::max_code`]) into `dst` of `self.chunk_bytes()` bytes.
    pub fn pack_chunk(self, codes: &[u8; CHUNK], dst: &mut [u8]) {
        dst.fill(0);
        match self.bits {
            1 => pack1(codes, dst, 0),
            2 => pack2(codes, dst, 0),
            3 => {
                pack1(codes, &mut dst[..4], 2);
                pack2(codes, &mut dst[4..], 0);
            }
            4 => pack4(codes, dst, 0),
            5 => {
                pack1(codes, &mut dst[..4], 4);
                pack4(codes, &mut dst[4..], 0);
            }
            6 => {
                pack2(codes, &mut dst[..8], 4);
                pack4(codes, &mut dst[8..], 0);
            }
            _ => {
                let flip = if self.sym { 0x80 } else { 0 };
                for (b, &c) in dst.iter_mut().zip(codes) {
                    *b = c ^ flip;
                }
            }
        }
    }

    /// Splits a row's bytes into its groups: `(header, chunks, weights)` for each, where `weights`
    /// is how many of the group's (unpadded) weights belong to the row.
    pub fn groups(self, row: &[u8], n: usize) -> impl Iterator<Item = (&[u8], &[u8], usize)> {
        let g = self.group as usize;
        let (hb, cb) = (self.header_bytes(), self.chunk_bytes());
        let mut off = 0;
        (0..n.div_ceil(g)).map(move |i| {
            let w = (n - i * g).min(g);
            let len = hb + w.div_ceil(CHUNK) * cb;
            let grp = &row[off..off + len];
            off += len;
            (&grp[..hb], &grp[hb..], w)
        })
    }

    /// Scale and minimum stored in a group header.
    #[inline]
    pub fn header(self, h: &[u8]) -> (f32, f32) {
        let d = f16::from_le_bytes([h[0], h[1]]).to_f32();
        let m = if self.sym {
            0.0
        } else {
            f16::from_le_bytes([h[2], h[3]]).to_f32()
        };
        (d, m)
    }

    /// Dequantizes one row of `dst.len()` weights from exactly `self.row_bytes(dst.len())` bytes.
    pub fn dequantize_row(self, src: &[u8], dst: &mut [f32]) -> Result<()> {
        let n = dst.len();
        if src.len() != self.row_bytes(n) {
            return Err(Error::Invalid(format!(
                "a row of {n} {} weights takes {} bytes, but {} were given",
                self.name(),
                self.row_bytes(n),
                src.len()
            )));
        }
        let mut codes = [0u8; CHUNK];
        let mut out = dst.iter_mut();
        for (h, chunks, w) in self.groups(src, n) {
            let (d, m) = self.header(h);
            let mut left = w;
            for ch in chunks.chunks_exact(self.chunk_bytes()) {
                self.unpack_chunk(ch, &mut codes);
                for &c in &codes[..left.min(CHUNK)] {
                    if let Some(o) = out.next() {
                        *o = self.value(c, d, m);
                    }
                }
                left = left.saturating_sub(CHUNK);
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Pq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn unpack4(src: &[u8], codes: &mut [u8; CHUNK], shift: u32) {
    for j in 0..16 {
        codes[j] |= (src[j] & 0x0F) << shift;
        codes[j + 16] |= (src[j] >> 4) << shift;
    }
}

fn unpack2(src: &[u8], codes: &mut [u8; CHUNK], shift: u32) {
    for j in 0..8 {
        for i in 0..4 {
            codes[j + 8 * i] |= ((src[j] >> (2 * i)) & 3) << shift;
        }
    }
}

fn unpack1(src: &[u8], codes: &mut [u8; CHUNK], shift: u32) {
    for (j, c) in codes.iter_mut().enumerate() {
        *c |= ((src[j / 8] >> (j % 8)) & 1) << shift;
    }
}

fn pack4(codes: &[u8; CHUNK], dst: &mut [u8], shift: u32) {
    for j in 0..16 {
        dst[j] = ((codes[j] >> shift) & 0x0F) | (((codes[j + 16] >> shift) & 0x0F) << 4);
    }
}

fn pack2(codes: &[u8; CHUNK], dst: &mut [u8], shift: u32) {
    for j in 0..8 {
        for i in 0..4 {
            dst[j] |= ((codes[j + 8 * i] >> shift) & 3) << (2 * i);
        }
    }
}

fn pack1(codes: &[u8; CHUNK], dst: &mut [u8], shift: u32) {
    for (j, &c) in codes.iter().enumerate() {
        dst[j / 8] |= ((c >> shift) & 1) << (j % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ids_and_sizes() {
        assert_eq!(Pq::all().count(), 42);
        for p in Pq::all() {
            assert_eq!(Pq::parse(p.name()), Some(p));
            assert_eq!(Pq::from_id(p.id()), Some(p));
            assert_eq!(
                p.row_bytes(p.group as usize * 3) * 8,
                (p.bits_per_weight() * p.group as f64 * 3.0) as usize
            );
        }
        let p = Pq::parse("q3_g64").unwrap();
        assert_eq!((p.bits, p.group, p.sym), (3, 64, false));
        assert_eq!(p.bits_per_weight(), 3.5);
        // 576 = 4 groups of 128 + a tail of 64: two chunks of 12 bytes and a 4-byte header.
        let p = Pq::parse("q3_g128").unwrap();
        assert_eq!(p.row_bytes(576), 4 * (4 + 48) + 4 + 24);
        // A tail of 40 weights is padded to two chunks.
        let p = Pq::parse("q2_g64_sym").unwrap();
        assert_eq!(p.row_bytes(104), (2 + 16) + 2 + 16);
        assert!(Pq::parse("q7_g32").is_none() && Pq::parse("q4_g16").is_none());
    }

    #[test]
    fn pack_unpack_round_trip() {
        for p in Pq::all() {
            let mut codes = [0u8; CHUNK];
            for (j, c) in codes.iter_mut().enumerate() {
                *c = ((j * 37 + 11) % (p.max_code() as usize + 1)) as u8;
            }
            let mut bytes = vec![0u8; p.chunk_bytes()];
            p.pack_chunk(&codes, &mut bytes);
            let mut back = [0u8; CHUNK];
            p.unpack_chunk(&bytes, &mut back);
            assert_eq!(codes, back, "{p}");
        }
    }
}
