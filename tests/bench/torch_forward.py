"""PyTorch (CPU, transformers) side of `memit-bench forward`: the same
prefill workload on the same models, so the report can give a ratio measured
on the same machine. Prints one JSON object: {model path: tokens per second}.

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
    args = p.parse_args()
    results = {}
    for path in args.models:
        model = load(path).eval()
        vocab = model.config.vocab_size
        ids = (torch.arange(args.batch * args.seq).reshape(args.batch, args.seq) * 7919) % vocab
        with torch.no_grad():
            model(ids)
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < args.seconds or runs == 0:
                model(ids)
                runs += 1
        elapsed = time.perf_counter() - start
        results[path] = args.batch * args.seq * runs / elapsed
    print(json.dumps(results))


if __name__ == "__main__":
    main()
