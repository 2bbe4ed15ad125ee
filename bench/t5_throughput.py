"""T5 training throughput: lmlab's EncoderDecoder vs transformers' T5ForConditionalGeneration, same shape (the
weights copied through the Hugging Face folder, so both compute the same loss), same batch, same machine.

Times a full training step (forward, backward, AdamW) of span-corruption-shaped batches (inputs of --input-len
tokens, targets of --target-len), in alternation (median of --steps), in fp32 and under bf16 autocast, and
reports training tokens/s (input + target tokens) of each and their ratio.

    python bench/t5_throughput.py [--threads 2] [--steps 6] [--warmup 2] [--compile]   # configs/t5-small-cpu
    python bench/t5_throughput.py --config t5-10m-cpu                      # the experiment's 10M shape

Prints one JSON object, with the load average before and after (the machine is shared: only the ratios hold).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import make_step, median_step_times  # noqa: E402 - bench/ is on sys.path as a script

from lmlab.models.hf import export_hf  # noqa: E402
from lmlab.models.t5 import EncoderDecoder  # noqa: E402
from lmlab.training.config import load_config  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="t5-small-cpu", help="the model shape: a T5 run config")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--target-len", type=int, default=29)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time lmlab's model compiled (train.compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import T5ForConditionalGeneration

    config = load_config(args.config, []).model_config(args.vocab_size)
    ours = EncoderDecoder(config)
    with tempfile.TemporaryDirectory() as folder:
        export_hf(ours, folder)
        theirs = T5ForConditionalGeneration.from_pretrained(folder, attn_implementation="sdpa")
    x = torch.randint(3, args.vocab_size, (args.batch_size, args.input_len))
    y = torch.randint(3, args.vocab_size, (args.batch_size, args.target_len))
    tokens = args.batch_size * (args.input_len + args.target_len)
    results, load_before = {}, os.getloadavg()
    for precision in ("float32", "bfloat16"):
        # make_step runs the forward pass under bf16 autocast for "bfloat16".
        # lmlab's span-corruption objective asks for the loss alone (loss_only: the fused head + cross-entropy).
        steps = {"lmlab": make_step(ours, lambda m, a, b: m(a, b, loss_only=True)[1], (x, y), precision),
                 "transformers": make_step(theirs, lambda m, a, b: m(input_ids=a, labels=b).loss, (x, y), precision)}
        compile_s = None
        if args.compile:  # what train.compile runs (on, or auto once a run is long enough to repay it)
            steps["lmlab compiled"] = make_step(torch.compile(copy.deepcopy(ours)),
                                                lambda m, a, b: m(a, b, loss_only=True)[1], (x, y), precision)
            start = time.perf_counter()
            steps["lmlab compiled"]()
            compile_s = round(time.perf_counter() - start, 1)
        med = median_step_times(steps, args.steps, args.warmup)
        results[precision] = {"lmlab_tokens_per_s": round(tokens / med["lmlab"], 1),
                              "transformers_tokens_per_s": round(tokens / med["transformers"], 1),
                              "speedup": round(med["transformers"] / med["lmlab"], 3)}
        if compile_s is not None:
            results[precision].update(lmlab_compiled_tokens_per_s=round(tokens / med["lmlab compiled"], 1),
                                      compiled_speedup=round(med["transformers"] / med["lmlab compiled"], 3),
                                      compile_s=compile_s)
    print(json.dumps({
        "benchmark": "t5_throughput", "config": args.config,
        "shape": {"parameters": ours.num_params(), "n_layer": config.n_layer, "n_decoder_layer": config.n_decoder_layer,
                  "n_embd": config.n_embd, "n_head": config.n_head, "head_size": config.head_dim,
                  "intermediate_size": config.intermediate_size, "vocab_size": args.vocab_size,
                  "batch_size": args.batch_size, "input_len": args.input_len, "target_len": args.target_len},
        "threads": args.threads, "load_average": {"before": [round(v, 2) for v in load_before],
                                                    "after": [round(v, 2) for v in os.getloadavg()]},
        "torch": torch.__version__, "machine": platform.machine(), **results,
    }, indent=2))


if __name__ == "__main__":
    main()
