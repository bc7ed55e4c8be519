//! A model's weights on the GPU, in one layout for all four families.

use std::sync::{Arc, Mutex};

use memit_gpu::{Activation, DType, Epilogue, GpuContext, Tensor};

use crate::config::{Arch, ModelConfig, Residual};
use crate::error::{ModelError, Result};
use crate::weights::{upload_weight, HostTensor, SharedSource, WeightSource};

/// How a projection's weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// [out, in], torch `nn.Linear` (y = x·Wᵀ).
    OutIn,
    /// [in, out], GPT-2's `Conv1D` (y = x·W).
    InOut,
}

#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub layout: WeightLayout,
}

impl Linear {
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        self.forward_plus(ctx, x, None)
    }

    /// (x·W + b, its activation), or for a gated MLP's gate | up weights
    /// (gate | up, act(gate)·up), from one product's epilogue.
    pub fn forward_activated(&self, ctx: &GpuContext, x: &Tensor, act: Activation, gated: bool) -> Result<(Tensor, Tensor)> {
        Ok(ctx.linear_activated(x, &self.weight, self.layout == WeightLayout::OutIn, self.bias.as_ref(), act, gated)?)
    }

    /// x·W + b + residual, the bias and residual added by the product's
    /// epilogue (no dispatch of their own).
    pub fn forward_plus(&self, ctx: &GpuContext, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let epilogue = Epilogue { bias: self.bias.as_ref(), residual };
        Ok(ctx.linear(x, &self.weight, self.layout == WeightLayout::OutIn, epilogue)?)
    }
}

/// LayerNorm when `bias` is present, RMSNorm otherwise.
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f32,
}

impl Norm {
    pub fn forward(&self, ctx: &GpuContext, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => ctx.layer_norm(x, &self.weight, b, self.eps)?,
            None => ctx.rms_norm(x, &self.weight, self.eps)?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub ln1: Norm,
    /// Absent when attention and MLP share `ln1` (GPT-J).
    pub ln2: Option<Norm>,
    /// One projection producing q, k and v (checkpoints that store them
    /// apart are concatenated at load, so one product computes all three).
    pub qkv: Linear,
    /// GPT-NeoX's [head][q k v] order; otherwise [q | k | v] blocks.
    pub qkv_per_head: bool,
    pub attn_out: Linear,
    /// The MLP's input projection; for a gated MLP (Llama's SwiGLU) the
    /// gate and up projections concatenated, gate first.
    pub mlp_in: Linear,
    pub mlp_gated: bool,
    /// MEMIT's W_out: its input is the key k, its output is added to the
    /// residual stream.
    pub mlp_out: Linear,
}

/// Storage choices for loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Storage of weight matrices (vectors are always f32). f16 halves GPU
    /// memory; arithmetic stays f32 either way.
    pub matrix_dtype: DType,
    /// Load only blocks `0..n` and the embeddings: what statistics and keys
    /// up to layer n − 1 read, a fraction of a deep model's memory. Such a
    /// model has no head (final norm and unembedding), so asking it for
    /// logits, or running a block it lacks, is an error.
    pub prefix_blocks: Option<usize>,
    /// Keep the model's highest `streamed_blocks` blocks off the GPU: each
    /// is uploaded from the checkpoint when it runs (the two uploaded last
    /// stay), for a model whose weights do not fit the GPU. Needs a shared
    /// source ([`Model::load_shared`]); MEMIT cannot edit these layers.
    pub streamed_blocks: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { matrix_dtype: DType::F32, prefix_blocks: None, streamed_blocks: 0 }
    }
}

/// The blocks a model streams from its checkpoint
/// ([`LoadOptions::streamed_blocks`]).
#[derive(Clone)]
struct BlockStream {
    /// The streamed layers: every block from `first` on, up to `end` (the
    /// model's block count, or a prefix model's; none while `end` ≤ `first`).
    first: usize,
    end: usize,
    source: SharedSource,
    matrix_dtype: DType,
    /// The blocks uploaded last, newest first, at most two: a block run
    /// again right away (the top block's backward after its forward) is
    /// not uploaded again, and the next block goes up while the GPU still
    /// works on the one before.
    recent: Arc<Mutex<Vec<(usize, Block)>>>,
}

