//! Presets, defaults for unknown shapes, JSON overrides and validation.

use memit_core::{parse_requests, EditRequest, Hparams, TargetText};
use memit_models::{Arch, ModelConfig, Residual};

fn config(arch: Arch, n_layers: usize, d_model: usize) -> ModelConfig {
    ModelConfig {
        arch,
        vocab_size: 100,
        d_model,
        n_layers,
        n_heads: 4,
        n_kv_heads: 4,
        head_dim: d_model / 4,
        d_ff: 4 * d_model,
        max_positions: 64,
        norm_eps: 1e-5,
        rotary_dim: 0,
        rotary_style: memit_gpu::RotaryStyle::Half,
        rope_theta: 10000.0,
        residual: Residual::Sequential,
        activation: memit_gpu::Activation::GeluTanh,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

#[test]
fn reference_presets_match_the_paper() {
    let xl = Hparams::for_model(&config(Arch::Gpt2, 48, 1600));
    assert_eq!(xl.layers, vec![13, 14, 15, 16, 17]);
    assert_eq!((xl.mom2_update_weight, xl.v_num_grad_steps, xl.v_lr, xl.kl_factor, xl.clamp_norm_factor), (20000.0, 20, 0.5, 0.0625, 0.75));
    let gptj = Hparams::for_model(&config(Arch::Gptj, 28, 4096));
    assert_eq!(gptj.layers, vec![3, 4, 5, 6, 7, 8]);
    assert_eq!((gptj.mom2_update_weight, gptj.v_num_grad_steps), (15000.0, 25));
    let neox = Hparams::preset("gpt-neox-20b").unwrap();
    assert_eq!((neox.layers.clone(), neox.mom2_update_weight), (vec![6, 7, 8, 9, 10], 6000.0));
    assert!(Hparams::preset("gpt-5").unwrap_err().to_string().contains("unknown preset"));
    // The AlphaEdit authors' settings (hparams/AlphaEdit/*.json in their
    // code): τ = 2e-2 and L2 = 10 for GPT-2 XL, GPT-J and Llama3-8B, whose
    // MEMIT part takes v_lr 0.1 at layers 4-8.
    for preset in [&xl, &gptj] {
        assert_eq!((preset.nullspace_threshold, preset.l2), (2e-2, 10.0));
    }
    let llama3 = Hparams::for_model(&ModelConfig { vocab_size: 128_256, ..config(Arch::Llama, 32, 4096) });
    assert_eq!((llama3.layers.clone(), llama3.v_lr, llama3.mom2_update_weight, llama3.v_num_grad_steps), (vec![4, 5, 6, 7, 8], 0.1, 15000.0, 25));
    assert_eq!((llama3.nullspace_threshold, llama3.l2), (2e-2, 10.0));
    // A Llama-2-7B (same widths, another vocabulary) is not Llama3-8B.
    assert_ne!(Hparams::for_model(&ModelConfig { vocab_size: 32_000, ..config(Arch::Llama, 32, 4096) }).v_lr, 0.1);
    // Hparams written before these fields existed (patch files) still read.
    let mut old = serde_json::to_value(&xl).unwrap();
    old.as_object_mut().unwrap().retain(|k, _| k != "nullspace_threshold" && k != "l2");
    assert_eq!(serde_json::from_value::<Hparams>(old).unwrap(), xl);
    assert!(xl.with_overrides(&serde_json::json!({"l2": -1.0})).unwrap().validate(&config(Arch::Gpt2, 48, 1600)).unwrap_err().to_string().contains("l2"));
}

#[test]
fn small_models_get_early_middle_layers_and_overrides_apply() {
    let tiny = config(Arch::Gpt2, 4, 96);
    let hp = Hparams::for_model(&tiny);
    assert_eq!((hp.layers.clone(), hp.mom2_update_weight), (vec![0, 1], 15000.0));
    assert_eq!(Hparams::for_model(&config(Arch::Llama, 12, 256)).layers, vec![2, 3, 4]);
    assert_eq!(Hparams::for_model(&config(Arch::Gpt2, 4, 128)), Hparams::preset("tiny-facts").unwrap());
    hp.validate(&tiny).unwrap();
    let changed = hp.with_overrides(&serde_json::json!({"layers": [2, 3], "mom2_update_weight": 100.0})).unwrap();
    assert_eq!((changed.layers.clone(), changed.mom2_update_weight, changed.v_lr), (vec![2, 3], 100.0, 0.5));
    assert!(hp.with_overrides(&serde_json::json!({"layer": [1]})).unwrap_err().to_string().contains("unknown field"));
    let bad = hp.with_overrides(&serde_json::json!({"layers": [3, 9]})).unwrap();
    assert!(bad.validate(&tiny).unwrap_err().to_string().contains("does not exist"));
    for (overrides, expected) in [
        (serde_json::json!({"v_lr": -0.5}), "v_lr = -0.5 must be a positive number"),
        (serde_json::json!({"kl_factor": -1.0}), "kl_factor = -1 must be zero or a positive"),
        (serde_json::json!({"v_num_grad_steps": 0}), "v_num_grad_steps = 0 must be between"),
        (serde_json::json!({"v_num_grad_steps": 100_000_000}), "v_num_grad_steps = 100000000 must be between"),
        (serde_json::json!({"clamp_norm_factor": 0.0}), "clamp_norm_factor = 0 must be a positive"),
        (serde_json::json!({"mom2_n_samples": 0}), "mom2_n_samples must be at least 1"),
    ] {
        let err = hp.with_overrides(&overrides).unwrap().validate(&tiny).unwrap_err().to_string();
        assert!(err.contains(expected), "{overrides}: {err}");
    }
}

#[test]
fn malformed_requests_are_refused_with_their_index() {
    let tok = memit_models::TextTokenizer::from_file(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers/gpt2/tokenizer.json")).unwrap();
    let request = |prompt: &str, subject: &str, target: &str| EditRequest {
        case_id: None,
        prompt: prompt.into(),
        subject: subject.into(),
        target_new: TargetText { text: target.into() },
        target_true: None,
    };
    let ok = request("The mother tongue of {} is", "Danielle Darrieux", "English").prepare(0, &tok).unwrap();
    assert_eq!(ok.target_text, " English");
    assert_eq!(ok.target_ids, tok.encode(" English").unwrap());
    for (bad, why) in [
        (request("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English"), "exactly one"),
        (request("{} and {}", "x", "y"), "exactly one"),
        (request("{} is", "  ", "English"), "subject is empty"),
        (request("{} is", "Paris", " "), "target_new.str is empty"),
    ] {
        let err = bad.prepare(7, &tok).unwrap_err().to_string();
        assert!(err.contains("request 7") && err.contains(why), "{err}");
    }
    let parsed: Result<EditRequest, _> = serde_json::from_str(r#"{"prompt": "{} is", "subject": "x"}"#);
    assert!(parsed.is_err(), "target_new is required");
}

#[test]
fn easyedit_requests_read_as_memit_requests() {
    let easy = r#"{"prompts": ["Ray Charles, the", "The mother tongue of Danielle Darrieux is"],
                   "subject": ["Ray Charles", "Danielle Darrieux"], "target_new": ["violin", "English"], "ground_truth": ["piano", "French"]}"#;
    let got = parse_requests(easy).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].prompt.as_str(), got[0].subject.as_str(), got[0].target_new.text.as_str()), ("{}, the", "Ray Charles", "violin"));
    assert_eq!(got[1].prompt, "The mother tongue of {} is");
    assert_eq!(got[1].target_true.as_ref().unwrap().text, "French");
    // Single strings, no ground truth.
    let one = parse_requests(r#"{"prompts": "Paris is in", "subject": "Paris", "target_new": "Italy"}"#).unwrap();
    assert_eq!((one[0].prompt.as_str(), one[0].target_true.clone()), ("{} is in", None));
    // MEMIT's list is read as before.
    let memit = parse_requests(r#"[{"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Italy"}}]"#).unwrap();
    assert_eq!(memit, one);
    for (bad, why) in [
        (r#"{"prompts": ["Paris is in"], "subject": ["Rome"], "target_new": ["Italy"]}"#, "does not contain its subject"),
        (r#"{"prompts": ["Paris is in", "x"], "subject": ["Paris"], "target_new": ["Italy"]}"#, "differ in length"),
        (r#"{"prompts": ["Paris is in"], "subject": ["Paris"]}"#, "need \"target_new\""),
        (r#"{"prompt": "{} is"}"#, "neither"),
        (r#"{"prompts": [1], "subject": ["Paris"], "target_new": ["Italy"]}"#, "string or a list"),
    ] {
        let err = parse_requests(bad).unwrap_err().to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn subject_last_index_follows_memit() {
    let tok = memit_models::TextTokenizer::from_file(&std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizers/gpt2/tokenizer.json")).unwrap();
    // "The mother tongue of" = 4 tokens, " Danielle Darrieux" = 4 tokens → index 7.
    let prefix = tok.encode("The mother tongue of").unwrap().len();
    let subject = tok.encode(" Danielle Darrieux").unwrap().len();
    let idx = memit_core::subject_last_index("The mother tongue of {} is", "Danielle Darrieux", &tok).unwrap();
    assert_eq!(idx, prefix + subject - 1);
    let full = tok.encode("The mother tongue of Danielle Darrieux is").unwrap();
    assert_eq!(tok.decode(&full[idx..=idx]).unwrap(), tok.decode(&tok.encode(" Danielle Darrieux").unwrap()[subject - 1..]).unwrap());
    // Subject first: no leading space.
    assert_eq!(memit_core::subject_last_index("{} is a", "Paris", &tok).unwrap(), tok.encode("Paris").unwrap().len() - 1);
    // A subject that ends inside a token merged with the text after it:
    // " Microsof" alone is 3 tokens, but "The Microsoft is" is 3 tokens in
    // all, the subject's last overlapping one being " Microsoft" (index 1).
    assert_eq!(tok.encode(" Microsof").unwrap().len(), 3);
    assert_eq!(tok.encode("The Microsoft is").unwrap().len(), 3);
    assert_eq!(memit_core::subject_last_index("The {}t is", "Microsof", &tok).unwrap(), 1);
    assert_eq!(memit_core::subject_last_index("{}osoft rules", "Micr", &tok).unwrap(), 0);
}
