//! Step 1: per-layer second moments C = E[k kᵀ] of the W_out inputs over a
//! text corpus, accumulated on the GPU (syrk with Kahan compensation) one
//! batch of texts at a time, so the corpus never sits on the GPU. The state
//! serialises to safetensors so a run can stop and resume, and a finished
//! run is a cache validated against the model and corpus it came from.

use std::collections::HashMap;

use memit_gpu::{DType, Tensor};
use memit_models::{Batch, Model, Padding, TextTokenizer};
use safetensors::{Dtype, SafeTensors};

use crate::edit::LayerCovariance;
use crate::error::{MemitError, Result};
use crate::integrity::{serialize_hashed, verify};

const FORMAT: &str = "memit-wgpu-stats-v1";
/// Metadata key of the whole-file hash (files written before it existed
/// have none and are still read, with the same plausibility checks on C).
const HASH_KEY: &str = "file_sha256";

/// What the statistics are of; a cache made for anything else is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsIdentity {
    /// Fingerprint of the model's weights and configuration.
    pub model_id: String,
    /// Fingerprint of the corpus text.
    pub corpus_id: String,
    pub layers: Vec<usize>,
    /// Texts are truncated to this many tokens.
    pub max_len: usize,
}

/// Running sums for every layer, on the GPU. Texts are tokenised as they
/// come and run through the model in passes of `Model::tokens_per_pass`
/// tokens of similar length, whatever batch sizes the caller uses.
pub struct StatsAccumulator {
    identity: StatsIdentity,
    d_ff: usize,
    /// Per layer: (Σ k kᵀ upper triangle, Kahan compensation).
    sums: Vec<(Tensor, Tensor)>,
    /// Tokens added (counted when added; in the sums once flushed).
    pub n_tokens: u64,
    /// Texts consumed so far, to resume where a run stopped.
    pub texts_done: u64,
    /// Forward passes run so far (this session).
    pub passes: u64,
    /// Tokenised texts not yet run through the model.
    pending: Vec<Vec<u32>>,
    pending_tokens: usize,
}

fn stats_error(detail: impl Into<String>) -> MemitError {
    MemitError::Stats(detail.into())
}

impl StatsAccumulator {
    pub fn new(model: &Model, identity: StatsIdentity) -> Result<StatsAccumulator> {
        let d_ff = model.config.d_ff;
        if identity.layers.is_empty() || identity.layers.iter().any(|&l| l >= model.config.n_layers) {
            return Err(stats_error(format!("layers {:?} invalid for a {}-layer model", identity.layers, model.config.n_layers)));
        }
        let sums = identity
            .layers
            .iter()
            .map(|_| Ok((model.ctx.zeros(&[d_ff, d_ff], DType::F32)?, model.ctx.zeros(&[d_ff, d_ff], DType::F32)?)))
            .collect::<Result<_>>()?;
        Ok(StatsAccumulator { identity, d_ff, sums, n_tokens: 0, texts_done: 0, passes: 0, pending: Vec::new(), pending_tokens: 0 })
    }

    pub fn identity(&self) -> &StatsIdentity {
        &self.identity
    }

    /// Adds the keys of every token of `texts` (each truncated to
    /// `max_len` tokens; empty texts are skipped). The forward passes run
    /// once enough tokens are pending, and before any result is read.
    pub fn add_texts(&mut self, model: &Model, tokenizer: &TextTokenizer, texts: &[String]) -> Result<()> {
        for text in texts {
            let mut ids = tokenizer.encode(text)?;
            ids.truncate(self.identity.max_len.min(model.config.max_positions));
            if !ids.is_empty() {
                self.n_tokens += ids.len() as u64;
                self.pending_tokens += ids.len();
                self.pending.push(ids);
            }
        }
        self.texts_done += texts.len() as u64;
        if self.pending_tokens >= self.tokens_per_pass(model) {
            self.flush(model)?;
        }
        Ok(())
    }

    /// Padded tokens one pass may hold (at least one whole text).
    fn tokens_per_pass(&self, model: &Model) -> usize {
        model.tokens_per_pass().max(self.identity.max_len.min(model.config.max_positions))
    }

