//! Rewriting a sharded checkpoint in place is all-or-nothing: new shards
//! are staged and journaled before any original is replaced, and a folder
//! left by an interruption at any point is finished (journal present) or
//! rolled back (journal absent) by `finish_interrupted_rewrite`, ending
//! bit for bit in the new or the old state, never in between.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memit_models::{finish_interrupted_rewrite, stage_in_place, write_hf_dir, Recovery, SafetensorsSource, StoredTensor, WeightSource, REWRITE_JOURNAL};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-gpt-neox-sequential")
}

/// A fresh copy of the sharded fixture.
fn copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memit-rewrite-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    dir
}

fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap())).collect()
}

/// The two W_out tensors, which live in different shards, with every
/// element negated.
fn replacements(dir: &Path) -> Vec<StoredTensor> {
    let source = SafetensorsSource::open_dir(dir).unwrap();
    ["gpt_neox.layers.0.mlp.dense_4h_to_h.weight", "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"]
        .iter()
        .map(|name| {
            let mut t = source.stored(name).unwrap().unwrap();
            for i in 0..t.len() {
                let v = t.get(i);
                t.set(i, -v - 0.25);
            }
            t
        })
        .collect()
}

#[test]
fn interrupted_in_place_rewrites_finish_or_roll_back() {
    let original = files(&copy("reference"));
    // The new state, written to a fresh folder.
    let reference_dir = copy("expected-src");
    let expected_dir = reference_dir.with_file_name(format!("memit-rewrite-expected-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&expected_dir);
    write_hf_dir(&reference_dir, &expected_dir, &replacements(&reference_dir), &[]).unwrap();
    let expected = files(&expected_dir);
    let changed: Vec<&String> = original.keys().filter(|k| original[*k] != expected[*k]).collect();
    assert_eq!(changed, ["model-00002-of-00005.safetensors", "model-00005-of-00005.safetensors"], "two shards change");

    // Uninterrupted: the new state, no leftovers.
    let dir = copy("whole");
    write_hf_dir(&dir, &dir, &replacements(&dir), &[]).unwrap();
    assert!(files(&dir) == expected);

    // Killed after the journal and the first move: finished on recovery.
    let dir = copy("mid-commit");
    let staged = stage_in_place(&dir, &replacements(&dir)).unwrap();
    assert!(dir.join(REWRITE_JOURNAL).is_file());
    drop(staged);
    std::fs::rename(dir.join("model-00002-of-00005.safetensors.memit-staged"), dir.join("model-00002-of-00005.safetensors")).unwrap();
    // Half-applied: a new rewrite is refused until it is finished.
    let err = write_hf_dir(&dir, &dir, &replacements(&dir), &[]).unwrap_err().to_string();
    assert!(err.contains("unfinished rewrite"), "{err}");
    let recovery = finish_interrupted_rewrite(&dir).unwrap();
    assert_eq!(recovery, Recovery::Completed(vec!["model-00002-of-00005.safetensors".into(), "model-00005-of-00005.safetensors".into()]));
    assert!(files(&dir) == expected, "completed to the new state");
    assert_eq!(finish_interrupted_rewrite(&dir).unwrap(), Recovery::Clean);

    // Killed while staging (before the journal): rolled back.
    let dir = copy("staging");
    drop(stage_in_place(&dir, &replacements(&dir)).unwrap());
    std::fs::remove_file(dir.join(REWRITE_JOURNAL)).unwrap();
    assert!(matches!(finish_interrupted_rewrite(&dir).unwrap(), Recovery::RolledBack(f) if f.len() == 2));
    assert!(files(&dir) == original, "rolled back to the old state");

    // A staged file removed before the commit (another command rolled the
    // staging back meanwhile): the commit moves nothing and says so.
    let dir = copy("raced");
    let staged = stage_in_place(&dir, &replacements(&dir)).unwrap();
    std::fs::remove_file(dir.join("model-00005-of-00005.safetensors.memit-staged")).unwrap();
    let err = staged.commit().unwrap_err().to_string();
    assert!(err.contains("disappeared"), "{err}");
    assert!(files(&dir) == original, "nothing was moved, nothing is left behind");

    // A rewrite in progress (its lock held by a running process, here this
    // one) is left alone by other commands; a lock whose process is gone
    // (killed) is taken over.
    let dir = copy("locked");
    drop(stage_in_place(&dir, &replacements(&dir)).unwrap());
    std::fs::write(dir.join(".memit-rewrite-lock"), std::process::id().to_string()).unwrap();
    let err = finish_interrupted_rewrite(&dir).unwrap_err().to_string();
    assert!(err.contains("is rewriting"), "{err}");
    assert!(stage_in_place(&dir, &replacements(&dir)).err().unwrap().to_string().contains("is rewriting"));
    #[cfg(target_os = "linux")]
    {
        std::fs::write(dir.join(".memit-rewrite-lock"), "2147483646").unwrap();
        assert!(matches!(finish_interrupted_rewrite(&dir).unwrap(), Recovery::Completed(_)));
        assert!(files(&dir) == expected, "a stale lock does not stop the recovery, and is removed");
    }

    // Killed after taking the lock, before staging anything: only the lock
    // is left, and it is removed.
    #[cfg(target_os = "linux")]
    {
        let dir = copy("lock-only");
        std::fs::write(dir.join(".memit-rewrite-lock"), "2147483646").unwrap();
        assert_eq!(finish_interrupted_rewrite(&dir).unwrap(), Recovery::RolledBack(vec![".memit-rewrite-lock".into()]));
        assert!(files(&dir) == original && !dir.join(".memit-rewrite-lock").exists());
        // An empty lock (killed before writing its PID) is stale too.
        std::fs::write(dir.join(".memit-rewrite-lock"), "").unwrap();
        assert!(matches!(finish_interrupted_rewrite(&dir).unwrap(), Recovery::RolledBack(_)));
        assert_eq!(finish_interrupted_rewrite(&dir).unwrap(), Recovery::Clean);
    }

    // A journal naming a path outside the folder is refused, nothing moved.
    std::fs::write(dir.join(REWRITE_JOURNAL), "../elsewhere.safetensors").unwrap();
    let err = finish_interrupted_rewrite(&dir).unwrap_err().to_string();
    assert!(err.contains("not a file of this folder"), "{err}");
    for d in [reference_dir, expected_dir] {
        std::fs::remove_dir_all(d).ok();
    }
}
