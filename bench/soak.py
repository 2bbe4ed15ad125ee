"""Soak: `lmlab serve` under 16 clients for minutes of mixed traffic, and what is left of it afterwards.

Starts `lmlab serve` (a subprocess) on a tiny random Llama-shaped model (a byte-level BPE tokenizer trained on the
generated sentences, a ChatML template; 0.1M parameters: the server is under test, not the model), then 16 client
threads send, for --minutes (default 10), a mix of:
    plain     non-streamed /v1/completions (echo + logprobs on a third of them, as lm-evaluation-harness scores)
    stream    streamed /v1/chat/completions, read to `data: [DONE]`
    cancel    streamed requests dropped after the first few events (the client goes away mid-stream)
    schema    non-streamed chat with a json_schema response_format; a finished answer must parse as JSON
    tool      chat with tools and tool_choice required (streamed or not); a finished answer must hold tool_calls
    adapter   a plain or streamed request to one of two LoRA adapters served on the model (--adapter NAME=RUN,
              rank 8, made in code), their rows mixed with the others' in the batch
    unknown   a request naming an adapter the server does not have, which must get OpenAI's 404 model_not_found
    bad       deliberately invalid bodies (a lone surrogate, a wrong type, a prompt over the context, a schema the
              grammar engine cannot compile, a tool message answering no call), which must get an OpenAI 400
    embed     (with --embedding-model) POST /v1/embeddings of 1-16 texts of 1-120 words, floats or base64
    rag       (with --rag) POST /v1/rag/context: a question of 3-30 words, k 1-8, against an index of lmlab's
              results pages built by `lmlab rag index` with the embedding model
and reports: requests by kind, answers by status code (unexpected ones separately), p50/p95 latency of the
completed requests (streams: to [DONE]; TTFT too), the server's RSS after the warm-up and at the end, and, once the
clients stop, that the engine has every row free and nothing queued (lmlab_running_sequences and
lmlab_queue_depth in /metrics are 0).

    python bench/soak.py [--minutes 10] [--clients 16] [--max-batch 8] [--threads 2]
    python bench/soak.py --embedding-model minilm-l6 --rag --by-class 30     # embeddings and RAG traffic too

--by-class S first sends each kind of request alone for S seconds (after the warm-up) and reports the server's
RSS growth during each: what grows, by request class.

Pass criteria: no 5xx and no unexpected status, every bad request a 400, every row free at the end, and RSS
growth from the warm-up to the end under --rss-bound-mb (default 64 MiB). Not part of `make test` (it runs for
minutes). Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from lmlab.models.hf import export_hf_llama
from lmlab.models.transformer import Transformer, TransformerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches this one reuses
from serve_load import make_adapter_runs  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MODEL_ID = "soak-tiny"
KINDS = ("plain", "stream", "cancel", "schema", "tool", "bad", "adapter", "unknown")
WEIGHTS = (0.2, 0.2, 0.12, 0.12, 0.1, 0.1, 0.14, 0.02)
ADAPTER_IDS = ("lora1", "lora2")  # the adapters the server loads (serve_load.make_adapter_runs names them)
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 8},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["word", "n"], "additionalProperties": False}
EMBEDDING_ID = ""  # the served embedding model's id (main sets it)
EXTRA_WEIGHTS = {"embed": 0.25, "rag": 0.25}  # relative to the kinds above (whose weights sum to 1)
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": SCHEMA}}
WORDS = ["love", "king", "night", "sweet", "death", "lord", "fair", "heart", "the", "of", "my", "thou", "and", "is"]


def tiny_model(folder: Path, context: int) -> Path:
    """A random Llama-shaped model with a real tokenizer and chat template, as a Hugging Face folder."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) + "." for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=512, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       special_tokens=["<|im_start|>", "<|im_end|>"]))
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=tok.get_vocab_size(), block_size=context, n_layer=2, n_head=4,
                               n_kv_head=2, n_embd=64, intermediate_size=128, norm="rmsnorm", position="rope",
                               mlp="swiglu", activation="silu", bias=False, tie_embeddings=False)
    export_hf_llama(Transformer(config), folder, tok, chat_template=CHATML, eos_token="<|im_end|>")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        return r.read().decode()


