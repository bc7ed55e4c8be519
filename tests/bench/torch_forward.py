"""PyTorch (transformers) side of `memit-bench forward`: the same prefill
workload on the same models, so the report can give a ratio measured on the
same machine — on its GPU when torch sees one (CUDA), else on the CPU.
Prints one JSON object: {"device": ..., "tokens_per_s": {model path: tokens per second}}.

    python tests/bench/torch_forward.py --batch 4 --seq 32 --seconds 2 MODEL [MODEL ...]

A MODEL is a Hugging Face folder or a .gguf file (loaded through
transformers' GGUF support, which needs the `gguf` and `accelerate` packages).
"""

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM


def load(path):
    if path.endswith(".gguf"):
        folder, name = os.path.split(path)
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("models", nargs="+")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    results = {}
    for path in args.models:
        model = load(path).eval().to(args.device)
        vocab = model.config.vocab_size
        ids = ((torch.arange(args.batch * args.seq).reshape(args.batch, args.seq) * 7919) % vocab).to(args.device)
        with torch.no_grad():
            model(ids)
            sync()
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds or runs == 0:
                model(ids)
                sync()
                runs += 1
        elapsed = time.perf_counter() - start
        results[path] = args.batch * args.seq * runs / elapsed
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(json.dumps({"device": name, "tokens_per_s": results}))


if __name__ == "__main__":
    main()
