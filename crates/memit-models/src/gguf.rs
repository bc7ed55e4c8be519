//! GGUF files (llama.cpp's format) for Llama-architecture models: metadata,
//! tensors dequantised on load (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K,
//! Q5_K, Q6_K), and the
//! embedded BPE tokenizer. Tensors are exposed under their Hugging Face
//! names, with llama.cpp's rotary permutation of q/k undone, so the model
//! code is the same as for a safetensors checkpoint.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::json;

use crate::config::{Arch, ModelConfig, Residual};
use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;
use crate::weights::{FileBytes, HostData, HostTensor, WeightSource};
use memit_gpu::{Activation, RotaryStyle};

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::Float(v) => Some(*v),
            GgufValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct TensorInfo {
    /// Row-major shape (GGUF lists dimensions innermost first).
    shape: Vec<usize>,
    ggml_type: u32,
    offset: usize,
}

/// What a GGUF file's header says: its metadata and where each tensor
/// lies. Parsed from the file's first bytes alone, so a browser can stream
/// the tensors after it one at a time.
pub struct GgufHeader {
    name: String,
    metadata: HashMap<String, GgufValue>,
    tensors: HashMap<String, TensorInfo>,
    data_start: usize,
}

/// A whole GGUF file in memory (or mapped): its header and its bytes.
pub struct GgufSource {
    bytes: FileBytes,
    header: GgufHeader,
}

/// A little-endian reader over the file's first bytes with positioned
/// errors; lengths are checked against the whole file's size.
struct Reader<'a> {
    bytes: &'a [u8],
    file_len: usize,
    pos: usize,
    file: &'a str,
    /// Set when a read ran past `bytes` but not past the file: the header
    /// goes on beyond the bytes given.
    truncated: bool,
}

