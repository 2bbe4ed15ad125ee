"""RAG answer quality over lmlab's own results pages: retrieval recall, answers, citations (issue 27, finding 21).

The documents are the committed docs/results/*/README.md files (docs/results/rag/ left out: it holds this bench's
own results, questions included), indexed by `lmlab rag index` with its defaults (minilm-l6, chunks of 200
tokens, overlap 40). The questions are bench/rag_quality.jsonl: each has a short expected answer, the file that
holds it and the evidence (a verbatim passage of that file holding the answer; whitespace is normalised).

Measured:
  retrieval   recall@1 and recall@k of dense, BM25 and hybrid (reciprocal rank fusion) retrieval: a question is
              found when a retrieved chunk of its file contains its evidence
  answers     (unless --no-answers) the chat model's greedy answer with the chosen retrieval, scored by
              contained match (the answer or an alias, as a whole number/word, in the reply; digit-group commas
              ignored) and exact match (the reply, citations and final punctuation stripped, is the answer);
              citations: whether the model cited a given source itself, how many of its citations named a source
              that was not given, and citation accuracy (a source cited after the check holds the evidence);
              stopping and looping: replies that ran to --max-new-tokens, replies repeating a 4-word sequence 3+
              times.

    python bench/rag_quality.py --threads 1 [--retrieval hybrid] [--no-guard] [--no-cite] [--every N] [--limit N]

Prints a table on stderr and one JSON object on stdout. Not part of `make test` (minutes of generation).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from lmlab.apps.rag import DEFAULT_LLM, GROUNDED, Rag, rag_index
from lmlab.inference.generate import SamplingParams
from lmlab.inference.retrieval import CITATION, Index

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "bench" / "rag_quality.jsonl"


def normalise(text: str) -> str:
    return " ".join(re.sub(r"(?<=\d),(?=\d{3})", "", text).split()).lower()


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def contained(reply: str, answers: list[str]) -> bool:
    """An expected answer appears in the reply as a whole token (0.1 is not found in 0.15, 8 not in 86)."""
    text = normalise(reply)
    return any(re.search(rf"(?<![\w.]){re.escape(normalise(a))}(?![\w]|\.\d)", text) for a in answers)


def exact(reply: str, answers: list[str]) -> bool:
    text = normalise(CITATION.sub("", reply)).strip(" .\"'")
    return any(text == normalise(a) for a in answers)


def holds(chunk: dict, question: dict) -> bool:
    """A retrieved chunk (a source dict) is the question's evidence: from its file, holding the passage."""
    return chunk["source"].endswith(question["file"]) and normalise(question["evidence"]) in normalise(chunk["text"])


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    words = text.split()
    return any(c >= times for c in Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1)).values())


def corpus(folder: Path) -> Path:
    """The results pages, copied under their repository paths (the index names each chunk's source by it)."""
    shutil.rmtree(folder, ignore_errors=True)
    for readme in sorted((ROOT / "docs" / "results").glob("*/README.md")):
        if readme.parent.name != "rag":
            target = folder / readme.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(readme, target)
    return folder


