//! Reading checkpoint tensors into host memory: safetensors files (single or
//! sharded with an index), memory-mapped natively or given as bytes (web).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};

/// Tensor values as loaded: f16 bits stay f16 so they can go to the GPU
/// without a round trip through f32.
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<u16>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::F16(bits) => bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        }
    }
}

/// Anything tensors can be looked up in by their Hugging Face name.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<Option<HostTensor>>;
    /// Where tensors come from, for error messages.
    fn describe(&self) -> String;
}

/// The bytes of one checkpoint file.
pub enum FileBytes {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(not(target_arch = "wasm32"))]
            FileBytes::Mapped(m) => m,
            FileBytes::Owned(v) => v,
        }
    }

    /// Memory-maps `path` (the OS pages weights in on demand).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn map(path: &Path) -> Result<FileBytes> {
        let io = |source| ModelError::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a checkpoint modified by another
        // process while loading is outside what we can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(FileBytes::Mapped(map))
    }
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: std::ops::Range<usize>,
}

/// One or more safetensors files viewed as a single name → tensor map.
pub struct SafetensorsSource {
    files: Vec<FileBytes>,
    names: Vec<String>,
    index: HashMap<String, Entry>,
}

impl SafetensorsSource {
    /// Parses each file's header; `names` label the files in errors.
    pub fn from_files(files: Vec<(String, FileBytes)>) -> Result<SafetensorsSource> {
        let mut index = HashMap::new();
        let mut names = Vec::new();
        let mut kept = Vec::new();
        for (i, (name, bytes)) in files.into_iter().enumerate() {
            let (header_len, meta) = SafeTensors::read_metadata(bytes.bytes()).map_err(|e| ModelError::Checkpoint {
                path: PathBuf::from(&name),
                detail: e.to_string(),
            })?;
            let data_start = 8 + header_len;
            for (tensor, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                index.insert(tensor, Entry { file: i, dtype: info.dtype, shape: info.shape.clone(), range: data_start + a..data_start + b });
            }
            names.push(name);
            kept.push(bytes);
        }
        Ok(SafetensorsSource { files: kept, names, index })
    }

    /// Opens `model.safetensors`, or the shards listed in
    /// `model.safetensors.index.json`, in a model folder.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open_dir(dir: &Path) -> Result<SafetensorsSource> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|source| ModelError::Io { path: index_path.clone(), source })?;
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json { path: index_path.clone(), source })?;
            let map = json.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| ModelError::Checkpoint {
                path: index_path.clone(),
                detail: "no weight_map object".into(),
            })?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            return Err(ModelError::Checkpoint {
                path: dir.to_path_buf(),
                detail: "no model.safetensors or model.safetensors.index.json (PyTorch .bin checkpoints are not supported; convert them with safetensors)".into(),
            });
        };
        let opened = files
            .iter()
            .map(|p| Ok((p.display().to_string(), FileBytes::map(p)?)))
            .collect::<Result<Vec<_>>>()?;
        SafetensorsSource::from_files(opened)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }
}

fn decode(name: &str, dtype: Dtype, raw: &[u8]) -> Result<HostData> {
    Ok(match dtype {
        Dtype::F32 => HostData::F32(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        Dtype::F16 => HostData::F16(raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()),
        // bf16 is the top half of an f32: widening is exact.
        Dtype::BF16 => HostData::F32(raw.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()),
        Dtype::F64 => HostData::F32(
            raw.chunks_exact(8).map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32).collect(),
        ),
        other => return Err(ModelError::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?}") }),
    })
}

impl WeightSource for SafetensorsSource {
    fn tensor(&self, name: &str) -> Result<Option<HostTensor>> {
        let Some(entry) = self.index.get(name) else { return Ok(None) };
        let bytes = self.files[entry.file].bytes();
        let raw = bytes.get(entry.range.clone()).ok_or_else(|| ModelError::Checkpoint {
            path: PathBuf::from(&self.names[entry.file]),
            detail: format!("tensor `{name}` lies past the end of the file"),
        })?;
        Ok(Some(HostTensor { shape: entry.shape.clone(), data: decode(name, entry.dtype, raw)? }))
    }

    fn describe(&self) -> String {
        self.names.join(", ")
    }
}
