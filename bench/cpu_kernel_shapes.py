"""What a new matrix shape costs in bf16 on the CPU, and single-query attention: SDPA against two matmuls.

Issue 13's soak grew because oneDNN (bf16 matmuls on the CPU) compiles and keeps a kernel per shape. This bench
measures, each part in a fresh process so that the caches start empty:
  - shape-cost: RSS per new input shape of a bf16 nn.Linear (default caches, and both caches capped the way
    `lmlab serve` caps them: ONEDNN_PRIMITIVE_CACHE_CAPACITY and LRU_CACHE_CAPACITY);
  - attention: one query over L cached keys (SmolLM2's heads: 9 query heads on 3 key/value heads of 64, batch 8),
    scaled_dot_product_attention (what lmlab decodes with) against softmax(q k^T) v as two matmuls (what it used
    before), alternating, median ms per call, for fp32 and bf16; and the RSS each grows over 400 cache lengths.

    python bench/cpu_kernel_shapes.py [--threads 1]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

B, KV, GROUP, D = 8, 3, 3, 64


def rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def two_matmuls(q, k, v, mask):
    scores = (q.reshape(B, KV, GROUP, D) @ k.transpose(-1, -2)) * D ** -0.5
    return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).reshape(B, KV * GROUP, 1, D)


def sdpa(q, k, v, mask):
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def shape_cost(threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    lin = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        lin(torch.randn(3, 576, dtype=torch.bfloat16))
        start = rss_mib()
        for rows in range(4, 404):
            lin(torch.randn(rows, 576, dtype=torch.bfloat16))
    return {"mib_per_new_shape": round((rss_mib() - start) / 400, 3)}


def attention(threads: int, kind: str) -> dict:
    import torch
    torch.set_num_threads(threads)
    fn = {"sdpa": sdpa, "two_matmuls": two_matmuls}[kind]
    start = rss_mib()
    with torch.no_grad():
        for length in range(1, 401):  # a decode over 400 steps: one new cache length each
            q = torch.randn(B, KV * GROUP, 1, D, dtype=torch.bfloat16)
            k = torch.randn(B, KV, length, D, dtype=torch.bfloat16)
            fn(q, k, k, torch.ones(B, 1, 1, length, dtype=torch.bool))
    grown = rss_mib() - start
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        for length in (32, 128, 512, 1500):
            q = torch.randn(B, KV * GROUP, 1, D, dtype=dtype)
            k, v = torch.randn(B, KV, length, D, dtype=dtype), torch.randn(B, KV, length, D, dtype=dtype)
            mask = torch.rand(B, 1, 1, length) > 0.1
            fn(q, k, v, mask)
            samples = []
            for _ in range(50):
                t0 = time.perf_counter()
                fn(q, k, v, mask)
                samples.append(time.perf_counter() - t0)
            times[f"{str(dtype).split('.')[-1]}_{length}"] = round(statistics.median(samples) * 1e3, 4)
    return {"rss_mib_over_400_lengths_bf16": round(grown, 1), "ms": times}


def child(part: str, threads: int, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, "--part", part, "--threads", str(threads)], check=True,
                         capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "shape-cost":
        print(json.dumps(shape_cost(args.threads)))
        return
    if args.part:
        print(json.dumps(attention(args.threads, args.part)))
        return
    capped = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"}
    result = {"threads": args.threads, "load_average": os.getloadavg(),
              "linear_bf16_default_caches": child("shape-cost", args.threads),
              "linear_bf16_caches_capped_16": child("shape-cost", args.threads, capped),
              "attention_sdpa": child("sdpa", args.threads),
              "attention_two_matmuls": child("two_matmuls", args.threads)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