def gauges(port: int) -> dict[str, float]:
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in get(port, "/metrics").splitlines()
            if line and not line.startswith("#")}


def body_for(kind: str, rng: random.Random) -> tuple[str, dict | bytes]:
    if kind in ("adapter", "unknown"):
        path, body = body_for(rng.choice(["plain", "stream"]), rng)
        return path, {**body, "model": rng.choice(ADAPTER_IDS) if kind == "adapter" else "no-such-adapter"}
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    if kind == "plain":
        body = {"model": MODEL_ID, "prompt": words, "max_tokens": rng.randint(1, 48), "temperature": rng.random()}
        if rng.random() < 1 / 3:
            body.update(echo=True, logprobs=1, max_tokens=1, temperature=0)
        return "/v1/completions", body
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": words}], "seed": rng.randint(0, 99)}
    if kind in ("stream", "cancel"):
        return "/v1/chat/completions", {**chat, "max_tokens": rng.randint(8, 96), "stream": True}
    if kind == "schema":
        return "/v1/chat/completions", {**chat, "max_tokens": 96, "response_format": {
            "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}
    if kind == "tool":
        return "/v1/chat/completions", {**chat, "max_tokens": 96, "tools": [TOOL], "tool_choice": "required",
                                        "parallel_tool_calls": False, "stream": rng.random() < 0.5}
    if kind == "embed":
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120))) for _ in range(rng.randint(1, 16))]
        return "/v1/embeddings", {"model": EMBEDDING_ID, "input": texts if len(texts) > 1 else texts[0],
                                  "encoding_format": rng.choice(["float", "base64"])}
    if kind == "rag":
        return "/v1/rag/context", {"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))),
                                   "k": rng.randint(1, 8)}
    bad = rng.choice([b'{"model": "soak-tiny", "prompt": "\\ud800"}',
                      {"model": MODEL_ID, "prompt": "x", "temperature": "hot"},
                      {"model": MODEL_ID, "prompt": "night " * 5000},
                      {**chat, "response_format": {"type": "json_schema", "json_schema": {
                          "name": "s", "schema": {"type": "objekt"}}}},
                      {**chat, "messages": chat["messages"] + [{"role": "tool", "tool_call_id": "x", "content": "1"}]}])
    return ("/v1/chat/completions" if isinstance(bad, dict) and "messages" in bad else "/v1/completions"), bad


def one_request(port: int, kind: str, rng: random.Random) -> dict:
    path, body = body_for(kind, rng)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    sent = time.perf_counter()
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = {"kind": kind, "status": resp.status}
        whole = kind in ("plain", "schema", "embed", "rag") or (kind in ("tool", "adapter") and not body.get("stream"))
        if resp.status != 200 or whole:
            answer = json.loads(resp.read())
            out["openai_error"] = resp.status == 200 or set(answer.get("error", {})) == {"message", "type", "param",
                                                                                            "code"}
            if resp.status == 200 and kind in ("schema", "tool"):
                out["structured_ok"] = structured_ok(kind, answer["choices"][0])
        elif kind == "cancel":
            for _ in range(rng.randint(1, 4)):
                resp.readline()
            conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
            return out
        else:
            first, events, calls, finish = None, 0, 0, None
            for line in resp:
                events += line.startswith(b"data: {")
                if kind == "tool" and line.startswith(b"data: {"):
                    choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                    calls += bool((choice.get("delta") or {}).get("tool_calls"))
                    finish = choice.get("finish_reason") or finish
                if first is None and events == 2:  # the first event only names the role: the second has text
                    first = time.perf_counter() - sent
                if line.strip() == b"data: [DONE]":
                    break
            if kind == "tool":
                out["structured_ok"] = finish == "length" or calls > 0
            else:
                out["ttft"] = first
        out["latency"] = time.perf_counter() - sent
        return out
    except OSError as e:
        return {"kind": kind, "status": f"connection error: {type(e).__name__}"}
    finally:
        conn.close()


