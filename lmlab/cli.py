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
import importlib
import inspect
import json as _json
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from lmlab.data.corpus import prepare
from lmlab.errors import LmlabError
from lmlab.inference.chat import answer, chat_loop
from lmlab.inference.generate import SamplingParams, beam_search, stream
from lmlab.inference.sample import prompt_ids
from lmlab.models.hf import export_hf
from lmlab.models.hub import list_models, load_pretrained, pull
from lmlab.models.quantize import InferenceSettings, check_device
from lmlab.training.config import load_config
from lmlab.training.pretrain import train as pretrain
from lmlab.util import check_writable, command_line, pick_device, record_command, settings_from


@dataclass
class Verb:
    """A command of `lmlab`: the function it runs, and what the command line changes about its parameters."""

    name: str
    function: Callable | str  # or "module:function", imported only when the command line names this verb
    help: str = ""  # default: the first line of the function's docstring
    defaults: dict[str, Any] = field(default_factory=dict)  # other defaults on the command line than in Python
    names: dict[str, tuple[str, ...]] = field(default_factory=dict)  # more flag names for a parameter
    argparse: dict[str, dict] = field(default_factory=dict)  # extra argparse keywords for a parameter
    hidden: tuple[str, ...] = ()  # parameters the command line does not set
    positional: tuple[str, ...] = ()  # parameters given as positional arguments (the rest are --flags)
    show: bool = False  # print the returned value (JSON for a dict)
    threads: bool = False  # the command line adds --threads (torch's CPU threads), for a verb that computes

    def resolve(self) -> Callable:
        """The verb's function, imported now if it was named as "module:function"."""
        if isinstance(self.function, str):
            module, _, attribute = self.function.partition(":")
            self.function = getattr(importlib.import_module(module), attribute)
        return self.function


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
        if default is True:  # the flag is --no-NAME; the help says what happens without it
            return {**kwargs, "action": "store_false", "help": f"without this flag: {help}" if help else ""}
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


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def _add_settings(parser, verb: Verb, cls, prefix: str = "", instance=None) -> None:
    """One flag per field of a settings dataclass; a field that is itself settings (LoRA's, say) adds its fields
    with its name as prefix (`lora.r` is `--lora-r`). The flag's dest is the flattened name (`lora_r`)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in verb.hidden:
            continue
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            _add_settings(parser, verb, hints[f.name], f"{prefix}{f.name}_",
                          None if default is dataclasses.MISSING else default)
            continue
        name = prefix + f.name
        default = verb.defaults.get(name, default)
        annotation = hints[f.name]
        if "type" in f.metadata:  # the field's own parser reads the flag's whole text ("qkv,proj" -> a tuple)
            annotation = str
            if isinstance(default, (tuple, list)):
                default = ",".join(map(str, default))
        kwargs = _flag_kwargs(name, annotation, default, f.metadata.get("help", ""))
        kwargs.update({k: v for k, v in f.metadata.items() if k != "help"}, **verb.argparse.get(name, {}))
        parser.add_argument(*_flag_names(name, default, verb.names.get(name, ())), dest=name, **kwargs)


def add_verb(sub, verb: Verb, name: str | None = None) -> None:
    fn = verb.resolve()
    hints = typing.get_type_hints(fn)
    helps = docstring_args(fn)
    doc = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
    parser = sub.add_parser(name or verb.name, help=verb.help or doc, description=verb.help or doc,
                            formatter_class=_HelpFormatter)
    for p in inspect.signature(fn).parameters.values():
        annotation = hints.get(p.name, str)
        if p.name in verb.hidden or p.name == "command" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) \
                or typing.get_origin(annotation) is collections.abc.Callable or inspect.isfunction(p.default) \
                or inspect.isbuiltin(p.default):
            continue
        if dataclasses.is_dataclass(annotation):
            _add_settings(parser, verb, annotation)
            continue
        default = verb.defaults.get(p.name, p.default)
        kwargs = _flag_kwargs(p.name, annotation, default, helps.get(p.name, ""))
        kwargs.update(verb.argparse.get(p.name, {}))
        if p.name in verb.positional:
            kwargs.pop("required", None)
            parser.add_argument(p.name, **kwargs)
        else:
            parser.add_argument(*_flag_names(p.name, default, verb.names.get(p.name, ())), dest=p.name, **kwargs)
    if verb.threads:  # a verb's own threads setting (word2vec, finetune, the lab...) is its --threads
        parser.add_argument("--threads", type=int, default=None, dest="_threads", metavar="THREADS",
                            help="CPU threads for torch (default: torch's, one per core; 1 on a shared machine)")
    parser.set_defaults(_verb=verb, _parser=parser)


def call_verb(args: argparse.Namespace):
    """Call the verb with the parsed flags: a settings dataclass parameter is filled from its fields' flags."""
    verb: Verb = args._verb
    flags = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    hints = typing.get_type_hints(verb.function)
    values: dict[str, Any] = {}
    for p in inspect.signature(verb.function).parameters.values():
        if dataclasses.is_dataclass(hints.get(p.name)):
            values[p.name] = settings_from(hints[p.name], flags)
        elif p.name in flags:
            values[p.name] = flags[p.name]
        elif p.name == "command":
            values[p.name] = command_line()
    return verb.function(**values)


