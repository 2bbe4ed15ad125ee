"""Gemma 3 270M beside SmolLM2-135M: prefill and decode tokens/s through lmlab's one decoding loop.

Both registry models (GGUF, dequantized to --dtype), the same prompt text cut to --prompt-tokens tokens of each
model's own tokenizer, greedy decoding. The two models are measured in alternation, --rounds times, in one
process, and the medians reported, so that the ratio holds on a shared machine where absolute speeds move:
  - prefill tokens/s: the prompt in one forward pass (last position's logits only, as generation does);
  - decode tokens/s at batch 1 and batch 8, counted as batch * (new_tokens - 1) / (time(new_tokens) - time(1)),
    so that the prefill is not counted;
  - with --long-prompt N, also the decode rate after an N-token prompt: past Gemma's 512-token window its local
    layers (15 of 18) attend to 512 keys however long the text grows.

    python bench/gemma_throughput.py [--threads 2] [--prompt-tokens 128] [--new-tokens 64] [--rounds 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lmlab.inference.generate import SamplingParams, decode_steps
from lmlab.models.hub import load_pretrained

MODELS = ("smollm2-135m-instruct", "gemma3-270m")
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based inks and a wooden press adapted from wine making. ") * 200


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(pre, prompt_tokens: int, new_tokens: int, long_prompt: int) -> dict:
    ids = pre.tokenizer.encode(TEXT).ids
    prompt = ids[:prompt_tokens]
    rows = {1: [prompt], 8: [prompt[i:] + prompt[:i] for i in range(8)]}  # 8 different prompts, same length

    def decode(batch_rows, n):
        params = SamplingParams(max_new_tokens=n, temperature=0, stop_at_eos=False)
        for _ in decode_steps(pre.model, batch_rows, params):
            pass

    with torch.no_grad():
        decode(rows[1], 2)  # warm up
        prefill = timed(lambda: pre.model(torch.tensor([prompt]), last_only=True))
        out = {"prefill_tokens_per_s": len(prompt) / prefill}
        for batch in (1, 8):
            t1, tn = timed(lambda: decode(rows[batch], 1)), timed(lambda: decode(rows[batch], new_tokens))
            out[f"decode_tokens_per_s_batch{batch}"] = batch * (new_tokens - 1) / (tn - t1)
        if long_prompt:
            long = [ids[:long_prompt]]
            t1, tn = timed(lambda: decode(long, 1)), timed(lambda: decode(long, new_tokens))
            out[f"decode_tokens_per_s_after_{long_prompt}"] = (new_tokens - 1) / (tn - t1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--long-prompt", type=int, default=0, help="also decode after a prompt this long (0: no)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = {name: load_pretrained(name, dtype=getattr(torch, args.dtype)) for name in MODELS}
    rounds = {name: [] for name in MODELS}
    for _ in range(args.rounds):
        for name, pre in models.items():  # alternate, so that both see the same machine load
            rounds[name].append(one_round(pre, args.prompt_tokens, args.new_tokens, args.long_prompt))
    result = {"settings": vars(args), "models": {}}
    for name, runs in rounds.items():
        c = models[name].model.config
        medians = {k: round(statistics.median(r[k] for r in runs), 1) for k in runs[0]}
        result["models"][name] = {"parameters": sum(p.numel() for p in models[name].model.parameters()),
                                  "n_layer": c.n_layer, "vocab_size": c.vocab_size, **medians, "rounds": runs}
    gemma, smollm = (result["models"][n] for n in ("gemma3-270m", "smollm2-135m-instruct"))
    result["gemma_over_smollm"] = {k: round(gemma[k] / smollm[k], 2) for k in gemma if "_per_s" in k}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
