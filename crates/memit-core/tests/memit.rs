//! MEMIT on the bundled facts model against an independent PyTorch
//! implementation (tests/fixtures/make_memit_golden.py): covariance
//! statistics, target vectors, per-layer updates and the edited model's
//! predictions (and the realistic scenario on a tiny Llama with its own
//! tokenizer); plus stats checkpoint/resume and cache validation. And
//! behaviour tests on the world model, whose facts live where MEMIT edits:
//! 50 edits, and 1,000 at once beside the same run of the PyTorch MEMIT.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use memit_core::{apply_edit, apply_memit, compute_target_vectors, compute_targets, null_space_projector, EditMethod, EditState, load_cache, EditRequest, Hparams, LayerCovariance, StatsAccumulator, StatsIdentity, TargetOptions, TargetText, TargetVector};
use memit_gpu::{DType, GpuContext, GpuOptions};
use memit_models::{argmax, load_hf_dir, LoadOptions, Model, TextTokenizer};
use safetensors::SafeTensors;

fn ctx() -> Arc<GpuContext> {
    static CTX: OnceLock<Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| pollster::block_on(GpuContext::from_env()).expect("a GPU adapter (install mesa-vulkan-drivers)")).clone()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load() -> (Model, TextTokenizer) {
    load_folder("facts-gpt2")
}

/// The same adapter with a GPU's kernel variants (norms and attention's
/// backward reduce over the workgroup) and row reductions within subgroups
/// (`subgroups`, where the adapter has them) or as trees through workgroup
/// memory (browsers' path, and adapters' without subgroups).
fn gpu_kernels_ctx(subgroups: bool) -> Arc<GpuContext> {
    static CTX: [OnceLock<Arc<GpuContext>>; 2] = [OnceLock::new(), OnceLock::new()];
    CTX[usize::from(subgroups)]
        .get_or_init(|| {
            let options = GpuOptions { cpu_kernels: Some(false), subgroups: Some(subgroups), ..Default::default() };
            pollster::block_on(GpuContext::new(options)).expect("a GPU adapter (install mesa-vulkan-drivers)")
        })
        .clone()
}

/// A fixture model folder with its tokenizer.
fn load_folder(folder: &str) -> (Model, TextTokenizer) {
    load_folder_on(ctx(), folder)
}

fn load_folder_on(ctx: Arc<GpuContext>, folder: &str) -> (Model, TextTokenizer) {
    let loaded = load_hf_dir(ctx, &fixtures().join(folder), LoadOptions::default()).unwrap();
    (loaded.model, loaded.tokenizer.unwrap_or_else(|| panic!("{folder} ships a tokenizer")))
}

struct Golden {
    /// The fixture folder of the model the golden was made on.
    folder: &'static str,
    json: serde_json::Value,
    bytes: Vec<u8>,
}

impl Golden {
    /// One-token targets after prompts ending with the subject, λ = 10.
    fn open() -> Golden {
        Golden::named("facts-gpt2", "memit-golden")
    }

    /// make_memit_golden.py --scenario realistic: subjects inside the
    /// prompts, multi-token targets, λ = 20000 at three layers, templates
    /// shaped like generated ones.
    fn realistic(folder: &'static str) -> Golden {
        Golden::named(folder, "memit-golden-realistic")
    }

    fn named(folder: &'static str, stem: &str) -> Golden {
        let dir = fixtures().join(folder);
        Golden {
            folder,
            json: serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{stem}.json"))).unwrap()).unwrap(),
            bytes: std::fs::read(dir.join(format!("{stem}.safetensors"))).unwrap(),
        }
    }

    fn tensor(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        st.tensor(name).unwrap_or_else(|_| panic!("golden lacks {name}")).data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn hparams(&self, model: &Model) -> Hparams {
        let hp = &self.json["hparams"];
        let overrides = serde_json::json!({
            "layers": hp["layers"], "v_num_grad_steps": hp["v_num_grad_steps"], "v_lr": hp["v_lr"],
            "v_weight_decay": hp["v_weight_decay"], "kl_factor": hp["kl_factor"], "clamp_norm_factor": hp["clamp_norm_factor"],
            "mom2_update_weight": hp["mom2_update_weight"], "v_loss_threshold": hp["v_loss_threshold"],
        });
        Hparams::for_model(&model.config).with_overrides(&overrides).unwrap()
    }

    fn templates(&self) -> Vec<String> {
        serde_json::from_value(self.json["templates"].clone()).unwrap()
    }

    fn requests(&self) -> Vec<EditRequest> {
        serde_json::from_value(self.json["requests"].clone()).unwrap()
    }

    fn max_len(&self) -> usize {
        self.json["hparams"]["max_len"].as_u64().unwrap() as usize
    }
}

/// max |got − want| ≤ rel · max |want|; returns max |got − want| / max |want|.
fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-12);
    let err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= rel * scale, "{what}: max error {err:e} vs scale {scale:e} (rel {:e})", err / scale);
    err / scale
}

fn corpus() -> Vec<String> {
    std::fs::read_to_string(fixtures().join("memit-corpus.txt")).unwrap().lines().filter(|l| !l.trim().is_empty()).map(String::from).collect()
}

fn identity(layers: Vec<usize>, max_len: usize) -> StatsIdentity {
    StatsIdentity { model_id: "facts-gpt2".into(), corpus_id: "memit-corpus.txt".into(), layers, max_len }
}

fn collect(model: &Model, tok: &TextTokenizer, layers: Vec<usize>, max_len: usize) -> StatsAccumulator {
    let mut acc = StatsAccumulator::new(model, identity(layers, max_len)).unwrap();
    for batch in corpus().chunks(8) {
        acc.add_texts(model, tok, batch).unwrap();
    }
    acc
}

