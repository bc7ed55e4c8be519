//! The WGSL forward pass against transformers: logits, every block output
//! and every MLP key of the tiny fixtures (tests/fixtures/tiny-*, made by
//! tests/fixtures/make_tiny_models.py), for right- and left-padded batches.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use memit_gpu::{DType, GpuContext, Tensor};
use memit_models::{load_hf_dir, Batch, HostData, HostTensor, LoadOptions, Model, Padding};
use safetensors::SafeTensors;

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(format!("tiny-{name}"))
}

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(name: &str) -> Golden {
        Golden { bytes: std::fs::read(fixture(name).join("golden.safetensors")).expect("golden file") }
    }

    fn get(&self, key: &str) -> (Vec<usize>, Vec<f64>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(key).unwrap_or_else(|_| panic!("golden has no {key}"));
        let values = match t.dtype() {
            safetensors::Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            safetensors::Dtype::I32 => t.data().chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            other => panic!("unexpected dtype {other:?}"),
        };
        (t.shape().to_vec(), values)
    }
}

/// Max |got − want| over each real row must be ≤ `rel` · max |want| of the row.
fn assert_rows_close(got: &[f32], want: &[f64], width: usize, rows: &[(usize, usize)], rel: f64, what: &str) {
    for &(got_row, want_row) in rows {
        let g = &got[got_row * width..][..width];
        let w = &want[want_row * width..][..width];
        let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        let err = g.iter().zip(w).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        if std::env::var("GOLDEN_VERBOSE").is_ok() { eprintln!("{what}: row {want_row}: rel {:e}", err / scale); }
        assert!(err <= rel * scale, "{what}: row {want_row}: max error {err:e} vs scale {scale:e} (rel {:e})", err / scale);
    }
}

fn read(t: &Tensor) -> Vec<f32> {
    pollster::block_on(ctx().read(t)).unwrap()
}

fn check_model(name: &str, options: LoadOptions, rel: f64) {
    let loaded = load_hf_dir(ctx(), &fixture(name), options).unwrap_or_else(|e| panic!("loading {name}: {e}"));
    check_against_golden(name, &loaded.model, rel);
}

/// The golden's padded batch on `side` as the model sees it, and its real
/// rows (same layout as the golden's, so rows correspond one to one).
fn golden_batch(golden: &Golden, side: &str, padding: Padding) -> (Batch, Vec<(usize, usize)>) {
    let (shape, ids) = golden.get(&format!("{side}.input_ids"));
    let (_, mask) = golden.get(&format!("{side}.attention_mask"));
    let (b, t) = (shape[0], shape[1]);
    let sequences: Vec<Vec<u32>> = (0..b).map(|i| (0..t).filter(|&j| mask[i * t + j] > 0.0).map(|j| ids[i * t + j] as u32).collect()).collect();
    let real = (0..b * t).filter(|&r| mask[r] > 0.0).map(|r| (r, r)).collect();
    (Batch::new(&sequences, padding, 0).unwrap(), real)
}

fn check_against_golden(name: &str, model: &Model, rel: f64) {
    let golden = Golden::open(name);
    let layers: Vec<usize> = (0..model.config.n_layers).collect();
    for (side, padding) in [("right", Padding::Right), ("left", Padding::Left)] {
        let (batch, real) = golden_batch(&golden, side, padding);
        let (_, positions) = golden.get(&format!("{side}.position_ids"));
        for &(r, _) in &real {
            assert_eq!(batch.positions[r] as f64, positions[r], "{name} {side}: position of row {r}");
        }
        let out = model.forward(&batch, &layers, true).unwrap();
        let vocab = model.config.vocab_size;
        for l in 0..model.config.n_layers {
            let hidden = read(out.hidden[l].as_ref().unwrap());
            assert_rows_close(&hidden, &golden.get(&format!("{side}.block.{l}")).1, model.config.d_model, &real, rel, &format!("{name} {side} block {l}"));
            let key = read(out.mlp_keys[l].as_ref().unwrap());
            assert_rows_close(&key, &golden.get(&format!("{side}.mlp_key.{l}")).1, model.config.d_ff, &real, rel, &format!("{name} {side} mlp key {l}"));
        }
        assert_rows_close(&read(out.logits.as_ref().unwrap()), &golden.get(&format!("{side}.logits")).1, vocab, &real, rel, &format!("{name} {side} logits"));
    }
}

#[test]
fn gpt2_matches_transformers() {
    check_model("gpt2", LoadOptions::default(), 1e-4);
}

#[test]
fn gptj_matches_transformers() {
    check_model("gptj", LoadOptions::default(), 1e-4);
}

#[test]
fn gpt_neox_parallel_f16_checkpoint_matches_transformers() {
    check_model("gpt-neox", LoadOptions::default(), 1e-4);
}

#[test]
fn gpt_neox_sequential_sharded_checkpoint_matches_transformers() {
    check_model("gpt-neox-sequential", LoadOptions::default(), 1e-4);
}

#[test]
fn llama_gqa_bf16_checkpoint_matches_transformers() {
    check_model("llama", LoadOptions::default(), 1e-4);
}

#[test]
fn f16_weight_storage_stays_close() {
    // f16 storage rounds weights (~5e-4 relative), so the bound is looser;
    // it still catches any layout mistake, which would be off by O(1).
    check_model("gpt2", LoadOptions { matrix_dtype: DType::F16, ..Default::default() }, 2e-2);
    check_model("gpt-neox", LoadOptions { matrix_dtype: DType::F16, ..Default::default() }, 1e-4);
}

