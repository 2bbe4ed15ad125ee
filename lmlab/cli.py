"""The `lmlab` command: one subcommand per step of the course's road (prepare, train, sample, export, demo)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmlab.errors import LmlabError


def cmd_prepare(args):
    from lmlab.data import prepare

    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   text_field=args.text_field, val_fraction=args.val_fraction, dtype=args.dtype)
    print(json.dumps(meta, indent=2))


def cmd_train(args):
    from lmlab.config import load_config
    from lmlab.train import train

    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))


def cmd_sample(args):
    from lmlab.sample import sample

    print(sample(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, seed=args.seed, device=args.device))


def cmd_export(args):
    from lmlab.data import load_tokenizer
    from lmlab.hf import export_hf
    from lmlab.train import load_model

    if args.format != "hf":
        raise LmlabError(f"unknown export format {args.format!r} (supported: hf)")
    model = load_model(args.run)
    tok = Path(args.run) / "tokenizer.json"
    load_tokenizer(tok)  # fail early with a clear message if it is missing or broken
    out = export_hf(model, args.out, tokenizer_json=tok)
    print(f"wrote {out} (load with transformers.GPT2LMHeadModel.from_pretrained({str(out)!r}))")


def cmd_demo(args):
    from lmlab.demo import demo

    demo(run_dir=args.run_dir, overrides=args.set)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmlab", description="A hands-on laboratory for language models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("prepare", help="tokenize a corpus into train/val token files")
    s.add_argument("source", help="'shakespeare' (default corpus), a .txt file or folder, .jsonl, .parquet, "
                                  "or a Hugging Face dataset name")
    s.add_argument("--out", required=True, help="output folder (train.bin, val.bin, tokenizer.json, meta.json)")
    s.add_argument("--tokenizer", default="char", help="char | bpe | path to an existing tokenizer.json")
    s.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    s.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"])
    s.set_defaults(func=cmd_prepare)

    s = sub.add_parser("train", help="pretrain a model by next-token prediction (works under torchrun)")
    s.add_argument("config", help="YAML config file, or the name of a shipped one (e.g. shakespeare-char)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    s.add_argument("--resume", action="store_true", help="continue the run in train.run_dir from its checkpoint")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate text from a trained run")
    s.add_argument("--run", required=True, help="run folder (or a checkpoint folder)")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=int, default=300)
    s.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("export", help="export a trained run to another format")
    s.add_argument("--run", required=True, help="run folder (or a checkpoint folder)")
    s.add_argument("--format", default="hf", help="hf: a Hugging Face folder (config.json, model.safetensors, "
                                                   "tokenizer.json) that transformers loads as GPT2LMHeadModel")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("demo", help="the main job: prepare Shakespeare, train a small GPT for a few minutes, sample")
    s.add_argument("--run-dir", default="runs/demo")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmlabError as e:
        print(f"lmlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmlab {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
