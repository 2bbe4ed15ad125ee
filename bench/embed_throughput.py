"""Embedding speed: lmlab's Embedder vs sentence-transformers' SentenceTransformer.encode, same weights, one run.

Both load the same local all-MiniLM-L6-v2 folder (lmlab pull minilm-l6). The inputs are real sentences: STS-B
dev's sentence pairs and QNLI dev's questions and answers (short and long ones mixed) from ../shared/data, or,
where that is absent, generated sentences of varied length. Each round times one full pass of each side, back to back
(so a busy shared machine slows both alike); the speedup is the median of the rounds' ratios, the rates the
median rounds'. In fp32 and in bf16
(where torch reports the CPU's bf16 support), with the smallest cosine between the two sides' vectors.

    python bench/embed_throughput.py [--sentences 2000] [--rounds 3] [--threads 2]

Prints one JSON object; the goal is lmlab/sentence-transformers >= 1.5 in fp32 with identical vectors.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from lmlab.inference.embed import Embedder, EmbedSettings
from lmlab.models.hub import pull

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


def sentences(n: int, seed: int = 0) -> tuple[list[str], str]:
    rows = []
    for name, columns in (("STS-B/dev.tsv", ("sentence1", "sentence2")), ("QNLI/dev.tsv", ("question", "sentence"))):
        path = GLUE / name
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                    rows.extend(row[c] for c in columns)
    rng = random.Random(seed)
    if rows:
        return rng.sample(rows, min(n, len(rows))), "STS-B + QNLI dev sentences"
    words = "the a model reads every sentence of a long text and writes one vector for each of them".split()
    return [" ".join(rng.choices(words, k=rng.randint(3, 60))) for _ in range(n)], "generated sentences"


def compare(texts: list[str], folder: Path, dtype: torch.dtype, rounds: int, batch_tokens: int) -> dict:
    st = SentenceTransformer(str(folder), device="cpu").to(dtype)
    ours = Embedder.load(folder, EmbedSettings(dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                                                batch_tokens=batch_tokens))
    times = {"lmlab": [], "sentence_transformers": []}
    vectors = {}
    runs = {"lmlab": lambda: ours.embed(texts),
            "sentence_transformers": lambda: torch.from_numpy(st.encode(texts, batch_size=32)).float()}
    runs["lmlab"](), runs["sentence_transformers"]()  # warm up
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            vectors[name] = run()
            times[name].append(time.perf_counter() - start)
    rates = {name: len(texts) / statistics.median(t) for name, t in times.items()}
    # Each round's two passes ran back to back, under the same load: their ratio is the robust figure.
    ratios = [s / o for o, s in zip(times["lmlab"], times["sentence_transformers"])]
    cosine = (vectors["lmlab"] * vectors["sentence_transformers"]).sum(-1)
    return {"lmlab_sentences_per_s": round(rates["lmlab"], 1),
            "sentence_transformers_sentences_per_s": round(rates["sentence_transformers"], 1),
            "speedup": round(statistics.median(ratios), 3), "speedup_per_round": [round(r, 3) for r in ratios],
            "min_cosine": float(cosine.min()), "max_abs_diff": float((vectors["lmlab"] -
                                                                      vectors["sentence_transformers"]).abs().max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--sentences", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = pull(args.model)
    texts, source = sentences(args.sentences)
    result = {"model": args.model, "sentences": len(texts), "source": source, "threads": args.threads,
              "rounds": args.rounds, "batch_tokens": args.batch_tokens, "sentence_transformers_batch_size": 32,
              "fp32": compare(texts, folder, torch.float32, args.rounds, args.batch_tokens)}
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX") or torch.cuda.is_available():
        result["bf16"] = compare(texts, folder, torch.bfloat16, args.rounds, args.batch_tokens)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
