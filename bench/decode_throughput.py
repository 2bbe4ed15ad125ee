"""Generation speed: lmlab's KV-cache engine vs transformers' `generate`, same dequantized SmolLM2 weights.

Loads SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32) with lmlab, writes the same weights as a Hugging Face
Llama folder and loads that into transformers; then, on 2 threads, measures for both:
  - prefill tokens/s (a prompt of --prompt-tokens tokens, first logits only),
  - decode tokens/s for --new-tokens greedy tokens at batch 1 and batch 8, counted as
    batch * (new_tokens - 1) / (time(new_tokens) - time(1)) so that the prefill is not counted,
  - whether the greedy tokens are identical, and the peak resident memory of each side.

    python bench/decode_throughput.py [--model smollm2-135m-instruct] [--threads 2] [--new-tokens 128]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import tempfile
import time

import torch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(run, prefill, prompt_len: int, new_tokens: int, repeats: int) -> tuple[dict, dict]:
    """Rates of one side: run(batch, n) generates n greedy tokens per row and returns them row by row."""
    run(1, 2)  # warm up
    rates = {"prefill_tokens_per_s": prompt_len / best_of(prefill, repeats)}
    tokens = {}
    for batch in (1, 8):
        t1 = best_of(lambda: run(batch, 1), repeats)
        tn = best_of(lambda: run(batch, new_tokens), repeats)
        rates[f"decode_tokens_per_s_batch{batch}"] = batch * (new_tokens - 1) / (tn - t1)
        tokens[batch] = run(batch, new_tokens)
    rates["peak_rss_mb"] = peak_rss_mb()
    return rates, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from lmlab.inference.generate import SamplingParams, decode_steps
    from lmlab.models.hf import export_hf
    from lmlab.models.hub import load_pretrained

    pre = load_pretrained(args.model)
    tok = pre.tokenizer
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
            "movable metal type, oil-based inks and a wooden press adapted from wine making. ") * 20
    prompt = tok.encode(text).ids[:args.prompt_tokens]
    rows = {1: [prompt], 8: [prompt[i:] + prompt[:i] for i in range(8)]}  # 8 different prompts, same length

    def ours(batch, n):
        params = SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)
        return [list(row) for row in zip(*decode_steps(pre.model, rows[batch], params))]

    def ours_prefill():
        with torch.inference_mode():
            pre.model(torch.tensor([prompt]), last_only=True)

    o, ours_tokens = measure(ours, ours_prefill, len(prompt), args.new_tokens, args.repeats)

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(pre.model, tmp)
        pre = None  # free our copy of the weights before transformers loads its own
        gc.collect()
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()

    def theirs(batch, n):
        ids = torch.tensor(rows[batch])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    def theirs_prefill():
        with torch.inference_mode():
            hf(torch.tensor([prompt]), logits_to_keep=1)

    t, their_tokens = measure(theirs, theirs_prefill, len(prompt), args.new_tokens, args.repeats)
    same = {batch: their_tokens[batch] == ours_tokens[batch] for batch in ours_tokens}

    print(json.dumps({
        "benchmark": "decode_throughput", "model": args.model, "dtype": "float32", "threads": args.threads,
        "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lmlab": {k: round(v, 1) for k, v in o.items()},
        "transformers_generate": {k: round(v, 1) for k, v in t.items()},
        "speedup": {k: round(o[k] / t[k], 2) for k in o if k != "peak_rss_mb"},
        "greedy_tokens_identical": {f"batch{b}": v for b, v in same.items()},
        "note": "peak_rss_mb is the process peak so far: the transformers figure includes lmlab's earlier peak",
    }, indent=2))


if __name__ == "__main__":
    main()
