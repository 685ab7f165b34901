//! safetensors files: read over a memory map (tensor data is never copied), and written.
//!
//! The layout is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
//! shape and byte range in the data section, then the data. The header is validated here rather
//! than by the `safetensors` crate's reader so that every problem (a truncated file, a header
//! longer than the file, a range outside the data, a dtype that does not match the byte count)
//! gets a message naming the file, the tensor and the numbers. The crate supplies the dtype names
//! and the writer.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
pub use safetensors::Dtype;

use crate::error::{Error, Result};

/// The reference implementation's limit on the JSON header (100 MB).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub dtype: Dtype,
    /// Row-major, outermost first (a `Linear` weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// Absolute byte range of the data in the file.
    pub start: usize,
    pub len: usize,
}

impl TensorEntry {
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open safetensors file: header parsed, data mapped.
pub struct SafetensorsFile {
    pub path: PathBuf,
    /// Tensors in the order of their data.
    pub tensors: Vec<(String, TensorEntry)>,
    index: HashMap<String, usize>,
    /// The header's `__metadata__` strings.
    pub metadata: HashMap<String, String>,
    mmap: Mmap,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl AsRef<[u8]> for SafetensorsFile {
    fn as_ref(&self) -> &[u8] {
        &self.mmap
    }
}

fn st_err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Safetensors(format!("{}: {msg}", path.display()))
}

impl SafetensorsFile {
    /// Opens and validates a safetensors file.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; pare never writes the files it reads while they are open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<SafetensorsFile> {
        let file_len = mmap.len() as u64;
        let Some(len_bytes) = mmap.get(..8) else {
            return Err(st_err(
                &path,
                format!("file is {file_len} bytes, too short for the 8-byte header length"),
            ));
        };
        let n = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        if n > MAX_HEADER_BYTES {
            return Err(st_err(
                &path,
                format!(
                    "header length {n} is over the {MAX_HEADER_BYTES}-byte limit (not a \
                     safetensors file, or a corrupt one)"
                ),
            ));
        }
        if n > file_len - 8 {
            return Err(st_err(
                &path,
                format!(
                    "header length {n} exceeds the {} bytes after it: the file is truncated",
                    file_len - 8
                ),
            ));
        }
        let data_start = 8 + n as usize;
        let header = std::str::from_utf8(&mmap[8..data_start])
            .map_err(|e| st_err(&path, format!("header is not UTF-8: {e}")))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header)
            .map_err(|e| st_err(&path, format!("header is not a JSON object: {e}")))?;
        let data_len = mmap.len() - data_start;

        let mut metadata = HashMap::new();
        let mut tensors = Vec::with_capacity(header.len());
        for (name, v) in header {
            if name == "__metadata__" {
                let m: HashMap<String, String> = serde_json::from_value(v).map_err(|e| {
                    st_err(&path, format!("__metadata__ is not a map of strings: {e}"))
                })?;
                metadata = m;
                continue;
            }
            let entry = Self::entry(&v, data_start, data_len)
                .map_err(|msg| st_err(&path, format!("tensor {name:?}: {msg}")))?;
            tensors.push((name, entry));
        }
        tensors.sort_by_key(|(_, e)| e.start);
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, (name, _))| (name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path,
            tensors,
            index,
            metadata,
            mmap,
        })
    }

    /// One header entry, checked against the data section: `Err` is the problem in words.
    fn entry(
        v: &serde_json::Value,
        data_start: usize,
        data_len: usize,
    ) -> std::result::Result<TensorEntry, String> {
        let dtype_v = v.get("dtype").ok_or("no dtype")?;
        let dtype: Dtype = serde_json::from_value(dtype_v.clone())
            .map_err(|_| format!("unknown dtype {dtype_v}"))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or("shape is missing or not a list of sizes")?;
        let offsets: [usize; 2] = v
            .get("data_offsets")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or("data_offsets is missing or not two sizes")?;
        let [s, e] = offsets;
        if s > e || e > data_len {
            return Err(format!(
                "data_offsets [{s}, {e}] lie outside the {data_len}-byte data section (the file \
                 may be truncated)"
            ));
        }
        let bytes = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.bitsize()))
            .map(|bits| bits.div_ceil(8));
        if bytes != Some(e - s) {
            return Err(format!(
                "shape {shape:?} of {dtype} needs {} bytes but data_offsets [{s}, {e}] hold {}",
                bytes.map_or("too many".into(), |b| b.to_string()),
                e - s
            ));
        }
        Ok(TensorEntry {
            dtype,
            shape,
            start: data_start + s,
            len: e - s,
        })
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.index.get(name).map(|&i| &self.tensors[i].1)
    }

    /// The bytes of a tensor (bounds were checked when the file was opened).
    pub fn data(&self, t: &TensorEntry) -> &[u8] {
        &self.mmap[t.start..t.start + t.len]
    }
}

/// Converts a tensor's little-endian f32/f16/bf16 bytes to f32 values.
pub fn to_f32(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        other => return Err(format!("dtype {other} is not supported (F32, F16, BF16)")),
    }
    Ok(())
}

/// Appends f32 values to `out` as little-endian bytes of `dtype` (F32, F16 or BF16; rounding to
/// nearest even as torch does).
pub fn push_as(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) -> Result<()> {
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
        other => {
            return Err(Error::Invalid(format!(
                "cannot write dtype {other} (f32, f16, bf16)"
            )))
        }
    }
    Ok(())
}

/// A tensor to write whose bytes are produced only when the writer reaches it, so that writing a
/// model holds one tensor's data at a time.
pub struct LazyTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    produce: Box<dyn Fn() -> Vec<u8> + 'a>,
}

impl<'a> LazyTensor<'a> {
    pub fn new(dtype: Dtype, shape: Vec<usize>, produce: impl Fn() -> Vec<u8> + 'a) -> Self {
        LazyTensor {
            dtype,
            shape,
            produce: Box::new(produce),
        }
    }

    pub fn n_bytes(&self) -> usize {
        (self.shape.iter().product::<usize>() * self.dtype.bitsize()).div_ceil(8)
    }
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let v = (self.produce)();
        debug_assert_eq!(v.len(), self.n_bytes());
        Cow::Owned(v)
    }
    fn data_len(&self) -> usize {
        self.n_bytes()
    }
}

/// Writes tensors to a safetensors file, with `{"format": "pt"}` metadata as transformers expects.
pub fn write(path: &Path, tensors: Vec<(String, LazyTensor<'_>)>) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(meta), path)
        .map_err(|e| st_err(path, format!("writing: {e}")))?;
    // The crate writes through a private temporary file (mode 0600); a model is for sharing.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}
