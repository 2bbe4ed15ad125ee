"""What embeddings and retrieval are worth, measured on local data (`lmlab rag eval-retrieval`, `eval-answers`).

eval-retrieval (GLUE's STS-B and QNLI dev files):
  - STS-B dev: Spearman correlation (x100) of the cosine of the two sentences' embeddings with the gold score.
  - QNLI dev as a retrieval set: the corpus is every distinct sentence of the file; each question whose pair is
    labelled `entailment` is a query whose relevant result is that sentence (the one that answers it). Recall@1/5/10,
    MRR@10 and nDCG@10 of dense retrieval (the index's exact search) against lexical BM25 (bm25s, Lucene's
    variant, k1=1.5, b=0.75, English stop words removed).

eval-answers (WikiText-2's raw test articles as the documents; what retrieval adds to a 135M chat model):
  - Questions built from the documents with a fixed method: from each article, sentences of 8-40 words holding
    exactly one year (1000-2099) become cloze questions, `Fill in the blank with the missing year: "... ____ ..."`,
    whose answer is that year; a seeded sample of them, at most 2 per article.
  - The chat model answers each twice, greedy: from the question alone, and with the top-k retrieved chunks in the
    prompt (lmlab.apps.rag). Scored by exact match (the answer, stripped, is the year) and contained match (the
    year appears in the answer); also the retrieval hit rate (the question's sentence is in a retrieved chunk).
"""

from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from matplotlib.figure import Figure
from tqdm import tqdm

from lmlab.apps.rag import DEFAULT_LLM, Rag, rag_index
from lmlab.data.documents import Chunk
from lmlab.errors import LmlabError
from lmlab.evaluate.metrics import pearson, retrieval_metrics, spearman
from lmlab.inference.embed import Embedder
from lmlab.inference.generate import SamplingParams
from lmlab.inference.retrieval import Index, bm25_rankings
from lmlab.util import atomic_replace, atomic_write_json, atomic_write_text


def read_tsv(path: Path) -> list[dict]:
    if not path.is_file():
        raise LmlabError(f"no such file: {path}; point --glue at a GLUE folder holding STS-B/dev.tsv and QNLI/dev.tsv")
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def sts(embedder: Embedder, path: Path) -> dict:
    rows = read_tsv(path)
    a = embedder.embed([r["sentence1"] for r in rows])
    b = embedder.embed([r["sentence2"] for r in rows])
    cosine, gold = (a * b).sum(-1).tolist(), [float(r["score"]) for r in rows]
    return {"pairs": len(rows), "spearman": 100 * spearman(cosine, gold), "pearson": 100 * pearson(cosine, gold)}


def qnli_retrieval_set(path: Path) -> tuple[list[str], list[str], list[set[int]]]:
    """(corpus, queries, relevant corpus positions of each query) from QNLI dev."""
    rows = read_tsv(path)
    corpus = list(dict.fromkeys(r["sentence"] for r in rows))
    position = {s: i for i, s in enumerate(corpus)}
    relevant: dict[str, set[int]] = {}
    for r in rows:
        if r["label"] == "entailment":
            relevant.setdefault(r["question"], set()).add(position[r["sentence"]])
    return corpus, list(relevant), list(relevant.values())


def dense_rankings(embedder: Embedder, corpus: list[str], queries: list[str], k: int) -> list[list[int]]:
    index = Index({}, [Chunk("qnli", i, i, text) for i, text in enumerate(corpus)], embedder.embed(corpus, True))
    return [[h.chunk.start for h in row] for row in index.search(embedder.embed(queries), k)]


