//! Measurement: speed ([`bench`]).

pub mod bench;
