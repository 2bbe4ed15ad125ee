"""Decoding speed per weight format, and against llama.cpp on the same GGUF file, in one process, alternating.

Loads SmolLM2-135M-Instruct from its Q4_1 GGUF in every format lmlab offers (lmlab.models.quantize):

    fp32          dequantized to float32 (the only path before issue 14)
    bf16          dequantized, computed in bfloat16
    int8          per-row int8 weights (torch's _weight_int8pack_mm), bf16 activations
    int4 (Q4_1)   the file's own 4-bit blocks (torch's _weight_int4pack_mm_for_cpu), Q8_0 head as int8, bf16
    +compile      with --compile: bf16 and int4 again with the decoding step torch.compile'd (--compile of
                  generate/serve; compiled once before the timing, from the disk cache when it is warm)

and, when llama-cpp-python is installed (the `bench` extra; it builds llama.cpp from source, about 15 minutes
here), llama.cpp on the same file with the same threads. Then, in --rounds rounds, each engine in turn (so that
other load on a shared machine hits all of them alike), measures:
  - prefill tokens/s (a --prompt-tokens prompt, first logits only),
  - decode tokens/s at batch 1 and 8 (llama.cpp: batch 1), as batch * (n - 1) / (time(n) - time(1)), so that
    the prefill is not counted,
  - whether each format's greedy tokens equal fp32's (batch 1),
and reports medians over the rounds and each format's ratio to fp32 (and int4's to llama.cpp). Then
speculative decoding (--speculate N, prompt lookup) on copy-heavy prompts (a code edit, a quoted answer from a
passage) and a free-text one, with the int4 model: tokens/s with and without, and whether the text is identical.
Finally, in fresh processes, the peak resident memory of loading each format against the loaded weights' size
and the runtime's own (torch and lmlab imported, nothing loaded).

    python bench/decode_throughput.py [--threads 2] [--new-tokens 128] [--rounds 2] [--speculate 8] [--compile]
        [--model gemma3-270m] [--formats fp32,int4]

With --model gemma3-270m, llama.cpp runs on Gemma's own Q4_K_M file and "int4" is lmlab's --quantize auto of it
(Q4_K layers as int4, the Q8_0 head as int8, Q5_0 and Q6_K dequantized to bf16).

Targets (issue 14): int4 decode at batch 1 at least llama.cpp's, prefill at least 2x; bf16 at least 1.5x fp32 at
batch 1 and 8, int4 at least 4x; peak RSS at most 1.5x weights + runtime. Prints one JSON object; a table on
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace

import torch

from lmlab.inference.generate import SamplingParams, decode_steps, generate
from lmlab.models.hub import load_pretrained, resolve
from lmlab.models.quantize import InferenceSettings, weight_bytes

FORMATS = {"fp32": InferenceSettings(dtype="float32", quantize="none", compile="off"),
           "bf16": InferenceSettings(dtype="bfloat16", quantize="none", compile="off"),
           "int8": InferenceSettings(dtype="bfloat16", quantize="int8", compile="off"),
           "int4": InferenceSettings(dtype="bfloat16", quantize="auto", compile="off")}

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from wine making. ") * 20
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''
PASSAGE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
           "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889 as the "
           "entrance arch to the 1889 World's Fair. It is 330 metres tall and was the tallest man-made structure "
           "in the world until the Chrysler Building in New York City was finished in 1930.")
SPECULATION_PROMPTS = {
    "code edit (copy-heavy)": f"Rename the variable subtotal to net in this code and show the whole code:\n\n{CODE}",
    "quoted answer (copy-heavy)": f"{PASSAGE}\n\nQuote the sentence of the passage above that says how tall the "
                                  "tower is, then the sentence about its name.",
    "free text": "Write a short story about a dragon who learns to bake bread.",
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def lmlab_engine(pre, prompt: list[int]):
    rows = {1: [prompt], 8: [prompt[i:] + prompt[:i] for i in range(8)]}  # 8 different prompts, same length

    def run(batch: int, n: int):
        params = SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)
        return [list(row) for row in zip(*decode_steps(pre.model, rows[batch], params))]

    def prefill():
        with torch.inference_mode():
            pre.model(torch.tensor([prompt], device=pre.model.tok_emb.weight.device), last_only=True)
    return run, prefill, (1, 8)


LLAMA_PROBE = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=1, n_ctx=256, verbose=False)
print(llm("The printing press", max_tokens=2, temperature=0.0)["choices"][0]["text"])
"""


