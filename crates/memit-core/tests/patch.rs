//! Patch files: the edited weights equal W + residᵀ·x (checked against a
//! naive CPU product), revert restores the original bytes exactly for every
//! dtype and layout, and patches refuse the wrong model, double application
//! and tampering.

use memit_core::{EditRequest, LayerUpdate, Patch, TargetText};
use memit_models::{StoredDtype, StoredTensor, WeightLayout};

/// xorshift64*: deterministic test data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn tensor(name: &str, dtype: StoredDtype, shape: [usize; 2], rng: &mut Rng) -> StoredTensor {
    let n = shape[0] * shape[1];
    let mut t = StoredTensor { name: name.into(), dtype, shape: shape.to_vec(), bytes: vec![0; n * dtype.size()] };
    for i in 0..n {
        // Mixed magnitudes, a few exact zeros: where rounding gets lossy.
        let v = rng.next() as f64 * if i % 7 == 0 { 1e-3 } else { 0.1 };
        t.set(i, if i % 11 == 0 { 0.0 } else { v });
    }
    t
}

fn request(i: usize) -> EditRequest {
    EditRequest { case_id: Some(i as u64), prompt: "{} lives in".into(), subject: format!("S{i}"), target_new: TargetText { text: "Rome".into() }, target_true: None }
}

fn update(layer: usize, n: usize, d: usize, d_ff: usize, rng: &mut Rng) -> LayerUpdate {
    LayerUpdate { layer, resid: (0..n * d).map(|_| rng.next() * 0.3).collect(), x: (0..n * d_ff).map(|_| rng.next() * 0.2).collect(), solve_shift: 0.0, solve_ridge: 0.0, solve_refinements: 0, solve_correction: 0.0 }
}

fn build(dtype: StoredDtype, layout: WeightLayout, rng: &mut Rng) -> (Patch, Vec<StoredTensor>, Vec<StoredTensor>, Vec<LayerUpdate>) {
    let (n, d, d_ff) = (3, 12, 20);
    let shape = match layout {
        WeightLayout::OutIn => [d, d_ff],
        WeightLayout::InOut => [d_ff, d],
    };
    let originals = vec![tensor("h.1.w", dtype, shape, rng), tensor("h.2.w", dtype, shape, rng)];
    let updates = vec![update(1, n, d, d_ff, rng), update(2, n, d, d_ff, rng)];
    let requests = (0..n).map(request).collect();
    let (patch, edited) = Patch::build("model-fp".into(), requests, serde_json::json!({"layers": [1, 2]}), &updates, &originals, layout).unwrap();
    (patch, originals, edited, updates)
}

#[test]
fn edited_weights_are_w_plus_residt_x_and_revert_is_bitwise() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for dtype in [StoredDtype::F32, StoredDtype::F16, StoredDtype::BF16] {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            let (patch, originals, edited, updates) = build(dtype, layout, &mut rng);
            let (n, d, d_ff) = (3, 12, 20);
            for ((orig, new), upd) in originals.iter().zip(&edited).zip(&updates) {
                // Naive ΔW[o][i] = Σ_r resid[r][o]·x[r][i], then the stored index.
                let mut changed = 0;
                for o in 0..d {
                    for i in 0..d_ff {
                        let delta: f64 = (0..n).map(|r| upd.resid[r * d + o] as f64 * upd.x[r * d_ff + i] as f64).sum();
                        let idx = match layout {
                            WeightLayout::OutIn => o * d_ff + i,
                            WeightLayout::InOut => i * d + o,
                        };
                        let want = orig.get(idx) + delta;
                        let ulp = match dtype {
                            StoredDtype::F32 => 2f64.powi(-23),
                            StoredDtype::F16 => 2f64.powi(-10),
                            StoredDtype::BF16 => 2f64.powi(-7),
                        } * want.abs().max(6e-5);
                        assert!((new.get(idx) - want).abs() <= ulp, "{dtype:?} {layout:?} [{o},{i}]: {} vs {want}", new.get(idx));
                        changed += (new.bits(idx) != orig.bits(idx)) as usize;
                    }
                }
                assert!(changed > d * d_ff / 2, "the edit changes most elements");
                assert_eq!(patch.revert(new).unwrap(), *orig, "{dtype:?} {layout:?}: revert is bitwise");
                assert_eq!(patch.apply_to(orig).unwrap(), *new, "apply reproduces the edit");
            }
            // 16-bit dtypes lose information when |ΔW| is large next to W:
            // those elements are restored from the recorded fix-ups.
            if dtype != StoredDtype::F32 {
                assert!(patch.layers.iter().any(|l| !l.revert_fixups.is_empty()), "{dtype:?}: fix-ups exercised");
            }
        }
    }
}