    /// Runs every pending text through the model: longest first, packed
    /// into passes of similar lengths so little padding is computed.
    fn flush(&mut self, model: &Model) -> Result<()> {
        let mut pending = std::mem::take(&mut self.pending);
        self.pending_tokens = 0;
        pending.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let budget = self.tokens_per_pass(model);
        let mut start = 0;
        while start < pending.len() {
            let longest = pending[start].len();
            let count = (budget / longest).max(1).min(pending.len() - start);
            self.run_pass(model, &pending[start..start + count])?;
            start += count;
        }
        Ok(())
    }

    fn run_pass(&mut self, model: &Model, sequences: &[Vec<u32>]) -> Result<()> {
        self.passes += 1;
        let batch = Batch::new(sequences, Padding::Right, 0)?;
        let out = model.forward(&batch, &self.identity.layers, false)?;
        let rows = model.ctx.indices(&batch.real_rows())?;
        for (&layer, (sum, comp)) in self.identity.layers.iter().zip(&self.sums) {
            let keys = out.mlp_keys[layer].as_ref().expect("captured");
            let real = model.ctx.gather_rows(keys, &rows)?;
            model.ctx.syrk_accumulate(sum, comp, &real, 1.0)?;
        }
        Ok(())
    }

    /// C for each layer: the mirrored sums divided by the token count.
    pub async fn covariances(&mut self, model: &Model) -> Result<Vec<LayerCovariance>> {
        self.flush(model)?;
        if self.n_tokens == 0 {
            return Err(stats_error("no tokens were collected: the corpus is empty"));
        }
        let mut out = Vec::new();
        for (&layer, (sum, _)) in self.identity.layers.iter().zip(&self.sums) {
            let c = model.ctx.affine(sum, 1.0 / self.n_tokens as f32, 0.0)?;
            model.ctx.mirror_upper(&c)?;
            out.push(LayerCovariance { layer, matrix: model.ctx.read(&c).await?, n_tokens: self.n_tokens });
        }
        Ok(out)
    }

    fn metadata(&self, complete: bool) -> HashMap<String, String> {
        let layers = self.identity.layers.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        HashMap::from([
            ("format".into(), FORMAT.into()),
            ("model_id".into(), self.identity.model_id.clone()),
            ("corpus_id".into(), self.identity.corpus_id.clone()),
            ("layers".into(), layers),
            ("max_len".into(), self.identity.max_len.to_string()),
            ("n_tokens".into(), self.n_tokens.to_string()),
            ("texts_done".into(), self.texts_done.to_string()),
            ("d_ff".into(), self.d_ff.to_string()),
            ("complete".into(), complete.to_string()),
        ])
    }

    /// The running sums and compensations (to resume later) as safetensors.
    /// Texts already tokenised but not yet run are saved as they are, so a
    /// resumed run forms the same passes and ends with bitwise the same sums.
    pub async fn checkpoint_bytes(&self, model: &Model) -> Result<Vec<u8>> {
        let square = vec![self.d_ff, self.d_ff];
        let on_gpu: Vec<&Tensor> = self.sums.iter().flat_map(|(sum, comp)| [sum, comp]).collect();
        let values = model.ctx.read_all(&on_gpu).await?;
        let names = self.identity.layers.iter().flat_map(|layer| [format!("layer.{layer}.sum"), format!("layer.{layer}.comp")]);
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = names.zip(&values).map(|(name, v)| (name, Dtype::F32, square.clone(), f32_bytes(v))).collect();
        if let Some((name, ..)) = tensors.iter().find(|(_, _, _, data)| data.chunks_exact(4).any(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite())) {
            return Err(stats_error(format!("`{name}` holds NaN or infinite values: the model's activations overflow (check its weights for NaN/inf); not saving a checkpoint")));
        }
        let ids: Vec<u8> = self.pending.iter().flatten().flat_map(|id| id.to_le_bytes()).collect();
        if !ids.is_empty() {
            tensors.push(("pending.ids".into(), Dtype::U32, vec![ids.len() / 4], ids));
        }
        let mut metadata = self.metadata(false);
        metadata.insert("pending_lengths".into(), self.pending.iter().map(|p| p.len().to_string()).collect::<Vec<_>>().join(","));
        serialize(&tensors, metadata)
    }

