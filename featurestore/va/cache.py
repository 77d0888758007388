"""VA sets: the cached VA scores of one scorer source, keyed by content key.

```
va/<source>/spec.json     scorer, label, modality, config, lexicon/weights digests
va/<source>/seg-*.h5      immutable segments (featurestore.segments): keys,
                          arrays/va [N, 2] float32 (valence, arousal; 0 where unknown),
                          arrays/known [N, 2] uint8 (1 where the value is an estimate),
                          errors/* (items the scorer failed on, with the reason)
va/<source>/.lock         held while a job writes here
```

The keys are the same content keys as the embeddings (`<modality>_key` of the
manifest), so VA is computed once per distinct input and joins the feature rows by key.
Unknown dimensions are stored as `known = 0` rather than NaN, so every stored float is
finite (`fs verify` checks that); `read` turns them back into NaN.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .. import __version__
from ..errors import ConfigError, NotFoundError
from ..hashing import spec_digest
from ..keyed import KeyedSet
from ..segments import Problem
from ..store import Store, check_name, now_iso

__all__ = ["VASet", "VA", "KNOWN", "va_root", "list_va_sets", "resolve_va", "latest_covering", "va_coverage",
           "split_va"]

VA, KNOWN = "va", "known"
DTYPES = {VA: "float32", KNOWN: "uint8"}


def va_root(store: Store) -> Path:
    return store.root / "va"


class VASet(KeyedSet):
    """The VA rows of one source. Reads see only published segments."""

    what = "VA source"
    list_hint = "fs va sources"
    informative = ("created_at", "created_by", "origin", "source")

    def __init__(self, store: Store, source: str):
        super().__init__(store, source, va_root(store) / check_name(source, "VA source"))
        self.source = source

    def _stamp(self) -> dict:
        return {"source": self.source, "created_at": now_iso(precise=True), "created_by": f"featurestore {__version__}"}

    @property
    def modality(self) -> str:
        return self.spec["modality"]

    @property
    def scorer(self) -> str:
        return self.spec["scorer"]

    @property
    def label(self) -> str:
        return self.spec.get("label", self.scorer)

    def read(self, keys: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`[len(keys), 2]` float64 (valence, arousal) aligned to `keys`, NaN where unknown or
        absent, and the mask of keys that have a row."""
        keys = np.asarray(keys, dtype="S32")
        if not len(self.index().unique_keys()):
            return np.full((len(keys), 2), np.nan), np.zeros(len(keys), bool)
        values, present = self.segments.read(keys, VA, dtype=np.float64, index=self.index())
        known, _ = self.segments.read(keys, KNOWN, index=self.index())
        values[~known.astype(bool) | ~present[:, None]] = np.nan
        return values, present

    def stats(self) -> dict:
        segs = self.segments.segments()
        rows, known = 0, np.zeros(2, np.int64)
        for _, k in self.segments.iter_rows(KNOWN):
            rows += len(k)
            known += k.astype(bool).sum(0)
        spec = self.spec
        return {"source": self.source, "scorer": spec["scorer"], "label": self.label, "modality": spec["modality"],
                "rows": rows, "valence": int(known[0]), "arousal": int(known[1]),
                "errors": len({(e.dataset, e.item_id) for e in self.errors()}), "segments": len(segs),
                "bytes": sum(s.path.stat().st_size for s in segs), "created_at": spec.get("created_at")}

    def verify(self) -> list[Problem]:
        problems = self.segments.verify(expect={VA: (2,), KNOWN: (2,)})
        if not self.exists():
            return [Problem(str(self.spec_path), "spec.json is missing")] + problems
        spec = self.spec
        digest = spec_digest({k: v for k, v in spec.items()
                              if k not in ("origin", "source", "created_at", "created_by")})
        if self.source != f"{spec.get('label', spec.get('scorer'))}-{digest}":
            problems.append(Problem(str(self.spec_path), "spec.json does not hash to its source name"))
        if problems:  # a corrupt segment cannot be read further
            return problems
        for _, values in self.segments.iter_rows(VA):
            if len(values) and np.abs(values).max() > 1.0:
                problems.append(Problem(str(self.folder), "VA values outside [-1, 1]"))
                break
        return problems


