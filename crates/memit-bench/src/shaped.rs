//! `memit-bench make-gptj`: a randomly initialised model with GPT-J 6B's
//! widths (d = 4096, d_ff = 16384, 16 heads, rotary 64, vocabulary 50,400)
//! and a few layers, written as a Hugging Face folder (config.json, f16
//! safetensors, the GPT-2 tokenizer). Real weights cannot be had here; the
//! real shapes are what exercise the 1 GiB covariances, the binding-size
//! tiling and the d_ff = 16384 solve.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use memit_models::SplitMix64;

pub struct Options {
    pub out: PathBuf,
    pub layers: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub heads: usize,
    pub vocab: usize,
    pub seed: u64,
}

/// GPT-J's initialisation: N(0, 0.02) matrices, unit norms, zero biases.
enum Init {
    Normal,
    Ones,
    Zeros,
}

struct Spec {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

fn tensors(o: &Options) -> Vec<Spec> {
    let (d, ff, v) = (o.d_model, o.d_ff, o.vocab);
    let spec = |name: String, shape: &[usize], init| Spec { name, shape: shape.to_vec(), init };
    let mut out = vec![spec("transformer.wte.weight".into(), &[v, d], Init::Normal)];
    for l in 0..o.layers {
        let p = format!("transformer.h.{l}");
        out.push(spec(format!("{p}.ln_1.weight"), &[d], Init::Ones));
        out.push(spec(format!("{p}.ln_1.bias"), &[d], Init::Zeros));
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push(spec(format!("{p}.attn.{proj}.weight"), &[d, d], Init::Normal));
        }
        out.push(spec(format!("{p}.mlp.fc_in.weight"), &[ff, d], Init::Normal));
        out.push(spec(format!("{p}.mlp.fc_in.bias"), &[ff], Init::Zeros));
        out.push(spec(format!("{p}.mlp.fc_out.weight"), &[d, ff], Init::Normal));
        out.push(spec(format!("{p}.mlp.fc_out.bias"), &[d], Init::Zeros));
    }
    out.push(spec("transformer.ln_f.weight".into(), &[d], Init::Ones));
    out.push(spec("transformer.ln_f.bias".into(), &[d], Init::Zeros));
    out.push(spec("lm_head.weight".into(), &[v, d], Init::Normal));
    out.push(spec("lm_head.bias".into(), &[v], Init::Zeros));
    out
}

/// Writes the folder under a temporary name, renamed into place at the end:
/// `out` appears whole or not at all, and an existing `out` is refused.
pub fn run(o: Options) -> Result<()> {
    if o.out.exists() {
        bail!("{} already exists; choose another --out (nothing was written)", o.out.display());
    }
    if o.layers == 0 || o.heads == 0 || o.d_model % o.heads != 0 {
        bail!("--layers and --heads must be positive and --d-model a multiple of --heads");
    }
    let name = o.out.file_name().with_context(|| format!("{} is not a folder path", o.out.display()))?;
    let partial = o.out.with_file_name(format!(".{}.memit-partial", name.to_string_lossy()));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing the leftover {}", partial.display()))?;
    }
    std::fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let config = serde_json::json!({
        "model_type": "gptj", "architectures": ["GPTJForCausalLM"], "activation_function": "gelu_new",
        "n_embd": o.d_model, "n_layer": o.layers, "n_head": o.heads, "rotary_dim": 64, "n_positions": 2048,
        "n_inner": o.d_ff, "vocab_size": o.vocab, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": false,
        "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "float16",
        "memit_wgpu_note": format!("randomly initialised (seed {}) by memit-bench make-gptj: GPT-J 6B's widths, not its weights", o.seed)
    });
    std::fs::write(partial.join("config.json"), serde_json::to_string_pretty(&config)?)?;
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers/gpt2/tokenizer.json");
    std::fs::copy(&tokenizer, partial.join("tokenizer.json")).with_context(|| format!("copying {}", tokenizer.display()))?;
    write_safetensors(&partial.join("model.safetensors"), &tensors(&o), o.seed)?;
    std::fs::rename(&partial, &o.out).with_context(|| format!("renaming {} to {}", partial.display(), o.out.display()))?;
    eprintln!("wrote {}", o.out.display());
    Ok(())
}

/// Streams the tensors into one f16 safetensors file, generating each as it
/// is written (the whole model is never in memory).
fn write_safetensors(path: &Path, specs: &[Spec], seed: u64) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for s in specs {
        let bytes = s.shape.iter().product::<usize>() * 2;
        header.insert(s.name.clone(), serde_json::json!({"dtype": "F16", "shape": s.shape, "data_offsets": [offset, offset + bytes]}));
        offset += bytes;
    }
    let mut text = serde_json::to_string(&serde_json::Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    let mut rng = SplitMix64(seed);
    let mut row = Vec::new();
    for s in specs {
        let n: usize = s.shape.iter().product();
        let mut left = n;
        while left > 0 {
            let take = left.min(1 << 20);
            row.clear();
            match s.init {
                Init::Normal => {
                    while row.len() < take {
                        let (a, b) = rng.normals();
                        row.push(half::f16::from_f64(0.02 * a));
                        if row.len() < take {
                            row.push(half::f16::from_f64(0.02 * b));
                        }
                    }
                }
                Init::Ones => row.resize(take, half::f16::ONE),
                Init::Zeros => row.resize(take, half::f16::ZERO),
            }
            let bytes: Vec<u8> = row.iter().flat_map(|h| h.to_le_bytes()).collect();
            w.write_all(&bytes)?;
            left -= take;
        }
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}
