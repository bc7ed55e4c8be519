//! memit-wgpu in the browser: the same MEMIT core as the CLI, on WebGPU,
//! behind a small JavaScript API (`Editor`). Load a model from files or
//! URLs, compute or load covariance statistics, edit facts, generate, undo.

mod source;

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Function, Promise, Reflect, Uint8Array};
use memit_core::{apply_edit, context_templates, read_cache, requests_from_json, EditMethod, EditRequest, EditState, Hparams, TargetOptions, LayerCovariance, StatsAccumulator, StatsIdentity};
use memit_gpu::{DType, GpuContext, GpuOptions, Tensor};
use memit_models::{GenerateOptions, LoadOptions, Model, ModelConfig, Sampling, TextTokenizer};
use serde::Serialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::source::{stream_gguf_file, stream_safetensors, ByteSource};

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

#[wasm_bindgen(typescript_custom_section)]
const TYPES: &str = r#"
/** A file the editor can read: a picked `File`/`Blob`, a URL, or bytes. */
export type FileInput = Blob | string | Uint8Array;
/** A Hugging Face model (config.json, tokenizer.json and its safetensors file(s)), or a llama-architecture GGUF file (its tokenizer inside). */
export type ModelFiles = { config: FileInput; tokenizer: FileInput; weights: FileInput | FileInput[] } | { gguf: FileInput };
export interface Progress { stage: string; done: number; total: number }
export interface LoadOptions {
  /** keep weight matrices in f16 on the GPU */ f16?: boolean;
  /** kernel variants: "auto" (the adapter decides: software adapters get the CPU ones), "gpu" or "cpu" (to check one set on any adapter) */ kernels?: "auto" | "gpu" | "cpu";
  onProgress?: (p: Progress) => void;
}
/** MEMIT's request format; `prompt` contains `{}` where the subject goes. */
export interface EditRequest { prompt: string; subject: string; target_new: { str: string } }
export interface Prediction { token: string; prob: number }
export interface StatsOptions { nTexts?: number; maxLen?: number; batchSize?: number; onProgress?: (p: Progress) => void }
export interface StatsSummary { layers: number[]; n_tokens: number; texts: number; seconds: number }
export interface EasyEditRequests { prompts: string | string[]; subject: string | string[]; target_new: string | string[]; ground_truth?: string | string[] }
export interface EditOptions { templates?: "plain" | "generated"; hparams?: Record<string, unknown>; method?: "memit" | "memit-seq" | "alphaedit"; onProgress?: (p: Progress) => void }
export interface EditedRequest { prompt: string; target_new: string; target_prob: number; before: Prediction[]; after: Prediction[] }
export interface EditResult { method: string; edits_so_far: number; null_space_dimensions: [number, number][]; layers: number[]; seconds: number; requests: EditedRequest[]; warnings: string[] }
export interface ModelInfo { adapter: string; arch: string; layers: number; d_model: number; d_ff: number; vocab: number; fingerprint: string; hparams: Record<string, unknown>; has_stats: boolean; edited: boolean }
"#;

struct State {
    model: Model,
    tokenizer: TextTokenizer,
    fingerprint: String,
    hparams: Hparams,
    covariances: Option<Vec<LayerCovariance>>,
    /// W_out of every layer some edit changed, as it was before the first
    /// edit: `revert` puts these GPU tensors back, so undo is exact.
    originals: Vec<(usize, Tensor)>,
    /// What the method of the edits so far carries to the next one (the
    /// earlier edits' keys, AlphaEdit's projectors), with the hparams it
    /// was made for; a change of either starts afresh.
    method_state: Option<(EditState, Hparams)>,
}

/// A model on the GPU that can be edited with MEMIT and reverted.
#[wasm_bindgen]
pub struct Editor {
    /// Taken out while an async operation runs, so overlapping calls get a
    /// clear "busy" error instead of a borrow panic.
    state: Rc<RefCell<Option<State>>>,
}

fn err(message: impl std::fmt::Display) -> JsValue {
    js_sys::Error::new(&message.to_string()).into()
}

fn get(object: &JsValue, key: &str) -> Option<JsValue> {
    Reflect::get(object, &JsValue::from_str(key)).ok().filter(|v| !v.is_undefined() && !v.is_null())
}