#[test]
fn covariance_matches_torch_and_survives_resume() {
    let (model, tok) = load();
    let golden = Golden::open();
    let layers: Vec<usize> = golden.hparams(&model).layers;
    let mut acc = collect(&model, &tok, layers.clone(), golden.max_len());
    assert_eq!(acc.n_tokens, golden.json["n_tokens"].as_u64().unwrap());
    let covs = pollster::block_on(acc.covariances(&model)).unwrap();
    for c in &covs {
        assert_close(&c.matrix, &golden.tensor(&format!("layer.{}.mom2", c.layer)), 1e-5, &format!("C of layer {}", c.layer));
    }

    // Stop after two batches, checkpoint, resume, finish: same result.
    let texts = corpus();
    let mut first = StatsAccumulator::new(&model, identity(layers.clone(), golden.max_len())).unwrap();
    for batch in texts.chunks(8).take(2) {
        first.add_texts(&model, &tok, batch).unwrap();
    }
    let checkpoint = pollster::block_on(first.checkpoint_bytes(&model)).unwrap();
    let mut resumed = StatsAccumulator::resume(&model, identity(layers.clone(), golden.max_len()), &checkpoint).unwrap();
    assert_eq!(resumed.texts_done, 16);
    for batch in texts[resumed.texts_done as usize..].chunks(8) {
        resumed.add_texts(&model, &tok, batch).unwrap();
    }
    let again = pollster::block_on(resumed.covariances(&model)).unwrap();
    for (a, b) in covs.iter().zip(&again) {
        assert_eq!(a.n_tokens, b.n_tokens);
        assert_eq!(b.matrix, a.matrix, "resumed statistics are bitwise the same");
    }

    // A finished cache loads back; one for another model or corpus is refused.
    let (finished, cache) = pollster::block_on(acc.finish(&model)).unwrap();
    assert_eq!(finished, covs);
    let d_ff = model.config.d_ff;
    let loaded = load_cache(&cache, &identity(layers.clone(), golden.max_len()), d_ff).unwrap();
    assert_eq!(loaded, covs);
    let mut foreign = identity(layers.clone(), golden.max_len());
    foreign.model_id = "gpt2-xl".into();
    let err = load_cache(&cache, &foreign, d_ff).unwrap_err().to_string();
    assert!(err.contains("model_id") && err.contains("another model"), "{err}");
    assert!(load_cache(&checkpoint, &identity(layers.clone(), golden.max_len()), d_ff).unwrap_err().to_string().contains("unfinished"));
    assert!(load_cache(b"garbage", &foreign, d_ff).is_err());

    // A flipped bit in a covariance value or a checkpoint's sums: refused as
    // corrupted (the whole-file hash), never used or resumed.
    let ours = identity(layers.clone(), golden.max_len());
    for (file, at) in [(&cache, cache.len() - 3), (&checkpoint, checkpoint.len() / 2)] {
        let mut bad = file.to_vec();
        bad[at] ^= 0x10;
        let err = match load_cache(&bad, &ours, d_ff) {
            Err(e) if file == &cache => e.to_string(),
            _ => StatsAccumulator::resume(&model, ours.clone(), &bad).err().unwrap().to_string(),
        };
        assert!(err.contains("corrupted"), "{err}");
    }
    // Seeded single-bit flips anywhere in the cache: an error (or, in JSON
    // padding, the same statistics), never a panic.
    let mut state = 0x5eed_u64;
    for k in 0..300 {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let mut bad = cache.clone();
        let at = (state >> 33) as usize % bad.len();
        bad[at] ^= 1 << (k % 8);
        match std::panic::catch_unwind(|| load_cache(&bad, &ours, d_ff)).unwrap_or_else(|_| panic!("flip at byte {at} panicked")) {
            Ok(read) => assert_eq!(read, covs, "byte {at}: changed statistics accepted"),
            Err(e) => assert!(e.to_string().starts_with("covariance statistics: "), "{e}"),
        }
    }
    // A checkpoint (unhashed, as older versions wrote them) claiming an
    // empty pending text: refused, not a division by zero.
    let st_ck = safetensors::SafeTensors::deserialize(&checkpoint).unwrap();
    let (_, ck_header) = safetensors::SafeTensors::read_metadata(&checkpoint).unwrap();
    let mut ck_meta = ck_header.metadata().clone().unwrap();
    ck_meta.remove("file_sha256");
    let lengths = ck_meta.get("pending_lengths").cloned().unwrap_or_default();
    ck_meta.insert("pending_lengths".into(), if lengths.is_empty() { "0".into() } else { format!("0,{lengths}") });
    let crafted = safetensors::serialize(st_ck.tensors(), Some(ck_meta)).unwrap();
    let err = StatsAccumulator::resume(&model, ours.clone(), &crafted).err().expect("refused").to_string();
    assert!(err.contains("pending texts do not match their lengths"), "{err}");
    // A file written without the hash (older versions), with C damaged as
    // a bad disk or a careless edit would: refused by the plausibility
    // checks on C (symmetry, Cauchy–Schwarz, finiteness).
    let st = safetensors::SafeTensors::deserialize(&cache).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&cache).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    assert!(meta.remove("file_sha256").is_some());
    let name = format!("layer.{}.mom2", layers[0]);
    let rewrite = |index: usize, value: f32| {
        let views: Vec<(String, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                let mut data = v.data().to_vec();
                if n == name {
                    data[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
                }
                (n, v.shape().to_vec(), data)
            })
            .collect();
        let views: Vec<_> = views.iter().map(|(n, shape, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), d).unwrap())).collect();
        safetensors::serialize(views, Some(meta.clone())).unwrap()
    };
    let c0 = &covs[0].matrix;
    assert_eq!(load_cache(&rewrite(5, c0[5]), &ours, d_ff).unwrap(), covs, "an unhashed, intact file still loads");
    for (index, value, why) in [(d_ff + 3, 1e30, "not symmetric"), (7 * d_ff + 7, f32::NAN, "not finite"), (2 * d_ff + 2, -1.0, "negative"), (9 * d_ff + 9, 1e30, "median diagonal")] {
        let err = load_cache(&rewrite(index, value), &ours, d_ff).unwrap_err().to_string();
        assert!(err.contains("corrupted cache") && err.contains(why), "{err}");
    }
}

fn golden_covariances(golden: &Golden, layers: &[usize]) -> Vec<LayerCovariance> {
    layers.iter().map(|&layer| LayerCovariance { layer, matrix: golden.tensor(&format!("layer.{layer}.mom2")), n_tokens: 0 }).collect()
}

fn target_vectors(model: &Model, tok: &TextTokenizer, requests: &[EditRequest], templates: &[String], hp: &Hparams, options: TargetOptions) -> Vec<TargetVector> {
    let prepared: Vec<_> = requests.iter().enumerate().map(|(i, r)| r.prepare(i, tok).unwrap()).collect();
    pollster::block_on(compute_target_vectors(model, tok, &prepared, templates, hp, &options, &mut |_, _| {})).unwrap().0
}

