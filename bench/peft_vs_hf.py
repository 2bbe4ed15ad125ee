"""LoRA SFT step: lmlab against transformers + peft, the same SmolLM2-135M weights, batch, precision and optimizer.

Issue 24's goal: on Assignment 2's job (LoRA SFT of SmolLM2-135M on the math data) lmlab's training step is at
least 1.5x the step of Hugging Face transformers' LlamaForCausalLM with peft's LoRA.

Both sides, per precision:
- weights: SmolLM2 as lmlab loads it, written out with lmlab.models.hf.export_hf and read back by
  LlamaForCausalLM.from_pretrained (fp32, the SDPA attention transformers picks by default);
- LoRA: lmlab's defaults (lmlab.models.peft.LoraConfig: rank, alpha, dropout 0, targets). lmlab's targets name
  its fused linears (attn.qkv, attn.proj, mlp.fc, mlp.proj); each maps to the Llama projections it stacks
  (lmlab.models.hf.llama_block: qkv -> q_proj, k_proj, v_proj; fc -> gate_proj, up_proj; attn.proj -> o_proj;
  mlp.proj -> down_proj), and peft gets those. A fused layer has one A for its parts where peft has one per part,
  so peft trains a few more parameters (both counts are printed); peft's A matrices start as copies of lmlab's
  and its B matrices as lmlab's rows, so both start from the same function;
- the batch: peft_throughput.batch_for (the math data's examples, prompt tokens labelled -100, or random tokens
  without the shared data), given to transformers as its already-shifted `shift_labels`, so both score the same
  targets over the same positions;
- precision: fp32, or bf16 autocast with the frozen matmul weights stored in bf16 (lmlab sft's set-up,
  lmlab.models.peft.cast_frozen_matmuls, applied to both models);
- the step: forward and loss, backward, gradient clipping at 1.0, fused AdamW (lmlab's make_optimizer for both).

Contenders are timed in alternation in one process; the median step counts. --compile adds lmlab's step through
torch.compile of the model (what train.compile runs), its compile time reported apart; --profile adds
torch.profiler's top ops of one step of each contender (after the timing).

    python bench/peft_vs_hf.py [--threads 1] [--steps 5] [--batch 8] [--precisions bf16,fp32] [--compile]
                             [--profile]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time

import torch

from peft_throughput import MODEL, batch_for, make_step, training_step
from train_throughput import cpu_facts, profile_step

from lmlab.models.hf import export_hf, llama_block
from lmlab.models.hub import load_pretrained
from lmlab.models.peft import LoRALinear, LoraConfig, _matches, cast_frozen_matmuls
from lmlab.training.tuning import trainable_parameters

GOAL = 1.5  # issue 24: lmlab's LoRA SFT step >= 1.5x transformers + peft


def hf_targets(config, targets) -> dict[str, list[str]]:
    """lmlab LoRA target layer (name inside a block) -> the Hugging Face Llama projections it stacks, under
    `model.layers.{i}.` (from llama_block, the table lmlab's own import and export read)."""
    mapping = {}
    for name, parts in llama_block(config).items():
        layer = name.removesuffix(".weight")
        if _matches(layer, targets):
            mapping[layer] = [part.removesuffix(".weight") for part, _ in parts]
    return mapping


def peft_model(lmlab_model, folder, lora: LoraConfig):
    """transformers' LlamaForCausalLM from `folder` (lmlab_model's export) with peft's LoRA on the projections
    lmlab's targets cover, its LoRA weights copied from lmlab_model's (already LoRA-wrapped). Returns the peft
    model and the target mapping."""
    import peft
    import transformers

    mapping = hf_targets(lmlab_model.config, lora.targets)
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    modules = sorted({part.rpartition(".")[2] for parts in mapping.values() for part in parts})
    model = peft.get_peft_model(hf, peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=modules, bias="none", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for i in range(lmlab_model.config.n_layer):
            for layer, parts in mapping.items():
                ours = lmlab_model.get_submodule(f"blocks.{i}.{layer}")
                assert isinstance(ours, LoRALinear), f"blocks.{i}.{layer} has no LoRA"
                theirs = [model.base_model.model.model.layers[i].get_submodule(p) for p in parts]
                rows = ours.lora_B.split([t.base_layer.out_features for t in theirs])
                for t, b in zip(theirs, rows):
                    t.lora_A["default"].weight.copy_(ours.lora_A)  # one A for all parts of a fused layer
                    t.lora_B["default"].weight.copy_(b)
    return model, mapping


def peft_step(model, batch: dict, bf16: bool):
    """One training step of the peft model on `batch` (the step of make_step), returning the loss: transformers'
    own loss (fp32 cross-entropy of the full logits, as a Trainer computes it) on the same shifted targets."""
    if bf16:
        cast_frozen_matmuls(model, torch.bfloat16)
    return training_step(model, lambda: model(input_ids=batch["inputs"], labels=batch["targets"],
                                              shift_labels=batch["targets"], use_cache=False).loss, bf16)


def contenders(base, batch: dict, precision: str, compiled: bool, load=None) -> tuple[dict, dict]:
    """The steps to time ({name: step}) and facts about them, from `base` (an lmlab Llama, untouched: each
    contender gets its own copy; `load()` makes another, default a deep copy)."""
    load = load or (lambda: copy.deepcopy(base))
    bf16 = precision == "bf16"
    lora = LoraConfig()
    steps, facts = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        export_hf(base, folder)
        ours, steps["lmlab"] = make_step(f"lora/{precision}", batch, model=load())
        theirs, mapping = peft_model(ours, folder, lora)
    steps["transformers+peft"] = peft_step(theirs, batch, bf16)
    facts["target_mapping"] = {f"lmlab {k}": f"peft {', '.join(p.rpartition('.')[2] for p in v)}"
                               for k, v in mapping.items()}
    facts["trainable_parameters"] = {"lmlab": trainable_parameters(ours)[0],
                                     "transformers+peft": trainable_parameters(theirs)[0]}
    if compiled:
        _, steps["lmlab compiled"] = make_step(f"lora/{precision}", batch, model=load(), compiled=True)
    return steps, facts


def measure(base, batch: dict, precision: str, n: int, warmup: int, compiled: bool, profiled: bool = False,
            load=None) -> dict:
    steps, facts = contenders(base, batch, precision, compiled, load)
    first, losses = {}, {}
    for name, step in steps.items():  # the first step apart: it compiles, and its loss is the start's
        t = time.perf_counter()
        losses[name] = round(float(step()), 5)
        first[name] = time.perf_counter() - t
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():  # in alternation
            t = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    tokens = int(batch["inputs"].numel())
    result = {"step0_loss": losses, **facts, "contenders": {}}
    for name, ts in times.items():
        median = sorted(ts)[len(ts) // 2]
        result["contenders"][name] = {"seconds_per_step": round(median, 3), "tokens_per_s": round(tokens / median, 1),
                                      "step_times": [round(t, 3) for t in ts]}
    if compiled:
        result["contenders"]["lmlab compiled"]["first_step_s (compile)"] = round(first["lmlab compiled"], 1)
    if profiled:  # after the timing, so that profiling costs it nothing
        result["profile"] = {name: profile_step(step) for name, step in steps.items()}
    peft_tps = result["contenders"]["transformers+peft"]["tokens_per_s"]
    for name in steps:
        if name != "transformers+peft":
            ratio = round(result["contenders"][name]["tokens_per_s"] / peft_tps, 3)
            result[f"{name} / transformers+peft"] = ratio
            result[f"goal {name} >= {GOAL}x transformers+peft"] = "met" if ratio >= GOAL else "missed"
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--compile", action="store_true", help="also time lmlab's step under torch.compile")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's top ops of one step of each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    pretrained = load_pretrained(MODEL)
    batch, what = batch_for(pretrained, args.batch, args.seq_len)
    results = {p: measure(pretrained.model, batch, p, args.steps, args.warmup, args.compile, args.profile)
               for p in args.precisions.split(",")}
    print(json.dumps({
        "benchmark": "peft_vs_hf", "model": MODEL, "batch": what, "tokens_per_step": int(batch["inputs"].numel()),
        "lora": LoraConfig().settings(), "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
        "torch": torch.__version__, "transformers": _version("transformers"), "peft": _version("peft"),
        "machine": platform.machine(), "cpu": cpu_facts(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "results": results,
    }, indent=2))


def _version(package: str) -> str:
    from importlib.metadata import version
    return version(package)


if __name__ == "__main__":
    main()
