"""Instruction tuning (SFT) and preference tuning (DPO): the two steps that turn a pretrained LM into an assistant.

    lmlab sft --model smollm2-135m-instruct --data alpaca.json --format alpaca --method lora --run-dir runs/sft
    lmlab dpo --model runs/sft --data ../shared/data/instruction_sft/alpaca_en_demo.json --format alpaca

The two commands: their settings (`SftSettings`, `DpoSettings`: one field per flag), the base model and data
they prepare, and the results they write. The data formats, labels and batches are lmlab.training.examples; the
objectives lmlab.training.instruction and .preference, trained by lmlab.training.loop.fit (checkpoints, --resume,
progress, metrics, torchrun) through lmlab.training.run. The model is trained whole (--method full) or through a
parameter-efficient method of lmlab.models.peft (lora, adapterh, adapterp), whose run then holds only the
method's own weights; lmlab.models.hub.load_pretrained(run folder) loads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lmlab.data.prompts import ALPACA_STOPS
from lmlab.data.records import read_records
from lmlab.errors import LmlabError
from lmlab.evaluate import LM, run_eval
from lmlab.models import checkpoint
from lmlab.models.hub import load_pretrained, load_tuned
from lmlab.models.peft import ADAPTER_ACTIVATIONS, FULL, METHODS, LoraConfig, method_settings
from lmlab.training.config import DEFAULT_LR, TrainConfig, _coerce, apply_overrides
from lmlab.training.decontaminate import decontaminate
from lmlab.training.examples import (FORMATS, Example, Pair, encode_all, load_examples, load_pairs,
                                     prompt_and_reference, split_examples)
from lmlab.training.instruction import InstructionTuning
from lmlab.training.preference import Preference
from lmlab.training.run import TrainingRun
from lmlab.training.tuning import prepare_model, trainable_parameters
from lmlab.util import PeakMemory, comma_list, option

RUN_DIR_HINT = "choose another --run-dir"


# ----------------------------------------------------------------------------------------------------------------
# Settings: one field per flag of lmlab sft / dpo (lmlab.cli makes `--seq-len` of `seq_len`, and `--lora-r` of
# the `r` of the `lora` field)

@dataclass
class AdapterFlags:
    """The bottleneck adapters' flags (--adapter-size, --adapter-activation): lmlab.models.peft's AdapterHConfig or
    AdapterPConfig, whichever --method names, with these values."""
    size: int | None = option(None, "adapter bottleneck width (default 32 adapterh, 64 adapterp)")
    activation: str = option("tanh", "adapter nonlinearity", choices=list(ADAPTER_ACTIVATIONS))


@dataclass
class TuneSettings:
    """What `lmlab sft` and `lmlab dpo` share."""
    model: str = option(help="registry name, .gguf, Hugging Face folder, run folder (an sft run too), or hub id")
    data: list[str] = option(help="data file (repeatable)", action="append")
    format: str = option("alpaca", "alpaca | gsm8k | chat | jsonl (one for all files, or one per file, "
                                   "comma-separated)")
    method: str = option("lora", "what is trained: every weight (full) or a PEFT method",
                         choices=[FULL, *METHODS])
    run_dir: str = option("runs/sft", "run folder")
    steps: int = option(300, "optimizer steps")
    batch_size: int = option(8, "rows per optimizer step")
    micro_batch_size: int | None = option(None, "rows per forward pass (gradient accumulation)")
    lr: float | None = option(None, "peak learning rate (default 2e-5 full, 3e-4 PEFT)")
    seq_len: int = option(512, "tokens per training row; longer examples are left out")
    val_size: int = option(50, "held-out examples (a seeded draw)")
    seed: int = option(0, "seed of the held-out draw, the method's initialisation and the batches")
    threads: int | None = option(None, "CPU threads for torch")
    set: list[str] = option(lambda: [], "any key of a config's train section, e.g. --set "
                                        "train.eval_interval=50; train.dtype=float32 turns off the default bf16 "
                                        "autocast of hardware with native bf16", action="append",
                            metavar="train.KEY=VALUE")
    # lmlab sft and dpo: LoRA without dropout (Hugging Face PEFT's default; on a CPU it costs a quarter of a step).
    lora: LoraConfig = option(lambda: LoraConfig(dropout=0.0), "LoRA's settings (--lora-r, --lora-alpha, "
                                                               "--lora-dropout, --lora-targets)")
    adapter: AdapterFlags = option(lambda: AdapterFlags(), "the adapters' settings (--adapter-size, "
                                                            "--adapter-activation)")
    samples: int = option(5, "held-out prompts answered before and after training")
    sample_tokens: int = option(128, "longest answer for --samples")
    decontaminate: str = option("", "evaluation tasks (e.g. addsub,singleeq,aqua) whose questions are removed from "
                                    "the training data")
    eval_tasks: str = option("", "evaluate the tuned model on these tasks afterwards")
    eval_limit: int | None = option(None, "examples per task for --eval-tasks")
    data_dir: str | None = option(None, "evaluation data folder (for --decontaminate, --eval-tasks)")
    resume: bool = option(False, "continue the run in --run-dir from its checkpoint", action="store_true")
    no_progress: bool = option(False, "no progress bar", action="store_true")

    @property
    def formats(self) -> list[str]:
        return self.format.split(",")

    @property
    def progress(self) -> bool:
        return not self.no_progress

    @property
    def settings(self) -> dict:
        """The method's settings, as it is applied and saved with them ({} for full)."""
        flags = asdict(self.lora) if self.method == "lora" else {"size": self.adapter.size,
                                                                 "activation": self.adapter.activation}
        return method_settings(self.method, **flags)


