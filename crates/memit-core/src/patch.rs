//! Edit patches: what an edit changed, small enough to share and exact
//! enough to undo. Each rewritten W_out is kept as its low-rank factors
//! (ΔW = residᵀ·x, rank ≤ number of requests) plus the few elements where
//! subtracting ΔW does not round back to the original value, so `revert`
//! restores the original bytes bit for bit. ΔW is expanded on the CPU in
//! f64 with a fixed summation order: every machine (and the browser)
//! computes the same bytes from the same patch, which the SHA-256 of the
//! tensor before and after the edit checks.

use std::collections::HashMap;

use memit_models::{StoredDtype, StoredTensor, WeightLayout};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::edit::LayerUpdate;
use crate::error::{MemitError, Result};
use crate::integrity::{serialize_hashed, verify};
use crate::request::EditRequest;

/// v2 hashes the whole file (header metadata and tensors); v1 files, whose
/// hash covered the tensors only, are still read.
const FORMAT: &str = "memit-wgpu-patch-v2";
const FORMAT_V1: &str = "memit-wgpu-patch-v1";
/// The metadata key holding the hash of everything else in the file.
const HASH_KEY: &str = "patch_sha256";

/// One rewritten weight matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchLayer {
    pub layer: usize,
    /// Checkpoint name of the tensor, e.g. `transformer.h.3.mlp.c_proj.weight`.
    pub tensor: String,
    pub layout: WeightLayout,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    /// [n, d_model]
    pub resid: Vec<f32>,
    /// [n, d_ff]
    pub x: Vec<f32>,
    pub base_sha256: String,
    pub edited_sha256: String,
    /// (element index, original bits) where edited − ΔW does not round to
    /// the original.
    pub revert_fixups: Vec<(u32, u32)>,
}

/// Everything about one edit that is needed to apply, undo and explain it.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// Fingerprint of the unedited model's weights (`WeightSource::fingerprint`).
    pub model_fingerprint: String,
    pub requests: Vec<EditRequest>,
    /// The hyperparameters the edit ran with.
    pub hparams: serde_json::Value,
    pub layers: Vec<PatchLayer>,
}

/// Summary of one layer's change, for `diff`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerChange {
    pub layer: usize,
    pub tensor: String,
    pub rank_bound: usize,
    /// ‖ΔW‖_F and ‖W‖_F of the original.
    pub delta_norm: f64,
    pub weight_norm: f64,
}

fn patch_error(detail: impl Into<String>) -> MemitError {
    MemitError::Patch(detail.into())
}

impl PatchLayer {
    fn n(&self) -> usize {
        self.resid.len() / self.d_model()
    }

    fn d_model(&self) -> usize {
        match self.layout {
            WeightLayout::OutIn => self.shape[0],
            WeightLayout::InOut => self.shape[1],
        }
    }

    /// (factor indexed by the stored row, factor indexed by the stored
    /// column): ΔW_stored[row][col] = Σ_r rows[r][row] · cols[r][col].
    fn factors(&self) -> (&[f32], &[f32]) {
        match self.layout {
            WeightLayout::OutIn => (&self.resid, &self.x),
            WeightLayout::InOut => (&self.x, &self.resid),
        }
    }

    /// Calls `f(row, Δ row)` for every stored row, in f64, summing over the
    /// requests in order (no FMA, no reordering: bitwise reproducible).
    fn for_each_delta_row(&self, mut f: impl FnMut(usize, &[f64])) {
        let (rows, cols) = (self.shape[0], self.shape[1]);
        let n = self.n();
        let (row_factor, col_factor) = self.factors();
        let col_factor: Vec<f64> = col_factor.iter().map(|&v| v as f64).collect();
        let mut acc = vec![0.0f64; cols];
        for row in 0..rows {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for r in 0..n {
                let a = row_factor[r * rows + row] as f64;
                for (out, &b) in acc.iter_mut().zip(&col_factor[r * cols..(r + 1) * cols]) {
                    *out += a * b;
                }
            }
            f(row, &acc);
        }
    }

    fn check(&self, tensor: &StoredTensor) -> Result<()> {
        if tensor.dtype != self.dtype || tensor.shape != self.shape {
            return Err(patch_error(format!(
                "`{}` is {} {:?} in this model, the patch was made for {} {:?}",
                self.tensor,
                tensor.dtype.name(),
                tensor.shape,
                self.dtype.name(),
                self.shape
            )));
        }
        Ok(())
    }

