"""Linear probes of frozen biLM layers on SST-2: how much sentiment each layer's pooled vectors carry, for each
given biLM and for the same architecture with random weights, beside a bag of words.

    taskset -c 1 python bench/elmo_probe.py --elmo runs/elmo,runs/elmo-sst2-domain --labels 5000

A sentence's features per layer (token, LSTM 1, LSTM 2, each [forward; backward]) are the mean and the max of the
layer's vectors over its words; a logistic regression (scikit-learn, C=0.1, features standardised on the training
rows) learns from `--labels` seeded SST-2 training sentences and is scored on the 872 dev sentences; "all" is
the three layers' features side by side. The bag of words: binary word counts, C=0.5. And each trained biLM's
token-layer neighbours of --neighbours (cosine after centring, over its 5,000 most frequent words). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression

from lmlab.data.words import WordSplitter
from lmlab.models.elmo import SPECIAL_WORDS, load_bilm, word_chars
from lmlab.util import comma_list


def read_sst2(path: str) -> tuple[list[str], np.ndarray]:
    rows = [line.rstrip("\n").split("\t") for line in open(path, encoding="utf-8")][1:]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def pooled_layers(bilm, texts: list[str], split: WordSplitter) -> np.ndarray:
    """(sentences, layers, 2 x width): each layer's mean and max over the sentence's words."""
    out = []
    for start in range(0, len(texts), 64):
        words = [split(t)[:64] or ["."] for t in texts[start:start + 64]]
        vocab = sorted({w for ws in words for w in ws})
        index = {w: i + 1 for i, w in enumerate(vocab)}
        ids = torch.zeros(len(words), max(map(len, words)), dtype=torch.long)
        for i, ws in enumerate(words):
            ids[i, :len(ws)] = torch.tensor([index[w] for w in ws])
        with torch.no_grad():
            layers = bilm.layers(word_chars([""] + vocab, bilm.config.max_chars), ids, (ids != 0).sum(1))
        real = (ids != 0).float()[..., None]
        out.append(torch.stack([torch.cat([(h * real).sum(1) / real.sum(1), h.masked_fill(real == 0, -1e9).amax(1)],
                                          dim=-1) for h in layers], dim=1))
    return torch.cat(out).numpy()


def neighbours(bilm, words: list[str], queries: list[str], k: int = 6) -> dict[str, list[str]]:
    """Each query's nearest words by the token layer alone (vectors centred, then cosine)."""
    pool = words[len(SPECIAL_WORDS):5000]
    with torch.no_grad():
        vectors = bilm.tokens(word_chars(pool, bilm.config.max_chars))
    unit = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=-1)
    out = {}
    for q in queries:
        if q in pool:
            sims = unit @ unit[pool.index(q)]
            out[q] = [pool[j] for j in sims.topk(k + 1).indices.tolist() if pool[j] != q][:k]
    return out


def probe(train: np.ndarray, y_train: np.ndarray, dev: np.ndarray, y_dev: np.ndarray) -> float:
    mean, std = train.mean(0), train.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, C=0.1).fit((train - mean) / std, y_train)
    return round(float(clf.score((dev - mean) / std, y_dev)), 4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elmo", required=True, help="comma-separated biLM run folders (lmlab elmo)")
    p.add_argument("--labels", type=int, default=5000, help="SST-2 training sentences the probes learn from")
    p.add_argument("--data-dir", default="../shared/data", help="folder with sst2/train.tsv and sst2/dev.tsv")
    p.add_argument("--seed", type=int, default=0, help="seed of the training subset and of the random biLM")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--neighbours", default="good,bad,great,terrible,movie", help="words whose token-layer "
                                                                               "neighbours to list")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    texts, labels = read_sst2(f"{a.data_dir}/sst2/train.tsv")
    pick = np.random.default_rng(a.seed).permutation(len(texts))[:a.labels]
    train_x, train_y = [texts[i] for i in pick], labels[pick]
    dev_x, dev_y = read_sst2(f"{a.data_dir}/sst2/dev.tsv")
    split = WordSplitter(punctuation=True)
    counts = CountVectorizer(tokenizer=split, lowercase=False, binary=True, token_pattern=None)
    bow = LogisticRegression(max_iter=2000, C=0.5).fit(counts.fit_transform(train_x), train_y)
    report = {"labels": a.labels, "dev": len(dev_x), "bag_of_words": round(float(bow.score(counts.transform(dev_x),
                                                                                          dev_y)), 4), "biLMs": []}
    random_configs = []  # a random biLM is the same for every run of its architecture: probed once
    for run in comma_list(a.elmo):
        for random_weights in (False, True):
            bilm, words = load_bilm(run, random_weights=random_weights, seed=a.seed)
            if random_weights and bilm.config in random_configs:
                continue
            random_configs += [bilm.config] if random_weights else []
            started = time.perf_counter()
            train, dev = pooled_layers(bilm, train_x, split), pooled_layers(bilm, dev_x, split)
            scores = {name: probe(train[:, j], train_y, dev[:, j], dev_y)
                      for j, name in enumerate(["token", "lstm1", "lstm2"])}
            scores["all"] = probe(train.reshape(len(train), -1), train_y, dev.reshape(len(dev), -1), dev_y)
            report["biLMs"].append({"run": run, "weights": "random" if random_weights else "pretrained",
                                    "dev_acc": scores, "seconds": round(time.perf_counter() - started, 1),
                                    **({} if random_weights else
                                       {"neighbours": neighbours(bilm, words, comma_list(a.neighbours))})})
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
