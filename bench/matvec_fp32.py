"""The fp32 matrix-vector product of a decode step, by every exact path PyTorch offers on the CPU.

SmolLM2's fused MLP input projection (1536 x 576) times one activation row, in rounds that alternate the paths:
F.linear (MKL's sgemv behind aten::addmm), x @ W^T with W^T stored contiguous (the other layout), torch.mv, and
F.linear with oneDNN switched off (torch.backends.mkldnn.flags(enabled=False)); bf16 F.linear for comparison.
Reports median microseconds per call and the weight bytes read per second, and whether each is bit-exact to
F.linear.

    python bench/matvec_fp32.py [--threads 1] [--rounds 5] [--rows 1536] [--cols 576]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def without_onednn(x, w):
    with torch.backends.mkldnn.flags(enabled=False):
        return F.linear(x, w)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1536)
    ap.add_argument("--cols", type=int, default=576)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w, x = torch.randn(args.rows, args.cols), torch.randn(1, args.cols)
    wt, wb, xb = w.t().contiguous(), w.bfloat16(), x.bfloat16()
    paths = {"F.linear (MKL)": lambda: F.linear(x, w), "x @ W^T contiguous": lambda: x @ wt,
             "torch.mv": lambda: torch.mv(w, x[0])[None], "F.linear, oneDNN off": lambda: without_onednn(x, w),
             "bf16 F.linear (not exact)": lambda: F.linear(xb, wb)}
    times = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            times[name].append(per_call_us(fn))
    reference = F.linear(x, w)
    out = {}
    for name, fn in paths.items():
        us = statistics.median(times[name])
        nbytes = w.numel() * (2 if name.startswith("bf16") else 4)
        out[name] = {"us_per_call": round(us, 1), "weight_GB_per_s": round(nbytes / us / 1e3, 1),
                     "bit_exact": torch.equal(fn().float(), reference)}
    print(json.dumps({"benchmark": "matvec_fp32", "shape": [args.rows, args.cols], "threads": args.threads,
                      "torch": torch.__version__, "load_average": os.getloadavg(), "paths": out}, indent=2))


if __name__ == "__main__":
    main()