    /// W + ΔW, rounded to the stored dtype.
    fn add_delta(&self, tensor: &StoredTensor, sign: f64) -> StoredTensor {
        let mut out = tensor.clone();
        let cols = self.shape[1];
        self.for_each_delta_row(|row, delta| {
            for (c, &d) in delta.iter().enumerate() {
                let i = row * cols + c;
                out.set(i, tensor.get(i) + sign * d);
            }
        });
        out
    }

    /// ‖ΔW‖²_F = Σ_{r,s} (a_r·a_s)(b_r·b_s), without forming ΔW.
    fn delta_norm(&self) -> f64 {
        let n = self.n();
        let d = self.d_model();
        let d_ff = self.x.len() / n.max(1);
        let dot = |v: &[f32], len: usize, r: usize, s: usize| (0..len).map(|j| v[r * len + j] as f64 * v[s * len + j] as f64).sum::<f64>();
        let mut total = 0.0;
        for r in 0..n {
            for s in 0..n {
                total += dot(&self.resid, d, r, s) * dot(&self.x, d_ff, r, s);
            }
        }
        total.max(0.0).sqrt()
    }
}

impl Patch {
    /// Builds the patch of `updates` (from `apply_memit`) against the
    /// unedited tensors `originals` (same order), and returns it with the
    /// edited tensors to write.
    pub fn build(
        model_fingerprint: String,
        requests: Vec<EditRequest>,
        hparams: serde_json::Value,
        updates: &[LayerUpdate],
        originals: &[StoredTensor],
        layout: WeightLayout,
    ) -> Result<(Patch, Vec<StoredTensor>)> {
        if updates.len() != originals.len() {
            return Err(patch_error("one original tensor per updated layer is needed"));
        }
        let mut layers = Vec::new();
        let mut edited = Vec::new();
        for (update, original) in updates.iter().zip(originals) {
            if original.shape.len() != 2 {
                return Err(patch_error(format!("`{}` is not a matrix", original.name)));
            }
            let mut layer = PatchLayer {
                layer: update.layer,
                tensor: original.name.clone(),
                layout,
                dtype: original.dtype,
                shape: original.shape.clone(),
                resid: update.resid.clone(),
                x: update.x.clone(),
                base_sha256: original.sha256(),
                edited_sha256: String::new(),
                revert_fixups: Vec::new(),
            };
            let d = layer.d_model();
            let d_ff = original.len() / d;
            if update.resid.len() % d != 0 || update.x.len() != update.resid.len() / d * d_ff {
                return Err(patch_error(format!("factors of layer {} do not fit `{}` {:?}", update.layer, original.name, original.shape)));
            }
            let new = layer.add_delta(original, 1.0);
            let back = layer.add_delta(&new, -1.0);
            layer.revert_fixups = (0..original.len())
                .filter(|&i| back.bits(i) != original.bits(i))
                .map(|i| (i as u32, original.bits(i)))
                .collect();
            layer.edited_sha256 = new.sha256();
            layers.push(layer);
            edited.push(new);
        }
        Ok((Patch { model_fingerprint, requests, hparams, layers }, edited))
    }

    fn layer_for(&self, tensor: &StoredTensor) -> Result<&PatchLayer> {
        self.layers.iter().find(|l| l.tensor == tensor.name).ok_or_else(|| patch_error(format!("the patch does not change `{}`", tensor.name)))
    }

    /// The edited version of one unedited tensor.
    pub fn apply_to(&self, original: &StoredTensor) -> Result<StoredTensor> {
        let layer = self.layer_for(original)?;
        layer.check(original)?;
        let sha = original.sha256();
        if sha != layer.base_sha256 {
            let hint = if sha == layer.edited_sha256 { "it already has this patch applied" } else { "the patch was made for another model (or this one was edited since)" };
            return Err(patch_error(format!("`{}` does not match the patch's original (sha256 {} ≠ {}): {hint}", layer.tensor, &sha[..12], &layer.base_sha256[..12])));
        }
        let new = layer.add_delta(original, 1.0);
        if new.sha256() != layer.edited_sha256 {
            return Err(patch_error(format!("applying to `{}` did not reproduce the recorded result", layer.tensor)));
        }
        Ok(new)
    }

