//! Small helpers for writing safetensors files.

use std::borrow::Cow;
use std::path::Path;

use candle_core::Tensor;
use safetensors::{Dtype, View};

use crate::{Error, Result};

/// An owned tensor ready for serialization.
#[derive(Debug, Clone)]
pub struct OwnedTensor {
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl OwnedTensor {
    /// f32 values in the given output dtype (F32, BF16 or F16).
    pub fn from_f32(values: &[f32], shape: Vec<usize>, dtype: Dtype) -> Result<Self> {
        let data: Vec<u8> = match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
            other => return Err(Error::Invalid(format!("cannot write tensors as {other:?}"))),
        };
        Ok(OwnedTensor { dtype, shape, data })
    }

    /// An f32 copy of a candle tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let values = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::from_f32(&values, t.dims().to_vec(), Dtype::F32)
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
}

impl View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes tensors to `path` with `{"format": "pt"}` metadata (what transformers and PEFT expect).
pub fn write_file(tensors: &[(String, OwnedTensor)], path: &Path) -> Result<()> {
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    let views: Vec<(&str, &OwnedTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize_to_file(views, metadata, path)
        .map_err(|e| Error::format(path, format!("cannot write safetensors: {e}")))
}

/// Reads back float tensors from a directory of safetensors shards (`model.safetensors` or an index), one tensor at
/// a time (used to write GGUF from the merged shards).
#[derive(Debug)]
pub struct ShardReader {
    files: Vec<std::path::PathBuf>,
    tensors: std::collections::HashMap<String, (usize, Dtype, Vec<usize>, u64, u64)>,
}

impl ShardReader {
    /// Opens the shards of `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        use std::io::Read;
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index, format!("invalid JSON: {e}")))?;
            let mut files: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index, "no weight_map"))?
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::new();
        let mut tensors = std::collections::HashMap::new();
        for (i, n) in names.iter().enumerate() {
            let path = dir.join(n);
            let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            let mut len = [0u8; 8];
            f.read_exact(&mut len).map_err(|e| Error::io(&path, e))?;
            let hlen = u64::from_le_bytes(len);
            if hlen > 100_000_000 {
                return Err(Error::format(&path, "corrupt safetensors header length"));
            }
            let mut header = vec![0u8; hlen as usize];
            f.read_exact(&mut header).map_err(|e| Error::io(&path, e))?;
            let meta: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| Error::format(&path, format!("corrupt safetensors header: {e}")))?;
            for (name, info) in meta {
                if name == "__metadata__" {
                    continue;
                }
                let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
                    Some("F32") => Dtype::F32,
                    Some("BF16") => Dtype::BF16,
                    Some("F16") => Dtype::F16,
                    other => return Err(Error::format(&path, format!("tensor `{name}`: unsupported dtype {other:?}"))),
                };
                let nums =
                    |k: &str| -> Option<Vec<u64>> { info.get(k)?.as_array()?.iter().map(|x| x.as_u64()).collect() };
                let (shape, offs) = match (nums("shape"), nums("data_offsets")) {
                    (Some(s), Some(o)) if o.len() == 2 && o[1] >= o[0] => (s, o),
                    _ => return Err(Error::format(&path, format!("tensor `{name}`: bad header entry"))),
                };
                let shape: Vec<usize> = shape.into_iter().map(|d| d as usize).collect();
                tensors.insert(name, (i, dtype, shape, 8 + hlen + offs[0], offs[1] - offs[0]));
            }
            files.push(path);
        }
        Ok(ShardReader { files, tensors })
    }

    /// A tensor as f32 on the CPU.
    pub fn read(&self, name: &str) -> Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let (fi, dtype, shape, off, len) =
            self.tensors.get(name).ok_or_else(|| Error::Invalid(format!("merged model: no tensor `{name}`")))?;
        let path = &self.files[*fi];
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut buf = vec![0u8; *len as usize];
        f.read_exact_at(&mut buf, *off).map_err(|e| Error::io(path, e))?;
        let values: Vec<f32> = match dtype {
            Dtype::F32 => buf.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => buf.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            Dtype::F16 => buf.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            other => return Err(Error::format(path, format!("tensor `{name}`: unexpected dtype {other:?}"))),
        };
        Ok(Tensor::from_vec(values, shape.clone(), &candle_core::Device::Cpu)?)
    }
}
