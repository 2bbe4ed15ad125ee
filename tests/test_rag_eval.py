"""The measurements of lmlab rag eval-*: retrieval metrics (closed-form cases), the QNLI retrieval set, the cloze
questions built from WikiText, and the BM25 baseline on a case whose ranking is plain."""

import math

import pytest

from lmlab.apps.rag_eval import bm25_rankings, cloze_questions, qnli_retrieval_set, wikitext_articles
from lmlab.evaluate.metrics import retrieval_metrics


def test_retrieval_metrics_closed_form():
    rankings = [[3, 1, 2], [5, 6, 7], [9, 8, 4]]
    relevant = [{3}, {7, 6}, {0}]
    m = retrieval_metrics(rankings, relevant, ks=(1, 2), cutoff=3)
    assert m["recall@1"] == pytest.approx((1 + 0 + 0) / 3)
    assert m["recall@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 2 + 0) / 3)
    ndcg_2 = (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg@3"] == pytest.approx((1 + ndcg_2 + 0) / 3)


def test_qnli_retrieval_set(tmp_path):
    path = tmp_path / "dev.tsv"
    rows = [("0", "Who wrote it?", "Anna wrote it.", "entailment"), ("1", "Who wrote it?", "It is red.", "not_entailment"),
            ("2", "What colour?", "It is red.", "entailment"), ("3", "Where?", "Nowhere known.", "not_entailment")]
    path.write_text("index\tquestion\tsentence\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows))
    corpus, queries, relevant = qnli_retrieval_set(path)
    assert corpus == ["Anna wrote it.", "It is red.", "Nowhere known."]
    assert queries == ["Who wrote it?", "What colour?"] and relevant == [{0}, {1}]


def test_bm25_ranks_the_lexical_match_first():
    pytest.importorskip("bm25s", reason="the test extra: bm25s")
    corpus = ["otters sleep holding hands", "volcanoes erupt lava", "trains leave the station at night"]
    assert [r[0] for r in bm25_rankings(corpus, ["when do night trains leave", "lava volcanoes"], 2)] == [2, 1]


def test_cloze_questions_from_wikitext(tmp_path):
    raw = tmp_path / "wiki.raw"
    raw.write_text(" = Alpha = \n \n Alpha was founded in 1901 by three brothers from the north . It grew fast . \n"
                   " = = History = = \n The second factory of Alpha opened in 1923 near the old river port . \n"
                   " = Beta = \n \n Beta is a small town on a long and very windy hill @-@ top , with 2 mills . \n")
    articles = wikitext_articles(raw)
    assert [t for t, _ in articles] == ["Alpha", "Beta"]
    assert "hill-top, with 2 mills." in articles[1][1] and "= =" not in articles[0][1]
    questions = cloze_questions(articles, 10)
    assert sorted(q["answer"] for q in questions) == ["1901", "1923"]
    for q in questions:
        blanked = q["question"].split('"')[1]
        assert blanked.replace("____", q["answer"]) == q["sentence"] and q["article"] == "Alpha"
