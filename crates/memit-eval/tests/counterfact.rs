//! CounterFact scoring: teacher-forced NLL against a CPU log-softmax of the
//! model's logits, the aggregate formulas on hand-checked values, and the
//! real dataset format; zsRE token accuracy against a CPU argmax; the
//! n-gram entropy on hand-computed values.

use std::path::PathBuf;

use memit_eval::{generation_entropy, mean_generation_entropy, score_counterfact, score_zsre, summarize, summarize_zsre, target_fits, target_nll, CaseScore, CounterFactCase, ZsreRecord, ZsreTarget};
use memit_gpu::GpuContext;
use memit_models::{load_hf_dir, Batch, GenerateOptions, LoadOptions, Padding, Sampling};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

#[test]
fn target_nll_matches_cpu_log_softmax() {
    let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let loaded = load_hf_dir(ctx, &fixtures().join("facts-gpt2"), LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    let pairs = vec![
        ("The mother tongue of Danielle Darrieux is".to_string(), "French".to_string()),
        ("The Eiffel Tower is located in".to_string(), "New York".to_string()),
        ("Big Ben is located in the city of".to_string(), " London".to_string()),
    ];
    let got = pollster::block_on(target_nll(&model, &tok, &pairs)).unwrap();
    for ((prompt, target), nll) in pairs.iter().zip(got) {
        let p = tok.encode(prompt).unwrap();
        let t = tok.encode(&format!(" {}", target.trim_start())).unwrap();
        let seq = [p.clone(), t.clone()].concat();
        let out = model.forward(&Batch::new(&[seq], Padding::Right, 0).unwrap(), &[], true).unwrap();
        let logits = pollster::block_on(model.ctx.read(out.logits.as_ref().unwrap())).unwrap();
        let vocab = model.config.vocab_size;
        let mut want = 0.0f64;
        for (j, &id) in t.iter().enumerate() {
            let row = &logits[(p.len() - 1 + j) * vocab..][..vocab];
            let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            want += lse - row[id as usize] as f64;
        }
        want /= t.len() as f64;
        assert!((nll as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "{prompt:?} + {target:?}: {nll} vs {want}");
    }
}

#[test]
fn summary_follows_the_paper_definitions() {
    let case = |efficacy, magnitude, paraphrase, neighborhood| CaseScore {
        case_id: 0,
        efficacy,
        efficacy_magnitude: magnitude,
        paraphrase: Some(paraphrase),
        paraphrase_magnitude: Some(magnitude / 2.0),
        neighborhood: Some(neighborhood),
        neighborhood_magnitude: (neighborhood > 0.5).then_some(0.3),
    };
    let s = summarize(&[case(true, 0.5, 1.0, 0.5), case(false, -0.1, 0.0, 1.0), case(true, 0.2, 0.5, 1.0), case(true, 0.4, 1.0, 0.0)]);
    assert_eq!(s.efficacy_score, 75.0);
    assert!((s.efficacy_magnitude - 25.0).abs() < 1e-4);
    assert_eq!(s.paraphrase_score, 62.5);
    assert_eq!(s.neighborhood_score, 62.5);
    // PM: mean of 0.25, −0.05, 0.1, 0.2 = 0.125; NM over the cases that
    // have one (two cases at 0.3).
    assert!((s.paraphrase_magnitude - 12.5).abs() < 1e-4, "{}", s.paraphrase_magnitude);
    assert!((s.neighborhood_magnitude - 30.0).abs() < 1e-4, "{}", s.neighborhood_magnitude);
    // Harmonic mean of 75, 62.5, 62.5 = 3 / (1/75 + 2/62.5) = 66.176...
    assert!((s.score - 66.17647).abs() < 1e-3, "{}", s.score);
}

#[test]
fn reads_the_counterfact_dataset_format() {
    let text = r#"[{"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
        "target_new": {"str": "English"}, "target_true": {"str": "French"}},
        "paraphrase_prompts": ["Where Danielle Darrieux is from, people speak the language of"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of"], "neighborhood_target": "French"}]"#;
    let cases: Vec<CounterFactCase> = serde_json::from_str(text).unwrap();
    assert_eq!(cases[0].request().target_new.text, "English");
    assert_eq!(cases[0].neighborhood_prompts.len(), 1);
}

#[test]
fn unedited_facts_model_prefers_true_objects() {
    let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let loaded = load_hf_dir(ctx, &fixtures().join("facts-gpt2"), LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    let facts: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(fixtures().join("facts-gpt2/facts.json")).unwrap()).unwrap();
    let cases: Vec<CounterFactCase> = facts
        .iter()
        .filter(|f| f["known"].as_bool() == Some(true) && f["case_id"].is_u64())
        .take(20)
        .map(|f| {
            serde_json::from_value(serde_json::json!({
                "case_id": f["case_id"],
                "requested_rewrite": {"prompt": f["prompt"], "subject": f["subject"],
                    "target_new": {"str": f["target_new"]}, "target_true": {"str": f["target_true"]}},
                "paraphrase_prompts": [f["paraphrase"]],
                "neighborhood_prompts": [f["neighborhood"]],
            }))
            .unwrap()
        })
        .collect();
    let scores = pollster::block_on(score_counterfact(&model, &tok, &cases)).unwrap();
    // PM and NM per case from the teacher-forced NLLs (tested above).
    for (c, s) in cases.iter().zip(&scores).take(4) {
        let r = &c.requested_rewrite;
        let pairs: Vec<(String, String)> = [&c.paraphrase_prompts[0], &c.neighborhood_prompts[0]].iter().flat_map(|p| [(p.to_string(), r.target_new.text.clone()), (p.to_string(), r.target_true.text.clone())]).collect();
        let nll = pollster::block_on(target_nll(&model, &tok, &pairs)).unwrap();
        let p = |i: usize| (-nll[i]).exp();
        assert!((s.paraphrase_magnitude.unwrap() - (p(0) - p(1))).abs() < 1e-6, "{s:?}");
        assert!((s.neighborhood_magnitude.unwrap() - (p(3) - p(2))).abs() < 1e-6, "{s:?}");
    }
    let summary = summarize(&scores);
    assert!(summary.paraphrase_magnitude < 0.0 && summary.neighborhood_magnitude > 0.0, "{summary:?}");
    // The model learned the true objects: before any edit, new loses.
    assert_eq!(summary.cases, 20);
    assert!(summary.efficacy_score <= 10.0, "{summary:?}");
    assert!(summary.efficacy_magnitude < 0.0, "{summary:?}");
    assert!(summary.neighborhood_score >= 80.0, "{summary:?}");
}

#[test]
fn token_accuracy_matches_cpu_argmax_and_zsre_reads_its_format() {
    let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let loaded = load_hf_dir(ctx, &fixtures().join("facts-gpt2"), LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    let pairs = vec![
        ("The mother tongue of Danielle Darrieux is".to_string(), "French".to_string()),
        ("The mother tongue of Danielle Darrieux is".to_string(), "English and French".to_string()),
        ("Michel Rocard is a native speaker of".to_string(), "French".to_string()),
    ];
    let fits = pollster::block_on(target_fits(&model, &tok, &pairs)).unwrap();
    for ((prompt, target), fit) in pairs.iter().zip(&fits) {
        let p = tok.encode(prompt).unwrap();
        let t = tok.encode(&format!(" {target}")).unwrap();
        let out = model.forward(&Batch::new(&[[p.clone(), t.clone()].concat()], Padding::Right, 0).unwrap(), &[], true).unwrap();
        let logits = pollster::block_on(model.ctx.read(out.logits.as_ref().unwrap())).unwrap();
        let vocab = model.config.vocab_size;
        let hits = t
            .iter()
            .enumerate()
            .filter(|&(j, &id)| {
                let row = &logits[(p.len() - 1 + j) * vocab..][..vocab];
                (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() == id as usize
            })
            .count();
        assert_eq!(fit.token_accuracy, hits as f32 / t.len() as f32, "{prompt:?} + {target:?}");
    }
    assert_eq!(fits[0].token_accuracy, 1.0, "the facts model knows this fact");

    let text = r#"[{"subject": "Danielle Darrieux", "src": "The mother tongue of Danielle Darrieux is", "pred": "French",
        "rephrase": "Where Danielle Darrieux is from, people speak the language of", "alt": "English", "answers": ["French"],
        "loc": "Michel Rocard is a native speaker of", "loc_ans": "French", "cond": "French >> English || ..."}]"#;
    let records: Vec<ZsreRecord> = serde_json::from_str(text).unwrap();
    // As the authors: the target is answers[0] (`alt` on request), and the
    // unrelated question is asked with a "?".
    let request = records[0].request(0, ZsreTarget::Answer).unwrap();
    assert_eq!((request.prompt.as_str(), request.target_new.text.as_str()), ("The mother tongue of {} is", "French"));
    assert_eq!(records[0].request(0, ZsreTarget::Alt).unwrap().target_new.text, "English");
    let loc_pair = [("Michel Rocard is a native speaker of?".to_string(), "French".to_string())];
    let loc = pollster::block_on(target_fits(&model, &tok, &loc_pair)).unwrap()[0].token_accuracy;
    // Before editing: the model already gives answers[0], not `alt`.
    let summary = summarize_zsre(&pollster::block_on(score_zsre(&model, &tok, &records, ZsreTarget::Answer)).unwrap());
    assert_eq!((summary.efficacy, summary.specificity), (100.0, 100.0 * loc), "{summary:?}");
    let summary = summarize_zsre(&pollster::block_on(score_zsre(&model, &tok, &records, ZsreTarget::Alt)).unwrap());
    assert_eq!((summary.efficacy, summary.specificity), (0.0, 100.0 * loc), "{summary:?}");
    let mut missing = records[0].clone();
    missing.subject = "Nobody".into();
    assert!(missing.request(0, ZsreTarget::Answer).is_none(), "subject not in the question");
    missing.subject = records[0].subject.clone();
    missing.answers.clear();
    assert!(missing.request(0, ZsreTarget::Answer).is_none(), "no answers");
    assert!(pollster::block_on(score_zsre(&model, &tok, &[missing], ZsreTarget::Answer)).is_err());
}

#[test]
fn generation_entropy_matches_hand_computed_values() {
    // Words a b a b: bigrams ab ×2, ba ×1 → H2 = 0.918296; trigrams aba,
    // bab → H3 = 1. (2/3·H2 + 4/3·H3) / 2 = 0.972765.
    assert!((generation_entropy("a b a b") - 0.972765).abs() < 1e-5, "{}", generation_entropy("a b a b"));
    // Case is kept (as nltk does): A b a B has three distinct bigrams and
    // two trigrams: (2/3·log2 3 + 4/3·1) / 2 = 1.194987.
    assert!((generation_entropy("A b a B") - 1.194987).abs() < 1e-5, "{}", generation_entropy("A b a B"));
    // Punctuation counts as a word: "a . a ." has the structure of a b a b.
    assert!((generation_entropy("a. a.") - 0.972765).abs() < 1e-5);
    // Clitics split off as nltk's word_tokenize does: I do n't know John 's
    // → five distinct bigrams, four trigrams: (2/3·log2 5 + 4/3·2) / 2.
    assert!((generation_entropy("I don't know John's") - 2.107309).abs() < 1e-5, "{}", generation_entropy("I don't know John's"));
    // A repeated word has a single bigram and trigram: zero entropy.
    assert_eq!(generation_entropy("the the the the the"), 0.0);
}

#[test]
fn generation_entropy_of_a_prompt_longer_than_the_context_continues_its_tail() {
    let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let loaded = load_hf_dir(ctx, &fixtures().join("facts-gpt2"), LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    let context = model.config.max_positions;
    let prompt = "The mother tongue of Danielle Darrieux is French. ".repeat(8);
    let ids = tok.encode(&prompt).unwrap();
    assert!(ids.len() > context, "the prompt must overflow the {context}-token context");
    let new_tokens = 20;
    let got = pollster::block_on(mean_generation_entropy(&model, &tok, &[prompt.clone()], new_tokens, 7)).unwrap();
    // Independently: continue the last context − 20 tokens, score the whole prompt plus the continuation.
    let tail = ids[ids.len() - (context - new_tokens)..].to_vec();
    let options = GenerateOptions { max_new_tokens: new_tokens, sampling: Sampling::TopK { k: 5, temperature: 1.0, seed: 7 }, stop_at_eos: false };
    let new = pollster::block_on(model.generate(&[tail], options)).unwrap().remove(0);
    assert_eq!(new.len(), new_tokens);
    let want = generation_entropy(&format!("{prompt}{}", tok.decode(&new).unwrap()));
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}
