"""word2vec quality: lmlab's vectors beside gensim 4.4's, trained on the same corpus with the same settings, both
scored by lmlab.evaluate.word_vectors (analogies with coverage, WordSim-353, SimLex-999); gensim's own
evaluate_word_analogies / evaluate_word_pairs on gensim's vectors are listed too, as a check of our evaluator.

    python bench/word2vec_quality.py [--corpus ../shared/data/wikitext-2] [--models sg,cbow] [--epochs 5]
        [--out docs/results/word2vec]

Goals (issue 16): within 2 points of gensim on the covered analogies, within 0.03 Spearman on WS-353 and SimLex.
Writes OUT/word2vec.json, word2vec.md and word2vec.png; prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from lmlab.data.words import corpus_sentences, read_corpus
from lmlab.evaluate.word_vectors import evaluate_word_vectors, read_word_pairs
from lmlab.training.word2vec import Word2VecSettings
from lmlab.util import atomic_replace, atomic_write_json, atomic_write_text

sys.path.insert(0, str(Path(__file__).parent))
from word2vec_throughput import train_gensim, train_lmlab  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
EVAL = SHARED / "word_embedding_eval"
FILES = {"analogies": EVAL / "word2vec_analogy" / "questions-words.txt",
         "wordsim353": EVAL / "wordsim353" / "combined.tab", "simlex999": EVAL / "simlex999" / "SimLex-999.txt"}


def gensim_own_scores(words, vectors) -> dict:
    """gensim's evaluators on a set of vectors (SimLex rewritten as the 3 columns gensim's reader takes)."""
    from gensim.models import KeyedVectors

    kv = KeyedVectors(vectors.shape[1])
    kv.add_vectors(words, vectors)
    total, _ = kv.evaluate_word_analogies(str(FILES["analogies"]))
    out = {"analogies_3cosadd": total}
    for name in ("wordsim353", "simlex999"):
        with tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False) as f:
            f.writelines(f"{a}\t{b}\t{s}\n" for a, b, s in read_word_pairs(FILES[name]))
        _, spearman, _ = kv.evaluate_word_pairs(f.name)
        out[name] = float(spearman.statistic)
    return out


HEADLINE = ("analogies_3cosadd", "analogies_3cosmul", "wordsim353", "simlex999")


def headline(ev: dict) -> dict:
    return {"analogies_3cosadd": ev["analogies"]["all"]["3cosadd"], "analogies_3cosmul": ev["analogies"]["all"]["3cosmul"],
            "wordsim353": ev["wordsim353"]["spearman"], "simlex999": ev["simlex999"]["spearman"]}


def compare(model: str, epochs: int, corpus: str, threads: int, seeds: list[int]) -> dict:
    """Both trained once per seed (alternating); the first seed's full evaluation, every seed's headline."""
    s = Word2VecSettings(corpus=corpus, model=model, epochs=epochs)
    vocab, encoded = read_corpus(corpus, s.min_count)
    sentences = list(corpus_sentences(corpus))
    row = {"model": model, "settings": s.recipe(), "words": len(encoded.ids), "vocabulary": len(vocab),
           "seeds": seeds, "lmlab": {"per_seed": []}, "gensim": {"per_seed": []}}
    for seed in seeds:
        s.seed = seed
        for name, (wv, seconds) in (("lmlab", train_lmlab(vocab, encoded, s, threads)),
                                    ("gensim", train_gensim(sentences, s, threads))):
            ev = evaluate_word_vectors(wv, FILES["analogies"], {k: FILES[k] for k in ("wordsim353", "simlex999")},
                                       ("king", "france", "three", "music"))
            row[name]["per_seed"].append({"seed": seed, "words_per_s": round(epochs * len(encoded.ids) / seconds),
                                          **headline(ev)})
            if seed == seeds[0]:
                row[name]["evaluation"] = ev
                if name == "gensim":
                    row[name]["gensim_evaluators"] = gensim_own_scores(wv.words, wv.vectors)
    for name in ("lmlab", "gensim"):
        runs = row[name]["per_seed"]
        row[name]["mean"] = {k: float(np.mean([r[k] for r in runs])) for k in HEADLINE + ("words_per_s",)}
        row[name]["sd"] = {k: float(np.std([r[k] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
                           for k in HEADLINE}
    return row


def goals(row: dict) -> list[str]:
    """The issue's quality goals, met or missed, on the means over seeds."""
    lm, gs = row["lmlab"]["mean"], row["gensim"]["mean"]
    out = []
    for k, limit, scale, unit in (("analogies_3cosadd", 2, 100, " points"), ("analogies_3cosmul", 2, 100, " points"),
                                  ("wordsim353", 0.03, 1, ""), ("simlex999", 0.03, 1, "")):
        diff = (lm[k] - gs[k]) * scale
        sd = max(row["lmlab"]["sd"][k], row["gensim"]["sd"][k]) * scale
        out.append(f"| {k} | {lm[k] * scale:.3f} | {gs[k] * scale:.3f} | {diff:+.3f}{unit} | {sd:.3f} | "
                   f"{'met' if abs(diff) <= limit else 'missed'} (within {limit}{unit}) |")
    return out


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# word2vec: lmlab vs gensim 4.4 (same corpus, same settings)", ""]
    for r in rows:
        lm, gs = r["lmlab"]["evaluation"], r["gensim"]["evaluation"]
        lines += [f"## {r['model']} ({r['words']:,} words x {r['settings']['epochs']} epochs, vocabulary "
                  f"{r['vocabulary']:,}, dim {r['settings']['dim']}, window {r['settings']['window']}, "
                  f"negative {r['settings']['negative']})", "",
                  f"Means over seeds {', '.join(map(str, r['seeds']))} (analogies in %, over the covered questions):",
                  "", "| figure | lmlab | gensim | lmlab - gensim | larger sd over seeds | goal |",
                  "|---|---:|---:|---:|---:|---|", *goals(r), "",
                  f"Seed {r['seeds'][0]}, per section:", "",
                  "| analogy section | covered | lmlab 3CosAdd | gensim 3CosAdd | lmlab 3CosMul | gensim 3CosMul |",
                  "|---|---:|---:|---:|---:|---:|"]
        for sec, a in lm["analogies"].items():
            b = gs["analogies"][sec]
            cells = [f"{100 * x[m]:.1f}" if x[m] is not None else "-" for m in ("3cosadd",) for x in (a, b)]
            cells += [f"{100 * x[m]:.1f}" if x[m] is not None else "-" for m in ("3cosmul",) for x in (a, b)]
            lines.append(f"| {sec} | {a['covered']}/{a['questions']} ({100 * a['coverage']:.0f}%) | "
                         + " | ".join(cells) + " |")
        lines += ["", "| similarity | covered pairs | lmlab Spearman | gensim Spearman | difference |",
                  "|---|---:|---:|---:|---:|"]
        for name in ("wordsim353", "simlex999"):
            a, b = lm[name], gs[name]
            lines.append(f"| {name} | {a['covered']}/{a['pairs']} | {a['spearman']:.3f} | {b['spearman']:.3f} | "
                         f"{a['spearman'] - b['spearman']:+.3f} |")
        own = r["gensim"]["gensim_evaluators"]
        lines += ["", f"Training: lmlab {r['lmlab']['mean']['words_per_s']:,.0f} words/s, gensim "
                  f"{r['gensim']['mean']['words_per_s']:,.0f} words/s (mean over the seeds; 2 threads each, "
                  f"alternating; bench/word2vec_throughput.py measures speed). gensim's own evaluators on gensim's "
                  f"vectors (seed {r['seeds'][0]}): "
                  f"analogies {100 * own['analogies_3cosadd']:.1f}%, WS-353 {own['wordsim353']:.3f}, SimLex "
                  f"{own['simlex999']:.3f}.", ""]
        for w, near in lm["neighbours"].items():
            lines.append(f"- lmlab, nearest to *{w}*: " + ", ".join(n for n, _ in near))
        lines.append("")
    lines += ["Command:", "", f"    {command}", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    fig = Figure(figsize=(10, 4), dpi=110)
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, r in zip(axes, rows):
        labels, lm, gs = [], [], []
        for name in ("all", "wordsim353", "simlex999"):
            for who, out in (("lmlab", lm), ("gensim", gs)):
                out.append(r[who]["mean"]["analogies_3cosadd" if name == "all" else name])
            labels.append("analogies (3CosAdd, covered)" if name == "all" else f"{name} Spearman")
        x = range(len(labels))
        sd = {who: [r[who]["sd"]["analogies_3cosadd" if n == "all" else n] for n in ("all", "wordsim353", "simlex999")]
              for who in ("lmlab", "gensim")}
        ax.bar([i - 0.2 for i in x], lm, 0.4, yerr=sd["lmlab"], capsize=3, label="lmlab")
        ax.bar([i + 0.2 for i in x], gs, 0.4, yerr=sd["gensim"], capsize=3, label="gensim 4.4")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(f"{r['model']}: lmlab vs gensim (mean, sd over {len(r['seeds'])} seeds)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", default=str(SHARED / "wikitext-2"), help="any source lmlab word2vec reads")
    ap.add_argument("--models", default="sg,cbow", help="comma-separated: sg, cbow")
    ap.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    ap.add_argument("--threads", type=int, default=2, help="threads of each")
    ap.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (each trains both)")
    ap.add_argument("--out", default="docs/results/word2vec", help="results folder")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    rows = [compare(m, args.epochs, args.corpus, args.threads, seeds) for m in args.models.split(",")]
    out = Path(args.out)
    command = "python bench/word2vec_quality.py " + " ".join(sys.argv[1:])
    atomic_write_json(out / "word2vec.json", {"command": command, "rows": rows})
    atomic_write_text(out / "word2vec.md", markdown(rows, command))
    plot(rows, out / "word2vec.png")
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
