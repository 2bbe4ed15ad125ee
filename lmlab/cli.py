"""The `lmlab` command: one verb per step of the course's road, as litgpt's `litgpt <verb>`.

A verb is a Python function, and its flags come from the function's own signature: each parameter is a `--flag`
(or a positional argument where the verb says so) (`max_new_tokens` -> `--max-new-tokens`), with the
help text of the docstring's `Args:` section. A parameter typed as a settings dataclass contributes one flag per
field, with the help text given next to the field by `lmlab.util.option`. So every parameter is declared once,
with its help next to it, and `lmlab VERB --help` lists exactly what the function takes.

Types map to argparse as one expects: int/float/str, `X | None`, `Literal[...]` (choices), `list[str]` (a
repeatable flag), `bool` (`--flag` when the default is False, `--no-flag` when it is True). A function with a
`command` parameter gets the command line that ran it (it records it in its results). A verb that returns a dict
prints it as JSON, one that returns text prints the text.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import inspect
import json as _json
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from lmlab.data.corpus import prepare
from lmlab.errors import LmlabError
from lmlab.evaluate import run_eval
from lmlab.experiments.demo import demo
from lmlab.experiments.paradigms import GLUE_TASKS, paradigms
from lmlab.inference.chat import answer, chat_loop
from lmlab.inference.generate import SamplingParams, beam_search, stream
from lmlab.inference.sample import prompt_ids
from lmlab.inference.server import serve
from lmlab.models.hf import export_hf
from lmlab.models.hub import list_models, load_pretrained, pull
from lmlab.training.classification import finetune, parse_labels
from lmlab.training.config import load_config
from lmlab.training.loop import train as pretrain
from lmlab.training.sft import TuneSettings, method_settings, run_dpo, run_sft
from lmlab.util import command_line, pick_device


@dataclass
class Verb:
    """A command of `lmlab`: the function it runs, and what the command line changes about its parameters."""

    name: str
    function: Callable
    help: str = ""  # default: the first line of the function's docstring
    defaults: dict[str, Any] = field(default_factory=dict)  # other defaults on the command line than in Python
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # more flag names for a parameter
    argparse: dict[str, dict] = field(default_factory=dict)  # extra argparse keywords for a parameter
    hidden: tuple[str, ...] = ()  # parameters the command line does not set
    positional: tuple[str, ...] = ()  # parameters given as positional arguments (the rest are --flags)
    show: bool = False  # print the returned value (JSON for a dict)


# ----------------------------------------------------------------------------------------------------------------
# From a signature to flags

_ARG_LINE = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*)(?: \([^)]*\))?: (.*)$")


def docstring_args(fn: Callable) -> dict[str, str]:
    """The `Args:` section of a Google-style docstring as {parameter: help text}."""
    lines = inspect.getdoc(fn).splitlines() if inspect.getdoc(fn) else []
    helps: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return helps
    current, indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            current = None
            continue
        match = _ARG_LINE.match(line)
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break
        if match and width == indent:
            current = match.group(2)
            helps[current] = match.group(3).strip()
        elif current is not None:
            helps[current] += " " + line.strip()
    return helps


def _unwrap(annotation) -> tuple[Any, bool]:
    """(the type a flag parses, whether it is repeatable) for a parameter's annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if str in members or Path in members:
            return str, False
        return _unwrap(members[0]) if len(members) == 1 else (str, False)
    if origin in (list, tuple, collections.abc.Sequence):
        inner = typing.get_args(annotation)
        return (inner[0] if inner and inner[0] is not Ellipsis else str), True
    return annotation, False


def _flag_kwargs(name: str, annotation, default, help: str) -> dict:
    kind, repeatable = _unwrap(annotation)
    kwargs: dict[str, Any] = {"help": help}
    if default is inspect.Parameter.empty or default is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        kwargs["default"] = list(default) if repeatable and default is not None else default
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        return {**kwargs, "choices": list(choices), "type": type(choices[0])}
    if kind is bool:
        if default is True:  # the flag is --no-NAME
            return {**kwargs, "action": "store_false", "help": f"turn off: {help}"}
        return {**kwargs, "action": "store_true"}
    kwargs["metavar"] = name.upper()
    if repeatable:
        return {**kwargs, "action": "append", "type": kind if kind in (int, float) else str,
                "default": kwargs.get("default") or []}
    return {**kwargs, "type": kind if kind in (int, float) else str}


