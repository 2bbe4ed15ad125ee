"""Training throughput: lmlab's GPT vs transformers' GPT2LMHeadModel vs litgpt's GPT, same shape, same batch.

A full training step (forward, cross-entropy in fp32, backward, fused AdamW) of each model, in fp32 and under
bf16 autocast (fp32 master weights, what `train.dtype: auto` runs where bf16 is native), the three models timed
in alternation in one process so that a change of the machine's load hits all alike. The model FLOP
utilization (MFU) is the model's training FLOP/s over the torch.mm peak of the same dtype (2048^3, measured in
the same process at the start and the end, the best of both).

Shape (GPT-2 small's family): 6 layers, 384 wide, 6 heads, 8 x 256 tokens, vocab 50,304 (GPT-2's 50,257 padded
to a multiple of 64, as nanoGPT does); litgpt and transformers get the same widths (litgpt: GPT-NeoX MLP and
LayerNorm, sequential residual, rotary on all of each head, since it has no learned positions). Every model
does the same FLOPs per token up to position encoding: lmlab's count (6N + 12 L T C, PaLM) is used for all three.

    python bench/train_throughput.py [--threads 2] [--steps 8] [--warmup 2] [--dtypes float32,bfloat16]
                                     [--profile]   # + torch.profiler's top ops of lmlab's step, per dtype
                                     [--compile]   # + lmlab's model compiled (train.compile), and its compile time

Prints one JSON object. litgpt comes from the `bench` extra (pip install 'lmlab[bench]'; litgpt's own pins
would change installed packages, so `pip install --no-deps litgpt lightning lightning-utilities torchmetrics`
is enough for the model class); without it the bench says so and times the other two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from lmlab.models.transformer import Transformer, TransformerConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def matmul_peak_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 10, device: str = "cpu") -> float:
    """Best time of torch.mm on n x n matrices of `dtype`, as FLOP/s (the most the machine showed us); on a GPU
    each product is waited for (its kernels run asynchronously)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def cpu_facts() -> dict:
    """The CPU the figures come from: its model name, the flags that decide the bf16 path, torch's own check."""
    info = {"model": platform.processor() or "unknown", "flags": [],
            "torch_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            info["model"] = value.strip()
        elif key.strip() == "flags":
            have = set(value.split())
            info["flags"] = sorted(have & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                                           "amx_int8"})
            break
    return info


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """lmlab's objective for the other two: logits at t predict targets[t], cross-entropy in fp32."""
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def make_step(model, forward_loss, batch, dtype: str):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, fused=True)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext():
            loss = forward_loss(model, *batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def median_step_times(steps: dict, n: int, warmup: int) -> dict:
    """Median seconds per training step of each contender, measured in alternation."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def contenders(args, dtype: str) -> tuple[dict, float, str | None]:
    """The training step of each model (fresh weights, seed 0), lmlab's FLOPs per token, and why litgpt is
    missing (None when it is there)."""
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    cfg = TransformerConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    ours = Transformer(cfg)
    # lmlab's objective asks for the loss alone (loss_only): the fused head + cross-entropy, no full logits.
    steps = {"lmlab": make_step(ours, lambda m, a, b: m(a, b, loss_only=True)[1], (x, y), dtype)}
    if args.compile:  # what train.compile runs (on, or auto once a run is long enough): the same model compiled
        torch.manual_seed(0)
        compiled = torch.compile(Transformer(cfg))
        steps["lmlab compiled"] = make_step(compiled, lambda m, a, b: m(a, b, loss_only=True)[1], (x, y), dtype)

    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=args.vocab_size, n_positions=args.block_size, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    steps["transformers"] = make_step(GPT2LMHeadModel(hf_cfg), lambda m, a, b: lm_loss(m(a).logits, b), (x, y),
                                      dtype)
    try:
        from litgpt.config import Config
        from litgpt.model import GPT
    except ImportError as e:
        return steps, ours.flops_per_token(), f"litgpt is not installed ({e}): pip install 'lmlab[bench]'"
    lit_cfg = Config(block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     vocab_size=args.vocab_size, padded_vocab_size=args.vocab_size, bias=True,
                     parallel_residual=False, rotary_percentage=1.0, norm_class_name="LayerNorm",
                     mlp_class_name="GptNeoxMLP", intermediate_size=4 * args.n_embd)
    steps["litgpt"] = make_step(GPT(lit_cfg), lambda m, a, b: lm_loss(m(a), b), (x, y), dtype)
    return steps, ours.flops_per_token(), None


def profile_step(step, rows: int = 12) -> list[dict]:
    """torch.profiler's top ops of one step by self CPU time: where the step's time goes."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:rows]]


def measure(args, dtype: str) -> dict:
    peak = matmul_peak_flops(DTYPES[dtype])
    steps, flops_per_token, missing = contenders(args, dtype)
    if "lmlab compiled" in steps:  # the compile happens at the first call: timed apart from the steps
        start = time.perf_counter()
        steps["lmlab compiled"]()
        args.compile_s = time.perf_counter() - start
    medians = median_step_times(steps, args.steps, args.warmup)
    peak = max(peak, matmul_peak_flops(DTYPES[dtype]))  # again at the end: the clock may have changed
    tokens = args.batch_size * args.block_size
    tps = {name: tokens / seconds for name, seconds in medians.items()}
    result = {"matmul_peak_flops": round(peak), "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
              "model_flops_utilization": {k: round(v * flops_per_token / peak, 3) for k, v in tps.items()},
              "lmlab_vs_transformers": round(tps["lmlab"] / tps["transformers"], 3)}
    if "litgpt" in tps:
        result["lmlab_vs_litgpt"] = round(tps["lmlab"] / tps["litgpt"], 3)
    else:
        result["litgpt_missing"] = missing
    best = max((n for n in tps if n.startswith("lmlab")), key=tps.get)  # the faster of eager and compiled
    result["lmlab_best"] = best
    result["best_vs_transformers"] = round(tps[best] / tps["transformers"], 3)
    if "litgpt" in tps:
        result["best_vs_litgpt"] = round(tps[best] / tps["litgpt"], 3)
    if "lmlab compiled" in tps:
        result["compiled_vs_eager"] = round(tps["lmlab compiled"] / tps["lmlab"], 3)
        result["compile_s"] = round(args.compile_s, 1)
    # Issue 24's goals: bf16 >= 1.3x transformers, >= 1.2x litgpt, MFU >= 0.3; fp32 >= 1.3x transformers.
    mfu = result["model_flops_utilization"][best]
    result["goals"] = {"lmlab >= 1.3x transformers": result["best_vs_transformers"] >= 1.3}
    if dtype == "bfloat16":
        result["goals"].update({"lmlab >= 1.2x litgpt": result.get("best_vs_litgpt", 0) >= 1.2,
                                "MFU >= 0.3": mfu >= 0.3})
    if args.profile:
        result["lmlab_profile"] = profile_step(steps["lmlab"])
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per model and dtype (the median is kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="add torch.profiler's top ops of lmlab's step")
    ap.add_argument("--compile", action="store_true",
                    help="also time lmlab's model compiled (what train.compile runs), and its compile time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    results = {dtype: measure(args, dtype) for dtype in args.dtypes.split(",")}
    print(json.dumps({
        "benchmark": "train_throughput",
        "shape": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "block_size": args.block_size, "vocab_size": args.vocab_size, "batch_size": args.batch_size},
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_facts(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model_flops_per_token": Transformer(TransformerConfig(
            vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
            n_embd=args.n_embd)).flops_per_token(),
        **results,
    }, indent=2))


if __name__ == "__main__":
    main()
