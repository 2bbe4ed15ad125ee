"""Training throughput: lmlab's GPT vs transformers' GPT2LMHeadModel, same shape, same batch, same machine.

Measures tokens/s of a full training step (forward, backward, AdamW step) in fp32 on the CPU, and the model
FLOP/s as a fraction of this machine's fp32 matmul peak (torch.mm of 2048x2048 measured in the same run).

    python bench/train_throughput.py [--threads 2] [--steps 10] [--warmup 3]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from lmlab.models.transformer import Transformer, TransformerConfig


def matmul_peak_flops(n: int = 2048, repeats: int = 20) -> float:
    """Best time of torch.mm on n x n fp32 matrices, as FLOP/s (the most the machine showed us)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def make_step(model, forward_loss, batch):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, fused=True)
    model.train()

    def step():
        loss = forward_loss(model, *batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def median_step_times(steps: dict, n: int, warmup: int) -> dict:
    """Median seconds per training step of each contender, measured in alternation so that a change in the
    machine's load or clock during the run hits all of them alike."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=65)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="also time lmlab's model under torch.compile "
                                                           "(train.compile: true); compiling takes about a minute")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = TransformerConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                            n_head=args.n_head, n_embd=args.n_embd, dropout=0.0)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size))
    tokens = args.batch_size * args.block_size

    peak = matmul_peak_flops()
    ours = Transformer(cfg)
    flops_per_token = ours.flops_per_token()
    hf_cfg = GPT2Config(vocab_size=args.vocab_size, n_positions=args.block_size, n_embd=args.n_embd,
                        n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=None, eos_token_id=None)
    theirs = GPT2LMHeadModel(hf_cfg)

    def hf_loss(m, a, b):
        # Same objective as ours: logits at t predict b[t] (GPT2LMHeadModel's `labels` would shift by one).
        logits = m(a).logits
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), b.view(-1))

    steps = {"lmlab": make_step(ours, lambda m, a, b: m(a, b)[1], (x, y)),
             "transformers": make_step(theirs, hf_loss, (x, y))}
    if args.compile:
        compiled = Transformer(cfg)
        steps["lmlab_compiled"] = make_step(torch.compile(compiled), lambda m, a, b: m(a, b)[1], (x, y))
        steps["lmlab_compiled"]()  # compile outside the timed steps
    medians = median_step_times(steps, args.steps, args.warmup)
    t_ours, t_hf = medians["lmlab"], medians["transformers"]
    peak = max(peak, matmul_peak_flops())  # again at the end: the clock may have changed during the run

    ours_tps, hf_tps = tokens / t_ours, tokens / t_hf
    extra = {}
    if args.compile:
        compiled_tps = tokens / medians["lmlab_compiled"]
        extra = {"lmlab_compiled_tokens_per_s": round(compiled_tps, 1),
                 "compiled_speedup": round(compiled_tps / hf_tps, 3),
                 "lmlab_compiled_model_flops_utilization": round(compiled_tps * flops_per_token / peak, 3)}
    print(json.dumps({
        "benchmark": "train_throughput",
        "shape": {"n_layer": args.n_layer, "n_head": args.n_head, "n_embd": args.n_embd,
                  "block_size": args.block_size, "vocab_size": args.vocab_size, "batch_size": args.batch_size},
        "threads": args.threads, "dtype": "float32", "torch": torch.__version__, "machine": platform.machine(),
        "lmlab_tokens_per_s": round(ours_tps, 1),
        "transformers_tokens_per_s": round(hf_tps, 1),
        "speedup": round(ours_tps / hf_tps, 3),
        "model_flops_per_token": flops_per_token,
        "matmul_peak_flops": round(peak),
        "lmlab_model_flops_utilization": round(ours_tps * flops_per_token / peak, 3),
        "transformers_model_flops_utilization": round(hf_tps * flops_per_token / peak, 3),
        **extra,
    }, indent=2))


if __name__ == "__main__":
    main()
