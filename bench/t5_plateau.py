"""The fine-tuning plateau of docs/results/t5-10m: a random-init T5 fine-tuned text to text at several AdamW
learning rates, the same initialisation and batches, and what its cross-attention became.

For each --lrs value: --steps of `TextToText` on SST-2's training split (the last 256 shuffled rows held out: the
criterion is never the dev set), then on the held-out rows the accuracy of the first answer token (argmax over the
two labels' first tokens), the first decoder position's cross-attention in every decoder layer (entropy in nats,
mean top probability, std of the scores), and how far the query matrices moved: ||W - W0|| / ||W0||. --task colour
is the control: "colour sentence: <10-40 corpus words with 'red' or 'blue' among them>" -> the colour word, a copy
through cross-attention.

    python bench/t5_plateau.py --model runs/t5-10m/check1 --lrs 1e-3,3e-4 --steps 250 --threads 1
    python bench/t5_plateau.py --model runs/t5-10m/check1 --task colour --lrs 1e-3 --steps 200

--model is a run of the T5 config (its tokenizer and architecture; the weights are drawn anew, seed 0). Prints one
JSON object; a run takes ~90 s per learning rate at the 10M shape on one free core (250 steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile

import torch
import torch.nn.functional as F

from lmlab.evaluate.tasks import data_root, get_task, load_split
from lmlab.models.hub import load_pretrained
from lmlab.training.config import TrainConfig
from lmlab.training.loop import fit
from lmlab.training.text_to_text import TextToText, pad_pairs, render_pairs

HELD_OUT = 256


def sst2_pairs(tok, eos):
    docs = list(load_split(get_task("t5_sst2"), data_root(None)).pool)
    random.Random(0).shuffle(docs)
    return render_pairs(tok, "sst2", docs, eos, 128, 128)


def colour_pairs(tok, eos, corpus: str, n: int = 5000 + HELD_OUT):
    rng, words = random.Random(0), open(corpus, encoding="utf-8").read().split()[:200000]
    pairs = []
    for _ in range(n):
        sentence, colour = rng.sample(words, rng.randint(10, 40)), rng.choice(["red", "blue"])
        sentence.insert(rng.randint(0, len(sentence)), colour)
        source = tok.encode("colour sentence: " + " ".join(sentence), add_special_tokens=False).ids[:127] + [eos]
        pairs.append((source, tok.encode(colour, add_special_tokens=False).ids + [eos]))
    return pairs


class CrossAttentionSpy:
    """Records the first decoder position's cross-attention of every decoder layer (the calls of SDPA whose queries
    and keys differ in length and whose mask is the encoder's boolean padding mask)."""

    def __init__(self):
        self.rows, self.sdpa = [], F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, scale=None, **kw):
        if q.shape[2] != k.shape[2] and attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = (q[:, :, :1].float() @ k.transpose(-1, -2).float()) * scale
            p = scores.masked_fill(~attn_mask, float("-inf")).softmax(-1)
            entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
            self.rows.append({"entropy": entropy.mean().item(), "top_p": p.amax(-1).mean().item(),
                              "score_std": scores.masked_select(attn_mask.expand_as(scores)).std().item()})
        return self.sdpa(q, k, v, attn_mask=attn_mask, scale=scale, **kw)


def inspect(model, init: dict, held) -> dict:
    batch, spy = pad_pairs(held), CrossAttentionSpy()
    firsts = sorted({t[0] for _, t in held})
    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            logits, _ = model.eval()(batch["inputs"], batch["targets"], input_mask=batch["input_mask"])
    finally:
        F.scaled_dot_product_attention = spy.sdpa
    pred = torch.tensor(firsts)[logits[:, 0, firsts].argmax(-1)]
    rows = model.config.n_head * model.config.head_dim
    moved = {name: ((p[:rows] - init[name][:rows]).norm() / init[name][:rows].norm()).item()
             for name, p in model.named_parameters() if name.endswith(("attn.qkv.weight", "cross.q.weight"))}
    return {"held_out_accuracy": (pred == batch["targets"][:, 0]).float().mean().item(),
            "majority": max((batch["targets"][:, 0] == f).float().mean().item() for f in firsts),
            "uniform_entropy": batch["input_mask"].sum(1).float().log().mean().item(),
            "cross_attention_first_position": spy.rows, "query_moved": moved}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a run of the T5 config (tokenizer and architecture)")
    ap.add_argument("--task", default="sst2", choices=["sst2", "colour"])
    ap.add_argument("--corpus", default="runs/t5-10m/corpus.txt", help="words for the colour task")
    ap.add_argument("--lrs", default="1e-3,3e-4", help="comma-separated peak learning rates")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pre = load_pretrained(args.model)
    pairs = (sst2_pairs if args.task == "sst2" else lambda t, e: colour_pairs(t, e, args.corpus))(
        pre.tokenizer, pre.eos_token_id)
    train, held = pairs[:-HELD_OUT], pairs[-HELD_OUT:]
    results = {"task": args.task, "steps": args.steps, "dtype": args.dtype, "train_rows": len(train),
               "load_before": os.getloadavg()[0], "runs": {}}
    for lr in [float(x) for x in args.lrs.split(",")]:
        torch.manual_seed(0)
        model = type(pre.model)(pre.model.config).train()
        init = {k: v.detach().clone() for k, v in model.named_parameters()}
        t = TrainConfig(run_dir=tempfile.mkdtemp(), batch_size=32, micro_batch_size=32, max_steps=args.steps, lr=lr,
                        min_lr=lr / 10, warmup_steps=max(1, args.steps // 20), weight_decay=0.0,
                        eval_interval=args.steps, ckpt_interval=10**9, log_interval=max(1, args.steps // 10),
                        seed=0, device="cpu", dtype=args.dtype, threads=args.threads)
        with contextlib.redirect_stdout(sys.stderr):  # the loop's setup line: stdout is the JSON alone
            summary = fit(TextToText(model, {args.task: train}, {args.task: held}, None, 0), t, t.run_dir,
                          progress=False)
        results["runs"][str(lr)] = {"train_loss": summary["train_loss"], "held_out_loss": summary["val_loss"],
                                    "elapsed_s": summary["elapsed_s"], **inspect(model, init, held)}
    results["load_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
