"""bench/serve_load.py's --mixed-contexts mode: one paged-KV server under clients of mixed context lengths, in a pool
smaller than they would take at once, and the server's memory at start (issue 29).

    python bench/serve_load.py --mixed-contexts 100,2000 --kv-cache-tokens 12288 --context 2048 \\
        [--clients 16] [--rounds 3] [--new-tokens 32] [--max-batch 16] [--threads 1]

Starts ONE `lmlab serve` (the serve defaults, --max-batch, --context and --kv-cache-tokens as given) and sends
--clients concurrent clients, each --rounds completions one after the other, whose prompts are slices of a real
document (WikiText-2's test text from ../shared/data beside the checkout, else generated words) with lengths drawn
uniformly (SEED) from the range, --new-tokens tokens each (ignore_eos, greedy, streamed). Records:
  - every request's HTTP status (the goal: all 200, none 5xx; an error inside a 200 stream counts as a failure),
  - the requests that had to wait for KV cache blocks (the engine's lmlab_kv_cache_waits_total: a row was free
    but the blocks were not), and /metrics sampled every second: blocks used/free, queue depth, running
    sequences, and the server's resident memory,
  - the prompt-length distribution, aggregate completion tokens/s and prompt tokens/s, TTFT p50/p95,
  - memory at start: the server process's resident memory (RSS) once /health answers, before any request, against
    the model's weight bytes + the pool's bytes + the runtime of an empty Python process that imported torch.
    The pool's bytes are computed from the model's config the engine's way (layers x keys and values x (blocks + 1
    spare) x block size x kv heads x head dim x the compute dtype's bytes) and checked against the server's own
    lmlab_kv_cache_bytes. The runtime and the weights are measured in a fresh process (this module's PROBE): the
    RSS (VmRSS) after `import torch`, then after importing everything `lmlab serve` imports, then after loading
    the model with the serve defaults (weights: lmlab.models.quantize.weight_bytes).
Prints one JSON object on stdout and a table on stderr. Target (issue 29): all served, no 5xx, with the pool
smaller than clients x context; the RSS at start within the bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

from serve_load import cpu_seconds, percentile, start_server, wait_ready, wave

# The shared data folder beside the checkout (/work/shared/data for /work/<checkout>): the bench may read it, the
# product never does.
DOCUMENT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "wiki.test.raw"
DOCUMENT_CHARS = 600_000  # about 140k SmolLM2 tokens: room for slices of 2,000 at many offsets
SEED = 0  # of the prompts' lengths and offsets
WATCH_SECONDS = 1.0  # between samples of /metrics and the server's RSS

PROBE = """
import json, sys

def rss_mb(part="VmRSS"):  # resident now (VmRSS), not the peak; RssAnon: the heap, RssFile: mapped files
    for line in open("/proc/self/status"):
        if line.startswith(part + ":"):
            return int(line.split()[1]) / 1024

