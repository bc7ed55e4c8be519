//! Corrupted safetensors checkpoints: every bit of the length prefix and
//! of the header, seeded flips over the data, and truncations, read through
//! the source and loaded as a model, give either the model or an error;
//! never a panic.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use memit_gpu::GpuContext;
use memit_models::{read_config, FileBytes, LoadOptions, Model, ModelError, SafetensorsSource, SplitMix64, WeightSource};

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-gpt2")
}

/// Opens the bytes as the model's checkpoint, reads every tensor and, when
/// that works, loads the model on the GPU.
fn open_and_load(bytes: Vec<u8>, names: &[String]) -> Result<(), ModelError> {
    let source = SafetensorsSource::from_files(vec![("model.safetensors".into(), FileBytes::Owned(bytes))])?;
    for name in names {
        source.tensor(name)?;
    }
    let config = read_config(&fixture())?;
    Model::load(ctx(), config, &source, LoadOptions::default()).map(|_| ())
}

#[test]
fn corrupted_safetensors_give_errors_not_panics() {
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let source = SafetensorsSource::from_files(vec![("model.safetensors".into(), FileBytes::Owned(bytes.clone()))]).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let names: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    assert!(names.iter().all(|n| source.tensor(n).unwrap().is_some()));
    open_and_load(bytes.clone(), &names).expect("the unmodified checkpoint loads");

    let mut outcomes = (0usize, 0usize);
    let mut check = |b: Vec<u8>, what: String| {
        let outcome = std::panic::catch_unwind(|| open_and_load(b, &names)).unwrap_or_else(|_| panic!("{what} panicked"));
        if outcome.is_ok() { outcomes.0 += 1 } else { outcomes.1 += 1 }
    };
    // Every bit of the length prefix, and one bit of every header byte
    // (bit index cycling), and seeded flips anywhere.
    for bit in 0..64 {
        let mut b = bytes.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        check(b, format!("length bit {bit}"));
    }
    for at in 8..8 + header_len {
        let mut b = bytes.clone();
        b[at] ^= 1 << (at % 8);
        check(b, format!("header byte {at}"));
    }
    let mut rng = SplitMix64(0x5afe);
    for _ in 0..300 {
        let at = rng.below(bytes.len());
        let mut b = bytes.clone();
        b[at] ^= 1 << rng.below(8);
        check(b, format!("byte {at}"));
    }
    for len in [0, 7, 8, 100, 8 + header_len, bytes.len() - 1] {
        check(bytes[..len].to_vec(), format!("truncation to {len} bytes"));
    }
    eprintln!("{} corrupted checkpoints loaded (flips in values or padding), {} refused", outcomes.0, outcomes.1);
    assert!(outcomes.1 > header_len / 2, "most header corruptions must be refused: {outcomes:?}");
}