fn callback(options: &JsValue) -> Option<Function> {
    get(options, "onProgress").and_then(|f| f.dyn_into::<Function>().ok())
}

fn report(cb: &Option<Function>, stage: &str, done: usize, total: usize) {
    if let Some(f) = cb {
        let p = js_sys::Object::new();
        let _ = Reflect::set(&p, &"stage".into(), &stage.into());
        let _ = Reflect::set(&p, &"done".into(), &(done as f64).into());
        let _ = Reflect::set(&p, &"total".into(), &(total as f64).into());
        let _ = f.call1(&JsValue::NULL, &p);
    }
}

fn number(options: &JsValue, key: &str, default: usize) -> usize {
    get(options, key).and_then(|v| v.as_f64()).map_or(default, |v| v.max(0.0) as usize)
}

fn to_js<T: Serialize>(value: &T) -> Result<JsValue, JsValue> {
    value.serialize(&serde_wasm_bindgen::Serializer::json_compatible()).map_err(err)
}

#[derive(Serialize)]
struct Prediction {
    token: String,
    prob: f32,
}

async fn predictions(model: &Model, tok: &TextTokenizer, prompt: &str, k: usize) -> Result<Vec<Prediction>, JsValue> {
    let ids = tok.encode(prompt).map_err(err)?;
    if ids.is_empty() {
        return Err(err("the prompt tokenises to nothing"));
    }
    let logits = model.last_token_logits(&[ids]).await.map_err(err)?.remove(0);
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let total: f32 = logits.iter().map(|&v| (v - max).exp()).sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    order.iter().take(k).map(|&i| Ok(Prediction { token: tok.decode(&[i as u32]).map_err(err)?, prob: (logits[i] - max).exp() / total })).collect()
}

impl Editor {
    fn take(&self) -> Result<State, JsValue> {
        self.state.borrow_mut().take().ok_or_else(|| err("the editor is busy with another operation (await it first)"))
    }

    /// Runs `work` on the state and puts the state back, also on error.
    fn run<F, Fut>(&self, work: F) -> Promise
    where
        F: FnOnce(State) -> Fut + 'static,
        Fut: std::future::Future<Output = (State, Result<JsValue, JsValue>)> + 'static,
    {
        let slot = self.state.clone();
        match self.take() {
            Err(e) => Promise::reject(&e),
            Ok(state) => future_to_promise(async move {
                let (state, result) = work(state).await;
                *slot.borrow_mut() = Some(state);
                result
            }),
        }
    }
}