def set_threads(args: argparse.Namespace) -> None:
    """Apply --threads before the verb runs: torch's intra-op threads (the engine's and the embedding model's worker
    threads read the same setting); a verb configured by --set also gets it as train.threads, which its training
    run applies."""
    threads = getattr(args, "_threads", None)
    if threads is None:
        return
    if threads < 1:
        raise LmlabError(f"--threads {threads}: give 1 or more CPU threads")
    torch.set_num_threads(threads)
    if "set" in vars(args):
        args.set = [*args.set, f"train.threads={threads}"]


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
             sampling: SamplingParams = SamplingParams(), inference: InferenceSettings = InferenceSettings()) -> None:
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
    if num_beams < 1:
        raise LmlabError(f"--num-beams {num_beams}: use 1 (sampling) or more (beam search)")
    if num_beams > 1 and sampling.speculate:  # beam search drafts nothing: the flag would be ignored
        raise LmlabError(f"--num-beams {num_beams} with --speculate {sampling.speculate}: speculative decoding "
                         "drafts for one sampled or greedy text, not for beam search; drop one of them")
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().exists():
        raise LmlabError(f"no such run or checkpoint folder, model file or model folder: {model}")
    target = pick_device(device)  # an unusable device is named before the model loads
    pretrained = load_pretrained(model, inference=inference)
    check_device(pretrained.model, target)
    pretrained.model.to(target)
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


def chat(model: str, system: str | None = None, sampling: SamplingParams = SamplingParams(),
         inference: InferenceSettings = InferenceSettings()) -> None:
    """Talk with a chat model (streaming; /reset, /exit).

    Args:
        model: registry name, .gguf file, Hugging Face folder, run folder or hub id of a chat model
        system: a system message opening the conversation
    """
    sampling.validate()
    chat_loop(load_pretrained(model, inference=inference), sampling, system=system)


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
    print("\nterms of use:")
    for r in rows:
        print(f"  {r['name']}: {r['license']}")


def export(model: str, out: str, format: str = "hf") -> str:
    """Export a model (a trained run, a .gguf, a registry name) to another format.

    Args:
        model: run folder, checkpoint folder, registry name, .gguf file or Hugging Face folder
        out: the folder to write
        format: hf: a Hugging Face folder (config.json, model.safetensors, tokenizer.json) that transformers loads
            (GPT-2, Llama, BERT or T5)
    """
    if format != "hf":
        raise LmlabError(f"unknown export format {format!r} (supported: hf)")
    check_writable(out)
    pre = load_pretrained(model)
    chat_format = ({"chat_template": pre.chat_template, "bos_token": pre.bos_token, "eos_token": pre.eos_token}
                   if pre.chat_template else {})
    folder = export_hf(pre.model, out, pre.tokenizer, **chat_format)
    arch = _json.loads((folder / "config.json").read_text())["architectures"][0]
    return f"wrote {folder} (load with transformers.{arch}.from_pretrained({str(folder)!r}))"


# The command line decodes with --compile auto; a library call compiles only when asked to (InferenceSettings).
_COMPILE_AUTO = {"compile": "auto"}

_SAMPLE_DEFAULTS = {"prompt": "\n", "max_new_tokens": 300, "temperature": 0.8, "seed": 1337, **_COMPILE_AUTO}

_RAG_DEFAULTS = {"max_new_tokens": 200, "temperature": 0.0}