def list_va_sets(store: Store, *, modality: str | None = None) -> list[VASet]:
    """VA sources in the store, oldest first."""
    root = va_root(store)
    if not root.is_dir():
        return []
    sets = [VASet(store, p.name) for p in sorted(root.iterdir()) if (p / "spec.json").is_file()]
    sets = [s for s in sets if modality is None or s.modality == modality]
    return sorted(sets, key=lambda s: (s.spec.get("created_at", ""), s.source))


def resolve_va(store: Store, ref: str, *, modality: str | None = None,
               keys: np.ndarray | None = None) -> VASet:
    """A source name, or a scorer/label name meaning its most recent source (of `modality`,
    with at least one row for `keys` when given)."""
    exact = VASet(store, ref) if _valid(ref) else None
    if exact is not None and exact.exists():
        return exact
    candidates = [s for s in list_va_sets(store, modality=modality)
                  if ref in (s.scorer, s.label, s.spec.get("name"))]
    if keys is not None:
        candidates = [s for s in candidates if s.has(keys).any()]
    if not candidates:
        have = ", ".join(f"{s.source} ({s.modality})" for s in list_va_sets(store)) or "none"
        raise NotFoundError(f"no VA source {ref!r}{' for ' + modality if modality else ''} in {store.root}"
                            f"{' covering these items' if keys is not None else ''}; have: {have}. "
                            "Score with `fs va score` or `fs extract --va NAME`")
    return candidates[-1]


def latest_covering(store: Store, modality: str, keys: np.ndarray) -> VASet | None:
    """The most recent source of `modality` with at least one row for `keys`."""
    for s in reversed(list_va_sets(store, modality=modality)):
        if s.has(keys).any():
            return s
    return None


def va_coverage(store: Store, dataset) -> list[dict]:
    """For each VA source of a dataset's modalities: how many of its inputs are scored."""
    rows = []
    for s in list_va_sets(store):
        col = f"{s.modality}_key"
        keys = dataset.manifest[col].drop_nulls().unique().to_numpy().astype("S32")
        if not len(keys):
            continue
        have = s.has(keys)
        failed = len({e.item_id for e in s.standing_errors(dataset)})
        if have.any() or failed:
            values, _ = s.read(keys[have])
            rows.append({"source": s.source, "modality": s.modality, "inputs": len(keys), "scored": int(have.sum()),
                         "valence": int(np.isfinite(values[:, 0]).sum()),
                         "arousal": int(np.isfinite(values[:, 1]).sum()), "failed": failed})
    return rows


def split_va(store: Store, rows, va: bool | Mapping[str, str]) -> tuple[dict, dict]:
    """VA `[N, 2]` (NaN unknown) per modality, aligned to manifest `rows`, and the source used.

    `va=True`: per modality, the most recent source with a row for any of these items
    (modalities with none are left out). A mapping names the source (or scorer/label,
    meaning its most recent source) per modality; one that cannot be found is an error.
    """
    from ..backbones.base import MODALITIES

    wanted = dict(va) if isinstance(va, Mapping) else dict.fromkeys(MODALITIES)
    values, sources = {}, {}
    for mod, ref in wanted.items():
        if mod not in MODALITIES:
            raise ConfigError(f"VA modality {mod!r} is not one of {list(MODALITIES)}")
        if f"{mod}_key" not in rows.columns:  # a manifest registered before this modality existed
            if ref is None:
                continue
            raise ConfigError(f"dataset has no {mod} inputs (no {mod}_key column); re-add it to use {mod} VA")
        keys = rows[f"{mod}_key"].fill_null("").to_numpy().astype("S32")
        if ref is None:
            found = latest_covering(store, mod, keys[keys != b""])
            if found is None:
                continue
        else:
            found = resolve_va(store, ref, modality=mod)
            if found.modality != mod:
                raise ConfigError(f"VA source {found.source} scores {found.modality}, asked for as {mod}")
        values[mod], _ = found.read(keys)
        sources[mod] = found.source
    return values, sources


def _valid(name: str) -> bool:
    try:
        check_name(name, "VA source")
        return True
    except Exception:
        return False