#[wasm_bindgen]
impl Editor {
    /// Opens WebGPU and streams a model's weights to the GPU, one tensor at
    /// a time.
    #[wasm_bindgen(unchecked_return_type = "Promise<Editor>")]
    pub fn load(#[wasm_bindgen(unchecked_param_type = "ModelFiles")] files: JsValue, #[wasm_bindgen(unchecked_param_type = "LoadOptions | undefined")] options: JsValue) -> Promise {
        future_to_promise(async move {
            let cb = callback(&options);
            let matrix_dtype = if get(&options, "f16").and_then(|v| v.as_bool()).unwrap_or(false) { DType::F16 } else { DType::F32 };
            let cpu_kernels = match get(&options, "kernels").and_then(|v| v.as_string()).as_deref() {
                None | Some("auto") => None,
                Some("gpu") => Some(false),
                Some("cpu") => Some(true),
                Some(other) => return Err(err(format!("options.kernels is {other:?}: use \"auto\", \"gpu\" or \"cpu\""))),
            };
            let mut on_bytes = |done: u64, total: u64| report(&cb, "loading weights", (done >> 10) as usize, (total >> 10) as usize);
            let open_webgpu = async || {
                report(&cb, "opening WebGPU", 0, 1);
                GpuContext::new(GpuOptions { cpu_kernels, ..Default::default() }).await.map_err(|e| err(format!("{e}. This page needs a browser with WebGPU (Chrome/Edge 113+, or Safari/Firefox with WebGPU enabled).")))
            };
            let (model, tokenizer, fingerprint) = if let Some(gguf) = get(&files, "gguf") {
                let name = gguf.as_string().or_else(|| gguf.dyn_ref::<web_sys::File>().map(|f| f.name())).unwrap_or_else(|| "the GGUF file".into());
                let source = ByteSource::from_js(gguf).map_err(err)?;
                let ctx = open_webgpu().await?;
                let streamed = stream_gguf_file(&ctx, &name, &source, matrix_dtype, &mut on_bytes).await.map_err(err)?;
                let model = Model::load(ctx, streamed.config, &streamed.weights, LoadOptions { matrix_dtype, ..Default::default() }).map_err(err)?;
                (model, streamed.tokenizer, memit_models::WeightSource::fingerprint(&streamed.weights))
            } else {
                let field = |key: &str| get(&files, key).ok_or_else(|| err(format!("model files need `{key}` (or `gguf` for a GGUF file)")));
                let config_bytes = ByteSource::from_js(field("config")?).map_err(err)?.read_all().await.map_err(err)?;
                let config_json: serde_json::Value = serde_json::from_slice(&config_bytes).map_err(|e| err(format!("config.json is not valid JSON: {e}")))?;
                let config = ModelConfig::from_hf_json(&config_json).map_err(err)?;
                let tokenizer_bytes = ByteSource::from_js(field("tokenizer")?).map_err(err)?.read_all().await.map_err(err)?;
                let tokenizer = TextTokenizer::from_json_bytes(&tokenizer_bytes).map_err(err)?;
                let weights = field("weights")?;
                let weights: Vec<JsValue> = if js_sys::Array::is_array(&weights) { js_sys::Array::from(&weights).iter().collect() } else { vec![weights] };
                let files = weights
                    .into_iter()
                    .enumerate()
                    .map(|(i, w)| Ok((w.as_string().unwrap_or_else(|| format!("weights file {}", i + 1)), ByteSource::from_js(w).map_err(err)?)))
                    .collect::<Result<Vec<_>, JsValue>>()?;
                let ctx = open_webgpu().await?;
                let uploaded = stream_safetensors(&ctx, &files, matrix_dtype, &mut on_bytes).await.map_err(err)?;
                let model = Model::load(ctx, config, &uploaded, LoadOptions { matrix_dtype, ..Default::default() }).map_err(err)?;
                (model, tokenizer, memit_models::WeightSource::fingerprint(&uploaded))
            };
            let hparams = Hparams::for_model(&model.config);
            let state = State { model, tokenizer, fingerprint, hparams, covariances: None, originals: Vec::new(), method_state: None };
            Ok(Editor { state: Rc::new(RefCell::new(Some(state))) }.into())
        })
    }

    /// Adapter, model shape, weight fingerprint and MEMIT hyperparameters.
    #[wasm_bindgen(unchecked_return_type = "ModelInfo")]
    pub fn info(&self) -> Result<JsValue, JsValue> {
        let guard = self.state.borrow();
        let s = guard.as_ref().ok_or_else(|| err("the editor is busy"))?;
        let c = &s.model.config;
        to_js(&serde_json::json!({
            "adapter": s.model.ctx.adapter_info().name, "arch": format!("{:?}", c.arch), "layers": c.n_layers,
            "d_model": c.d_model, "d_ff": c.d_ff, "vocab": c.vocab_size, "fingerprint": s.fingerprint,
            "hparams": s.hparams, "has_stats": s.covariances.is_some(), "edited": !s.originals.is_empty(),
        }))
    }

    /// Collects the covariance statistics of the edited layers over
    /// `corpus` (one text per line).
    #[wasm_bindgen(js_name = computeStats, unchecked_return_type = "Promise<StatsSummary>")]
    pub fn compute_stats(&self, corpus: String, #[wasm_bindgen(unchecked_param_type = "StatsOptions | undefined")] options: JsValue) -> Promise {
        self.run(move |mut s| async move {
            let result = async {
                let cb = callback(&options);
                let texts: Vec<String> = corpus.lines().map(str::trim).filter(|l| !l.is_empty()).take(number(&options, "nTexts", usize::MAX)).map(String::from).collect();
                if texts.is_empty() {
                    return Err(err("the statistics corpus holds no text"));
                }
                let start = js_sys::Date::now();
                let identity = StatsIdentity { model_id: s.fingerprint.clone(), corpus_id: "browser".into(), layers: s.hparams.layers.clone(), max_len: number(&options, "maxLen", 64) };
                let mut acc = StatsAccumulator::new(&s.model, identity).map_err(err)?;
                for batch in texts.chunks(number(&options, "batchSize", 16).max(1)) {
                    acc.add_texts(&s.model, &s.tokenizer, batch).map_err(err)?;
                    // Let the browser breathe (and the progress bar move).
                    s.model.ctx.sync().await.map_err(err)?;
                    report(&cb, "statistics", acc.texts_done as usize, texts.len());
                }
                let covariances = acc.covariances(&s.model).await.map_err(err)?;
                let summary = serde_json::json!({"layers": s.hparams.layers, "n_tokens": acc.n_tokens, "texts": texts.len(), "seconds": (js_sys::Date::now() - start) / 1000.0});
                s.covariances = Some(covariances);
                s.method_state = None;
                to_js(&summary)
            }
            .await;
            (s, result)
        })
    }

