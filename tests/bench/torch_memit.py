"""The PyTorch side of `memit-bench memit`: the same covariance statistics
and MEMIT edits as memit-wgpu, on the same model, texts, requests and
hyperparameters, timed the same way (statistics tokens/s over every edited
layer at once; edits by phase). The MEMIT math is the independent reference
implementation in tests/fixtures/make_memit_golden.py. Runs on the GPU when
torch sees one (CUDA), else on the CPU. Prints JSON.

    python tests/bench/torch_memit.py MODEL TEXTS.txt COUNTERFACT.json \\
        --max-len 64 --sizes 1,10,100 --hparams '{"layers": [0, 1, 2, 3], ...}'

MODEL is a Hugging Face folder of a GPT-2-style model (W_out = Conv1D
`transformer.h.{l}.mlp.c_proj`) or a Llama-style one (`model.layers.{l}.mlp.
down_proj`), or a Llama `.gguf` file, loaded with transformers' GGUF loader
(needs `gguf` and `accelerate`; the file is dequantised to float32, and its
embedded tokenizer is used the way memit-wgpu rebuilds it, see `load`).
"""

import argparse
import json
import os
import sys
import time

import torch
from tokenizers import Tokenizer, pre_tokenizers
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


def gguf_string(path, key):
    """A string field of a GGUF file's metadata, or None."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    return None if field is None else bytes(field.parts[field.data[0]]).decode()


def load(path, dtype=torch.float32):
    """(model, tokenizers.Tokenizer) from a Hugging Face folder or a Llama
    .gguf file. For GGUF, transformers' loader dequantises the weights (and
    undoes llama.cpp's rotary row permutation of q/k) and rebuilds the
    embedded byte-level BPE; its pre-tokeniser is then set as memit-wgpu's
    GGUF loader sets it (crates/memit-models/src/gguf.rs: for
    `tokenizer.ggml.pre` = "smollm", single digits, then byte-level), so
    both sides tokenise every text alike. No special tokens are added (MEMIT
    prompts carry no BOS)."""
    if path.endswith(".gguf"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        folder, name = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name).backend_tokenizer
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
        if gguf_string(path, "tokenizer.ggml.pre") == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.post_processor = None
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return model.eval().to(DEVICE), tok


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
    saved = {l: ref.w_out(model, l).weight.clone() for l in hp["layers"]}
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
        ref.add_delta_w(model, layer, resid.T @ X.T)  # ΔW [d, d_ff]
        phases["update"] += now() - t
    for l, w in saved.items():
        ref.w_out(model, l).weight.copy_(w)
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
    model, tok = load(a.model)
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
