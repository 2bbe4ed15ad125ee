"""Scoring speed: lmlab's batched log-likelihoods vs a straightforward transformers loop, PIQA with SmolLM2.

Loads SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32) with lmlab, writes the same weights as a Hugging Face
Llama folder and loads that into transformers. Both score the first --limit evaluated PIQA validation questions
in lm-evaluation-harness's format (context "Question: {goal}\\nAnswer:", continuations " {solution}"), after
--shots solved examples from PIQA's few-shot pool (as `lmlab eval --shots K` draws them):

  lmlab         LM.loglikelihood: questions sorted by length, several per forward pass; their contexts prefilled
                into a KV cache (the few-shot examples, the same for all, once), the two solutions scored together
                on top of it
  transformers  one forward pass per (context, solution) pair, batch 1, tokenized by transformers' tokenizer with
                the harness's rules
Both take the log-softmax of the float32 logits in float64.

The two are timed in alternation, --slice questions at a time, so that other load on the machine slows both
alike. Prints one JSON object: examples (questions) per second of each, the speed-up, acc and acc_norm of each, whether
every prediction is identical, and the largest difference of a log-likelihood.

    python bench/eval_throughput.py [--limit 100] [--shots 0] [--threads 2] [--batch-size 16] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def harness_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's _encode_pair, with a transformers tokenizer."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def transformers_loop(model, tok, requests) -> list[float]:
    out = []
    for context, continuation in requests:
        ctx, cont = harness_pair(tok, context, continuation)
        logits = model(torch.tensor([ctx + cont[:-1]])).logits[0, -len(cont):].double()  # as lmlab.evaluate
        out.append(logits.log_softmax(-1)[torch.arange(len(cont)), torch.tensor(cont)].sum().item())
    return out


def predictions(logliks: list[float], docs) -> tuple[list[int], list[int]]:
    """(acc, acc_norm) predictions: argmax of the sum, and of the sum per character of the solution."""
    acc, norm = [], []
    for i, d in enumerate(docs):
        ll = np.array(logliks[2 * i:2 * i + 2])
        acc.append(int(ll.argmax()))
        norm.append(int((ll / np.array([len(c) for c in d.choices])).argmax()))
    return acc, norm


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--limit", type=int, default=100, help="PIQA questions (2 solutions each)")
    ap.add_argument("--shots", type=int, default=0, help="solved examples before each question")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--slice", type=int, default=50,
                    help="questions per timing slice; the two sides alternate slice by slice")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    from lmlab.evaluate import LM
    from lmlab.evaluate.tasks import get_task, load_split, pick_shots
    from lmlab.models.hf import export_hf_llama
    from lmlab.models.hub import load_pretrained

    task = get_task("piqa")
    split = load_split(task, Path(args.data_dir))
    docs = split.docs[:args.limit]
    prefix = task.prefix("", pick_shots(split.pool, args.shots, 1234, "piqa"))
    requests = [(prefix + context, continuation) for d in docs for context, continuation in task.requests(d)]
    golds = [int(d.gold) for d in docs]

    pre = load_pretrained(args.model)
    lm = LM.from_pretrained(pre, batch_size=args.batch_size, progress=False)
    with tempfile.TemporaryDirectory(prefix="lmlab-bench-") as tmp:
        export_hf_llama(pre.model, tmp, pre.tokenizer, bos_token=pre.bos_token, eos_token=pre.eos_token)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp)

    # Warm up both (first-call allocations, kernel selection), then time them in alternation, a slice of questions
    # at a time, so that other load on the machine slows both alike.
    lm.loglikelihood(requests[:4])
    transformers_loop(hf_model, hf_tok, requests[:4])
    ours, theirs, ours_s, theirs_s = [], [], 0.0, 0.0
    per_slice = 2 * args.slice  # two solutions per question
    for start in range(0, len(requests), per_slice):
        part = requests[start:start + per_slice]
        t0 = time.perf_counter()
        ours += [ll for ll, _ in lm.loglikelihood(part)]
        t1 = time.perf_counter()
        theirs += transformers_loop(hf_model, hf_tok, part)
        t2 = time.perf_counter()
        ours_s, theirs_s = ours_s + t1 - t0, theirs_s + t2 - t1

    ours_acc, ours_norm = predictions(ours, docs)
    theirs_acc, theirs_norm = predictions(theirs, docs)
    accuracy = lambda preds: float(np.mean(np.array(preds) == np.array(golds)))  # noqa: E731
    print(json.dumps({
        "model": args.model, "task": f"piqa ({args.shots}-shot, log-likelihood)", "examples": len(docs),
        "requests": len(requests), "threads": args.threads, "batch_size": args.batch_size, "slice": args.slice,
        "device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__,
        "lmlab_examples_per_s": round(len(docs) / ours_s, 2),
        "transformers_examples_per_s": round(len(docs) / theirs_s, 2),
        "speedup": round(theirs_s / ours_s, 2),
        "lmlab_acc": accuracy(ours_acc), "transformers_acc": accuracy(theirs_acc),
        "lmlab_acc_norm": accuracy(ours_norm), "transformers_acc_norm": accuracy(theirs_norm),
        "identical_predictions": ours_acc == theirs_acc and ours_norm == theirs_norm,
        "max_abs_loglik_diff": float(np.max(np.abs(np.array(ours) - np.array(theirs)))),
    }, indent=2))


if __name__ == "__main__":
    main()
