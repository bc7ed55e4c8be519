"""memit-wgpu's MEMIT beside an independent PyTorch MEMIT on a Llama-style
model (SmolLM2-135M-Instruct from its GGUF), for the same CounterFact cases,
statistics, hyperparameters and context templates (issue 15, item 6).

The PyTorch side is the reference math of tests/fixtures/make_memit_golden.py
(target vectors with KL(p_current ‖ p_init), the norm clamp and early stop;
keys; float64 solve of (λC + KKᵀ) X = Kᵀ; the residual spread over the
remaining layers, each layer's update applied before the next layer's keys),
loaded through tests/bench/torch_memit.py (transformers' GGUF loader, the
tokenizer as memit-wgpu rebuilds it). It reads C from memit-wgpu's own
statistics cache, so both sides solve against the same bytes, and the
hyperparameters from the patch memit-wgpu wrote. Both edits are scored by
one scorer that follows crates/memit-eval exactly (teacher-forced mean NLL
of " " + target after the prompt, tokenised apart; ES: NLL(new) < NLL(true)
on the rewrite prompt, EM: mean P(new) − P(true), P = exp(−NLL); PS/PM on
the paraphrases, NS/NM: P(true) beats P(new) on the neighbourhood prompts;
S the harmonic mean of ES, PS, NS). memit-wgpu's own `eval` report can be
passed too, to show its scores as it computes them on its GPU backend.

Beyond the scores it reports, per edited layer, the relative difference
‖ΔW_ours − ΔW_torch‖_F / ‖ΔW_torch‖_F and the cosine of the two updates;
the same for the patch's factors (resid = (Z − cur_z)/(|R| − i), and
X = (λC + KKᵀ)⁻¹Kᵀ); each request's target vector recovered from the patch
(Z = |R|·resid_first + cur_z of the unedited model) against PyTorch's; and
a hybrid — PyTorch's layer loop run from memit-wgpu's Z — which separates
the target-vector optimisation from keys, solve and spreading.

Only plain templates ("{}") are supported: generated templates come from
each side's own sampler and cannot be made equal.

Typical use (the CLI runs on lavapipe here, ~15 min for 10 edits):

    B=target/release/memit-wgpu; M=target/models/SmolLM2-135M-Instruct.Q4_1.gguf
    python tests/bench/compare_smollm2.py --model $M --n 10 \\
        --corpus tests/fixtures/wikitext-valid-80.txt --n-texts 80 --max-len 128 \\
        --cli $B --cli-eval --out target/compare-smollm2

With --cli the script runs `memit-wgpu stats`, `edit --templates plain`
and (with --cli-eval) `eval --templates plain --gen-tokens 0` itself,
reusing their outputs under --out when they are already there. Without it,
pass --stats, --patch (and optionally --ours-edit, --ours-eval) made by
hand with the same settings. Writes OUT/report.json and OUT/report.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from safetensors import safe_open

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "fixtures"))
import make_memit_golden as ref  # noqa: E402
import torch_memit  # noqa: E402

torch.set_grad_enabled(False)
LAVAPIPE = {"VK_ICD_FILENAMES": "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json", "XDG_RUNTIME_DIR": "/tmp"}


# ---------------------------------------------------------------- inputs


def load_cases(path, offset, n):
    cases = json.load(open(path))[offset:offset + n]
    requests = []
    for c in cases:
        r = c["requested_rewrite"]
        requests.append({"case_id": c["case_id"], "prompt": r["prompt"], "subject": r["subject"],
                         "target_new": r["target_new"], "target_true": r["target_true"]})
    return cases, requests


def corpus_texts(path, n_texts):
    """The texts memit-wgpu's `stats` reads (crates/memit-cli/src/session.rs
    `read_corpus`): trimmed non-empty lines, all of them in order when
    n_texts covers the corpus (a smaller sample is seeded there and not
    reproduced here)."""
    texts = [l.strip() for l in open(path, encoding="utf-8") if l.strip()]
    return texts if n_texts >= len(texts) else None


def read_stats(path):
    """memit-wgpu's statistics cache: safetensors with `layer.{l}.mom2`
    (float32 [d_ff, d_ff]) and metadata."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        covs = {int(k.split(".")[1]): f.get_tensor(k) for k in f.keys() if k.endswith(".mom2")}
    return covs, meta


