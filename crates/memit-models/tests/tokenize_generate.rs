//! Tokenisation with the real GPT-2 and GPT-NeoX BPE files, and generation
//! checked against step-by-step forward passes.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use memit_gpu::GpuContext;
use memit_models::{argmax, load_hf_dir, Batch, GenerateOptions, LoadOptions, Padding, Sampling, TextTokenizer};

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn gpt2_and_neox_tokenizers_give_known_ids() {
    let gpt2 = TextTokenizer::from_file(&fixtures().join("tokenizers/gpt2/tokenizer.json")).unwrap();
    assert_eq!(gpt2.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(gpt2.vocab_size(), 50257);
    // MEMIT targets get a leading space: " Paris" is one GPT-2 token.
    assert_eq!(gpt2.encode(" Paris").unwrap(), vec![6342]);
    let text = "The Eiffel Tower is located in the city of";
    assert_eq!(gpt2.decode(&gpt2.encode(text).unwrap()).unwrap(), text);

    let neox = TextTokenizer::from_file(&fixtures().join("tokenizers/gpt-neox-20b/tokenizer.json")).unwrap();
    assert_eq!(neox.encode("Hello world").unwrap(), vec![12092, 1533]);
    assert_eq!(neox.decode(&neox.encode(text).unwrap()).unwrap(), text);
}

#[test]
fn malformed_tokenizer_is_a_clear_error() {
    let err = TextTokenizer::from_json_bytes(b"{not json").err().unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn an_unsupported_tokenizer_component_is_named() {
    let text = std::fs::read_to_string(fixtures().join("tokenizers/gpt2/tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let byte_level = json["pre_tokenizer"].clone();
    json["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [byte_level, {"type": "FancyNew"}]});
    let err = TextTokenizer::from_json_bytes(json.to_string().as_bytes()).err().unwrap().to_string();
    assert!(err.contains("pre_tokenizer `FancyNew` is not supported"), "{err}");
    json["pre_tokenizer"] = serde_json::Value::Null;
    json["decoder"] = serde_json::json!({"type": "Futuristic"});
    let err = TextTokenizer::from_json_bytes(json.to_string().as_bytes()).err().unwrap().to_string();
    assert!(err.contains("decoder `Futuristic` is not supported"), "{err}");
}

#[test]
/// Generation reads cached keys and values and runs one row per step; a
/// full forward over the whole sequence per step must pick the same tokens,
/// for every architecture (learned and rotary positions, parallel and
/// sequential blocks, grouped-query attention) and prompts of different
/// lengths in one batch.
fn greedy_generation_follows_argmax_of_full_forward() {
    for name in ["tiny-gpt2", "tiny-gptj", "tiny-gpt-neox", "tiny-gpt-neox-sequential", "tiny-llama"] {
        greedy_generation_matches_full_forward(name);
    }
}

fn greedy_generation_matches_full_forward(name: &str) {
    let model = load_hf_dir(ctx(), &fixtures().join(name), LoadOptions::default()).unwrap().model;
    let prompts = vec![vec![5, 17, 250], vec![11, 260, 8, 61, 2], vec![42]];
    let options = GenerateOptions { max_new_tokens: 6, sampling: Sampling::Greedy, stop_at_eos: false };
    let generated = pollster::block_on(model.generate(&prompts, options)).unwrap();
    for (prompt, new) in prompts.iter().zip(&generated) {
        assert_eq!(new.len(), 6);
        // Independently: one full forward per step, argmax of the last row.
        let mut seq = prompt.clone();
        for &token in new {
            let batch = Batch::new(std::slice::from_ref(&seq), Padding::Right, 0).unwrap();
            let out = model.forward(&batch, &[], true).unwrap();
            let logits = pollster::block_on(model.ctx.read(out.logits.as_ref().unwrap())).unwrap();
            let vocab = model.config.vocab_size;
            let last = &logits[(seq.len() - 1) * vocab..seq.len() * vocab];
            assert_eq!(argmax(last), token, "{name}, prompt {prompt:?}");
            seq.push(token);
        }
    }
}

#[test]
fn sampling_is_seeded_and_stays_in_top_k() {
    let model = load_hf_dir(ctx(), &fixtures().join("tiny-gpt2"), LoadOptions::default()).unwrap().model;
    let prompt = vec![vec![5, 17, 250, 3]];
    let sample = |seed| {
        let options = GenerateOptions { max_new_tokens: 5, sampling: Sampling::TopK { k: 3, temperature: 1.0, seed }, stop_at_eos: false };
        pollster::block_on(model.generate(&prompt, options)).unwrap().remove(0)
    };
    let a = sample(7);
    assert_eq!(a, sample(7), "same seed, same tokens");
    let mut seq = prompt[0].clone();
    for &token in &a {
        let logits = pollster::block_on(model.last_token_logits(std::slice::from_ref(&seq))).unwrap().remove(0);
        let better = logits.iter().filter(|&&v| v > logits[token as usize]).count();
        assert!(better < 3, "token {token} is not among the top 3");
        seq.push(token);
    }
    let draws: std::collections::HashSet<Vec<u32>> = (0..6).map(sample).collect();
    assert!(draws.len() > 1, "different seeds should give different samples");
}

#[test]
fn bad_inputs_are_reported() {
    let model = load_hf_dir(ctx(), &fixtures().join("tiny-gpt2"), LoadOptions::default()).unwrap().model;
    let err = model.forward(&Batch::new(&[vec![1, 99_999]], Padding::Right, 0).unwrap(), &[], true).err().unwrap();
    assert!(err.to_string().contains("outside the model's vocabulary"), "{err}");
    assert!(Batch::new(&[vec![]], Padding::Right, 0).is_err());
    let too_long = GenerateOptions { max_new_tokens: 100, ..Default::default() };
    assert!(pollster::block_on(model.generate(&[vec![1, 2]], too_long)).is_err());
    let missing = load_hf_dir(ctx(), &fixtures().join("no-such-model"), LoadOptions::default()).err().unwrap();
    assert!(missing.to_string().contains("no-such-model"), "{missing}");
}