impl Reader<'_> {
    fn fail(&self, what: &str) -> ModelError {
        ModelError::Checkpoint { path: PathBuf::from(self.file), detail: format!("{what} at byte {}", self.pos) }
    }

    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.file_len).ok_or_else(|| self.fail("unexpected end of file"))?;
        if end > self.bytes.len() {
            self.truncated = true;
            return Err(self.fail("header continues past the bytes read"));
        }
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n).ok().filter(|&n| n <= self.file_len).ok_or_else(|| self.fail("implausible length"))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| self.fail("string is not UTF-8"))
    }

    /// One metadata value; arrays nest at most a few levels deep, so a
    /// crafted file cannot recurse the stack away.
    fn value(&mut self, kind: u32, depth: usize) -> Result<GgufValue> {
        Ok(match kind {
            0 => GgufValue::Int(self.take(1)?[0] as i64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => GgufValue::Int(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            3 => GgufValue::Int(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => GgufValue::Int(self.u32()? as i64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth >= 4 {
                    return Err(self.fail("metadata arrays nested too deeply"));
                }
                let inner = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::Int(self.u64()? as i64),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            other => return Err(self.fail(&format!("unknown metadata type {other}"))),
        })
    }
}

const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q4_0: u32 = 2;
const GGML_Q4_1: u32 = 3;
const GGML_Q8_0: u32 = 8;
const GGML_Q4_K: u32 = 12;
const GGML_Q5_K: u32 = 13;
const GGML_Q6_K: u32 = 14;
const GGML_BF16: u32 = 30;

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// Bytes of `n` elements of a GGML type, or None for unsupported types.
fn type_size(ggml_type: u32, n: usize) -> Option<usize> {
    match ggml_type {
        GGML_F32 => n.checked_mul(4),
        GGML_F16 | GGML_BF16 => n.checked_mul(2),
        GGML_Q4_0 => Some(n / 32 * 18),
        GGML_Q4_1 => Some(n / 32 * 20),
        GGML_Q8_0 => Some(n / 32 * 34),
        GGML_Q4_K => Some(n / QK_K * 144),
        GGML_Q5_K => Some(n / QK_K * 176),
        GGML_Q6_K => Some(n / QK_K * 210),
        _ => None,
    }
}

fn f16_at(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantises GGML blocks of 32: Q4_0 x = d·(q − 8); Q4_1 x = d·q + m;
/// Q8_0 x = d·q. In 4-bit blocks byte j holds element j (low nibble) and
/// element j + 16 (high nibble).
fn dequantize(ggml_type: u32, raw: &[u8], n: usize) -> HostData {
    match ggml_type {
        GGML_F32 => HostData::F32(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        GGML_F16 => HostData::F16(raw.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect()),
        GGML_BF16 => HostData::F32(raw.chunks_exact(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect()),
        GGML_Q8_0 => {
            let mut out = Vec::with_capacity(n);
            for block in raw.chunks_exact(34) {
                let d = f16_at(block);
                out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
            }
            HostData::F32(out)
        }
        GGML_Q4_0 | GGML_Q4_1 => {
            let (block_bytes, header) = if ggml_type == GGML_Q4_0 { (18, 2) } else { (20, 4) };
            let mut out = vec![0.0f32; n];
            for (b, block) in raw.chunks_exact(block_bytes).enumerate() {
                let d = f16_at(block);
                let (offset, min) = if ggml_type == GGML_Q4_0 { (-8.0, 0.0) } else { (0.0, f16_at(&block[2..])) };
                let dst = &mut out[b * 32..b * 32 + 32];
                for (j, &q) in block[header..].iter().enumerate() {
                    dst[j] = d * ((q & 0x0f) as f32 + offset) + min;
                    dst[j + 16] = d * ((q >> 4) as f32 + offset) + min;
                }
            }
            HostData::F32(out)
        }
        GGML_Q4_K | GGML_Q5_K => HostData::F32(dequantize_q45_k(ggml_type == GGML_Q5_K, raw, n)),
        GGML_Q6_K => HostData::F32(dequantize_q6_k(raw, n)),
        _ => unreachable!("checked when the file was opened"),
    }
}

/// Sub-block `j`'s 6-bit scale and min from a Q4_K/Q5_K block's 12 packed
/// bytes: the first four pairs in the low 6 bits of bytes 0-7, the last
/// four split over bytes 8-11 and the top 2 bits of bytes 0-7.
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    if j < 4 {
        ((q[j] & 63) as f32, (q[j + 4] & 63) as f32)
    } else {
        (((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4)) as f32, ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as f32)
    }
}

/// Q4_K (d, dmin, 12 scale bytes, 128 bytes of nibbles) and Q5_K (the
/// same with 32 bytes of fifth bits before the nibbles): eight sub-blocks
/// of 32, x = d·scale·q − dmin·min; each 32 nibble bytes hold two
/// sub-blocks (low nibbles, then high).
fn dequantize_q45_k(five_bits: bool, raw: &[u8], n: usize) -> Vec<f32> {
    let block_bytes = if five_bits { 176 } else { 144 };
    let mut out = vec![0.0f32; n];
    for (b, block) in raw.chunks_exact(block_bytes).enumerate() {
        let (d, dmin) = (f16_at(block), f16_at(&block[2..]));
        let scales = &block[4..16];
        let (high, nibbles) = if five_bits { (&block[16..48], &block[48..]) } else { (&block[..0], &block[16..]) };
        let dst = &mut out[b * QK_K..(b + 1) * QK_K];
        for pair in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * pair, scales);
            let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
            let q = &nibbles[pair * 32..pair * 32 + 32];
            for l in 0..32 {
                let (mut lo, mut hi) = ((q[l] & 0x0f) as f32, (q[l] >> 4) as f32);
                if five_bits {
                    lo += if high[l] & (1 << (2 * pair)) != 0 { 16.0 } else { 0.0 };
                    hi += if high[l] & (2 << (2 * pair)) != 0 { 16.0 } else { 0.0 };
                }
                dst[pair * 64 + l] = d * sc1 * lo - dmin * m1;
                dst[pair * 64 + 32 + l] = d * sc2 * hi - dmin * m2;
            }
        }
    }
    out
}

/// Q6_K (128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed
/// scales, d): sixteen sub-blocks of 16, x = d·scale·(q − 32), in two
/// halves of 128 elements.
fn dequantize_q6_k(raw: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    for (b, block) in raw.chunks_exact(210).enumerate() {
        let d = f16_at(&block[208..]);
        let dst = &mut out[b * QK_K..(b + 1) * QK_K];
        for half in 0..2 {
            let ql = &block[half * 64..half * 64 + 64];
            let qh = &block[128 + half * 32..128 + half * 32 + 32];
            let sc = &block[192 + half * 8..192 + half * 8 + 8];
            let y = &mut dst[half * 128..half * 128 + 128];
            for l in 0..32 {
                let is = l / 16;
                let q = [
                    (ql[l] & 0x0f) | ((qh[l] & 3) << 4),
                    (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                    (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                    (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
                ];
                for (k, &qk) in q.iter().enumerate() {
                    y[l + 32 * k] = d * (sc[is + 2 * k] as i8) as f32 * (qk as i32 - 32) as f32;
                }
            }
        }
    }
    out
}

/// Hugging Face Llama names and their GGUF names: whole-model tensors,
/// then per-block ones under `model.layers.N.` / `blk.N.`.
const MODEL_NAMES: [(&str, &str); 3] = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];
const BLOCK_NAMES: [(&str, &str); 9] = [
    ("input_layernorm.weight", "attn_norm.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
];

/// Renames through the tables above: Hugging Face to GGUF or back.
fn rename(name: &str, hf_to_gguf: bool) -> Option<String> {
    let pick = |pair: &(&'static str, &'static str)| if hf_to_gguf { (pair.0, pair.1) } else { (pair.1, pair.0) };
    if let Some((_, to)) = MODEL_NAMES.iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (prefix, to_prefix) = if hf_to_gguf { ("model.layers.", "blk.") } else { ("blk.", "model.layers.") };
    let (layer, part) = name.strip_prefix(prefix)?.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (_, to) = BLOCK_NAMES.iter().map(pick).find(|(from, _)| *from == part)?;
    Some(format!("{to_prefix}{layer}.{to}"))
}

/// GGUF name of a Hugging Face Llama tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    rename(hf, true)
}

/// Hugging Face name of a GGUF tensor the model uses (None for others,
/// such as precomputed rotary tables).
fn hf_name(gguf: &str) -> Option<String> {
    rename(gguf, false)
}

/// llama.cpp stores q/k rows of each head reordered so rotary pairs are
/// adjacent: GGUF row 2i + s of a head is Hugging Face row s·(hd/2) + i.
fn unpermute_rows(values: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    let rows = values.len() / cols;
    let hd = rows / n_heads;
    let mut out = vec![0.0; values.len()];
    for h in 0..n_heads {
        for i in 0..hd / 2 {
            for s in 0..2 {
                let src = (h * hd + 2 * i + s) * cols;
                let dst = (h * hd + s * (hd / 2) + i) * cols;
                out[dst..dst + cols].copy_from_slice(&values[src..src + cols]);
            }
        }
    }
    out
}

impl GgufHeader {
    /// Parses the header from `prefix`, the first bytes of a `file_len`-byte
    /// file. `Ok(None)`: the header goes on past `prefix`; read more.
    pub fn parse(name: &str, prefix: &[u8], file_len: u64) -> Result<Option<GgufHeader>> {
        let file_len = usize::try_from(file_len).unwrap_or(usize::MAX);
        let mut r = Reader { bytes: prefix, file_len, pos: 0, file: name, truncated: false };
        match GgufHeader::read(&mut r) {
            Err(_) if r.truncated => Ok(None),
            other => other.map(Some),
        }
    }

    fn read(r: &mut Reader) -> Result<GgufHeader> {
        let name = r.file.to_string();
        if r.take(4)? != b"GGUF" {
            return Err(r.fail("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.fail(&format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.len()?;
        let n_kv = r.len()?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let kind = r.u32()?;
            metadata.insert(key, r.value(kind, 0)?);
        }
        let mut tensors = HashMap::new();
        for _ in 0..n_tensors {
            let tname = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(r.fail(&format!("tensor `{tname}` has {n_dims} dimensions")));
            }
            let mut shape = (0..n_dims).map(|_| r.len()).collect::<Result<Vec<_>>>()?;
            shape.reverse();
            let ggml_type = r.u32()?;
            let offset = usize::try_from(r.u64()?).map_err(|_| r.fail("tensor offset overflows"))?;
            tensors.insert(tname, TensorInfo { shape, ggml_type, offset });
        }
        let alignment = metadata.get("general.alignment").and_then(GgufValue::as_u64).unwrap_or(32) as usize;
        let data_start = r.pos.checked_next_multiple_of(alignment.max(1)).ok_or_else(|| r.fail("implausible alignment"))?;
        for (tname, info) in &tensors {
            let Some(n) = info.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
                return Err(ModelError::Checkpoint { path: PathBuf::from(&name), detail: format!("tensor `{tname}` has an implausible shape {:?}", info.shape) });
            };
            let size = type_size(info.ggml_type, n).ok_or_else(|| ModelError::UnsupportedDtype {
                name: tname.clone(),
                dtype: format!("GGML type {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)", info.ggml_type),
            })?;
            let block = if matches!(info.ggml_type, GGML_Q4_K | GGML_Q5_K | GGML_Q6_K) { QK_K } else { 32 };
            if info.ggml_type >= GGML_Q4_0 && info.ggml_type != GGML_BF16 && n % block != 0 {
                return Err(ModelError::Checkpoint { path: PathBuf::from(&name), detail: format!("tensor `{tname}` is not whole {block}-element blocks") });
            }
            if data_start.saturating_add(info.offset).saturating_add(size) > r.file_len {
                return Err(ModelError::Checkpoint { path: PathBuf::from(&name), detail: format!("tensor `{tname}` lies past the end of the file") });
            }
        }
        Ok(GgufHeader { name, metadata, tensors, data_start })
    }

    /// Every tensor's GGUF name and byte range in the file, in file order.
    fn tensor_ranges(&self) -> Vec<(String, std::ops::Range<u64>)> {
        let mut ranges: Vec<_> = self
            .tensors
            .iter()
            .map(|(name, info)| {
                let start = (self.data_start + info.offset) as u64;
                (name.clone(), start..start + self.size_of(info) as u64)
            })
            .collect();
        ranges.sort_by_key(|(_, range)| (range.start, range.end));
        ranges
    }

    fn size_of(&self, info: &TensorInfo) -> usize {
        type_size(info.ggml_type, info.shape.iter().product()).expect("checked when parsed")
    }

    /// GGUF tensor `name` from its `raw` bytes: dequantised, with the q/k
    /// rotary permutation undone.
    pub fn decode(&self, name: &str, raw: &[u8]) -> Result<HostTensor> {
        let info = self.tensors.get(name).ok_or_else(|| ModelError::Checkpoint { path: PathBuf::from(&self.name), detail: format!("no tensor `{name}`") })?;
        let n: usize = info.shape.iter().product();
        if raw.len() != self.size_of(info) {
            return Err(ModelError::Checkpoint { path: PathBuf::from(&self.name), detail: format!("tensor `{name}` needs {} bytes, got {}", self.size_of(info), raw.len()) });
        }
        let mut values = dequantize(info.ggml_type, raw, n);
        let heads_key = if name.ends_with("attn_q.weight") {
            Some("llama.attention.head_count")
        } else if name.ends_with("attn_k.weight") {
            Some("llama.attention.head_count_kv")
        } else {
            None
        };
        if let Some(key) = heads_key {
            let heads = self.metadata(key).or_else(|| self.metadata("llama.attention.head_count")).and_then(GgufValue::as_u64).unwrap_or(1) as usize;
            if heads == 0 || info.shape.len() != 2 || info.shape[0] % heads != 0 {
                return Err(ModelError::Config { field: "gguf metadata", detail: format!("`{key}` = {heads} does not divide the rows of `{name}` {:?}", info.shape) });
            }
            let f32s = HostTensor { shape: info.shape.clone(), data: values }.to_f32();
            values = HostData::F32(unpermute_rows(&f32s, heads, info.shape[1]));
        }
        Ok(HostTensor { shape: info.shape.clone(), data: values })
    }

    /// Whether the file holds tensor `name`.
    fn has_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn meta_u64(&self, key: &str) -> Result<u64> {
        self.metadata(key).and_then(GgufValue::as_u64).ok_or_else(|| ModelError::Config {
            field: "gguf metadata",
            detail: format!("`{key}` missing or not an integer"),
        })
    }

    /// The model configuration from `llama.*` metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.metadata("general.architecture").and_then(GgufValue::as_str).unwrap_or("<missing>");
        if arch != "llama" {
            return Err(ModelError::UnknownArchitecture(format!("{arch} (GGUF files are supported for llama only)")));
        }
        let d_model = self.meta_u64("llama.embedding_length")? as usize;
        let n_heads = self.meta_u64("llama.attention.head_count")? as usize;
        let n_kv_heads = self.metadata("llama.attention.head_count_kv").and_then(GgufValue::as_u64).map_or(n_heads, |v| v as usize);
        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(ModelError::Config { field: "llama.attention.head_count", detail: format!("{n_heads} heads do not divide width {d_model}") });
        }
        let head_dim = d_model / n_heads;
        let vocab_size = match self.metadata("llama.vocab_size").and_then(GgufValue::as_u64) {
            Some(v) => v as usize,
            None => match self.metadata("tokenizer.ggml.tokens") {
                Some(GgufValue::Array(tokens)) => tokens.len(),
                _ => self.tensors.get("token_embd.weight").map_or(0, |t| t.shape[0]),
            },
        };
        let config = ModelConfig {
            arch: Arch::Llama,
            vocab_size,
            d_model,
            n_layers: self.meta_u64("llama.block_count")? as usize,
            n_heads,
            n_kv_heads,
            head_dim,
            d_ff: self.meta_u64("llama.feed_forward_length")? as usize,
            max_positions: self.meta_u64("llama.context_length")? as usize,
            norm_eps: self.metadata("llama.attention.layer_norm_rms_epsilon").and_then(GgufValue::as_f64).unwrap_or(1e-5) as f32,
            rotary_dim: self.metadata("llama.rope.dimension_count").and_then(GgufValue::as_u64).map_or(head_dim, |v| v as usize),
            rotary_style: RotaryStyle::Half,
            rope_theta: self.metadata("llama.rope.freq_base").and_then(GgufValue::as_f64).unwrap_or(10000.0),
            residual: Residual::Sequential,
            activation: Activation::Silu,
            tie_word_embeddings: !self.has_tensor("output.weight"),
            bos_token_id: self.metadata("tokenizer.ggml.bos_token_id").and_then(GgufValue::as_u64).map(|v| v as u32),
            eos_token_id: self.metadata("tokenizer.ggml.eos_token_id").and_then(GgufValue::as_u64).map(|v| v as u32),
        };
        config.validate()?;
        Ok(config)
    }

    /// The embedded byte-level BPE tokenizer (`tokenizer.ggml.model` =
    /// "gpt2"), rebuilt as a Hugging Face tokenizer. Tokens of type 3
    /// (control) become special tokens.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        let model = self.metadata("tokenizer.ggml.model").and_then(GgufValue::as_str).unwrap_or("<missing>");
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!("GGUF tokenizer model `{model}` is not supported (only byte-level BPE, \"gpt2\")")));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            match self.metadata(key) {
                Some(GgufValue::Array(items)) => Ok(items.iter().filter_map(|v| v.as_str().map(String::from)).collect()),
                _ => Err(ModelError::Tokenizer(format!("GGUF has no `{key}`"))),
            }
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match self.metadata("tokenizer.ggml.token_type") {
            Some(GgufValue::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: serde_json::Map<String, serde_json::Value> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        let added: Vec<serde_json::Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| types.get(*i) == Some(&3))
            .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        // SmolLM-style ("smollm") pre-tokenisation also splits digits.
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match self.metadata("tokenizer.ggml.pre").and_then(GgufValue::as_str) {
            Some("smollm") => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]}),
            _ => byte_level,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        TextTokenizer::from_json_bytes(spec.to_string().as_bytes())
    }
}

