"""The label VA table: each emotion category as a (valence, arousal) point.

Defaults are the NRC-VAD values the UniVA authors use (on 0..1), which their code
min-max normalises per column to [-1, 1] before taking cosine similarities; UniVA's
emotion-correlation prior reads this table. A dataset can override or extend it
(`dataset.json` key `label_va`, values on [-1, 1]). For a label with no value, the
class means of the dataset's own VA labels are used (a missing dimension -> 0, the
neutral midpoint); a label with neither is an error that says how to add it.
"""
from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["NRC_VAD_01", "SYNONYMS", "canonical_label", "default_table", "label_va_table", "class_means", "dataset_label_va"]

NRC_VAD_01: dict[str, tuple[float, float]] = {
    "happy": (1.000, 0.735), "sad": (0.225, 0.333), "anger": (0.167, 0.865), "surprise": (0.875, 0.875),
    "disgust": (0.052, 0.775), "fear": (0.073, 0.840), "neutral": (0.5, 0.5),
}
SYNONYMS = {
    "happiness": "happy", "joy": "happy", "happy": "happy", "sadness": "sad", "sad": "sad", "angry": "anger",
    "anger": "anger", "surprised": "surprise", "surprise": "surprise", "disgusted": "disgust", "disgust": "disgust",
    "fearful": "fear", "fear": "fear", "neutral": "neutral", "hap": "happy", "ang": "anger", "neu": "neutral",
    "exc": "happy", "fea": "fear", "sur": "surprise", "dis": "disgust",
}


def canonical_label(label: str) -> str:
    """The label's lower-case name through SYNONYMS (`Joy` -> `happy`, `angry` -> `anger`); others lower-cased."""
    key = str(label).lower()
    return SYNONYMS.get(key, key)


def default_table() -> dict[str, tuple[float, float]]:
    """The NRC-VAD defaults with each column min-max normalised to [-1, 1]."""
    arr = np.array(list(NRC_VAD_01.values()), dtype=np.float64)
    lo, hi = arr.min(0), arr.max(0)
    norm = 2 * (arr - lo) / (hi - lo) - 1
    return {k: (float(v), float(a)) for k, (v, a) in zip(NRC_VAD_01, norm)}


def label_va_table(classes: Sequence[str], *, overrides: Mapping[str, Sequence[float]] | None = None,
                   label_means: Mapping[str, Sequence[float]] | None = None) -> np.ndarray:
    """`[C, 2]` VA on [-1, 1] for `classes`, in order.

    Precedence: `overrides` (per dataset) > NRC-VAD defaults (matched through SYNONYMS,
    case-insensitive) > `label_means` (class means of the dataset's VA labels, NaN -> 0).
    """
    defaults = default_table()
    overrides = {k.lower(): v for k, v in (overrides or {}).items()}
    means = {k.lower(): v for k, v in (label_means or {}).items()}
    rows, missing = [], []
    for c in classes:
        key = c.lower()
        if key in overrides:
            v = overrides[key]
        elif SYNONYMS.get(key) in defaults:
            v = defaults[SYNONYMS[key]]
        elif key in means and not np.isnan(np.asarray(means[key], float)).all():
            v = np.nan_to_num(np.asarray(means[key], float), nan=0.0)
        else:
            missing.append(c)
            continue
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (2,) or not np.isfinite(v).all() or np.abs(v).max() > 1:
            raise ConfigError(f"label VA for {c!r} is {v.tolist()}; give two finite numbers on [-1, 1]")
        rows.append(v)
    if missing:
        raise ConfigError(f"no valence/arousal for labels {missing}; add them to the dataset's label VA table "
                          f"(dataset.json 'label_va', values on [-1, 1]) or give the dataset VA labels")
    return np.stack(rows)


def class_means(labels: Sequence[Sequence[str]] | Sequence[str | None], valence: np.ndarray,
                arousal: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean (valence, arousal) of the items of each class (single- or multi-label)."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for lab, v, a in zip(labels, valence, arousal):
        for c in ([lab] if isinstance(lab, str) else (lab or [])):
            acc.setdefault(c, []).append((v, a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN classes give NaN, handled above
        return {c: tuple(np.nanmean(np.array(vals, float), axis=0)) for c, vals in acc.items()}


def dataset_label_va(dataset, classes: Sequence[str] | None = None) -> np.ndarray:
    """`[C, 2]` label VA for a registered dataset's classes (default: its label set, else its
    multi-label set), with the dataset's `label_va` overrides and its VA-label class means."""
    info = dataset.info
    classes = list(classes if classes is not None else (info.get("label_set") or info.get("multilabel_set") or []))
    df = dataset.manifest
    labels = [sorted({*([one] if one else []), *(many or [])}) for one, many in
              zip(df["label"].to_list(), df["labels"].to_list())]
    means = class_means(labels, df["valence"].fill_null(np.nan).to_numpy(), df["arousal"].fill_null(np.nan).to_numpy())
    return label_va_table(classes, overrides=info.get("label_va"), label_means=means)