def source_dict(hit) -> dict:
    return {"source": hit.chunk.source, "text": hit.chunk.text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/rag-quality", help="where the corpus copy and the index are written")
    ap.add_argument("--k", type=int, default=4, help="chunks retrieved per question")
    ap.add_argument("--retrieval", default="hybrid", choices=("hybrid", "dense", "bm25"), help="for the answers")
    ap.add_argument("--repetition-penalty", type=float, default=GROUNDED.repetition_penalty)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--no-cite", action="store_true", help="answers without the citation check")
    ap.add_argument("--no-guard", action="store_true", help="answers without the repeated-sentence stop")
    ap.add_argument("--no-answers", action="store_true", help="retrieval only (no chat model)")
    ap.add_argument("--every", type=int, default=1, help="answer every Nth question only (retrieval: all of them)")
    ap.add_argument("--limit", type=int, default=0, help="the first N questions (0: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--llm", default=DEFAULT_LLM)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    questions = load_questions()[:args.limit or None]
    work = Path(args.work)
    start = time.perf_counter()
    built = rag_index(str(corpus(work / "docs")), str(work / "index"), progress=False)
    index_s = time.perf_counter() - start

    index = Index.load(work / "index")
    embedder = index.load_embedder()
    retrieval = {}
    for method in ("dense", "bm25", "hybrid"):
        found_1 = found_k = 0
        for q in questions:
            hits = index.retrieve(embedder, q["question"], args.k, method)
            found = [holds(source_dict(h), q) for h in hits]
            found_1 += bool(found[:1] and found[0])
            found_k += any(found)
        retrieval[method] = {"recall@1": round(100 * found_1 / len(questions), 1),
                             f"recall@{args.k}": round(100 * found_k / len(questions), 1)}
    report = {"questions": len(questions), "chunks": built["chunks"], "documents": built["documents"],
              "k": args.k, "index_s": round(index_s, 1), "retrieval": retrieval}

    if not args.no_answers:
        rag = Rag.load(work / "index", args.llm, args.k, embedder=embedder, retrieval=args.retrieval,
                       cite=not args.no_cite, guard=not args.no_guard)
        sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                                  repetition_penalty=args.repetition_penalty, stop=GROUNDED.stop)
        rows = []
        gen_start = time.perf_counter()
        asked = questions[::args.every]
        for i, q in enumerate(asked):
            reply = rag.ask(q["question"], sampling)
            text = "".join(reply.deltas)
            check = reply.check
            answers = [q["answer"], *q.get("aliases", ())]
            tokens = len(rag.llm.tokenizer.encode(check.raw if check else text, add_special_tokens=False).ids)
            evidence = [s["n"] for s in reply.sources if holds(s, q)]
            rows.append({"question": q["question"], "answer": q["answer"], "reply": text,
                         "model_text": check.raw if check else text,
                         "contained": contained(text, answers), "exact": exact(text, answers),
                         "retrieved": bool(evidence), "evidence_sources": evidence,
                         "model_cited": check.model_cited if check else bool(CITATION.search(text)),
                         "invalid_citations": len(check.dropped) if check else None,
                         "cited": check.cited if check else None, "added": check.added if check else None,
                         "citation_correct": bool(check and set(check.cited) & set(evidence)),
                         "ran_to_limit": tokens >= args.max_new_tokens, "loops": loops(text)})
            print(f"[{i + 1}/{len(asked)}] {'+' if rows[-1]['contained'] else '-'} {q['question'][:60]!r} -> "
                  f"{text[:90]!r}", file=sys.stderr)
        n = len(rows)

        def pct(key):
            return round(100 * sum(bool(r[key]) for r in rows) / n, 1)

        report["answers"] = {
            "llm": args.llm, "retrieval": args.retrieval, "repetition_penalty": args.repetition_penalty,
            "max_new_tokens": args.max_new_tokens, "cite_check": not args.no_cite, "guard": not args.no_guard,
            "questions": n,
            "contained_%": pct("contained"), "exact_%": pct("exact"),
            "contained_when_retrieved_%": round(100 * sum(r["contained"] for r in rows if r["retrieved"])
                                                / max(1, sum(r["retrieved"] for r in rows)), 1),
            "model_cited_%": pct("model_cited"),
            "invalid_citations": sum(r["invalid_citations"] or 0 for r in rows),
            "citation_added_%": round(100 * sum(r["added"] is not None for r in rows) / n, 1),
            "citation_accuracy_%": pct("citation_correct"),
            "ran_to_limit_%": pct("ran_to_limit"), "loops_%": pct("loops"),
            "seconds_per_question": round((time.perf_counter() - gen_start) / n, 2)}
        report["rows"] = rows
    report["command"] = "python bench/rag_quality.py " + " ".join(sys.argv[1:])
    print(table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))


def table(report: dict) -> str:
    k = report["k"]
    lines = [f"{report['questions']} questions, {report['chunks']} chunks of {report['documents']} pages, k = {k}",
             "", f"| retrieval | recall@1 % | recall@{k} % |", "|---|---:|---:|"]
    lines += [f"| {m} | {v['recall@1']} | {v[f'recall@{k}']} |" for m, v in report["retrieval"].items()]
    if "answers" in report:
        a = report["answers"]
        lines += ["", " | ".join(f"{key} {value}" for key, value in a.items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