    /// The original version of one edited tensor, bit for bit.
    pub fn revert(&self, edited: &StoredTensor) -> Result<StoredTensor> {
        let layer = self.layer_for(edited)?;
        layer.check(edited)?;
        let sha = edited.sha256();
        if sha != layer.edited_sha256 {
            let hint = if sha == layer.base_sha256 { "the patch is not applied to it" } else { "it was not produced by this patch" };
            return Err(patch_error(format!("`{}` does not match the patch's edited weights: {hint}", layer.tensor)));
        }
        let mut back = layer.add_delta(edited, -1.0);
        for &(i, bits) in &layer.revert_fixups {
            back.set_bits(i as usize, bits);
        }
        if back.sha256() != layer.base_sha256 {
            return Err(patch_error(format!("reverting `{}` did not restore the original bytes", layer.tensor)));
        }
        Ok(back)
    }

    /// Per layer: the tensor, rank bound, ‖ΔW‖ and ‖W‖ of `originals`.
    pub fn changes(&self, originals: &[StoredTensor]) -> Vec<LayerChange> {
        self.layers
            .iter()
            .map(|l| {
                let weight_norm = originals.iter().find(|t| t.name == l.tensor).map(|t| (0..t.len()).map(|i| t.get(i).powi(2)).sum::<f64>().sqrt()).unwrap_or(f64::NAN);
                LayerChange { layer: l.layer, tensor: l.tensor.clone(), rank_bound: l.n(), delta_norm: l.delta_norm(), weight_norm }
            })
            .collect()
    }

