//! Streaming checkpoints (safetensors, GGUF) into the GPU from the browser:
//! only a file's header and one tensor at a time are ever in wasm memory. Bytes
//! come from user-picked files (`Blob` slices) or URLs (HTTP range requests;
//! a server that ignores ranges is read once into a `Blob`).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use js_sys::Uint8Array;
use memit_gpu::{DType, GpuContext, Tensor};
use memit_models::{decode_safetensors, stream_gguf, upload_weight, HostTensor, ModelConfig, ModelError, Result as ModelResult, TextTokenizer, WeightSource};
use safetensors::Dtype;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

#[wasm_bindgen::prelude::wasm_bindgen]
extern "C" {
    /// The global `fetch`, in windows and workers alike.
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(request: &web_sys::Request) -> js_sys::Promise;
}

/// Where one file's bytes come from.
pub enum ByteSource {
    Blob(web_sys::Blob),
    /// A URL; replaced by the whole body as a `Blob` if the server ignores
    /// `Range`.
    Url(RefCell<Result<String, web_sys::Blob>>),
    Bytes(Uint8Array),
}

fn js_error(context: &str, e: JsValue) -> String {
    let detail = e.as_string().or_else(|| js_sys::JSON::stringify(&e).ok().and_then(|s| s.as_string())).unwrap_or_default();
    let message = e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).unwrap_or(detail);
    format!("{context}: {message}")
}

async fn blob_range(blob: &web_sys::Blob, start: u64, end: u64) -> Result<Vec<u8>, String> {
    let part = blob.slice_with_f64_and_f64(start as f64, end as f64).map_err(|e| js_error("slicing a file", e))?;
    let buffer = JsFuture::from(part.array_buffer()).await.map_err(|e| js_error("reading a file", e))?;
    let bytes = Uint8Array::new(&buffer).to_vec();
    if bytes.len() as u64 != end - start {
        return Err(format!("file ended early: wanted bytes {start}..{end}, got {}", bytes.len()));
    }
    Ok(bytes)
}

/// GET `url` asking for bytes `start..end` (an HTTP `Range` request).
async fn fetch_range(url: &str, start: u64, end: u64) -> Result<web_sys::Response, String> {
    let init = web_sys::RequestInit::new();
    let headers = web_sys::Headers::new().map_err(|e| js_error("headers", e))?;
    headers.set("Range", &format!("bytes={start}-{}", end - 1)).map_err(|e| js_error("headers", e))?;
    init.set_headers(&headers);
    let request = web_sys::Request::new_with_str_and_init(url, &init).map_err(|e| js_error(url, e))?;
    Ok(JsFuture::from(global_fetch(&request)).await.map_err(|e| js_error(&format!("fetching {url}"), e))?.unchecked_into())
}

impl ByteSource {
    /// A `File`/`Blob`, a URL string or a `Uint8Array`.
    pub fn from_js(value: JsValue) -> Result<ByteSource, String> {
        if let Some(url) = value.as_string() {
            return Ok(ByteSource::Url(RefCell::new(Ok(url))));
        }
        if let Some(blob) = value.dyn_ref::<web_sys::Blob>() {
            return Ok(ByteSource::Blob(blob.clone()));
        }
        if let Some(bytes) = value.dyn_ref::<Uint8Array>() {
            return Ok(ByteSource::Bytes(bytes.clone()));
        }
        Err("expected a File/Blob, a URL string or a Uint8Array".into())
    }