impl std::fmt::Debug for BlockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStream").field("first", &self.first).field("source", &self.source.describe()).finish()
    }
}

impl BlockStream {
    fn fetch(&self, ctx: &GpuContext, config: &ModelConfig, layer: usize) -> Result<Block> {
        let mut recent = self.recent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, block)) = recent.iter().find(|(l, _)| *l == layer) {
            return Ok(block.clone());
        }
        // The older block makes room for this one (its buffers return to
        // the pool once the work recorded on it no longer holds them), and
        // the work recorded so far starts while this block goes up.
        recent.truncate(1);
        ctx.flush();
        let loader = Loader { ctx, source: self.source.as_ref(), options: LoadOptions { matrix_dtype: self.matrix_dtype, ..Default::default() } };
        let block = loader.block(config, &names(config.arch), layer)?;
        recent.insert(0, (layer, block.clone()));
        Ok(block)
    }
}

/// The final norm and the unembedding.
#[derive(Debug, Clone)]
pub struct Head {
    pub norm: Norm,
    pub unembed: Linear,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub ctx: Arc<GpuContext>,
    pub embed: Tensor,
    /// Learned absolute positions (GPT-2).
    pub pos_embed: Option<Tensor>,
    /// Blocks 0..blocks.len() (all of them unless loaded as a prefix).
    pub blocks: Vec<Block>,
    /// None for a prefix model (`LoadOptions::prefix_blocks`).
    pub head: Option<Head>,
    /// Blocks uploaded from the checkpoint each time they run, above
    /// `blocks` (`LoadOptions::streamed_blocks`).
    stream: Option<BlockStream>,
    /// [max_positions, rotary_dim/2, 2] of (cos, sin), when rotary is used.
    pub rope_table: Option<Tensor>,
}

/// Tensor names of one family, `{}` standing for the layer index.
struct Names {
    embed: &'static str,
    pos_embed: Option<&'static str>,
    final_norm: &'static str,
    lm_head: &'static str,
    ln1: &'static str,
    ln2: Option<&'static str>,
    qkv_fused: Option<&'static str>,
    q: &'static str,
    k: &'static str,
    v: &'static str,
    attn_out: &'static str,
    mlp_in: &'static str,
    mlp_gate: Option<&'static str>,
    mlp_out: &'static str,
}

/// The checkpoint name of MEMIT's W_out at `layer` (the HF spelling; GPT-2
/// checkpoints may omit the `transformer.` prefix, see `resolve_name`).
pub fn mlp_out_name(arch: Arch, layer: usize) -> String {
    format!("{}.weight", names(arch).mlp_out.replace("{}", &layer.to_string()))
}

/// `name` as the source spells it: as given, or without GPT-2's
/// `transformer.` prefix.
pub fn resolve_name(source: &dyn WeightSource, name: &str) -> Result<Option<String>> {
    if source.contains(name) {
        return Ok(Some(name.to_string()));
    }
    Ok(name.strip_prefix("transformer.").filter(|short| source.contains(short)).map(String::from))
}