def _bars(groups: dict[str, dict[str, float]], title: str, ylabel: str, path: Path) -> None:
    fig = Figure(figsize=(7, 3.6), layout="constrained")
    ax = fig.add_subplot()
    names = list(next(iter(groups.values())))
    width = 0.8 / len(groups)
    for g, (label, values) in enumerate(groups.items()):
        ax.bar([i + g * width for i in range(len(names))], [values[n] for n in names], width, label=label)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(names))], names)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.legend()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def eval_retrieval(glue: str, out: str = "docs/results/embeddings", model: str = "minilm-l6",
                   command: str | None = None) -> dict:
    """Embedding quality: STS-B dev Spearman, and QNLI dev retrieval (dense vs BM25); JSON, table and plot.

    Args:
        glue: a GLUE folder with STS-B/dev.tsv and QNLI/dev.tsv (the course's ../shared/data/glue)
        out: the results folder
        model: the embedding model
    """
    embedder = Embedder.load(model)
    corpus, queries, relevant = qnli_retrieval_set(Path(glue) / "QNLI" / "dev.tsv")
    result = {"model": model, "sts_b_dev": sts(embedder, Path(glue) / "STS-B" / "dev.tsv"),
              "qnli_dev_retrieval": {"corpus": len(corpus), "queries": len(queries),
                                     "dense": retrieval_metrics(dense_rankings(embedder, corpus, queries, 10),
                                                                relevant),
                                     "bm25": retrieval_metrics(bm25_rankings(corpus, queries, 10), relevant)},
              "command": command}
    folder = Path(out)
    atomic_write_json(folder / "results.json", result)
    q = result["qnli_dev_retrieval"]
    rows = [f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in q[key].values()) + " |"
            for name, key in ((f"dense ({model})", "dense"), ("BM25 (bm25s)", "bm25"))]
    table = "\n".join([f"STS-B dev ({result['sts_b_dev']['pairs']} pairs): Spearman x100 = "
                       f"{result['sts_b_dev']['spearman']:.2f}, Pearson x100 = {result['sts_b_dev']['pearson']:.2f}",
                       "", f"QNLI dev retrieval ({q['queries']} questions, {q['corpus']} sentences):", "",
                       "| retriever | " + " | ".join(q["dense"]) + " |", "|---" * (len(q["dense"]) + 1) + "|",
                       *rows, "", f"Command: `{command}`", ""])
    atomic_write_text(folder / "results.md", table)
    _bars({"dense": q["dense"], "BM25": q["bm25"]}, f"QNLI dev retrieval: {model} vs BM25", "score",
          folder / "retrieval.png")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Answer quality with and without retrieval

YEAR = re.compile(r"\b(1[0-9]{3}|20[0-9]{2})\b")


def wikitext_articles(path: Path) -> list[tuple[str, str]]:
    """(title, text) of each article of a raw WikiText file, its tokenisation undone (" @-@ " -> "-", " , " -> ", ")."""
    if not path.is_file():
        raise LmlabError(f"no such file: {path}; give --wikitext a raw WikiText file (wiki.test.raw)")
    articles, title, lines = [], None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r" = ([^=].*[^=]) = ", line)
        if heading:
            if title is not None:
                articles.append((title, "\n".join(lines)))
            title, lines = heading.group(1), [heading.group(1)]
        elif line.strip():
            text = re.sub(r" @(.)@ ", r"\1", line.strip().strip("= ") if line.startswith(" = =") else line.strip())
            lines.append(re.sub(r" ([,.;:)'])", r"\1", text).replace("( ", "("))
    if title is not None:
        articles.append((title, "\n".join(lines)))
    return articles


def cloze_questions(articles: list[tuple[str, str]], n: int, seed: int = 0) -> list[dict]:
    """The module docstring's method: one-year sentences of 8-40 words as fill-in-the-year questions."""
    rng = random.Random(seed)
    picked = []
    for title, text in articles:
        sentences = [s.strip() for paragraph in text.splitlines() for s in re.split(r"(?<=\.) ", paragraph)]
        usable = [s for s in sentences if 8 <= len(s.split()) <= 40 and len(YEAR.findall(s)) == 1]
        for sentence in rng.sample(usable, min(2, len(usable))):
            year = YEAR.search(sentence).group(1)
            blanked = YEAR.sub("____", sentence)
            picked.append({"article": title, "sentence": sentence, "answer": year,
                           "question": f'Fill in the blank with the missing year: "{blanked}"'})
    return rng.sample(picked, min(n, len(picked)))


