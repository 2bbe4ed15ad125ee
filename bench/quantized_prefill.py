"""Where quantized layers should stop using the int4/int8 matrix-vector kernels: the crossover in rows (M).

For each of SmolLM2-135M's linear shapes, times one int4 layer (group 32) and one int8 layer both ways at a
range of row counts M, alternating in one process:

    kernel   torch's _weight_int4pack_mm_for_cpu / _weight_int8pack_mm on the packed weight
    bf16     the weight dequantized to bfloat16 on the fly (Int4Linear.bf16_weight), then the bf16 GEMM

and reports the medians and the smallest M from which bf16 is faster for every shape (the value of
_QuantizedLinear.BF16_FROM_ROWS). Then, with --model, the whole model's prefill (--prompt-tokens) from its GGUF
in int4 with the kernel only, int4 with the bf16 prefill, the bf16 model and fp32, alternating.

    python bench/quantized_prefill.py [--threads 1] [--rounds 5] [--model smollm2-135m-instruct]

Prints one JSON object; a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from lmlab.models.quantize import InferenceSettings, Int4Linear, Int8Linear

# SmolLM2-135M: qkv (960 x 576), attention output, gate+up (3072 x 576), down (576 x 1536)
SHAPES = {"qkv": (960, 576), "attn_out": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
ROWS = (1, 4, 8, 16, 24, 32, 48, 64, 96, 128)
NEVER = 10 ** 9


def per_call(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def layer_crossover(rounds: int) -> dict:
    torch.manual_seed(0)
    layers = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k)
        layers[f"int4 {name}"] = Int4Linear.from_float(w, 32)
        layers[f"int8 {name}"] = Int8Linear.from_float(w)
    times: dict = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, layer in layers.items():
                for m in ROWS:
                    x = torch.randn(m, layer.in_features, dtype=torch.bfloat16)
                    repeat = max(2, 64 // m)
                    for path, fn in (("kernel", lambda: layer._kernel(x)),
                                     ("bf16", lambda: x @ layer.bf16_weight())):
                        times.setdefault(name, {}).setdefault(m, {}).setdefault(path, []).append(
                            per_call(fn, repeat))
    out = {}
    for name, by_m in times.items():
        med = {m: {p: statistics.median(v) * 1e6 for p, v in paths.items()} for m, paths in by_m.items()}
        faster = [m for m in ROWS if all(med[r]["bf16"] < med[r]["kernel"] for r in ROWS if r >= m)]
        out[name] = {"us_per_call": {m: {p: round(v, 1) for p, v in d.items()} for m, d in med.items()},
                     "bf16_faster_from_rows": faster[0] if faster else None}
    return out


def model_prefill(model: str, prompt_tokens: int, rounds: int) -> dict:
    from lmlab.models.hub import load_pretrained, resolve

    path = str(resolve(model))
    formats = {"int4, kernel only": InferenceSettings(dtype="bfloat16", quantize="auto", compile="off"),
               "int4, bf16 prefill": InferenceSettings(dtype="bfloat16", quantize="auto", compile="off"),
               "bf16": InferenceSettings(dtype="bfloat16", quantize="none", compile="off"),
               "fp32": InferenceSettings(dtype="float32", quantize="none", compile="off")}
    models = {name: load_pretrained(path, inference=s).model for name, s in formats.items()}
    prompt = torch.randint(0, 49152, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    rates: dict = {}
    logits = {}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for name, m in models.items():
                saved = (Int4Linear.BF16_FROM_ROWS, Int8Linear.BF16_FROM_ROWS)
                if name == "int4, kernel only":
                    Int4Linear.BF16_FROM_ROWS = Int8Linear.BF16_FROM_ROWS = NEVER
                start = time.perf_counter()
                logits[name], _ = m(prompt, last_only=True)
                rates.setdefault(name, []).append(prompt_tokens / (time.perf_counter() - start))
                Int4Linear.BF16_FROM_ROWS, Int8Linear.BF16_FROM_ROWS = saved
    medians = {name: round(statistics.median(r[1:]), 1) for name, r in rates.items()}
    ref = logits["fp32"].float()
    return {"prompt_tokens": prompt_tokens, "prefill_tokens_per_s": medians,
            "ratio_to_int4_kernel_only": {n: round(v / medians["int4, kernel only"], 2) for n, v in medians.items()},
            "max_abs_logit_diff_to_fp32": {n: round((lg.float() - ref).abs().max().item(), 3)
                                           for n, lg in logits.items()},
            "logit_spread_fp32": round((ref.max() - ref.min()).item(), 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="'' to skip the whole-model prefill")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"benchmark": "quantized_prefill", "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__, "load_average_at_start": os.getloadavg(),
              "BF16_FROM_ROWS": {"int4": Int4Linear.BF16_FROM_ROWS, "int8": Int8Linear.BF16_FROM_ROWS},
              "layers": layer_crossover(args.rounds)}
    if args.model:
        report["model"] = {"name": args.model, **model_prefill(args.model, args.prompt_tokens, args.rounds)}
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    lines = ["| layer | bf16 faster from M | kernel / bf16 us at M=1 | at M=16 | at M=128 |",
             "| --- | ---: | --- | --- | --- |"]
    for name, r in report["layers"].items():
        t = r["us_per_call"]
        lines.append(f"| {name} | {r['bf16_faster_from_rows']} | "
                     + " | ".join(f"{t[m]['kernel']} / {t[m]['bf16']}" for m in (1, 16, 128)) + " |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
