"""Evaluating word vectors: Mikolov et al.'s analogies, word-similarity rank correlation, nearest neighbours.

Analogies (questions-words.txt: ": section" lines, then "a b c d" lines meaning a is to b as c is to d): the answer
is the vocabulary word, other than a, b and c, that maximises
    3CosAdd  cos(x, b) - cos(x, a) + cos(x, c)                         (Mikolov et al. 2013; gensim's most_similar)
    3CosMul  cos'(x, b) cos'(x, c) / (cos'(x, a) + 1e-6), cos' = (1 + cos) / 2   (Levy & Goldberg 2014;
             gensim's most_similar_cosmul)
Words are lower-cased (the vectors' words are). A question counts only when its four words are all in the
vocabulary; its section's **coverage** is covered / all, and accuracy is over the covered questions (gensim's
evaluate_word_analogies does the same; its "Total accuracy" is our "all" row).

Word similarity (WordSim-353, SimLex-999): Spearman correlation between the human scores and the vectors' cosine
similarities, over the pairs whose two words are in the vocabulary (the coverage is reported). A file is tab- or
comma-separated, word, word, then its score: the first number among the remaining columns (WordSim's third
column, SimLex-999's fourth after the part of speech); a first line without a number is a header.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.evaluate.metrics import spearman
from lmlab.models.word_vectors import WordVectors

COSMUL_EPS = 1e-6


@dataclass
class Analogy:
    section: str
    words: tuple[str, str, str, str]


def read_analogies(path: str | Path) -> list[Analogy]:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such analogy file: {path}")
    questions, section = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        words = line.lower().split()
        if not words:
            continue
        if len(words) != 4 or section is None:
            raise LmlabError(f"{path} line {n}: {line[:60]!r} is not an analogy question; the format is "
                             "questions-words.txt's (': section' lines, then lines of four words 'a b c d')")
        questions.append(Analogy(section, tuple(words)))
    if not questions:
        raise LmlabError(f"{path} holds no analogy questions; the format is questions-words.txt's")
    return questions


def _answers(vectors: WordVectors, ids: np.ndarray, batch: int = 512) -> dict[str, np.ndarray]:
    """The predicted word id of each question (rows a, b, c, d of ids), by 3CosAdd and by 3CosMul."""
    unit = vectors.unit
    out = {"3cosadd": np.empty(len(ids), dtype=np.int64), "3cosmul": np.empty(len(ids), dtype=np.int64)}
    for start in range(0, len(ids), batch):
        q = ids[start:start + batch]
        cos = [unit @ unit[q[:, k]].T for k in range(3)]  # (V, B) each: cos(x, a), cos(x, b), cos(x, c)
        add = cos[1] - cos[0] + cos[2]
        mul = ((1 + cos[1]) / 2) * ((1 + cos[2]) / 2) / ((1 + cos[0]) / 2 + COSMUL_EPS)
        cols = np.arange(len(q))
        for scores, name in ((add, "3cosadd"), (mul, "3cosmul")):
            for k in range(3):
                scores[q[:, k], cols] = -np.inf
            out[name][start:start + len(q)] = scores.argmax(axis=0)
    return out


def evaluate_analogies(vectors: WordVectors, questions: list[Analogy]) -> dict:
    """Accuracy per section and over all covered questions, with coverage, by 3CosAdd and 3CosMul."""
    covered = [q for q in questions if all(w in vectors for w in q.words)]
    ids = np.array([[vectors.index[w] for w in q.words] for q in covered], dtype=np.int64).reshape(-1, 4)
    answers = _answers(vectors, ids) if len(covered) else {"3cosadd": ids[:, 3], "3cosmul": ids[:, 3]}
    sections: dict[str, dict] = {}
    for q in questions:
        sections.setdefault(q.section, {"questions": 0, "covered": 0, "3cosadd": 0, "3cosmul": 0})["questions"] += 1
    for i, q in enumerate(covered):
        s = sections[q.section]
        s["covered"] += 1
        for method in ("3cosadd", "3cosmul"):
            s[method] += int(answers[method][i] == ids[i, 3])
    total = {"questions": len(questions), "covered": len(covered),
             **{m: sum(s[m] for s in sections.values()) for m in ("3cosadd", "3cosmul")}}
    rows = {**sections, "all": total}
    return {name: {"questions": s["questions"], "covered": s["covered"],
                   "coverage": s["covered"] / s["questions"],
                   **{m: (s[m] / s["covered"] if s["covered"] else None) for m in ("3cosadd", "3cosmul")}}
            for name, s in rows.items()}


def read_word_pairs(path: str | Path) -> list[tuple[str, str, float]]:
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"no such word-similarity file: {path}")
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        cols = [c.strip() for c in re.split(r"[\t,]", line)]
        score = next((float(c) for c in cols[2:] if _is_number(c)), None)
        if len(cols) < 3 or score is None:
            if n == 1:
                continue  # the header
            raise LmlabError(f"{path} line {n}: {line[:60]!r} is not 'word, word, score'; a word-similarity file "
                             "is tab- or comma-separated with the score after the two words (WordSim-353, SimLex-999)")
        pairs.append((cols[0].lower(), cols[1].lower(), score))
    if not pairs:
        raise LmlabError(f"{path} holds no word pairs; the format is 'word<TAB>word<TAB>score' lines")
    return pairs


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def evaluate_similarity(vectors: WordVectors, pairs: list[tuple[str, str, float]]) -> dict:
    covered = [(a, b, s) for a, b, s in pairs if a in vectors and b in vectors]
    result = {"pairs": len(pairs), "covered": len(covered), "coverage": len(covered) / len(pairs), "spearman": None}
    if len(covered) >= 2:
        result["spearman"] = spearman([vectors.similarity(a, b) for a, b, _ in covered], [s for _, _, s in covered])
    return result


def evaluate_word_vectors(vectors: WordVectors, analogies: str | Path | None = None,
                          similarity: dict[str, str | Path] | None = None, neighbours: tuple[str, ...] = (),
                          k: int = 8) -> dict:
    """Every evaluation whose file is given, and the nearest neighbours of the `neighbours` words in the
    vocabulary."""
    out: dict = {"vocabulary": len(vectors), "dim": vectors.dim}
    if analogies:
        out["analogies"] = evaluate_analogies(vectors, read_analogies(analogies))
    for name, path in (similarity or {}).items():
        out[name] = evaluate_similarity(vectors, read_word_pairs(path))
    out["neighbours"] = {w: vectors.nearest(w, k) for w in neighbours if w in vectors}
    return out


def format_evaluation(ev: dict, label: str = "") -> str:
    """The evaluation as a readable table (analogy sections, then similarity)."""
    lines = []
    if "analogies" in ev:
        lines += [f"{'analogy section ' + label:34} {'covered':>13} {'3CosAdd':>8} {'3CosMul':>8}"]
        for name, s in ev["analogies"].items():
            acc = [f"{100 * s[m]:7.1f}%" if s[m] is not None else "      - " for m in ("3cosadd", "3cosmul")]
            lines.append(f"{name:34} {s['covered']:>6}/{s['questions']:<6} {acc[0]:>8} {acc[1]:>8}")
    for name, s in ev.items():
        if isinstance(s, dict) and "spearman" in s:
            rho = "-" if s["spearman"] is None else f"{s['spearman']:.3f}"
            lines.append(f"{name:34} {s['covered']:>6}/{s['pairs']:<6} Spearman {rho}")
    for w, near in ev.get("neighbours", {}).items():
        lines.append(f"{w}: " + ", ".join(f"{n} {s:.2f}" for n, s in near))
    return "\n".join(lines)
