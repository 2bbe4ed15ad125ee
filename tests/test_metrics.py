"""Evaluation metrics: closed-form small cases, and agreement with scikit-learn / scipy (GLUE's own references)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.evaluate import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference for F1 and MCC")
scipy_stats = pytest.importorskip("scipy.stats", reason="scipy is the reference for Pearson and Spearman")
# scikit-learn warns when an example list holds one label only; those are cases we want to compare too.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found")


def test_closed_form_cases():
    # 4 examples: tp=1 (index 0), fp=1 (1), fn=1 (2), tn=1 (3).
    preds, golds = [1, 1, 0, 0], [1, 0, 1, 0]
    assert M.accuracy(preds, golds) == 0.5
    assert M.f1(preds, golds) == 2 * 1 / (2 * 1 + 1 + 1)
    assert M.matthews_corrcoef(preds, golds) == 0.0  # (1*1 - 1*1) / ...
    assert M.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == 1.0
    assert M.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == -1.0
    # tp=2, tn=1, fp=1, fn=0: (2*1 - 1*0) / sqrt(3 * 2 * 2 * 1)
    assert M.matthews_corrcoef([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(2 / math.sqrt(12))
    assert M.matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a constant prediction: undefined, reported as 0
    assert M.f1([0, 0], [0, 0]) == 0.0
    assert M.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert M.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)  # monotone, not linear
    assert M.perplexity([-1.0, -3.0], [1, 1]) == pytest.approx(math.e ** 2)
    assert M.perplexity([-2.0, -2.0]) == pytest.approx(math.e ** 2)
    assert M.bits_per_byte([-math.log(2) * 8], [8]) == pytest.approx(1.0)
    assert M.per_unit([-3.0, -1.0], [2, 2]) == 1.0


labels = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(labels)
def test_binary_metrics_match_sklearn(pairs):
    preds, golds = [p for p, _ in pairs], [g for _, g in pairs]
    assert M.accuracy(preds, golds) == pytest.approx(sklearn_metrics.accuracy_score(golds, preds))
    assert M.f1(preds, golds) == pytest.approx(sklearn_metrics.f1_score(golds, preds, zero_division=0))
    assert M.matthews_corrcoef(preds, golds) == pytest.approx(sklearn_metrics.matthews_corrcoef(golds, preds),
                                                              abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60))
def test_multiclass_mcc_matches_sklearn(pairs):
    preds, golds = [p for p, _ in pairs], [g for _, g in pairs]
    assert M.matthews_corrcoef(preds, golds) == pytest.approx(sklearn_metrics.matthews_corrcoef(golds, preds),
                                                              abs=1e-12)


scores = st.lists(st.tuples(st.integers(0, 10), st.integers(0, 10)), min_size=3, max_size=50)


@settings(max_examples=150, deadline=None)
@given(scores)
def test_correlations_match_scipy(pairs):
    # Small integers: many ties, the case that distinguishes rank conventions.
    x = np.array([a for a, _ in pairs], dtype=float) / 2
    y = np.array([b for _, b in pairs], dtype=float) / 2
    if x.std() == 0 or y.std() == 0:
        assert M.pearson(x, y) == 0.0 and M.spearman(x, y) == 0.0
        return
    assert M.pearson(x, y) == pytest.approx(scipy_stats.pearsonr(x, y)[0], abs=1e-9)
    assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-9)


def test_bootstrap_stderr_of_a_mean_is_the_binomial_one():
    rng = np.random.default_rng(0)
    correct = rng.random(2000) < 0.7
    p = correct.mean()
    expected = math.sqrt(p * (1 - p) / len(correct))
    se = M.bootstrap_stderr(M.accuracy, correct, np.ones_like(correct), iters=1000)
    assert se == pytest.approx(expected, rel=0.1)
    # The generic path (any metric) agrees with the vectorised one.
    generic = M.bootstrap_stderr(lambda a, b: float((a == b).mean()), correct, np.ones_like(correct), iters=1000)
    assert generic == pytest.approx(expected, rel=0.1)
    assert math.isnan(M.bootstrap_stderr(M.accuracy, [1], [1]))
    assert M.bootstrap_stderr(M.accuracy, [1, 1, 1], [1, 1, 1]) == 0.0


@pytest.mark.parametrize("iters", [0, 1])
def test_bootstrap_stderr_without_resamples_is_nan(iters):
    """--bootstrap-iters 0 turns the standard errors off; it once ended `lmlab eval` in a traceback."""
    for metric in (M.accuracy, lambda a, b: float((a == b).mean())):
        assert math.isnan(M.bootstrap_stderr(metric, [0, 1, 1], [0, 1, 0], iters=iters))


def test_paired_difference_closed_form_and_scipy():
    # d = b - a = [1, 0, 0, 0]: mean 0.25, sd (n - 1) 0.5, se 0.5 / 2
    assert M.paired_difference([0, 0, 1, 1], [1, 0, 1, 1]) == pytest.approx((0.25, 0.25))
    rng = np.random.default_rng(0)
    a = rng.random(200) < 0.5
    b = a ^ (rng.random(200) < 0.2)  # mostly the same answers: the paired error is far below the unpaired one
    gain, se = M.paired_difference(a, b)
    t = scipy_stats.ttest_rel(b.astype(float), a.astype(float)).statistic  # t = mean / se of the differences
    assert gain == pytest.approx(b.mean() - a.mean()) and se == pytest.approx(gain / t)
    unpaired = math.sqrt(a.var(ddof=1) / 200 + b.var(ddof=1) / 200)
    assert se < 0.7 * unpaired
    with pytest.raises(ValueError):
        M.paired_difference([1, 0, 1], [1, 0])