    /// Bytes `start..end`.
    pub async fn read(&self, start: u64, end: u64) -> Result<Vec<u8>, String> {
        match self {
            ByteSource::Blob(blob) => blob_range(blob, start, end).await,
            ByteSource::Bytes(bytes) => {
                if end > bytes.length() as u64 {
                    return Err(format!("wanted bytes {start}..{end} of a {}-byte array", bytes.length()));
                }
                Ok(bytes.subarray(start as u32, end as u32).to_vec())
            }
            ByteSource::Url(state) => {
                let url = match &*state.borrow() {
                    Err(blob) => return blob_range(blob, start, end).await,
                    Ok(url) => url.clone(),
                };
                let response = fetch_range(&url, start, end).await?;
                match response.status() {
                    206 => {
                        let buffer = JsFuture::from(response.array_buffer().map_err(|e| js_error(&url, e))?).await.map_err(|e| js_error(&url, e))?;
                        Ok(Uint8Array::new(&buffer).to_vec())
                    }
                    200 => {
                        let blob: web_sys::Blob = JsFuture::from(response.blob().map_err(|e| js_error(&url, e))?).await.map_err(|e| js_error(&url, e))?.unchecked_into();
                        *state.borrow_mut() = Err(blob.clone());
                        blob_range(&blob, start, end).await
                    }
                    status => Err(format!("fetching {url}: HTTP {status}")),
                }
            }
        }
    }

    /// The file's size in bytes; for a URL, from the `Content-Range` of a
    /// one-byte ranged request.
    pub async fn len(&self) -> Result<u64, String> {
        let url = match self {
            ByteSource::Blob(blob) => return Ok(blob.size() as u64),
            ByteSource::Bytes(bytes) => return Ok(bytes.length() as u64),
            ByteSource::Url(state) => match &*state.borrow() {
                Err(blob) => return Ok(blob.size() as u64),
                Ok(url) => url.clone(),
            },
        };
        let response = fetch_range(&url, 0, 1).await?;
        match response.status() {
            206 => {
                let range = response.headers().get("Content-Range").map_err(|e| js_error(&url, e))?.unwrap_or_default();
                range
                    .rsplit_once('/')
                    .and_then(|(_, total)| total.trim().parse().ok())
                    .ok_or_else(|| format!("{url}: the server gave no file size (Content-Range {range:?}); pick the file from disk instead"))
            }
            200 => {
                let blob: web_sys::Blob = JsFuture::from(response.blob().map_err(|e| js_error(&url, e))?).await.map_err(|e| js_error(&url, e))?.unchecked_into();
                *state_of(self).borrow_mut() = Err(blob.clone());
                Ok(blob.size() as u64)
            }
            status => Err(format!("fetching {url}: HTTP {status}")),
        }
    }

    /// The whole file (for small files: config.json, tokenizer.json).
    pub async fn read_all(&self) -> Result<Vec<u8>, String> {
        match self {
            ByteSource::Blob(blob) => blob_range(blob, 0, blob.size() as u64).await,
            ByteSource::Bytes(bytes) => Ok(bytes.to_vec()),
            ByteSource::Url(state) => {
                let url = match &*state.borrow() {
                    Err(blob) => return blob_range(blob, 0, blob.size() as u64).await,
                    Ok(url) => url.clone(),
                };
                let response: web_sys::Response = JsFuture::from(global_fetch(&web_sys::Request::new_with_str(&url).map_err(|e| js_error(&url, e))?))
                    .await
                    .map_err(|e| js_error(&format!("fetching {url}"), e))?
                    .unchecked_into();
                if !response.ok() {
                    return Err(format!("fetching {url}: HTTP {}", response.status()));
                }
                let buffer = JsFuture::from(response.array_buffer().map_err(|e| js_error(&url, e))?).await.map_err(|e| js_error(&url, e))?;
                Ok(Uint8Array::new(&buffer).to_vec())
            }
        }
    }
}

/// The URL state of a `ByteSource::Url`.
fn state_of(source: &ByteSource) -> &RefCell<Result<String, web_sys::Blob>> {
    match source {
        ByteSource::Url(state) => state,
        _ => unreachable!("only called for URLs"),
    }
}

#[derive(Deserialize)]
struct HeaderEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: (u64, u64),
}

/// Weights already on the GPU, keyed by checkpoint name; what
/// `Model::load` builds the model from.
pub struct UploadedWeights {
    tensors: HashMap<String, Tensor>,
    fingerprint: String,
    files: String,
}