def read_patch(path):
    """memit-wgpu's patch (crates/memit-core/src/patch.rs): per layer the
    factors resid [n, d] and x [n, d_ff], ΔW = residᵀ·x in [d, d_ff]
    (Linear) orientation; the requests and hyperparameters as JSON."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        layers = [int(l) for l in meta["layers"].split(",")]
        factors = {l: (f.get_tensor(f"layer.{l}.resid").double(), f.get_tensor(f"layer.{l}.x").double()) for l in layers}
    return json.loads(meta["hparams"]), json.loads(meta["requests"]), factors, meta


def cli(args, cmd, log):
    """Runs memit-wgpu (on lavapipe unless VK_ICD_FILENAMES is set); returns
    (stdout, wall seconds)."""
    env = dict(os.environ)
    for k, v in LAVAPIPE.items():
        env.setdefault(k, v)
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as err:
        out = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{cmd[1]} failed (exit {out.returncode}); see {log}")
    return out.stdout, seconds


def run_cli(a, requests_path):
    """stats, edit and optionally eval with the CLI, each skipped when its
    output is already under --out. Returns what was run, with wall times."""
    ran = {}
    common = ["--model", a.model, "--corpus", a.corpus, "--n-texts", str(a.n_texts), "--max-len", str(a.max_len),
              "--stats", a.stats]
    if not os.path.exists(a.stats):
        out, s = cli(a, [a.cli, "stats", "--json", "--model", a.model, "--corpus", a.corpus, "--n-texts", str(a.n_texts),
                         "--max-len", str(a.max_len), "--stats", a.stats], os.path.join(a.out, "stats.log"))
        open(os.path.join(a.out, "stats.json"), "w").write(out)
        ran["stats"] = {"wall_s": s}
    if not os.path.exists(a.patch):
        out, s = cli(a, [a.cli, "edit", "--json", *common, "--requests", requests_path, "--templates", "plain",
                         "--patch", a.patch, "--replace-patch"], os.path.join(a.out, "edit.log"))
        open(a.ours_edit, "w").write(out)
        ran["edit"] = {"wall_s": s}
    if a.cli_eval and not os.path.exists(a.ours_eval):
        _, s = cli(a, [a.cli, "eval", "--json", *common, "--dataset", "counterfact", "--data", a.cases,
                       "--n", str(a.n), "--offset", str(a.offset), "--templates", "plain", "--gen-tokens", "0",
                       "--report", a.ours_eval], os.path.join(a.out, "eval.log"))
        ran["eval"] = {"wall_s": s}
    return ran


# ---------------------------------------------------------------- scoring (as crates/memit-eval)


def target_nll(model, tok, prompt, target):
    """Mean over the target's tokens of −log p, teacher forced; prompt and
    " " + target tokenised apart and concatenated, as memit-eval does."""
    p = ref.enc(tok, prompt)
    t = ref.enc(tok, target if target.startswith(" ") else " " + target)
    logits, _, _ = ref.run(model, [p + t])
    lp = torch.log_softmax(logits[0].float(), dim=-1)
    return float(-sum(lp[len(p) - 1 + j, tid] for j, tid in enumerate(t)) / len(t))


def score(model, tok, cases):
    per_case = []
    for c in cases:
        r = c["requested_rewrite"]
        new, true = r["target_new"]["str"], r["target_true"]["str"]
        pair = lambda prompt: (target_nll(model, tok, prompt, new), target_nll(model, tok, prompt, true))  # noqa: E731
        n, o = pair(r["prompt"].replace("{}", r["subject"]))
        para = [pair(p) for p in c.get("paraphrase_prompts", [])]
        neigh = [pair(p) for p in c.get("neighborhood_prompts", [])]
        P = lambda x: float(torch.exp(torch.tensor(-x)))  # noqa: E731
        frac = lambda rs, wins: None if not rs else sum(wins(a, b) for a, b in rs) / len(rs)  # noqa: E731
        mag = lambda rs, sign: None if not rs else sum(sign * (P(a) - P(b)) for a, b in rs) / len(rs)  # noqa: E731
        per_case.append({
            "case_id": c["case_id"], "nll_new": n, "nll_true": o,
            "efficacy": n < o, "efficacy_magnitude": P(n) - P(o),
            "paraphrase": frac(para, lambda a, b: a < b), "paraphrase_magnitude": mag(para, 1.0),
            "neighborhood": frac(neigh, lambda a, b: b < a), "neighborhood_magnitude": mag(neigh, -1.0),
        })
    return per_case, summarize(per_case)


def summarize(per_case):
    mean = lambda xs: 0.0 if not xs else sum(xs) / len(xs)  # noqa: E731
    vals = lambda k: [c[k] for c in per_case if c[k] is not None]  # noqa: E731
    es = 100 * sum(c["efficacy"] for c in per_case) / max(len(per_case), 1)
    s = {"cases": len(per_case), "ES": es, "EM": 100 * mean(vals("efficacy_magnitude")),
         "PS": 100 * mean(vals("paraphrase")), "PM": 100 * mean(vals("paraphrase_magnitude")),
         "NS": 100 * mean(vals("neighborhood")), "NM": 100 * mean(vals("neighborhood_magnitude"))}
    s["S"] = 3 / (1 / s["ES"] + 1 / s["PS"] + 1 / s["NS"]) if min(s["ES"], s["PS"], s["NS"]) > 0 else 0.0
    return s


def eval_report_summary(path):
    """Scores and edit times of a memit-wgpu `eval` report (batch mode):
    {name: summary} and {name: seconds}."""
    report = json.load(open(path))
    keys = {"efficacy_score": "ES", "efficacy_magnitude": "EM", "paraphrase_score": "PS", "paraphrase_magnitude": "PM",
            "neighborhood_score": "NS", "neighborhood_magnitude": "NM", "score": "S"}
    conv = lambda m: {short: m[k] for k, short in keys.items() if k in m}  # noqa: E731
    scores = {"memit-wgpu eval: unedited": conv(report["unedited"])}
    times = {}
    for point in report.get("points", []):
        name = f"memit-wgpu eval: {point['method']}, {point['edits']} edits"
        scores[name] = conv(point["metrics"])
        times[f"{name}, edit"] = point.get("edit_seconds")
        times[f"{name}, scoring"] = point.get("score_seconds")
    return scores, {k: v for k, v in times.items() if v is not None}


# ---------------------------------------------------------------- MEMIT (PyTorch side)


def compare(a, b):
    """Relative Frobenius difference of a against b, cosine, and both norms."""
    a, b = a.double().flatten(), b.double().flatten()
    return {"rel_diff": float((a - b).norm() / b.norm()), "cosine": float(a @ b / (a.norm() * b.norm())),
            "norm_ours": float(a.norm()), "norm_torch": float(b.norm())}


def spread(model, tok, requests, Z, covs, hp):
    """Step 3 of MEMIT from target vectors Z [n, d]: for each layer the keys,
    the residual, the float64 solve and the update (applied before the next
    layer). Returns per layer (resid, X, ΔW) in float64 and the seconds per
    phase; the model keeps the updates."""
    layers, last = hp["layers"], hp["layers"][-1]
    out, phases = {}, {"keys": 0.0, "solve": 0.0, "update": 0.0}
    for i, layer in enumerate(layers):
        t = time.perf_counter()
        K, cur = ref.keys_and_outputs(model, tok, requests, layer, last)  # [n, d_ff], [n, d]
        phases["keys"] += time.perf_counter() - t
        t = time.perf_counter()
        resid = (Z.double() - cur.double()) / (len(layers) - i)
        Kd = K.double()
        A = hp["mom2_update_weight"] * covs[layer].double() + Kd.T @ Kd
        X = torch.linalg.solve(A, Kd.T)  # [d_ff, n]
        delta_w = resid.T @ X.T  # [d, d_ff]
        phases["solve"] += time.perf_counter() - t
        t = time.perf_counter()
        ref.add_delta_w(model, layer, delta_w.float())
        phases["update"] += time.perf_counter() - t
        out[layer] = {"resid": resid, "x": X.T, "delta_w": delta_w, "cur_z": cur.double()}
    return out, phases


def say(*args):
    print(*args, file=sys.stderr, flush=True)


def restore(model, saved):
    for layer, w in saved.items():
        ref.w_out(model, layer).weight.copy_(w)


# ---------------------------------------------------------------- report


def fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(r):
    lines = [f"# memit-wgpu vs PyTorch MEMIT: {os.path.basename(r['model'])}, CounterFact cases "
             f"{r['cases']['offset']}–{r['cases']['offset'] + r['cases']['n'] - 1}", ""]
    lines += [f"Templates: {r['templates']}. Statistics: {r['stats']['n_tokens']} tokens, {r['stats']['corpus']} "
              f"(memit-wgpu's cache, loaded by both sides). Hyperparameters: `{json.dumps(r['hparams'])}`.", ""]
    lines += ["| model | ES | EM | PS | PM | NS | NM | S |", "|---|---|---|---|---|---|---|---|"]
    for name, s in r["scores"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(s.get(k)) for k in ["ES", "EM", "PS", "PM", "NS", "NM", "S"]) + " |")
    lines += ["", f"Per-case outcomes (efficacy, paraphrase, neighbourhood) identical for {r['per_case_agreement']} of "
              f"{r['cases']['n']} cases between the two edits (torch scorer)."]
    lines += ["", "Per edited layer (ours = memit-wgpu's patch; rel. diff = ‖ours − torch‖_F / ‖torch‖_F):", "",
              "| layer | ‖ΔW‖ ours | ‖ΔW‖ torch | ΔW rel. diff | ΔW cosine | resid rel. diff | X rel. diff | hybrid ΔW rel. diff (torch loop from our Z vs ours) |",
              "|---|---|---|---|---|---|---|---|"]
    for l, d in r["layers"].items():
        lines.append(f"| {l} | {d['delta_w']['norm_ours']:.4f} | {d['delta_w']['norm_torch']:.4f} | {d['delta_w']['rel_diff']:.2e} | "
                     f"{d['delta_w']['cosine']:.6f} | {d['resid']['rel_diff']:.2e} | {d['x']['rel_diff']:.2e} | {d['hybrid_vs_ours']['rel_diff']:.2e} |")
    lines += ["", "Target vectors (ours recovered from the patch): ", "",
              "| case | δ rel. diff | δ cosine | ‖δ‖ ours | ‖δ‖ torch | torch steps | torch final loss |", "|---|---|---|---|---|---|---|"]
    for t in r["target_vectors"]:
        lines.append(f"| {t['case_id']} | {t['delta']['rel_diff']:.2e} | {t['delta']['cosine']:.6f} | {t['delta']['norm_ours']:.3f} | "
                     f"{t['delta']['norm_torch']:.3f} | {t['torch_steps']} | {t['torch_final_loss']:.4f} |")
    if r.get("f64_check"):
        lines += ["", "float32 rounding vs the difference (δ rel. diff against PyTorch's float64 run):", "",
                  "| case | PyTorch f32 vs f64 | memit-wgpu vs PyTorch f64 | memit-wgpu vs PyTorch f32 |", "|---|---|---|---|"]
        for f in r["f64_check"]:
            lines.append(f"| {f['case_id']} | {f['torch_f32_vs_f64']:.2e} | {f['ours_vs_torch_f64']:.2e} | {f['ours_vs_torch_f32']:.2e} |")
    if r.get("c_check"):
        lines += ["", "C recomputed in PyTorch over the same texts vs memit-wgpu's cache (rel. diff): "
                  + ", ".join(f"layer {l}: {v:.2e}" for l, v in r["c_check"].items())]
    lines += ["", "| wall time | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in r["timings"].items()]
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="target/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--cases", default="tests/fixtures/datasets/counterfact-20.json")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--out", default="target/compare-smollm2")
    p.add_argument("--stats", help="memit-wgpu statistics cache (default OUT/stats.safetensors)")
    p.add_argument("--patch", help="memit-wgpu patch of these cases (default OUT/ours.patch.safetensors)")
    p.add_argument("--ours-edit", help="memit-wgpu `edit --json` output (default OUT/edit.json)")
    p.add_argument("--ours-eval", help="memit-wgpu `eval` report (default OUT/eval.json)")
    p.add_argument("--corpus", default="tests/fixtures/wikitext-valid-80.txt")
    p.add_argument("--n-texts", type=int, default=80)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--cli", help="memit-wgpu binary: make the stats, patch (and eval report) that are missing")
    p.add_argument("--cli-eval", action="store_true", help="with --cli: also run `memit-wgpu eval` on the cases")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--f64-cases", default="", help="indices (e.g. 0,2,9) whose target vectors are also optimised with a "
                   "float64 copy of the model, to size float32 rounding against the two sides' difference")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    a.stats = a.stats or os.path.join(a.out, "stats.safetensors")
    a.patch = a.patch or os.path.join(a.out, "ours.patch.safetensors")
    a.ours_edit = a.ours_edit or os.path.join(a.out, "edit.json")
    a.ours_eval = a.ours_eval or os.path.join(a.out, "eval.json")

    cases, requests = load_cases(a.cases, a.offset, a.n)
    requests_path = os.path.join(a.out, "requests.json")
    json.dump(requests, open(requests_path, "w"), indent=1)
    timings = {}
    if a.cli:
        for k, v in run_cli(a, requests_path).items():
            timings[f"memit-wgpu {k} (CLI wall)"] = v["wall_s"]

    hp, patch_requests, factors, _ = read_patch(a.patch)
    strip = lambda r: {k: r[k] for k in ("prompt", "subject", "target_new")}  # noqa: E731
    if [strip(r) for r in patch_requests] != [strip(r) for r in requests]:
        sys.exit(f"{a.patch} holds other requests than cases {a.offset}..{a.offset + a.n - 1}")
    covs, stats_meta = read_stats(a.stats)
    if sorted(covs) != sorted(hp["layers"]):
        sys.exit(f"statistics for layers {sorted(covs)}, the patch edits {hp['layers']}")
    ref.HP = dict(hp, max_len=a.max_len)
    ref.TEMPLATES = ["{}"]

    t = time.perf_counter()
    model, tok = torch_memit.load(a.model)
    timings["torch load"] = time.perf_counter() - t
    layers = hp["layers"]
    saved = {l: ref.w_out(model, l).weight.clone() for l in layers}

    # The statistics themselves: C over the same texts in PyTorch (float64
    # sums) against the cache, when the corpus is taken whole.
    c_check = None
    texts = corpus_texts(a.corpus, a.n_texts)
    if texts is not None:
        say(f"recomputing C over {len(texts)} texts …")
        t = time.perf_counter()
        sums, n_tok = {l: torch.zeros(model.config.intermediate_size, model.config.intermediate_size, dtype=torch.float64) for l in layers}, 0
        for i in range(0, len(texts), 8):
            seqs = [s for s in (ref.enc(tok, x)[:a.max_len] for x in texts[i:i + 8]) if s]
            _, _, keys = ref.run(model, seqs)
            for l in layers:
                k = torch.cat([keys[l][b, :len(s)] for b, s in enumerate(seqs)]).double()
                sums[l] += k.T @ k
            n_tok += sum(map(len, seqs))
        c_check = {l: float((sums[l] / n_tok - covs[l].double()).norm() / covs[l].double().norm()) for l in layers}
        c_check_tokens = n_tok
        timings["torch statistics check"] = time.perf_counter() - t

    say("scoring the unedited model …")
    t = time.perf_counter()
    unedited = score(model, tok, cases)
    timings["torch scoring (unedited)"] = time.perf_counter() - t

    # PyTorch MEMIT.
    say("PyTorch MEMIT: target vectors …")
    t = time.perf_counter()
    zs, inits, traces = [], [], []
    for r in requests:
        trace = []
        z, init = ref.compute_z(model, tok, r, ref.enc(tok, " " + r["target_new"]["str"]), trace=trace)
        zs.append(z)
        inits.append(init)
        traces.append(trace)
    timings["torch target vectors"] = time.perf_counter() - t
    Z_torch, init = torch.stack(zs), torch.stack(inits)
    say("PyTorch MEMIT: layers …")
    torch_layers, phases = spread(model, tok, requests, Z_torch, covs, hp)
    for k, v in phases.items():
        timings[f"torch {k}"] = v
    timings["torch edit total"] = timings["torch target vectors"] + sum(phases.values())
    t = time.perf_counter()
    torch_scores = score(model, tok, cases)
    timings["torch scoring (edited)"] = time.perf_counter() - t
    restore(model, saved)

    # Ours: ΔW from the patch, applied to the same PyTorch model and scored
    # by the same scorer.
    say("scoring memit-wgpu's ΔW …")
    ours_dw = {l: (resid.T @ x) for l, (resid, x) in factors.items()}
    for l in layers:
        ref.add_delta_w(model, l, ours_dw[l].float())
    ours_scores = score(model, tok, cases)
    restore(model, saved)

    # Our target vectors: resid at the first layer is (Z − cur_z)/|R| with
    # cur_z of the unedited model, which PyTorch recomputes.
    say("hybrid: PyTorch's layer loop from memit-wgpu's target vectors …")
    _, cur0 = ref.keys_and_outputs(model, tok, requests, layers[0], layers[-1])
    Z_ours = len(layers) * factors[layers[0]][0] + cur0.double()
    hybrid, _ = spread(model, tok, requests, Z_ours, covs, hp)
    restore(model, saved)

    report = {
        "model": a.model, "templates": "plain ({})", "hparams": hp,
        "cases": {"file": a.cases, "offset": a.offset, "n": a.n},
        "stats": {"file": a.stats, "corpus": f"{a.corpus} (n_texts {a.n_texts}, max_len {a.max_len})",
                  "n_tokens": int(stats_meta.get("n_tokens", 0)) or None, "metadata": stats_meta},
        "torch": {"version": torch.__version__, "threads": torch.get_num_threads(), "dtype": "float32 model, float64 solve"},
        "scores": {"unedited (torch scorer)": unedited[1], "memit-wgpu ΔW (torch scorer)": ours_scores[1],
                   "PyTorch MEMIT (torch scorer)": torch_scores[1]},
        "per_case": {"unedited": unedited[0], "ours": ours_scores[0], "torch": torch_scores[0]},
        "layers": {}, "target_vectors": [], "timings": timings,
    }
    if c_check is not None:
        report["c_check"] = c_check
        report["c_check_tokens"] = c_check_tokens
    if os.path.exists(a.ours_eval):
        scores, times = eval_report_summary(a.ours_eval)
        report["scores"].update(scores)
        timings.update(times)
    if os.path.exists(a.ours_edit):
        edit = json.load(open(a.ours_edit))
        timings["memit-wgpu edit (edit_seconds)"] = edit["edit_seconds"]
        for phase, v in edit["phases"].items():
            timings[f"memit-wgpu {phase.replace('_', ' ')}"] = v["seconds"]
        report["ours_edit"] = {k: edit[k] for k in ("edit_seconds", "phases", "solves", "outcomes", "took") if k in edit}
    report["per_case_agreement"] = sum(
        all(o[k] == t[k] for k in ("efficacy", "paraphrase", "neighborhood"))
        for o, t in zip(ours_scores[0], torch_scores[0]))
    for l in layers:
        report["layers"][l] = {
            "delta_w": compare(ours_dw[l], torch_layers[l]["delta_w"]),
            "resid": compare(factors[l][0], torch_layers[l]["resid"]),
            "x": compare(factors[l][1], torch_layers[l]["x"]),
            "hybrid_vs_ours": compare(ours_dw[l], hybrid[l]["delta_w"]),
            "hybrid_vs_torch": compare(hybrid[l]["delta_w"], torch_layers[l]["delta_w"]),
        }
    for j, r in enumerate(requests):
        report["target_vectors"].append({
            "case_id": r["case_id"], "z": compare(Z_ours[j], Z_torch[j]),
            "delta": compare(Z_ours[j] - init[j].double(), Z_torch[j] - init[j]),
            "torch_steps": len(traces[j]), "torch_final_loss": traces[j][-1]["loss"], "torch_trace": traces[j],
            "target_init_norm": float(init[j].norm()),
        })
    if a.f64_cases:
        # The same optimisation in float64: how far float32 rounding alone
        # moves PyTorch's δ, beside how far memit-wgpu's is from it.
        say("float64 target vectors …")
        import copy

        m64 = copy.deepcopy(model).double()
        report["f64_check"] = []
        for j in map(int, a.f64_cases.split(",")):
            r = requests[j]
            z64, i64 = ref.compute_z(m64, tok, r, ref.enc(tok, " " + r["target_new"]["str"]))
            d64 = z64 - i64
            report["f64_check"].append({
                "case_id": r["case_id"],
                "torch_f32_vs_f64": compare(Z_torch[j] - init[j], d64)["rel_diff"],
                "ours_vs_torch_f64": compare(Z_ours[j] - init[j].double(), d64)["rel_diff"],
                "ours_vs_torch_f32": compare(Z_ours[j] - init[j].double(), Z_torch[j] - init[j])["rel_diff"],
            })
        del m64
    json.dump(report, open(os.path.join(a.out, "report.json"), "w"), indent=1, default=float)
    md = markdown(report)
    open(os.path.join(a.out, "report.md"), "w").write(md)
    print(md)


if __name__ == "__main__":
    main()
