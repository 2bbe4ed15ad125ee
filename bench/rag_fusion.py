"""Choosing the hybrid retrieval's fusion on a set other than the one it is reported on: GLUE's QNLI dev.

QNLI dev as a retrieval set (lmlab.apps.rag_eval.qnli_retrieval_set: 3,911 sentences, 2,702 questions each
relevant to the sentence it was paired with as `entailment`). Each question's dense (minilm-l6) and BM25 (bm25s)
rankings are read 50 deep and fused by reciprocal rank, 1 / (K + rank), with BM25's ranking counted w times; the
recalls say which K and w to use. bench/rag_quality.py then reports the chosen fusion on lmlab's own pages.

    python bench/rag_fusion.py --glue ../shared/data/glue --threads 1

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmlab.apps.rag_eval import dense_rankings, qnli_retrieval_set
from lmlab.evaluate.metrics import retrieval_metrics
from lmlab.inference.embed import Embedder
from lmlab.inference.retrieval import bm25_rankings, reciprocal_rank_fusion


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glue", required=True, help="a GLUE folder holding QNLI/dev.tsv")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    corpus, queries, relevant = qnli_retrieval_set(Path(args.glue) / "QNLI" / "dev.tsv")
    dense = dense_rankings(Embedder.load(args.model), corpus, queries, 50)
    lexical = bm25_rankings(corpus, queries, 50)
    result = {"queries": len(queries), "corpus": len(corpus),
              "dense": retrieval_metrics(dense, relevant), "bm25": retrieval_metrics(lexical, relevant)}
    for k in (10, 60):
        for w in (1, 2, 3):
            fused = [[i for i, _ in reciprocal_rank_fusion([d] + [b] * w, k)] for d, b in zip(dense, lexical)]
            result[f"rrf K={k} w={w}"] = retrieval_metrics(fused, relevant)
    print(json.dumps({name: {m: round(100 * v, 1) for m, v in r.items()} if isinstance(r, dict) else r
                      for name, r in result.items()}, indent=2))


if __name__ == "__main__":
    main()