impl WeightSource for UploadedWeights {
    fn tensor(&self, _name: &str) -> ModelResult<Option<HostTensor>> {
        Ok(None)
    }

    fn describe(&self) -> String {
        self.files.clone()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn uploaded(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }
}

/// Reads every tensor of `files` (safetensors, possibly shards) one at a
/// time, uploads it, and hashes it as `WeightSource::fingerprint` does
/// natively, so statistics caches made by the CLI are recognised here.
pub async fn stream_safetensors(
    ctx: &GpuContext,
    files: &[(String, ByteSource)],
    matrix_dtype: DType,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<UploadedWeights, String> {
    let mut index = BTreeMap::new();
    for (i, (name, source)) in files.iter().enumerate() {
        let len_bytes = source.read(0, 8).await?;
        let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        if header_len > 100 << 20 {
            return Err(format!("{name} is not a safetensors file (header length {header_len})"));
        }
        let header = source.read(8, 8 + header_len).await?;
        let entries: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| format!("{name}: bad safetensors header: {e}"))?;
        for (tensor, value) in entries {
            if tensor == "__metadata__" {
                continue;
            }
            let e: HeaderEntry = serde_json::from_value(value).map_err(|e| format!("{name}: tensor {tensor}: {e}"))?;
            let start = 8 + header_len;
            index.insert(tensor, Entry { file: i, dtype: e.dtype, shape: e.shape, range: (start + e.data_offsets[0], start + e.data_offsets[1]) });
        }
    }
    let total: u64 = index.values().map(|e| e.range.1 - e.range.0).sum();
    let mut done = 0;
    let mut hasher = Sha256::new();
    let mut tensors = HashMap::new();
    for (name, entry) in &index {
        let raw = files[entry.file].1.read(entry.range.0, entry.range.1).await?;
        hasher.update(format!("{name}|{:?}|{:?}|", entry.dtype, entry.shape).as_bytes());
        hasher.update(&raw);
        // Model weights are vectors and matrices; higher-rank entries are
        // buffers such as GPT-2's stored causal masks, which are not needed.
        if entry.shape.len() <= 2 {
            let data = decode_safetensors(name, entry.dtype, &raw).map_err(|e: ModelError| e.to_string())?;
            let host = HostTensor { shape: entry.shape.clone(), data };
            tensors.insert(name.clone(), upload_weight(ctx, &host, matrix_dtype).map_err(|e| e.to_string())?);
        }
        done += raw.len() as u64;
        progress(done, total);
    }
    let fingerprint = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let files = files.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
    Ok(UploadedWeights { tensors, fingerprint, files })
}

/// A GGUF model streamed to the GPU: its weights, configuration and
/// embedded tokenizer.
pub struct StreamedGguf {
    pub weights: UploadedWeights,
    pub config: ModelConfig,
    pub tokenizer: TextTokenizer,
}

/// Reads a GGUF file tensor by tensor (each dequantised in wasm memory,
/// uploaded, then dropped) and hashes it whole as `GgufSource` does
/// natively, so statistics caches made by the CLI are recognised here.
pub async fn stream_gguf_file(ctx: &GpuContext, name: &str, source: &ByteSource, matrix_dtype: DType, progress: &mut dyn FnMut(u64, u64)) -> Result<StreamedGguf, String> {
    let total = source.len().await?;
    let mut tensors = HashMap::new();
    let mut upload = |hf_name: String, host: HostTensor, done: u64| {
        tensors.insert(hf_name, upload_weight(ctx, &host, matrix_dtype)?);
        progress(done, total);
        Ok(())
    };
    let (header, fingerprint) = stream_gguf(name, total, |start, end| source.read(start, end), &mut upload).await.map_err(|e| e.to_string())?;
    let config = header.config().map_err(|e| e.to_string())?;
    let tokenizer = header.tokenizer().map_err(|e| e.to_string())?;
    Ok(StreamedGguf { weights: UploadedWeights { tensors, fingerprint, files: name.to_string() }, config, tokenizer })
}
