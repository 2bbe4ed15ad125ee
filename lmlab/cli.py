"""The `lmlab` command: one subcommand per step of the course's road (prepare, train, sample, export, demo)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from lmlab.errors import LmlabError


def cmd_prepare(args):
    from lmlab.data.corpus import prepare

    meta = prepare(args.source, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   text_field=args.text_field, val_fraction=args.val_fraction, dtype=args.dtype)
    print(json.dumps(meta, indent=2))


def cmd_train(args):
    from lmlab.training.config import load_config
    from lmlab.training.pretrain import train

    cfg = load_config(args.config, args.set)
    summary = train(cfg, resume=args.resume, progress=not args.no_progress)
    print(json.dumps(summary, indent=2))


def cmd_sample(args):
    from lmlab.inference.sample import sample

    print(sample(args.run, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, seed=args.seed, device=args.device))


def cmd_export(args):
    from lmlab.models.hf import export_hf
    from lmlab.models.hub import load_pretrained

    if args.format != "hf":
        raise LmlabError(f"unknown export format {args.format!r} (supported: hf)")
    pre = load_pretrained(args.run)
    out = export_hf(pre.model, args.out, pre.tokenizer, **({"chat_template": pre.chat_template,
                    "bos_token": pre.bos_token, "eos_token": pre.eos_token} if pre.chat_template else {}))
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"wrote {out} (load with transformers.{arch}.from_pretrained({str(out)!r}))")


def _sampling(args):
    from lmlab.inference.generate import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            stop=tuple(args.stop), seed=args.seed)
    params.validate()
    return params


def cmd_generate(args):
    from lmlab.inference.chat import answer
    from lmlab.inference.generate import beam_search, stream
    from lmlab.models.hub import load_pretrained

    params = _sampling(args)
    pretrained = load_pretrained(args.model)
    if args.chat:
        deltas = answer(pretrained, [{"role": "user", "content": args.prompt}], params)
    elif args.num_beams > 1:
        ids = pretrained.tokenizer.encode(args.prompt).ids
        best, score = beam_search(pretrained.model, ids, args.num_beams, args.max_new_tokens,
                                  eos_ids=pretrained.eos_ids)[0]
        deltas = [args.prompt, pretrained.tokenizer.decode(best)]
    else:
        sys.stdout.write(args.prompt)
        deltas = stream(pretrained.model, pretrained.tokenizer, args.prompt, params, eos_ids=pretrained.eos_ids)
    for delta in deltas:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args):
    from lmlab.inference.chat import chat_loop
    from lmlab.models.hub import load_pretrained

    chat_loop(load_pretrained(args.model), _sampling(args), system=args.system)


def cmd_models(args):
    from lmlab.models.hub import list_models

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'name':24} {'architecture':14} {'format':12} {'size':>9}  downloaded")
    for r in rows:
        print(f"{r['name']:24} {r['architecture']:14} {r['format']:12} {r['size']:>9}  "
              f"{r['path'] if r['downloaded'] else 'no (lmlab pull ' + r['name'] + ')'}")


def cmd_pull(args):
    from lmlab.models.hub import pull

    print(pull(args.name, force=args.force))


def _add_sampling_args(s, max_new_tokens=256, temperature=0.7):
    s.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    s.add_argument("--temperature", type=float, default=temperature, help="0 means greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    s.add_argument("--seed", type=int, default=None)


def cmd_eval(args):
    from lmlab.evaluate import run_eval

    run_eval(args.model, args.tasks, shots=args.shots, limit=args.limit, seed=args.seed,
             batch_size=args.batch_size, mode=args.mode, chat=args.chat, calibrate=args.calibrate,
             balanced=args.balanced, data_dir=args.data_dir, out=args.out, stride=args.stride,
             max_length=args.max_length, progress=not args.no_progress,
             command=" ".join(["lmlab", *map(shlex.quote, sys.argv[1:])]))


def add_eval_parser(sub):
    s = sub.add_parser("eval", help="evaluate a model: perplexity, zero/few-shot multiple choice, GLUE-style "
                                    "classification")
    s.add_argument("--model", required=True, help="registry name (lmlab models), a .gguf file, a Hugging Face "
                                                  "folder, an lmlab run folder, or a hub id org/name")
    s.add_argument("--tasks", required=True, help="comma-separated task names, e.g. sst2,piqa,lambada,wikitext "
                                                  "(an unknown name lists the known ones)")
    s.add_argument("--shots", default="0", help="comma-separated numbers of in-context examples, e.g. 0,1,4,8")
    s.add_argument("--limit", type=int, default=None,
                   help="only the first N examples of each task (of each MMLU subject / benchmark source)")
    s.add_argument("--seed", type=int, default=1234, help="seed of the few-shot draw")
    s.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    s.add_argument("--mode", default="loglikelihood", choices=["loglikelihood", "generate", "both"],
                   help="how choice tasks are scored: log-likelihood of each answer, generation + answer "
                        "extraction, or both side by side")
    s.add_argument("--chat", action="store_true", help="generation prompts go through the model's chat template")
    s.add_argument("--calibrate", action="store_true",
                   help="also report contextual calibration (Zhao et al. 2021) next to the raw numbers")
    s.add_argument("--balanced", action="store_true", help="few-shot examples balanced across the labels")
    s.add_argument("--data-dir", default=None, help="folder with the evaluation data (default: $LMLAB_DATA, else "
                                                    "$LMLAB_HOME/data)")
    s.add_argument("--out", default=None, help="write OUT.json (summary with the exact prompts), OUT.jsonl (every "
                                               "example) and OUT.png (score vs shots)")
    s.add_argument("--stride", type=int, default=None,
                   help="perplexity tasks: new tokens per rolling window (default: the window, i.e. disjoint "
                        "windows as in lm-evaluation-harness)")
    s.add_argument("--max-length", type=int, default=None, help="window in tokens (default: the model's context)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_eval)


def cmd_finetune(args):
    from lmlab.training.classification import FinetuneSettings, finetune
    from lmlab.util import settings_from

    finetune(settings_from(FinetuneSettings, args), command=" ".join(["lmlab", *map(shlex.quote, sys.argv[1:])]))


def cmd_serve(args):
    from lmlab.inference.server import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.max_batch,
          max_queue=args.max_queue, context=args.context, batch_invariant=args.batch_invariant, device=args.device)


def cmd_sft(args):
    from lmlab.training.sft import SftSettings, run_sft
    from lmlab.util import settings_from

    run_sft(settings_from(SftSettings, args), command=" ".join(["lmlab", *map(shlex.quote, sys.argv[1:])]))


def cmd_dpo(args):
    from lmlab.training.sft import DpoSettings, run_dpo
    from lmlab.util import settings_from

    run_dpo(settings_from(DpoSettings, args), command=" ".join(["lmlab", *map(shlex.quote, sys.argv[1:])]))


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


def cmd_paradigms(args):
    from lmlab.experiments.paradigms import run_glue, run_paradigms

    common = dict(work=args.work, seed=args.seed, data_dir=args.data_dir, threads=args.threads,
                  keep_weights=args.keep_weights, progress=not args.no_progress,
                  command=" ".join(["lmlab", *map(shlex.quote, sys.argv[1:])]))
    if args.glue:
        run_glue(args.glue, out=args.out or "docs/results/glue-minilm", epochs=args.epochs, **common)
    else:
        run_paradigms(args.task, args.labels, args.shots, out=args.out or "docs/results/paradigms",
                      baselines=args.baselines, methods=args.methods, prompt_limit=args.prompt_limit,
                      collect=args.collect, **common)


def cmd_demo(args):
    from lmlab.experiments.demo import demo

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

    s = sub.add_parser("export", help="export a model (a trained run, a .gguf, a registry name) to another format")
    s.add_argument("--run", "--model", dest="run", required=True,
                   help="run folder, checkpoint folder, registry name, .gguf file or Hugging Face folder")
    s.add_argument("--format", default="hf", help="hf: a Hugging Face folder (config.json, model.safetensors, "
                                                   "tokenizer.json) that transformers loads (GPT-2 or Llama)")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("generate", help="continue a prompt with a pretrained model (streams the text)")
    s.add_argument("--model", required=True, help="registry name (lmlab models), a .gguf file, a Hugging Face "
                                                  "folder, an lmlab run folder, or a hub id org/name")
    s.add_argument("--prompt", required=True)
    s.add_argument("--chat", action="store_true", help="send the prompt as a user turn through the chat template")
    s.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (no sampling)")
    _add_sampling_args(s)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", help="talk with a chat model (streaming; /reset, /exit)")
    s.add_argument("--model", required=True)
    s.add_argument("--system", default=None, help="a system message opening the conversation")
    _add_sampling_args(s)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("models", help="list registered models and what is downloaded")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("pull", help="download a registered model into $LMLAB_HOME/models")
    s.add_argument("name")
    s.add_argument("--force", action="store_true", help="download again even if present")
    s.set_defaults(func=cmd_pull)

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

    s = sub.add_parser("serve", help="serve a model over the OpenAI HTTP API (continuous batching) with a chat page")
    s.add_argument("--model", required=True, help="registry name, .gguf file, Hugging Face folder or lmlab run")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together in one forward pass")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a row; beyond: 429")
    s.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default: the model's, at most 2048)")
    s.add_argument("--batch-invariant", action="store_true",
                   help="decode at the full --max-batch shape every step, so that a request's tokens do not "
                        "depend on what else runs (slower for a lone request)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    s.set_defaults(func=cmd_serve)

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

    s = sub.add_parser("paradigms", help="three eras on one task: from scratch, fine-tuned, prompted (table, "
                                         "learning curves); or --glue: a fine-tuned MiniLM on GLUE")
    s.add_argument("--task", default="sst2")
    s.add_argument("--labels", default="32,128,1024,all", help="labelled training examples per run")
    s.add_argument("--shots", default="0,4,32", help="solved examples in the prompted LLM's prompt ('' for none)")
    s.add_argument("--baselines", default="bilstm,cnn", help="from-scratch models ('' for none)")
    s.add_argument("--methods", default="full,lora", help="fine-tuning methods of the encoder ('' for none)")
    s.add_argument("--prompt-limit", type=int, default=None, help="prompt on the first N dev examples only")
    s.add_argument("--glue", nargs="?", const="sst2,rte,mrpc,cola,stsb", default=None,
                   help="instead: fine-tune MiniLM on these GLUE tasks with all labels and write the GLUE table")
    s.add_argument("--epochs", type=float, default=None, help="with --glue: epochs for the tasks under 10,000 "
                                                              "examples (default: the fixed budgets)")
    s.add_argument("--collect", action="store_true", help="train nothing: tabulate the finished runs")
    s.add_argument("--out", default=None, help="results folder (default docs/results/paradigms, or "
                                               "docs/results/glue-minilm with --glue)")
    s.add_argument("--work", default="runs/paradigms", help="run folders (a finished run is not run again)")
    s.add_argument("--keep-weights", action="store_true", help="keep each run's checkpoints")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data-dir", default=None)
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_paradigms)

    add_eval_parser(sub)

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