fn names(arch: Arch) -> Names {
    match arch {
        Arch::Gpt2 => Names {
            embed: "transformer.wte",
            pos_embed: Some("transformer.wpe"),
            final_norm: "transformer.ln_f",
            lm_head: "lm_head",
            ln1: "transformer.h.{}.ln_1",
            ln2: Some("transformer.h.{}.ln_2"),
            qkv_fused: Some("transformer.h.{}.attn.c_attn"),
            q: "",
            k: "",
            v: "",
            attn_out: "transformer.h.{}.attn.c_proj",
            mlp_in: "transformer.h.{}.mlp.c_fc",
            mlp_gate: None,
            mlp_out: "transformer.h.{}.mlp.c_proj",
        },
        Arch::Gptj => Names {
            embed: "transformer.wte",
            pos_embed: None,
            final_norm: "transformer.ln_f",
            lm_head: "lm_head",
            ln1: "transformer.h.{}.ln_1",
            ln2: None,
            qkv_fused: None,
            q: "transformer.h.{}.attn.q_proj",
            k: "transformer.h.{}.attn.k_proj",
            v: "transformer.h.{}.attn.v_proj",
            attn_out: "transformer.h.{}.attn.out_proj",
            mlp_in: "transformer.h.{}.mlp.fc_in",
            mlp_gate: None,
            mlp_out: "transformer.h.{}.mlp.fc_out",
        },
        Arch::GptNeox => Names {
            embed: "gpt_neox.embed_in",
            pos_embed: None,
            final_norm: "gpt_neox.final_layer_norm",
            lm_head: "embed_out",
            ln1: "gpt_neox.layers.{}.input_layernorm",
            ln2: Some("gpt_neox.layers.{}.post_attention_layernorm"),
            qkv_fused: Some("gpt_neox.layers.{}.attention.query_key_value"),
            q: "",
            k: "",
            v: "",
            attn_out: "gpt_neox.layers.{}.attention.dense",
            mlp_in: "gpt_neox.layers.{}.mlp.dense_h_to_4h",
            mlp_gate: None,
            mlp_out: "gpt_neox.layers.{}.mlp.dense_4h_to_h",
        },
        Arch::Llama => Names {
            embed: "model.embed_tokens",
            pos_embed: None,
            final_norm: "model.norm",
            lm_head: "lm_head",
            ln1: "model.layers.{}.input_layernorm",
            ln2: Some("model.layers.{}.post_attention_layernorm"),
            qkv_fused: None,
            q: "model.layers.{}.self_attn.q_proj",
            k: "model.layers.{}.self_attn.k_proj",
            v: "model.layers.{}.self_attn.v_proj",
            attn_out: "model.layers.{}.self_attn.o_proj",
            mlp_in: "model.layers.{}.mlp.up_proj",
            mlp_gate: Some("model.layers.{}.mlp.gate_proj"),
            mlp_out: "model.layers.{}.mlp.down_proj",
        },
    }
}

/// Looks tensors up by name, also without GPT-2's `transformer.` prefix
/// (the original OpenAI-converted checkpoints omit it), checks shapes and
/// uploads them.
struct Loader<'a> {
    ctx: &'a GpuContext,
    source: &'a dyn WeightSource,
    options: LoadOptions,
}

