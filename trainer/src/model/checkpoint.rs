//! Reading Hugging Face safetensors checkpoints (single file or sharded with an index) tensor by
//! tensor, straight from the file into the target dtype, so that peak memory stays near the size of
//! the loaded model and not the size of the files.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::{Error, Result};

/// On-disk element types we can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DiskDType {
    /// 32-bit float.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// Unsigned bytes (bitsandbytes' packed 4-bit weights and quantization maps).
    U8,
    /// 64-bit integers.
    I64,
    /// 32-bit integers.
    I32,
}

impl DiskDType {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "F32" => DiskDType::F32,
            "BF16" => DiskDType::BF16,
            "F16" => DiskDType::F16,
            "U8" => DiskDType::U8,
            "I64" => DiskDType::I64,
            "I32" => DiskDType::I32,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DiskDType::F32 | DiskDType::I32 => 4,
            DiskDType::BF16 | DiskDType::F16 => 2,
            DiskDType::U8 => 1,
            DiskDType::I64 => 8,
        }
    }

    /// The `safetensors` crate's dtype.
    pub fn to_safetensors(self) -> safetensors::Dtype {
        match self {
            DiskDType::F32 => safetensors::Dtype::F32,
            DiskDType::BF16 => safetensors::Dtype::BF16,
            DiskDType::F16 => safetensors::Dtype::F16,
            DiskDType::U8 => safetensors::Dtype::U8,
            DiskDType::I64 => safetensors::Dtype::I64,
            DiskDType::I32 => safetensors::Dtype::I32,
        }
    }

    /// The safetensors spelling (`F32`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DiskDType::F32 => "F32",
            DiskDType::BF16 => "BF16",
            DiskDType::F16 => "F16",
            DiskDType::U8 => "U8",
            DiskDType::I64 => "I64",
            DiskDType::I32 => "I32",
        }
    }
}

