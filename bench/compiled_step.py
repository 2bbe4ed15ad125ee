"""One decoding step of SmolLM2, eager against --compile, alternating in one process: the figures behind
`--compile` (lmlab.models.quantize.compile_decoding).

For each --formats entry (fp32, bf16, int4: the Q4_1 file's own blocks), prints as JSON: the seconds the first
compiled steps took (the compilation: cold, or from inductor's disk cache), the median ms per step of eager and
compiled over --rounds alternating rounds of --steps steps after a 128-token prompt, their ratio, and the largest
logit difference between the two. With --profile, also the eager step's op count and its costliest ops
(torch.profiler; the profiler's own overhead inflates small ops, so read them as shares, not times).

    python bench/compiled_step.py [--formats int4,bf16] [--threads 1] [--steps 40] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lmlab.models.hub import load_pretrained, resolve
from lmlab.models.compiled import decoding_forward
from lmlab.models.quantize import InferenceSettings, compile_decoding
from lmlab.models.transformer import KVCache

FORMATS = {"fp32": InferenceSettings(dtype="float32", quantize="none", compile="off"),
           "bf16": InferenceSettings(dtype="bfloat16", quantize="none", compile="off"),
           "int4": InferenceSettings(dtype="bfloat16", quantize="auto", compile="off")}


def steps(model, step, prompt: torch.Tensor, n: int) -> tuple[float, list[torch.Tensor]]:
    """ms per step over n one-token steps after the prompt (the first 3 not timed), and the logits."""
    cache = KVCache(model.config, 1, prompt.shape[1] + n, "cpu", model.tok_emb.weight.dtype)
    model(prompt, cache=cache, last_only=True)
    token, out = torch.tensor([[5]]), []
    for i in range(n):
        if i == 3:
            start = time.perf_counter()
        out.append(step(token, cache=cache, last_only=True)[0])
    return (time.perf_counter() - start) / (n - 3) * 1e3, out


def profile(model, prompt: torch.Tensor) -> dict:
    from torch.profiler import profile as torch_profile

    cache = KVCache(model.config, 1, prompt.shape[1] + 20, "cpu", model.tok_emb.weight.dtype)
    model(prompt, cache=cache, last_only=True)
    with torch_profile() as prof:
        for _ in range(10):
            model(torch.tensor([[5]]), cache=cache, last_only=True)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return {"aten_ops_per_step": sum(e.count for e in ops if e.key.startswith("aten::")) / 10,
            "top_ops_share": {e.key: round(e.self_cpu_time_total / total, 3) for e in ops[:8]}}


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--formats", default="int4,bf16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also profile the eager step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    prompt = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
    report = {"benchmark": "compiled_step", "threads": args.threads, "load_average_at_start": os.getloadavg(),
              "formats": {}}
    for name in args.formats.split(","):
        model = load_pretrained(resolve(args.model), inference=FORMATS[name]).model
        compile_decoding(model)
        compiled = decoding_forward(model)
        start = time.perf_counter()
        steps(model, compiled, prompt, 5)
        compile_s = time.perf_counter() - start
        eager_ms, compiled_ms, diffs = [], [], []
        for _ in range(args.rounds):
            e, want = steps(model, model, prompt, args.steps)
            c, got = steps(model, compiled, prompt, args.steps)
            eager_ms.append(e)
            compiled_ms.append(c)
            diffs.append(max((a.float() - b.float()).abs().max().item() for a, b in zip(want, got)))
        row = {"compile_s": round(compile_s, 1), "eager_ms": round(statistics.median(eager_ms), 2),
               "compiled_ms": round(statistics.median(compiled_ms), 2),
               "speedup": round(statistics.median(eager_ms) / statistics.median(compiled_ms), 2),
               "max_logit_difference": max(diffs)}
        if args.profile:
            row["eager_profile"] = profile(model, prompt)
        report["formats"][name] = row
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
