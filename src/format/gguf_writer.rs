//! GGUF version 3 writer, streaming: the header (metadata and tensor infos) is written first, then
//! each tensor's data as the caller produces it, so a converter holds one tensor at a time, never the
//! whole output.
//!
//! The file is written to a temporary file beside the target (`.NAME.tmp-PID`), synced, then renamed
//! over the target, so the target path only ever holds a complete file: an error, a cancellation (the
//! flag given to [`GgufWriter::create`], which the CLI sets on Ctrl-C) or a writer dropped before
//! [`GgufWriter::finish`] removes the temporary file and leaves an existing target untouched.
//!
//! # Layout (as ggml's `gguf.cpp` writes and reads it)
//! Magic `GGUF`, version 3 (u32), tensor count (u64), metadata count (u64), the metadata pairs, the
//! tensor infos (name, n_dims u32, dims u64 each in ggml order, type id u32, offset u64), zero
//! padding to `general.alignment` (a u32, 32 when absent), then the tensors' data, each padded with
//! zeros to the alignment; offsets are relative to the start of the data and follow one another
//! exactly (llama.cpp rejects any gap beyond the padding).
//!
//! # Custom type ids
//! Standard ggml types are written under ggml's ids and layouts ([`GgmlType::id`]), so a file that
//! uses only those loads in llama.cpp. pare's own group-wise formats ([`crate::quant::pq`]) have no
//! ggml id; they are stored under
//!
//! ```text
//! id = 4096 + 16·bits + 2·log2(group/32) + sym      (bits ∈ {1,2,3,4,5,6,8}, group ∈ {32,64,128})
//! ```
//!
//! | format        | id   | format            | id   |
//! |---------------|------|-------------------|------|
//! | `q2_g32`      | 4128 | `q2_g32_sym`      | 4129 |
//! | `q2_g64`      | 4130 | `q2_g128_sym`     | 4133 |
//! | `q3_g64`      | 4146 | `q4_g128`         | 4164 |
//! | `q6_g32`      | 4192 | `q8_g128_sym`     | 4229 |
//!
//! (see [`crate::quant::pq::Pq::id`]; their byte layout is documented in `src/quant/pq.rs`). A file
//! holding any of them also carries the metadata `pare.format_version = 1` (u32): the version of that
//! layout, so that a later change of layout can be told from this one. Those ids lie far above
//! ggml's (< 64), so llama.cpp rejects such a file by the unknown type instead of misreading it.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::gguf::{value_type, Value, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS};
use crate::error::{Error, Result};
use crate::quant::GgmlType;

/// The GGUF version written.
pub const VERSION: u32 = 3;
/// Metadata key recording the version of pare's pq layout in a file.
pub const FORMAT_VERSION_KEY: &str = "pare.format_version";
/// The version of the pq layout this build writes (and reads).
pub const FORMAT_VERSION: u32 = 1;
/// Arrays nested deeper than this are not written (the reader rejects them).
const MAX_ARRAY_DEPTH: usize = 8;

/// A tensor to be written: its name, dimensions in ggml order (`dims[0]` is the row length) and type.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dims: &[u64], ggml_type: GgmlType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
        }
    }

    /// Bytes of the tensor's data, or an error naming the tensor when the dimensions are not valid
    /// for its type.
    pub fn n_bytes(&self) -> Result<u64> {
        let bad = |why: String| Error::Invalid(format!("tensor {:?}: {why}", self.name));
        if self.dims.is_empty() || self.dims.len() > MAX_DIMS {
            return Err(bad(format!(
                "{} dimensions (1 to {MAX_DIMS} allowed)",
                self.dims.len()
            )));
        }
        if self.dims.contains(&0) {
            return Err(bad(format!("zero dimension in {:?}", self.dims)));
        }
        let row_len = usize::try_from(self.dims[0]).map_err(|_| bad("row too long".into()))?;
        let row_bytes = self
            .ggml_type
            .row_bytes(row_len)
            .map_err(|e| bad(e.to_string()))?;
        self.dims[1..]
            .iter()
            .try_fold(row_bytes as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {:?} overflow", self.dims)))
    }
}

/// A GGUF file being written; see the module docs.
pub struct GgufWriter<'a> {
    target: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    tensors: Vec<(TensorSpec, u64)>,
    next: usize,
    alignment: u64,
    /// Bytes written so far, for padding.
    pos: u64,
    cancel: Option<&'a AtomicBool>,
}

