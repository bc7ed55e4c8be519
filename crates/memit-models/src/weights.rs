//! Reading checkpoint tensors into host memory: safetensors files (single or
//! sharded with an index), memory-mapped natively or given as bytes (web).

use std::collections::HashMap;
use std::path::PathBuf;
#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use memit_gpu::{DType, GpuContext, Tensor};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

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

/// How a tensor is stored on disk, for the formats patches rewrite exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    F16,
    BF16,
}

impl StoredDtype {
    pub fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::F16 | StoredDtype::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StoredDtype::F32 => "F32",
            StoredDtype::F16 => "F16",
            StoredDtype::BF16 => "BF16",
        }
    }

    pub fn parse(name: &str) -> Option<StoredDtype> {
        [StoredDtype::F32, StoredDtype::F16, StoredDtype::BF16].into_iter().find(|d| d.name() == name)
    }
}

/// A tensor's bytes exactly as stored (little-endian), so an edit can be
/// written back and undone bit for bit.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    /// The name in the checkpoint.
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl StoredTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to f64 (exact for all three dtypes).
    pub fn get(&self, i: usize) -> f64 {
        let b = &self.bytes;
        match self.dtype {
            StoredDtype::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as f64,
            StoredDtype::F16 => half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f64(),
            StoredDtype::BF16 => half::bf16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f64(),
        }
    }

    /// Stores `value` rounded to nearest (ties to even) in the tensor's dtype.
    pub fn set(&mut self, i: usize, value: f64) {
        match self.dtype {
            StoredDtype::F32 => self.bytes[4 * i..4 * i + 4].copy_from_slice(&(value as f32).to_le_bytes()),
            StoredDtype::F16 => self.bytes[2 * i..2 * i + 2].copy_from_slice(&half::f16::from_f64(value).to_bits().to_le_bytes()),
            StoredDtype::BF16 => self.bytes[2 * i..2 * i + 2].copy_from_slice(&half::bf16::from_f64(value).to_bits().to_le_bytes()),
        }
    }

    /// The raw bits of element `i` (zero-extended for 16-bit dtypes).
    pub fn bits(&self, i: usize) -> u32 {
        let s = self.dtype.size();
        let mut word = [0u8; 4];
        word[..s].copy_from_slice(&self.bytes[s * i..s * (i + 1)]);
        u32::from_le_bytes(word)
    }

    pub fn set_bits(&mut self, i: usize, bits: u32) {
        let s = self.dtype.size();
        self.bytes[s * i..s * (i + 1)].copy_from_slice(&bits.to_le_bytes()[..s]);
    }

    /// The values as the GPU loader takes them.
    pub fn to_host(&self) -> HostTensor {
        let data = match self.dtype {
            StoredDtype::F16 => HostData::F16(self.bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()),
            _ => HostData::F32((0..self.len()).map(|i| self.get(i) as f32).collect()),
        };
        HostTensor { shape: self.shape.clone(), data }
    }

    /// SHA-256 of the bytes, hex.
    pub fn sha256(&self) -> String {
        hex(&Sha256::digest(&self.bytes))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Anything tensors can be looked up in by their Hugging Face name.
pub trait WeightSource {
    fn tensor(&self, name: &str) -> Result<Option<HostTensor>>;
    /// Where tensors come from, for error messages.
    fn describe(&self) -> String;
    /// The tensor as stored, for exact rewriting. Sources that convert on
    /// load (GGUF) give the converted values.
    fn stored(&self, name: &str) -> Result<Option<StoredTensor>> {
        Ok(self.tensor(name)?.map(|t| {
            let (dtype, bytes) = match &t.data {
                HostData::F32(v) => (StoredDtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                HostData::F16(v) => (StoredDtype::F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            };
            StoredTensor { name: name.to_string(), dtype, shape: t.shape, bytes }
        }))
    }
    /// SHA-256 over every tensor's name, dtype, shape and bytes: which
    /// weights statistics and patches were made for.
    fn fingerprint(&self) -> String;
    fn contains(&self, name: &str) -> bool {
        self.tensor(name).ok().flatten().is_some()
    }
    /// The tensor already on the GPU, for sources that stream weights to
    /// the GPU as they arrive (the browser) instead of holding them in memory.
    fn uploaded(&self, _name: &str) -> Option<Tensor> {
        None
    }
}

/// A weight source a model can keep (to stream blocks from) and still be
/// moved between threads.
pub type SharedSource = std::sync::Arc<dyn WeightSource + Send + Sync>;

/// Puts a checkpoint tensor on the GPU as the model keeps it: vectors in
/// f32, matrices in `matrix_dtype` (f16 bits go up unconverted).
pub fn upload_weight(ctx: &GpuContext, host: &HostTensor, matrix_dtype: DType) -> Result<Tensor> {
    Ok(match (&host.data, host.shape.len(), matrix_dtype) {
        (HostData::F16(bits), 2, DType::F16) => ctx.upload_f16_bits(&host.shape, bits)?,
        (_, 2, dtype) => ctx.upload(&host.shape, &host.to_f32(), dtype)?,
        _ => ctx.upload(&host.shape, &host.to_f32(), DType::F32)?,
    })
}

/// The bytes of one checkpoint file.
pub enum FileBytes {
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    pub fn bytes(&self) -> &[u8] {
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

    fn raw(&self, name: &str, entry: &Entry) -> Result<&[u8]> {
        self.files[entry.file].bytes().get(entry.range.clone()).ok_or_else(|| ModelError::Checkpoint {
            path: PathBuf::from(&self.names[entry.file]),
            detail: format!("tensor `{name}` lies past the end of the file"),
        })
    }

    /// The file (as named when opened) holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&str> {
        self.index.get(name).map(|e| self.names[e.file].as_str())
    }
}

/// Decodes one safetensors tensor's little-endian bytes.
pub fn decode_safetensors(name: &str, dtype: Dtype, raw: &[u8]) -> Result<HostData> {
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
        Ok(Some(HostTensor { shape: entry.shape.clone(), data: decode_safetensors(name, entry.dtype, self.raw(name, entry)?)? }))
    }

    fn describe(&self) -> String {
        self.names.join(", ")
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn stored(&self, name: &str) -> Result<Option<StoredTensor>> {
        let Some(entry) = self.index.get(name) else { return Ok(None) };
        let dtype = match entry.dtype {
            Dtype::F32 => StoredDtype::F32,
            Dtype::F16 => StoredDtype::F16,
            Dtype::BF16 => StoredDtype::BF16,
            other => return Err(ModelError::UnsupportedDtype { name: name.to_string(), dtype: format!("{other:?} (edits are written for F32, F16 and BF16 tensors)") }),
        };
        Ok(Some(StoredTensor { name: name.to_string(), dtype, shape: entry.shape.clone(), bytes: self.raw(name, entry)?.to_vec() }))
    }

    fn fingerprint(&self) -> String {
        let mut names: Vec<&String> = self.index.keys().collect();
        names.sort();
        let mut hasher = Sha256::new();
        for name in names {
            let entry = &self.index[name];
            hasher.update(format!("{name}|{:?}|{:?}|", entry.dtype, entry.shape).as_bytes());
            hasher.update(self.files[entry.file].bytes().get(entry.range.clone()).unwrap_or_default());
        }
        hex(&hasher.finalize())
    }
}