#[test]
fn target_vectors_match_torch() {
    let golden = Golden::open();
    for ctx in [ctx(), gpu_kernels_ctx(true), gpu_kernels_ctx(false)] {
        let (model, tok) = load_folder_on(ctx, "facts-gpt2");
        let hp = golden.hparams(&model);
        let targets = target_vectors(&model, &tok, &golden.requests(), &golden.templates(), &hp, TargetOptions::default());
        for (i, target) in targets.iter().enumerate() {
            assert_close(&target.target_init, &golden.tensor(&format!("request.{i}.target_init")), 1e-5, "target_init");
            assert_close(&target.z, &golden.tensor(&format!("request.{i}.z")), 2e-3, &format!("z of request {i}"));
            let first = target.losses.first().unwrap().total();
            let last = target.losses.last().unwrap().total();
            assert!(last < first, "loss went from {first} to {last}");
        }
    }
}

/// Every kernel MEMIT runs (a GPU's kernel variants, with row reductions
/// within subgroups where this adapter has them and as trees through
/// workgroup memory, and a CPU adapter's): statistics, target vectors
/// with the backward pass, the solve and the edited forward of GPT-2 and
/// Llama, the forward of GPT-J and GPT-NeoX, and the GPU's blocked
/// Cholesky solve, translates through naga's Metal (MSL 2.4) and DX12
/// (HLSL, shader model 6.2) writers, which wgpu uses on those backends and
/// which no machine of this project's runs (the platforms' own compilers
/// after them cannot run here).
#[test]
fn every_kernel_of_an_edit_translates_for_metal_and_dx12() {
    // The CPU adapters' variants too (DX12's WARP is one).
    for ctx in [gpu_kernels_ctx(true), gpu_kernels_ctx(false), ctx()] {
        check_kernels_translate(&ctx);
    }
}

fn check_kernels_translate(ctx: &Arc<GpuContext>) {
    for golden in [Golden::realistic("facts-gpt2"), Golden::realistic("tiny-llama-tok")] {
        let (mut model, tok) = load_folder_on(ctx.clone(), golden.folder);
        let hp = golden.hparams(&model);
        let covs = pollster::block_on(collect(&model, &tok, hp.layers.clone(), golden.max_len()).covariances(&model)).unwrap();
        let requests = golden.requests();
        pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &golden.templates(), &covs, &mut |_| {})).unwrap();
        predictions(&model, &tok, &[requests[0].prompt.replace("{}", &requests[0].subject)]);
    }
    for folder in ["tiny-gptj", "tiny-gpt-neox"] {
        let model = load_hf_dir(ctx.clone(), &fixtures().join(folder), LoadOptions::default()).unwrap().model;
        pollster::block_on(model.last_token_logits(&[vec![1, 2, 3, 4, 5], vec![6, 7]])).unwrap();
    }
    // These systems are narrow enough for the host's float64 solve; a
    // GPT-J-wide one takes the GPU's (two 64-wide panels here).
    let (d, n) = (80, 120);
    let keys: Vec<f32> = (0..n * d).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let a = ctx.solver_matrix(d, d).unwrap();
    ctx.add_gram_lower(&a, &ctx.upload(&[n, d], &keys, DType::F32).unwrap(), 1.0).unwrap();
    let factor = pollster::block_on(ctx.factor_spd_checked(a, 1.0)).unwrap();
    let x = ctx.solve_factored(&factor, &ctx.upload(&[d, 1], &vec![1.0; d], DType::F32).unwrap()).unwrap();
    assert!(pollster::block_on(ctx.read(&x)).unwrap().iter().all(|v| v.is_finite()));
    let kernels = ctx.compiled_kernels().unwrap();
    let families: std::collections::BTreeSet<&str> = kernels.iter().map(|(name, _)| name.split("::").next().unwrap()).collect();
    for family in ["matmul", "norm", "attention", "activation", "softmax", "target", "solve", "embedding", "elementwise"] {
        assert!(families.contains(family), "no {family} kernel ran: {families:?}");
    }
    let subgroup_kernels = kernels.iter().filter(|(_, source)| source.contains("subgroupAdd")).count();
    assert_eq!(subgroup_kernels > 0, ctx.subgroup_reductions(), "{subgroup_kernels} kernels reduce within subgroups");
    let msl = naga::back::msl::Options { lang_version: (2, 4), ..Default::default() };
    let hlsl = naga::back::hlsl::Options { shader_model: naga::back::hlsl::ShaderModel::V6_2, fake_missing_bindings: true, ..Default::default() };
    for (name, source) in &kernels {
        let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
        let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
        let (metal, _) = naga::back::msl::write_string(&module, &info, &msl, &naga::back::msl::PipelineOptions::default()).unwrap_or_else(|e| panic!("{name} to MSL: {e}"));
        let mut dx12 = String::new();
        naga::back::hlsl::Writer::new(&mut dx12, &hlsl, &Default::default()).write(&module, &info, None).unwrap_or_else(|e| panic!("{name} to HLSL: {e}"));
        assert!(metal.contains("kernel void") && dx12.contains("[numthreads("), "{name}: no compute entry point written");
    }
    eprintln!("{} kernels translated to MSL and HLSL: {}", kernels.len(), kernels.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", "));
}

/// A target whose token prefix ends inside a character (an emoji's byte
/// tokens decode to U+FFFD) is optimised on its own tokens after the
/// prompt. Decoded and re-encoded, as MEMIT builds the rows, the prefix
/// became U+FFFD's tokens: the loss read rows that held other tokens, or,
/// with more rows, the edit was refused at the model's last block with
/// advice to end the prompt with the subject.
#[test]
fn a_target_that_splits_a_character_is_optimised_on_its_own_tokens() {
    let (model, tok) = load();
    let hp = Hparams::for_model(&model.config).with_overrides(&serde_json::json!({"layers": [3], "v_num_grad_steps": 6, "v_loss_threshold": 0.0})).unwrap();
    let ids = tok.encode(" 🎉").unwrap();
    assert!(ids.len() > 1 && tok.decode(&ids[..ids.len() - 1]).unwrap().contains('\u{FFFD}'), "the case at hand: {ids:?}");
    let request = EditRequest { case_id: None, prompt: "{}".into(), subject: "Danielle Darrieux".into(), target_new: TargetText { text: "🎉".into() }, target_true: None };
    let targets = target_vectors(&model, &tok, &[request], &["{}".to_string()], &hp, TargetOptions::default());
    // Step 0 (δ = 0): the NLL of the emoji's tokens after the prompt's.
    let prompt = tok.encode("Danielle Darrieux").unwrap();
    let prefixes: Vec<Vec<u32>> = (0..ids.len()).map(|j| [prompt.clone(), ids[..j].to_vec()].concat()).collect();
    let logits = pollster::block_on(model.last_token_logits(&prefixes)).unwrap();
    let nll = ids.iter().zip(&logits).map(|(&id, l)| {
        let max = l.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
        let log_sum = l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
        log_sum - l[id as usize] as f64
    }).sum::<f64>() / ids.len() as f64;
    let (first, last) = (targets[0].losses.first().unwrap(), targets[0].losses.last().unwrap());
    assert!((first.nll as f64 - nll).abs() < 1e-3 * nll.max(1.0), "the first step's NLL {} is not that of the emoji's tokens after the prompt, {nll}", first.nll);
    assert!(last.total() < first.total(), "the loss over the emoji's tokens went from {} to {}", first.total(), last.total());
}

