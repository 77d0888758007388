"""Every metric a head is judged by, in one module (numpy only).

- multi-label: `acc` (per-sample intersection over union, as the UniVA authors compute it:
  an item with an empty union scores 0), `hamming_loss`, `micro_f1`, `macro_f1` (over all
  label columns; a column never true nor predicted scores 0, like scikit-learn's default).
- single-label: `accuracy` = `war` (weighted average recall), `uar` (unweighted average
  recall = balanced accuracy, over the classes present in the truth), `weighted_f1`,
  `macro_f1` (over the classes present in the truth or the predictions, like scikit-learn),
  `precision` / `recall` (support-weighted, scikit-learn's average='weighted'), `micro_f1`
  (equal to accuracy for one label per item), and the `confusion_matrix` (rows: truth,
  columns: prediction). As the papers name them: IEMOCAP's UA / ACC = `uar`, WA / WACC = `war`;
  MELD's weighted F1 = `weighted_f1`; M3ED's precision / recall / ACC / micro-F1 = `precision`,
  `recall`, `accuracy`, `micro_f1`.
- binary: `acc2` and `f1` of the positive class (index 1).
- VA regression: Pearson `r` and `ccc` (Lin's concordance) per dimension, ignoring NaN.

`evaluate(targets, pred, proba)` returns the dict for a target kind; `primary(...)` the one
number early stopping and sweeps maximise (see `PRIMARY`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["multilabel_accuracy", "hamming_loss", "f1_counts", "multilabel", "confusion_matrix", "single",
           "binary", "pearson", "ccc", "va", "evaluate", "primary", "PRIMARY", "per_class_f1"]

PRIMARY = {"multi": "acc", "single": "uar", "binary": "acc2", "va": "ccc"}


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


# ---- multi-label -------------------------------------------------------------------
def multilabel_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    inter = (y & pred).sum(1)
    union = (y | pred).sum(1)
    return float(_safe_div(inter, union).mean()) if len(y) else math.nan


def hamming_loss(y: np.ndarray, pred: np.ndarray) -> float:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    return float((y != pred).mean()) if y.size else math.nan


def f1_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from counts; 0 where there is nothing true nor predicted (scikit-learn's zero_division=0)."""
    return _safe_div(2 * np.asarray(tp), 2 * np.asarray(tp) + fp + fn)


def per_class_f1(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """F1 of each label column of a multi-label prediction."""
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    return f1_counts(tp, fp, fn)


def multilabel(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y, pred = np.asarray(y).astype(bool), np.asarray(pred).astype(bool)
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    return {"acc": multilabel_accuracy(y, pred), "hamming_loss": hamming_loss(y, pred),
            "micro_f1": float(f1_counts(tp.sum(), fp.sum(), fn.sum())),
            "macro_f1": float(f1_counts(tp, fp, fn).mean()) if len(tp) else math.nan}


# ---- single-label ------------------------------------------------------------------
def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    n = n_classes if n_classes is not None else int(max(y.max(initial=-1), pred.max(initial=-1)) + 1)
    return np.bincount(y * n + pred, minlength=n * n).reshape(n, n)


def single(y: np.ndarray, pred: np.ndarray, n_classes: int | None = None) -> dict[str, Any]:
    cm = confusion_matrix(y, pred, n_classes)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    f1 = f1_counts(tp, predicted - tp, support - tp)
    seen = (support > 0) | (predicted > 0)
    total = support.sum()
    precision = _safe_div(tp, predicted)
    return {
        "accuracy": float(tp.sum() / total) if total else math.nan,
        "war": float(tp.sum() / total) if total else math.nan,
        "uar": float(_safe_div(tp, support)[support > 0].mean()) if total else math.nan,
        "weighted_f1": float((f1 * support).sum() / total) if total else math.nan,
        "macro_f1": float(f1[seen].mean()) if seen.any() else math.nan,
        "precision": float((precision * support).sum() / total) if total else math.nan,
        "recall": float(tp.sum() / total) if total else math.nan,  # support-weighted recall is accuracy
        "micro_f1": float(tp.sum() / total) if total else math.nan,
        "confusion_matrix": cm.tolist(),
    }


def binary(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    tp, fp, fn = ((y == 1) & (pred == 1)).sum(), ((y == 0) & (pred == 1)).sum(), ((y == 1) & (pred == 0)).sum()
    return {"acc2": float((y == pred).mean()) if len(y) else math.nan, "f1": float(f1_counts(tp, fp, fn))}


# ---- VA regression -----------------------------------------------------------------
def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return math.nan
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else math.nan


def ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient (population moments)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return math.nan
    x, y = x[ok], y[ok]
    cov = ((x - x.mean()) * (y - y.mean())).mean()
    den = x.var() + y.var() + (x.mean() - y.mean()) ** 2
    return float(2 * cov / den) if den > 0 else math.nan


def va(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Per dimension (valence, arousal) r and CCC where the truth is known; means over known dims."""
    out: dict[str, float] = {}
    for d, name in enumerate(("valence", "arousal")):
        out[f"{name}_r"] = pearson(pred[:, d], y[:, d])
        out[f"{name}_ccc"] = ccc(pred[:, d], y[:, d])
    for m in ("r", "ccc"):
        vals = [out[f"{n}_{m}"] for n in ("valence", "arousal") if not math.isnan(out[f"{n}_{m}"])]
        out[m] = float(np.mean(vals)) if vals else math.nan
    return out


# ---- by target kind ----------------------------------------------------------------
def evaluate(targets: Any, pred: np.ndarray, proba: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics for `targets` (a heads.base.Targets) given predictions from `Head.predict`."""
    kind, y = targets.kind, targets.y
    if kind == "multi":
        return multilabel(y, pred)
    if kind == "binary":
        return {**binary(y, pred), **single(y, pred, len(targets.classes) or None)}
    if kind == "single":
        return single(y, pred, len(targets.classes) or None)
    if kind == "va":
        return va(y, pred)
    raise ValueError(f"unknown target kind {kind!r}")


def primary(targets: Any, pred: np.ndarray, proba: np.ndarray | None = None) -> float:
    """The one number to maximise for this target kind (`PRIMARY`)."""
    kind = targets.kind
    if kind == "multi":
        return multilabel_accuracy(targets.y, pred)
    if kind == "binary":
        return binary(targets.y, pred)["acc2"]
    if kind == "single":
        return single(targets.y, pred, len(targets.classes) or None)["uar"]
    return va(targets.y, pred)["ccc"]
