//! GGUF reader (versions 2 and 3) over a memory map.
//!
//! The header, metadata and tensor infos are parsed eagerly into owned values; tensor data stays in the
//! map and is handed out as byte slices. Every count read from the file is checked against the bytes
//! that remain before anything is allocated from it, so a malformed file gives an error, not a panic
//! or a huge allocation.
//!
//! The header is read with `pread`, not through the map: a pipeline stage's resident memory must
//! be its own tensors, and touching the header's pages through the map would make them (and, with
//! the page cache's large folios, the first tensors' data beside them) resident in every process.
//! [`Gguf::open_lean`] also leaves out the tokenizer's arrays (a few MB of small values for a
//! 50k-token vocabulary), which a loaded model needs only to build a tokenizer once:
//! [`Gguf::with_complete`] parses the header again for that.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::GgmlType;

pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's limit on tensor rank.
pub const MAX_DIMS: usize = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF's metadata value type ids.
pub mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The size in the file of a value of scalar type `ty`; `None` for strings, arrays and unknown
/// types.
fn fixed_size(ty: u32) -> Option<usize> {
    use value_type as t;
    match ty {
        t::U8 | t::I8 | t::BOOL => Some(1),
        t::U16 | t::I16 => Some(2),
        t::U32 | t::I32 | t::F32 => Some(4),
        t::U64 | t::I64 | t::F64 => Some(8),
        _ => None,
    }
}

/// Whether [`Gguf::open_lean`] leaves a metadata entry out: the tokenizer's arrays.
fn lean_skips(key: &str, ty: u32) -> bool {
    ty == value_type::ARRAY && key.starts_with("tokenizer.")
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, from any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// GGUF's type id for this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => value_type::U8,
            Value::I8(_) => value_type::I8,
            Value::U16(_) => value_type::U16,
            Value::I16(_) => value_type::I16,
            Value::U32(_) => value_type::U32,
            Value::I32(_) => value_type::I32,
            Value::F32(_) => value_type::F32,
            Value::Bool(_) => value_type::BOOL,
            Value::String(_) => value_type::STRING,
            Value::Array(_) => value_type::ARRAY,
            Value::U64(_) => value_type::U64,
            Value::I64(_) => value_type::I64,
            Value::F64(_) => value_type::F64,
        }
    }

    /// A short rendering for `pare inspect`: long arrays are summarised.
    pub fn summary(&self) -> String {
        match self {
            Value::String(s) if s.len() > 80 => {
                let cut: String = s.chars().take(77).collect();
                format!("{:?}...", cut)
            }
            Value::String(s) => format!("{s:?}"),
            Value::Array(a) if a.len() > 8 => format!(
                "[{}, ... ({} items)]",
                a.iter()
                    .take(4)
                    .map(|v| v.summary())
                    .collect::<Vec<_>>()
                    .join(", "),
                a.len()
            ),
            Value::Array(a) => format!(
                "[{}]",
                a.iter().map(|v| v.summary()).collect::<Vec<_>>().join(", ")
            ),
            Value::Bool(b) => b.to_string(),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            other => other.as_i64().map(|v| v.to_string()).unwrap_or_default(),
        }
    }
}

/// One tensor's description from the GGUF header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the row length (contiguous), then rows, ...
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row length (the contiguous dimension).
    pub fn row_len(&self) -> usize {
        self.dims.first().copied().unwrap_or(1) as usize
    }

    /// Number of rows: the product of all dimensions but the first.
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }

    /// Bytes of data (checked for whole blocks when the header was read).
    pub fn n_bytes(&self) -> usize {
        self.n_rows() * self.ggml_type.row_bytes(self.row_len()).unwrap_or(0)
    }
}

/// An open GGUF file: its header parsed, its data mapped.
pub struct Gguf {
    pub path: PathBuf,
    pub version: u32,
    /// Metadata in file order (without the entries in `left_out`).
    pub metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    /// The entries [`Gguf::open_lean`] left out, with their element counts.
    left_out: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    mmap: Mmap,
    /// The file, for reading small tensors without touching the map ([`Gguf::read_tensor`]).
    file: File,
}

impl std::fmt::Debug for Gguf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gguf")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// A bounds-checked little-endian cursor over the file's header, read from the file in growing
/// pieces as the parse goes (the header's size is known only once it has been parsed).
struct Cursor<'f> {
    file: &'f File,
    file_len: usize,
    /// The file's first `buf.len()` bytes.
    buf: Vec<u8>,
    pos: usize,
}

