"""Fine-tuning cost per step: full fine-tuning vs LoRA (and the bottleneck adapters) on SmolLM2-135M, on the CPU.

A step is what `lmlab sft` does per optimizer step (lmlab.training.loop.fit): the response-token loss of a batch
(InstructionTuning.loss), backward, gradient clipping and fused AdamW over the trainable parameters, in each
precision of --precisions: fp32, or bf16 autocast (with a PEFT method's frozen matmul weights stored in bf16, as
lmlab sft does; "auto", its default, is bf16 on a CPU with native bf16 and fp32 elsewhere). The batch is
the same for every method: `--batch` examples of the math training data (LLM-Adapters' math_data.json in the
Alpaca template, length-bucketed, padded to the longest), or random tokens of `--seq-len` when the shared data
folder is absent. Methods are timed in alternation in one process (a change in the machine's load hits all of
them alike); the median step is reported.

Memory: each method runs again in a child process of its own (loading the model the same way), which reports its
peak resident memory during three training steps and that peak minus its memory before the first step (the
training state: gradients, optimizer moments, activations).

    python bench/peft_throughput.py [--threads 2] [--steps 5] [--batch 8] [--methods full,lora,adapterh,adapterp]
                                    [--precisions fp32,bf16]

Results are keyed "method/precision"; speedup_vs_full compares with full fine-tuning in the same precision and
speedup_vs_full_fp32 with full fine-tuning in fp32.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import contextlib

import torch

from lmlab.models.hub import load_pretrained
from lmlab.models.peft import method_settings
from lmlab.training.compile import cache_folder
from lmlab.training.config import TrainConfig
from lmlab.training.examples import collate, encode_all, load_examples
from lmlab.training.schedule import make_optimizer
from lmlab.training.tuning import prepare_model, trainable_parameters
from lmlab.util import PeakMemory

MODEL = "smollm2-135m-instruct"
MATH_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm_adapters_math" / "math_data.json"


def batch_for(pretrained, n: int, seq_len: int) -> tuple[dict, str]:
    """n examples of the math training data (the experiment's data), or random tokens without the data."""
    if MATH_DATA.is_file():
        examples = load_examples([MATH_DATA], ["alpaca"])[:4 * n]
        rows, _ = encode_all(examples, pretrained.tokenizer, pretrained.eos_token_id, seq_len, 10**9)
        rows = sorted(rows, key=lambda r: len(r[0]))[len(rows) // 2 - n // 2:][:n]  # n rows of median length
        return collate(rows, pretrained.eos_token_id), f"{n} math_data.json examples of median length"
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(pretrained.model.config.vocab_size, (n, seq_len + 1), generator=generator)
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:]}, f"{n} rows of {seq_len} random tokens"


def make_step(config: str, batch: dict, model=None, compiled: bool = False):
    """A model with config's method ("method/precision") applied and a function doing one training step on
    `batch` (and returning its loss), as fit does with InstructionTuning (its loss is the model's cross-entropy
    over the response-token targets) and lmlab sft sets up the model (lmlab.training.tuning.prepare_model).
    `model`: the base model to use (default: SmolLM2 loaded afresh). compiled: the step runs through
    torch.compile(model), as train.compile does, with inductor's cache in train.compile's folder for this shape."""
    method, precision = config.split("/")
    bf16 = precision == "bf16"
    model = load_pretrained(MODEL).model if model is None else model
    prepare_model(model, method, method_settings(method), bf16=bf16, device=torch.device("cpu"))
    if compiled:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_folder(model, torch.device("cpu"), bf16)))
    forward = torch.compile(model) if compiled else model
    return model, training_step(model, lambda: forward(batch["inputs"], batch["targets"], loss_only=True)[1], bf16)


def training_step(model, loss_of, bf16: bool):
    """A function doing one step of what fit does per optimizer step, returning the loss: loss_of() (under bf16
    autocast when bf16), backward, gradient clipping at 1.0 and a fused AdamW step over the trainable parameters
    (lmlab's make_optimizer, here with a constant LR and no weight decay)."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5, weight_decay=0.0), torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step():
        with autocast():
            loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure_memory(method: str, n: int, seq_len: int) -> dict:
    """In this (child) process: peak resident memory during three steps, and its growth over the start."""
    pretrained = load_pretrained(MODEL)
    batch, _ = batch_for(pretrained, n, seq_len)
    del pretrained
    _, step = make_step(method, batch)
    with PeakMemory() as memory:
        start = memory.peak
        for _ in range(3):
            step()
    return {"peak_mb": round(memory.peak / 2**20), "training_state_mb": round((memory.peak - start) / 2**20)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--methods", default="full,lora,adapterh,adapterp")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # child process mode
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.batch, args.seq_len)))
        return

    methods = [f"{m}/{p}" for p in args.precisions.split(",") for m in args.methods.split(",")]
    pretrained = load_pretrained(MODEL)
    batch, what = batch_for(pretrained, args.batch, args.seq_len)
    steps, params = {}, {}
    for method in methods:
        model, steps[method] = make_step(method, batch)
        params[method] = trainable_parameters(model)[0]
    times = {m: [] for m in methods}
    for i in range(args.warmup + args.steps):
        for method in methods:  # in alternation
            t = time.perf_counter()
            steps[method]()
            if i >= args.warmup:
                times[method].append(time.perf_counter() - t)
    del steps
    tokens = int(batch["inputs"].numel())
    results = {}
    for method in methods:
        median = sorted(times[method])[len(times[method]) // 2]
        child = subprocess.run([sys.executable, __file__, "--memory-of", method, "--threads", str(args.threads),
                                "--batch", str(args.batch), "--seq-len", str(args.seq_len)],
                               capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        memory = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else {
            "error": child.stderr.strip().splitlines()[-1:]}
        results[method] = {"seconds_per_step": round(median, 3), "tokens_per_s": round(tokens / median, 1),
                           "trainable_parameters": params[method], "step_times": [round(t, 3) for t in times[method]],
                           **memory}
    for method, r in results.items():
        for key, full in (("speedup_vs_full", f"full/{method.split('/')[1]}"), ("speedup_vs_full_fp32", "full/fp32")):
            if full in results:
                r[key] = round(results[full]["seconds_per_step"] / r["seconds_per_step"], 2)
    print(json.dumps({
        "benchmark": "peft_throughput", "model": MODEL, "batch": what, "tokens_per_step": tokens,
        "threads": args.threads, "steps": args.steps, "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