impl Loader<'_> {
    /// Block `l`'s weights (q|k|v, and gate|up, joined when stored apart).
    fn block(&self, c: &ModelConfig, n: &Names, l: usize) -> Result<Block> {
        let layer = |pattern: &str| pattern.replace("{}", &l.to_string());
        let (d, ff, hd) = (c.d_model, c.d_ff, c.head_dim);
        let q_width = c.n_heads * hd;
        let kv_width = c.n_kv_heads * hd;
        let layernorm = c.arch != Arch::Llama;
        let (proj_layout, biased) = match c.arch {
            Arch::Gpt2 => (WeightLayout::InOut, true),
            Arch::Gptj => (WeightLayout::OutIn, false),
            Arch::GptNeox => (WeightLayout::OutIn, true),
            Arch::Llama => (WeightLayout::OutIn, false),
        };
        let mlp_biased = c.arch != Arch::Llama;
        let qkv = match n.qkv_fused {
            Some(p) => self.linear(&layer(p), d, q_width + 2 * kv_width, proj_layout, biased)?,
            None => self.concatenated(&[(layer(n.q), q_width), (layer(n.k), kv_width), (layer(n.v), kv_width)], d, biased)?,
        };
        let mlp_in = match n.mlp_gate {
            Some(gate) => self.concatenated(&[(layer(gate), ff), (layer(n.mlp_in), ff)], d, mlp_biased)?,
            None => self.linear(&layer(n.mlp_in), d, ff, proj_layout, mlp_biased)?,
        };
        Ok(Block {
            ln1: self.norm(&layer(n.ln1), d, c.norm_eps, layernorm)?,
            ln2: n.ln2.map(|p| self.norm(&layer(p), d, c.norm_eps, layernorm)).transpose()?,
            qkv,
            qkv_per_head: c.arch == Arch::GptNeox,
            attn_out: self.linear(&layer(n.attn_out), q_width, d, proj_layout, biased)?,
            mlp_in,
            mlp_gated: n.mlp_gate.is_some(),
            mlp_out: self.linear(&layer(n.mlp_out), ff, d, proj_layout, mlp_biased)?,
        })
    }

    /// The unembedding (`embed` itself when tied and not stored apart),
    /// then the final norm.
    fn head(&self, c: &ModelConfig, n: &Names, embed: &Tensor) -> Result<Head> {
        let lm_head_name = format!("{}.weight", n.lm_head);
        let unembed = if c.tie_word_embeddings && !self.has(&lm_head_name) {
            Linear { weight: embed.clone(), bias: None, layout: WeightLayout::OutIn }
        } else {
            self.linear(n.lm_head, c.d_model, c.vocab_size, WeightLayout::OutIn, c.arch == Arch::Gptj)?
        };
        Ok(Head { norm: self.norm(n.final_norm, c.d_model, c.norm_eps, c.arch != Arch::Llama)?, unembed })
    }

    /// `name` as the source spells it (also without `transformer.`).
    fn resolve(&self, name: &str) -> Option<String> {
        if self.source.contains(name) {
            return Some(name.to_string());
        }
        name.strip_prefix("transformer.").filter(|short| self.source.contains(short)).map(String::from)
    }

    /// The tensor on the GPU, checked against `shape`.
    fn load(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let missing = || ModelError::MissingTensor { name: name.to_string(), source_desc: self.source.describe() };
        let found = self.resolve(name).ok_or_else(missing)?;
        let mismatch = |found: &[usize]| ModelError::ShapeMismatch { name: name.to_string(), expected: shape.to_vec(), found: found.to_vec() };
        if let Some(t) = self.source.uploaded(&found) {
            if t.shape() != shape {
                return Err(mismatch(t.shape()));
            }
            return Ok(t);
        }
        let t = self.source.tensor(&found)?.ok_or_else(missing)?;
        if t.shape != shape {
            return Err(mismatch(&t.shape));
        }
        upload_weight(self.ctx, &t, dtype)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.load(name, &[len], DType::F32)
    }

    fn matrix(&self, name: &str, shape: [usize; 2]) -> Result<Tensor> {
        self.load(name, &shape, self.options.matrix_dtype)
    }

    fn norm(&self, prefix: &str, len: usize, eps: f32, with_bias: bool) -> Result<Norm> {
        Ok(Norm {
            weight: self.vector(&format!("{prefix}.weight"), len)?,
            bias: if with_bias { Some(self.vector(&format!("{prefix}.bias"), len)?) } else { None },
            eps,
        })
    }

    /// Projections from `d_in` features stored [out, in], concatenated
    /// along their outputs into one (their biases too).
    fn concatenated(&self, prefixes: &[(String, usize)], d_in: usize, with_bias: bool) -> Result<Linear> {
        let parts = prefixes.iter().map(|(p, d_out)| self.linear(p, d_in, *d_out, WeightLayout::OutIn, with_bias)).collect::<Result<Vec<_>>>()?;
        let weights: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
        let bias = match with_bias {
            true => Some(self.ctx.concat_rows(&parts.iter().map(|l| l.bias.as_ref().expect("loaded with bias")).collect::<Vec<_>>())?),
            false => None,
        };
        Ok(Linear { weight: self.ctx.concat_rows(&weights)?, bias, layout: WeightLayout::OutIn })
    }

    /// A projection from `d_in` to `d_out` features.
    fn linear(&self, prefix: &str, d_in: usize, d_out: usize, layout: WeightLayout, with_bias: bool) -> Result<Linear> {
        let shape = match layout {
            WeightLayout::OutIn => [d_out, d_in],
            WeightLayout::InOut => [d_in, d_out],
        };
        let bias = if with_bias { Some(self.vector(&format!("{prefix}.bias"), d_out)?) } else { None };
        Ok(Linear { weight: self.matrix(&format!("{prefix}.weight"), shape)?, bias, layout })
    }

    fn has(&self, name: &str) -> bool {
        self.resolve(name).is_some()
    }
}

