"""lmlab word2vec: the distributions against their closed forms and gensim's, the file formats against gensim's
reader and writer, the evaluation against gensim's evaluators, training (it learns; a resumed run equals an
uninterrupted one) and bad input."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from lmlab.cli import main
from lmlab.data.words import Vocabulary, WordSplitter, read_corpus
from lmlab.errors import LmlabError
from lmlab.evaluate.word_vectors import evaluate_analogies, evaluate_similarity, read_analogies, read_word_pairs
from lmlab.models.word_vectors import WordVectors, load_word_vectors
from lmlab.training import word2vec as w2v
from lmlab.training.word2vec import Word2VecSettings, keep_probabilities, negative_distribution, train_word2vec
from lmlab.training.word2vec_kernel import cumulative_table, draw_negatives, subsample
from tests.conftest import synthetic_corpus

gensim = pytest.importorskip("gensim")
from gensim.models import KeyedVectors  # noqa: E402
from gensim.models import Word2Vec as GensimWord2Vec  # noqa: E402


def _zipf_sentences(n_sentences=400, vocab=60, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    p = 1 / np.arange(1, vocab + 1)
    p /= p.sum()
    return [[words[i] for i in rng.choice(vocab, size=rng.integers(3, 15), p=p)] for _ in range(n_sentences)]


def test_subsampling_and_negatives_match_closed_forms_and_gensim():
    sentences = _zipf_sentences()
    vocab = Vocabulary.build(sentences, min_count=1)
    model = GensimWord2Vec(sentences, min_count=1, sample=1e-2, negative=5, epochs=1, workers=1, vector_size=8)
    # gensim keeps a word when a random uint32 is below sample_int = P(keep) * 2^32.
    keep = keep_probabilities(vocab.counts, 1e-2)
    ref = np.array([model.wv.get_vecattr(w, "sample_int") / 2**32 for w in vocab.words])
    np.testing.assert_allclose(keep, ref, atol=1e-9)
    total, t = vocab.counts.sum(), 1e-2 * vocab.counts.sum()
    np.testing.assert_allclose(keep, np.minimum(1, (np.sqrt(vocab.counts / t) + 1) * t / vocab.counts))
    assert keep.min() < 0.5 and keep.max() == 1.0 and total == sum(map(len, sentences))

    p = negative_distribution(vocab.counts)
    np.testing.assert_allclose(p, vocab.counts**0.75 / (vocab.counts**0.75).sum())
    cum = cumulative_table(p)
    # gensim's cum_table is over its own vocabulary order (also by descending count): compare per word.
    gensim_p = np.diff(np.r_[0, model.cum_table]) / model.cum_table[-1]
    by_word = {w: gensim_p[model.wv.key_to_index[w]] for w in vocab.words}
    np.testing.assert_allclose(np.diff(np.r_[0, cum]) / cum[-1], [by_word[w] for w in vocab.words], atol=1e-8)

    # The compiled samplers draw from these distributions (4.5 standard errors, 200k draws).
    n = 200_000
    draws = np.bincount(draw_negatives(cum, n, 12345), minlength=len(p)) / n
    assert np.all(np.abs(draws - p) < 4.5 * np.sqrt(p * (1 - p) / n) + 1e-6)
    ids = np.repeat(np.arange(len(vocab), dtype=np.int32), 4000)
    out = np.empty_like(ids)
    kept, _ = subsample(ids, keep, np.uint64(7), out)
    rate = np.bincount(out[:kept], minlength=len(vocab)) / 4000
    assert np.all(np.abs(rate - keep) < 4.5 * np.sqrt(keep * (1 - keep) / 4000) + 1e-6)


def test_formats_are_read_by_gensim_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    vectors = WordVectors(["the", "über", "king", "a-b"], rng.normal(size=(4, 7)).astype(np.float32))
    for fmt, binary in (("text", False), ("binary", True)):
        path = vectors.save(tmp_path / f"v.{fmt}", fmt)
        kv = KeyedVectors.load_word2vec_format(str(path), binary=binary)
        assert list(kv.index_to_key) == vectors.words
        np.testing.assert_allclose(kv.vectors, vectors.vectors, rtol=1e-5 if fmt == "text" else 0)
        back = load_word_vectors(path)
        assert back.words == vectors.words
        np.testing.assert_allclose(back.vectors, vectors.vectors, rtol=1e-5 if fmt == "text" else 0)
        # ... and gensim's own files load here.
        kv.save_word2vec_format(str(tmp_path / f"g.{fmt}"), binary=binary)
        theirs = load_word_vectors(tmp_path / f"g.{fmt}")
        assert theirs.words == vectors.words
        np.testing.assert_allclose(theirs.vectors, kv.vectors, rtol=1e-5 if fmt == "text" else 0)


def _analogy_file(path, words, rng, n=120):
    lines = []
    for section in ("capitals", "gram-plural"):
        lines.append(f": {section}")
        for _ in range(n // 2):
            q = rng.sample(words, 4)
            if rng.random() < 0.2:
                q[rng.randrange(4)] = "unseenword"  # not covered
            lines.append(" ".join(w.capitalize() if rng.random() < 0.3 else w for w in q))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_analogies_and_similarity_match_gensims_evaluators(tmp_path):
    rng = random.Random(0)
    words = [f"word{i}" for i in range(30)]
    vecs = np.random.default_rng(1).normal(size=(30, 5)).astype(np.float32)
    # Make some questions answerable: word1 - word0 + word2 = word3 exactly.
    vecs[3] = vecs[1] - vecs[0] + vecs[2]
    ours = WordVectors(words, vecs)
    kv = KeyedVectors(5)
    kv.add_vectors(words, vecs)
    path = _analogy_file(tmp_path / "q.txt", words, rng)
    path.write_text(path.read_text() + "word0 word1 word2 word3\n")
    result = evaluate_analogies(ours, read_analogies(path))
    _, sections = kv.evaluate_word_analogies(str(path))
    for s in sections[:-1]:
        done = len(s["correct"]) + len(s["incorrect"])
        assert result[s["section"]]["covered"] == done
        assert result[s["section"]]["3cosadd"] == pytest.approx(len(s["correct"]) / done)
    assert result["all"]["covered"] < result["all"]["questions"] and result["all"]["3cosadd"] > 0
    # 3CosMul: gensim's most_similar_cosmul, question by question.
    questions = [q for q in read_analogies(path) if all(w in ours for w in q.words)]
    hits = sum(kv.most_similar_cosmul(positive=[b, c], negative=[a], topn=1)[0][0] == d
               for a, b, c, d in (q.words for q in questions))
    assert result["all"]["3cosmul"] == pytest.approx(hits / len(questions))

    pairs = tmp_path / "pairs.tab"
    pairs.write_text("Word 1\tWord 2\tHuman (mean)\n" + "".join(
        "{}\t{}\t{:.3f}\n".format(*rng.sample(words + ["unseenword"], 2), rng.uniform(0, 10)) for _ in range(60)))
    sim = evaluate_similarity(ours, read_word_pairs(pairs))
    _, spearman, oov = kv.evaluate_word_pairs(str(pairs))
    assert sim["spearman"] == pytest.approx(spearman.statistic, abs=1e-6)
    assert 100 * (1 - sim["coverage"]) == pytest.approx(oov)


def test_simlex_rows_take_the_score_after_the_part_of_speech(tmp_path):
    path = tmp_path / "SimLex-999.txt"
    path.write_text("word1\tword2\tPOS\tSimLex999\tconc(w1)\nold\tnew\tA\t1.58\t2.72\nSmart\tclever\tA\t9.2\t1.75\n")
    assert read_word_pairs(path) == [("old", "new", 1.58), ("smart", "clever", 9.2)]


def test_words_follow_berts_basic_tokenizer_without_punctuation():
    assert WordSplitter()("Don't  PANIC, Zoë: 3.5 km!") == ["don", "t", "panic", "zoe", "3", "5", "km"]


def _settings(tmp_path, corpus, **kw):
    base = dict(corpus=str(corpus), out=str(tmp_path / "run"), dim=16, window=3, negative=5, min_count=1,
                epochs=4, threads=1, no_progress=True, neighbours="alice")
    return Word2VecSettings(**{**base, **kw})


@pytest.mark.parametrize("model", ["sg", "cbow"])
def test_training_learns_the_corpus_like_gensim(tmp_path, model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(synthetic_corpus(3000))
    # No subsampling: in a 20-word corpus every word is "frequent" and would be mostly dropped.
    vectors, stats = train_word2vec(_settings(tmp_path, corpus, model=model, sample=0))
    sentences = [line.replace(".", "").split() for line in corpus.read_text().splitlines()]
    ref = GensimWord2Vec(sentences, vector_size=16, window=3, min_count=1, negative=5, epochs=4, workers=1,
                         sg=int(model == "sg"), sample=0, seed=1)
    names, verbs = ["bob", "carol", "dave"], ["sees", "helps", "calls"]
    for wv in (vectors, ref.wv):
        # The names are interchangeable in the corpus, so are the verbs: each group is closer within.
        within = np.mean([wv.similarity("alice", n) for n in names])
        across = np.mean([wv.similarity("alice", v) for v in verbs])
        assert within > across + 0.5
    assert stats["vocabulary"] == len(ref.wv) and stats["words"] == sum(map(len, sentences))


def test_an_interrupted_run_resumes_to_the_same_vectors(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(synthetic_corpus(4000))
    monkeypatch.setattr(w2v.Trainer, "CHUNK", 5000)
    whole, _ = train_word2vec(_settings(tmp_path / "a", corpus, ckpt_every=20_000))
    save = w2v._save_checkpoint

    def interrupted(run_dir, model, at):
        save(run_dir, model, at)
        raise KeyboardInterrupt

    monkeypatch.setattr(w2v, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_word2vec(_settings(tmp_path / "b", corpus, ckpt_every=20_000))
    monkeypatch.setattr(w2v, "_save_checkpoint", save)
    with pytest.raises(LmlabError, match="already holds a run; pass --resume"):
        train_word2vec(_settings(tmp_path / "b", corpus, ckpt_every=20_000))
    resumed, _ = train_word2vec(_settings(tmp_path / "b", corpus, ckpt_every=20_000, resume=True))
    np.testing.assert_array_equal(resumed.vectors, whole.vectors)
    with pytest.raises(LmlabError, match="--dim 16 \\(now 32\\)"):  # vectors of another dimension
        train_word2vec(_settings(tmp_path / "b", corpus, ckpt_every=20_000, resume=True, dim=32))


def test_the_command_writes_vectors_and_evaluation(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(synthetic_corpus(1500))
    questions = tmp_path / "q.txt"
    questions.write_text(": people\nalice bob carol dave\nalice bob carol nosuchword\n")
    code = main(["word2vec", "--corpus", str(corpus), "--out", str(tmp_path / "run"), "--dim", "8", "--epochs", "1",
                 "--min-count", "1", "--analogies", str(questions), "--no-progress", "--threads", "1"])
    assert code == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["evaluation"]["analogies"]["people"]["covered"] == 1
    assert results["evaluation"]["analogies"]["all"]["coverage"] == 0.5
    assert "alice" in results["evaluation"]["neighbours"] or "king" not in results["evaluation"]["neighbours"]
    assert load_word_vectors(tmp_path / "run").dim == 8  # a run folder is its vectors.bin
    assert "words/s" in capsys.readouterr().out


def test_bad_input_fails_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "data.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("a b c\n")
    lonely = tmp_path / "lonely.txt"
    lonely.write_text("a\nb\nc\nd\ne\nf\ng\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(synthetic_corpus(200))
    bad_questions = tmp_path / "q.txt"
    bad_questions.write_text(": s\nalice bob carol\n")
    cases = [
        ([str(empty)], "no word occurs"),
        ([str(binary)], "does not look like UTF-8 text"),
        ([str(tiny), "--min-count", "1"], "too few for --negative 5"),
        ([str(lonely), "--min-count", "1", "--negative", "2"], "finds no context"),
        ([str(corpus), "--min-count", "1", "--analogies", str(bad_questions)], "is not an analogy question"),
    ]
    for i, (extra, message) in enumerate(cases):
        code = main(["word2vec", "--corpus", *extra, "--out", str(tmp_path / f"r{i}"), "--no-progress", "--dim", "4",
                     "--epochs", "1", "--threads", "1"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("lmlab word2vec: error: ") and message in err, err
        assert err.count("\n") == 1
    cut = tmp_path / "cut.txt"
    cut.write_text("2 3\nking 0.1 0.2 0.3\nqueen 0.1 0.2\n")
    with pytest.raises(LmlabError, match="line 3: 2 numbers .* vectors of dimension 3"):
        load_word_vectors(cut)
    vectors = WordVectors(["a", "b"], np.ones((2, 3), np.float32))
    vectors.save(tmp_path / "v.bin", "binary")
    data = (tmp_path / "v.bin").read_bytes().replace(b"2 3\n", b"2 4\n", 1)
    (tmp_path / "w.bin").write_bytes(data)
    with pytest.raises(LmlabError, match="another dimension"):
        load_word_vectors(tmp_path / "w.bin")
    assert read_corpus(str(corpus), 1)[0].words  # the good corpus reads


# ----------------------------------------------------------------------------------------------------------------
# Word vectors as the from-scratch BiLSTM's embeddings

def _sentiment_data(root, seed=0):
    """SST-2's layout; training sentences use only 'good'/'bad', dev sentences only 'great'/'awful': a model can
    only get the dev set right through word vectors that place those words with them."""
    rng = random.Random(seed)
    filler = ["the", "film", "plot", "was", "is", "a", "very", "story", "and"]
    (root / "sst2").mkdir(parents=True)
    for name, words, n in (("train", ("bad", "good"), 64), ("dev", ("awful", "great"), 64)):
        rows = []
        for i in range(n):
            s = [rng.choice(filler) for _ in range(rng.randint(3, 7))]
            s.insert(rng.randrange(len(s) + 1), words[i % 2])
            rows.append(f"{' '.join(s)}\t{i % 2}")
        (root / "sst2" / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return root


def _sentiment_vectors(path):
    rng = np.random.default_rng(0)
    words = ["good", "great", "bad", "awful", "the", "film", "plot", "was", "is", "a", "very", "story", "and"]
    vecs = rng.normal(scale=0.3, size=(len(words), 16)).astype(np.float32)
    vecs[:2, 0] += 3  # the positive words share a direction, the negative ones its opposite
    vecs[2:4, 0] -= 3
    return WordVectors(words, vecs).save(path, "binary")


def test_bilstm_starts_from_word_vectors_and_transfers_to_unseen_words(tmp_path):
    from lmlab.models.baseline import build_baseline
    from lmlab.training.classification import FinetuneSettings, finetune, load_task

    data = _sentiment_data(tmp_path / "data")
    vectors = load_word_vectors(_sentiment_vectors(tmp_path / "v.bin"))
    model, tok, info = build_baseline("bilstm", load_task("sst2", data).train, 2, vectors=vectors,
                                      freeze_vectors=True)
    assert tok.token_to_id("great") is not None  # a vectors' word the training sentences never use
    for w in ("great", "bad", "film"):
        np.testing.assert_array_equal(model.emb.weight[tok.token_to_id(w)].detach().numpy(), vectors[w])
    assert not model.emb.weight.requires_grad and info["train_words_with_vectors"] == 1.0

    def run(name, **kw):
        # One evaluation, at the end: each one also redraws the run's plot, which costs more than these steps.
        return finetune(FinetuneSettings(model="bilstm", task="sst2", epochs=8, batch_size=16, lr=5e-3,
                                         max_length=12, data_dir=str(data), out=str(tmp_path / name),
                                         eval_every=1000, no_progress=True, threads=1, device="cpu", **kw),
                        echo=None)

    scratch = run("scratch")
    frozen = run("frozen", vectors=str(tmp_path / "v.bin"), freeze_vectors=True)
    assert scratch["metrics"]["acc"] < 0.7 < 0.9 < frozen["metrics"]["acc"]
    assert frozen["info"]["frozen"] and frozen["trained_parameters"] < frozen["parameters"]
    with pytest.raises(LmlabError, match="--vectors gives word embeddings to the from-scratch models"):
        finetune(FinetuneSettings(model="minilm-l6", task="sst2", data_dir=str(data), out=str(tmp_path / "bert"),
                                  vectors=str(tmp_path / "v.bin"), no_progress=True))


def test_paradigms_has_a_bilstm_word2vec_row(tmp_path):
    from lmlab.experiments.paradigms import WORD2VEC, run_paradigms

    data = _sentiment_data(tmp_path / "data")
    _sentiment_vectors(tmp_path / "v.bin")
    summary = run_paradigms("sst2", "32", "", out=tmp_path / "out", work=tmp_path / "work", baselines="",
                            methods="", data_dir=data, threads=1, progress=False, vectors=str(tmp_path / "v.bin"))
    (row,) = summary["rows"]
    assert row["model"] == WORD2VEC and row["method"] == "word2vec fine-tuned" and row["labels"] == 32
    assert "--vectors" in row["command"] and "BiLSTM + word2vec" in (tmp_path / "out" / "paradigms.md").read_text()
