"""Compiled decoding's start (issue 28): a cold compile, then a second process that finds the compiled graphs under
$LMLAB_HOME/compiled, and the decoding step compiled against eager; for each route (--route): AOTInductor packages
(lmlab's default for generate's steps) and torch.compile's cached graphs.

Each start is a fresh process (`--compile on`, the model's GGUF file) with LMLAB_HOME in a new folder per
variant, started twice: cold (nothing cached), then warm (the first one's graphs). For each start it prints, in
seconds from the process's spawn: the model loaded, the first token (from the eager prefill) and the first
compiled step's token (the one that waits for the compilation); the CPU seconds the process and its children
(the C++ compiler) used; inductor's FX graph cache hits and misses. The warm process then times --steps one-token
steps compiled and eager, alternating --rounds times (medians, ms per step), and compares 32 greedy tokens
compiled and eager. The torch.compile route's variants: --freezing on (weights folded into the graph as
constants: its default for float weights) and off (weights as graph inputs, so AOTAutograd's cache applies too:
its default for int4/int8). Each start also reports dynamo's timed phases (phases_s: tracing, AOTAutograd,
inductor, cache loads), its counters, and how many recompilations and graph breaks TORCH_LOGS reported. Load
averages at the start and end.

    python bench/compile_start.py [--model smollm2-135m-instruct] [--format int4] [--threads 1]
        [--route package,compile] [--freezing off] [--steps 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmlab.models.hub import resolve

FORMATS = {"fp32": {"dtype": "float32", "quantize": "none"}, "bf16": {"dtype": "bfloat16", "quantize": "none"},
           "int4": {"dtype": "bfloat16", "quantize": "auto"}}

CHILD = r"""
import json, resource, statistics, sys, time
spawned, path, settings, freezing, steps, rounds = (float(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]),
                                                    sys.argv[4] == "on", int(sys.argv[5]), int(sys.argv[6]))
route = sys.argv[8]
import torch
from torch._dynamo.utils import counters
from lmlab.inference.generate import SamplingParams, decode_steps
from lmlab.models.hub import load_pretrained
from lmlab.models.quantize import InferenceSettings

torch.set_num_threads(int(sys.argv[7]))
model = load_pretrained(path, inference=InferenceSettings(**settings, compile="on")).model
plan = model.__dict__["decoding"]
plan.freezing = freezing
plan.package = route == "package"
out = {"loaded_s": time.time() - spawned}
prompt = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
params = SamplingParams(max_new_tokens=3, temperature=0, stop_at_eos=False)
for i, _ in enumerate(decode_steps(model, prompt.tolist(), params)):
    out[["first_token_s", "first_compiled_token_s", "third_token_s"][i]] = time.time() - spawned
out["packaged"] = bool(plan._runners)
usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
out["cpu_s"] = sum(u.ru_utime + u.ru_stime for u in usage)
out["fxgraph_cache"] = {k: counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss")}
out["aot_autograd_cache"] = {k: v for k, v in counters["aot_autograd"].items() if "cache" in k}
out["graphs"] = counters["stats"]["unique_graphs"]
# Where the time went: dynamo's timed phases (tracing, AOTAutograd, inductor, cache loads), summed per phase;
# the guards of the compiled frames.
from torch._dynamo.utils import compilation_time_metrics
out["phases_s"] = {k: round(sum(v), 2) for k, v in sorted(compilation_time_metrics.items(), key=lambda kv: -sum(kv[1]))
                   if sum(v) >= 0.05}
out["counters"] = {group: dict(values) for group, values in counters.items()
                   if group in ("stats", "inductor", "aot_autograd", "recompiles", "graph_break")}


def tokens(on, n=32):
    plan.on = on
    return [t[0] for t in decode_steps(model, prompt.tolist(), SamplingParams(max_new_tokens=n, temperature=0,
                                                                              stop_at_eos=False))]


def ms_per_step(on):
    # decode_steps itself (the calls it compiles for), compiled or eager as the plan says; the first 4 not timed.
    plan.on, times = on, []
    last = time.perf_counter()
    for _ in decode_steps(model, prompt.tolist(), SamplingParams(max_new_tokens=steps + 4, temperature=0,
                                                                  stop_at_eos=False)):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return statistics.median(times[4:]) * 1e3


if rounds:
    compiled, eager = [], []
    for _ in range(rounds):
        compiled.append(ms_per_step(True))
        eager.append(ms_per_step(False))
    out["graphs_after_timing"] = counters["stats"]["unique_graphs"]
    out["compiled_ms"] = round(statistics.median(compiled), 2)
    out["eager_ms"] = round(statistics.median(eager), 2)
    out["speedup"] = round(out["eager_ms"] / out["compiled_ms"], 2)
    out["greedy_equal_eager_32"] = tokens(True) == tokens(False)
print(json.dumps({k: round(v, 1) if isinstance(v, float) and k.endswith("_s") else v for k, v in out.items()}))
"""


def start(home: Path, path: Path, fmt: str, freezing: str, threads: int, steps: int, rounds: int, route: str) -> dict:
    # One compile thread: the C++ compiler runs as children the process waits for, so cpu_s counts them.
    env = {**os.environ, "LMLAB_HOME": str(home), "OMP_NUM_THREADS": str(threads),
           "TORCHINDUCTOR_COMPILE_THREADS": "1", "TORCH_LOGS": "recompiles,graph_breaks"}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    spawned = time.time()
    done = subprocess.run([sys.executable, "-c", CHILD, str(spawned), str(path), json.dumps(FORMATS[fmt]), freezing,
                           str(steps), str(rounds), str(threads), route],
                          env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the child process failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["notices"] = [line for line in done.stderr.splitlines() if line.startswith("lmlab:")]
    # TORCH_LOGS=recompiles,graph_breaks (set below): what dynamo said about recompilations and graph breaks.
    row["recompile_lines"] = sum("Recompiling function" in line for line in done.stderr.splitlines())
    row["graph_break_lines"] = sum("Graph break" in line for line in done.stderr.splitlines())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--format", default="int4", choices=sorted(FORMATS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--route", default="package,compile",
                    help="package: AOTInductor packages (lmlab's default for generate); compile: torch.compile's "
                         "cached graphs, once per --freezing value")
    ap.add_argument("--freezing", default="off")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = resolve(args.model)
    report = {"benchmark": "compile_start", "model": args.model, "format": args.format, "threads": args.threads,
              "load_average_at_start": os.getloadavg(), "variants": {}}
    variants = [(route, freezing) for route in args.route.split(",")
                for freezing in (args.freezing.split(",") if route == "compile" else ["off"])]
    for route, freezing in variants:
        name = "package" if route == "package" else f"compile, freezing {freezing}"
        with tempfile.TemporaryDirectory(prefix="lmlab-compile-start-") as home:
            cold = start(Path(home), path, args.format, freezing, args.threads, args.steps, 0, route)
            warm = start(Path(home), path, args.format, freezing, args.threads, args.steps, args.rounds, route)
        report["variants"][name] = {"cold": cold, "warm": warm}
        print(json.dumps({name: report["variants"][name]}), file=sys.stderr, flush=True)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