# Each verb's help is written here for the user, in plain words (the functions' docstrings speak to Python
# callers): `lmlab --help` lists it without importing the verb's module, and tests/test_cli_help.py fails on a
# help line that names a code parameter.
VERBS = [
    Verb("prepare", prepare, positional=("source",), show=True,
         help="turn a text corpus into token files for training (character or BPE tokens)"),
    Verb("train", train, threads=True, positional=("config",), show=True, argparse={"set": {"metavar": "KEY=VALUE"}},
         help="pretrain a model from a YAML config (a GPT, a BERT-style encoder or a T5); works under torchrun"),
    Verb("generate", generate, threads=True, defaults={"max_new_tokens": 256, "temperature": 0.7, **_COMPILE_AUTO},
         hidden=("stop_at_eos",),
         help="continue a prompt with a model, streaming the text (sampling or beam search)"),
    Verb("sample", generate, threads=True, defaults=_SAMPLE_DEFAULTS,
         help="generate from a trained run (lmlab generate --model RUN, with sampling defaults for small character "
              "models)",
         names={"model": ("--run",)}, hidden=("stop_at_eos",)),
    Verb("chat", chat, threads=True, defaults={"max_new_tokens": 256, "temperature": 0.7, **_COMPILE_AUTO},
         hidden=("stop_at_eos",),
         help="talk with a chat model in the terminal (/reset starts over, /exit quits)"),
    Verb("export", export, names={"model": ("--run",)}, show=True,
         help="export a model (a trained run, a .gguf file, a registry model) to a Hugging Face folder"),
    Verb("models", models, help="list the registry's models, which are downloaded, and their terms of use"),
    Verb("pull", pull, positional=("name",), show=True, help="download a registry model (once) and print where it is"),
    Verb("paradigms", "lmlab.experiments.paradigms:paradigms", argparse={"glue": {"nargs": "?", "const": "all"}},
         help="compare the three eras on one task (from scratch, fine-tuned, prompted), or build the lecture's "
              "GLUE table"),
    Verb("demo", "lmlab.experiments.demo:demo", threads=True, argparse={"set": {"metavar": "KEY=VALUE"}},
         help="the main job: prepare Shakespeare, train a small GPT for a few minutes, and sample from it"),
    Verb("eval", "lmlab.evaluate:run_eval", threads=True, hidden=("tokenizer", "echo"), defaults={"shots": "0"},
         help="score a model on benchmarks: perplexity, zero- and few-shot multiple choice, classification"),
    Verb("finetune", "lmlab.training.classification:finetune",
         help="fine-tune a pretrained model (fully or with LoRA) on a classification task, or train a "
              "from-scratch baseline on it"),
    Verb("t5-finetune", "lmlab.training.text_to_text:t5_finetune",
         help="fine-tune a T5 model text to text on one GLUE task or a mixture, and score the dev sets"),
    Verb("t5-experiment", "lmlab.experiments.t5:run_t5_experiment",
         help="pretrain a small T5, then fine-tune it and the same model from random weights on each task and on "
              "their mixture, and report the comparison"),
    Verb("sft", "lmlab.training.sft:run_sft",
         help="instruction-tune a model (all weights, LoRA or adapters) on instruction or chat data"),
    Verb("dpo", "lmlab.training.sft:run_dpo",
         help="preference-tune a model by DPO on chosen and rejected answers (or pairs built from instruction data)"),
    Verb("serve", "lmlab.inference.server:serve", threads=True,
         help="serve a model over the OpenAI HTTP API (continuous batching), with a chat page"),
    Verb("embed", "lmlab.inference.embed:embed", threads=True, show=True,
         help="turn the texts of a file into sentence vectors (as sentence-transformers computes them)"),
    Verb("rag index", "lmlab.apps.rag:rag_index", threads=True, positional=("docs",), show=True,
         help="index documents for retrieval: split them into chunks, embed the chunks, write an index folder"),
    Verb("rag ask", "lmlab.apps.rag:rag_ask", threads=True, positional=("index", "question"), hidden=("stop_at_eos",),
         defaults=_RAG_DEFAULTS, help="answer a question from an index with a chat model, and print its sources"),
    Verb("rag chat", "lmlab.apps.rag:rag_chat", threads=True, positional=("index",), hidden=("stop_at_eos", "out"),
         defaults=_RAG_DEFAULTS,
         help="chat with a model that answers from an index (each question retrieves anew; /exit quits)"),
    Verb("rag eval-retrieval", "lmlab.apps.rag_eval:eval_retrieval", threads=True, show=True,
         help="measure an embedding model: STS-B similarity, and QNLI retrieval against BM25"),
    Verb("rag eval-answers", "lmlab.apps.rag_eval:eval_answers", threads=True, show=True,
         help="measure a chat model's answers with and without retrieval, on questions from indexed WikiText"),
    Verb("word2vec", "lmlab.training.word2vec:word2vec",
         help="train word vectors (skip-gram or CBOW, as word2vec.c) and score them on analogies and similarity"),
    Verb("lab scaling", "lmlab.experiments.lab.scaling:lab_scaling",
         help="fit a scaling law to GPT sizes on token budgets that grow with size, with IsoFLOP profiles"),
    Verb("lab emergence", "lmlab.experiments.lab.emergence:lab_emergence",
         help="train six GPT sizes on addition: does exact match jump where per-token accuracy rises smoothly?"),
    Verb("lab induction", "lmlab.experiments.lab.induction:induction", show=True,
         help="watch induction heads form: a 2-layer attention-only model against a 1-layer control"),
    Verb("lab grokking", "lmlab.experiments.lab.grokking:grokking", show=True,
         help="grokking on modular addition: test accuracy arrives long after train accuracy"),
    Verb("lab shots", "lmlab.experiments.lab.shots:zero_vs_few_shot", show=True,
         help="zero against few shots for every downloaded real model, beside the induction experiment's curve"),
    Verb("elmo", "lmlab.training.elmo:elmo", hidden=("on_step",),
         help="pretrain an ELMo biLM on text (or fine-tune one on a task's text) and report its perplexity"),
]