def _score(answer: str, gold: str) -> tuple[bool, bool]:
    return answer.strip().strip(".\"' ") == gold, gold in answer


def eval_answers(wikitext: str, out: str = "docs/results/rag", questions: int = 40, articles: int = 20, k: int = 3,
                 llm: str = DEFAULT_LLM, embedding_model: str = "minilm-l6", work: str = "runs/rag-eval",
                 seed: int = 0, command: str | None = None) -> dict:
    """Answer quality of a chat model with and without retrieval, on cloze questions from indexed WikiText.

    Args:
        wikitext: a raw WikiText file (the course's ../shared/data/wikitext-2/wiki.test.raw)
        out: the results folder
        questions: how many questions
        articles: index the first this many articles of the file (0: all of them)
        k: chunks retrieved per question
        llm: the chat model that answers
        embedding_model: the embedding model of the index
        work: where the documents and the index are written
        seed: the sample's seed
    """
    articles = wikitext_articles(Path(wikitext))[:articles or None]
    docs = Path(work) / "docs"
    for i, (title, text) in enumerate(articles):
        atomic_write_text(docs / f"{i:03d}.txt", text)
    built = rag_index(str(docs), str(Path(work) / "index"), embedding_model, chunk_tokens=128, overlap=32,
                      progress=True)
    # dense retrieval and the model's own text, as the committed results were made (bench/rag_quality.py measures
    # the hybrid retrieval and the citation check)
    rag = Rag.load(Path(work) / "index", llm, k, retrieval="dense", cite=False)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.0)
    rows = []
    for q in tqdm(cloze_questions(articles, questions, seed), desc="questions", unit="q"):
        row = dict(q)
        for mode, retrieval in (("closed_book", False), ("retrieval", True)):
            reply = rag.ask(q["question"], sampling, retrieval=retrieval)
            row[mode], sources = "".join(reply.deltas), reply.sources
            row[f"{mode}_exact"], row[f"{mode}_contained"] = _score(row[mode], q["answer"])
            if retrieval:
                row["retrieved_sentence"] = any(q["sentence"] in s["text"] for s in sources)
        rows.append(row)
    summary = {mode: {m: 100 * sum(r[f"{mode}_{m}"] for r in rows) / len(rows) for m in ("exact", "contained")}
               for mode in ("closed_book", "retrieval")}
    result = {"llm": llm, "embedding_model": embedding_model, "questions": len(rows), "k": k,
              "chunks": built["chunks"], "articles": len(articles),
              "retrieval_hit_rate": 100 * sum(r["retrieved_sentence"] for r in rows) / len(rows), **summary,
              "command": command}
    folder = Path(out)
    atomic_write_json(folder / "results.json", result)
    atomic_write_json(folder / "answers.json", rows)
    table = "\n".join([f"{len(rows)} cloze questions from {len(articles)} WikiText-2 test articles ({built['chunks']}"
                       f" chunks of 128 tokens), {llm}, greedy, top-{k} retrieval with {embedding_model}:", "",
                       "| mode | exact match % | contained match % |", "|---|---|---|",
                       *(f"| {m.replace('_', ' ')} | {summary[m]['exact']:.1f} | {summary[m]['contained']:.1f} |"
                         for m in summary), "",
                       f"The question's own sentence was among the retrieved chunks for "
                       f"{result['retrieval_hit_rate']:.1f}% of the questions.", "", f"Command: `{command}`", ""])
    atomic_write_text(folder / "results.md", table)
    _bars({m.replace("_", " "): summary[m] for m in summary}, f"{llm}: answers with and without retrieval",
          "% of questions", folder / "answers.png")
    return result