def structured_ok(kind: str, choice: dict) -> bool:
    """A finished structured answer is what was asked for (one cut by max_tokens may be incomplete)."""
    if choice["finish_reason"] == "length":
        return True
    if kind == "tool":
        return choice["finish_reason"] == "tool_calls" and len(choice["message"].get("tool_calls") or []) == 1
    try:
        value = json.loads(choice["message"]["content"])
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == {"word", "n"}


def drive(port: int, clients: int, seconds: float, seed: int, kinds=KINDS, weights=WEIGHTS) -> list[dict]:
    results: list[dict] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < stop:
            r = one_request(port, rng.choices(kinds, weights)[0], rng)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    with tqdm(total=round(seconds), desc="soak", unit="s", file=sys.stderr) as bar:
        while any(t.is_alive() for t in threads):
            time.sleep(1)
            bar.update(min(1, bar.total - bar.n))
            bar.set_postfix_str(f"{len(results)} requests")
    return results


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    pos = (len(values) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(values) - 1)
    return round(values[lo] + (values[hi] - values[lo]) * (pos - lo), 4)


def summarize(results: list[dict], rss: dict, rows_free: dict, args) -> dict:
    by_kind = Counter(r["kind"] for r in results)
    codes = Counter(str(r["status"]) for r in results)
    expected = {"plain": 200, "stream": 200, "cancel": 200, "schema": 200, "tool": 200, "bad": 400, "embed": 200,
                "rag": 200, "adapter": 200, "unknown": 404}
    unexpected = Counter(f"{r['kind']}:{r['status']}" for r in results if r["status"] != expected[r["kind"]])
    latency = {k: [r["latency"] for r in results if r["kind"] == k and "latency" in r and r["status"] == 200]
               for k in ("plain", "stream", "adapter")}
    ttft = [r["ttft"] for r in results if r.get("ttft") is not None]
    growth_mb = (rss["end"] - rss["start"]) / 2**20
    report = {
        "minutes": args.minutes, "clients": args.clients, "max_batch": args.max_batch, "threads": args.threads,
        "requests": len(results), "requests_per_s": round(len(results) / (args.minutes * 60), 2),
        "by_kind": dict(by_kind), "status_codes": dict(codes), "unexpected": dict(unexpected),
        "non_openai_errors": sum(1 for r in results if r.get("openai_error") is False),
        "structured_wrong": sum(1 for r in results if r.get("structured_ok") is False),
        "latency_s": {k: {"p50": percentile(v, 50), "p95": percentile(v, 95), "n": len(v)} for k, v in latency.items()},
        "stream_ttft_s": {"p50": percentile(ttft, 50), "p95": percentile(ttft, 95)},
        "rss_mb": {"start": round(rss["start"] / 2**20, 1), "end": round(rss["end"] / 2**20, 1),
                   "growth": round(growth_mb, 1), "bound": args.rss_bound_mb},
        "at_the_end": rows_free,
        "embedding_model": args.embedding_model, "rag": args.rag,
        "rss_growth_by_class_mb": rss.get("by_class"),
    }
    report["passed"] = (not unexpected and report["non_openai_errors"] == 0 and report["structured_wrong"] == 0
                        and growth_mb < args.rss_bound_mb
                        and rows_free["running_sequences"] == 0 and rows_free["queue_depth"] == 0)
    return report


