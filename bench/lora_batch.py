"""Rows of different LoRA adapters in one batch: the two ways lmlab.models.multi_lora adds their updates, timed on
one forward pass of the served model against the base model alone.

    python bench/lora_batch.py [--model smollm2-135m-instruct] [--format int4] [--threads 1] [--batch 16]
                               [--adapters 4] [--rank 8] [--length 256] [--prefill 32] [--repeats 7]

N rank-r LoRA runs on every attention and MLP layer (made in code: bench/serve_load.py's make_adapter_runs) are
attached to the model as `lmlab serve --adapter` attaches them. Then, on a batch of --batch rows (row i uses
adapter i % N + 1), the fastest of --repeats passes of each, taking turns:
    base     no row uses an adapter (the wrapped layers add nothing)
    stacked  the N adapters as one LoRA of rank N x r, each row masked to its own r columns: two GEMMs a layer
    gather   each row's A and B gathered, two bmm per layer (punica's BGMV in PyTorch ops)
    group    rows grouped by adapter: per adapter, its rows' two matmuls and an index_add
for a decode step (one token a row over --length cached tokens: KVCache) and a prefill pass (--prefill tokens a
row, as the engine prefills prompts that arrive together). --format int4: SmolLM2's GGUF Q4 weights kept, bf16
compute (what `lmlab serve` runs by default here); fp32: float32 weights. Each pass is timed twice: wall time and
the CPU time of this thread (with one torch thread the pass runs on it), which other processes on a shared core
do not inflate; the fastest of each is kept. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches this one reuses
from serve_load import make_adapter_runs  # noqa: E402

FORMATS = {"int4": dict(dtype="bfloat16", quantize="auto"), "fp32": dict(dtype="float32", quantize="none")}


def fastest(steps: dict, repeats: int) -> dict:
    """{clock: {step: the fastest of `repeats` runs}} for the wall clock and this thread's CPU time, the steps
    taking turns (after one warm-up run each)."""
    times = {clock: {name: [] for name in steps} for clock in ("wall", "cpu")}
    for step in steps.values():
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.thread_time()
            step()
            times["cpu"][name].append(time.thread_time() - cpu)
            times["wall"][name].append(time.perf_counter() - wall)
    return {clock: {name: min(t) for name, t in by_step.items()} for clock, by_step in times.items()}


def main():
    from lmlab.models.hub import load_pretrained
    from lmlab.models.multi_lora import attach_adapters
    from lmlab.models.quantize import InferenceSettings, weight_format
    from lmlab.models.transformer import KVCache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--format", choices=sorted(FORMATS), default="int4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--length", type=int, default=256, help="cached tokens per row in the decode step")
    ap.add_argument("--prefill", type=int, default=32, help="tokens per row in the prefill pass")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    model = load_pretrained(args.model, inference=InferenceSettings(**FORMATS[args.format], compile="off")).model
    with tempfile.TemporaryDirectory(prefix="lmlab-lora-batch-") as folder:  # the runs, read once by attach
        rows = attach_adapters(model, make_adapter_runs(args.model, args.adapters, folder, args.rank))
    config, dtype = model.config, model.tok_emb.weight.dtype
    mixed = [i % args.adapters + 1 for i in range(args.batch)]

    def runner(ids, mode, width, length):
        cache = KVCache(config, args.batch, length + width, dtype=dtype)
        cache.k.normal_(), cache.v.normal_()  # torch.empty may hold NaNs or denormals, slow paths of their own
        tokens = torch.randint(0, config.vocab_size, (args.batch, width))

        def step():
            rows.mode = mode
            rows.select(ids)
            cache.length = length
            model(tokens, cache=cache, last_only=True)
        return step

    results = {}
    with torch.inference_mode():
        for name, width, length in (("decode", 1, args.length), ("prefill", args.prefill, 0)):
            seconds = fastest({"base": runner([0] * args.batch, "stacked", width, length),
                               "stacked": runner(mixed, "stacked", width, length),
                               "gather": runner(mixed, "gather", width, length),
                               "group": runner(mixed, "group", width, length)}, args.repeats)
            results[name] = {"tokens_per_row": width, "cached_tokens": length, **{
                clock: {"ms": {k: round(1000 * v, 2) for k, v in by_step.items()},
                        "speed_vs_base": {k: round(by_step["base"] / v, 3) for k, v in by_step.items() if k != "base"}}
                for clock, by_step in seconds.items()}}
    print(json.dumps({"model": args.model, "weights": weight_format(model), "compute_dtype": str(dtype),
                      "threads": args.threads, "batch": args.batch, "adapters": args.adapters, "rank": args.rank,
                      "results": results, "fastest_decode_cpu": min(("stacked", "gather", "group"),
                                                                   key=lambda k: results["decode"]["cpu"]["ms"][k]),
                      "load_average_before": load_before, "load_average_after": os.getloadavg()}, indent=2))


if __name__ == "__main__":
    main()