def _flag_names(name: str, default, extra: tuple[str, ...]) -> list[str]:
    flag = name.replace("_", "-")
    return [f"--no-{flag}" if default is True else f"--{flag}", *extra]


class _HelpFormatter(argparse.HelpFormatter):
    """Help that shows a flag's default where it says something (not for switches, nor for None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, True, [], (), argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


@dataclass
class _Slot:
    """Where a parsed value goes: a parameter of the function, or a field of a settings dataclass parameter."""
    dest: str
    param: str
    field: str | None = None


def _add_settings(parser, verb: Verb, param: str, cls, slots: list[_Slot]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in verb.hidden:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            raise TypeError(f"{cls.__name__}.{f.name}: nested settings are given as their own parameter")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        default = verb.defaults.get(f.name, default)
        kwargs = _flag_kwargs(f.name, hints[f.name], default, f.metadata.get("help", ""))
        kwargs.update({k: v for k, v in f.metadata.items() if k != "help"}, **verb.argparse.get(f.name, {}))
        dest = f"{param}.{f.name}"
        parser.add_argument(*_flag_names(f.name, default, verb.names.get(f.name, ())), dest=dest, **kwargs)
        slots.append(_Slot(dest, param, f.name))


def add_verb(sub, verb: Verb) -> None:
    fn = verb.function
    hints = typing.get_type_hints(fn)
    helps = docstring_args(fn)
    doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
    parser = sub.add_parser(verb.name, help=verb.help or doc, description=verb.help or doc,
                            formatter_class=_HelpFormatter)
    slots: list[_Slot] = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in verb.hidden or p.name == "command" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        annotation = hints.get(p.name, str)
        if dataclasses.is_dataclass(annotation):
            _add_settings(parser, verb, p.name, annotation, slots)
            continue
        default = verb.defaults.get(p.name, p.default)
        kwargs = _flag_kwargs(p.name, annotation, default, helps.get(p.name, ""))
        kwargs.update(verb.argparse.get(p.name, {}))
        if p.name in verb.positional:
            kwargs.pop("required", None)
            parser.add_argument(p.name, **kwargs)
        else:
            parser.add_argument(*_flag_names(p.name, default, verb.names.get(p.name, ())), dest=p.name, **kwargs)
        slots.append(_Slot(p.name, p.name))
    parser.set_defaults(_verb=verb, _slots=slots)


def call_verb(args: argparse.Namespace):
    verb: Verb = args._verb
    values: dict[str, Any] = {}
    settings: dict[str, dict] = {}
    for slot in args._slots:
        value = getattr(args, slot.dest)
        if slot.field is None:
            values[slot.param] = value
        else:
            settings.setdefault(slot.param, {})[slot.field] = value
    hints = typing.get_type_hints(verb.function)
    for param, fields in settings.items():
        values[param] = hints[param](**fields)
    signature = inspect.signature(verb.function)
    if "command" in signature.parameters:
        values["command"] = command_line()
    return verb.function(**values)


# ----------------------------------------------------------------------------------------------------------------
# The verbs that are not a library function of their own: they turn the command line's text into the objects the
# library takes (a config file into a RunConfig, a model name into a loaded model) and print what comes back.

def is_run(spec: str) -> bool:
    """Whether a model spec is an lmlab run folder (or one of its checkpoints)."""
    path = Path(spec)
    return path.is_dir() and ((path / "ckpt").is_dir() or path.parent.name == "ckpt")


def train(config: str, set: list[str] = (), resume: bool = False, progress: bool = True) -> dict:
    """Pretrain a model by next-token prediction (or masked-LM for an encoder config); works under torchrun.

    Args:
        config: YAML config file, or the name of a shipped one (e.g. shakespeare-char)
        set: override a config value, e.g. --set train.lr=3e-4 (repeatable)
        resume: continue the run in train.run_dir from its checkpoint
        progress: show the progress bar
    """
    return pretrain(load_config(config, list(set)), resume=resume, progress=progress)


def generate(model: str, prompt: str, chat: bool = False, num_beams: int = 1, device: str = "cpu",
             sampling: SamplingParams = SamplingParams()) -> None:
    """Continue a prompt with a model (streams the text); a trained run's small context slides as the text grows.

    Args:
        model: registry name (lmlab models), a .gguf file, a Hugging Face folder, an lmlab run folder, or a hub id
            org/name
        prompt: the text to continue
        chat: send the prompt as a user turn through the chat template
        num_beams: beam search with this many beams (no sampling)
        device: cpu | cuda | mps | auto
    """
    sampling.validate()
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise LmlabError(f"no such run or checkpoint folder, model file or model folder: {model}")
    pretrained = load_pretrained(model)
    pretrained.model.to(pick_device(device))
    if chat:
        deltas = answer(pretrained, [{"role": "user", "content": prompt}], sampling)
    else:
        ids = prompt_ids(pretrained.tokenizer, prompt)
        if num_beams > 1:
            best, _ = beam_search(pretrained.model, ids, num_beams, sampling.max_new_tokens,
                                  eos_ids=pretrained.eos_ids)[0]
            deltas = [prompt, pretrained.tokenizer.decode(best)]
        else:
            sys.stdout.write(prompt)
            deltas = stream(pretrained.model, pretrained.tokenizer, ids, sampling, eos_ids=pretrained.eos_ids,
                            slide=is_run(model))
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def chat(model: str, system: str | None = None, sampling: SamplingParams = SamplingParams()) -> None:
    """Talk with a chat model (streaming; /reset, /exit).

    Args:
        model: registry name, .gguf file, Hugging Face folder, run folder or hub id of a chat model
        system: a system message opening the conversation
    """
    sampling.validate()
    chat_loop(load_pretrained(model), sampling, system=system)


def models(json: bool = False) -> None:
    """List registered models and what is downloaded.

    Args:
        json: print the registry as JSON
    """
    rows = list_models()
    if json:
        print(_json.dumps(rows, indent=2))
        return
    print(f"{'name':24} {'architecture':14} {'format':12} {'size':>9}  downloaded")
    for r in rows:
        print(f"{r['name']:24} {r['architecture']:14} {r['format']:12} {r['size']:>9}  "
              f"{r['path'] if r['downloaded'] else 'no (lmlab pull ' + r['name'] + ')'}")


def export(model: str, out: str, format: str = "hf") -> str:
    """Export a model (a trained run, a .gguf, a registry name) to another format.

    Args:
        model: run folder, checkpoint folder, registry name, .gguf file or Hugging Face folder
        out: the folder to write
        format: hf: a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that transformers loads
            (GPT-2, Llama or BERT)
    """
    if format != "hf":
        raise LmlabError(f"unknown export format {format!r} (supported: hf)")
    pre = load_pretrained(model)
    chat_format = ({"chat_template": pre.chat_template, "bos_token": pre.bos_token, "eos_token": pre.eos_token}
                   if pre.chat_template else {})
    folder = export_hf(pre.model, out, pre.tokenizer, **chat_format)
    arch = _json.loads((folder / "config.json").read_text())["architectures"][0]
    return f"wrote {folder} (load with transformers.{arch}.from_pretrained({str(folder)!r}))"


_SAMPLE_DEFAULTS = {"prompt": "\n", "max_new_tokens": 300, "temperature": 0.8, "seed": 1337}

VERBS = [
    Verb("prepare", prepare, positional=("source",), show=True),
    Verb("train", train, positional=("config",), show=True, argparse={"set": {"metavar": "KEY=VALUE"}}),
    Verb("generate", generate, defaults={"max_new_tokens": 256, "temperature": 0.7}, hidden=("stop_at_eos",)),
    Verb("sample", generate, help="generate from a trained run (lmlab generate --model RUN, with sampling "
                                  "defaults for small character models)", defaults=_SAMPLE_DEFAULTS,
         names={"model": ("--run",)}, hidden=("stop_at_eos",)),
    Verb("chat", chat, defaults={"max_new_tokens": 256, "temperature": 0.7}, hidden=("stop_at_eos",)),
    Verb("export", export, names={"model": ("--run",)}, show=True),
    Verb("models", models),
    Verb("pull", pull, positional=("name",), show=True),
    Verb("paradigms", paradigms, argparse={"glue": {"nargs": "?", "const": GLUE_TASKS}}),
    Verb("eval", run_eval, hidden=("tokenizer", "echo"), defaults={"shots": "0"}),
    Verb("serve", serve),
]


# ----------------------------------------------------------------------------------------------------------------
# Commands still declared by hand (until their functions take settings dataclasses)

def cmd_finetune(args):

    finetune(args.model, args.task, labels=parse_labels(args.labels), method=args.method, pooling=args.pooling,
             epochs=args.epochs, max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size,
             micro_batch_size=args.micro_batch_size, max_length=args.max_length, dropout=args.dropout,
             weight_decay=args.weight_decay, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
             lora_dropout=args.lora_dropout, lora_targets=args.lora_targets, patience=args.patience,
             eval_every=args.eval_every, seed=args.seed, data_dir=args.data_dir, out=args.out, threads=args.threads,
             device=args.device, compile=args.compile, resume=args.resume, progress=not args.no_progress,
             command=command_line())


def _tune_settings(args):

    settings = method_settings(args.method, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                               lora_dropout=args.lora_dropout, lora_targets=args.lora_targets.split(","),
                               adapter_size=args.adapter_size, adapter_activation=args.adapter_activation)
    return TuneSettings(model=args.model, data=args.data, formats=args.format.split(","), run_dir=args.run_dir,
                        method=args.method, settings=settings, seq_len=args.seq_len, val_size=args.val_size,
                        steps=args.steps, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
                        lr=args.lr, seed=args.seed, threads=args.threads, overrides=tuple(args.set),
                        samples=args.samples, sample_tokens=args.sample_tokens,
                        decontaminate=tuple(t for t in args.decontaminate.split(",") if t),
                        data_dir=args.data_dir, eval_tasks=tuple(t for t in args.eval_tasks.split(",") if t),
                        eval_limit=args.eval_limit, resume=args.resume, progress=not args.no_progress,
                        command=command_line())


def cmd_sft(args):

    run_sft(_tune_settings(args), packing=args.packing)


def cmd_dpo(args):

    run_dpo(_tune_settings(args), beta=args.beta, rejected_tokens=args.rejected_tokens, max_pairs=args.max_pairs)


def _add_tuning_args(s, formats: str, run_dir: str, steps: int):
    s.add_argument("--model", required=True, help="registry name, .gguf, Hugging Face folder, run folder (an sft "
                                                  "run too), or hub id")
    s.add_argument("--data", action="append", required=True, help="data file (repeatable)")
    s.add_argument("--format", default="alpaca", help=f"{formats} (one for all files, or one per file, "
                                                      "comma-separated)")
    s.add_argument("--method", default="lora", choices=["full", "lora", "adapterh", "adapterp"])
    s.add_argument("--run-dir", default=run_dir)
    s.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    s.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    s.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward pass (gradient "
                                                                      "accumulation)")
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-5 full, 3e-4 PEFT)")
    s.add_argument("--seq-len", type=int, default=512, help="tokens per training row; longer examples are left out")
    s.add_argument("--val-size", type=int, default=50, help="held-out examples (a seeded draw)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    s.add_argument("--set", action="append", default=[], metavar="train.KEY=VALUE",
                   help="any training setting (lmlab.training.config.TrainConfig), e.g. --set train.eval_interval=50; "
                        "train.dtype=float32 turns off the default bf16 autocast of hardware with native bf16")
    s.add_argument("--lora-r", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=16)
    s.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on LoRA's input (as Hugging Face "
                                                                   "PEFT, 0 by default: on a CPU it costs a "
                                                                   "quarter of a SmolLM2 step)")
    s.add_argument("--lora-targets", default="qkv,proj,fc", help="linear layers that get LoRA (name suffixes)")
    s.add_argument("--adapter-size", type=int, default=None, help="adapter bottleneck width (default 32 adapterh, "
                                                                  "64 adapterp)")
    s.add_argument("--adapter-activation", default="tanh", choices=["tanh", "relu", "gelu", "silu"])
    s.add_argument("--samples", type=int, default=5, help="held-out prompts answered before and after training")
    s.add_argument("--sample-tokens", type=int, default=128, help="longest answer for --samples")
    s.add_argument("--decontaminate", default="", help="evaluation tasks (e.g. addsub,singleeq,aqua) whose "
                                                       "questions are removed from the training data")
    s.add_argument("--eval-tasks", default="", help="evaluate the tuned model on these tasks afterwards")
    s.add_argument("--eval-limit", type=int, default=None, help="examples per task for --eval-tasks")
    s.add_argument("--data-dir", default=None, help="evaluation data folder (for --decontaminate, --eval-tasks)")
    s.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_demo(args):

    demo(run_dir=args.run_dir, overrides=args.set)


def add_legacy(sub):
    s = sub.add_parser("finetune", help="fine-tune a pretrained model (or train a from-scratch baseline) on a "
                                        "classification or regression task (full or LoRA)")
    s.add_argument("--model", required=True, help="a pretrained model (registry name, Hugging Face folder, .gguf, "
                                                  "run folder, hub id), or bilstm / cnn: a from-scratch baseline")
    s.add_argument("--task", required=True, help="sst2, rte, mrpc, cola, stsb, wnli, trec, ... (lmlab eval's tasks "
                                                 "with a training split)")
    s.add_argument("--labels", default="all", help="train on N labelled examples (a seeded, class-balanced subset), "
                                                   "or all")
    s.add_argument("--method", default="full", choices=["full", "lora"])
    s.add_argument("--pooling", default=None, choices=["cls", "mean", "last"],
                   help="sentence vector: cls (encoders' default), mean, last (decoders' default)")
    s.add_argument("--epochs", type=float, default=3.0)
    s.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 full, 1e-3 LoRA, 2e-3 "
                                                           "baselines)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward pass (gradient accumulation)")
    s.add_argument("--max-length", type=int, default=128, help="tokens per example (longer ones are truncated)")
    s.add_argument("--dropout", type=float, default=0.1)
    s.add_argument("--weight-decay", type=float, default=0.01)
    s.add_argument("--lora-r", type=int, default=8)
    s.add_argument("--lora-alpha", type=float, default=16)
    s.add_argument("--lora-dropout", type=float, default=0.05)
    s.add_argument("--lora-targets", default="qkv,proj,fc", help="linear layers that get LoRA (name suffixes)")
    s.add_argument("--patience", type=int, default=0, help="stop after N evaluations without a better dev metric")
    s.add_argument("--eval-every", type=int, default=None, help="steps between dev evaluations (default: 10 a run)")
    s.add_argument("--seed", type=int, default=0, help="seed of the label subset, the head, the batches")
    s.add_argument("--data-dir", default=None, help="folder with the task data (default: $LMLAB_DATA, else "
                                                    "$LMLAB_HOME/data)")
    s.add_argument("--out", default=None, help="run folder (default runs/finetune-TASK-MODEL-METHOD-LABELS)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    s.add_argument("--device", default="auto")
    s.add_argument("--compile", action="store_true", help="torch.compile the model")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("sft", help="instruction tuning: fine-tune a model on prompt/response data (loss on the "
                                   "responses only; full, lora, adapterh or adapterp)")
    _add_tuning_args(s, "alpaca | gsm8k | chat | jsonl", "runs/sft", 300)
    s.add_argument("--packing", action="store_true", help="pack examples into rows of exactly --seq-len tokens "
                                                          "(default: length-bucketed batches)")
    s.set_defaults(func=cmd_sft)

    s = sub.add_parser("dpo", help="preference tuning with DPO on (chosen, rejected) pairs, built from "
                                   "instruction data with the model's own answers as rejected ones")
    _add_tuning_args(s, "pairs ({prompt, chosen, rejected}) or instruction data: alpaca | gsm8k | chat | jsonl",
                     "runs/dpo", 100)
    s.add_argument("--beta", type=float, default=0.1, help="DPO's beta: how far from the reference the policy "
                                                           "may move")
    s.add_argument("--rejected-tokens", type=int, default=128, help="longest generated (rejected) answer")
    s.add_argument("--max-pairs", type=int, default=None, help="training pairs to build (default: all examples)")
    s.set_defaults(func=cmd_dpo)

    s = sub.add_parser("demo", help="the main job: prepare Shakespeare, train a small GPT for a few minutes, sample")
    s.add_argument("--run-dir", default="runs/demo")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmlab", description="A hands-on laboratory for language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        add_verb(sub, verb)
    add_legacy(sub)
    return parser

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = call_verb(args) if hasattr(args, "_verb") else args.func(args)
    except LmlabError as e:
        print(f"lmlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130
    if hasattr(args, "_verb") and args._verb.show and result is not None:
        print(_json.dumps(result, indent=2, default=str) if isinstance(result, (dict, list)) else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