    /// Uses a statistics cache made by `memit-wgpu stats` for this model.
    #[wasm_bindgen(js_name = loadStats)]
    pub fn load_stats(&self, bytes: Uint8Array) -> Result<(), JsValue> {
        let mut guard = self.state.borrow_mut();
        let s = guard.as_mut().ok_or_else(|| err("the editor is busy"))?;
        let (identity, covariances) = read_cache(&bytes.to_vec(), s.model.config.d_ff).map_err(err)?;
        if identity.model_id != s.fingerprint {
            return Err(err("this statistics file was made for another model (its weight fingerprint differs)"));
        }
        if let Some(layer) = s.hparams.layers.iter().find(|l| !identity.layers.contains(l)) {
            return Err(err(format!("this statistics file has no layer {layer} (it has {:?})", identity.layers)));
        }
        s.covariances = Some(covariances);
        s.method_state = None;
        Ok(())
    }

    /// Rewrites the facts in `requests` with MEMIT; returns each prompt's
    /// top predictions before and after.
    #[wasm_bindgen(unchecked_return_type = "Promise<EditResult>")]
    pub fn edit(
        &self,
        #[wasm_bindgen(unchecked_param_type = "EditRequest[] | EasyEditRequests")] requests: JsValue,
        #[wasm_bindgen(unchecked_param_type = "EditOptions | undefined")] options: JsValue,
    ) -> Promise {
        self.run(move |mut s| async move {
            let result = async {
                let cb = callback(&options);
                // MEMIT's list or EasyEdit's object of lists.
                let requests: serde_json::Value = serde_wasm_bindgen::from_value(requests).map_err(|e| err(format!("requests must be [{{prompt, subject, target_new: {{str}}}}] or EasyEdit's {{prompts, subject, target_new}}: {e}")))?;
                let requests: Vec<EditRequest> = requests_from_json(requests).map_err(err)?;
                if requests.is_empty() {
                    return Err(err("no requests"));
                }
                let hp = match get(&options, "hparams") {
                    Some(overrides) => {
                        let overrides: serde_json::Value = serde_wasm_bindgen::from_value(overrides).map_err(err)?;
                        s.hparams.with_overrides(&overrides).map_err(err)?
                    }
                    None => s.hparams.clone(),
                };
                hp.validate(&s.model.config).map_err(err)?;
                let covariances = s.covariances.as_ref().ok_or_else(|| err("no covariance statistics yet: call computeStats or loadStats first"))?;
                for (i, r) in requests.iter().enumerate() {
                    r.prepare(i, &s.tokenizer).map_err(err)?;
                }
                let templates = match get(&options, "templates").and_then(|t| t.as_string()).as_deref() {
                    Some("generated") => {
                        report(&cb, "context templates", 0, 1);
                        context_templates(&s.model, &s.tokenizer, hp.context_template_length, 0).await.map_err(err)?
                    }
                    Some("plain") | None => vec!["{}".to_string()],
                    Some(other) => return Err(err(format!("templates must be \"plain\" or \"generated\", not {other:?}"))),
                };
                let prompts: Vec<String> = requests.iter().map(|r| r.prompt.replace("{}", &r.subject)).collect();
                let mut before = Vec::new();
                for p in &prompts {
                    before.push(predictions(&s.model, &s.tokenizer, p, 5).await?);
                }
                let method = match get(&options, "method").and_then(|m| m.as_string()) {
                    Some(name) => EditMethod::parse(&name).map_err(err)?,
                    None => EditMethod::Memit,
                };
                let start = js_sys::Date::now();
                if !s.method_state.as_ref().is_some_and(|(state, made_for)| state.method() == method && *made_for == hp) {
                    let state = EditState::new(&s.model.ctx, method, &hp, covariances, &mut |p| report(&cb, p.stage, p.done, p.total)).await.map_err(err)?;
                    s.method_state = Some((state, hp.clone()));
                }
                let (state, _) = s.method_state.as_mut().expect("set above");
                let mut edited = s.model.clone();
                let outcome = apply_edit(&mut edited, &s.tokenizer, &requests, &hp, &templates, covariances, state, &TargetOptions::default(), &mut |p| report(&cb, p.stage, p.done, p.total))
                    .await
                    .map_err(err)?;
                let (edits_so_far, null_spaces) = (state.edits(), state.null_space_dimensions());
                let seconds = (js_sys::Date::now() - start) / 1000.0;
                for &layer in &hp.layers {
                    if !s.originals.iter().any(|(l, _)| *l == layer) {
                        s.originals.push((layer, s.model.blocks[layer].mlp_out.weight.clone()));
                    }
                }
                s.model = edited;
                let mut rows = Vec::new();
                let mut warnings = Vec::new();
                for (i, ((prompt, r), before)) in prompts.iter().zip(&requests).zip(before).enumerate() {
                    let target_prob = outcome.targets[i].losses.last().map_or(0.0, |l| l.target_prob);
                    if target_prob < 0.1 {
                        warnings.push(format!("request {i} ({:?}): the target vector reached only p = {target_prob:.3}; this edit will likely not take", r.subject));
                    }
                    let after = predictions(&s.model, &s.tokenizer, prompt, 5).await?;
                    rows.push(serde_json::json!({"prompt": prompt, "target_new": r.target_new.text, "target_prob": target_prob, "before": to_value(&before), "after": to_value(&after)}));
                }
                to_js(&serde_json::json!({"method": method.name(), "edits_so_far": edits_so_far, "null_space_dimensions": null_spaces, "layers": hp.layers, "seconds": seconds, "requests": rows, "warnings": warnings}))
            }
            .await;
            (s, result)
        })
    }