#[test]
fn patch_file_round_trips_and_detects_tampering() {
    let mut rng = Rng(42);
    let (patch, originals, edited, _) = build(StoredDtype::BF16, WeightLayout::OutIn, &mut rng);
    let bytes = patch.to_bytes().unwrap();
    let back = Patch::from_bytes(&bytes).unwrap();
    assert_eq!(back, patch);
    assert_eq!(back.revert(&edited[0]).unwrap(), originals[0]);

    // Flip one bit in the last byte (tensor data): the content hash refuses it.
    let mut corrupt = bytes.clone();
    *corrupt.last_mut().unwrap() ^= 1;
    let err = Patch::from_bytes(&corrupt).unwrap_err().to_string();
    assert!(err.contains("corrupted"), "{err}");
    assert!(Patch::from_bytes(b"not a patch").unwrap_err().to_string().contains("not a patch file"));

    // ‖ΔW‖ from the factors equals the norm of edited − original (f64).
    let changes = patch.changes(&originals);
    let direct: f64 = (0..originals[0].len()).map(|i| (edited[0].get(i) - originals[0].get(i)).powi(2)).sum::<f64>().sqrt();
    assert!((changes[0].delta_norm - direct).abs() < 0.02 * direct, "{} vs {direct}", changes[0].delta_norm);
    assert_eq!(changes[0].rank_bound, 3);
}

#[test]
fn patch_refuses_other_models_and_double_application() {
    let mut rng = Rng(7);
    let (patch, originals, edited, _) = build(StoredDtype::F32, WeightLayout::OutIn, &mut rng);
    assert_eq!(Patch::from_bytes(&patch.to_bytes().unwrap()).unwrap(), patch, "round trip (also with empty fix-up lists)");
    let err = patch.apply_to(&edited[0]).unwrap_err().to_string();
    assert!(err.contains("already has this patch applied"), "{err}");
    let err = patch.revert(&originals[0]).unwrap_err().to_string();
    assert!(err.contains("not applied"), "{err}");
    let other = tensor("h.1.w", StoredDtype::F32, [12, 20], &mut rng);
    let err = patch.apply_to(&other).unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
    let wrong_shape = tensor("h.1.w", StoredDtype::F32, [20, 12], &mut rng);
    assert!(patch.apply_to(&wrong_shape).unwrap_err().to_string().contains("[20, 12]"));
    let unrelated = tensor("h.9.w", StoredDtype::F32, [12, 20], &mut rng);
    assert!(patch.apply_to(&unrelated).unwrap_err().to_string().contains("does not change"));
}

/// Every single-bit flip in the header (metadata: requests, hparams, shapes,
/// recorded hashes) and at seeded places in the tensor data gives an error,
/// never a panic and never a different patch: the hash covers the whole
/// file and is checked before anything in it is used.
#[test]
fn every_corrupted_byte_is_refused_without_a_panic() {
    let mut rng = Rng(99);
    let (patch, ..) = build(StoredDtype::F16, WeightLayout::InOut, &mut rng);
    let bytes = patch.to_bytes().unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut positions: Vec<usize> = (0..header_end).collect();
    let mut state = 0x1234_5678_9abc_def0u64;
    for _ in 0..400 {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        positions.push(header_end + (state >> 33) as usize % (bytes.len() - header_end));
    }
    let mut accepted = 0;
    for (k, &at) in positions.iter().enumerate() {
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 1 << (k % 8);
        let result = std::panic::catch_unwind(|| Patch::from_bytes(&corrupt));
        match result.unwrap_or_else(|_| panic!("byte {at}, bit {}: Patch::from_bytes panicked", k % 8)) {
            Ok(read) => {
                // Only a flip that leaves the meaning unchanged (JSON
                // padding) may be accepted.
                assert_eq!(read, patch, "byte {at}: a changed patch was accepted");
                accepted += 1;
            }
            Err(e) => assert!(e.to_string().starts_with("patch: "), "{e}"),
        }
    }
    assert!(accepted * 20 < positions.len(), "{accepted} of {} flips accepted", positions.len());
}

/// Files written by the first patch format (hash over the tensors only)
/// still read, apply and revert.
#[test]
fn first_format_patches_still_read() {
    use sha2::{Digest, Sha256};
    let mut rng = Rng(5);
    let (patch, originals, edited, _) = build(StoredDtype::F32, WeightLayout::OutIn, &mut rng);
    let bytes = patch.to_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    meta.remove("patch_sha256");
    meta.insert("format".into(), "memit-wgpu-patch-v1".into());
    // v1: SHA-256 of "name|dtype|shape|" + data, layer by layer, in the
    // order resid, x, fixup_index, fixup_bits.
    let mut h = Sha256::new();
    for l in &patch.layers {
        for part in ["resid", "x", "fixup_index", "fixup_bits"] {
            let t = st.tensor(&format!("layer.{}.{part}", l.layer)).unwrap();
            h.update(format!("layer.{}.{part}|{:?}|{:?}|", l.layer, t.dtype(), t.shape()).as_bytes());
            h.update(t.data());
        }
    }
    meta.insert("content_sha256".into(), h.finalize().iter().map(|b| format!("{b:02x}")).collect());
    let v1 = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
    let read = Patch::from_bytes(&v1).unwrap();
    assert_eq!(read, patch);
    assert_eq!(read.revert(&edited[1]).unwrap(), originals[1]);
    // A flipped bit in a factor: caught by the v1 hash.
    let header_end = 8 + u64::from_le_bytes(v1[..8].try_into().unwrap()) as usize;
    let (_, info) = safetensors::SafeTensors::read_metadata(&v1).unwrap();
    let at = header_end + info.tensors()["layer.1.resid"].data_offsets.0 + 5;
    let mut corrupt = v1.clone();
    corrupt[at] ^= 4;
    assert!(Patch::from_bytes(&corrupt).unwrap_err().to_string().contains("corrupted"));
}