#[test]
fn batched_target_vectors_equal_one_request_at_a_time() {
    // Each request keeps its own δ, Adam state, clamp, KL reference and
    // stopping step, so optimising them together changes nothing but the
    // order of float sums. A loss threshold most requests cross at
    // different steps checks that each freezes where it would alone.
    let world = World::open();
    let (model, tok) = world.model();
    let overrides = serde_json::json!({"layers": [1, 2], "v_loss_threshold": 0.6, "v_num_grad_steps": 12});
    let hp = Hparams::for_model(&model.config).with_overrides(&overrides).unwrap();
    let mut requests = world.requests()[..10].to_vec();
    // Multi-token objects and a prompt that goes on after the subject.
    requests[3].target_new.text = "Tokyo Vienna".into();
    requests[7].target_new.text = "Oslo Lima Cairo".into();
    requests[5].prompt = world.templates("job")[0].into();
    let templates = vec!["{}".to_string(), "Everyone knows that {}".to_string()];
    let prepared: Vec<_> = requests.iter().enumerate().map(|(i, r)| r.prepare(i, &tok).unwrap()).collect();
    let (together, cost) = pollster::block_on(compute_target_vectors(&model, &tok, &prepared, &templates, &hp, &TargetOptions::default(), &mut |_, _| {})).unwrap();
    // Requests that stop go no further: the batch goes on without them.
    assert!(cost.regroups >= 1, "no regroup: {cost:?}");
    let own_steps: usize = together.iter().map(|t| t.losses.len()).sum();
    assert!((cost.request_steps as usize) < requests.len() * hp.v_num_grad_steps && cost.request_steps as usize >= own_steps, "{cost:?}, {own_steps} steps needed");
    // Alone: the two multi-token objects, the prompt that goes on after
    // the subject and two plain requests, one optimisation each (a
    // request's δ does not depend on which others share its batch).
    let solo = [0, 3, 5, 7, 9];
    let solo_requests: Vec<EditRequest> = solo.iter().map(|&i| requests[i].clone()).collect();
    let alone = target_vectors(&model, &tok, &solo_requests, &templates, &hp, TargetOptions { max_requests: 1, ..Default::default() });
    // Every row every step (no cached prefix keys) and every request to
    // the batch's last step (no regrouping): the same optimisation.
    let uncached = target_vectors(&model, &tok, &requests, &templates, &hp, TargetOptions { prefix_cache: false, regroup: false, ..Default::default() });
    for (i, (a, b)) in together.iter().zip(&uncached).enumerate() {
        assert_eq!(a.losses.len(), b.losses.len(), "request {i} stops at the same step without the prefix cache and regrouping");
        assert_close(&a.target_init, &b.target_init, 1e-6, &format!("target_init of request {i} without the prefix cache and regrouping"));
        assert_close(&a.z, &b.z, 1e-4, &format!("z of request {i} without the prefix cache and regrouping"));
    }
    let stops: std::collections::BTreeSet<usize> = together.iter().map(|t| t.losses.len()).collect();
    assert!(stops.len() >= 3, "requests should stop at different steps: {stops:?}");
    eprintln!("steps run per request: {:?}", together.iter().map(|t| t.losses.len()).collect::<Vec<_>>());
    for (i, a) in together.iter().enumerate() {
        // Stopped at the first step whose loss fell below the threshold, or at the last.
        let (last, before) = a.losses.split_last().unwrap();
        assert!(before.iter().all(|l| l.total() >= hp.v_loss_threshold), "request {i} ran past a loss below the threshold");
        assert!(last.total() < hp.v_loss_threshold || a.losses.len() == hp.v_num_grad_steps, "request {i} stopped early");
    }
    let solo_stops: std::collections::BTreeSet<usize> = solo.iter().map(|&i| together[i].losses.len()).collect();
    assert!(solo_stops.len() >= 2, "the requests optimised alone should stop at different steps: {solo_stops:?}");
    for (&i, b) in solo.iter().zip(&alone) {
        let a = &together[i];
        assert_eq!(a.losses.len(), b.losses.len(), "request {i} stops at the same step");
        assert_close(&a.target_init, &b.target_init, 1e-6, &format!("target_init of request {i}"));
        assert_close(&a.z, &b.z, 1e-4, &format!("z of request {i}"));
        for (s, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
            assert!((x.total() - y.total()).abs() <= 1e-4 * y.total().abs().max(1.0), "request {i} step {s}: loss {} vs {}", x.total(), y.total());
        }
    }
}

#[test]
fn full_edit_matches_torch() {
    check_full_edit(&Golden::open(), true);
}

/// Subjects inside the prompts, multi-token targets, GPT-2's λ at three
/// layers: z, every layer's residual and ΔW, and the edited predictions
/// as the PyTorch MEMIT computes them. With the small corpus's statistics
/// λ = 20000 keeps these edits from taking, in both implementations.
#[test]
fn realistic_edit_matches_torch() {
    check_realistic_edit(&Golden::realistic("facts-gpt2"));
}

