"""Tokens per second of each size of `lmlab lab scaling`'s CPU ladder, to size its token budgets to a time budget.

One training step of each size (the ladder's GPT at the experiment's shape: vocab 2,048, 16 x 128 tokens, bf16
autocast as `--dtype auto` picks on a CPU with native bf16), eager, the sizes timed in alternation in one
process so that a change of the machine's load hits all alike (bench/train_throughput.py's step and timing).
train.compile auto compiles a run where the saving repays the compile, so the eager figures are the plan's
upper bound on time.

    python bench/scaling_ladder.py [--threads 1] [--steps 6] [--warmup 2]

The tokens/s are those of a core of one's own: the wall-clock figures divided by the share of the core the
process had while timing (its CPU time over the wall time; core_share in the output).

Prints one JSON object: per size its N (non-embedding) and eager tokens/s; the planned runs
(lmlab.experiments.lab.scaling.plan_runs: the ladder's token budgets, the IsoFLOP budgets' steps) with the
minutes each takes at that speed, and their total (evaluations not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from lmlab.experiments.lab.common import gpt_config, non_embedding_params
from lmlab.experiments.lab.scaling import SCALES, SCALING_LADDERS, plan_runs
from lmlab.models.transformer import Transformer
from train_throughput import make_step, median_step_times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per size (the median is kept)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    scale = SCALES["cpu"]
    block_size, base = scale.block_size, scale.train
    ladder = SCALING_LADDERS["cpu"]
    x = torch.randint(args.vocab_size, (base.batch_size, block_size))
    y = torch.randint(args.vocab_size, (base.batch_size, block_size))
    loss = lambda m, a, b: m(a, b, loss_only=True)[1]  # noqa: E731
    steps, params = {}, {}
    for size in ladder:
        model = Transformer(gpt_config(size, args.vocab_size, block_size))
        params[size.name] = non_embedding_params(model)
        steps[size.name] = make_step(model, loss, (x, y), "bfloat16")
    load_before = os.getloadavg()[0]
    wall, cpu = time.perf_counter(), time.process_time()
    seconds = median_step_times(steps, args.steps, args.warmup)
    # On a shared core the process gets a share of it: the tokens/s of a core of one's own are the wall-clock
    # ones over that share (what a run pinned to a free core would see).
    share = (time.process_time() - cpu) / (time.perf_counter() - wall)
    tokens = base.batch_size * block_size
    speed = {name: round(tokens / s / share) for name, s in seconds.items()}
    plan = plan_runs(scale, list(params.items()), tokens)
    minutes = lambda name, steps: steps * tokens / speed[name] / 60  # noqa: E731
    sizes = [{"name": n, "params": params[n], "eager_tokens_per_s": speed[n]} for n in params]
    ladder_runs = [{**r, "tokens": r["steps"] * tokens, "minutes": round(minutes(r["name"], r["steps"]), 2)}
                   for r in plan["ladder"]]
    done = {(r["name"], r["steps"]) for r in plan["ladder"]}
    budgets = []
    for b in plan["isoflop"]:
        new = {n: s for n, s in b["steps"].items() if (n, s) not in done}
        done |= set(new.items())
        budgets.append({"flops": b["flops"], "centre": b["centre"], "steps": b["steps"],
                        "minutes_new": round(sum(minutes(n, s) for n, s in new.items()), 2)})
    total = sum(r["minutes"] for r in ladder_runs) + sum(b["minutes_new"] for b in budgets)
    print(json.dumps({"threads": args.threads, "dtype": "bfloat16", "tokens_per_step": tokens,
                      "core_share": round(share, 3), "load_before": round(load_before, 2),
                      "load_after": round(os.getloadavg()[0], 2),
                      "sizes": sizes, "ladder": ladder_runs, "isoflop": budgets, "minutes": round(total, 1)},
                     indent=1))


if __name__ == "__main__":
    main()
