"""heads.metrics against scikit-learn (to 1e-9) and against hand-worked cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from featurestore.heads import Targets, metrics

sk = pytest.importorskip("sklearn.metrics")
SEEDS = range(5)


def _multi(seed, n=60, c=5):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.3).astype(int)
    pred = (rng.random((n, c)) < 0.3).astype(int)
    pred[:, -1] = 0  # one column never predicted
    y[:3] = 0
    pred[:2] = 0  # empty unions
    y[:, 1] = 0
    pred[:, 1] = 0  # one column never true and never predicted: F1 0 in the macro mean, as sklearn counts it
    return y, pred


@pytest.mark.parametrize("seed", SEEDS)
def test_multilabel_matches_sklearn(seed):
    y, pred = _multi(seed)
    got = metrics.multilabel(y, pred)
    assert got["acc"] == pytest.approx(sk.jaccard_score(y, pred, average="samples", zero_division=0), abs=1e-9)
    assert got["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred), abs=1e-9)
    assert got["micro_f1"] == pytest.approx(sk.f1_score(y, pred, average="micro", zero_division=0), abs=1e-9)
    assert got["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)
    per_class = sk.f1_score(y, pred, average=None, zero_division=0)
    np.testing.assert_allclose(metrics.per_class_f1(y, pred), per_class, atol=1e-9)


def test_multilabel_accuracy_is_per_sample_iou():
    y = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    pred = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 0]])
    # 1/3, empty union -> 0 (as the UniVA authors count it), 1
    assert metrics.multilabel_accuracy(y, pred) == pytest.approx((1 / 3 + 0 + 1) / 3)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", SEEDS)
def test_single_label_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, 80)
    pred = np.where(rng.random(80) < 0.5, y, rng.integers(0, 6, 80))  # class 5 only ever predicted
    got = metrics.single(y, pred, 6)
    assert got["accuracy"] == got["war"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-9)
    assert got["uar"] == pytest.approx(sk.balanced_accuracy_score(y, pred), abs=1e-9)
    assert got["weighted_f1"] == pytest.approx(sk.f1_score(y, pred, average="weighted", zero_division=0), abs=1e-9)
    assert got["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0), abs=1e-9)
    np.testing.assert_array_equal(got["confusion_matrix"], sk.confusion_matrix(y, pred, labels=range(6)))
    # M3ED's figures: support-weighted precision and recall, micro-F1
    assert got["precision"] == pytest.approx(sk.precision_score(y, pred, average="weighted", zero_division=0),
                                             abs=1e-9)
    assert got["recall"] == pytest.approx(sk.recall_score(y, pred, average="weighted", zero_division=0), abs=1e-9)
    assert got["micro_f1"] == pytest.approx(sk.f1_score(y, pred, average="micro"), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_binary_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, pred = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    got = metrics.binary(y, pred)
    assert got["acc2"] == pytest.approx(sk.accuracy_score(y, pred), abs=1e-9)
    assert got["f1"] == pytest.approx(sk.f1_score(y, pred), abs=1e-9)


@pytest.mark.parametrize("seed", SEEDS)
def test_va_pearson_and_ccc(seed):
    rng = np.random.default_rng(seed)
    y = rng.uniform(-1, 1, (40, 2))
    pred = 0.6 * y + rng.normal(0, 0.3, (40, 2)) + 0.1
    y[5, 1] = np.nan  # unknown truth is ignored
    got = metrics.va(y, pred)
    ok = np.isfinite(y[:, 1])
    assert got["valence_r"] == pytest.approx(np.corrcoef(y[:, 0], pred[:, 0])[0, 1], abs=1e-9)
    assert got["arousal_r"] == pytest.approx(np.corrcoef(y[ok, 1], pred[ok, 1])[0, 1], abs=1e-9)
    x, t = pred[:, 0], y[:, 0]
    ccc = 2 * np.cov(x, t, bias=True)[0, 1] / (x.var() + t.var() + (x.mean() - t.mean()) ** 2)
    assert got["valence_ccc"] == pytest.approx(ccc, abs=1e-9)
    assert metrics.ccc(t, t) == pytest.approx(1.0)
    assert got["r"] == pytest.approx((got["valence_r"] + got["arousal_r"]) / 2)
    x, t = pred[ok, 1], y[ok, 1]  # arousal: the rows with a truth only
    ccc = 2 * np.cov(x, t, bias=True)[0, 1] / (x.var() + t.var() + (x.mean() - t.mean()) ** 2)
    assert got["arousal_ccc"] == pytest.approx(ccc, abs=1e-9)
    assert got["ccc"] == pytest.approx((got["valence_ccc"] + ccc) / 2, abs=1e-9)


def test_va_with_an_unlabelled_dimension_is_nan_not_an_error():
    y = np.c_[np.linspace(-1, 1, 10), np.full(10, np.nan)]
    got = metrics.va(y, y + 0.1)
    assert math.isnan(got["arousal_ccc"]) and got["ccc"] == got["valence_ccc"]


def test_primary_per_kind():
    y, pred = _multi(0)
    assert metrics.primary(Targets("multi", y, list("abcde")), pred) == metrics.multilabel_accuracy(y, pred)
    ys = np.array([0, 1, 1, 2])
    assert metrics.primary(Targets("single", ys, list("abc")), ys) == 1.0
    assert metrics.PRIMARY["single"] == "uar"
    rng = np.random.default_rng(1)
    yb, pb = np.array([1, 1, 1, 0, 0, 0, 0, 0]), np.array([1, 0, 0, 0, 0, 0, 0, 1])  # accuracy 0.625, F1 0.4
    assert metrics.primary(Targets("binary", yb, ["neg", "pos"]), pb) == pytest.approx(sk.accuracy_score(yb, pb))
    yv = rng.uniform(-1, 1, (30, 2))
    pv = 0.5 * yv + rng.normal(0, 0.2, (30, 2))
    by_hand = [2 * np.cov(pv[:, d], yv[:, d], bias=True)[0, 1]
               / (pv[:, d].var() + yv[:, d].var() + (pv[:, d].mean() - yv[:, d].mean()) ** 2) for d in (0, 1)]
    assert metrics.primary(Targets("va", yv, []), pv) == pytest.approx(np.mean(by_hand), abs=1e-9)