/// The same realistic scenario on a Llama layout (RMSNorm, rotary
/// attention with grouped key/value heads, gated SiLU MLP whose
/// down-projection input is the key, untied unembedding): the random tiny
/// Llama of tests/fixtures/make_tiny_llama_tok.py with its own byte-level
/// BPE tokenizer, run through the same PyTorch MEMIT
/// (make_memit_golden.py --scenario realistic --model tests/fixtures/tiny-llama-tok).
/// Its covariance statistics from the corpus are checked too, since
/// Llama's keys (silu(gate) ⊙ up) take another path than GPT-2's.
#[test]
fn realistic_llama_edit_matches_torch() {
    let golden = Golden::realistic("tiny-llama-tok");
    let (model, tok) = load_folder(golden.folder);
    assert_eq!(model.config.arch, memit_models::Arch::Llama);
    assert!(model.config.n_kv_heads < model.config.n_heads && !model.config.tie_word_embeddings, "grouped key/value heads, untied unembedding");
    let mut acc = collect(&model, &tok, golden.hparams(&model).layers, golden.max_len());
    assert_eq!(acc.n_tokens, golden.json["n_tokens"].as_u64().unwrap());
    for c in pollster::block_on(acc.covariances(&model)).unwrap() {
        let rel = assert_close(&c.matrix, &golden.tensor(&format!("layer.{}.mom2", c.layer)), 1e-5, &format!("C of layer {}", c.layer));
        eprintln!("{}: C of layer {}: max error {rel:.2e} of max |C|", golden.folder, c.layer);
    }
    check_realistic_edit(&golden);
}

/// Subjects inside the prompts and targets of more than one token, then
/// the full edit as the golden records it.
fn check_realistic_edit(golden: &Golden) {
    let tok = TextTokenizer::from_file(&fixtures().join(golden.folder).join("tokenizer.json")).unwrap();
    let requests = golden.requests();
    assert!(requests.iter().all(|r| !r.prompt.starts_with("{}")), "subjects inside the prompts");
    assert!(requests.iter().all(|r| r.prepare(0, &tok).unwrap().target_ids.len() > 1), "targets of more than one token");
    check_full_edit(golden, false);
}

/// Edits the golden's model as `golden` records and compares every layer's
/// residual and ΔW and the edited predictions; `taken`: the golden's edits
/// make each new object the prediction.
fn check_full_edit(golden: &Golden, taken: bool) {
    let (mut model, tok) = load_folder(golden.folder);
    let hp = golden.hparams(&model);
    let covs = golden_covariances(golden, &hp.layers);
    let requests = golden.requests();
    let outcome = pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &golden.templates(), &covs, &mut |_| {})).unwrap();
    let mut errors = Vec::new();
    for (i, target) in outcome.targets.iter().enumerate() {
        errors.push((format!("z{i}"), assert_close(&target.z, &golden.tensor(&format!("request.{i}.z")), 2e-3, &format!("z of request {i}"))));
    }
    let (d, d_ff) = (model.config.d_model, model.config.d_ff);
    assert_eq!(outcome.updates.iter().map(|u| u.layer).collect::<Vec<_>>(), hp.layers);
    for update in &outcome.updates {
        let n = update.resid.len() / d;
        let mut delta = vec![0.0f32; d * d_ff];
        for r in 0..n {
            for o in 0..d {
                for i in 0..d_ff {
                    delta[o * d_ff + i] += update.resid[r * d + o] * update.x[r * d_ff + i];
                }
            }
        }
        errors.push((format!("resid{}", update.layer), assert_close(&update.resid, &golden.tensor(&format!("layer.{}.resid", update.layer)), 2e-3, "residual")));
        errors.push((format!("ΔW{}", update.layer), assert_close(&delta, &golden.tensor(&format!("layer.{}.delta", update.layer)), 3e-3, &format!("ΔW of layer {}", update.layer))));
    }
    eprintln!("{}: max error / max |golden| {}", golden.folder, errors.iter().map(|(what, rel)| format!("{what} {rel:.2e}")).collect::<Vec<_>>().join(", "));
    let want_logits = golden.tensor("edited.last_logits");
    let vocab = model.config.vocab_size;
    for (i, req) in requests.iter().enumerate() {
        let ids = tok.encode(&req.prompt.replace("{}", &req.subject)).unwrap();
        let logits = pollster::block_on(model.last_token_logits(&[ids])).unwrap().remove(0);
        let want = &want_logits[i * vocab..][..vocab];
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = logits.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{}: edited logits for {:?}: max error {:.2e} of max |logit|", golden.folder, req.subject, err / scale);
        assert_eq!(argmax(&logits), argmax(want), "edited prediction for {:?}", req.subject);
        if taken {
            let target = tok.encode(&format!(" {}", req.target_new.text)).unwrap()[0];
            assert_eq!(argmax(&logits), target, "the edit makes {:?} the prediction", req.target_new.text);
        }
    }
}

/// The world model (tests/fixtures/make_world_model.py): 300 invented
/// people, five single-token attributes each, every fact taught through
/// four templates.
struct World {
    dir: PathBuf,
    facts: serde_json::Value,
}

impl World {
    fn open() -> World {
        let dir = fixtures().join("world-gpt2");
        let facts = serde_json::from_str(&std::fs::read_to_string(dir.join("facts.json")).unwrap()).unwrap();
        World { dir, facts }
    }

    fn people(&self) -> &[serde_json::Value] {
        self.facts["people"].as_array().unwrap()
    }

    fn relations(&self) -> Vec<&str> {
        self.facts["relations"].as_object().unwrap().keys().map(String::as_str).collect()
    }

