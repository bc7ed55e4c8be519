//! The `memit-wgpu` binary end to end on the bundled facts model, and its
//! errors on bad input.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn memit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_memit-wgpu"))
}

#[test]
fn edit_rewrites_facts_in_the_bundled_model() {
    let out = memit()
        .args(["--json", "edit", "--templates", "plain", "--model"])
        .arg(fixtures().join("facts-gpt2"))
        .arg("--requests")
        .arg(fixtures().join("facts-gpt2/example-requests.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for edit in report["edits"].as_array().unwrap() {
        let target = format!(" {}", edit["target_new"].as_str().unwrap());
        assert_ne!(edit["before"][0][0].as_str().unwrap(), target, "{edit}");
        assert_eq!(edit["after"][0][0].as_str().unwrap(), target, "{edit}");
    }
}

#[test]
fn generate_continues_a_prompt() {
    let out = memit().args(["generate", "--prompt", "Danielle Darrieux", "--max-new-tokens", "2", "--model"]).arg(fixtures().join("facts-gpt2")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "Danielle Darrieux French.");
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("memit-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("malformed.json", "[{\"prompt\": ", "is not a JSON list of MEMIT requests"),
        ("no-braces.json", r#"[{"prompt": "Paris is in", "subject": "Paris", "target_new": {"str": "Rome"}}]"#, "exactly one {}"),
        ("empty-target.json", r#"[{"prompt": "{}", "subject": "Paris", "target_new": {"str": " "}}]"#, "target_new.str is empty"),
    ];
    for (name, body, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        let out = memit().args(["edit", "--model"]).arg(fixtures().join("facts-gpt2")).arg("--requests").arg(&path).output().unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{name}: {stderr}");
    }
    let out = memit().args(["generate", "--prompt", "x", "--model", "/no/such/model"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/model"));
    std::fs::remove_dir_all(&dir).ok();
}