    /// C for each layer and the finished cache holding it (`layer.{l}.mom2`
    /// plus provenance), from one read of the sums; C is checked first.
    pub async fn finish(&mut self, model: &Model) -> Result<(Vec<LayerCovariance>, Vec<u8>)> {
        let covs = self.covariances(model).await?;
        for c in &covs {
            check_covariance(c, self.d_ff).map_err(|e| stats_error(format!("the statistics just collected are unusable, not saving them: {e}")))?;
        }
        let tensors: Vec<_> = covs.iter().map(|c| (format!("layer.{}.mom2", c.layer), Dtype::F32, vec![self.d_ff, self.d_ff], f32_bytes(&c.matrix))).collect();
        let bytes = serialize(&tensors, self.metadata(true))?;
        Ok((covs, bytes))
    }

    /// Continues from a checkpoint made by `checkpoint_bytes` for the same
    /// model, corpus, layers and truncation.
    pub fn resume(model: &Model, identity: StatsIdentity, bytes: &[u8]) -> Result<StatsAccumulator> {
        let (meta, st) = parse(bytes)?;
        check_identity(&meta, &identity)?;
        if meta.get("complete").map(String::as_str) != Some("false") {
            return Err(stats_error("this stats file is a finished cache, not a checkpoint to resume"));
        }
        let mut acc = StatsAccumulator::new(model, identity)?;
        acc.n_tokens = meta_u64(&meta, "n_tokens")?;
        acc.texts_done = meta_u64(&meta, "texts_done")?;
        let d_ff = acc.d_ff;
        for (&layer, (sum, comp)) in acc.identity.layers.iter().zip(&acc.sums) {
            for (name, t) in [("sum", sum), ("comp", comp)] {
                let values = tensor_f32(&st, &format!("layer.{layer}.{name}"), d_ff)?;
                model.ctx.write(t, &values)?;
            }
        }
        let lengths: Vec<usize> = match meta.get("pending_lengths").map(String::as_str) {
            None | Some("") => Vec::new(),
            Some(list) => list.split(',').map(|l| l.parse().map_err(|_| stats_error("bad `pending_lengths`"))).collect::<Result<_>>()?,
        };
        if !lengths.is_empty() {
            let t = st.tensor("pending.ids").map_err(|_| stats_error("checkpoint lacks `pending.ids`"))?;
            let ids: Vec<u32> = t.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let total = lengths.iter().try_fold(0usize, |sum, &len| if len == 0 { None } else { sum.checked_add(len) });
            if t.dtype() != Dtype::U32 || total != Some(ids.len()) {
                return Err(stats_error("checkpoint's pending texts do not match their lengths"));
            }
            let mut at = 0;
            for len in lengths {
                acc.pending.push(ids[at..at + len].to_vec());
                acc.pending_tokens += len;
                at += len;
            }
        }
        Ok(acc)
    }
}

/// Loads a finished cache, refusing one made for another model, corpus,
/// layer set or truncation.
pub fn load_cache(bytes: &[u8], identity: &StatsIdentity, d_ff: usize) -> Result<Vec<LayerCovariance>> {
    let (meta, _) = parse(bytes)?;
    check_identity(&meta, identity)?;
    Ok(read_cache(bytes, d_ff)?.1)
}

