//! Model hyperparameters, read from a Hugging Face `config.json` (old and
//! new field spellings) or from GGUF metadata.

use memit_gpu::{Activation, RotaryStyle};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The supported model families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arch {
    Gpt2,
    Gptj,
    GptNeox,
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Gptj => "gptj",
            Arch::GptNeox => "gpt_neox",
            Arch::Llama => "llama",
        }
    }
}

/// How a block combines attention and MLP with the residual stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residual {
    /// x += attn(ln1(x)); x += mlp(ln2(x))  (GPT-2, Llama, NeoX sequential)
    Sequential,
    /// x += attn(ln1(x)) + mlp(ln1(x))  (GPT-J)
    ParallelSharedNorm,
    /// x += attn(ln1(x)) + mlp(ln2(x))  (GPT-NeoX use_parallel_residual)
    Parallel,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Width of the MLP hidden layer: the dimension of MEMIT's keys.
    pub d_ff: usize,
    pub max_positions: usize,
    pub norm_eps: f32,
    /// Dimensions of each head that rotary embedding rotates (0: learned
    /// absolute positions, as in GPT-2).
    pub rotary_dim: usize,
    pub rotary_style: RotaryStyle,
    pub rope_theta: f64,
    pub residual: Residual,
    pub activation: Activation,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

fn get<'a>(v: &'a Value, names: &[&str]) -> Option<&'a Value> {
    names.iter().find_map(|n| v.get(*n).filter(|x| !x.is_null()))
}

fn usize_of(v: &Value, field: &'static str, names: &[&str]) -> Result<usize> {
    get(v, names)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| ModelError::Config { field, detail: format!("missing or not an integer (looked for {names:?})") })
}

fn opt_usize(v: &Value, names: &[&str]) -> Option<usize> {
    get(v, names).and_then(Value::as_u64).map(|x| x as usize)
}

fn opt_f64(v: &Value, names: &[&str]) -> Option<f64> {
    get(v, names).and_then(Value::as_f64)
}

fn token_id(v: &Value, name: &str) -> Option<u32> {
    match v.get(name)? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
        _ => None,
    }
}

fn activation(name: &str) -> Result<Activation> {
    match name {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::GeluErf),
        "silu" | "swish" => Ok(Activation::Silu),
        "relu" => Ok(Activation::Relu),
        other => Err(ModelError::Config { field: "activation", detail: format!("unsupported activation `{other}`") }),
    }
}

/// rope_theta and the rotated fraction, from either the old top-level
/// fields or the newer `rope_parameters` / `rope_scaling` objects.
fn rope(v: &Value, default_theta: f64, default_fraction: f64) -> Result<(f64, f64)> {
    let params = get(v, &["rope_parameters", "rope_scaling"]);
    if let Some(kind) = params.and_then(|p| get(p, &["rope_type", "type"])).and_then(Value::as_str) {
        if kind != "default" {
            return Err(ModelError::Config { field: "rope_parameters", detail: format!("rope scaling `{kind}` is not supported") });
        }
    }
    let theta = opt_f64(v, &["rope_theta", "rotary_emb_base"])
        .or_else(|| params.and_then(|p| opt_f64(p, &["rope_theta"])))
        .unwrap_or(default_theta);
    let fraction = opt_f64(v, &["rotary_pct", "partial_rotary_factor"])
        .or_else(|| params.and_then(|p| opt_f64(p, &["partial_rotary_factor"])))
        .unwrap_or(default_fraction);
    Ok((theta, fraction))
}

