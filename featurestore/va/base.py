"""The VA scorer contract.

A VA scorer estimates, for each item of one modality, the valence and arousal that this
modality alone expresses: `score(batch, modality) -> [B, 2]` float, (valence, arousal) on
[-1, 1], NaN where a dimension is unknown. Its `source` (`<label>-<16 hex>`) is a digest
of everything that changes the numbers (scorer, config, weights or lexicon file) and is
the identity under which the values are cached (`store/va/<source>/`).

Scorers come in two kinds of input:

- `inputs = "raw"`: `prepare(raw, modality)` decodes one item (the text, or the bytes of
  an image/audio file; a bad item raises `BadItemError`), `score(prepared, modality)`.
- `inputs = "features"`: the scorer reads cached embeddings of `fingerprint` (it never
  reruns the backbone); `score(pooled [B, D], modality)`.

Which modalities a scorer accepts must be known cheaply (`modalities()` reads at most a
config file), so a scorer for the wrong modality is refused before any work starts.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, ClassVar, Sequence

import numpy as np

from ..config import to_dict
from ..errors import ConfigError
from ..hashing import spec_digest

__all__ = ["VAScorer", "ScorerConfig", "DIMENSIONS", "source_of", "parse_range", "to_unit_range"]

DIMENSIONS = ("valence", "arousal")


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
    """Options every scorer takes (none yet); a scorer subclasses this to add its own."""


def source_of(label: str, spec: dict) -> str:
    """`<label>-<16 hex>`: readable, and unique to everything in the spec."""
    return f"{label}-{spec_digest(spec)}"


def parse_range(text: str, what: str) -> tuple[float, float]:
    """`"0..1"` -> (0.0, 1.0); `"-4..4"`, `"1..9"` likewise."""
    lo, sep, hi = str(text).replace(" ", "").partition("..")
    try:
        lo_f, hi_f = float(lo), float(hi)
    except ValueError:
        lo_f = hi_f = float("nan")
    if not sep or not (np.isfinite(lo_f) and np.isfinite(hi_f)) or hi_f <= lo_f:
        raise ConfigError(f"{what}={text!r} is not a range; write it as LOW..HIGH with LOW < HIGH, "
                          "e.g. 0..1 or 1..9")
    return lo_f, hi_f


def to_unit_range(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto [-1, 1] (no clipping; NaN stays NaN)."""
    return (2.0 * (np.asarray(values, np.float64) - lo) / (hi - lo) - 1.0)


class VAScorer(abc.ABC):
    """Base class of every registered VA scorer. Construct cheaply; `load()` does the work."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    modality_hint: ClassVar[str] = ""  # what `fs va list` shows before any model is read
    Config: ClassVar[type] = ScorerConfig
    inputs: ClassVar[str] = "raw"  # "raw" | "features"
    #: a NaN in a dimension the scorer provides means "no evidence" (e.g. no lexicon word
    #: in the text) rather than a failure; scorers that leave this False have every
    #: non-finite output recorded as an error for that item.
    nan_is_unknown: ClassVar[bool] = False
    #: config fields that locate rather than define the numbers (paths, hub ids): left out
    #: of the source digest, which covers the file/weights digests instead
    volatile: ClassVar[tuple[str, ...]] = ()
    uses_torch: ClassVar[bool] = True  # False: no device to resolve, torch never imported

    def __init__(self, config: Any = None, *, device: str = "auto", store: Any = None):
        self.config = config if config is not None else self.Config()
        self.device_request = device
        self.device = "cpu"
        self.store = store
        self._loaded = False

    # ---- to implement ------------------------------------------------------------
    @abc.abstractmethod
    def modalities(self) -> tuple[str, ...]:
        """Modalities this scorer accepts; must be cheap (no weights loaded)."""

    @abc.abstractmethod
    def _load(self) -> None:
        """Load the lexicon or weights."""

    @abc.abstractmethod
    def spec(self) -> dict:
        """Everything that changes the numbers; its digest is in `source`."""

    @abc.abstractmethod
    def score(self, batch: Sequence[Any] | np.ndarray, modality: str) -> np.ndarray:
        """`[B, 2]` float (valence, arousal) on [-1, 1], NaN where unknown."""

    # ---- optional ----------------------------------------------------------------
    def prepare(self, raw: bytes | str, modality: str) -> Any:
        """Decode one raw item (raw scorers); raise BadItemError for an unusable one."""
        return raw

    def provides(self) -> tuple[bool, bool]:
        """Which of (valence, arousal) this scorer estimates at all (after `load()`)."""
        return True, True

    @property
    def label(self) -> str:
        """The readable part of the source name."""
        return self.name

    @property
    def fingerprint(self) -> str:
        """For feature scorers: the fingerprint whose cached embeddings are read."""
        return ""

    def features_for(self, modality: str) -> tuple[str, bool]:
        """Feature scorers: (fingerprint read for `modality`, whether its per-frame sequences are
        scored and averaged rather than its pooled rows)."""
        return self.fingerprint, False

    # ---- shared ------------------------------------------------------------------
    def check_modality(self, modality: str) -> None:
        ok = self.modalities()
        if modality not in ok:
            raise ConfigError(f"VA scorer {self.name!r} scores {', '.join(ok) or 'nothing'}, not {modality}; "
                              f"pick a scorer for {modality} (fs va list)")

    def load(self) -> "VAScorer":
        if not self._loaded:
            if self.uses_torch:
                self._set_device()
            self._load()
            self._loaded = True
        return self

    def _set_device(self) -> None:
        from ..backbones.base import resolve_device

        self.device = resolve_device(self.device_request)
        if self.device == "cpu":
            import torch
            torch.set_num_threads(max(1, os.cpu_count() or 1))

    def full_spec(self, modality: str) -> dict:
        """The spec plus the fields every scorer shares; what `spec.json` holds."""
        from ..store import ROW_FORMAT

        self.check_modality(modality)
        self.load()
        cfg = to_dict(self.config)
        for key in ("_version", *self.volatile):
            cfg.pop(key, None)
        return {"scorer": self.name, "label": self.label, "modality": modality, "config": cfg,
                "provides": list(self.provides()), "store_format": ROW_FORMAT, **self.spec()}

    def source(self, modality: str) -> str:
        """`<label>-<digest>`; `spec["origin"]` (where the weights or lexicon were read
        from) is informative only and left out of the digest."""
        spec = self.full_spec(modality)
        return source_of(self.label, {k: v for k, v in spec.items() if k != "origin"})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"