import torch
torch_mb = rss_mb()
import lmlab.inference.server  # everything `lmlab serve` imports
from lmlab.inference.engine import Engine
from lmlab.models.hub import load_pretrained
from lmlab.models.quantize import InferenceSettings, weight_bytes
server_modules_mb = rss_mb()
model, tokens = sys.argv[1], int(sys.argv[2])
pre = load_pretrained(model, inference=InferenceSettings(compile="off"))  # serve's defaults, as the bench starts it
loaded_mb, loaded_parts = rss_mb(), {part: rss_mb(part) for part in ("RssAnon", "RssFile")}
c, block = pre.model.config, Engine.BLOCK_SIZE
pool = c.n_layer * 2 * (tokens // block + 1) * block * (c.n_kv_head or c.n_head) * c.head_dim \\
    * pre.model.tok_emb.weight.element_size()
print(json.dumps({"python_torch_mb": torch_mb, "python_torch_server_modules_mb": server_modules_mb,
                  "after_model_load_mb": loaded_mb, "after_model_load_parts_mb": loaded_parts,
                  "weights_mb": weight_bytes(pre.model) / 2**20, "pool_mb": pool / 2**20,
                  "compute_dtype": str(pre.model.tok_emb.weight.dtype),
                  "ids": pre.tokenizer.encode(sys.stdin.read(), add_special_tokens=False).ids}))  # the document
"""


def probe(model: str, kv_cache_tokens: int) -> tuple[dict, list[int], str]:
    """The runtime's and the model's memory, the pool's bytes, and the document's token ids (a fresh process)."""
    if DOCUMENT.is_file():
        source, text = str(DOCUMENT), DOCUMENT.read_text()[:DOCUMENT_CHARS]
    else:  # generated words: what matters is the tokens' count, not their sense
        rng = random.Random(0)
        words = "the of and to in a is that for it as was with be by on not he this are or his from at".split()
        source, text = "generated words", " ".join(rng.choice(words) for _ in range(DOCUMENT_CHARS // 4))
    done = subprocess.run([sys.executable, "-c", PROBE, model, str(kv_cache_tokens)], input=text, text=True,
                          capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"the memory probe failed: {done.stderr.strip().splitlines()[-1]}")
    memory = json.loads(done.stdout.splitlines()[-1])
    return memory, memory.pop("ids"), source


def draw_prompts(ids: list[int], lo: int, hi: int, clients: int, rounds: int, seed: int) -> list[list[list[int]]]:
    """Each client's prompts: slices of the document at random offsets, lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    prompts = [[] for _ in range(clients)]
    for _ in range(rounds):
        for mine in prompts:
            n = rng.randint(lo, hi)
            start = rng.randrange(len(ids) - n)
            mine.append(ids[start:start + n])
    return prompts


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples without labels."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line and not line.startswith("#")
            and "{" not in line}


def metric_value(url: str, name: str) -> float:
    """One sample of the server's /metrics (a counter or gauge without labels)."""
    value = metrics(url).get(name)
    if value is None:
        raise SystemExit(f"{name} is missing from {url}/metrics")
    return value


def resident_mb(pid: int) -> dict[str, float]:
    """A process's resident memory now (VmRSS) and its parts: RssAnon (the heap: tensors, Python's objects) and
    RssFile (mapped files: the libraries' code, a model file), from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {part: int(fields[part].split()[0]) / 1024 for part in ("VmRSS", "RssAnon", "RssFile")}


def rss_mb(pid: int) -> float:
    return resident_mb(pid)["VmRSS"]


async def one_request(client, model: str, ids: list[int], new_tokens: int) -> dict:
    """One streamed completion; its status: 200 when it streamed to its end, the HTTP status of a refusal, or the
    error that ended a stream."""
    import openai

    sent, first, tokens = time.perf_counter(), None, 0
    try:
        stream = await client.completions.create(
            model=model, prompt=ids, max_tokens=new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
        status = 200
    except openai.APIStatusError as e:
        status = e.status_code
    except openai.APIError as e:  # after the 200 header, or no answer at all
        status = f"{type(e).__name__}: {e}"
    return {"prompt_tokens": len(ids), "status": status, "completion_tokens": tokens,
            "ttft_s": None if first is None else round(first - sent, 3), "wall_s": round(time.perf_counter() - sent, 3)}


async def drive(url: str, model: str, prompts: list[list[list[int]]], new_tokens: int, pid: int,
                every: float) -> tuple[list[dict], list[dict], float]:
    """Every client's prompts in turn, the clients at once, /metrics and the server's RSS sampled meanwhile."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    samples, start, done = [], time.perf_counter(), asyncio.Event()

    async def one_client(mine):
        return [await one_request(client, model, ids, new_tokens) for ids in mine]

    async def watch():
        while not done.is_set():
            t = round(time.perf_counter() - start, 1)
            try:
                m = await asyncio.to_thread(metrics, url)
                samples.append({"t_s": t, "rss_mb": round(rss_mb(pid), 1), **{k: int(m[f"lmlab_{k}"]) for k in (
                    "kv_cache_blocks_used", "kv_cache_blocks_free", "queue_depth", "running_sequences",
                    "kv_cache_waits_total")}})
            except OSError as e:  # a lost sample is no reason to lose the run's report
                samples.append({"t_s": t, "error": str(e)})
            try:
                await asyncio.wait_for(done.wait(), every)
            except asyncio.TimeoutError:
                pass
    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(one_client(mine) for mine in prompts))
    wall = time.perf_counter() - start
    done.set()
    await watcher
    await client.close()
    return [r for rs in results for r in rs], samples, wall