impl ModelConfig {
    /// Parses a Hugging Face `config.json` value.
    pub fn from_hf_json(v: &Value) -> Result<ModelConfig> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("<missing model_type>");
        let arch = match model_type {
            "gpt2" => Arch::Gpt2,
            "gptj" => Arch::Gptj,
            "gpt_neox" => Arch::GptNeox,
            "llama" | "smollm" | "smollm2" => Arch::Llama,
            other => return Err(ModelError::UnknownArchitecture(other.to_string())),
        };
        let d_model = usize_of(v, "hidden size", &["n_embd", "hidden_size"])?;
        let n_heads = usize_of(v, "attention heads", &["n_head", "num_attention_heads"])?;
        if n_heads == 0 || d_model % n_heads != 0 {
            return Err(ModelError::Config { field: "attention heads", detail: format!("{n_heads} heads do not divide width {d_model}") });
        }
        let head_dim = opt_usize(v, &["head_dim"]).unwrap_or(d_model / n_heads);
        let act_name = get(v, &["activation_function", "hidden_act"]).and_then(Value::as_str);
        let mut config = ModelConfig {
            arch,
            vocab_size: usize_of(v, "vocab_size", &["vocab_size"])?,
            d_model,
            n_layers: usize_of(v, "layers", &["n_layer", "num_hidden_layers"])?,
            n_heads,
            n_kv_heads: opt_usize(v, &["num_key_value_heads"]).unwrap_or(n_heads),
            head_dim,
            d_ff: opt_usize(v, &["n_inner", "intermediate_size"]).unwrap_or(4 * d_model),
            max_positions: opt_usize(v, &["n_positions", "max_position_embeddings", "n_ctx"]).unwrap_or(2048),
            norm_eps: opt_f64(v, &["layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"]).unwrap_or(1e-5) as f32,
            rotary_dim: 0,
            rotary_style: RotaryStyle::Half,
            rope_theta: 10000.0,
            residual: Residual::Sequential,
            activation: Activation::GeluTanh,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(arch == Arch::Gpt2),
            bos_token_id: token_id(v, "bos_token_id"),
            eos_token_id: token_id(v, "eos_token_id"),
        };
        match arch {
            Arch::Gpt2 => {
                config.activation = activation(act_name.unwrap_or("gelu_new"))?;
            }
            Arch::Gptj => {
                config.activation = activation(act_name.unwrap_or("gelu_new"))?;
                config.rotary_dim = opt_usize(v, &["rotary_dim"]).unwrap_or(head_dim);
                config.rotary_style = RotaryStyle::Interleaved;
                config.residual = Residual::ParallelSharedNorm;
            }
            Arch::GptNeox => {
                config.activation = activation(act_name.unwrap_or("gelu"))?;
                let (theta, fraction) = rope(v, 10000.0, 0.25)?;
                config.rope_theta = theta;
                config.rotary_dim = (head_dim as f64 * fraction) as usize;
                let parallel = v.get("use_parallel_residual").and_then(Value::as_bool).unwrap_or(true);
                config.residual = if parallel { Residual::Parallel } else { Residual::Sequential };
            }
            Arch::Llama => {
                config.activation = activation(act_name.unwrap_or("silu"))?;
                let (theta, _) = rope(v, 10000.0, 1.0)?;
                config.rope_theta = theta;
                config.rotary_dim = head_dim;
                if v.get("attention_bias").and_then(Value::as_bool) == Some(true) || v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
                    return Err(ModelError::Config { field: "attention_bias", detail: "Llama variants with biases are not supported".into() });
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Every dimension is checked here, before any is divided by or
    /// allocated with: a zero or inconsistent value in a config or GGUF
    /// header is an error naming the field, never a panic later.
    pub(crate) fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden size", self.d_model),
            ("attention heads", self.n_heads),
            ("head size", self.head_dim),
            ("intermediate size", self.d_ff),
            ("max positions", self.max_positions),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ModelError::Config { field, detail: "must be at least 1, the file says 0".into() });
        }
        const LIMIT: usize = 1 << 20;
        if let Some((field, v)) = positive.iter().chain(&[("vocab_size", self.vocab_size), ("layers", self.n_layers)]).find(|(_, v)| *v > LIMIT) {
            return Err(ModelError::Config { field, detail: format!("{v} is implausibly large (over {LIMIT})") });
        }
        if self.n_heads.checked_mul(self.head_dim).is_none_or(|w| w > LIMIT) {
            return Err(ModelError::Config { field: "attention heads", detail: format!("{} heads of size {} are implausibly wide", self.n_heads, self.head_dim) });
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) || !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ModelError::Config { field: "norm epsilon / rope theta", detail: format!("{} / {} must be finite and positive", self.norm_eps, self.rope_theta) });
        }
        if self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(ModelError::Config { field: "num_key_value_heads", detail: format!("{} query heads cannot share {} key/value heads", self.n_heads, self.n_kv_heads) });
        }
        if self.rotary_dim % 2 != 0 || self.rotary_dim > self.head_dim {
            return Err(ModelError::Config { field: "rotary", detail: format!("rotary dimension {} invalid for head size {}", self.rotary_dim, self.head_dim) });
        }
        if self.n_layers == 0 || self.vocab_size == 0 {
            return Err(ModelError::Config { field: "layers", detail: "model has no layers or no vocabulary".into() });
        }
        Ok(())
    }
}