    fn templates(&self, relation: &str) -> Vec<&str> {
        self.facts["relations"][relation]["templates"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect()
    }

    fn objects(&self, relation: &str) -> Vec<&str> {
        self.facts["relations"][relation]["objects"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect()
    }

    /// Each of `people`'s facts in the relations `keep` accepts, as its
    /// relation's first template and the expected word.
    fn facts_of(&self, people: &[serde_json::Value], keep: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        people
            .iter()
            .flat_map(|p| {
                let subject = p["subject"].as_str().unwrap();
                self.relations().into_iter().filter(|&rel| keep(rel)).map(move |rel| (self.templates(rel)[0].replace("{}", subject), p[rel].as_str().unwrap().to_string()))
            })
            .collect()
    }

    /// The 50 edits: the first 50 people move to another city, each stated
    /// through the first city template.
    fn requests(&self) -> Vec<EditRequest> {
        self.edits(0..50, &["city"]).into_iter().map(|e| e.request).collect()
    }

    /// For each relation in turn, each person in `people` gets another
    /// object (the i-th person of the range moves i % (objects − 1) + 1
    /// places along the relation's list), stated through the relation's
    /// first template; its other templates are the paraphrases.
    fn edits(&self, people: std::ops::Range<usize>, relations: &[&str]) -> Vec<WorldEdit> {
        let mut out = Vec::new();
        for &relation in relations {
            let objects = self.objects(relation);
            let templates = self.templates(relation);
            for (i, person) in self.people()[people.clone()].iter().enumerate() {
                let old = objects.iter().position(|&o| o == person[relation]).unwrap();
                let new = objects[(old + 1 + i % (objects.len() - 1)) % objects.len()];
                let subject = person["subject"].as_str().unwrap();
                out.push(WorldEdit {
                    request: EditRequest {
                        case_id: Some(out.len() as u64),
                        prompt: templates[0].into(),
                        subject: subject.into(),
                        target_new: TargetText { text: new.into() },
                        target_true: None,
                    },
                    paraphrases: templates[1..].iter().map(|t| t.replace("{}", subject)).collect(),
                });
            }
        }
        out
    }

    /// The world model and its tokenizer, on the shared context.
    fn model(&self) -> (Model, TextTokenizer) {
        let loaded = load_hf_dir(ctx(), &self.dir, LoadOptions::default()).unwrap();
        (loaded.model, loaded.tokenizer.expect("the world model ships a tokenizer"))
    }

    /// The world model's hparams (tests/fixtures/world-gpt2/memit-hparams.json).
    fn hparams(&self, config: &memit_models::ModelConfig) -> Hparams {
        let overrides: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(self.dir.join("memit-hparams.json")).unwrap()).unwrap();
        Hparams::for_model(config).with_overrides(&overrides).unwrap()
    }

    /// Statistics of the unedited model over its own training text (its
    /// "Wikipedia") at the layers of `hp`: collected once per test binary
    /// (every world test edits the same layers of the same model) and
    /// copied to each caller.
    fn covariances(&self, model: &Model, tok: &TextTokenizer, hp: &Hparams) -> Vec<LayerCovariance> {
        static COLLECTED: Mutex<Vec<(Vec<usize>, Vec<LayerCovariance>)>> = Mutex::new(Vec::new());
        let mut collected = COLLECTED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, covs)) = collected.iter().find(|(layers, _)| *layers == hp.layers) {
            return covs.clone();
        }
        let train: Vec<String> = std::fs::read_to_string(self.dir.join("train.txt")).unwrap().lines().map(String::from).collect();
        let stats_id = StatsIdentity { model_id: "world-gpt2".into(), corpus_id: "train.txt".into(), layers: hp.layers.clone(), max_len: 64 };
        let mut acc = StatsAccumulator::new(model, stats_id).unwrap();
        for batch in train.chunks(64) {
            acc.add_texts(model, tok, batch).unwrap();
        }
        let covs = pollster::block_on(acc.covariances(model)).unwrap();
        collected.push((hp.layers.clone(), covs.clone()));
        covs
    }
}

/// One world edit and the paraphrases of its prompt.
struct WorldEdit {
    request: EditRequest,
    paraphrases: Vec<String>,
}

/// Top-1 token after each prompt, in batches.
fn predictions(model: &Model, tok: &TextTokenizer, prompts: &[String]) -> Vec<u32> {
    let mut out = Vec::new();
    for chunk in prompts.chunks(64) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|p| tok.encode(p).unwrap()).collect();
        out.extend(pollster::block_on(model.last_token_logits(&ids)).unwrap().iter().map(|l| argmax(l)));
    }
    out
}

/// How many prompts the model completes with each expected word.
fn agreeing(model: &Model, tok: &TextTokenizer, cases: &[(String, String)]) -> usize {
    let prompts: Vec<String> = cases.iter().map(|(p, _)| p.clone()).collect();
    let got = predictions(model, tok, &prompts);
    cases.iter().zip(got).filter(|((_, word), top)| tok.encode(&format!(" {word}")).unwrap()[0] == *top).count()
}

#[test]
fn fifty_edits_take_generalise_and_leave_other_facts_alone() {
    let world = World::open();
    let (mut model, tok) = world.model();
    let requests = world.requests();
    let efficacy: Vec<(String, String)> = requests.iter().map(|r| (r.prompt.replace("{}", &r.subject), r.target_new.text.clone())).collect();
    let paraphrases: Vec<(String, String)> = requests
        .iter()
        .flat_map(|r| world.templates("city")[1..].iter().map(|t| (t.replace("{}", &r.subject), r.target_new.text.clone())).collect::<Vec<_>>())
        .collect();
    // Unrelated: every fact of the 250 people not edited.
    let unrelated = world.facts_of(&world.people()[50..], |_| true);
    // Reported, not asserted: the edited people's other attributes.
    let same_people = world.facts_of(&world.people()[..50], |rel| rel != "city");
    let known_before = agreeing(&model, &tok, &unrelated);
    assert!(known_before as f64 >= 0.99 * unrelated.len() as f64, "the world model recalls only {known_before}/{} facts", unrelated.len());
    assert_eq!(agreeing(&model, &tok, &efficacy), 0, "a new city was already the prediction");

    let hp = world.hparams(&model.config);
    let covs = world.covariances(&model, &tok, &hp);
    let outcome = pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &["{}".to_string()], &covs, &mut |_| {})).unwrap();
    let shifts: Vec<(f32, usize, f64)> = outcome.updates.iter().map(|u| (u.solve_shift, u.solve_refinements, u.solve_correction)).collect();

    let took = agreeing(&model, &tok, &efficacy);
    let generalised = agreeing(&model, &tok, &paraphrases);
    let kept = agreeing(&model, &tok, &unrelated);
    let same_kept = agreeing(&model, &tok, &same_people);
    eprintln!(
        "edits that took: {took}/50; paraphrases: {generalised}/{}; unrelated facts kept: {kept}/{known_before}; the edited people's other facts kept: {same_kept}/{}; solve shifts {shifts:?}",
        paraphrases.len(),
        same_people.len()
    );
    // The PyTorch MEMIT of make_memit_golden.py on the same edits,
    // statistics and hparams (tests/fixtures/world_edits_reference.py):
    // 50/50 took, 148/150 paraphrases, 1245/1250 unrelated facts kept (KL(p ‖ p_init), as the authors compute it).
    assert_eq!(took, 50, "only {took}/50 edits made the new city the prediction");
    assert!(generalised as f64 >= 0.9 * paraphrases.len() as f64, "only {generalised}/{} paraphrases follow the edits", paraphrases.len());
    assert!(kept as f64 >= 0.98 * known_before as f64, "only {kept}/{known_before} unrelated facts kept");
}