@dataclass
class SftSettings(TuneSettings):
    """`lmlab sft`."""
    packing: bool = option(False, "pack examples into rows of exactly --seq-len tokens (default: length-bucketed "
                                  "batches)", action="store_true")


@dataclass
class DpoSettings(TuneSettings):
    """`lmlab dpo`."""
    format: str = option("alpaca", "pairs ({prompt, chosen, rejected}) or instruction data: alpaca | gsm8k | chat | "
                                   "jsonl (one for all files, or one per file, comma-separated)")
    run_dir: str = option("runs/dpo", "run folder")
    steps: int = option(100, "optimizer steps")
    beta: float = option(0.1, "DPO's beta: how far from the reference the policy may move")
    rejected_tokens: int = option(128, "longest generated (rejected) answer")
    max_pairs: int | None = option(None, "training pairs to build (default: all examples)")


# ----------------------------------------------------------------------------------------------------------------
# What both commands do

def _train_config(s: TuneSettings) -> TrainConfig:
    if s.method not in (FULL, *METHODS):
        raise LmlabError(f"unknown method {s.method!r}; choose one of {', '.join((FULL, *METHODS))}")
    steps = s.steps
    lr = s.lr or DEFAULT_LR["sft"][s.method]
    values = dict(run_dir=str(s.run_dir), max_steps=steps, batch_size=s.batch_size,
                  micro_batch_size=s.micro_batch_size or s.batch_size, lr=lr, min_lr=lr / 10,
                  warmup_steps=max(1, steps // 20), weight_decay=0.0, beta2=0.999,
                  eval_interval=max(1, steps // 5), log_interval=max(1, min(10, steps // 50)),
                  ckpt_interval=max(1, steps // 5), keep_checkpoints=1, seed=s.seed, threads=s.threads)
    raw = apply_overrides({"train": values}, list(s.set))
    if set(raw) != {"train"}:
        raise LmlabError("--set takes train.X=VALUE here (the model and data come from --model and --data)")
    t = TrainConfig(**_coerce(TrainConfig, "train", raw["train"]))
    if t.batch_size % t.micro_batch_size:
        raise LmlabError(f"batch size {t.batch_size} must be a multiple of the micro-batch size {t.micro_batch_size}")
    return t


def answer_prompts(pretrained, model, prompts: list[str], max_new_tokens: int, progress: bool = True,
                   desc: str = "answers") -> list[str]:
    """Greedy answers of `model` (with pretrained's tokenizer and end tokens) to prompts, up to an end-of-turn
    token, the header of a next Alpaca example, or max_new_tokens."""
    if not prompts:
        return []
    lm = LM.from_pretrained(replace(pretrained, model=model), batch_size=8, progress=progress)
    return lm.generate_until([(p, ALPACA_STOPS, max_new_tokens) for p in prompts], desc=desc)


def _prepare(s: TuneSettings, kind: str, echo):
    """The base model, the examples (decontaminated, split) and the run's info (sft.json)."""
    settings = s.settings
    if s.seq_len < 2:
        raise LmlabError(f"--seq-len must be at least 2 (got {s.seq_len})")
    allowed = ("pairs",) if kind == "dpo" and s.formats == ["pairs"] else FORMATS
    for fmt in s.formats:  # bad input fails before the model is loaded
        if fmt not in allowed:
            raise LmlabError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}"
                             + (" (or pairs, alone)" if kind == "dpo" else ""))
    for path in s.data:
        if not Path(path).is_file():
            raise LmlabError(f"no such data file: {path}")
    pretrained = load_pretrained(s.model)
    chat = pretrained.chat_prompt if pretrained.chat_template else None
    if kind == "dpo" and s.formats == ["pairs"]:
        examples = [pair for path in s.data for pair in load_pairs(path)]
    else:
        examples = load_examples(s.data, s.formats, chat)
    info = {"command": kind, "base": str(Path(s.model).resolve()) if Path(s.model).exists() else s.model,
            "method": s.method, "settings": settings, "data": [str(d) for d in s.data], "formats": s.formats,
            "examples": len(examples), "seq_len": s.seq_len, "seed": s.seed}
    if s.decontaminate:
        examples, removed = decontaminate(examples, list(comma_list(s.decontaminate)), s.data_dir)
        info["decontaminated"] = removed
        if echo:
            echo("removed training examples whose question is an evaluation question: "
                 + ", ".join(f"{k} {v}" for k, v in removed.items()))
    train, val = split_examples(examples, s.val_size, s.seed)
    return pretrained, train, val, info

def _finish(s: TuneSettings, pretrained, objective, info: dict, samples: list[dict], run: TrainingRun, echo,
            command: str | None) -> dict:
    """Train, then the results: figures, before/after answers, and the optional evaluation."""
    model, world, t, run_dir = objective.model, run.world, run.t, run.run_dir
    trained, total = trainable_parameters(model)
    info["precision"] = "bf16 autocast" if world.bf16 else "fp32"
    if world.main:
        checkpoint.write_tuned_info(run_dir, info)
    if not s.resume:  # the held-out figures of the starting model, for before/after
        with torch.no_grad(), world.autocast():
            model.eval()
            info["before"] = objective.evaluate(model)
    with PeakMemory() as memory:
        summary = run.fit(objective, progress=s.progress)
    results = {**info, "summary": summary, "trainable_parameters": trained, "parameters": total,
               "trainable_fraction": round(trained / total, 5), "train_seconds": summary["elapsed_s"],
               "seconds_per_step": round(summary["elapsed_s"] / max(1, summary["steps"]), 3),
               "peak_memory_mb": round(memory.peak / 2**20), "threads": torch.get_num_threads(),
               "train_config": {k: getattr(t, k) for k in ("lr", "min_lr", "warmup_steps", "batch_size",
                                                           "micro_batch_size", "max_steps", "weight_decay")},
               "command_line": command}
    if not world.main:
        return results
    if checkpoint.best(run_dir) is not None:
        results["best"] = checkpoint.best_eval(run_dir)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        # Answer with the run as saved (the fp32 base, the trained weights of best/ or the last checkpoint),
        # which is what load_tuned gives later, not with the bf16 training copy.
        model = load_tuned(run_dir, merge=False).model.to(world.device)
    elif checkpoint.best(run_dir) is not None:
        objective.load(model, checkpoint.best(run_dir))
    if samples:
        after = answer_prompts(pretrained, model, [x["prompt"] for x in samples], s.sample_tokens, s.progress,
                               "answers after")
        for x, text in zip(samples, after):
            x["after"] = text
        run.write_json("samples.json", samples)
        run.write_text("samples.md", format_samples(samples))
    if s.eval_tasks:
        tuned = replace(pretrained, model=model.eval(), name=str(run_dir))
        evaluation = run_eval(tuned, list(comma_list(s.eval_tasks)), limit=s.eval_limit, data_dir=s.data_dir,
                              out=run_dir / "eval.json", progress=s.progress, echo=echo, command=command)
        results["eval"] = evaluation["results"]
    run.write_json("results.json", results)
    if echo:
        echo(format_results(results))
    return results


def _samples_before(pretrained, val: list[Example], s: TuneSettings, run: TrainingRun) -> list[dict]:
    """The first held-out prompts, their reference responses and the base model's answers; kept in the run folder
    so that a resumed run does not answer them again with a half-trained model."""
    if not run.main or s.samples <= 0:
        return []
    cached = run.run_dir / "samples.json"
    if s.resume and cached.is_file():
        return [{k: v for k, v in x.items() if k != "after"} for x in json.loads(cached.read_text())]
    pairs = [(e.prompt, e.chosen) if isinstance(e, Pair) else prompt_and_reference(e) for e in val[:s.samples]]
    before = answer_prompts(pretrained, pretrained.model, [p for p, _ in pairs], s.sample_tokens, s.progress,
                            "answers before")
    samples = [{"where": e.where, "prompt": p, "reference": r, "before": b}
               for e, (p, r), b in zip(val, pairs, before)]
    run.write_json("samples.json", samples)
    return samples


def format_samples(samples: list[dict]) -> str:
    parts = []
    for i, x in enumerate(samples, 1):
        parts.append(f"## {i}. {x['where']}\n\n**Prompt**\n\n```\n{x['prompt'].strip()}\n```\n\n**Reference**\n\n"
                     f"```\n{x['reference'].strip()}\n```\n\n**Before**\n\n```\n{x['before'].strip()}\n```\n\n"
                     f"**After**\n\n```\n{x.get('after', '').strip()}\n```\n")
    return "\n".join(parts)


def format_results(r: dict) -> str:
    summary = r["summary"]
    lines = [f"{r['command']} {r['method']}: {r['trainable_parameters'] / 1e6:.2f}M of {r['parameters'] / 1e6:.1f}M "
             f"parameters trained ({100 * r['trainable_fraction']:.2f} %), {summary['steps']} steps in "
             f"{r['train_seconds']:.0f} s ({r['seconds_per_step']:.2f} s/step), peak memory {r['peak_memory_mb']} MB"]
    evals = {k: v for k, v in summary.items() if k.startswith("val_")}
    before = r.get("before", {})
    lines.append("held out: " + ", ".join(f"{k} {before[k]:.4f} -> {v:.4f}" if k in before else f"{k} {v:.4f}"
                                          for k, v in evals.items()))
    for row in r.get("eval", []):
        lines.append(f"{row['task']:10} exact_match {row['value']:.4f} ± {row['stderr']:.4f} (n={row['n']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The commands

def run_sft(s: SftSettings, echo=print, command: str | None = None) -> dict:
    """`lmlab sft`: instruction tuning of s.model on s.data with s.method. Returns results.json's content."""
    t = _train_config(s)
    with TrainingRun(t, resume=s.resume, hint=RUN_DIR_HINT) as run:
        pretrained, train, val, info = _prepare(s, "sft", echo)
        context = pretrained.model.config.block_size
        encoded_train, skipped_train = encode_all(train, pretrained.tokenizer, pretrained.eos_token_id, s.seq_len,
                                                  context)
        encoded_val, skipped_val = encode_all(val, pretrained.tokenizer, pretrained.eos_token_id, s.seq_len,
                                              context)
        if not encoded_train or not encoded_val:
            raise LmlabError(f"no example fits --seq-len {s.seq_len}; raise it")
        info.update(train_examples=len(encoded_train), val_examples=len(encoded_val), packing=s.packing,
                    skipped_longer_than_seq_len=skipped_train + skipped_val)
        if echo and skipped_train + skipped_val:
            echo(f"left out {skipped_train + skipped_val} examples longer than --seq-len {s.seq_len} tokens")
        samples = _samples_before(pretrained, val, s, run)
        model = pretrained.model
        prepare_model(model, s.method, info["settings"], bf16=run.world.bf16, device=run.world.device, seed=s.seed)
        objective = InstructionTuning(model, encoded_train, encoded_val, method=s.method, settings=info["settings"],
                                      seq_len=s.seq_len, packing=s.packing, pad_id=pretrained.eos_token_id or 0,
                                      seed=s.seed)
        return _finish(s, pretrained, objective, info, samples, run, echo, command)


def build_pairs(pretrained, examples: list[Example], max_new_tokens: int,
                progress: bool = True) -> list[Pair | None]:
    """Preference pairs from instruction data, one per example: the data's response is chosen, the model's own
    greedy answer to the same prompt is rejected (the model that DPO starts from, so the pairs say "answer like
    the data, not like you do now"). None where the model's answer is empty or the data's response itself."""
    prompts = [prompt_and_reference(e) for e in examples]
    answers = answer_prompts(pretrained, pretrained.model, [p for p, _ in prompts], max_new_tokens, progress,
                             "rejected answers")
    return [Pair(p, r.strip(), a.strip(), e.where) if a.strip() and a.strip() != r.strip() else None
            for e, (p, r), a in zip(examples, prompts, answers)]


def _encode_pairs(pairs: list[Pair], pretrained, seq_len: int) -> tuple[list, int]:
    context = pretrained.model.config.block_size
    encoded, skipped = [], 0
    for pair in pairs:
        sides, dropped = encode_all(list(pair.sides()), pretrained.tokenizer, pretrained.eos_token_id, seq_len, context)
        if dropped:
            skipped += 1
        else:
            encoded.append(tuple(sides))
    return encoded, skipped


def _built_pairs(s: DpoSettings, pretrained, train: list[Example], val: list[Example], run: TrainingRun,
                 info: dict) -> tuple[list[Pair], list[Pair]]:
    """Pairs built from instruction data (build_pairs), kept in the run folder's pairs.jsonl (a resumed run reads
    them back)."""
    cached = run.run_dir / "pairs.jsonl"
    if run.main and not (s.resume and cached.is_file()):
        built = build_pairs(pretrained, train + val, s.rejected_tokens, s.progress)
        run.write_text("pairs.jsonl", "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen,
                                                          "rejected": p.rejected, "where": p.where,
                                                          "held_out": i >= len(train)}, ensure_ascii=False) + "\n"
                                              for i, p in enumerate(built) if p is not None))
    run.world.barrier()
    rows = [row for _, row in read_records(cached)]
    train = [Pair(r["prompt"], r["chosen"], r["rejected"], r["where"]) for r in rows if not r["held_out"]]
    val = [Pair(r["prompt"], r["chosen"], r["rejected"], r["where"]) for r in rows if r["held_out"]]
    info["pairs"] = (f"chosen: the data's response; rejected: {s.model}'s greedy answer (at most "
                     f"{s.rejected_tokens} tokens), in {cached}")
    if not train or not val:
        raise LmlabError(f"{s.model} answered {'no held-out' if train else 'no training'} prompt with a "
                         "text of its own (empty answers and copies of the data's response are left out), "
                         "so there are no pairs; give pairs (--format pairs) or other prompts")
    return train, val