def distribution(values: list[float]) -> dict:
    values = sorted(values)
    return {"n": len(values), "min": values[0], "p25": round(percentile(values, 25)),
            "p50": round(percentile(values, 50)), "p75": round(percentile(values, 75)), "max": values[-1],
            "mean": round(statistics.mean(values), 1)}


def mixed_contexts_report(args) -> dict:
    """--mixed-contexts LO,HI: see the module's docstring."""
    from lmlab.inference.server import model_id_for

    lo, hi = (int(x) for x in args.mixed_contexts.split(","))
    if not 1 <= lo <= hi or hi + args.new_tokens > args.context:
        raise SystemExit(f"--mixed-contexts {lo},{hi} with --new-tokens {args.new_tokens} must fit --context "
                         f"{args.context}")
    clients = max(int(c) for c in args.clients.split(","))
    memory, ids, source = probe(args.model, args.kv_cache_tokens)
    prompts = draw_prompts(ids, lo, hi, clients, args.rounds, SEED)
    load_before = os.getloadavg()
    proc, url = start_server(args.model, args.max_batch, args.threads, args.context,
                             ("--kv-cache-tokens", str(args.kv_cache_tokens)))
    try:
        wait_ready(proc, url, args.start_timeout)
        at_start = resident_mb(proc.pid)  # ready, before any request
        memory["server_rss_at_start_mb"] = at_start.pop("VmRSS")
        memory["server_rss_at_start_parts_mb"] = at_start
        start_metrics = metrics(url)
        asyncio.run(wave(url, model_id_for(args.model), 1, 8))  # warm up (a short chat)
        waits_before, cpu_before = metrics(url)["lmlab_kv_cache_waits_total"], cpu_seconds(proc.pid)[0]
        results, samples, wall = asyncio.run(drive(url, model_id_for(args.model), prompts, args.new_tokens,
                                                   proc.pid, WATCH_SECONDS))
        end_metrics, server_cpu = metrics(url), cpu_seconds(proc.pid)[0] - cpu_before
        memory["server_rss_after_mb"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    report = summarize(args, results, samples, wall, memory, start_metrics, end_metrics["lmlab_kv_cache_waits_total"]
                       - waits_before, source)
    # The server's CPU seconds: about the wall time the run would take alone on its core (a shared core stretches
    # the wall time, not the work).
    report.update(server_cpu_s=round(server_cpu, 1), load_average_before=load_before,
                  load_average_at_end=os.getloadavg())
    print_table(report)
    return report


def summarize(args, results: list[dict], samples: list[dict], wall: float, memory: dict, start_metrics: dict,
              waits: float, source: str) -> dict:
    lengths = [r["prompt_tokens"] for r in results]
    statuses = Counter(str(r["status"]) for r in results)
    served = [r for r in results if r["status"] == 200 and r["completion_tokens"] == args.new_tokens]
    ttft = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    memory = memory_bounds(memory, start_metrics["lmlab_kv_cache_bytes"] / 2**20, samples)
    rss_within = memory["within_bound"]
    five_xx = sum(n for s, n in statuses.items() if s.isdigit() and s.startswith("5"))
    return {"model": args.model, "threads": args.threads, "clients": len(results) // args.rounds,
            "requests_per_client": args.rounds, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
            "context": args.context, "kv_cache_tokens": args.kv_cache_tokens,
            "pool_vs_clients_x_context": round(args.kv_cache_tokens / (len(results) // args.rounds * args.context), 3),
            "pool_blocks": int(start_metrics["lmlab_kv_cache_blocks_free"]), "document": source, "seed": SEED,
            "prompt_tokens": distribution(lengths), "statuses": dict(statuses),
            "served": f"{len(served)}/{len(results)}", "five_xx": five_xx,
            "requests_that_waited_for_blocks": int(waits),
            "max_blocks_used": max((s["kv_cache_blocks_used"] for s in samples if "error" not in s), default=None),
            "max_queue_depth": max((s["queue_depth"] for s in samples if "error" not in s), default=None),
            "wall_s": round(wall, 1), "completion_tokens_per_s": round(sum(r["completion_tokens"] for r in results)
                                                                       / wall, 2),
            "prompt_tokens_per_s": round(sum(lengths) / wall, 1),
            "ttft_p50_s": round(percentile(ttft, 50), 3) if ttft else None,
            "ttft_p95_s": round(percentile(ttft, 95), 3) if ttft else None,
            "memory_mb": memory, "requests": results, "metrics_samples": samples,
            "target": {"all_served_no_5xx": True, "rss_at_start_within_bound": True},
            "target_met": {"all_served_no_5xx": len(served) == len(results) and five_xx == 0,
                           "rss_at_start_within_bound": rss_within}}


def memory_bounds(memory: dict, pool_server_mb: float, samples: list[dict]) -> dict:
    """The server's RSS at start against three bounds: Python+torch + weights + pool (the goal's), the same with
    everything `lmlab serve` imports, and a process that imported it all and loaded the model + the pool (what the
    engine's start adds beyond its pool)."""
    weights_pool = memory["weights_mb"] + memory["pool_mb"]
    bounds = {"bound_python_torch_weights_pool_mb": memory["python_torch_mb"] + weights_pool,
              "bound_with_server_modules_mb": memory["python_torch_server_modules_mb"] + weights_pool,
              "bound_model_loaded_plus_pool_mb": memory["after_model_load_mb"] + memory["pool_mb"]}
    rss = memory["server_rss_at_start_mb"]
    out = {k: round(v, 1) if isinstance(v, float) else {p: round(x, 1) for p, x in v.items()}
           if isinstance(v, dict) else v for k, v in {**memory, **bounds}.items()}
    out.update(pool_mb_server=round(pool_server_mb, 1), pool_bytes_match=abs(pool_server_mb - memory["pool_mb"]) < 0.05,
               within_bound=rss <= bounds["bound_python_torch_weights_pool_mb"],
               within_bound_with_server_modules=rss <= bounds["bound_with_server_modules_mb"],
               engine_start_beyond_pool_mb=round(rss - bounds["bound_model_loaded_plus_pool_mb"], 1),
               loading_beyond_weights_mb=round(memory["after_model_load_mb"] - memory["python_torch_server_modules_mb"]
                                               - memory["weights_mb"], 1),
               server_rss_max_during_run_mb=max((s["rss_mb"] for s in samples if "error" not in s), default=None))
    return out


def print_table(r: dict) -> None:
    m, p = r["memory_mb"], r["prompt_tokens"]
    print(f"{r['clients']} clients x {r['requests_per_client']} requests, prompts {p['min']}-{p['max']} tokens "
          f"(p50 {p['p50']}, mean {p['mean']}), {r['new_tokens']} new tokens each; pool {r['kv_cache_tokens']} tokens "
          f"= {r['pool_vs_clients_x_context']:.0%} of clients x context", file=sys.stderr)
    print(f"{'served':>8} {'statuses':>16} {'waited':>7} {'max blocks':>10} {'tokens/s':>9} {'prompt tok/s':>12} "
          f"{'TTFT p50':>9} {'TTFT p95':>9} {'wall':>7}", file=sys.stderr)
    print(f"{r['served']:>8} {json.dumps(r['statuses']):>16} {r['requests_that_waited_for_blocks']:>7} "
          f"{r['max_blocks_used']!s:>10} {r['completion_tokens_per_s']:>9.1f} {r['prompt_tokens_per_s']:>12.1f} "
          f"{r['ttft_p50_s']!s:>8}s {r['ttft_p95_s']!s:>8}s {r['wall_s']:>6.0f}s (server CPU {r['server_cpu_s']} s)",
          file=sys.stderr)
    print(f"server RSS at start {m['server_rss_at_start_mb']} MB; bound: Python+torch {m['python_torch_mb']} + "
          f"weights {m['weights_mb']} + pool {m['pool_mb']} = {m['bound_python_torch_weights_pool_mb']} MB "
          f"({'within' if m['within_bound'] else 'OVER'}); with the server's modules imported "
          f"{m['bound_with_server_modules_mb']} MB; a process that loaded the model "
          f"{m['after_model_load_mb']} MB (loading beyond the weights: {m['loading_beyond_weights_mb']} MB) + pool = "
          f"{m['bound_model_loaded_plus_pool_mb']} MB (the engine's start beyond its pool: "
          f"{m['engine_start_beyond_pool_mb']} MB); max during the run {m['server_rss_max_during_run_mb']} MB",
          file=sys.stderr)