/// Mass editing: 1,000 facts at once (every attribute of the first 200
/// people), against the same run of the PyTorch MEMIT
/// (tests/fixtures/world_edits_reference.py --people 200 --relations all).
#[test]
fn a_thousand_edits_at_once_take_generalise_and_leave_other_people_alone() {
    let world = World::open();
    let (mut model, tok) = world.model();
    let edits = world.edits(0..200, &world.relations());
    assert_eq!(edits.len(), 1000);
    let requests: Vec<EditRequest> = edits.iter().map(|e| e.request.clone()).collect();
    let efficacy: Vec<(String, String)> = requests.iter().map(|r| (r.prompt.replace("{}", &r.subject), r.target_new.text.clone())).collect();
    let paraphrases: Vec<(String, String)> = edits.iter().flat_map(|e| e.paraphrases.iter().map(|p| (p.clone(), e.request.target_new.text.clone()))).collect();
    let unrelated = world.facts_of(&world.people()[200..], |_| true);
    let known_before = agreeing(&model, &tok, &unrelated);
    assert_eq!(agreeing(&model, &tok, &efficacy), 0, "a new object was already the prediction");

    let hp = world.hparams(&model.config);
    let covs = world.covariances(&model, &tok, &hp);
    let start = std::time::Instant::now();
    let outcome = pollster::block_on(apply_memit(&mut model, &tok, &requests, &hp, &["{}".to_string()], &covs, &mut |_| {})).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let took = agreeing(&model, &tok, &efficacy);
    let generalised = agreeing(&model, &tok, &paraphrases);
    let kept = agreeing(&model, &tok, &unrelated);
    let solves: Vec<(f32, usize, f64)> = outcome.updates.iter().map(|u| (u.solve_shift, u.solve_refinements, u.solve_correction)).collect();
    eprintln!(
        "1000 edits in {seconds:.1} s: took {took}/1000; paraphrases {generalised}/{}; other people's facts kept {kept}/{known_before}; solves {solves:?}",
        paraphrases.len()
    );
    // The PyTorch MEMIT on the same edits, statistics and hparams took
    // 316/1000, generalised 326/3000 and kept 97/500 (this code: 309, 330,
    // 104 on lavapipe). A thousand facts in two 512-wide MLPs of a
    // 128-wide model is past what MEMIT can write without interference at
    // λ = 100 (λ = 1000 keeps 326/500 but takes 196/1000); the test pins
    // that this code does what the reference does at that scale, within a
    // few percent.
    let near = |got: usize, reference: usize, slack: usize, what: &str| {
        assert!(got.abs_diff(reference) <= slack, "{what}: {got}, the PyTorch MEMIT {reference} (±{slack})");
    };
    near(took, 316, 40, "edits that took of 1000");
    near(generalised, 326, 100, "paraphrases of 3000");
    near(kept, 97, 30, "other people's facts kept of 500");
    // Far above chance (about one in nine objects per relation).
    assert!(took >= 250, "only {took}/1000 edits took");
}

#[test]
fn an_edit_through_streamed_blocks_equals_the_resident_one() {
    // The world model's blocks above the edited layers (3, 4 and 5) stay in
    // the checkpoint and go up at every target-vector step, forward and
    // backward (block 3's backward follows two other uploads, so it goes
    // up again): the edit reads the weights the resident model holds.
    let world = World::open();
    let (mut resident, tok) = world.model();
    let mut streamed = load_hf_dir(resident.ctx.clone(), &world.dir, LoadOptions { streamed_blocks: 3, ..Default::default() }).unwrap().model;
    assert_eq!(streamed.first_streamed_layer(), Some(3));
    let hp = world.hparams(&resident.config).with_overrides(&serde_json::json!({"v_num_grad_steps": 8})).unwrap();
    let requests = world.requests()[..4].to_vec();
    let templates = vec!["{}".to_string()];
    let covs = world.covariances(&resident, &tok, &hp);
    let edit = |model: &mut Model| pollster::block_on(apply_memit(model, &tok, &requests, &hp, &templates, &covs, &mut |_| {})).unwrap();
    let (a, b) = (edit(&mut resident), edit(&mut streamed));
    for (ua, ub) in a.updates.iter().zip(&b.updates) {
        assert_close(&ub.resid, &ua.resid, 1e-5, &format!("residual of layer {}", ua.layer));
        let weights = |m: &Model| pollster::block_on(m.ctx.read(&m.blocks[ua.layer].mlp_out.weight)).unwrap();
        assert_close(&weights(&streamed), &weights(&resident), 1e-6, &format!("edited W_out of layer {}", ua.layer));
    }
    // A streamed layer cannot be edited: refused before any work.
    let high = hp.with_overrides(&serde_json::json!({"layers": [2, 3]})).unwrap();
    let err = pollster::block_on(compute_targets(&streamed, &tok, &requests, &high, &templates, &mut |_| {})).expect_err("layer 3 is streamed").to_string();
    assert!(err.contains("layer 3 is edited but streamed") && err.contains("at most 2 blocks"), "{err}");
}

#[test]
fn target_steps_allocate_nothing_and_wait_rarely() {
    // The machine-independent costs of a batched optimisation step: after
    // a batch's first step no buffer is created, the host waits for the GPU
    // at most once per step, reads back no vocabulary-sized rows, and the
    // dispatches of a step do not grow with the number of requests. Its own
    // context, so no other test's work is counted.
    let world = World::open();
    let ctx = pollster::block_on(GpuContext::from_env()).unwrap();
    let loaded = load_hf_dir(ctx, &world.dir, LoadOptions::default()).unwrap();
    let (model, tok) = (loaded.model, loaded.tokenizer.unwrap());
    let templates = vec!["{}".to_string(), "Everyone knows that {}".to_string()];
    let steps = 13;
    let overrides = serde_json::json!({"layers": [1, 2], "v_num_grad_steps": steps, "v_loss_threshold": 0.0});
    let hp = Hparams::for_model(&model.config).with_overrides(&overrides).unwrap();
    let cost = |n: usize| {
        let prepared: Vec<_> = world.requests()[..n].iter().enumerate().map(|(i, r)| r.prepare(i, &tok).unwrap()).collect();
        let (targets, cost) = pollster::block_on(compute_target_vectors(&model, &tok, &prepared, &templates, &hp, &TargetOptions::default(), &mut |_, _| {})).unwrap();
        assert!(targets.iter().all(|t| t.losses.len() == steps) && cost.steps == steps as u64);
        cost.after_first_step
    };
    let (one, eight) = (cost(1), cost(8));
    eprintln!("12 steps after the first, 1 request: {one:?}\n12 steps after the first, 8 requests: {eight:?}");
    for c in [one, eight] {
        assert_eq!(c.buffers_created, 0, "steps after the first created buffers: {c:?}");
        assert!(c.host_waits <= steps as u64 - 1, "{c:?}");
        assert!(c.bytes_from_device < 4 * model.config.vocab_size as u64, "{c:?}");
    }
    assert_eq!(one.dispatches, eight.dispatches, "dispatches grow with the number of requests");
}