impl<'a> GgufWriter<'a> {
    /// Validates the metadata and tensor list, opens the temporary file beside `path` and writes the
    /// header. When any tensor has a pq type, `pare.format_version` is added (or set) to
    /// [`FORMAT_VERSION`]. `cancel`, when set, is checked before each tensor: once true, writing
    /// stops with [`Error::Interrupted`] and nothing is left behind.
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, Value)],
        tensors: &[TensorSpec],
        cancel: Option<&'a AtomicBool>,
    ) -> Result<GgufWriter<'a>> {
        let target = path.as_ref().to_path_buf();
        let (metadata, sized, alignment) = prepare(metadata, tensors)?;
        if target.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is a directory, not a file to write",
                target.display()
            )));
        }
        let tmp = crate::atomic_file::temp_path(&target)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(&tmp, e))?;
        let mut w = GgufWriter {
            target,
            tmp,
            out: Some(BufWriter::with_capacity(1 << 20, file)),
            tensors: sized,
            next: 0,
            alignment,
            pos: 0,
            cancel,
        };
        w.write_header(&metadata)?;
        Ok(w)
    }

    /// The tensors still to be written, in order.
    pub fn pending(&self) -> impl Iterator<Item = &TensorSpec> {
        self.tensors[self.next..].iter().map(|(t, _)| t)
    }

    /// Writes the next tensor's data: `name` must be the next tensor of the list given to
    /// [`create`](Self::create) and `data` exactly its size.
    pub fn write_tensor(&mut self, name: &str, data: &[u8]) -> Result<()> {
        self.check_cancel()?;
        let Some((spec, n)) = self.tensors.get(self.next) else {
            return Err(Error::Invalid(format!(
                "tensor {name:?} written after all {} declared tensors",
                self.tensors.len()
            )));
        };
        if spec.name != name {
            return Err(Error::Invalid(format!(
                "tensor {name:?} written where {:?} was declared next",
                spec.name
            )));
        }
        if data.len() as u64 != *n {
            return Err(Error::Invalid(format!(
                "tensor {name:?}: {} bytes given, its dims {:?} as {} take {n}",
                data.len(),
                spec.dims,
                spec.ggml_type
            )));
        }
        self.next += 1;
        self.put(data)?;
        self.pad()
    }

    /// Checks that every tensor was written, flushes and syncs the file, and renames it over the
    /// target. Returns the file's size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        self.check_cancel()?;
        if self.next != self.tensors.len() {
            return Err(Error::Invalid(format!(
                "{} of {} tensors were written (next: {:?})",
                self.next,
                self.tensors.len(),
                self.tensors[self.next].0.name
            )));
        }
        let out = self.out.take().expect("open until finished");
        let file = out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        drop(file);
        crate::atomic_file::persist(&self.tmp, &self.target)?;
        Ok(self.pos)
    }

    fn check_cancel(&self) -> Result<()> {
        match self.cancel {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("open until finished");
        out.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = self.pos.next_multiple_of(self.alignment) - self.pos;
        self.put(&vec![0u8; n as usize])
    }

    fn write_header(&mut self, metadata: &[(String, Value)]) -> Result<()> {
        let h = encode_header(metadata, &self.tensors, self.alignment);
        self.put(&h)?;
        self.pad()
    }
}

impl Drop for GgufWriter<'_> {
    fn drop(&mut self) {
        // Not finished: an error, a cancellation or a caller that gave up. Leave nothing behind.
        if let Some(out) = self.out.take() {
            drop(out);
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a whole file from tensors already in memory (for small files and tests; a converter
/// streams through [`GgufWriter`] instead).
pub fn write_gguf(
    path: impl AsRef<Path>,
    metadata: &[(String, Value)],
    tensors: &[(TensorSpec, &[u8])],
) -> Result<u64> {
    let specs: Vec<TensorSpec> = tensors.iter().map(|(t, _)| t.clone()).collect();
    let mut w = GgufWriter::create(path, metadata, &specs, None)?;
    for (t, data) in tensors {
        w.write_tensor(&t.name, data)?;
    }
    w.finish()
}

fn encode_header(
    metadata: &[(String, Value)],
    tensors: &[(TensorSpec, u64)],
    alignment: u64,
) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(GGUF_MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut h, key);
        h.extend_from_slice(&value.type_id().to_le_bytes());
        put_value(&mut h, value);
    }
    let mut offset = 0u64;
    for (t, n) in tensors {
        put_string(&mut h, &t.name);
        h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            h.extend_from_slice(&d.to_le_bytes());
        }
        h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
        h.extend_from_slice(&offset.to_le_bytes());
        offset += n.next_multiple_of(alignment);
    }
    h
}