    /// The greedy continuation of `prompt` (new text only).
    #[wasm_bindgen(unchecked_return_type = "Promise<string>")]
    pub fn generate(&self, prompt: String, max_new_tokens: Option<usize>) -> Promise {
        self.run(move |s| async move {
            let result = async {
                let ids = s.tokenizer.encode(&prompt).map_err(err)?;
                if ids.is_empty() {
                    return Err(err("the prompt tokenises to nothing"));
                }
                let options = GenerateOptions { max_new_tokens: max_new_tokens.unwrap_or(20), sampling: Sampling::Greedy, stop_at_eos: true };
                let new = s.model.generate(&[ids], options).await.map_err(err)?.remove(0);
                let eos = s.model.config.eos_token_id;
                let text: Vec<u32> = new.into_iter().filter(|&t| Some(t) != eos).collect();
                Ok(JsValue::from_str(&s.tokenizer.decode(&text).map_err(err)?))
            }
            .await;
            (s, result)
        })
    }

    /// The `k` most likely next tokens after `prompt`.
    #[wasm_bindgen(unchecked_return_type = "Promise<Prediction[]>")]
    pub fn predict(&self, prompt: String, k: Option<usize>) -> Promise {
        self.run(move |s| async move {
            let result = async { to_js(&predictions(&s.model, &s.tokenizer, &prompt, k.unwrap_or(5)).await?) }.await;
            (s, result)
        })
    }

    /// Undoes every edit: the original W_out tensors go back in place.
    /// Returns whether there was anything to undo.
    pub fn revert(&self) -> Result<bool, JsValue> {
        let mut guard = self.state.borrow_mut();
        let s = guard.as_mut().ok_or_else(|| err("the editor is busy"))?;
        let any = !s.originals.is_empty();
        // The original weights again: a new sequence (the projectors stay).
        if let Some((state, _)) = s.method_state.as_mut() {
            state.forget_edits();
        }
        for (layer, weight) in s.originals.drain(..) {
            s.model.blocks[layer].mlp_out.weight = weight;
        }
        Ok(any)
    }
}

fn to_value<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("plain data serialises")
}