#[test]
fn a_prefix_model_matches_transformers_and_loads_the_rest_on_demand() {
    // GPT-J (q, k, v joined at load) and Llama (q, k, v and gate, up joined).
    for name in ["gptj", "llama"] {
        let loaded = load_hf_dir(ctx(), &fixture(name), LoadOptions { prefix_blocks: Some(1), ..Default::default() }).unwrap();
        let mut model = loaded.model;
        assert_eq!((model.blocks.len(), model.head.is_none()), (1, true), "{name}");
        let golden = Golden::open(name);
        let (batch, real) = golden_batch(&golden, "right", Padding::Right);
        let out = model.forward(&batch, &[0], false).unwrap();
        let (d, ff) = (model.config.d_model, model.config.d_ff);
        assert_rows_close(&read(out.hidden[0].as_ref().unwrap()), &golden.get("right.block.0").1, d, &real, 1e-4, &format!("{name} prefix block 0"));
        assert_rows_close(&read(out.mlp_keys[0].as_ref().unwrap()), &golden.get("right.mlp_key.0").1, ff, &real, 1e-4, &format!("{name} prefix mlp key 0"));
        // What the prefix lacks is a clear error, not a panic.
        for (capture, logits) in [(vec![], true), (vec![1], false)] {
            let err = model.forward(&batch, &capture, logits).err().expect("beyond the prefix").to_string();
            assert!(err.contains("not loaded") && err.contains("blocks 0..1"), "{name}: {err}");
        }
        model.load_remaining(loaded.source.as_ref()).unwrap();
        assert_eq!(model.blocks.len(), model.config.n_layers);
        check_against_golden(name, &model, 1e-4);
    }
}

#[test]
fn streamed_blocks_match_transformers_and_stay_off_the_gpu() {
    // The top two blocks stay in the checkpoint and go up when they run;
    // GPT-J's q, k, v are joined at each upload. Its own context, so the
    // memory meter sees this model alone.
    let own = pollster::block_on(GpuContext::from_env()).unwrap();
    let resident = load_hf_dir(own.clone(), &fixture("gptj"), LoadOptions::default()).unwrap().model;
    let resident_bytes = own.memory().live_bytes;
    let one_block = block_bytes(&resident.blocks[2]);
    drop(resident);
    let options = LoadOptions { streamed_blocks: 2, ..Default::default() };
    let streamed = load_hf_dir(own.clone(), &fixture("gptj"), options).unwrap().model;
    assert_eq!((streamed.blocks.len(), streamed.first_streamed_layer()), (1, Some(1)));
    assert_eq!(own.memory().live_bytes, resident_bytes - 2 * one_block, "two blocks fewer on the GPU after loading");
    drop(streamed);
    let loaded = load_hf_dir(ctx(), &fixture("gptj"), options).unwrap();
    let mut model = loaded.model;
    check_against_golden("gptj", &model, 1e-4);
    // A streamed block cannot be edited: its weights come from the
    // checkpoint at every run.
    let (ff, d) = (model.config.d_ff, model.config.d_model);
    let w = HostTensor { shape: vec![d, ff], data: HostData::F32(vec![0.0; d * ff]) };
    let err = model.set_mlp_out(2, &w).expect_err("a streamed layer").to_string();
    assert!(err.contains("layer 2 is streamed"), "{err}");
    model.set_mlp_out(0, &w).unwrap();
    // Streaming needs a source the model can keep.
    let err = Model::load(ctx(), model.config.clone(), loaded.source.as_ref(), LoadOptions { streamed_blocks: 1, ..Default::default() }).err().unwrap().to_string();
    assert!(err.contains("load_shared"), "{err}");

    // A prefix model with streamed blocks above it: the prefix runs, the
    // rest (resident and streamed) comes with load_remaining.
    let loaded = load_hf_dir(ctx(), &fixture("llama"), LoadOptions { prefix_blocks: Some(1), streamed_blocks: 1, ..Default::default() }).unwrap();
    let mut model = loaded.model;
    let err = model.forward(&golden_batch(&Golden::open("llama"), "right", Padding::Right).0, &[2], false).err().unwrap().to_string();
    assert!(err.contains("blocks 0..1"), "{err}");
    model.load_remaining(loaded.source.as_ref()).unwrap();
    assert_eq!((model.blocks.len(), model.first_streamed_layer()), (2, Some(2)));
    check_against_golden("llama", &model, 1e-4);
}

/// A model that keeps its checkpoint (to stream blocks from) can still move
/// between threads, as it could before.
#[test]
fn a_model_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
}

/// A block's weights and biases, as the memory meter counts them.
fn block_bytes(block: &memit_models::Block) -> u64 {
    let linears = [&block.qkv, &block.attn_out, &block.mlp_in, &block.mlp_out];
    let norms = [Some(&block.ln1), block.ln2.as_ref()].into_iter().flatten();
    let tensors = linears.iter().flat_map(|l| [Some(&l.weight), l.bias.as_ref()]).chain(norms.flat_map(|n| [Some(&n.weight), n.bias.as_ref()])).flatten();
    tensors.map(|t| (t.numel() * t.dtype().size()) as u64).sum()
}