def table(report: dict) -> str:
    lat = report["latency_s"]
    lines = [f"requests {report['requests']} ({report['requests_per_s']}/s): " +
             ", ".join(f"{k} {v}" for k, v in report["by_kind"].items()),
             "status codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["status_codes"].items())),
             f"unexpected: {report['unexpected'] or 'none'}; non-OpenAI error bodies: {report['non_openai_errors']}; "
             f"wrong structured answers: {report['structured_wrong']}",
             f"latency p50/p95: plain {lat['plain']['p50']}/{lat['plain']['p95']} s, stream "
             f"{lat['stream']['p50']}/{lat['stream']['p95']} s, adapter {lat['adapter']['p50']}/"
             f"{lat['adapter']['p95']} s; stream TTFT {report['stream_ttft_s']['p50']}/"
             f"{report['stream_ttft_s']['p95']} s",
             f"RSS {report['rss_mb']['start']} -> {report['rss_mb']['end']} MiB (growth {report['rss_mb']['growth']},"
             f" bound {report['rss_mb']['bound']})",
             f"at the end: {report['at_the_end']}; passed: {report['passed']}"]
    if report["rss_growth_by_class_mb"]:
        lines.insert(-1, "RSS growth by request class (each alone): " + ", ".join(
            f"{k} {v['growth']:+.1f} MiB ({v['requests']} requests)"
            for k, v in report["rss_growth_by_class_mb"].items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the clients send requests")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--dtype", default="auto", help="the server's --dtype (auto: bf16 on CPUs that have it)")
    ap.add_argument("--rss-bound-mb", type=float, default=64.0, help="largest RSS growth that passes, in MiB")
    ap.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    ap.add_argument("--embedding-model", default=None, help="also serve this sentence encoder and send embed traffic")
    ap.add_argument("--rag", action="store_true", help="also serve an index of the results pages (needs "
                                                       "--embedding-model) and send rag traffic")
    ap.add_argument("--by-class", type=float, default=0.0, help="seconds of each request class alone, first")
    args = ap.parse_args()
    if args.rag and not args.embedding_model:
        ap.error("--rag needs --embedding-model (the index is built with it)")
    global EMBEDDING_ID
    EMBEDDING_ID = Path(args.embedding_model or "").name.removesuffix(".gguf")  # as lmlab serve names it
    kinds = KINDS + ("embed",) * bool(args.embedding_model) + ("rag",) * args.rag
    weights = WEIGHTS + tuple(EXTRA_WEIGHTS[k] for k in kinds[len(KINDS):])
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        # 1024 tokens: the generic tool prompt is byte-level text to this vocabulary (about 900 tokens with a call)
        folder = tiny_model(Path(tmp) / MODEL_ID, context=1024)
        runs = make_adapter_runs(str(folder), len(ADAPTER_IDS), Path(tmp) / "adapters")
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        extra = [f for name, run in runs.items() for f in ("--adapter", f"{name}={run}")]
        extra += ["--embedding-model", args.embedding_model] if args.embedding_model else []
        if args.rag:
            docs = Path(tmp) / "pages"  # the results pages (their README.md files; not the JSON lines beside them)
            for page in (Path(__file__).resolve().parent.parent / "docs" / "results").glob("*/README.md"):
                (docs / page.parent.name).mkdir(parents=True)
                shutil.copyfile(page, docs / page.parent.name / "README.md")
            subprocess.run([sys.executable, "-m", "lmlab", "rag", "index", str(docs), "--out", str(Path(tmp) / "idx"),
                            "--model", args.embedding_model, "--no-progress"], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            extra += ["--rag", str(Path(tmp) / "idx")]
        proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", "--model", str(folder), "--port", str(port),
                                 "--max-batch", str(args.max_batch), "--max-queue", "64", "--context", "1024",
                                 "--dtype", args.dtype, "--compile", "off", *extra],  # eager, as measured before
                                env=env, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    get(port, "/health")
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start")
                    time.sleep(0.5)
            server = psutil.Process(proc.pid)
            drive(port, args.clients, 20, args.seed + 1, kinds, weights)  # warm-up: allocator pools, first shapes
            by_class = {}
            for kind in kinds if args.by_class else ():
                before = server.memory_info().rss
                done = drive(port, args.clients, args.by_class, args.seed + 2, (kind,), (1.0,))
                by_class[kind] = {"growth": round((server.memory_info().rss - before) / 2**20, 1),
                                  "requests": len(done), "rss_end": round(server.memory_info().rss / 2**20, 1)}
            rss_start = server.memory_info().rss
            results = drive(port, args.clients, args.minutes * 60, args.seed, kinds, weights)
            time.sleep(2)  # cancelled rows are dropped at the engine's next step
            values = gauges(port)
            rows_free = {"running_sequences": values["lmlab_running_sequences"],
                         "queue_depth": values["lmlab_queue_depth"]}
            rss_end = server.memory_info().rss
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    report = summarize(results, {"start": rss_start, "end": rss_end, "by_class": by_class}, rows_free, args)
    print(table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
