"""Feature sets: the cached rows of one backbone fingerprint.

```
features/<fingerprint>/spec.json     what produced the numbers (backbone, weights, adapter, ...)
features/<fingerprint>/seg-*.h5      immutable segments: keys, arrays/pooled, ragged/seq, errors
features/<fingerprint>/.lock         held while a job writes here
```
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import NotFoundError
from .keyed import KeyedSet
from .segments import Problem
from .store import Store, now_iso

__all__ = ["FeatureSet", "list_feature_sets", "resolve_features", "superseded_by"]

POOLED, SEQ = "pooled", "seq"


class FeatureSet(KeyedSet):
    """Rows of one fingerprint. Reads see only published segments."""

    what = "features with fingerprint"
    informative = ("created_at", "source", "fingerprint")

    def __init__(self, store: Store, fingerprint: str):
        super().__init__(store, fingerprint, store.feature_dir(fingerprint))
        self.fingerprint = fingerprint

    def _stamp(self) -> dict:
        return {"fingerprint": self.fingerprint, "created_at": now_iso()}

    @property
    def backbone(self) -> str:
        return self.spec["backbone"]

    @property
    def modality(self) -> str:
        return self.spec["modality"]

    @property
    def dim(self) -> int:
        return int(self.spec["dim"])

    @property
    def dtype(self) -> str:
        return self.spec["config"]["dtype"]

    def read_pooled(self, keys: Sequence[str], *, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """Pooled rows `[len(keys), dim]` aligned to `keys` (zeros where absent) and a presence mask."""
        if not len(self.index().unique_keys()):
            return np.zeros((len(keys), self.dim), dtype or self.dtype), np.zeros(len(keys), bool)
        return self.segments.read(keys, POOLED, dtype=dtype, index=self.index())

    def scan_pooled(self, *, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """Every cached row and its key, in storage order: the fastest full read."""
        return self.segments.scan(POOLED, dtype=dtype)

    def read_sequences(self, keys: Sequence[str], *, dtype=None) -> tuple[list, np.ndarray]:
        return self.segments.read_ragged(keys, SEQ, dtype=dtype, index=self.index())

    def stats(self) -> dict:
        with self.segments.reading():  # no segment is deleted between listing and measuring it
            segs = self.segments.segments()
            errors = self.errors()
            size = sum(s.path.stat().st_size for s in segs)
        return {
            "fingerprint": self.fingerprint,
            "backbone": self.backbone,
            "modality": self.modality,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows": len(self.index(refresh=True)),
            "errors": len({(e.dataset, e.item_id) for e in errors}),
            "segments": len(segs),
            "bytes": size,
            "created_at": self.spec.get("created_at"),
            "source": self.spec.get("source", {}),
        }

    def verify(self) -> list[Problem]:
        problems = self.segments.verify(expect={POOLED: (self.dim,)})
        if not self.exists():
            problems.insert(0, Problem(str(self.spec_path), "spec.json is missing"))
        return problems


def list_feature_sets(store: Store) -> list[FeatureSet]:
    root = store.features_dir()
    if not root.is_dir():
        return []
    sets = [FeatureSet(store, p.name) for p in sorted(root.iterdir()) if (p / "spec.json").is_file()]
    return sorted(sets, key=lambda fs: (fs.backbone, fs.spec.get("created_at", "")))


def superseded_by(store: Store, fingerprint: str) -> str | None:
    """The newest fingerprint of the same backbone and modality, if newer than this one."""
    fs = FeatureSet(store, fingerprint)
    if not fs.exists():
        return None
    mine = fs.spec
    newer = [o for o in list_feature_sets(store)
             if o.backbone == mine["backbone"] and o.modality == mine["modality"]
             and o.spec.get("created_at", "") > mine.get("created_at", "")]
    return newer[-1].fingerprint if newer else None


def resolve_features(store: Store, ref: str, *, modality: str | None = None) -> FeatureSet:
    """A fingerprint, or a backbone name meaning its most recently created fingerprint."""
    fs = FeatureSet(store, ref)
    if fs.exists():
        return fs
    candidates = [f for f in list_feature_sets(store)
                  if f.backbone == ref and (modality is None or f.modality == modality)]
    if not candidates:
        known = sorted({f"{f.backbone} ({f.fingerprint})" for f in list_feature_sets(store)})
        raise NotFoundError(f"no features {ref!r}{' for ' + modality if modality else ''} in {store.root}; "
                            f"have: {', '.join(known) or 'none'}. Extract them with `fs extract`")
    return candidates[-1]
