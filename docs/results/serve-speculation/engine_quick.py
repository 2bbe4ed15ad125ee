"""Quick checks of the serving engine in one process (no HTTP), for a machine too busy for bench/serve_load.py:

    python docs/results/serve-speculation/engine_quick.py speculation [--model M] [--new-tokens 64] [--rounds 1]
        one request at a time (batch 1), Engine(speculate=0) and Engine(speculate=8) taking turns, on the copy-heavy
        prompts of bench/decode_throughput.py: tokens/s, and CPU ms per token of this process (what a token costs
        whatever else runs on the core), drafts accepted, identical tokens.
    python docs/results/serve-speculation/engine_quick.py overhead [--model M] [--new-tokens 200] [--rounds 5]
        the engine thread's CPU per decode step against generate's decode loop (decode_steps) per token, taking
        turns: the engine's own cost per step (paged view, sampling, detokenization, events) beside the model's.

One thread (torch.set_num_threads(1)); run it pinned (taskset -c N). Prints JSON.
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
from decode_throughput import SPECULATION_PROMPTS  # noqa: E402

from lmlab.inference.engine import Engine, Request, TokenEvent  # noqa: E402
from lmlab.inference.generate import SamplingParams, decode_steps  # noqa: E402
from lmlab.models.hub import load_pretrained  # noqa: E402
from lmlab.models.quantize import InferenceSettings  # noqa: E402


def complete(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float, float]:
    """Token ids, tokens/s and CPU seconds of this process per token of one request."""
    async def go():
        handle = engine.submit(Request(prompt, params, logprobs=0), asyncio.get_running_loop())
        return [t.id async for e in handle if isinstance(e, TokenEvent) for t in e.tokens]
    start, cpu = time.perf_counter(), time.process_time()
    ids = asyncio.run(go())
    return ids, len(ids) / (time.perf_counter() - start), (time.process_time() - cpu) / len(ids)


def speculation(pre, args) -> dict:
    engines = {k: Engine(pre.model, pre.tokenizer, pre.eos_ids, max_batch=4, context=1024, speculate=k)
               for k in (0, args.speculate)}
    out = {}
    for kind, text in SPECULATION_PROMPTS.items():
        if "copy-heavy" not in kind:
            continue
        prompt = pre.tokenizer.encode(pre.chat_prompt([{"role": "user", "content": text}]),
                                      add_special_tokens=False).ids
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0)
        runs = {k: [] for k in engines}
        for _ in range(args.rounds):
            for k, engine in engines.items():  # taking turns
                before = (engine.stats.draft_tokens, engine.stats.accepted_tokens)
                ids, rate, cpu = complete(engine, prompt, params)
                runs[k].append({"tokens": len(ids), "tokens_per_s": round(rate, 2),
                                "cpu_ms_per_token": round(1000 * cpu, 2),
                                "drafted": engine.stats.draft_tokens - before[0],
                                "accepted": engine.stats.accepted_tokens - before[1], "ids": ids})
        plain, fast = runs[0], runs[args.speculate]
        med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
        out[kind] = {"runs": {str(k): [{x: y for x, y in r.items() if x != "ids"} for r in rs]
                              for k, rs in runs.items()},
                     "speedup_tokens_per_s": round(med(fast, "tokens_per_s") / med(plain, "tokens_per_s"), 2),
                     "speedup_cpu_per_token": round(med(plain, "cpu_ms_per_token") / med(fast, "cpu_ms_per_token"), 2),
                     "identical_tokens": all(a["ids"] == b["ids"] for a, b in zip(plain, fast))}
    for engine in engines.values():
        engine.close()
    return out


def overhead(pre, args) -> dict:
    prompt = pre.tokenizer.encode(pre.chat_prompt([{"role": "user", "content": "What is the capital of France?"}]),
                                  add_special_tokens=False).ids
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, stop_at_eos=False)
    engine = Engine(pre.model, pre.tokenizer, pre.eos_ids, max_batch=16, context=1024)
    steps, step = [], engine._decode_step

    def timed_step():  # the engine thread's own CPU time, per decode step
        start = time.thread_time()
        step()
        steps.append(time.thread_time() - start)
    engine._decode_step = timed_step

    def engine_once():
        steps.clear()
        complete(engine, prompt, params)
        return 1000 * statistics.median(steps)

    def generate_once():
        times, last = [], time.thread_time()
        for _ in decode_steps(pre.model, [prompt], params, pre.eos_ids):
            now = time.thread_time()
            times.append(now - last)
            last = now
        return 1000 * statistics.median(times[1:])  # the first includes the prompt

    engine_once(), generate_once()  # warm up
    runs = {"engine_step_cpu_ms": [], "generate_step_cpu_ms": []}
    for _ in range(args.rounds):
        runs["engine_step_cpu_ms"].append(round(engine_once(), 3))
        runs["generate_step_cpu_ms"].append(round(generate_once(), 3))
    engine.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"runs": runs, "median": med,
            "engine_extra_cpu_ms_per_step": round(med["engine_step_cpu_ms"] - med["generate_step_cpu_ms"], 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["speculation", "overhead"])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--speculate", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pre = load_pretrained(args.model, inference=InferenceSettings(compile="off"))  # serve's defaults
    load_before = os.getloadavg()
    report = speculation(pre, args) if args.mode == "speculation" else overhead(pre, args)
    print(json.dumps({"mode": args.mode, "model": args.model, "new_tokens": args.new_tokens, "rounds": args.rounds,
                      "threads": 1, "format": "lmlab serve's default (int4 weights of the GGUF, bf16); compile off",
                      **report, "load_average_before": load_before, "load_average_after": os.getloadavg()},
                     indent=2))


if __name__ == "__main__":
    main()
