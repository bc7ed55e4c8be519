"""The PyTorch side of `memit-bench memit`: the same covariance statistics
and MEMIT edits as memit-wgpu, on the same model, texts, requests and
hyperparameters, timed the same way (statistics tokens/s over every edited
layer at once; edits by phase). The MEMIT math is the independent reference
implementation in tests/fixtures/make_memit_golden.py. Runs on the GPU when
torch sees one (CUDA), else on the CPU. Prints JSON.

    python tests/bench/torch_memit.py MODEL_DIR TEXTS.txt COUNTERFACT.json \\
        --max-len 64 --sizes 1,10,100 --hparams '{"layers": [0, 1, 2, 3], ...}'
"""

import argparse
import json
import os
import sys
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import make_memit_golden as ref  # noqa: E402

torch.set_grad_enabled(False)
torch.manual_seed(0)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def now():
    """perf_counter after the GPU's queued work is done."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def stats(model, tok, lines, layers, max_len):
    """C = E[k kᵀ] for every layer at once, float32, batches of 8."""
    covs = {l: None for l in layers}
    n = 0
    start = now()
    for i in range(0, len(lines), 8):
        seqs = [ref.enc(tok, t)[:max_len] for t in lines[i:i + 8]]
        seqs = [s for s in seqs if s]
        if not seqs:
            continue
        _, _, keys = ref.run(model, seqs)
        for l in layers:
            k = torch.cat([keys[l][b, :len(s)] for b, s in enumerate(seqs)])
            covs[l] = k.T @ k if covs[l] is None else covs[l] + k.T @ k
        n += sum(map(len, seqs))
    seconds = now() - start
    return {l: c / n for l, c in covs.items()}, {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds}


def edit(model, tok, requests, covs, hp):
    """MEMIT with the reference functions; seconds per phase."""
    phases = {"target_vectors": 0.0, "keys": 0.0, "solve": 0.0, "update": 0.0}
    saved = {l: model.transformer.h[l].mlp.c_proj.weight.clone() for l in hp["layers"]}
    t = now()
    zs = [ref.compute_z(model, tok, r, ref.enc(tok, " " + r["target_new"]["str"]))[0] for r in requests]
    phases["target_vectors"] = now() - t
    Z = torch.stack(zs)
    last = hp["layers"][-1]
    for i, layer in enumerate(hp["layers"]):
        t = now()
        K, cur = ref.keys_and_outputs(model, tok, requests, layer, last)
        phases["keys"] += now() - t
        t = now()
        resid = (Z - cur) / (len(hp["layers"]) - i)
        A = hp["mom2_update_weight"] * covs[layer] + K.T @ K
        X = torch.linalg.solve(A, K.T)
        phases["solve"] += now() - t
        t = now()
        model.transformer.h[layer].mlp.c_proj.weight.add_(X @ resid)  # Conv1D [d_ff, d]
        phases["update"] += now() - t
    for l, w in saved.items():
        model.transformer.h[l].mlp.c_proj.weight.copy_(w)
    return phases


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("texts")
    p.add_argument("cases")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--sizes", default="1,10,100")
    p.add_argument("--hparams", required=True)
    a = p.parse_args()
    hp = json.loads(a.hparams)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval().to(DEVICE)
    if not hasattr(model, "transformer"):
        sys.exit("torch_memit.py implements MEMIT for GPT-2-style models (model.transformer.h[*].mlp.c_proj)")
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    ref.HP = dict(hp, max_len=a.max_len)
    ref.TEMPLATES = ["{}"]
    lines = [l for l in open(a.texts).read().split("\n") if l.strip()]
    covs, stats_report = stats(model, tok, lines, hp["layers"], a.max_len)
    cases = json.load(open(a.cases))
    requests = [{"prompt": c["requested_rewrite"]["prompt"], "subject": c["requested_rewrite"]["subject"],
                 "target_new": c["requested_rewrite"]["target_new"]} for c in cases]
    edits = []
    for n in map(int, a.sizes.split(",")):
        t = now()
        phases = edit(model, tok, requests[:n], covs, hp)
        seconds = now() - t
        edits.append({"edits": n, "seconds": seconds, "edits_per_s": n / seconds, "phases": phases})
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    json.dump({"torch": torch.__version__, "device": device, "stats": stats_report, "edits": edits}, sys.stdout)


if __name__ == "__main__":
    main()