def run_dpo(s: DpoSettings, echo=print, command: str | None = None) -> dict:
    """`lmlab dpo`: preference tuning of s.model. With --format pairs the pairs are read; with instruction data
    they are built (build_pairs) and kept in the run folder's pairs.jsonl. Returns results.json's content."""
    if s.beta <= 0:
        raise LmlabError(f"--beta must be positive (got {s.beta})")
    t = _train_config(s)
    with TrainingRun(t, resume=s.resume, hint=RUN_DIR_HINT) as run:
        pretrained, train, val, info = _prepare(s, "dpo", echo)
        if s.max_pairs:
            train = train[:s.max_pairs]
        if not isinstance(train[0], Pair):
            train, val = _built_pairs(s, pretrained, train, val, run, info)
        encoded_train, skipped_train = _encode_pairs(train, pretrained, s.seq_len)
        encoded_val, skipped_val = _encode_pairs(val, pretrained, s.seq_len)
        if not encoded_train or not encoded_val:
            raise LmlabError(f"no pair fits --seq-len {s.seq_len}; raise it")
        info.update(train_pairs=len(encoded_train), val_pairs=len(encoded_val), beta=s.beta,
                    skipped_longer_than_seq_len=skipped_train + skipped_val)
        samples = _samples_before(pretrained, val, s, run)
        model = pretrained.model
        prepare_model(model, s.method, info["settings"], bf16=run.world.bf16, device=run.world.device, seed=s.seed)
        with run.world.autocast():  # the reference log-probabilities in the precision the policy's are computed in
            objective = Preference(model, encoded_train, encoded_val, beta=s.beta, method=s.method,
                                   settings=info["settings"], pad_id=pretrained.eos_token_id or 0, seed=s.seed,
                                   progress=s.progress)
        return _finish(s, pretrained, objective, info, samples, run, echo, command)