impl Model {
    /// Block `layer` (uploaded first when it is streamed), or an error when
    /// it is beyond a prefix model's blocks.
    pub fn block_at(&self, layer: usize) -> Result<Block> {
        if let Some(block) = self.blocks.get(layer) {
            return Ok(block.clone());
        }
        match &self.stream {
            Some(stream) if (stream.first..stream.end).contains(&layer) => stream.fetch(&self.ctx, &self.config, layer),
            _ => Err(self.not_loaded(&format!("block {layer}"))),
        }
    }

    /// The first streamed layer (`LoadOptions::streamed_blocks`), if any.
    pub fn first_streamed_layer(&self) -> Option<usize> {
        self.stream.as_ref().map(|s| s.first)
    }

    /// Blocks 0..n this model can run (all of them unless it is a prefix).
    fn loaded_blocks(&self) -> usize {
        match &self.stream {
            Some(stream) if stream.first < stream.end => stream.end,
            _ => self.blocks.len(),
        }
    }

    /// The final norm and unembedding, or an error for a prefix model.
    pub fn head(&self) -> Result<&Head> {
        self.head.as_ref().ok_or_else(|| self.not_loaded("the final norm and unembedding (logits)"))
    }

    fn not_loaded(&self, what: &str) -> ModelError {
        ModelError::Input(format!(
            "{what} not loaded: this model holds blocks 0..{} of {} only (loaded as a prefix for statistics or keys)",
            self.loaded_blocks(),
            self.config.n_layers
        ))
    }

    /// Block `layer` to change in place: an error for a layer beyond a
    /// prefix model's blocks or streamed from the checkpoint (its weights
    /// are uploaded afresh each time it runs, so a change would not stay).
    pub fn resident_block_mut(&mut self, layer: usize) -> Result<&mut Block> {
        if let Some(first) = self.first_streamed_layer().filter(|&first| layer >= first && layer < self.config.n_layers) {
            return Err(ModelError::Input(format!(
                "layer {layer} is streamed from the checkpoint (blocks {first}..{} are), so it cannot be edited: stream fewer blocks",
                self.config.n_layers
            )));
        }
        let held = self.blocks.len();
        self.blocks.get_mut(layer).ok_or_else(|| ModelError::Input(format!("no layer {layer} loaded (this model holds blocks 0..{held})")))
    }

    /// Replaces W_out of `layer` with `weights` (shape as stored in the
    /// checkpoint), keeping the storage dtype the model was loaded with.
    pub fn set_mlp_out(&mut self, layer: usize, weights: &HostTensor) -> Result<()> {
        let ctx = self.ctx.clone();
        let linear = &mut self.resident_block_mut(layer)?.mlp_out;
        let shape = linear.weight.shape().to_vec();
        if weights.shape != shape {
            return Err(ModelError::ShapeMismatch { name: format!("W_out of layer {layer}"), expected: shape, found: weights.shape.clone() });
        }
        linear.weight = upload_weight(&ctx, weights, linear.weight.dtype())?;
        Ok(())
    }
}

/// (cos, sin) of position · base^(−2i/rot), with the frequencies rounded to
/// f32 as PyTorch computes them.
pub fn rope_table(max_positions: usize, rotary_dim: usize, theta: f64) -> Vec<f32> {
    let half = rotary_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / rotary_dim as f32)).collect();
    let mut table = Vec::with_capacity(max_positions * half * 2);
    for p in 0..max_positions {
        for &f in &inv_freq {
            let angle = (p as f32 * f) as f64;
            table.push(angle.cos() as f32);
            table.push(angle.sin() as f32);
        }
    }
    table
}

