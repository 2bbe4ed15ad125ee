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
              times. Each generation is scored twice, as the app shows it with the repetition guard off and on
              (lmlab.apps.rag.stop_repeats): greedy decoding makes the guarded text exactly the unguarded one
              cut at its first repeated sentence, so one generation serves both.

    python bench/rag_quality.py --threads 1 [--retrieval hybrid] [--every N] [--limit N] [--no-answers]
    python bench/rag_quality.py --from-json EARLIER.json ...     # score an earlier run's texts again

Prints a table on stderr and one JSON object on stdout. Not part of `make test` (minutes of generation).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from lmlab.apps.rag import DEFAULT_LLM, Rag, rag_index, stop_repeats
from lmlab.inference.generate import SamplingParams
from lmlab.inference.retrieval import CITATION, CitationCheck, Index

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ROOT / "bench" / "rag_quality.jsonl"


def normalise(text: str) -> str:
    return " ".join(re.sub(r"(?<=\d),(?=\d{3})", "", text).split()).lower()


def load_questions(path: Path = QUESTIONS) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def contained(reply: str, answers: list[str]) -> bool:
    """An expected answer appears in the reply, citations aside, as a whole token (0.1 is not found in 0.15, 8 not
    in 86, 3 not in "[3]")."""
    text = normalise(CITATION.sub("", reply))
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


def cached_index(work: Path) -> dict:
    """The index of the pages, built again only when a page changed (the stamp is a checksum of them all)."""
    pages = sorted(p for p in (ROOT / "docs" / "results").glob("*/README.md") if p.parent.name != "rag")
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in pages)).hexdigest()
    saved = work / "index.json"
    if saved.is_file() and json.loads(saved.read_text()).get("stamp") == stamp and (work / "index").is_dir():
        return json.loads(saved.read_text())
    built = {**rag_index(str(corpus(work / "docs")), str(work / "index"), progress=False), "stamp": stamp}
    saved.write_text(json.dumps(built))
    return built


def source_dict(hit) -> dict:
    return {"source": hit.chunk.source, "text": hit.chunk.text}


def generate(args, work: Path, embedder, asked: list[dict]) -> list[tuple[str, bool]]:
    """(the model's own text, whether it ran to --max-new-tokens) for each question: greedy, neither the guard nor
    the citation check applied (the guard only cuts a greedy text short, so both are scored from this one)."""
    rag = Rag.load(work / "index", args.llm, args.k, embedder=embedder, retrieval=args.retrieval, cite=False,
                   guard=False)
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    out = []
    for i, q in enumerate(asked):
        text = "".join(rag.ask(q["question"], sampling).deltas)
        tokens = len(rag.llm.tokenizer.encode(text, add_special_tokens=False).ids)
        out.append((text, tokens >= args.max_new_tokens))
        print(f"[{i + 1}/{len(asked)}] {q['question'][:60]!r} -> {text[:100]!r}", file=sys.stderr)
    return out


def score(q: dict, model_text: str, ran_to_limit: bool, hits, guard: bool) -> dict:
    """One answer as the app shows it (the guard, if on, then the citation check), scored."""
    text = "".join(stop_repeats(iter([model_text]))) if guard else model_text
    check = CitationCheck(hits, q["question"])
    shown = check.check(text)
    answers = [q["answer"], *q.get("aliases", ())]
    evidence = [h.rank for h in hits if holds(source_dict(h), q)]
    return {"question": q["question"], "answer": q["answer"], "model_text": model_text, "shown": shown,
            "contained": contained(shown, answers), "exact": exact(shown, answers), "retrieved": bool(evidence),
            "evidence_sources": evidence, "model_cited": check.model_cited, "invalid_citations": len(check.dropped),
            "cited": check.cited, "added": check.added, "citation_correct": bool(set(check.cited) & set(evidence)),
            "ran_to_limit": ran_to_limit and text == model_text, "loops": loops(text)}


def summary(rows: list[dict]) -> dict:
    n = len(rows)

    def pct(key):
        return round(100 * sum(bool(r[key]) for r in rows) / n, 1)

    retrieved = [r for r in rows if r["retrieved"]]
    return {"contained_%": pct("contained"), "exact_%": pct("exact"),
            "contained_when_retrieved_%": round(100 * sum(r["contained"] for r in retrieved) / max(1, len(retrieved)),
                                                1),
            "model_cited_%": pct("model_cited"), "invalid_citations": sum(r["invalid_citations"] for r in rows),
            "citation_added_%": round(100 * sum(r["added"] is not None for r in rows) / n, 1),
            "cited_%": pct("cited"), "citation_accuracy_%": pct("citation_correct"),
            "citation_precision_%": round(100 * sum(r["citation_correct"] for r in rows)
                                          / max(1, sum(bool(r["cited"]) for r in rows)), 1),
            "ran_to_limit_%": pct("ran_to_limit"),
            "loops_%": pct("loops")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/rag-quality", help="where the corpus copy and the index are written")
    ap.add_argument("--k", type=int, default=4, help="chunks retrieved per question")
    ap.add_argument("--retrieval", default="hybrid", choices=("hybrid", "dense", "bm25"), help="for the answers")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--from-json", help="score the model texts of an earlier run's JSON again (no generation)")
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
    built = cached_index(work)
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

    if args.from_json or not args.no_answers:
        asked = questions[::args.every]
        hits = [index.retrieve(embedder, q["question"], args.k, args.retrieval) for q in asked]
        gen_start = time.perf_counter()
        if args.from_json:  # the model's texts of an earlier run, scored again (same questions, same retrieval)
            earlier = {r["question"]: (r["model_text"], r["ran_to_limit"])
                       for r in json.loads(Path(args.from_json).read_text())["rows"] if not r.get("guard")}
            texts = [earlier[q["question"]] for q in asked]
        else:
            texts = generate(args, work, embedder, asked)
        report["seconds_per_question"] = round((time.perf_counter() - gen_start) / len(asked), 2)
        report["answers"], report["rows"] = {}, []
        for guard in (False, True):
            rows = [score(q, text, full, h, guard) for q, (text, full), h in zip(asked, texts, hits)]
            report["answers"]["guard on" if guard else "guard off"] = summary(rows)
            report["rows"] += [{"guard": guard, **r} for r in rows]
        report["settings"] = {"llm": args.llm, "retrieval": args.retrieval, "k": args.k, "temperature": 0,
                              "max_new_tokens": args.max_new_tokens, "questions_answered": len(asked),
                              "citation_check": True}
    report["command"] = "python bench/rag_quality.py " + " ".join(sys.argv[1:])
    print(table(report), file=sys.stderr)
    print(json.dumps(report, indent=2))


def table(report: dict) -> str:
    k = report["k"]
    lines = [f"{report['questions']} questions, {report['chunks']} chunks of {report['documents']} pages, k = {k}",
             "", f"| retrieval | recall@1 % | recall@{k} % |", "|---|---:|---:|"]
    lines += [f"| {m} | {v['recall@1']} | {v[f'recall@{k}']} |" for m, v in report["retrieval"].items()]
    if "answers" in report:
        variants = report["answers"]
        keys = list(next(iter(variants.values())))
        settings = report["settings"]
        lines += ["", f"answers ({settings['questions_answered']} questions, {settings['retrieval']} retrieval):", "",
                  "| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(str(v[key]) for key in keys) + " |" for name, v in variants.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