/// Where one tensor lives and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Index into [`Checkpoint::files`].
    pub file: usize,
    /// Element type on disk.
    pub dtype: DiskDType,
    /// Shape.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// An opened checkpoint: the headers of all its safetensors files, nothing else read yet.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model directory.
    pub dir: PathBuf,
    /// The safetensors files, in index order.
    pub files: Vec<PathBuf>,
    handles: Vec<File>,
    tensors: HashMap<String, TensorInfo>,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir` and reads the
    /// headers of every file, validating that each tensor's bytes lie inside its file.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text)
                .map_err(|e| Error::format(&index_path, format!("invalid shard index: {e}")))?;
            let mut names: Vec<String> = index.weight_map.values().cloned().collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                return Err(Error::format(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in this directory",
                ));
            }
            vec![single]
        };
        let mut handles = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            for (name, info) in read_header(path, &file, i)? {
                tensors.insert(name, info);
            }
            handles.push(file);
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, handles, tensors })
    }

    /// Whether the checkpoint holds a tensor of that name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Header information of a tensor.
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor { path: self.dir.clone(), name: name.to_string() })
    }

    /// All tensor names with their header information.
    pub fn tensors(&self) -> impl Iterator<Item = (&String, &TensorInfo)> {
        self.tensors.iter()
    }

    /// Reads a whole tensor, checking its shape, converted to `dtype` on `device`.
    pub fn load(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.info(name)?;
        if info.shape != shape {
            return Err(Error::ShapeMismatch {
                path: self.files[info.file].clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.clone(),
            });
        }
        self.load_rows(name, 0, shape[0], dtype, device)
    }

    /// Reads rows `start..start+len` of the leading dimension of a tensor (a contiguous byte range)
    /// as a tensor of shape `[len, rest...]`, converted to `dtype`.
    pub fn load_rows(&self, name: &str, start: usize, len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let info = self.info(name)?;
        let row: usize = info.shape.iter().skip(1).product();
        let mut shape = vec![len];
        shape.extend_from_slice(info.shape.get(1..).unwrap_or(&[]));
        self.load_range(name, start * row, &shape, dtype, device)
    }

    /// Reads `shape.product()` consecutive elements starting at flat element `first` (for example
    /// one expert's slice of a fused expert tensor), converted to `dtype`.
    pub fn load_range(
        &self,
        name: &str,
        first: usize,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let info = self.info(name)?;
        let count: usize = shape.iter().product();
        if first + count > info.numel() {
            return Err(Error::format(
                &self.files[info.file],
                format!("tensor `{name}`: elements {first}..{} out of range (it has {})", first + count, info.numel()),
            ));
        }
        let bytes = self.read_bytes(info, first, count)?;
        bytes_to_tensor(&bytes, info.dtype, shape, dtype, device)
            .map_err(|e| Error::format(&self.files[info.file], format!("tensor `{name}`: {e}")))
    }

    /// Reads the raw bytes of a tensor (for quantized payloads such as bitsandbytes' packed codes).
    pub fn load_raw(&self, name: &str) -> Result<(Vec<u8>, &TensorInfo)> {
        let info = self.info(name)?;
        let bytes = self.read_bytes(info, 0, info.numel())?;
        Ok((bytes, info))
    }

    fn read_bytes(&self, info: &TensorInfo, first_elem: usize, count: usize) -> Result<Vec<u8>> {
        let size = info.dtype.size();
        let mut buf = vec![0u8; count * size];
        let path = &self.files[info.file];
        self.handles[info.file]
            .read_exact_at(&mut buf, info.offset + (first_elem * size) as u64)
            .map_err(|e| Error::io(path, e))?;
        Ok(buf)
    }
}

/// Parses one safetensors header and checks every tensor's byte range against the file size.
fn read_header(path: &Path, file: &File, index: usize) -> Result<Vec<(String, TensorInfo)>> {
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let bad = |m: String| Error::format(path, m);
    if file_len < 8 {
        return Err(bad(format!("truncated safetensors file: {file_len} bytes, not even a header length")));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact_at(&mut len_bytes, 0).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(bad(format!(
            "truncated or corrupt safetensors file: header claims {header_len} bytes, file has {file_len}"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| Error::io(path, e))?;
    let entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let data_start = 8 + header_len;
    let mut out = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry =
            serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: invalid header entry: {e}")))?;
        let dtype = DiskDType::parse(&entry.dtype)
            .ok_or_else(|| bad(format!("tensor `{name}`: unsupported dtype {}", entry.dtype)))?;
        let [begin, end] = entry.data_offsets;
        let numel: usize = entry.shape.iter().product();
        if end < begin || end - begin != (numel * dtype.size()) as u64 {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets {begin}..{end} do not fit shape {:?} of {}",
                entry.shape, entry.dtype
            )));
        }
        if data_start + end > file_len {
            return Err(bad(format!(
                "truncated safetensors file: tensor `{name}` needs bytes up to {}, the file has {file_len}",
                data_start + end
            )));
        }
        out.push((name, TensorInfo { file: index, dtype, shape: entry.shape, offset: data_start + begin }));
    }
    Ok(out)
}

/// Converts little-endian bytes of `from` elements into a tensor of `to` dtype.
fn bytes_to_tensor(
    bytes: &[u8],
    from: DiskDType,
    shape: &[usize],
    to: DType,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let same = matches!(
        (from, to),
        (DiskDType::F32, DType::F32) | (DiskDType::BF16, DType::BF16) | (DiskDType::F16, DType::F16)
    );
    let t = if same {
        Tensor::from_raw_buffer(bytes, to, shape, device).map_err(|e| e.to_string())?
    } else {
        let values: Vec<f32> = match from {
            DiskDType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DiskDType::BF16 => {
                bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            DiskDType::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(format!("stored as {}, expected a float dtype", other.name())),
        };
        Tensor::from_vec(values, shape, device).and_then(|t| t.to_dtype(to)).map_err(|e| e.to_string())?
    };
    Ok(t)
}