impl GgufSource {
    pub fn from_bytes(name: String, bytes: FileBytes) -> Result<GgufSource> {
        let data = bytes.bytes();
        let header = GgufHeader::parse(&name, data, data.len() as u64)?.expect("the whole file was given");
        Ok(GgufSource { bytes, header })
    }

    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> Result<GgufSource> {
        GgufSource::from_bytes(path.display().to_string(), FileBytes::map(path)?)
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.header.metadata(key)
    }

    pub fn config(&self) -> Result<ModelConfig> {
        self.header.config()
    }

    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        self.header.tokenizer()
    }
}

impl WeightSource for GgufSource {
    fn tensor(&self, hf_name: &str) -> Result<Option<HostTensor>> {
        let Some(name) = gguf_name(hf_name) else { return Ok(None) };
        let Some(info) = self.header.tensors.get(&name) else { return Ok(None) };
        let start = self.header.data_start + info.offset;
        let raw = &self.bytes.bytes()[start..start + self.header.size_of(info)];
        self.header.decode(&name, raw).map(Some)
    }

    fn describe(&self) -> String {
        self.header.name.clone()
    }

    fn fingerprint(&self) -> String {
        crate::weights::hex(&<sha2::Sha256 as sha2::Digest>::digest(self.bytes.bytes()))
    }
}