/// Loads a finished cache with what it says it was made from (for callers
/// that only know the model, such as the browser editor).
pub fn read_cache(bytes: &[u8], d_ff: usize) -> Result<(StatsIdentity, Vec<LayerCovariance>)> {
    let (meta, st) = parse(bytes)?;
    if meta.get("complete").map(String::as_str) != Some("true") {
        return Err(stats_error("this stats file is an unfinished checkpoint: resume the stats run to finish it"));
    }
    let text = |key: &str| meta.get(key).cloned().ok_or_else(|| stats_error(format!("stats file has no `{key}`")));
    let layers = text("layers")?.split(',').map(|l| l.parse().map_err(|_| stats_error("bad `layers`"))).collect::<Result<Vec<usize>>>()?;
    let identity = StatsIdentity { model_id: text("model_id")?, corpus_id: text("corpus_id")?, layers, max_len: meta_u64(&meta, "max_len")? as usize };
    let n_tokens = meta_u64(&meta, "n_tokens")?;
    let covariances = identity
        .layers
        .iter()
        .map(|&layer| {
            let c = LayerCovariance { layer, matrix: tensor_f32(&st, &format!("layer.{layer}.mom2"), d_ff)?, n_tokens };
            check_covariance(&c, d_ff).map_err(|e| stats_error(format!("corrupted cache: {e}; delete the file and collect the statistics again")))?;
            Ok(c)
        })
        .collect::<Result<_>>()?;
    Ok((identity, covariances))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn serialize(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    serialize_hashed(tensors, metadata, HASH_KEY).map_err(stats_error)
}

/// What any uncentered second moment E[k kᵀ] satisfies: finite, exactly
/// symmetric (it is mirrored from one triangle), a non-negative diagonal
/// without values absurdly beyond the rest, and |C_ij| ≤ √(C_ii·C_jj)
/// (Cauchy–Schwarz, with room for f32 rounding). A flipped bit or a value
/// written over the file fails one of these.
fn check_covariance(c: &LayerCovariance, d_ff: usize) -> Result<(), String> {
    let m = &c.matrix;
    let layer = c.layer;
    if let Some(i) = m.iter().position(|v| !v.is_finite()) {
        return Err(format!("layer {layer}: C[{}][{}] = {} is not finite", i / d_ff, i % d_ff, m[i]));
    }
    let diag: Vec<f64> = (0..d_ff).map(|i| m[i * d_ff + i] as f64).collect();
    if let Some(i) = diag.iter().position(|&v| v < 0.0) {
        return Err(format!("layer {layer}: C[{i}][{i}] = {} is negative", diag[i]));
    }
    let mut sorted = diag.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[d_ff / 2];
    if let Some(i) = diag.iter().position(|&v| median > 0.0 && v > 1e12 * median) {
        return Err(format!("layer {layer}: C[{i}][{i}] = {:e} is over 10¹² times the median diagonal {median:e}", diag[i]));
    }
    for i in 0..d_ff {
        for j in 0..i {
            let (a, b) = (m[i * d_ff + j], m[j * d_ff + i]);
            if a != b {
                return Err(format!("layer {layer}: C is not symmetric at [{i}][{j}] ({a} vs {b})"));
            }
            if (a as f64).abs() > 1.001 * (diag[i] * diag[j]).sqrt() + 1e-30 {
                return Err(format!("layer {layer}: |C[{i}][{j}]| = {a:e} exceeds √(C_ii·C_jj) = {:e}, impossible for a second moment", (diag[i] * diag[j]).sqrt()));
            }
        }
    }
    Ok(())
}

fn parse(bytes: &[u8]) -> Result<(HashMap<String, String>, SafeTensors<'_>)> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| stats_error(format!("not a stats file: {e}")))?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| stats_error(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(stats_error(format!("not a {FORMAT} file")));
    }
    if verify(&st, &meta, HASH_KEY) == Some(false) {
        return Err(stats_error("corrupted file: its contents do not match its recorded SHA-256 (a flipped bit or a partial copy); delete it and collect the statistics again"));
    }
    Ok((meta, st))
}

fn check_identity(meta: &HashMap<String, String>, want: &StatsIdentity) -> Result<()> {
    let layers = want.layers.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    for (key, expected) in [("model_id", &want.model_id), ("corpus_id", &want.corpus_id), ("layers", &layers), ("max_len", &want.max_len.to_string())] {
        let found = meta.get(key).map(String::as_str).unwrap_or("<missing>");
        if found != expected.as_str() {
            return Err(stats_error(format!("stats file was made with {key} = {found}, but this run has {key} = {expected}; it belongs to another model or setup")));
        }
    }
    Ok(())
}

fn meta_u64(meta: &HashMap<String, String>, key: &str) -> Result<u64> {
    meta.get(key).and_then(|v| v.parse().ok()).ok_or_else(|| stats_error(format!("stats file has no valid `{key}`")))
}

fn tensor_f32(st: &SafeTensors<'_>, name: &str, d_ff: usize) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|_| stats_error(format!("stats file lacks `{name}`")))?;
    if t.dtype() != Dtype::F32 || t.shape() != [d_ff, d_ff] {
        return Err(stats_error(format!("`{name}` is {:?} {:?}, expected F32 [{d_ff}, {d_ff}]", t.dtype(), t.shape())));
    }
    Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}
