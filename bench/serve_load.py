"""Serving under load: continuous batching vs one request at a time, same model, same machine, same run.

Starts two `lmlab serve` processes with SmolLM2-135M-Instruct: one with continuous batching (--max-batch 16) and
one that serves one request at a time (--max-batch 1; the others wait in its queue). Then, from this process,
drives each with N concurrent streaming chat clients (N = 1, 4, 16; the two servers take turns, so that other load
on the machine hits both), each asking its own question for exactly --new-tokens tokens (ignore_eos), and
measures:
  - aggregate output tokens/s: all completion tokens of the wave / the wave's wall time,
  - time to first token (TTFT): from sending the request to its first streamed text, p50 / p95,
  - inter-token latency (ITL): gaps between consecutive streamed chunks of a response, p50 / p95.

    python bench/serve_load.py [--model smollm2-135m-instruct] [--threads 2] [--new-tokens 128] [--clients 1,4,16]

Target (issue 6): at 16 clients, at least 3x the aggregate tokens/s of one-at-a-time, with p95 TTFT under 2 s.
Prints one JSON object on stdout and a table on stderr.

    python bench/serve_load.py --invariance [--clients 16] [--new-tokens 32]

instead runs the engine in this process and checks "same request, same tokens, whatever else runs": every
question alone, then all of them together (half greedy, half seeded sampling), with and without batch_invariant,
and counts the requests whose tokens, and whose log-probabilities bit for bit, differ.

    python bench/serve_load.py --shared-prefix 1000 [--clients 16] [--new-tokens 32] [--rounds 2]

instead compares two continuous-batching servers that differ only in automatic prefix caching (--no-prefix-cache
on one): every client's chat starts with the same system message of about N tokens (a new one each round, so
each round starts cold). The first client goes alone; when its first token arrives (its prompt is prefilled, and
cached on the one server) the other clients start together. Reports the TTFT p50 of the requests after the first
and the aggregate tokens/s of the round. Target (issue 29): TTFT p50 <= 0.25x and tokens/s >= 1.5x without caching.

or

    python bench/serve_load.py --response-format json_schema [--clients 16] [--new-tokens 64]

instead starts one continuous-batching server and alternates waves of plain requests with waves whose requests
carry a response_format (json_schema: ANSWER_SCHEMA below; json_fixed: FIXED_SCHEMA, answers of one length; or
json_object): structured outputs' tokens/s against
unconstrained ones (issue 29: >= 0.9x at 16 clients), and how many constrained outputs validate against the schema
(jsonschema). A constrained answer ends when its JSON closes, so its waves count
the tokens actually generated (up to 4 x --new-tokens each).

    python bench/serve_load.py --adapters 4 [--clients 16] [--new-tokens 64] [--rounds 2]

instead serves N rank-8 LoRA adapters made in code (random A, small random B, every attention and MLP layer;
written as lmlab sft writes its runs) on one server (--adapter NAME=RUN each) and alternates three waves: the
same base model on a server without adapters, base requests on the adapter server, and requests spread over the
N adapters (client i asks adapter i % N: with 16 clients and 4 adapters, 4 rows of each in every batch). Beside
tokens/s it counts the tokens per CPU second of the serving process (psutil), which other processes on a shared
core do not dilute. Target (issue 29): mixed adapters >= 0.8x the base server's tokens/s.

    python bench/serve_load.py --speculate 8 [--clients 1] [--new-tokens 128] [--rounds 2]

instead starts two continuous-batching servers that differ only in --speculate (0 and N: prompt-lookup drafts in
the engine) and sends them, in turn, one client at a time with copy-heavy chats (a code edit, a quoted answer: the
prompts of bench/decode_throughput.py) and free text, each ending at EOS or --new-tokens. Reports tokens/s of each
(completion tokens / wall time of the request, TTFT included), the ratio, the drafts accepted (/metrics) and whether
the greedy texts are identical. Target (issue 29): >= 1.5x at batch 1 on the copy-heavy prompts.

    python bench/serve_load.py --versus-generate [--new-tokens 64] [--rounds 3]

instead compares one client of a server with `lmlab generate`'s decoding loop (decode_steps) in this process: the
same model, weights, threads and compile setting (off), the same chat prompt, one after the other, --rounds times.
Reports the decode tokens/s of each (generated tokens after the first / the time from the first to the last: the
rate `lmlab generate` prints; for the server, from the arrival of the first streamed text to the last), their
ratio, and CPU seconds per token: the server's process (and its busiest threads: the engine's, the HTTP loop's),
this client's, and generate's. Target (issue 29): one client >= 0.9x generate's decode tokens/s.

    python bench/serve_load.py --mixed-contexts 100,2000 --kv-cache-tokens 12288 --context 2048 [--rounds 3]

instead: clients of mixed context lengths in a small KV pool, and the server's memory at start (bench/serve_pool.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple words.", "Write a short poem about rain.",
    "How do airplanes stay in the air?", "Give me three tips for learning to cook.", "What is a prime number?",
    "Describe the water cycle.", "Why is the sky blue?", "Summarize the story of Romeo and Juliet.",
    "What does a computer's CPU do?", "How can I sleep better?", "What is machine learning?",
    "Tell me about the Moon.", "How do vaccines work?", "What are the planets of the solar system?",
    "Why do leaves change colour in autumn?",
]


# Bounded strings and an integer (a number's decimals may run on), so that an answer closes within 4 x --new-tokens
# tokens and every output can validate.
ANSWER_SCHEMA = {"type": "object", "properties": {
    "answer": {"type": "string", "maxLength": 100},
    "steps": {"type": "array", "items": {"type": "string", "maxLength": 50}, "minItems": 2, "maxItems": 3},
    "confidence": {"type": "integer", "minimum": 1, "maximum": 10}},
    "required": ["answer", "steps", "confidence"], "additionalProperties": False}
# json_fixed: one string of exactly 150 characters (about 40-50 tokens), so that the constrained answers have
# nearly one length, as the plain ones (ignore_eos) do, and the two kinds of wave end alike.
FIXED_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 150, "maxLength": 150}},
                "required": ["answer"], "additionalProperties": False}
RESPONSE_FORMATS = {"json_schema": {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA,
                                                                           "strict": True}},
                    "json_fixed": {"type": "json_schema", "json_schema": {"name": "answer", "schema": FIXED_SCHEMA,
                                                                          "strict": True}},
                    "json_object": {"type": "json_object"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --formats: two continuous-batching servers that differ only in their weights (issue 14).
FORMAT_FLAGS = {"fp32": ["--dtype", "float32", "--quantize", "none"],
                "int4": ["--dtype", "bfloat16", "--quantize", "auto"]}  # the GGUF's Q4_1 blocks kept as int4


def start_server(model: str, max_batch: int, threads: int, context: int,
                 flags: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", "--model", model, "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", "64", "--context", str(context),
                             "--compile", "off", *flags], env=env, stdout=subprocess.DEVNULL)  # as measured: eager
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen, url: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"the server at {url} did not start in {seconds} s")


async def one_client(client, model: str, question: str, new_tokens: int, response_format: dict | None = None,
                     system: str | None = None, first_token: asyncio.Event | None = None,
                     ignore_eos: bool = True) -> dict:
    sent = time.perf_counter()
    messages = [{"role": "system", "content": system}] * (system is not None) + [{"role": "user", "content": question}]
    constrained = {"response_format": response_format, "max_tokens": 4 * new_tokens} if response_format else {}
    stream = await client.chat.completions.create(**{
        "model": model, "messages": messages, "max_tokens": new_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
        "extra_body": {"ignore_eos": ignore_eos}, **constrained})
    arrivals, tokens, prompt_tokens, text = [], 0, 0, ""
    async for chunk in stream:
        if chunk.usage is not None:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            text += chunk.choices[0].delta.content
            if first_token is not None:
                first_token.set()
    return {"ttft": arrivals[0] - sent, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens,
            "prompt_tokens": prompt_tokens, "text": text, "wall": time.perf_counter() - sent,
            "decode_s": arrivals[-1] - arrivals[0]}


async def wave(url: str, model: str | list[str], clients: int, new_tokens: int,
               response_format: dict | None = None) -> dict:
    """`clients` chats at once; a list of models: client i asks model[i % len(model)] (adapters mixed)."""
    import openai

    models = [model] if isinstance(model, str) else model
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)],
                                                new_tokens, response_format) for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
            "itl_p50_ms": round(1000 * percentile(itl, 50), 1), "itl_p95_ms": round(1000 * percentile(itl, 95), 1),
            "mean_completion_tokens": round(tokens / clients, 1), "texts": [r["text"] for r in results]}


def structured_load(args) -> None:
    """--response-format: plain and constrained waves, alternating on one server (see the module's docstring)."""
    import jsonschema
    from lmlab.inference.server import model_id_for

    model_id, response_format = model_id_for(args.model), RESPONSE_FORMATS[args.response_format]
    schema = {"json_schema": ANSWER_SCHEMA, "json_fixed": FIXED_SCHEMA}.get(args.response_format, {"type": "object"})
    proc, url = start_server(args.model, args.max_batch, args.threads, args.context)
    waves = {"unconstrained": [], args.response_format: []}
    try:
        wait_ready(proc, url)
        asyncio.run(wave(url, model_id, 1, 8))  # warm up, the grammar engine's tokenizer too
        asyncio.run(wave(url, model_id, 1, 8, response_format))
        clients = max(int(c) for c in args.clients.split(","))
        for _ in range(args.rounds):
            for name in waves:  # the two kinds take turns, so that other load on the machine hits both
                waves[name].append(asyncio.run(wave(url, model_id, clients, args.new_tokens,
                                                    response_format if name != "unconstrained" else None)))
                print(f"{name}: {waves[name][-1]['tokens_per_s']} tokens/s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    texts = [t for w in waves[args.response_format] for t in w.pop("texts")]
    report_texts = texts[:4]
    for w in waves["unconstrained"]:
        w.pop("texts")

    def validates(text):
        try:
            jsonschema.validate(json.loads(text), schema)
            return True
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False

    rate = {name: sum(w["completion_tokens"] for w in ws) / sum(w["wall_s"] for w in ws) for name, ws in waves.items()}
    ratio = rate[args.response_format] / rate["unconstrained"]
    report = {"model": args.model, "threads": args.threads, "clients": clients, "new_tokens": args.new_tokens,
              "response_format": response_format, "waves": waves,
              "tokens_per_s": {k: round(v, 2) for k, v in rate.items()},
              "constrained_vs_unconstrained_tokens_per_s": round(ratio, 3),
              "valid_outputs": f"{sum(map(validates, texts))}/{len(texts)}", "example_outputs": report_texts,
              "invalid_outputs": [t for t in texts if not validates(t)],
              "load_average_at_end": os.getloadavg(), "target": {"ratio": 0.9}, "target_met": ratio >= 0.9}
    print(f"{'requests':16} {'tokens/s':>9} {'mean tokens':>12}", file=sys.stderr)
    for name, ws in waves.items():
        mean = statistics.mean(w["mean_completion_tokens"] for w in ws)
        print(f"{name:16} {rate[name]:>9.1f} {mean:>12.1f}", file=sys.stderr)
    print(f"ratio {ratio:.3f}; valid {report['valid_outputs']}", file=sys.stderr)
    print(json.dumps(report, indent=2))


def make_adapter_runs(model: str, n: int, folder, rank: int = 8, seed: int = 0) -> dict[str, str]:
    """n LoRA runs of rank `rank` (alpha 2 x rank) on every attention and MLP layer of `model`, made in code: A as
    LoRA initialises it, B small and random (so that each adapter changes the text a little), written as lmlab sft
    writes a run. {adapter name: run folder}."""
    from pathlib import Path

    import torch
    from lmlab.models import checkpoint
    from lmlab.models.hub import load_pretrained
    from lmlab.models.peft import add_lora, method_settings

    settings = method_settings("lora", r=rank, alpha=2 * rank)
    base = load_pretrained(model).model
    add_lora(base, **settings)
    runs = {}
    for i in range(n):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name.endswith("lora_A"):
                    torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
                elif name.endswith("lora_B"):
                    p.normal_(0.0, 0.002)
        runs[f"lora{i + 1}"] = str(checkpoint.save_tuned_run(Path(folder) / f"lora{i + 1}", base, model, "lora",
                                                             settings))
    return runs


def adapters_report(args) -> dict:
    """--adapters N: base server, base rows on the adapter server, mixed adapters; the waves take turns."""
    import tempfile

    from lmlab.inference.server import model_id_for

    model_id = model_id_for(args.model)
    clients = max(int(c) for c in args.clients.split(","))
    with tempfile.TemporaryDirectory(prefix="lmlab-adapters-") as folder:  # the runs, read by the server at start
        return _adapters_report(args, model_id, clients, make_adapter_runs(args.model, args.adapters, folder))


def _adapters_report(args, model_id: str, clients: int, runs: dict[str, str]) -> dict:
    import psutil

    def server_cpu_s(proc) -> float:
        times = psutil.Process(proc.pid).cpu_times()
        return times.user + times.system

    flags = tuple(f for name, run in runs.items() for f in ("--adapter", f"{name}={run}"))
    servers = {"base": start_server(args.model, args.max_batch, args.threads, args.context),
               "adapters": start_server(args.model, args.max_batch, args.threads, args.context, flags)}
    kinds = {"base_server": ("base", model_id), "adapter_server_base_rows": ("adapters", model_id),
             "adapter_server_mixed_adapters": ("adapters", list(runs))}
    waves = {kind: [] for kind in kinds}
    try:
        for proc, url in servers.values():
            wait_ready(proc, url, args.start_timeout)
            asyncio.run(wave(url, model_id, 1, 8))  # warm up
        asyncio.run(wave(servers["adapters"][1], list(runs), len(runs), 8))
        for _ in range(args.rounds):
            for kind, (server, model) in kinds.items():  # the kinds take turns, so that other load hits all
                proc, url = servers[server]
                cpu = server_cpu_s(proc)
                waves[kind].append(asyncio.run(wave(url, model, clients, args.new_tokens)))
                waves[kind][-1]["server_cpu_s"] = round(server_cpu_s(proc) - cpu, 2)
                print(f"{kind}: {waves[kind][-1]['tokens_per_s']} tokens/s, {waves[kind][-1]['server_cpu_s']} "
                      "server CPU s", file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    texts = {kind: [t for w in ws for t in w.pop("texts")] for kind, ws in waves.items()}
    rate = {kind: sum(w["completion_tokens"] for w in ws) / sum(w["wall_s"] for w in ws) for kind, ws in waves.items()}
    per_cpu = {kind: sum(w["completion_tokens"] for w in ws) / sum(w["server_cpu_s"] for w in ws)
               for kind, ws in waves.items()}
    ratio = rate["adapter_server_mixed_adapters"] / rate["base_server"]
    cpu_ratio = per_cpu["adapter_server_mixed_adapters"] / per_cpu["base_server"]
    base_texts = texts["base_server"]
    same = sum(a == b for a, b in zip(base_texts, texts["adapter_server_base_rows"]))
    changed = sum(a != b for a, b in zip(base_texts, texts["adapter_server_mixed_adapters"]))
    return {"model": args.model, "threads": args.threads, "clients": clients, "new_tokens": args.new_tokens,
            "adapters": args.adapters, "rank": 8, "max_batch": args.max_batch, "waves": waves,
            "tokens_per_s": {k: round(v, 2) for k, v in rate.items()},
            "tokens_per_server_cpu_s": {k: round(v, 2) for k, v in per_cpu.items()},
            "mixed_adapters_vs_base_server_tokens_per_s": round(ratio, 3),
            "mixed_adapters_vs_base_server_tokens_per_cpu_s": round(cpu_ratio, 3),
            "base_rows_vs_base_server_tokens_per_s": round(rate["adapter_server_base_rows"] / rate["base_server"], 3),
            # greedy: the adapter server's base rows say what the base server says; the adapters' rows differ
            "same_text_base_rows_and_base_server": f"{same}/{len(base_texts)}",
            "mixed_texts_differing_from_base": f"{changed}/{len(base_texts)}",
            "load_average_at_end": os.getloadavg(), "target": {"ratio": 0.8},
            "target_met": {"tokens_per_s": ratio >= 0.8, "tokens_per_cpu_s": cpu_ratio >= 0.8}}


def system_message(tokens: int, round_: int) -> str:
    """A system message of about `tokens` tokens (SmolLM2's tokenizer: 27 a rule), different each round."""
    rules = [f"Rule {i} of round {round_}: when asked about topic {i}, answer in plain words and cite source {i}."
             for i in range(max(1, tokens // 27))]
    return " ".join(rules)


async def prefix_wave(url: str, model: str, clients: int, new_tokens: int, system: str) -> dict:
    """The first client alone until its first token; then the others together."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    prefilled = asyncio.Event()
    first = asyncio.create_task(one_client(client, model, QUESTIONS[0], new_tokens, system=system,
                                           first_token=prefilled))
    waiting = asyncio.create_task(prefilled.wait())
    await asyncio.wait({first, waiting}, return_when=asyncio.FIRST_COMPLETED)
    if first.done():
        first.result()  # the first client's error, rather than waiting for a token that will not come
    rest = await asyncio.gather(*(one_client(client, model, QUESTIONS[i % len(QUESTIONS)], new_tokens, system=system)
                                  for i in range(1, clients)))
    results = [await first, *rest]
    wall = time.perf_counter() - start
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in results)),
            "completion_tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "ttft_first_s": round(results[0]["ttft"], 3),
            "ttft_rest_p50_s": round(percentile(sorted(r["ttft"] for r in rest), 50), 3),
            "ttft_rest_p95_s": round(percentile(sorted(r["ttft"] for r in rest), 95), 3),
            "texts": [r["text"] for r in results]}


def shared_prefix_report(args) -> dict:
    from lmlab.inference.server import model_id_for

    model_id = model_id_for(args.model)
    clients = max(int(c) for c in args.clients.split(","))
    context = max(args.context, args.shared_prefix + 256 + args.new_tokens)
    servers = {"prefix_cache": start_server(args.model, args.max_batch, args.threads, context),
               "no_prefix_cache": start_server(args.model, args.max_batch, args.threads, context,
                                               ("--no-prefix-cache",))}
    rounds = {name: [] for name in servers}
    try:
        for proc, url in servers.values():
            wait_ready(proc, url)
            asyncio.run(wave(url, model_id, 1, 8))  # warm up
        for r in range(args.rounds):
            for name, (_, url) in servers.items():  # the two servers take turns
                rounds[name].append(asyncio.run(prefix_wave(url, model_id, clients, args.new_tokens,
                                                            system_message(args.shared_prefix, r))))
                print(f"round {r} {name}: {json.dumps({k: v for k, v in rounds[name][-1].items() if k != 'texts'})}",
                      file=sys.stderr)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    same = sum(a == b for x, y in zip(*rounds.values()) for a, b in zip(x.pop("texts"), y.pop("texts")))
    median = {name: {key: statistics.median(w[key] for w in waves) for key in ("tokens_per_s", "ttft_rest_p50_s")}
              for name, waves in rounds.items()}
    ttft = median["prefix_cache"]["ttft_rest_p50_s"] / median["no_prefix_cache"]["ttft_rest_p50_s"]
    speed = median["prefix_cache"]["tokens_per_s"] / median["no_prefix_cache"]["tokens_per_s"]
    return {"model": args.model, "threads": args.threads, "clients": clients, "shared_prefix": args.shared_prefix,
            "new_tokens": args.new_tokens, "max_batch": args.max_batch, "context": context, "rounds": rounds,
            "median_over_rounds": median, "ttft_rest_p50_cache_vs_none": round(ttft, 3),
            "tokens_per_s_cache_vs_none": round(speed, 2),
            "same_text_with_and_without_cache": f"{same}/{clients * args.rounds}",
            "load_average_at_end": os.getloadavg(),
            "target": {"ttft_rest_p50_ratio_at_most": 0.25, "tokens_per_s_ratio_at_least": 1.5},
            "target_met": ttft <= 0.25 and speed >= 1.5}


def speculation_report(args) -> dict:
    """--speculate N: servers with and without engine speculation, one client at a time (see the docstring)."""
    import openai
    from decode_throughput import SPECULATION_PROMPTS
    from serve_pool import metric_value
    from lmlab.inference.server import model_id_for

    model_id = model_id_for(args.model)
    servers = {"plain": start_server(args.model, args.max_batch, args.threads, args.context),
               f"speculate_{args.speculate}": start_server(args.model, args.max_batch, args.threads, args.context,
                                                           ("--speculate", str(args.speculate)))}
    runs = {name: {kind: [] for kind in SPECULATION_PROMPTS} for name in servers}
    cpu = {name: {kind: [] for kind in SPECULATION_PROMPTS} for name in servers}  # server CPU s per token
    texts = {name: {} for name in servers}
    load_before = os.getloadavg()

    async def one(url, question):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
        try:
            return await one_client(client, model_id, question, args.new_tokens, ignore_eos=False)
        finally:
            await client.close()
    try:
        for proc, url in servers.values():
            wait_ready(proc, url)
            asyncio.run(wave(url, model_id, 1, 8))  # warm up
        for _ in range(args.rounds):
            for kind, question in SPECULATION_PROMPTS.items():
                for name, (proc, url) in servers.items():  # the two servers take turns
                    before = cpu_seconds(proc.pid)[0]
                    r = asyncio.run(one(url, question))
                    cpu[name][kind].append((cpu_seconds(proc.pid)[0] - before) / r["tokens"])
                    runs[name][kind].append(r["tokens"] / r["wall"])
                    texts[name][kind] = r["text"]
                    print(f"{kind} {name}: {r['tokens']} tokens, {r['tokens'] / r['wall']:.1f} tokens/s",
                          file=sys.stderr)
        _, fast_url = servers[f"speculate_{args.speculate}"]
        drafted = metric_value(fast_url, "lmlab_spec_draft_tokens_total")
        accepted = metric_value(fast_url, "lmlab_spec_accepted_tokens_total")
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    plain, fast = servers
    prompts = {}
    for kind in SPECULATION_PROMPTS:
        a, b = statistics.median(runs[plain][kind]), statistics.median(runs[fast][kind])
        ca, cb = statistics.median(cpu[plain][kind]), statistics.median(cpu[fast][kind])
        prompts[kind] = {"plain_tokens_per_s": round(a, 1), "speculative_tokens_per_s": round(b, 1),
                         "speedup": round(b / a, 2), "rounds": {k: [round(x, 1) for x in runs[k][kind]] for k in runs},
                         # what a token costs the server's CPU: the speed-up on an idle core, whatever else runs
                         "server_cpu_ms_per_token": {plain: round(1000 * ca, 2), fast: round(1000 * cb, 2)},
                         "speedup_in_server_cpu": round(ca / cb, 2),
                         "identical_text": texts[plain][kind] == texts[fast][kind]}
    copy = [v["speedup"] for k, v in prompts.items() if "copy-heavy" in k]
    return {"model": args.model, "threads": args.threads, "clients": 1, "new_tokens": args.new_tokens,
            "speculate": args.speculate, "format": "lmlab serve's default (int4 weights of the GGUF, bf16)",
            "compile": "off", "prompts": prompts,
            "drafted_tokens": int(drafted), "accepted_tokens": int(accepted),
            "load_average_before": load_before, "load_average_at_end": os.getloadavg(),
            "target": {"copy_heavy_speedup_at_least": 1.5}, "target_met": min(copy) >= 1.5}


def cpu_seconds(pid: int) -> tuple[float, dict[str, float]]:
    """A process's CPU seconds (user + system) and each of its threads' (by thread id), from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path):
        fields = open(path).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            threads[tid] = read(f"/proc/{pid}/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            pass
    return read(f"/proc/{pid}/stat"), threads


def versus_generate(args) -> dict:
    """--versus-generate: one client of a server against generate's decoding loop (see the docstring)."""
    import torch
    from lmlab.inference.generate import SamplingParams, decode_steps
    from lmlab.inference.server import model_id_for
    from lmlab.models.hub import load_pretrained
    from lmlab.models.quantize import InferenceSettings

    torch.set_num_threads(args.threads)
    model_id = model_id_for(args.model)
    proc, url = start_server(args.model, args.max_batch, args.threads, args.context)
    pre = load_pretrained(args.model, inference=InferenceSettings(compile="off"))  # serve's defaults, as started
    question = QUESTIONS[0]
    prompt = pre.tokenizer.encode(pre.chat_prompt([{"role": "user", "content": question}]),
                                  add_special_tokens=False).ids
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, stop_at_eos=False)

    def generate_once():
        cpu, arrivals = time.process_time(), []
        for _ in decode_steps(pre.model, [prompt], params, pre.eos_ids):
            arrivals.append(time.perf_counter())
        n = len(arrivals)
        return {"decode_tokens_per_s": (n - 1) / (arrivals[-1] - arrivals[0]),
                "cpu_s_per_token": (time.process_time() - cpu) / n}

    async def serve_once():
        import openai
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
        server_before, threads_before = cpu_seconds(proc.pid)
        cpu = time.process_time()
        try:
            r = await one_client(client, model_id, question, args.new_tokens)
        finally:
            await client.close()
        client_cpu = time.process_time() - cpu
        server_after, threads_after = cpu_seconds(proc.pid)
        busiest = sorted((t - threads_before.get(tid, 0.0) for tid, t in threads_after.items()), reverse=True)[:3]
        n = r["tokens"]
        return {"decode_tokens_per_s": (n - 1) / r["decode_s"], "tokens_per_s": n / r["wall"], "ttft_s": r["ttft"],
                "server_cpu_s_per_token": (server_after - server_before) / n,
                "server_busiest_threads_cpu_s_per_token": [round(t / n, 4) for t in busiest],
                "client_cpu_s_per_token": client_cpu / n}

    runs = {"serve_1_client": [], "generate": []}
    load_before = os.getloadavg()
    try:
        wait_ready(proc, url)
        asyncio.run(wave(url, model_id, 1, 8))  # warm up both
        generate_once()
        for _ in range(args.rounds):  # alternating, so that other load on the machine hits both
            runs["serve_1_client"].append(asyncio.run(serve_once()))
            runs["generate"].append(generate_once())
            print(f"serve {runs['serve_1_client'][-1]['decode_tokens_per_s']:.1f}, generate "
                  f"{runs['generate'][-1]['decode_tokens_per_s']:.1f} decode tokens/s", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    median = {name: {key: round(statistics.median(r[key] for r in rs), 4) for key in rs[0]
                     if not isinstance(rs[0][key], list)} for name, rs in runs.items()}
    ratio = median["serve_1_client"]["decode_tokens_per_s"] / median["generate"]["decode_tokens_per_s"]
    return {"model": args.model, "threads": args.threads, "new_tokens": args.new_tokens,
            "format": "lmlab serve's default (int4 weights of the GGUF, bf16), both", "compile": "off, both",
            "runs": runs, "median": median, "serve_vs_generate_decode_tokens_per_s": round(ratio, 3),
            "load_average_before": load_before, "load_average_at_end": os.getloadavg(),
            "target": {"ratio_at_least": 0.9}, "target_met": ratio >= 0.9}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def check_invariance(model: str, clients: int, new_tokens: int, threads: int) -> dict:
    import torch
    from lmlab.inference.engine import Engine, Request, TokenEvent
    from lmlab.inference.generate import SamplingParams
    from lmlab.models.hub import load_pretrained

    torch.set_num_threads(threads)
    pre = load_pretrained(model)
    prompts = [pre.tokenizer.encode(pre.chat_prompt([{"role": "user", "content": q}]), add_special_tokens=False).ids
               for q in (QUESTIONS * clients)[:clients]]
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=0.8 * (i % 2), seed=i, stop_at_eos=False)
              for i in range(clients)]
    report = {}
    for invariant in (False, True):
        engine = Engine(pre.model, pre.tokenizer, pre.eos_ids, max_batch=clients, context=512,
                        batch_invariant=invariant)

        async def run(indices):
            loop = asyncio.get_running_loop()
            handles = [engine.submit(Request(prompts[i], params[i], logprobs=0), loop) for i in indices]

            async def collect(handle):
                return [(t.id, t.logprob) async for e in handle if isinstance(e, TokenEvent) for t in e.tokens]
            return await asyncio.gather(*(collect(h) for h in handles))

        lone = [asyncio.run(run([i]))[0] for i in range(clients)]
        together = asyncio.run(run(range(clients)))
        engine.close()
        report["batch_invariant" if invariant else "default"] = {
            "same_tokens": f"{sum([t for t, _ in a] == [t for t, _ in b] for a, b in zip(lone, together))}/{clients}",
            "same_logprobs_bitwise": f"{sum(a == b for a, b in zip(lone, together))}/{clients}",
            "max_logprob_difference": max(abs(x[1] - y[1]) for a, b in zip(lone, together) for x, y in zip(a, b)
                                          if x[0] == y[0])}
    return {"model": model, "clients": clients, "new_tokens": new_tokens, "threads": threads, **report}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=512, help="tokens per sequence on both servers")
    ap.add_argument("--invariance", action="store_true", help="check batch invariance in-process instead")
    ap.add_argument("--formats", action="store_true",
                    help="int4 (the GGUF's Q4_1 blocks, bf16) against fp32 weights, both continuous batching")
    ap.add_argument("--shared-prefix", type=int, default=0, metavar="N",
                    help="prefix caching on and off, clients sharing a system message of about N tokens")
    ap.add_argument("--response-format", choices=sorted(RESPONSE_FORMATS),
                    help="structured outputs against plain requests on one server instead")
    ap.add_argument("--adapters", type=int, default=0, metavar="N",
                    help="N rank-8 LoRA adapters mixed in the batch against the base model alone instead")
    ap.add_argument("--start-timeout", type=float, default=300,
                    help="seconds a server may take to start (--adapters; a core shared with other jobs needs more)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per server with --shared-prefix (a new prefix each); waves of each kind with "
                         "--response-format and --adapters; requests per client with --mixed-contexts")
    ap.add_argument("--speculate", type=int, default=0, metavar="N",
                    help="servers with and without engine speculation (--speculate N), one client, "
                         "copy-heavy chats")
    ap.add_argument("--versus-generate", action="store_true",
                    help="one client of a server against generate's decoding loop in this process")
    ap.add_argument("--mixed-contexts", metavar="LO,HI", help="prompts of LO to HI tokens in a small pool instead")
    ap.add_argument("--kv-cache-tokens", type=int, default=12288, help="the server's pool with --mixed-contexts")
    args = ap.parse_args()
    import serve_pool  # --mixed-contexts, in a module of its own (this one is long enough)
    # The comparisons other than the client sweep: the first flag given picks one, which prints its JSON report.
    for flag, report in (("adapters", adapters_report), ("speculate", speculation_report),
                         ("versus_generate", versus_generate), ("shared_prefix", shared_prefix_report),
                         ("mixed_contexts", serve_pool.mixed_contexts_report)):
        if getattr(args, flag):
            print(json.dumps(report(args), indent=2))
            return
    if args.response_format:
        structured_load(args)
        return
    if args.invariance:
        clients = max(int(c) for c in args.clients.split(","))
        print(json.dumps(check_invariance(args.model, clients, args.new_tokens, args.threads), indent=2))
        return
    from lmlab.inference.server import model_id_for
    from tqdm import tqdm

    model_id = model_id_for(args.model)
    if args.formats:
        servers = {name: start_server(args.model, args.max_batch, args.threads, args.context, flags)
                   for name, flags in FORMAT_FLAGS.items()}
    else:
        servers = {"continuous_batching": start_server(args.model, args.max_batch, args.threads, args.context),
                   "one_at_a_time": start_server(args.model, 1, args.threads, args.context)}
    results = {name: {} for name in servers}
    try:
        for proc, url in servers.values():
            wait_ready(proc, url)
            asyncio.run(wave(url, model_id, 1, 8))  # warm up
        counts = [int(c) for c in args.clients.split(",")]
        with tqdm(total=len(counts) * len(servers), desc="waves", file=sys.stderr) as bar:
            for clients in counts:
                for name, (_, url) in servers.items():  # the two servers take turns
                    bar.set_postfix_str(f"{name}, {clients} clients")
                    results[name][clients] = asyncio.run(wave(url, model_id, clients, args.new_tokens))
                    bar.update()
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)

    top = max(counts)
    # Greedy texts of the batched wave against the same questions served one at a time (batch-1 arithmetic).
    texts = [results[name][top].pop("texts") for name in servers]
    for rows in results.values():
        for r in rows.values():
            r.pop("texts", None)
    same = sum(a == b for a, b in zip(*texts))
    fast, slow = ("int4", "fp32") if args.formats else ("continuous_batching", "one_at_a_time")
    speedup = results[fast][top]["tokens_per_s"] / results[slow][top]["tokens_per_s"]
    ttft95 = results[fast][top]["ttft_p95_s"]
    report = {
        "model": args.model, "threads": args.threads, "new_tokens": args.new_tokens, "max_batch": args.max_batch,
        "results": {name: {str(k): v for k, v in r.items()} for name, r in results.items()},
        "load_average_at_end": os.getloadavg(), f"{fast}_vs_{slow}_tokens_per_s_at_{top}_clients": round(speedup, 2),
        f"same_text_{fast}_and_{slow}_at_{top}_clients": f"{same}/{top}",
        "target": None if args.formats else {"speedup_at_16_clients": 3.0, "ttft_p95_s": 2.0},
        "target_met": None if args.formats else speedup >= 3.0 and ttft95 < 2.0,
    }
    header = f"{'server':22} {'clients':>7} {'tokens/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8}"
    print(header, file=sys.stderr)
    for name, rows in results.items():
        for clients, r in rows.items():
            print(f"{name:22} {clients:>7} {r['tokens_per_s']:>9.1f} {r['ttft_p50_s']:>8.2f}s {r['ttft_p95_s']:>8.2f}s "
                  f"{r['itl_p50_ms']:>6.0f}ms {r['itl_p95_ms']:>6.0f}ms", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