/// Reads a `file_len`-byte GGUF file through `read(start, end)` with only
/// its header and one tensor in memory at a time (a browser streaming a
/// model to the GPU): the header first, in growing reads, then every
/// tensor in file order. `each` gets each tensor the model uses, under its
/// Hugging Face name, and the bytes read so far. Returns the header and
/// the SHA-256 of the whole file, the fingerprint `GgufSource` gives, so
/// statistics caches made natively are recognised.
pub async fn stream_gguf<Read, ReadFuture>(
    name: &str,
    file_len: u64,
    mut read: Read,
    mut each: impl FnMut(String, HostTensor, u64) -> Result<()>,
) -> Result<(GgufHeader, String)>
where
    Read: FnMut(u64, u64) -> ReadFuture,
    ReadFuture: std::future::Future<Output = std::result::Result<Vec<u8>, String>>,
{
    let failed = |detail: String| ModelError::Checkpoint { path: PathBuf::from(name), detail };
    let mut prefix_len: u64 = 1 << 20;
    let (header, prefix) = loop {
        let end = prefix_len.min(file_len);
        let prefix = read(0, end).await.map_err(failed)?;
        if prefix.len() as u64 != end {
            return Err(failed(format!("read {} bytes where {end} were asked for", prefix.len())));
        }
        match GgufHeader::parse(name, &prefix, file_len)? {
            Some(header) => break (header, prefix),
            None if end == file_len => return Err(failed("the header runs past the end of the file".into())),
            None => prefix_len = prefix_len.saturating_mul(4),
        }
    };
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut pos = 0u64;
    // Bytes pos..end, from the prefix already read where it covers them.
    let mut next = async |pos: u64, end: u64| -> Result<Vec<u8>> {
        let held = prefix.len() as u64;
        let mut bytes = prefix[pos.min(held) as usize..end.min(held) as usize].to_vec();
        if end > held {
            let rest = read(pos.max(held), end).await.map_err(failed)?;
            if rest.len() as u64 != end - pos.max(held) {
                return Err(failed(format!("the file ended early: wanted bytes up to {end}")));
            }
            bytes.extend(rest);
        }
        Ok(bytes)
    };
    for (tensor, range) in header.tensor_ranges() {
        if range.start < pos {
            return Err(failed(format!("tensor `{tensor}` overlaps the one before it")));
        }
        let chunk = next(pos, range.end).await?;
        sha2::Digest::update(&mut hasher, &chunk);
        if let Some(hf) = hf_name(&tensor) {
            each(hf, header.decode(&tensor, &chunk[(range.start - pos) as usize..])?, range.end)?;
        }
        pos = range.end;
    }
    if pos < file_len {
        sha2::Digest::update(&mut hasher, &next(pos, file_len).await?);
    }
    Ok((header, crate::weights::hex(&sha2::Digest::finalize(hasher))))
}
