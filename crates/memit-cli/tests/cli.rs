//! The `memit-wgpu` binary end to end on the bundled facts model: edit →
//! edited folder + patch, apply / revert (bitwise), diff, generate with a
//! patch, stats that pause, resume and are cached, eval reports and plots,
//! and clear errors on bad input that leave no files behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn facts_model() -> PathBuf {
    fixtures().join("facts-gpt2")
}

/// A fresh scratch folder per test (also the statistics cache).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memit-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn memit(cache: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_memit-wgpu"));
    // As on a headless machine: no runtime folder (the drivers must stay quiet).
    c.env("MEMIT_CACHE", cache).env_remove("XDG_RUNTIME_DIR");
    c
}

/// Statistics over the first 300 lines of the model's training text keep
/// the tests quick.
const STATS: [&str; 2] = ["--n-texts", "300"];

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn fails_with(out: Output, expected: &str) {
    assert!(!out.status.success(), "should have failed; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(expected), "expected {expected:?} in:\n{stderr}");
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every tensor of a model folder's model.safetensors: name → raw bytes.
fn tensors(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(name, view)| (name, view.data().to_vec())).collect()
}

/// The bundled model's example requests edited into `out` (plain
/// templates), with the JSON report.
fn edit_example(dir: &Path, out: &Path) -> Output {
    ok(memit(dir)
        .args(["--json", "edit", "--templates", "plain", "--model"])
        .arg(facts_model())
        .arg("--requests")
        .arg(facts_model().join("example-requests.json"))
        .args(STATS)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap())
}

fn top_token(prediction: &serde_json::Value) -> &str {
    prediction[0]["token"].as_str().unwrap()
}

#[test]
fn edit_writes_a_model_and_a_patch_that_apply_and_revert_exactly() {
    let dir = scratch("edit");
    let edited = dir.join("edited");
    let report = json(&edit_example(&dir, &edited));
    for edit in report["edits"].as_array().unwrap() {
        let target = format!(" {}", edit["target_new"].as_str().unwrap());
        assert_ne!(top_token(&edit["before"]), target, "{edit}");
        assert_eq!(top_token(&edit["after"]), target, "{edit}");
    }
    let n = report["edits"].as_array().unwrap().len() as u64;
    assert_eq!(report["took"], n, "{}", report["outcomes"]);
    assert!(report["outcomes"].as_array().unwrap().iter().all(|o| o["p_new_after"].as_f64().unwrap() > o["p_new_before"].as_f64().unwrap()));
    let patch = edited.join("memit-patch.safetensors");
    assert_eq!(report["written"]["patch"].as_str().unwrap(), patch.display().to_string());
    // The cost counters of every phase: target vectors ran their steps on
    // the GPU, reading back far less than a logits row per step.
    let counters = &report["counters"];
    for phase in ["target_vectors", "keys", "solve", "update"] {
        for field in ["dispatches", "submits", "host_waits", "bytes_to_device", "bytes_from_device", "buffers_created", "steps"] {
            assert!(counters[phase][field].is_u64(), "counters.{phase}.{field} in {counters}");
        }
    }
    let steps = counters["target_vectors"]["steps"].as_u64().unwrap();
    assert!(steps >= 1 && counters["target_vectors"]["host_waits"].as_u64().unwrap() <= steps, "{counters}");

    // Only the edited layers' W_out differ from the original.
    let original = tensors(&facts_model());
    let changed: Vec<&String> = original.keys().filter(|k| tensors(&edited)[*k] != original[*k]).collect();
    assert_eq!(changed, ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight", "transformer.h.2.mlp.c_proj.weight", "transformer.h.3.mlp.c_proj.weight"]);

    // The edited model folder predicts the new targets when loaded afresh.
    let gen = ok(memit(&dir).args(["generate", "--prompt", "Danielle Darrieux", "--max-new-tokens", "1", "--model"]).arg(&edited).output().unwrap());
    assert_eq!(String::from_utf8_lossy(&gen.stdout).trim(), "Danielle Darrieux English");
    // So does the original with the patch applied in memory.
    let gen = ok(memit(&dir).args(["generate", "--prompt", "Danielle Darrieux", "--max-new-tokens", "1", "--model"]).arg(facts_model()).arg("--patch").arg(&patch).output().unwrap());
    assert_eq!(String::from_utf8_lossy(&gen.stdout).trim(), "Danielle Darrieux English");

    // Revert: bitwise the original weights.
    let reverted = dir.join("reverted");
    ok(memit(&dir).args(["revert", "--model"]).arg(&edited).arg("--out").arg(&reverted).output().unwrap());
    assert!(tensors(&reverted) == original, "revert restores every tensor bit for bit");
    // Apply to the original: bitwise the edited weights.
    let applied = dir.join("applied");
    ok(memit(&dir).args(["apply", "--model"]).arg(facts_model()).arg("--patch").arg(&patch).arg("--out").arg(&applied).output().unwrap());
    assert!(tensors(&applied) == tensors(&edited), "apply reproduces the edit bit for bit");
    // In place, both ways.
    ok(memit(&dir).args(["revert", "--in-place", "--model"]).arg(&applied).arg("--patch").arg(&patch).output().unwrap());
    assert!(tensors(&applied) == original);
    fails_with(memit(&dir).args(["revert", "--in-place", "--model"]).arg(&applied).arg("--patch").arg(&patch).output().unwrap(), "does not have this patch applied");
    ok(memit(&dir).args(["apply", "--in-place", "--model"]).arg(&applied).arg("--patch").arg(&patch).output().unwrap());
    assert!(tensors(&applied) == tensors(&edited));
    fails_with(memit(&dir).args(["apply", "--in-place", "--model"]).arg(&applied).arg("--patch").arg(&patch).output().unwrap(), "already has this patch applied");
    // An in-place revert killed after its journal was written: the next
    // command on the model finishes it before reading any weight.
    let source = memit_models::SafetensorsSource::open_dir(&facts_model()).unwrap();
    let originals: Vec<_> = (0..4).map(|l| memit_models::WeightSource::stored(&source, &format!("transformer.h.{l}.mlp.c_proj.weight")).unwrap().unwrap()).collect();
    drop(memit_models::stage_in_place(&applied, &originals).unwrap());
    let out = ok(memit(&dir).args(["--json", "diff", "--model"]).arg(&applied).arg("--patch").arg(&patch).output().unwrap());
    assert!(String::from_utf8_lossy(&out.stderr).contains("it was completed"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json(&out)["model_state"], "original");
    assert!(tensors(&applied) == original);

    // diff: the four layers, their ‖ΔW‖, and the predictions either side.
    let diff = json(&ok(memit(&dir).args(["--json", "diff", "--model"]).arg(&edited).output().unwrap()));
    assert_eq!(diff["model_state"], "edited");
    let layers = diff["layers"].as_array().unwrap();
    assert_eq!(layers.iter().map(|l| l["layer"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2, 3]);
    assert!(layers.iter().all(|l| l["delta_norm"].as_f64().unwrap() > 0.0 && l["rank_bound"] == 2));
    for r in diff["requests"].as_array().unwrap() {
        assert_eq!(top_token(&r["after"]), format!(" {}", r["target_new"].as_str().unwrap()));
        assert_ne!(top_token(&r["before"]), top_token(&r["after"]));
    }

    // A patch never applies to another model, nor when tampered with.
    fails_with(memit(&dir).args(["apply", "--model"]).arg(fixtures().join("facts-gpt2")).arg("--patch").arg(&patch).arg("--out").arg(&applied).output().unwrap(), "already exists");
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(facts_model().join(f), other.join(f)).unwrap();
    }
    let bytes = std::fs::read(facts_model().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut altered = st.tensor("transformer.h.2.mlp.c_proj.weight").unwrap().data().to_vec();
    altered[0] ^= 1;
    let views: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = if name == "transformer.h.2.mlp.c_proj.weight" { altered.clone() } else { view.data().to_vec() };
            (name, view.dtype(), view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<_> = views.iter().map(|(n, d, s, data)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), data).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &other.join("model.safetensors")).unwrap();
    fails_with(memit(&dir).args(["apply", "--model"]).arg(&other).arg("--patch").arg(&patch).arg("--out").arg(dir.join("x")).output().unwrap(), "does not fit the model");
    assert!(!dir.join("x").exists(), "nothing written on failure");

    let tampered = dir.join("tampered.safetensors");
    let mut bytes = std::fs::read(&patch).unwrap();
    *bytes.last_mut().unwrap() ^= 0x40;
    std::fs::write(&tampered, bytes).unwrap();
    fails_with(memit(&dir).args(["diff", "--model"]).arg(facts_model()).arg("--patch").arg(&tampered).output().unwrap(), "corrupted");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stats_pause_resume_and_are_cached_per_model() {
    let dir = scratch("stats");
    let cache = dir.join("facts.safetensors");
    let stats = |extra: &[&str]| memit(&dir).args(["--json", "stats", "--batch-size", "16", "--model"]).arg(facts_model()).args(STATS).arg("--stats").arg(&cache).args(extra).output().unwrap();
    // A temporary file left by a run killed while writing its checkpoint.
    let stale = dir.join(".facts.safetensors.partial.memit-tmp");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let out = ok(stats(&["--stop-after-batches", "3"]));
    assert!(!stale.exists(), "the next write reuses (and renames) the temporary name");
    // stderr is not a terminal here: progress comes as plain lines (the
    // first at once), after a line naming the adapter, without driver noise.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("adapter: ") && stderr.contains("statistics: 0/300 texts after"), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
    let paused = json(&out);
    assert_eq!(paused["status"], "paused");
    assert_eq!(paused["texts_done"], 48);
    assert!(!cache.exists() && dir.join("facts.safetensors.partial").exists());
    let out = ok(stats(&[]));
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming statistics"), "{}", String::from_utf8_lossy(&out.stderr));
    let done = json(&out);
    assert_eq!((done["status"].as_str(), done["from_cache"].as_bool()), (Some("complete"), Some(false)));
    assert!(done["counters"]["steps"].as_u64().unwrap() >= 1 && done["counters"]["dispatches"].as_u64().unwrap() > 0, "{done}");
    assert!(cache.exists() && !dir.join("facts.safetensors.partial").exists());
    let temporaries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("memit-tmp")).collect();
    assert!(temporaries.is_empty(), "{temporaries:?}");
    let again = json(&ok(stats(&[])));
    assert_eq!(again["from_cache"], true);
    assert_eq!(again["n_tokens"], done["n_tokens"]);

    // The same statistics without a pause: bitwise the same covariances.
    let straight = dir.join("straight.safetensors");
    let out = ok(memit(&dir).args(["--quiet", "stats", "--batch-size", "16", "--model"]).arg(facts_model()).args(STATS).arg("--stats").arg(&straight).output().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("texts after"), "--quiet: {stderr}");
    let (a, b) = (std::fs::read(&cache).unwrap(), std::fs::read(&straight).unwrap());
    let (a, b) = (SafeTensors::deserialize(&a).unwrap(), SafeTensors::deserialize(&b).unwrap());
    for layer in 0..4 {
        let name = format!("layer.{layer}.mom2");
        assert!(a.tensor(&name).unwrap().data() == b.tensor(&name).unwrap().data(), "{name} differs after pause/resume");
    }

    // Another corpus (or model) is refused, and the cache is left intact.
    let before = std::fs::read(&cache).unwrap();
    fails_with(memit(&dir).args(["stats", "--n-texts", "100", "--model"]).arg(facts_model()).arg("--stats").arg(&cache).output().unwrap(), "belongs to another model or setup");
    assert_eq!(std::fs::read(&cache).unwrap(), before);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn eval_reports_counterfact_and_zsre_scores() {
    let dir = scratch("eval");
    let report = dir.join("cf.json");
    let plot = dir.join("cf.svg");
    let out = ok(memit(&dir)
        .args(["eval", "--dataset", "counterfact", "--templates", "plain", "--n", "6", "--sizes", "1,6", "--gen-tokens", "5", "--model"])
        .arg(facts_model())
        .args(STATS)
        .arg("--data")
        .arg(facts_model().join("counterfact.json"))
        .arg("--report")
        .arg(&report)
        .arg("--plot")
        .arg(&plot)
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("6 edits"));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["unedited"]["efficacy_score"], 0.0, "the model knows the true objects");
    let points = r["points"].as_array().unwrap();
    assert_eq!(points.iter().map(|p| p["edits"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 6]);
    for p in points {
        let m = &p["metrics"];
        assert!(m["efficacy_score"].as_f64().unwrap() >= 50.0, "{m}");
        let (es, ps, ns) = (m["efficacy_score"].as_f64().unwrap(), m["paraphrase_score"].as_f64().unwrap(), m["neighborhood_score"].as_f64().unwrap());
        let harmonic = if es * ps * ns > 0.0 { 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns) } else { 0.0 };
        assert!((m["score"].as_f64().unwrap() - harmonic).abs() < 1e-3, "{m}");
        assert!(m["generation_entropy"].as_f64().unwrap() > 0.0);
    }
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 4, "{svg}");

    // zsRE: the facts model knows none of these; editing layers 0-2 (the
    // questions continue after the subject) still runs end to end.
    let hp = dir.join("hp.json");
    std::fs::write(&hp, r#"{"layers": [0, 1, 2]}"#).unwrap();
    let zsre = dir.join("zsre.json");
    ok(memit(&dir)
        .args(["eval", "--dataset", "zsre", "--templates", "plain", "--n", "3", "--mode", "sequential", "--method", "memit,alphaedit", "--model"])
        .arg(facts_model())
        .args(STATS)
        .arg("--hparams")
        .arg(&hp)
        .arg("--data")
        .arg(fixtures().join("datasets/zsre-20.json"))
        .arg("--report")
        .arg(&zsre)
        .output()
        .unwrap());
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&zsre).unwrap()).unwrap();
    let points = r["points"].as_array().unwrap();
    let steps = |method: &str| points.iter().filter(|p| p["method"] == method).map(|p| p["edits"].as_u64().unwrap()).collect::<Vec<_>>();
    assert_eq!((steps("memit"), steps("alphaedit")), (vec![1, 2, 3], vec![1, 2, 3]), "one point per sequential step and method");
    assert_eq!(r["methods"], serde_json::json!(["memit", "alphaedit"]));
    // AlphaEdit's null space at each edited layer: C's eigenvalues under
    // 2e-2, some but not all of the 512 dimensions.
    let null_space = r["null_space_dimensions"]["alphaedit"].as_array().unwrap();
    assert_eq!(null_space.len(), 3, "{null_space:?}");
    assert!(null_space.iter().all(|l| (1.0..511.0).contains(&l[1].as_f64().unwrap())), "{null_space:?}");
    for p in points {
        for key in ["efficacy", "paraphrase", "specificity"] {
            let v = p["metrics"][key].as_f64().unwrap();
            assert!((0.0..=100.0).contains(&v), "{key} = {v}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let dir = scratch("bad");
    let cases = [
        ("malformed.json", "[{\"prompt\": ", "is not a JSON list of MEMIT requests"),
        ("no-braces.json", r#"[{"prompt": "Paris is in", "subject": "Paris", "target_new": {"str": "Rome"}}]"#, "replace it with {}"),
        ("empty-target.json", r#"[{"prompt": "{}", "subject": "Paris", "target_new": {"str": " "}}]"#, "target_new.str is empty"),
        ("top-layer.json", r#"[{"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": {"str": "English"}}]"#, "is the model's last block"),
    ];
    for (name, body, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let out_dir = dir.join(format!("{name}.out"));
        let out = memit(&dir).args(["edit", "--templates", "plain", "--model"]).arg(facts_model()).args(STATS).arg("--requests").arg(&path).arg("--out").arg(&out_dir).output().unwrap();
        fails_with(out, expected);
        assert!(!out_dir.exists(), "{name}: no output folder on failure");
    }
    fails_with(memit(&dir).args(["generate", "--prompt", "x", "--model", "/no/such/model"]).output().unwrap(), "/no/such/model");
    fails_with(memit(&dir).args(["diff", "--model"]).arg(facts_model()).arg("--patch").arg(facts_model().join("config.json")).output().unwrap(), "not a patch file");
    let not_dataset = dir.join("x.json");
    std::fs::write(&not_dataset, "{}").unwrap();
    fails_with(memit(&dir).args(["eval", "--dataset", "zsre", "--model"]).arg(facts_model()).arg("--data").arg(&not_dataset).output().unwrap(), "is not a list of zsRE records");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every file under `dir` (relative path → bytes), to prove a folder untouched.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

/// `edit` writes only where it may: `--force` replaces nothing but a folder
/// an earlier edit wrote, never the input model or a folder holding it, the
/// working directory or a user's folder; `--patch` never lands on a model
/// file or a non-patch file, and replaces an earlier patch only when asked.
/// Each refusal comes before any computation and leaves every file as it was.
#[test]
fn edit_never_replaces_what_it_did_not_write() {
    let dir = scratch("paths");
    // A user's project folder holding a copy of the model.
    let project = dir.join("project");
    let model = project.join("mymodel");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(facts_model()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(project.join("notes.txt"), "my notes").unwrap();
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("results.csv"), "1,2,3").unwrap();
    let mine = dir.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "\\section{}").unwrap();
    let before = snapshot(&dir);
    let edit = |out: &Path, extra: &[&str]| {
        let mut c = memit(&dir);
        c.current_dir(&work).args(["edit", "--templates", "plain", "--model"]).arg(&model).arg("--requests").arg(model.join("example-requests.json")).args(STATS);
        c.arg("--out").arg(out).args(extra).output().unwrap()
    };
    fails_with(edit(&project, &["--force"]), "holding the input model");
    fails_with(edit(&model, &["--force"]), "never replaces its own input");
    fails_with(edit(Path::new("."), &["--force"]), "is the working directory");
    fails_with(edit(&mine, &["--force"]), "only folders that `memit-wgpu edit` wrote");
    fails_with(edit(&dir.join("new"), &["--patch", model.join("model.safetensors").to_str().unwrap()]), "inside the input model");
    fails_with(edit(&dir.join("new"), &["--patch", project.join("notes.txt").to_str().unwrap()]), "is not a patch file");
    assert!(snapshot(&dir) == before, "refused edits change nothing");
    assert!(!dir.join("new").exists());

    // A first edit writes the folder, its patch and the marker together.
    let edited = dir.join("edited");
    ok(edit(&edited, &[]));
    assert!(edited.join("memit-patch.safetensors").is_file() && edited.join(".memit-wgpu-edit").is_file());
    fails_with(edit(&edited, &[]), "pass --force");
    // A bare --patch name lands inside the folder: never over a model file.
    fails_with(edit(&edited, &["--force", "--replace-patch", "--patch", "model.safetensors"]), "would overwrite a file of the edited model");
    // Its own output may be replaced, but the patch in it goes only on request.
    let outside = dir.join("edit2.patch.safetensors");
    fails_with(edit(&edited, &["--force", "--patch", outside.to_str().unwrap()]), "holds the patch");
    assert!(!outside.exists());
    ok(edit(&edited, &["--force", "--replace-patch", "--patch", outside.to_str().unwrap()]));
    assert!(outside.is_file() && !edited.join("memit-patch.safetensors").exists());
    // An existing patch is the way back from an edit: replaced only on request.
    let edited_state = snapshot(&edited);
    fails_with(edit(&edited, &["--force", "--patch", outside.to_str().unwrap()]), "--replace-patch");
    assert!(snapshot(&edited) == edited_state);
    ok(edit(&edited, &["--force", "--replace-patch", "--patch", outside.to_str().unwrap()]));
    // The same folder spelled another way (through `..`): still inside it,
    // so the patch is written with the folder, not before it.
    let other_spelling = edited.join("..").join("edited").join("fix.safetensors");
    ok(edit(&edited, &["--force", "--replace-patch", "--patch", other_spelling.to_str().unwrap()]));
    assert!(edited.join("fix.safetensors").is_file() && edited.join(".memit-wgpu-edit").is_file());
    // Chaining: editing the edited folder into itself is refused.
    let mut c = memit(&dir);
    c.args(["edit", "--templates", "plain", "--force", "--model"]).arg(&edited).arg("--requests").arg(model.join("example-requests.json")).args(STATS).arg("--out").arg(&edited);
    fails_with(c.output().unwrap(), "never replaces its own input");
    assert!(snapshot(&model) == snapshot(&facts_model()), "the input model is untouched");
    assert_eq!(std::fs::read_to_string(project.join("notes.txt")).unwrap(), "my notes");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains(".memit-")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `edit --method alphaedit`: the null space of every edited layer is
/// reported and the edit runs to its per-request verdicts.
#[test]
fn alphaedit_edits_report_their_null_spaces() {
    let dir = scratch("alphaedit");
    let out = ok(memit(&dir)
        .args(["--json", "edit", "--dry-run", "--method", "alphaedit", "--templates", "plain", "--model"])
        .arg(facts_model())
        .arg("--requests")
        .arg(facts_model().join("example-requests.json"))
        .args(STATS)
        .output()
        .unwrap());
    let report = json(&out);
    assert_eq!(report["method"], "alphaedit");
    let layers: Vec<u64> = report["layers"].as_array().unwrap().iter().map(|l| l.as_u64().unwrap()).collect();
    let null_space = report["null_space_dimensions"].as_array().unwrap();
    assert_eq!(null_space.iter().map(|l| l[0].as_u64().unwrap()).collect::<Vec<_>>(), layers, "one null space per edited layer");
    assert!(null_space.iter().all(|l| (1.0..511.0).contains(&l[1].as_f64().unwrap())), "{null_space:?}");
    assert_eq!(report["outcomes"].as_array().unwrap().len(), 2);
    let bad = memit(&dir).args(["edit", "--method", "rome", "--model"]).arg(facts_model()).arg("--requests").arg(facts_model().join("example-requests.json")).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("memit-seq"), "{}", String::from_utf8_lossy(&bad.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

/// An edit that does not take (here: λ so large that ΔW is negligible) is
/// reported per request in the JSON and with a warning naming the causes.
#[test]
fn an_edit_that_does_not_take_is_reported() {
    let dir = scratch("weak");
    let hparams = dir.join("huge-lambda.json");
    std::fs::write(&hparams, r#"{"mom2_update_weight": 1e12}"#).unwrap();
    let out = ok(memit(&dir)
        .args(["--json", "edit", "--dry-run", "--templates", "plain", "--model"])
        .arg(facts_model())
        .arg("--requests")
        .arg(facts_model().join("example-requests.json"))
        .args(STATS)
        .arg("--hparams")
        .arg(&hparams)
        .output()
        .unwrap());
    let report = json(&out);
    assert_eq!(report["took"], 0, "{}", report["outcomes"]);
    for o in report["outcomes"].as_array().unwrap() {
        assert_eq!(o["took"], false);
        assert!(o["p_original_after"].as_f64().unwrap() > o["p_new_after"].as_f64().unwrap(), "{o}");
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("did not take") && stderr.contains("mom2_update_weight"), "{stderr}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `apply --in-place` and `revert --in-place` killed (SIGKILL) at a spread of
/// moments: the next command on the model finds it whole, bitwise either
/// the original or the edited weights, finishing or rolling back what the
/// killed run left; and the patch still applies or reverts from there.
#[test]
fn killed_in_place_rewrites_leave_a_whole_model() {
    let dir = scratch("kill");
    let edited = dir.join("edited");
    edit_example(&dir, &edited);
    let patch = edited.join("memit-patch.safetensors");
    let (original, edited_weights) = (tensors(&facts_model()), tensors(&edited));
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(facts_model().join(f), model.join(f)).unwrap();
    }
    let mut outcomes = std::collections::BTreeSet::new();
    let mut recovered = 0;
    // From before the weights are read to after the command is done (a
    // release build applies this patch in ~60 ms, a test build slower).
    for (i, delay_ms) in [0u64, 3, 8, 15, 25, 35, 50, 70, 100, 150, 250, 400].into_iter().enumerate() {
        // Alternate directions so every run has work to do.
        let state = if tensors(&model) == original { "original" } else { "edited" };
        let verb = if state == "original" { "apply" } else { "revert" };
        let mut child = memit(&dir).args([verb, "--in-place", "--model"]).arg(&model).arg("--patch").arg(&patch).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let killed = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let status = child.wait().unwrap();
        outcomes.insert((killed, status.success()));
        // The next command sees a whole model, in one of the two states.
        let out = ok(memit(&dir).args(["--json", "diff", "--model"]).arg(&model).arg("--patch").arg(&patch).output().unwrap());
        if String::from_utf8_lossy(&out.stderr).contains("interrupted in-place") {
            recovered += 1;
        }
        let now = tensors(&model);
        let expected = match json(&out)["model_state"].as_str().unwrap() {
            "original" => &original,
            "edited" => &edited_weights,
            other => panic!("state {other}"),
        };
        assert!(now == *expected, "run {i} ({verb} killed after {delay_ms} ms): the weights are neither state");
        let leftovers: Vec<_> = std::fs::read_dir(&model).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("memit-")).collect();
        assert!(leftovers.is_empty(), "run {i}: {leftovers:?}");
    }
    assert!(outcomes.iter().any(|&(killed, _)| killed), "at least one run was killed mid-way: {outcomes:?}");
    // How many kills landed inside a rewrite depends on timing; reported.
    eprintln!("killed runs that left a rewrite to finish or roll back: {recovered}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A folder holding only GPT-J 6B's config.json.
fn gpt_j_config(dir: &Path) -> PathBuf {
    let model = dir.join("gpt-j-6b");
    std::fs::create_dir_all(&model).unwrap();
    let config = serde_json::json!({
        "model_type": "gptj", "activation_function": "gelu_new", "n_embd": 4096, "n_layer": 28, "n_head": 16,
        "rotary_dim": 64, "n_positions": 2048, "vocab_size": 50400, "n_inner": null, "layer_norm_epsilon": 1e-05,
        "tie_word_embeddings": false
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    model
}

#[test]
fn plan_needs_only_a_config_and_says_what_to_change_when_it_does_not_fit() {
    let dir = scratch("plan");
    let model = gpt_j_config(&dir);
    let out = ok(memit(&dir).args(["--json", "plan", "--n-requests", "10000", "--f16", "--gpu-memory", "48GiB", "--model"]).arg(&model).output().unwrap());
    let plan = json(&out);
    assert_eq!(plan["fits"], true);
    let names: Vec<&str> = plan["phases"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    // Statistics run on the blocks through the last edited layer, before
    // the rest of the model is loaded.
    assert_eq!(names, ["statistics", "load", "target vectors", "keys", "solve", "update"]);
    assert!(plan["phases"].as_array().unwrap().iter().all(|p| p["gpu_bytes"].as_u64().unwrap() > 11 << 30 && p["host_bytes"].as_u64().is_some()));
    assert_eq!(plan["peak_phase"], "statistics");

    // f32 weights (22.5 GiB) on a 24 GB card: they do not fit, f16 would.
    let out = memit(&dir).args(["plan", "--n-requests", "10000", "--gpu-memory", "24GB", "--model"]).arg(&model).output().unwrap();
    fails_with(out, "load needs");
    let out = memit(&dir).args(["plan", "--n-requests", "10000", "--gpu-memory", "24GB", "--model"]).arg(&model).output().unwrap();
    fails_with(out, "use --f16 (weights in f16: then it fits)");
    // f16 on 16 GiB: only fewer edited layers help the statistics.
    let out = memit(&dir).args(["--json", "plan", "--n-requests", "10000", "--f16", "--gpu-memory", "16GiB", "--model"]).arg(&model).output().unwrap();
    assert_eq!(json(&out)["fits"], false);
    fails_with(out, "fewer edited layers");
    // The solve of 60,000 requests: fewer requests per edit.
    let out = memit(&dir).args(["plan", "--n-requests", "60000", "--f16", "--gpu-memory", "20GiB", "--model"]).arg(&model).output().unwrap();
    fails_with(out, "solve needs");
    let out = memit(&dir).args(["plan", "--n-requests", "60000", "--f16", "--gpu-memory", "20GiB", "--model"]).arg(&model).output().unwrap();
    fails_with(out, "fewer requests per edit (at most");
    fails_with(memit(&dir).args(["plan", "--n-requests", "10", "--gpu-memory", "lots", "--model"]).arg(&model).output().unwrap(), "--gpu-memory");
    // A smaller target batch budget: fewer requests per batch, a lower peak.
    let plan_with = |budget: &str| json(&ok(memit(&dir).args(["--json", "plan", "--n-requests", "100", "--f16", "--target-batch-memory", budget, "--model"]).arg(&model).output().unwrap()));
    let (big, small) = (plan_with("1GiB"), plan_with("256MiB"));
    let targets = |p: &serde_json::Value| p["phases"].as_array().unwrap().iter().find(|ph| ph["name"] == "target vectors").unwrap()["gpu_bytes"].as_u64().unwrap();
    assert!(small["target_batch"].as_u64() < big["target_batch"].as_u64(), "{} vs {}", small["target_batch"], big["target_batch"]);
    assert!(targets(&small) < targets(&big));
    fails_with(memit(&dir).args(["plan", "--n-requests", "10", "--target-batch-memory", "0", "--model"]).arg(&model).output().unwrap(), "--target-batch-memory");
    // Streamed blocks: fewer weights on the GPU, said in the plan.
    let streamed = json(&ok(memit(&dir).args(["--json", "plan", "--n-requests", "100", "--f16", "--stream-blocks", "10", "--model"]).arg(&model).output().unwrap()));
    assert_eq!(streamed["streamed_blocks"], 10);
    assert!(streamed["weight_bytes"].as_u64() < big["weight_bytes"].as_u64(), "{} vs {}", streamed["weight_bytes"], big["weight_bytes"]);
    fails_with(memit(&dir).args(["plan", "--n-requests", "10", "--stream-blocks", "28", "--model"]).arg(&model).output().unwrap(), "at most 19");
}

#[test]
fn edit_and_stats_print_the_plan_and_stop_before_loading_when_it_does_not_fit() {
    let dir = scratch("plan-edit");
    let out = dir.join("edited");
    let edit = memit(&dir)
        .args(["edit", "--templates", "plain", "--gpu-memory", "20MiB", "--model"])
        .arg(facts_model())
        .arg("--requests")
        .arg(facts_model().join("example-requests.json"))
        .args(STATS)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&edit.stderr).to_string();
    assert!(stderr.contains("memory plan: 2 requests"), "{stderr}");
    fails_with(edit, "does not fit --gpu-memory; nothing was loaded");
    assert!(!out.exists());
    let stats = memit(&dir).args(["stats", "--gpu-memory", "8MiB", "--model"]).arg(facts_model()).args(STATS).output().unwrap();
    fails_with(stats, "statistics needs");
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with("stats-")));
}

/// `--model ORG/NAME` opens the snapshot a Hugging Face cache holds (its
/// files symlinked to blobs, as the hub client lays them out), from
/// `$HF_HOME/hub`, without any download.
#[test]
fn a_model_in_the_hugging_face_cache_opens_by_repo_id() {
    let dir = scratch("hub");
    let entry = dir.join("hf/hub/models--memit--facts-gpt2");
    let snapshot = entry.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(entry.join("blobs")).unwrap();
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    std::fs::write(entry.join("refs/main"), "0123abcd").unwrap();
    for name in ["config.json", "tokenizer.json", "model.safetensors"] {
        let blob = entry.join("blobs").join(format!("blob-{name}"));
        std::fs::copy(facts_model().join(name), &blob).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, snapshot.join(name)).unwrap();
    }
    let hub = |c: &mut Command| {
        c.env("HF_HOME", dir.join("hf")).env_remove("HF_HUB_CACHE");
    };
    let mut c = memit(&dir);
    hub(&mut c);
    let out = ok(c.current_dir(&dir).args(["--json", "info", "--model", "memit/facts-gpt2"]).output().unwrap());
    let info = json(&out);
    assert_eq!(info["model"]["path"].as_str().unwrap(), snapshot.to_str().unwrap());
    assert_eq!((info["model"]["arch"].as_str().unwrap(), info["model"]["layers"].as_u64().unwrap()), ("Gpt2", 4));
    // An entry without a snapshot says so; a repo id nowhere stays a path
    // that does not exist.
    std::fs::create_dir_all(dir.join("hf/hub/models--memit--empty")).unwrap();
    let mut c = memit(&dir);
    hub(&mut c);
    fails_with(c.current_dir(&dir).args(["info", "--model", "memit/empty"]).output().unwrap(), "has no snapshot");
    let mut c = memit(&dir);
    hub(&mut c);
    assert!(!c.current_dir(&dir).args(["info", "--model", "memit/absent"]).output().unwrap().status.success());
    std::fs::remove_dir_all(&dir).ok();
}

/// `edit --force` replacing an edited folder, killed at moments across its
/// run: afterwards the folder, or the complete new or old folder under the
/// swap's fixed names, is whole; the next `edit` finishes an interrupted
/// swap (here forced: both swap folders present, the target gone) and
/// leaves no leftovers.
#[test]
fn killed_folder_replacements_are_finished_by_the_next_edit() {
    let dir = scratch("kill-edit");
    let out = dir.join("edited");
    edit_example(&dir, &out);
    let whole = |p: &Path| p.join(".memit-wgpu-edit").is_file() && p.join("memit-patch.safetensors").is_file() && p.join("model.safetensors").is_file();
    let (fresh, old) = (dir.join(".edited.memit-new"), dir.join(".edited.memit-old"));
    let replace = || {
        let mut c = memit(&dir);
        c.args(["edit", "--templates", "plain", "--force", "--replace-patch", "--model"]).arg(facts_model()).arg("--requests").arg(facts_model().join("example-requests.json")).args(STATS).arg("--out").arg(&out);
        c
    };
    for delay_ms in [0u64, 200, 600, 1200, 2000, 3000] {
        let mut child = replace().stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        assert!(whole(&out) || (!out.exists() && (whole(&fresh) || whole(&old))), "killed after {delay_ms} ms: no whole edited folder remains");
    }
    // The moment between the two renames, made by hand.
    if !out.exists() {
        ok(replace().output().unwrap());
    }
    std::fs::rename(&out, &old).unwrap();
    copy_dir(&old, &fresh);
    let run = ok(replace().output().unwrap());
    assert!(String::from_utf8_lossy(&run.stderr).contains("the new edited folder moved into place"), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(whole(&out));
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("memit-new") || n.to_string_lossy().contains("memit-old") || n.to_string_lossy().contains("memit-partial")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir).ok();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
}

/// Editing an edited folder again keeps every patch: the new one on top
/// (memit-patch.safetensors), the earlier ones one level down each; repeated
/// `revert --in-place` walks back to the original weights bitwise, and
/// repeated `apply --in-place` forward to the last edit.
#[test]
fn chained_edits_keep_a_patch_stack_that_reverts_in_order() {
    let dir = scratch("stack");
    let facts = [("Danielle Darrieux", "English"), ("Toko Yasuda", "German"), ("Edwin of Northumbria", "Islam")];
    let mut models = vec![facts_model()];
    for (i, (subject, target)) in facts.iter().enumerate() {
        let requests = dir.join(format!("requests-{i}.json"));
        std::fs::write(&requests, serde_json::json!([{"prompt": "{}", "subject": subject, "target_new": {"str": target}}]).to_string()).unwrap();
        let out = dir.join(format!("edit-{i}"));
        ok(memit(&dir).args(["edit", "--templates", "plain", "--model"]).arg(models.last().unwrap()).arg("--requests").arg(&requests).args(STATS).arg("--out").arg(&out).output().unwrap());
        models.push(out);
    }
    let last = models.last().unwrap().clone();
    let stack: Vec<_> = ["memit-patch.safetensors", "memit-patch.1.safetensors", "memit-patch.2.safetensors"].iter().map(|n| last.join(n)).collect();
    assert!(stack.iter().all(|p| p.is_file()) && !last.join("memit-patch.3.safetensors").exists(), "three edits, three patches");
    // Each level is the patch its edit wrote, byte for byte.
    assert_eq!(std::fs::read(&stack[1]).unwrap(), std::fs::read(models[2].join("memit-patch.safetensors")).unwrap());
    assert_eq!(std::fs::read(&stack[2]).unwrap(), std::fs::read(models[1].join("memit-patch.safetensors")).unwrap());
    assert_eq!(std::fs::read(&stack[2]).unwrap(), std::fs::read(models[2].join("memit-patch.1.safetensors")).unwrap());

    for back in (0..3).rev() {
        let out = ok(memit(&dir).args(["revert", "--in-place", "--model"]).arg(&last).output().unwrap());
        assert!(String::from_utf8_lossy(&out.stdout).contains(&stack[2 - back].display().to_string()), "revert undoes the newest applied patch first");
        assert!(tensors(&last) == tensors(&models[back]), "after reverting down to step {back} the weights are that step's, bitwise");
    }
    fails_with(memit(&dir).args(["revert", "--in-place", "--model"]).arg(&last).output().unwrap(), "the model is the original one");
    for forward in 1..=3 {
        ok(memit(&dir).args(["apply", "--in-place", "--model"]).arg(&last).output().unwrap());
        assert!(tensors(&last) == tensors(&models[forward]), "apply redoes step {forward}");
    }
    fails_with(memit(&dir).args(["apply", "--in-place", "--model"]).arg(&last).output().unwrap(), "they are all applied");
    // A stack level is never taken as a new patch's name.
    let mut c = memit(&dir);
    c.args(["edit", "--templates", "plain", "--model"]).arg(&last).arg("--requests").arg(dir.join("requests-0.json")).args(STATS).arg("--out").arg(dir.join("edit-x")).args(["--patch", "memit-patch.1.safetensors"]);
    fails_with(c.output().unwrap(), "of its patch stack");
    assert!(tensors(&models[0]) == tensors(&facts_model()));
    std::fs::remove_dir_all(&dir).ok();
}

/// A mount made for a test, unmounted when dropped; None where mounting is
/// not allowed (it needs root, as in CI).
struct Mount(PathBuf);

impl Mount {
    fn run(args: &[&str], path: &Path) -> bool {
        Command::new("mount").args(args).arg(path).status().is_ok_and(|s| s.success())
    }

    /// A tmpfs of `bytes`.
    fn tmpfs(path: &Path, bytes: u64) -> Option<Mount> {
        std::fs::create_dir_all(path).unwrap();
        Mount::run(&["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"], path).then(|| Mount(path.to_path_buf()))
    }

    /// `path` itself, read-only (root ignores permission bits, not this).
    fn read_only(path: &Path) -> Option<Mount> {
        let bound = Command::new("mount").arg("--bind").arg(path).arg(path).status().is_ok_and(|s| s.success());
        let mount = bound.then(|| Mount(path.to_path_buf()))?;
        Mount::run(&["-o", "remount,bind,ro"], path).then_some(mount)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Full disks at several points of `apply --out`, `apply --in-place` (then
/// `revert --in-place` when it applied) and `edit`: each run succeeds or
/// fails naming the full disk, the model on that disk keeps its bytes, and
/// nothing half-written stays behind.
#[test]
fn full_disks_end_in_clear_errors_and_leave_models_whole() {
    let dir = scratch("full-disk");
    let edited = dir.join("edited");
    edit_example(&dir, &edited);
    let patch = dir.join("memit-patch.safetensors");
    std::fs::copy(edited.join("memit-patch.safetensors"), &patch).unwrap();
    let files = ["config.json", "tokenizer.json", "model.safetensors", "example-requests.json"];
    let model_bytes: u64 = files.iter().map(|f| std::fs::metadata(facts_model().join(f)).unwrap().len()).sum();
    let mut ran = 0;
    // Free space after the model is copied: almost none, half a model, and
    // room for every copy the three commands write.
    for (i, free) in [100_000, 2_500_000, 3 * model_bytes].into_iter().enumerate() {
        let Some(disk) = Mount::tmpfs(&dir.join(format!("disk-{i}")), model_bytes + free) else {
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        };
        let model = disk.0.join("model");
        std::fs::create_dir_all(&model).unwrap();
        for f in files {
            std::fs::copy(facts_model().join(f), model.join(f)).unwrap();
        }
        let runs: Vec<(&str, Vec<std::ffi::OsString>)> = vec![
            ("apply --out", vec!["apply".into(), "--model".into(), model.clone().into(), "--patch".into(), patch.clone().into(), "--out".into(), disk.0.join("applied").into()]),
            ("apply --in-place", vec!["apply".into(), "--model".into(), model.clone().into(), "--patch".into(), patch.clone().into(), "--in-place".into()]),
            ("revert --in-place", vec!["revert".into(), "--model".into(), model.clone().into(), "--patch".into(), patch.clone().into(), "--in-place".into()]),
        ];
        let mut outcomes: Vec<(&str, bool)> = Vec::new();
        for (name, args) in runs {
            if name == "revert --in-place" && outcomes.last().is_some_and(|(_, applied)| !applied) {
                continue;
            }
            let out = memit(&dir).args(&args).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() || stderr.contains("No space left on device"), "{name} with {free} bytes free: neither success nor a full-disk error:\n{stderr}");
            outcomes.push((name, out.status.success()));
            ran += 1;
        }
        let mut c = memit(&dir);
        c.args(["edit", "--templates", "plain", "--model"]).arg(&model).arg("--requests").arg(model.join("example-requests.json")).args(STATS).arg("--corpus").arg(facts_model().join("train.txt")).arg("--out").arg(disk.0.join("edited"));
        let out = c.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() || stderr.contains("No space left on device"), "edit with {free} bytes free:\n{stderr}");
        outcomes.push(("edit", out.status.success()));
        eprintln!("{free} bytes free: {outcomes:?}");
        // The model is the original or, after a successful apply not yet
        // reverted, the edited one; bitwise either way.
        let now = tensors(&model);
        assert!(now == tensors(&facts_model()) || now == tensors(&edited), "{free} bytes free: the model on the disk was damaged");
        for f in ["config.json", "tokenizer.json"] {
            assert_eq!(std::fs::read(model.join(f)).unwrap(), std::fs::read(facts_model().join(f)).unwrap());
        }
        let leftovers: Vec<_> = walk(&disk.0).into_iter().filter(|p| p.to_string_lossy().contains(".memit-") && !p.ends_with(".memit-wgpu-edit")).collect();
        assert!(leftovers.is_empty(), "{free} bytes free: left behind {leftovers:?}");
        if free > model_bytes {
            assert!(outcomes.iter().all(|(_, ok)| *ok), "with room for a second copy everything succeeds: {outcomes:?}");
        } else {
            assert!(outcomes.iter().any(|(_, ok)| !*ok), "a nearly full disk makes something fail: {outcomes:?}");
        }
    }
    assert!(ran >= 7, "{ran} apply/revert runs");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}

/// `stats` killed (SIGKILL) at a spread of moments, checkpointing after
/// every batch, then run to the end: the covariances are bitwise those of
/// an uninterrupted run, and no temporary file is left.
#[test]
fn killed_stats_runs_resume_to_the_same_covariances() {
    let dir = scratch("stats-kill");
    let stats = |cache: &Path| {
        let mut c = memit(&dir);
        c.args(["--quiet", "stats", "--batch-size", "16", "--checkpoint-every", "1", "--model"]).arg(facts_model()).args(STATS).arg("--stats").arg(cache);
        c
    };
    let straight = dir.join("straight.safetensors");
    ok(stats(&straight).output().unwrap());
    let cache = dir.join("killed.safetensors");
    let mut kills = 0;
    for delay_ms in [400, 800, 1200, 1600, 2000, 2500, 3000, 3600] {
        if cache.exists() {
            break;
        }
        let mut child = stats(&cache).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
    }
    let out = ok(stats(&cache).output().unwrap());
    assert!(kills >= 2, "the runs were killed before they finished ({kills} kills): {}", String::from_utf8_lossy(&out.stderr));
    let (a, b) = (std::fs::read(&cache).unwrap(), std::fs::read(&straight).unwrap());
    let (a, b) = (SafeTensors::deserialize(&a).unwrap(), SafeTensors::deserialize(&b).unwrap());
    for layer in 0..4 {
        let name = format!("layer.{layer}.mom2");
        assert!(a.tensor(&name).unwrap().data() == b.tensor(&name).unwrap().data(), "{name} differs after {kills} kills");
    }
    let temporaries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().contains("memit-tmp") || n.to_string_lossy().ends_with(".partial")).collect();
    assert!(temporaries.is_empty(), "{temporaries:?}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A read-only folder (a read-only bind mount): `edit --out` and `stats`
/// into it are refused before any statistics are computed, and an in-place
/// apply there fails naming the read-only file system, the model intact.
#[test]
fn read_only_folders_are_refused_before_any_work() {
    let dir = scratch("read-only");
    let ro = dir.join("ro");
    let model = ro.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors", "example-requests.json", "train.txt"] {
        std::fs::copy(facts_model().join(f), model.join(f)).unwrap();
    }
    let edited = dir.join("edited");
    edit_example(&dir, &edited);
    let Some(mount) = Mount::read_only(&ro) else {
        eprintln!("skipped: a read-only bind mount needs root");
        return;
    };
    assert!(std::fs::write(ro.join("x"), b"").is_err(), "the mount is read-only");
    let cache = dir.join("cache");
    let started = std::time::Instant::now();
    let mut c = memit(&cache);
    c.args(["edit", "--templates", "plain", "--model"]).arg(&model).arg("--requests").arg(model.join("example-requests.json")).args(STATS).arg("--out").arg(ro.join("edited"));
    fails_with(c.output().unwrap(), "cannot take new files");
    let mut c = memit(&cache);
    c.args(["stats", "--model"]).arg(&model).args(STATS).arg("--stats-dir").arg(ro.join("cache"));
    let out = c.output().unwrap();
    fails_with(out.clone(), "cannot take new files");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("statistics: "), "refused before reading the corpus");
    assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().next().is_none(), "no statistics were computed for the refused edit");
    eprintln!("both refused in {:.1} s", started.elapsed().as_secs_f64());
    let out = memit(&dir).args(["apply", "--in-place", "--model"]).arg(&model).arg("--patch").arg(edited.join("memit-patch.safetensors")).output().unwrap();
    fails_with(out.clone(), "Read-only file system");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("Read-only file system").count(), 1, "the cause is named once: {stderr}");
    assert!(tensors(&model) == tensors(&facts_model()), "the model is intact");
    drop(mount);
    std::fs::remove_dir_all(&dir).ok();
}