    /// The patch as a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let tensors = self.tensor_data();
        let mut meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("model_fingerprint".into(), self.model_fingerprint.clone()),
            ("requests".into(), serde_json::to_string(&self.requests).expect("requests serialise")),
            ("hparams".into(), self.hparams.to_string()),
            ("layers".into(), self.layers.iter().map(|l| l.layer.to_string()).collect::<Vec<_>>().join(",")),
        ]);
        for l in &self.layers {
            let key = |k: &str| format!("layer.{}.{k}", l.layer);
            meta.insert(key("tensor"), l.tensor.clone());
            meta.insert(key("layout"), match l.layout { WeightLayout::OutIn => "out_in", WeightLayout::InOut => "in_out" }.into());
            meta.insert(key("dtype"), l.dtype.name().into());
            meta.insert(key("shape"), format!("{},{}", l.shape[0], l.shape[1]));
            meta.insert(key("base_sha256"), l.base_sha256.clone());
            meta.insert(key("edited_sha256"), l.edited_sha256.clone());
        }
        serialize_hashed(&tensors, meta, HASH_KEY).map_err(patch_error)
    }

    fn tensor_data(&self) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
        let mut out = Vec::new();
        for l in &self.layers {
            let n = l.n();
            let bytes = |v: &mut dyn Iterator<Item = u32>| v.flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
            out.push((format!("layer.{}.resid", l.layer), Dtype::F32, vec![n, l.resid.len() / n], bytes(&mut l.resid.iter().map(|v| v.to_bits()))));
            out.push((format!("layer.{}.x", l.layer), Dtype::F32, vec![n, l.x.len() / n], bytes(&mut l.x.iter().map(|v| v.to_bits()))));
            let m = l.revert_fixups.len();
            out.push((format!("layer.{}.fixup_index", l.layer), Dtype::U32, vec![m], bytes(&mut l.revert_fixups.iter().map(|f| f.0))));
            out.push((format!("layer.{}.fixup_bits", l.layer), Dtype::U32, vec![m], bytes(&mut l.revert_fixups.iter().map(|f| f.1))));
        }
        out
    }

    /// Reads a patch file, checking its format and content hash.
    pub fn from_bytes(bytes: &[u8]) -> Result<Patch> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| patch_error(format!("not a patch file: {e}")))?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| patch_error(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |key: &str| meta.get(key).cloned().ok_or_else(|| patch_error(format!("patch file lacks `{key}`")));
        let corrupted = || patch_error("the patch file's contents do not match its recorded SHA-256: it is corrupted or was modified");
        let v1 = match meta.get("format").map(String::as_str) {
            Some(FORMAT) => {
                // Nothing in the file is interpreted before its hash matches.
                if verify(&st, &meta, HASH_KEY) != Some(true) {
                    return Err(corrupted());
                }
                false
            }
            Some(FORMAT_V1) => true,
            _ => return Err(patch_error(format!("not a {FORMAT} file"))),
        };
        let requests: Vec<EditRequest> = serde_json::from_str(&get("requests")?).map_err(|e| patch_error(format!("requests: {e}")))?;
        let hparams: serde_json::Value = serde_json::from_str(&get("hparams")?).map_err(|e| patch_error(format!("hparams: {e}")))?;
        let u32s = |name: &str, dtype: Dtype| -> Result<Vec<u32>> {
            let t = st.tensor(name).map_err(|_| patch_error(format!("patch file lacks `{name}`")))?;
            if t.dtype() != dtype {
                return Err(patch_error(format!("`{name}` is {:?}, expected {dtype:?}", t.dtype())));
            }
            Ok(t.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let mut layers = Vec::new();
        for part in get("layers")?.split(',').filter(|s| !s.is_empty()) {
            let layer: usize = part.parse().map_err(|_| patch_error(format!("bad layer list entry {part:?}")))?;
            let key = |k: &str| get(&format!("layer.{layer}.{k}"));
            if layers.iter().any(|l: &PatchLayer| l.layer == layer) {
                return Err(patch_error(format!("layer {layer} is listed twice")));
            }
            let shape: Vec<usize> = key("shape")?.split(',').map(|s| s.parse().map_err(|_| patch_error("bad shape"))).collect::<Result<_>>()?;
            let fixup_index = u32s(&format!("layer.{layer}.fixup_index"), Dtype::U32)?;
            let fixup_bits = u32s(&format!("layer.{layer}.fixup_bits"), Dtype::U32)?;
            let elements = match shape[..] {
                [rows, cols] if rows > 0 && cols > 0 => rows.checked_mul(cols),
                _ => None,
            };
            let fixups_fit = elements.is_some_and(|n| fixup_index.iter().all(|&i| (i as usize) < n));
            if fixup_index.len() != fixup_bits.len() || !fixups_fit {
                return Err(patch_error(format!("layer {layer}: inconsistent patch entries")));
            }
            layers.push(PatchLayer {
                layer,
                tensor: key("tensor")?,
                layout: match key("layout")?.as_str() {
                    "out_in" => WeightLayout::OutIn,
                    "in_out" => WeightLayout::InOut,
                    other => return Err(patch_error(format!("unknown layout {other:?}"))),
                },
                dtype: StoredDtype::parse(&key("dtype")?).ok_or_else(|| patch_error("unknown dtype"))?,
                shape,
                resid: u32s(&format!("layer.{layer}.resid"), Dtype::F32)?.into_iter().map(f32::from_bits).collect(),
                x: u32s(&format!("layer.{layer}.x"), Dtype::F32)?.into_iter().map(f32::from_bits).collect(),
                base_sha256: key("base_sha256")?,
                edited_sha256: key("edited_sha256")?,
                revert_fixups: fixup_index.into_iter().zip(fixup_bits).collect(),
            });
        }
        let patch = Patch { model_fingerprint: get("model_fingerprint")?, requests, hparams, layers };
        if v1 && content_hash(&patch.tensor_data()) != get("content_sha256")? {
            return Err(corrupted());
        }
        let is_sha256 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        for l in &patch.layers {
            let d = l.d_model();
            let d_ff = l.shape[0] * l.shape[1] / d;
            if l.resid.is_empty() || l.resid.len() % d != 0 || l.x.len() != l.resid.len() / d * d_ff {
                return Err(patch_error(format!("layer {}: factor shapes do not fit {:?}", l.layer, l.shape)));
            }
            if !is_sha256(&l.base_sha256) || !is_sha256(&l.edited_sha256) {
                return Err(patch_error(format!("layer {}: recorded weight hashes are not SHA-256 digests", l.layer)));
            }
        }
        Ok(patch)
    }
}

/// v1's hash: the tensors only.
fn content_hash(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> String {
    let mut h = Sha256::new();
    for (name, dtype, shape, data) in tensors {
        h.update(format!("{name}|{dtype:?}|{shape:?}|").as_bytes());
        h.update(data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
