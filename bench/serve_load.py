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


async def one_client(client, model: str, question: str, new_tokens: int) -> dict:
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=new_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    arrivals, tokens, text = [], 0, ""
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
            text += chunk.choices[0].delta.content
    return {"ttft": arrivals[0] - sent, "itl": [b - a for a, b in zip(arrivals, arrivals[1:])], "tokens": tokens,
            "text": text}


async def wave(url: str, model: str, clients: int, new_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    results = await asyncio.gather(*(one_client(client, model, QUESTIONS[i % len(QUESTIONS)], new_tokens)
                                     for i in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "completion_tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(percentile(ttft, 50), 3), "ttft_p95_s": round(percentile(ttft, 95), 3),
            "itl_p50_ms": round(1000 * percentile(itl, 50), 1), "itl_p95_ms": round(1000 * percentile(itl, 95), 1),
            "texts": [r["text"] for r in results]}


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
    args = ap.parse_args()
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