/// What the writer and [`layout`] both start from: the metadata checked (its alignment returned)
/// and with `pare.format_version` set when any tensor has a pq type, and the tensors, checked for
/// duplicate names, with their data sizes.
#[allow(clippy::type_complexity)]
fn prepare(
    metadata: &[(String, Value)],
    tensors: &[TensorSpec],
) -> Result<(Vec<(String, Value)>, Vec<(TensorSpec, u64)>, u64)> {
    let mut metadata = metadata.to_vec();
    let alignment = check_metadata(&metadata)?;
    let mut sized = Vec::with_capacity(tensors.len());
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if !names.insert(t.name.as_str()) {
            return Err(Error::Invalid(format!(
                "duplicate tensor name {:?}",
                t.name
            )));
        }
        sized.push((t.clone(), t.n_bytes()?));
    }
    if tensors
        .iter()
        .any(|t| matches!(t.ggml_type, GgmlType::Pq(_)))
    {
        set(
            &mut metadata,
            FORMAT_VERSION_KEY,
            Value::U32(FORMAT_VERSION),
        );
    }
    Ok((metadata, sized, alignment))
}

/// The size of the file [`GgufWriter`] writes for `metadata` and `tensors`, split into the header
/// (padded to the alignment) and the alignment each tensor's data is padded to. A tensor's type
/// changes only its data size, never the header's, so a planner can price choices exactly:
/// file size = header + Σ data bytes rounded up to the alignment.
pub fn layout(metadata: &[(String, Value)], tensors: &[TensorSpec]) -> Result<(u64, u64)> {
    let (metadata, sized, alignment) = prepare(metadata, tensors)?;
    let header = encode_header(&metadata, &sized, alignment).len() as u64;
    Ok((header.next_multiple_of(alignment), alignment))
}

/// Sets `key` to `value`, in place when present, appended otherwise.
pub fn set(metadata: &mut Vec<(String, Value)>, key: &str, value: Value) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some(kv) => kv.1 = value,
        None => metadata.push((key.to_string(), value)),
    }
}

/// Rejects what the reader (or llama.cpp) would reject: duplicate keys, arrays of mixed types or
/// nested too deep, an alignment that is not a u32 power of two. Returns the alignment.
fn check_metadata(metadata: &[(String, Value)]) -> Result<u64> {
    let mut keys = std::collections::HashSet::new();
    for (key, value) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(Error::Invalid(format!("duplicate metadata key {key:?}")));
        }
        check_value(key, value, 0)?;
    }
    match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => Ok(DEFAULT_ALIGNMENT),
        Some((_, Value::U32(a))) if a.is_power_of_two() && *a <= 1 << 20 => Ok(*a as u64),
        Some((_, v)) => Err(Error::Invalid(format!(
            "general.alignment must be a u32 power of two, got {}",
            v.summary()
        ))),
    }
}

fn check_value(key: &str, value: &Value, depth: usize) -> Result<()> {
    let Value::Array(items) = value else {
        return Ok(());
    };
    if depth >= MAX_ARRAY_DEPTH {
        return Err(Error::Invalid(format!(
            "metadata {key:?}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
        )));
    }
    if let Some(first) = items.first() {
        if items.iter().any(|v| v.type_id() != first.type_id()) {
            return Err(Error::Invalid(format!(
                "metadata {key:?}: an array's items must all have one type"
            )));
        }
    }
    items
        .iter()
        .try_for_each(|v| check_value(key, v, depth + 1))
}

fn put_string(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

/// A value's payload (its type id is written by the caller: for an array's items, once).
fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.push(*x as u8),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_bits().to_le_bytes()),
        Value::Bool(x) => h.push(*x as u8),
        Value::String(s) => put_string(h, s),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_bits().to_le_bytes()),
        Value::Array(items) => {
            // An empty array's item type is not recorded in `Value`; u8 is as good as any.
            let elem = items.first().map_or(value_type::U8, Value::type_id);
            h.extend_from_slice(&elem.to_le_bytes());
            h.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(h, item);
            }
        }
    }
}