/// Eigenvalues (ascending) and eigenvectors (column k of the row-major
/// result) of a symmetric matrix, by cyclic Jacobi rotations in f64.
fn jacobi_eigen(matrix: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a: Vec<f64> = matrix.iter().map(|&v| v as f64).collect();
    let mut v = vec![0.0; d * d];
    (0..d).for_each(|i| v[i * d + i] = 1.0);
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..50 {
        let off: f64 = (0..d).flat_map(|i| (0..d).filter(move |&j| j != i).map(move |j| (i, j))).map(|(i, j)| a[i * d + j].powi(2)).sum();
        if off <= 1e-26 * total {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&i, &j| a[i * d + i].total_cmp(&a[j * d + j]));
    let values = order.iter().map(|&k| a[k * d + k]).collect();
    let mut vectors = vec![0.0; d * d];
    for (col, &k) in order.iter().enumerate() {
        for i in 0..d {
            vectors[i * d + col] = v[i * d + k];
        }
    }
    (values, vectors)
}

/// AlphaEdit's projector on the world model's real statistics, against a
/// float64 Jacobi eigendecomposition of the same covariance: every
/// eigenvector outside the threshold's band is kept or removed as its
/// eigenvalue says.
#[test]
fn null_space_projector_of_real_statistics_matches_a_float64_eigendecomposition() {
    let world = World::open();
    let (model, tok) = world.model();
    let hp = world.hparams(&model.config);
    let cov = world.covariances(&model, &tok, &hp).remove(1);
    let d = model.config.d_ff;
    let tau = hp.nullspace_threshold as f64;
    let (values, vectors) = jacobi_eigen(&cov.matrix, d);
    let projector = pollster::block_on(null_space_projector(&model.ctx, &cov, hp.nullspace_threshold)).unwrap();
    let below = values.iter().filter(|&&v| v < tau).count();
    let near = values.iter().filter(|&&v| (v - tau).abs() < 1e-2 * tau).count();
    eprintln!(
        "layer {}: eigenvalues {:.3e} .. {:.3e}, {below} of {d} under τ = {tau:e} ({near} within 1% of it); trace(P) {:.3} after {} steps",
        cov.layer,
        values[0],
        values[d - 1],
        projector.dimension,
        projector.steps
    );
    let mut worst: f64 = 0.0;
    for k in 0..d {
        if (values[k] - tau).abs() < 1e-2 * tau {
            continue;
        }
        let u: Vec<f64> = (0..d).map(|i| vectors[i * d + k]).collect();
        let want = if values[k] < tau { 1.0 } else { 0.0 };
        // ‖P·u − [λ < τ]·u‖
        let err = (0..d).map(|i| ((0..d).map(|j| projector.matrix[i * d + j] as f64 * u[j]).sum::<f64>() - want * u[i]).powi(2)).sum::<f64>().sqrt();
        worst = worst.max(err);
    }
    eprintln!("worst ‖P·u − [λ < τ]·u‖ over eigenvectors outside the band: {worst:.2e}");
    assert!(worst < 1e-3, "P misplaces an eigenvector by {worst:e}");
    assert!((projector.dimension - below as f64).abs() <= near as f64 + 1e-2, "trace(P) {} for {below} eigenvalues under τ", projector.dimension);
}

/// Sequential editing: 60 edits of the world model in chunks of 20 by each
/// method, facts of the 240 people not edited checked after every chunk.
#[test]
fn sequential_methods_edit_chunk_after_chunk() {
    let world = World::open();
    let (base, tok) = world.model();
    let hp = world.hparams(&base.config);
    let covs = world.covariances(&base, &tok, &hp);
    let edits = world.edits(0..60, &["city"]);
    let unrelated = world.facts_of(&world.people()[60..], |_| true);
    let known_before = agreeing(&base, &tok, &unrelated);
    let mut first_chunk = Vec::new();
    for method in EditMethod::ALL {
        let mut model = base.clone();
        let mut state = pollster::block_on(EditState::new(&model.ctx, method, &hp, &covs, &mut |_| {})).unwrap();
        let mut line = Vec::new();
        for (i, chunk) in edits.chunks(20).enumerate() {
            let requests: Vec<EditRequest> = chunk.iter().map(|e| e.request.clone()).collect();
            let outcome = pollster::block_on(apply_edit(&mut model, &tok, &requests, &hp, &["{}".to_string()], &covs, &mut state, &TargetOptions::default(), &mut |_| {})).unwrap();
            if i == 0 {
                first_chunk.push(outcome.updates);
            }
            let so_far: Vec<(String, String)> = edits[..(i + 1) * 20].iter().map(|e| (e.request.prompt.replace("{}", &e.request.subject), e.request.target_new.text.clone())).collect();
            let latest = &so_far[i * 20..];
            line.push((agreeing(&model, &tok, &so_far), agreeing(&model, &tok, latest), agreeing(&model, &tok, &unrelated)));
        }
        assert_eq!(state.edits(), 60);
        eprintln!("{}: after each chunk (edits so far that hold, of the latest 20, unrelated kept of {known_before}): {line:?}; null space {:?}", method.name(), state.null_space_dimensions());
        for (chunk, &(_, latest, _)) in line.iter().enumerate() {
            assert!(latest >= 16, "{}: only {latest}/20 edits of chunk {chunk} took", method.name());
        }
    }
    // Before any edit is remembered, memit-seq is MEMIT.
    for (a, b) in first_chunk[0].iter().zip(&first_chunk[1]) {
        let diff = a.x.iter().zip(&b.x).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6 * a.x.iter().fold(0.0f32, |m, v| m.max(v.abs())), "layer {}: memit-seq's first chunk differs from MEMIT's by {diff}", a.layer);
    }
}