impl<'f> Cursor<'f> {
    /// The first read: most headers (a 50k-token vocabulary's is ~1.8 MB) fit one or two of these.
    const FIRST_READ: usize = 1 << 20;

    fn new(file: &'f File, file_len: usize) -> Cursor<'f> {
        Cursor {
            file,
            file_len,
            buf: Vec::new(),
            pos: 0,
        }
    }

    fn remaining(&self) -> usize {
        self.file_len - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(Error::Gguf(format!(
                "file truncated while reading {what} at byte {} (needs {n} bytes, {} left)",
                self.pos,
                self.remaining()
            )));
        }
        let end = self.pos + n;
        if end > self.buf.len() {
            self.fill(end)?;
        }
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Reads at least up to byte `end` (at most the file's length), doubling what was read.
    fn fill(&mut self, end: usize) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let want = end
            .max(self.buf.len() * 2)
            .max(Self::FIRST_READ)
            .min(self.file_len);
        let old = self.buf.len();
        self.buf.resize(want, 0);
        self.file
            .read_exact_at(&mut self.buf[old..], old as u64)
            .map_err(|e| Error::Gguf(format!("reading the header: {e}")))
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }

    /// Steps over a value as [`Cursor::value`] would read it, checking the same things, without
    /// keeping it; returns its element count (1 for a scalar or string).
    fn skip_value(&mut self, ty: u32, key: &str, depth: usize) -> Result<usize> {
        use value_type as t;
        match ty {
            t::STRING => {
                let what = format!("string length of {key:?}");
                let n = self.count(1, &what)?;
                if std::str::from_utf8(self.take(n, &what)?).is_err() {
                    return Err(Error::Gguf(format!("{what} is not valid UTF-8")));
                }
                Ok(1)
            }
            t::ARRAY => {
                let (elem, n) = self.array_header(key, depth)?;
                match fixed_size(elem) {
                    // Bools are checked one by one, as `value` does.
                    Some(size) if elem != t::BOOL => {
                        self.take(n * size, key)?;
                    }
                    _ => {
                        for _ in 0..n {
                            self.skip_value(elem, key, depth + 1)?;
                        }
                    }
                }
                Ok(n)
            }
            _ => {
                self.value(ty, key, depth)?;
                Ok(1)
            }
        }
    }

    /// An array's element type and length, checked against the nesting limit and the bytes left.
    fn array_header(&mut self, key: &str, depth: usize) -> Result<(u32, usize)> {
        if depth >= 8 {
            return Err(Error::Gguf(format!(
                "metadata {key:?}: arrays nested more than 8 deep"
            )));
        }
        let elem = self.u32(key)?;
        let min = match (elem, fixed_size(elem)) {
            (_, Some(size)) => size,
            // A string's length, or a nested array's element type and length.
            (value_type::STRING, None) => 8,
            (value_type::ARRAY, None) => 12,
            (other, None) => {
                return Err(Error::Gguf(format!(
                    "metadata {key:?}: unknown array element type {other}"
                )))
            }
        };
        let n = self.count(min, &format!("array length of {key:?}"))?;
        Ok((elem, n))
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count of items that each take at least `min_item_bytes`: rejected when the file cannot hold
    /// that many, before anything is allocated for them.
    fn count(&mut self, min_item_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > fits {
            return Err(Error::Gguf(format!(
                "{what} is {n}, more than the {} bytes left in the file can hold",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::Gguf(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Value> {
        use value_type as t;
        Ok(match ty {
            t::U8 => Value::U8(self.u8(key)?),
            t::I8 => Value::I8(self.u8(key)? as i8),
            t::U16 => Value::U16(self.u16(key)?),
            t::I16 => Value::I16(self.u16(key)? as i16),
            t::U32 => Value::U32(self.u32(key)?),
            t::I32 => Value::I32(self.u32(key)? as i32),
            t::F32 => Value::F32(f32::from_bits(self.u32(key)?)),
            t::BOOL => match self.u8(key)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::Gguf(format!(
                        "metadata {key:?}: bool byte is {b}, not 0 or 1"
                    )))
                }
            },
            t::STRING => Value::String(self.string(&format!("string length of {key:?}"))?),
            t::U64 => Value::U64(self.u64(key)?),
            t::I64 => Value::I64(self.u64(key)? as i64),
            t::F64 => Value::F64(f64::from_bits(self.u64(key)?)),
            t::ARRAY => {
                let (elem, n) = self.array_header(key, depth)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(items)
            }
            other => {
                return Err(Error::Gguf(format!(
                    "metadata {key:?}: unknown value type {other}"
                )))
            }
        })
    }
}

impl Gguf {
    /// Opens and parses a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Gguf> {
        Self::open_with(path.as_ref(), false, false)
    }

    /// Opens a GGUF file without keeping the tokenizer's arrays (`tokenizer.*` arrays: the
    /// vocabulary, merges, token types, scores), which are still checked. [`Gguf::get`] does not
    /// find them; [`Gguf::array_len`] gives their lengths and [`Gguf::with_complete`] a complete
    /// parse. For loading a model, which needs them only to build its tokenizer.
    pub fn open_lean(path: impl AsRef<Path>) -> Result<Gguf> {
        Self::open_with(path.as_ref(), true, false)
    }

    /// As [`Gguf::open_lean`], but the file is read into memory instead of mapped: into one
    /// anonymous region that Linux is asked to back with 2 MiB pages (`MADV_HUGEPAGE`, which
    /// transparent huge pages honour in their default `madvise` mode). A file mapping is backed
    /// by 4 KiB pages, and decoding walks every weight once per token: ~24,000 pages for
    /// SmolLM2-135M, whose TLB misses cost 6–17% of decode speed on Zen 3 (BENCHMARKS.md). The
    /// file is read with `pread`, so its page cache is never mapped here and resident memory
    /// is the file's size once. For a process that computes with all of the model; a pipeline
    /// stage, which touches only its layers, keeps the map ([`Gguf::open_lean`]).
    pub fn open_resident(path: impl AsRef<Path>) -> Result<Gguf> {
        Self::open_with(path.as_ref(), true, true)
    }

    fn open_with(path: &Path, lean: bool, resident: bool) -> Result<Gguf> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        // An empty region cannot be mapped anonymously; the parse reports the empty file.
        let mmap = if resident && len > 0 {
            let mut m = memmap2::MmapMut::map_anon(len as usize).map_err(|e| Error::io(path, e))?;
            // Only a hint: without transparent huge pages the region keeps small pages.
            #[cfg(target_os = "linux")]
            let _ = m.advise(memmap2::Advice::HugePage);
            read_all_at(&file, &mut m).map_err(|e| Error::io(path, e))?;
            m.make_read_only().map_err(|e| Error::io(path, e))?
        } else {
            // SAFETY: the map is read-only; pare never writes the files it reads while they are
            // open.
            unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?
        };
        Self::parse(path.to_path_buf(), mmap, file, lean)
            .map_err(|e| Error::Gguf(format!("{}: {}", path.display(), strip_prefix(e))))
    }

    /// Whether every metadata entry was kept (the file was not opened lean, or had nothing to
    /// leave out).
    pub fn is_complete(&self) -> bool {
        self.left_out.is_empty()
    }

    /// Runs `f` on this file with all of its metadata: on `self` when it is complete, else on the
    /// file parsed again (its header only; the new map's pages are not touched), dropped after.
    pub fn with_complete<R>(&self, f: impl FnOnce(&Gguf) -> Result<R>) -> Result<R> {
        if self.is_complete() {
            return f(self);
        }
        let full = Gguf::open(&self.path)?;
        if full.tensors.len() != self.tensors.len() || full.data_offset != self.data_offset {
            return Err(Error::Gguf(format!(
                "{}: the file changed while it was open",
                self.path.display()
            )));
        }
        f(&full)
    }

    /// The length of an array entry, also of one [`Gguf::open_lean`] left out.
    pub fn array_len(&self, key: &str) -> Option<usize> {
        match self.get(key) {
            Some(v) => v.as_array().map(<[Value]>::len),
            None => self.left_out.get(key).copied(),
        }
    }

    fn parse(path: PathBuf, mmap: Mmap, file: File, lean: bool) -> Result<Gguf> {
        let mut c = Cursor::new(&file, mmap.len());
        let magic = c.take(4, "magic")?;
        if magic != GGUF_MAGIC {
            return Err(Error::Gguf(format!(
                "bad magic {:?}: not a GGUF file",
                String::from_utf8_lossy(magic)
            )));
        }
        let version = c.u32("version")?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(Error::Gguf(
                    "GGUF version 1 is not supported (only 2 and 3)".into(),
                ))
            }
            v if (1..=3).contains(&v.swap_bytes()) => {
                return Err(Error::Gguf(
                    "big-endian GGUF files are not supported".into(),
                ))
            }
            v => return Err(Error::Gguf(format!("unknown GGUF version {v}"))),
        }
        // A tensor info takes at least 8 (name len) + 4 (n_dims) + 8 (dim) + 4 (type) + 8 (offset).
        let n_tensors = c.count(32, "tensor count")?;
        // A metadata pair takes at least 8 (key len) + 4 (type) + 1 (value).
        let n_kv = c.count(13, "metadata count")?;

        let mut metadata = Vec::with_capacity(n_kv);
        let mut meta_index = HashMap::with_capacity(n_kv);
        let mut left_out = HashMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("key of metadata entry {i}"))?;
            let ty = c.u32(&key)?;
            if meta_index.contains_key(&key) || left_out.contains_key(&key) {
                return Err(Error::Gguf(format!("duplicate metadata key {key:?}")));
            }
            if lean && lean_skips(&key, ty) {
                let n = c.skip_value(ty, &key, 0)?;
                left_out.insert(key, n);
                continue;
            }
            let value = c.value(ty, &key, 0)?;
            meta_index.insert(key.clone(), metadata.len());
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                    return Err(Error::Gguf(format!(
                        "general.alignment is {}, not a power of two",
                        metadata[i].1.summary()
                    )));
                }
                a
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors);
        let mut tensor_index = HashMap::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor {i}"))?;
            let n_dims = c.u32(&name)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::Gguf(format!(
                    "tensor {name:?} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            let type_id = c.u32(&name)?;
            let ggml_type = GgmlType::from_id(type_id)
                .map_err(|e| Error::Gguf(format!("tensor {name:?}: {}", strip_prefix(e))))?;
            let offset = c.u64(&name)?;
            // Zero or overflowing dimensions, or more than 2^40 elements, cannot be a real tensor.
            let n = dims.iter().try_fold(
                1u64,
                |acc, &d| if d == 0 { None } else { acc.checked_mul(d) },
            );
            if n.is_none_or(|n| n >= 1 << 40) {
                return Err(Error::Gguf(format!(
                    "tensor {name:?} has absurd dimensions {dims:?}"
                )));
            }
            ggml_type
                .row_bytes(dims[0] as usize)
                .map_err(|e| Error::Gguf(format!("tensor {name:?}: {}", strip_prefix(e))))?;
            if offset % alignment != 0 {
                return Err(Error::Gguf(format!(
                    "tensor {name:?}: data offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::Gguf(format!("duplicate tensor name {name:?}")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        drop(c);
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes() as u64));
            match end {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(Error::Gguf(format!(
                        "tensor {:?}: data ({} bytes at offset {}) lies outside the file ({} bytes); the file may be truncated",
                        t.name,
                        t.n_bytes(),
                        data_offset.saturating_add(t.offset),
                        file_len
                    )))
                }
            }
        }

        Ok(Gguf {
            path,
            version,
            metadata,
            meta_index,
            left_out,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            mmap,
            file,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// A required metadata value, or an error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| {
            if self.left_out.contains_key(key) {
                Error::Model(format!(
                    "metadata key {key:?} was left out (the file was opened lean; see Gguf::with_complete)"
                ))
            } else {
                Error::Model(format!("metadata key {key:?} is missing"))
            }
        })
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }

    /// A string array (e.g. the vocabulary), or an error naming the key.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let arr = self
            .require(key)?
            .as_array()
            .ok_or_else(|| Error::Model(format!("metadata {key:?} is not an array")))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Error::Model(format!("metadata {key:?} holds a non-string")))
            })
            .collect()
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor's data (bounds were checked when the file was opened).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.n_bytes()]
    }

    /// A copy of `t`'s bytes read from the file, not through the map. For small tensors read
    /// once (norm weights): touching the map makes the page cache's folios around them resident
    /// in this process, and with large folios (ext4 on Linux 6.16+) those hold other layers'
    /// weights, which a pipeline stage must not count (about 46 MiB for SmolLM2's 61 norms).
    pub fn read_tensor(&self, t: &TensorInfo) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; t.n_bytes()];
        self.file
            .read_exact_at(&mut buf, self.data_offset + t.offset)
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(buf)
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}

/// Fills `buf` from the start of `file` (which must be at least as long), in pieces of 4 MiB
/// so that a read stays within what one `pread` returns.
fn read_all_at(file: &File, buf: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    for (i, piece) in buf.chunks_mut(4 << 20).enumerate() {
        file.read_exact_at(piece, (i * (4 << 20)) as u64)?;
    }
    Ok(())
}

/// Drops the "malformed GGUF: " prefix when an inner error is wrapped again with more context.
fn strip_prefix(e: Error) -> String {
    match e {
        Error::Gguf(s) => s,
        Error::UnsupportedType(s) => s,
        other => other.to_string(),
    }
}

impl AsRef<[u8]> for Gguf {
    fn as_ref(&self) -> &[u8] {
        &self.mmap
    }
}
