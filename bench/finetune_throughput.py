"""Fine-tuning throughput: lmlab's classifier vs transformers' BertForSequenceClassification, MiniLM on SST-2.

Both start from the same all-MiniLM-L6-v2 weights and train on the same SST-2 batch (the first training sentences,
padded or cut to the same length, with the same attention mask), dropout 0.1 on both, fused AdamW over the
trainable parameters, fp32 on the CPU. One training step = forward, cross-entropy, backward, optimizer step.
    lmlab         lmlab.training.classification.SequenceClassifier ([CLS] pooler head) + Classification.loss + make_optimizer
    transformers  BertForSequenceClassification in a plain PyTorch loop (SDPA attention, the default)
    LoRA          r=8, alpha=16, dropout 0.05 on the attention and MLP linear layers, head trained: lmlab.models.peft on
                  lmlab's side; Hugging Face `peft` (when installed) on transformers' side. lmlab's q/k/v
                  projection is one fused matrix, so its LoRA has one A for the three (a little fewer parameters).
Steps of the contenders alternate, so a change in the machine's load hits them alike; the median step counts.

    python bench/finetune_throughput.py [--threads 2] [--batch-size 32] [--seq-len 64] [--steps 10]

Prints one JSON object: training examples/s of each, and lmlab's speedup.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_throughput import median_step_times  # noqa: E402 - bench/ is on sys.path when run as a script

from lmlab.evaluate.tasks import data_root  # noqa: E402
from lmlab.models.hub import load_pretrained, resolve  # noqa: E402
from lmlab.models.peft import add_lora  # noqa: E402
from lmlab.models.transformer import Transformer  # noqa: E402
from lmlab.training.classification import Classification, Encoded, SequenceClassifier  # noqa: E402
from lmlab.training.config import TrainConfig  # noqa: E402
from lmlab.training.schedule import make_optimizer  # noqa: E402

LORA = dict(r=8, alpha=16, dropout=0.05)


def sst2_sentences(data_dir: str | None, n: int) -> list[str]:
    path = data_root(data_dir) / "sst2" / "train.tsv"
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()[1:]
        return [line.split("\t")[0] for line in lines[:n]]
    # Without the data: sentences of SST-2's typical length (about 10 words in train, 20 in dev).
    words = "the film is a charming and often affecting journey but its plot never quite works".split()
    return [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 16)) for i in range(n)]


def make_batch(tokenizer, sentences: list[str], seq_len: int) -> dict[str, torch.Tensor]:
    tok = type(tokenizer).from_str(tokenizer.to_str())
    tok.enable_truncation(seq_len)
    tok.enable_padding(length=seq_len, pad_id=tok.token_to_id("[PAD]") or 0)
    enc = tok.encode_batch(sentences)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc]).bool()
    return {"ids": ids, "type_ids": torch.tensor([e.type_ids for e in enc]), "mask": mask,
            "lengths": mask.sum(1), "labels": torch.arange(len(sentences)) % 2}


def lmlab_step(folder: Path, batch: dict, lora: bool):
    body = load_pretrained(folder).model
    body = Transformer.from_weights(replace(body.config, dropout=0.1), body.weights())
    model = SequenceClassifier(body, 2, "cls", dropout=0.1)
    if lora:
        add_lora(model, targets=("qkv", "proj", "fc"), **LORA)
        model.score.requires_grad_(True)
    empty = Encoded([], [], torch.zeros(0, dtype=torch.long), 0)
    objective = Classification(model, empty, empty, ("acc",), regression=False)
    opt = make_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.01, beta2=0.999), torch.device("cpu"))
    model.train()

    def step():
        objective.loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def transformers_step(folder: Path, batch: dict, lora: bool):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folder, num_labels=2)
    if lora:
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=LORA["r"], lora_alpha=LORA["alpha"],
                            lora_dropout=LORA["dropout"], target_modules=r".*encoder.*\.(query|key|value|dense)$")
        model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.999), fused=True)
    model.train()
    inputs = dict(input_ids=batch["ids"], token_type_ids=batch["type_ids"], attention_mask=batch["mask"].long(),
                  labels=batch["labels"])

    def step():
        model(**inputs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, model


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6", help="registry name or a Hugging Face BERT folder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", default="full,lora")
    ap.add_argument("--data-dir", default=None, help="folder with sst2/train.tsv (default: $LMLAB_DATA, else "
                                                     "$LMLAB_HOME/data; synthetic sentences without it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers

    folder = resolve(args.model)
    tokenizer = load_pretrained(folder).tokenizer
    batch = make_batch(tokenizer, sst2_sentences(args.data_dir, args.batch_size), args.seq_len)
    results = {}
    for method in args.methods.split(","):
        lora = method == "lora"
        if lora and importlib.util.find_spec("peft") is None:
            results[method] = {"skipped": "Hugging Face peft is not installed (pip install peft)"}
            continue
        torch.manual_seed(0)
        ours, our_model = lmlab_step(folder, batch, lora)
        theirs, their_model = transformers_step(folder, batch, lora)
        med = median_step_times({"lmlab": ours, "transformers": theirs}, args.steps, args.warmup)
        results[method] = {
            "lmlab_examples_per_s": round(args.batch_size / med["lmlab"], 1),
            "transformers_examples_per_s": round(args.batch_size / med["transformers"], 1),
            "speedup": round(med["transformers"] / med["lmlab"], 3),
            "lmlab_trainable_parameters": trainable(our_model),
            "transformers_trainable_parameters": trainable(their_model),
        }
    print(json.dumps({
        "benchmark": "fine-tuning step (forward, backward, AdamW), MiniLM on SST-2, fp32 CPU",
        "model": str(args.model), "batch_size": args.batch_size, "seq_len": args.seq_len,
        "real_tokens_per_batch": int(batch["mask"].sum()), "threads": args.threads, "steps": args.steps,
        "results": results, "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