impl Model {
    /// Uploads a model's weights from `source` according to `config` (all
    /// of them, or a prefix: `options.prefix_blocks`). Streaming blocks
    /// needs [`Model::load_shared`].
    pub fn load(ctx: Arc<GpuContext>, config: ModelConfig, source: &dyn WeightSource, options: LoadOptions) -> Result<Model> {
        if options.streamed_blocks > 0 {
            return Err(ModelError::Input("streamed blocks are uploaded from their checkpoint each time they run: load with Model::load_shared".into()));
        }
        Self::load_from(ctx, config, source, None, options)
    }

    /// As [`Model::load`], keeping `source` to stream the highest
    /// `options.streamed_blocks` blocks from.
    pub fn load_shared(ctx: Arc<GpuContext>, config: ModelConfig, source: SharedSource, options: LoadOptions) -> Result<Model> {
        Self::load_from(ctx, config, source.as_ref(), Some(source.clone()), options)
    }

    fn load_from(ctx: Arc<GpuContext>, config: ModelConfig, source: &dyn WeightSource, shared: Option<SharedSource>, options: LoadOptions) -> Result<Model> {
        let c = &config;
        let n_blocks = match options.prefix_blocks {
            Some(n) if n == 0 || n > c.n_layers => return Err(ModelError::Input(format!("a prefix of {n} blocks of a {}-layer model", c.n_layers))),
            Some(n) => n,
            None => c.n_layers,
        };
        if options.streamed_blocks > c.n_layers {
            return Err(ModelError::Input(format!("{} streamed blocks of a {}-layer model", options.streamed_blocks, c.n_layers)));
        }
        let first_streamed = c.n_layers - options.streamed_blocks;
        let stream = shared.filter(|_| options.streamed_blocks > 0).map(|source| BlockStream {
            first: first_streamed,
            end: n_blocks,
            source,
            matrix_dtype: options.matrix_dtype,
            recent: Arc::default(),
        });
        let n = names(c.arch);
        let loader = Loader { ctx: &ctx, source, options };
        let blocks = (0..n_blocks.min(first_streamed)).map(|l| loader.block(c, &n, l)).collect::<Result<Vec<_>>>()?;
        let embed = loader.matrix(&format!("{}.weight", n.embed), [c.vocab_size, c.d_model])?;
        let head = if options.prefix_blocks.is_some() { None } else { Some(loader.head(c, &n, &embed)?) };
        let rope_table = if c.rotary_dim > 0 {
            let table = rope_table(c.max_positions, c.rotary_dim, c.rope_theta);
            Some(ctx.upload(&[c.max_positions, c.rotary_dim / 2, 2], &table, DType::F32)?)
        } else {
            None
        };
        let model = Model {
            pos_embed: n.pos_embed.map(|p| loader.matrix(&format!("{p}.weight"), [c.max_positions, c.d_model])).transpose()?,
            embed,
            head,
            blocks,
            stream,
            rope_table,
            config,
            ctx,
        };
        debug_assert!(model.config.residual != Residual::ParallelSharedNorm || model.blocks.iter().all(|b| b.ln2.is_none()));
        Ok(model)
    }

    /// Completes a prefix model (`LoadOptions::prefix_blocks`) from the same
    /// `source`: the blocks it lacks and the head, in the dtype it was loaded
    /// with. The blocks it holds (and any edits to them) stay as they are.
    pub fn load_remaining(&mut self, source: &dyn WeightSource) -> Result<()> {
        let c = &self.config;
        let n = names(c.arch);
        let options = LoadOptions { matrix_dtype: self.embed.dtype(), ..Default::default() };
        let loader = Loader { ctx: &self.ctx, source, options };
        let resident_end = self.stream.as_ref().map_or(c.n_layers, |s| s.first);
        for l in self.blocks.len()..resident_end {
            let block = loader.block(c, &n, l)?;
            self.blocks.push(block);
        }
        if let Some(stream) = &mut self.stream {
            stream.end = c.n_layers;
        }
        if self.head.is_none() {
            self.head = Some(loader.head(c, &n, &self.embed)?);
        }
        Ok(())
    }
}
