"""Training words/s of the ELMo biLM by batch size, precision, LSTM cell and softmax, timed in alternation in one
process (each variant trains for --seconds in turn, --rounds times; the first round is warm-up, not counted).

    taskset -c 1 python bench/elmo_train_speed.py --corpus ../shared/data/wikitext-2/valid.txt --threads 1

The variants are the default `--size cpu` biLM with one change each (ElmoConfig.cell, .softmax_cutoff, the batch
rows, bf16 autocast or float32), real windows of 32 words of the corpus, Adam steps. Prints JSON: words/s per
variant and its ratio to the first (the old default: 32 rows, full softmax, LSTMP, bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

import torch

from lmlab.models.elmo import BiLM, ElmoConfig, word_chars
from lmlab.training.elmo import SIZES, UNK, read_stream

VARIANTS = [  # (rows, bf16, cell, softmax_cutoff)
    (32, True, "lstmp", 0), (256, True, "lstmp", 0), (256, False, "lstmp", 2000), (128, True, "lstmp", 2000),
    (256, True, "lstmp", 2000), (256, True, "lstm", 2000),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="../shared/data/wikitext-2/valid.txt", help="a text file to draw windows from")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per variant per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (the first is warm-up)")
    p.add_argument("--window", type=int, default=32, help="words per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    stream = read_stream((a.corpus,), "text", 0.05)
    base = SIZES["cpu"]
    table = word_chars(stream.words, base.max_chars)
    generator = torch.Generator().manual_seed(0)
    runs = []
    for rows, bf16, cell, cutoff in VARIANTS:
        torch.manual_seed(0)
        config = ElmoConfig(**{**asdict(base), "cell": cell, "softmax_cutoff": cutoff})
        model = BiLM(config).train()
        runs.append({"rows": rows, "bf16": bf16, "cell": cell, "softmax_cutoff": cutoff, "model": model,
                     "optimizer": torch.optim.Adam(model.parameters(), 2e-3), "words": 0, "seconds": 0.0})
    for round_ in range(a.rounds):
        for r in runs:
            started, words = time.perf_counter(), 0
            while time.perf_counter() - started < a.seconds:
                starts = torch.randint(len(stream.train) - a.window, (r["rows"],), generator=generator)
                ids = stream.train[starts[:, None] + torch.arange(a.window)]
                uniq, inverse = ids.unique(return_inverse=True)
                targets = torch.where(ids < base.vocab_size, ids, UNK)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=r["bf16"]):
                    forward_loss, backward_loss = r["model"](table[uniq], inverse, targets)
                ((forward_loss + backward_loss) / 2).backward()
                r["optimizer"].step()
                r["optimizer"].zero_grad()
                words += ids.numel()
            if round_ > 0:
                r["words"] += words
                r["seconds"] += time.perf_counter() - started
    first = runs[0]["words"] / runs[0]["seconds"]
    out = [{k: r[k] for k in ("rows", "bf16", "cell", "softmax_cutoff")} |
           {"words_per_s": round(r["words"] / r["seconds"]), "ratio": round(r["words"] / r["seconds"] / first, 2),
            "parameters": sum(q.numel() for q in r["model"].parameters())} for r in runs]
    print(json.dumps({"threads": a.threads, "seconds_per_variant": a.seconds, "rounds_counted": a.rounds - 1,
                      "variants": out}, indent=1))


if __name__ == "__main__":
    main()