# The command groups: `lmlab rag ...` and `lmlab lab ...`.
GROUPS = {
    "rag": "answer questions from your documents: index, ask, chat, and measure retrieval and answers",
    "lab": "the scale and emergence experiments: scaling, emergence, induction heads, grokking, shots",
}

# `lmlab --help` lists the verbs by stage of the course's road, as `git help` groups git's commands; each stage
# is a page of the documentation (docs/road/). Every verb and group is in exactly one stage (tested).
STAGES = [
    ("pretrain a GPT", ("prepare", "train", "demo", "sample", "export")),
    ("pretrained models and decoding", ("models", "pull", "generate", "chat")),
    ("prompting and evaluation", ("eval",)),
    ("transfer before LLMs", ("word2vec", "elmo", "finetune", "paradigms", "t5-finetune", "t5-experiment")),
    ("fine-tuning LLMs", ("sft", "dpo")),
    ("scale and emergence", ("lab",)),
    ("deploying", ("serve",)),
    ("applying: embeddings and retrieval", ("embed", "rag")),
]


def stage_listing() -> str:
    """The verbs by stage of the road, one line each, for `lmlab --help`."""
    helps = {verb.name: verb.help for verb in VERBS} | GROUPS
    width = max(map(len, helps)) + 2
    lines = ["commands, by stage of the road (docs/road/ has a page for each):"]
    for number, (stage, names) in enumerate(STAGES, 1):
        lines += ["", f"{number}. {stage}"]
        lines += [textwrap.fill(helps[name], 100, initial_indent=f"   {name:{width}}",
                                subsequent_indent=" " * (3 + width)) for name in names]
    lines += ["", "'lmlab COMMAND --help' lists a command's options; 'lmlab rag --help' and 'lmlab lab --help' list "
              "their commands."]
    return "\n".join(lines)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every verb; given the command line, only the verb it names is imported and gets its flags
    (the others are names in the list), so that `lmlab serve` does not import numba, matplotlib or faiss."""
    names = {verb.name.split()[0] for verb in VERBS}
    wanted = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    parser = argparse.ArgumentParser(prog="lmlab", usage="lmlab COMMAND [options]",
                                     description="A hands-on laboratory for language models: pretrain, fine-tune, "
                                                 "evaluate and deploy.", epilog=stage_listing(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # The commands are listed by stage in the epilog, not in argparse's flat list.
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help=argparse.SUPPRESS,
                                prog="lmlab")
    groups: dict[str, Any] = {}  # "rag index" is the verb index of the command group rag
    for verb in VERBS:
        group, _, name = verb.name.rpartition(" ")
        if group and group not in groups:
            groups[group] = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group]).add_subparsers(
                dest="subcommand", required=True, metavar="SUBCOMMAND", help="one of")
        if wanted not in names or verb.name.split()[0] == wanted:
            add_verb(groups[group] if group else sub, verb, name)
        else:
            (groups[group] if group else sub).add_parser(name, help=verb.help)
    return parser


TRAINING_VERBS = ("train", "finetune", "sft", "dpo", "demo")


def resume_hint(parser: argparse.ArgumentParser) -> str:
    """How an interrupted command continues: with --resume where the verb has it (train, finetune, ...), else by
    running it again (the lab's experiments and t5-experiment read finished runs back and resume the rest)."""
    if any("--resume" in action.option_strings for action in parser._actions):
        return "; continue with the same command and --resume"
    return "; run the same command again to continue from it"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    record_command(argv)
    if argv and argv[0] in TRAINING_VERBS and any(a.split("=")[0] == "--quantize" for a in argv):
        print(f"lmlab {argv[0]}: error: --quantize is a flag of inference (generate, chat, serve, eval): training "
              "updates float weights; train first, then load the result with --quantize", file=sys.stderr)
        return 2
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the verb's own parser: `lmlab embed: error: ...` with the verb's usage line
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        set_threads(args)
        result = call_verb(args)
    except LmlabError as e:
        print(f"lmlab {args._verb.name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or lmlab.errors.Interrupted: SIGINT/SIGTERM after a checkpoint
        text = str(e) + (resume_hint(getattr(args, "_parser", parser)) if getattr(e, "resumable", False) else "")
        print(f"lmlab {args._verb.name}: interrupted{': ' + text if text else ''}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    if args._verb.show and result is not None:
        print(_json.dumps(result, indent=2, default=str) if isinstance(result, (dict, list)) else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