def llama_cpp_problem(path: str) -> str | None:
    """Why llama.cpp cannot be measured here (not installed, or it crashes decoding), or None. Tried in a child
    process first, since a crash inside its C library would end this process."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install '.[bench]'; it builds ~15 min): not measured"
    done = subprocess.run([sys.executable, "-c", LLAMA_PROBE, path], capture_output=True, text=True, timeout=600)
    if done.returncode:
        return (f"llama-cpp-python {llama_cpp.__version__} exits with code {done.returncode} (signal "
                f"{-done.returncode} if negative) decoding 2 tokens of this file here: not measured")
    return None


def llama_cpp_engine(path: str, prompt: list[int], threads: int):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                verbose=False)

    def run(batch: int, n: int):
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return [out]

    def prefill():
        llm.reset()
        llm.eval(prompt)
    return run, prefill, (1,)


def one_round(engines: dict, prompt_len: int, new_tokens: int, results: dict, tokens: dict) -> None:
    for name, (run, prefill, batches) in engines.items():
        rates = results.setdefault(name, {})
        rates.setdefault("prefill_tokens_per_s", []).append(prompt_len / timed(prefill))
        for batch in batches:
            t1 = timed(lambda: run(batch, 1))
            out = []
            tn = timed(lambda: out.append(run(batch, new_tokens)))
            rates.setdefault(f"decode_tokens_per_s_batch{batch}", []).append(batch * (new_tokens - 1) / (tn - t1))
            if batch == 1:
                tokens[name] = out[0][0]


def speculation(pre, n: int, new_tokens: int, rounds: int) -> dict:
    out = {}
    for kind, text in SPECULATION_PROMPTS.items():
        ids = pre.tokenizer.encode(pre.chat_prompt([{"role": "user", "content": text}]),
                                   add_special_tokens=False).ids
        times = {0: [], n: []}
        texts = {}
        for _ in range(rounds):
            for k in times:
                params = SamplingParams(max_new_tokens=new_tokens, temperature=0, speculate=k)
                start = time.perf_counter()
                c = generate(pre.model, pre.tokenizer, [ids], params, eos_ids=pre.eos_ids)[0]
                times[k].append(len(c.token_ids) / (time.perf_counter() - start))
                texts[k] = c
        plain, fast = statistics.median(times[0]), statistics.median(times[n])
        out[kind] = {"tokens": len(texts[0].token_ids), "plain_tokens_per_s": round(plain, 1),
                     "speculative_tokens_per_s": round(fast, 1), "speedup": round(fast / plain, 2),
                     "identical_text": texts[0].text == texts[n].text}
    return out


RSS_PROBE = """
import json, resource, sys, torch
torch.set_num_threads(1)
from lmlab.models.hub import load_pretrained
from lmlab.models.quantize import InferenceSettings, weight_bytes
runtime = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
pre = load_pretrained(sys.argv[1], inference=InferenceSettings(**json.loads(sys.argv[2])))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"runtime_mb": runtime, "peak_mb": peak, "weights_mb": weight_bytes(pre.model) / 2**20}))
"""


def peak_memory(model: str) -> dict:
    out = {}
    for name, s in FORMATS.items():
        settings = json.dumps({"dtype": s.dtype, "quantize": s.quantize, "group_size": s.group_size})
        done = subprocess.run([sys.executable, "-c", RSS_PROBE, model, settings], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            out[name] = {"error": done.stderr.strip().splitlines()[-1]}
            continue
        r = json.loads(done.stdout)
        limit = 1.5 * r["weights_mb"] + r["runtime_mb"]
        out[name] = {**{k: round(v) for k, v in r.items()}, "limit_mb": round(limit),
                     "within": r["peak_mb"] <= limit}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--speculate", type=int, default=8)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--compile", action="store_true", help="also bf16 and int4 with the decoding step compiled")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="lmlab formats to time, comma-separated (fp32 is always loaded: the greedy reference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()
    path = str(resolve(args.model))

    chosen = {"fp32", *args.formats.split(",")}
    if chosen - set(FORMATS):
        sys.exit(f"--formats: unknown {', '.join(sorted(chosen - set(FORMATS)))} (choose from {', '.join(FORMATS)})")
    formats = {name: s for name, s in FORMATS.items() if name in chosen}
    if args.compile:
        formats.update({f"{name}+compile": replace(FORMATS[name], compile="on") for name in ("bf16", "int4")
                        if name in chosen})
    models = {name: load_pretrained(path, inference=s) for name, s in formats.items()}
    prompt = models["fp32"].tokenizer.encode(TEXT).ids[:args.prompt_tokens]
    engines = {name: lmlab_engine(pre, prompt) for name, pre in models.items()}
    llama_note = llama_cpp_problem(path)
    if llama_note is None:
        engines["llama.cpp"] = llama_cpp_engine(path, prompt, args.threads)
        llama_note = "llama-cpp-python " + __import__("llama_cpp").__version__
    for _, (run, prefill, batches) in engines.items():  # warm up (and compile: the first steps of each batch)
        for batch in batches:
            run(batch, 3)
        prefill()
    results, tokens = {}, {}
    for i in range(args.rounds):
        one_round(engines, len(prompt), args.new_tokens, results, tokens)
        print(f"round {i + 1}: {json.dumps(results)}", file=sys.stderr, flush=True)  # what a killed run keeps
    medians = {name: {k: round(statistics.median(v), 1) for k, v in rates.items()} for name, rates in results.items()}
    ratios = {name: {k: round(v / medians["fp32"][k], 2) for k, v in rates.items() if k in medians["fp32"]}
              for name, rates in medians.items() if name != "fp32"}
    if "llama.cpp" in medians and "int4" in medians:
        ratios["int4_vs_llama.cpp"] = {k: round(medians["int4"][k] / v, 2) for k, v in medians["llama.cpp"].items()}
    report = {
        "benchmark": "decode_throughput", "model": args.model, "file": os.path.basename(path),
        "threads": args.threads, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "rounds": args.rounds, "torch": torch.__version__, "llama_cpp": llama_note,
        "load_average_at_start": load_at_start,
        "weights_mb": {name: round(weight_bytes(pre.model) / 2**20) for name, pre in models.items()},
        "medians": medians, "ratios": ratios,
        "greedy_tokens_equal_fp32": {n: t == tokens["fp32"] for n, t in tokens.items() if n != "fp32"},
        "speculative": (speculation(models["int4"], args.speculate, args.new_tokens, args.rounds)
                        if args.speculate and "int4" in models else "not run (--speculate 0, or no int4)"),
    }
    del models, engines
    if not args.no_memory:
        report["peak_memory"] = peak_memory(path)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    print_table(report)


def print_table(r: dict) -> None:
    lines = ["| engine | decode tok/s, batch 1 | prefill tok/s | decode tok/s, batch 8 |", "| --- | ---: | ---: | ---: |"]
    for name, m in r["medians"].items():
        lines.append(f"| {name} | {m['decode_tokens_per_s_batch1']} | {m['prefill_tokens_per_s']} | "
                     f"{m.get('decode_tokens_per_s_batch8', '-')} |")
    print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
