"""Feature sets: the cached rows of one backbone fingerprint.

```
features/<fingerprint>/spec.json     what produced the numbers (backbone, weights, adapter, ...)
features/<fingerprint>/seg-*.h5      immutable segments: keys, arrays/pooled, ragged/seq, errors
features/<fingerprint>/.lock         held while a job writes here
```
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ._io import file_lock, read_json, write_json_atomic
from .errors import IntegrityError, NotFoundError
from .hashing import canonical_json
from .segments import ErrorRecord, KeyIndex, Problem, SegmentSet
from .store import Store, now_iso

__all__ = ["FeatureSet", "list_feature_sets", "resolve_features", "superseded_by"]

POOLED, SEQ = "pooled", "seq"


class FeatureSet:
    """Rows of one fingerprint. Reads see only published segments."""

    def __init__(self, store: Store, fingerprint: str):
        self.store = store
        self.fingerprint = fingerprint
        self.folder = store.feature_dir(fingerprint)
        self.segments = SegmentSet(self.folder)
        self._index: KeyIndex | None = None
        self._index_names: tuple[str, ...] = ()

    # ---- spec ----------------------------------------------------------------------
    @property
    def spec_path(self) -> Path:
        return self.folder / "spec.json"

    def exists(self) -> bool:
        return self.spec_path.is_file()

    @property
    def spec(self) -> dict:
        if not self.exists():
            raise NotFoundError(f"no features with fingerprint {self.fingerprint!r} in {self.store.root} (fs ls)")
        return read_json(self.spec_path)

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

    def ensure_spec(self, spec: dict) -> None:
        """Write spec.json on first use; afterwards it must agree with what the job computed."""
        if self.exists():
            skip = ("created_at", "source", "fingerprint")
            old = canonical_json({k: v for k, v in self.spec.items() if k not in skip})
            new = canonical_json({k: v for k, v in spec.items() if k not in skip})
            if old != new:
                raise IntegrityError(f"features {self.fingerprint}: spec.json disagrees with the backbone's "
                                     "spec for the same fingerprint; the folder was edited by hand or is corrupt")
            return
        write_json_atomic(self.spec_path, {**spec, "fingerprint": self.fingerprint, "created_at": now_iso()})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with file_lock(self.folder / ".lock", f"features {self.fingerprint}"):
            yield

    # ---- reading -------------------------------------------------------------------
    def index(self, *, refresh: bool = False) -> KeyIndex:
        """The key index, rebuilt whenever the set of published segments has changed."""
        names = tuple(s.path.name for s in self.segments.segments())
        if self._index is None or refresh or names != self._index_names:
            self._index = self.segments.index()
            self._index_names = names
        return self._index

    def has(self, keys: Sequence[str]) -> np.ndarray:
        return self.index().contains(np.asarray(keys, dtype="S32"))

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

    def errors(self) -> list[ErrorRecord]:
        return self.segments.errors()

    def stats(self) -> dict:
        segs = self.segments.segments()
        errors = self.errors()
        return {
            "fingerprint": self.fingerprint,
            "backbone": self.backbone,
            "modality": self.modality,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows": len(self.index(refresh=True)),
            "errors": len({(e.dataset, e.item_id) for e in errors}),
            "segments": len(segs),
            "bytes": sum(s.path.stat().st_size for s in segs),
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
