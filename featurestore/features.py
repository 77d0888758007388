"""Feature sets: the cached rows of one backbone fingerprint.

```
features/<fingerprint>/spec.json     what produced the numbers (backbone, weights, adapter, ...)
features/<fingerprint>/seg-*.h5      immutable segments: keys, arrays/pooled, ragged/seq, errors
features/<fingerprint>/.lock         held while a job writes here
```
"""
from __future__ import annotations

import datetime as _dt
from typing import Sequence

import numpy as np

from .errors import ConfigError, NotFoundError
from .keyed import KeyedSet, selection_covers, selections_of
from .segments import Problem
from .store import Store, now_iso

__all__ = ["FeatureSet", "list_feature_sets", "resolve_features", "superseded_by", "feature_modalities",
           "extracted_for", "dataset_keys", "coverage"]

POOLED, SEQ = "pooled", "seq"


class FeatureSet(KeyedSet):
    """Rows of one fingerprint. Reads see only published segments."""

    what = "features with fingerprint"
    informative = ("created_at", "source", "fingerprint")

    def __init__(self, store: Store, fingerprint: str):
        super().__init__(store, fingerprint, store.feature_dir(fingerprint))
        self.fingerprint = fingerprint

    def _stamp(self) -> dict:
        return {"fingerprint": self.fingerprint, "created_at": now_iso(precise=True)}

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
            rows = len(self.index(refresh=True))  # built once: errors() below reuses it
            errors = self.errors()
            size = sum(s.path.stat().st_size for s in segs)
        return {
            "fingerprint": self.fingerprint,
            "backbone": self.backbone,
            "modality": self.modality,
            "dim": self.dim,
            "dtype": self.dtype,
            "rows": rows,
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


def extracted_for(fs: FeatureSet) -> set[str]:
    """The datasets an extraction job ran for into this feature set (its catalogue records them)."""
    try:
        return set(fs.segments.catalogue().get("datasets", {}))
    except Exception:  # a damaged catalogue: `fs verify` names it; resolution falls back to coverage
        return set()


def dataset_keys(dataset, modality: str) -> np.ndarray:
    """The distinct content keys of a dataset's `modality` inputs (`S32`)."""
    col = f"{modality}_key"
    if col not in dataset.manifest.columns:
        return np.zeros(0, "S32")
    return dataset.manifest[col].drop_nulls().unique().to_numpy().astype("S32")


def coverage(fs: FeatureSet, keys: np.ndarray) -> int:
    """How many of `keys` have a row in this feature set."""
    if not len(keys) or not len(fs.index().unique_keys()):
        return 0
    return int(fs.has(keys).sum())


def _fp_created(fs: FeatureSet) -> str:
    try:
        return fs.spec.get("created_at", "")
    except Exception:
        return ""


def _extracted_at(fs: FeatureSet, dataset: str | None) -> float:
    """When an extraction first completed for `dataset` into `fs` (epoch seconds); the feature set's
    creation time when no dataset is asked for or the catalogue predates the record."""
    if dataset is not None:
        try:
            at = fs.segments.catalogue().get("datasets", {}).get(dataset, {}).get("first_at")
        except Exception:
            at = None
        if at:
            return float(at)
    try:
        return _dt.datetime.fromisoformat(_fp_created(fs)).timestamp()
    except ValueError:
        return 0.0


def _selections(fs: FeatureSet, dataset: str) -> list:
    """What the extractions for `dataset` into `fs` selected (`keyed.selections_of`)."""
    try:
        entry = fs.segments.catalogue().get("datasets", {}).get(dataset) or {}
    except Exception:  # a damaged catalogue: `fs verify` names it; treat it as everything
        entry = {}
    return selections_of(entry)


def _covers(new: FeatureSet, old: FeatureSet, dataset: str) -> bool:
    """Whether the extractions for `dataset` into `new` selected at least the items those into `old`
    did: a `--limit 20` try of other parameters does not supersede a whole extraction."""
    have = _selections(new, dataset)
    return all(any(selection_covers(a, b) for a in have) for b in _selections(old, dataset))


def superseded_by(store: Store, fingerprint: str, dataset: str | None = None) -> str | None:
    """The newest fingerprint of the same backbone and modality extracted for `dataset` after this one.

    A fingerprint is superseded only for a dataset: extracting another dataset (or a toy one with
    other parameters) never makes runs on this one stale, and the order is that of the extractions
    for `dataset` (not of the fingerprints' creation). A newer extraction counts only if it selected
    at least the items this one did (its `--split`s and `--limit`, `_covers`). Without `dataset`, any
    newer extraction counts.
    """
    fs = FeatureSet(store, fingerprint)
    if not fs.exists():
        return None
    mine = fs.spec
    since = _extracted_at(fs, dataset)
    newer = sorted((_extracted_at(o, dataset), o.fingerprint) for o in list_feature_sets(store)
                   if o.fingerprint != fingerprint and o.backbone == mine["backbone"]
                   and o.modality == mine["modality"] and (dataset is None or dataset in extracted_for(o))
                   and (dataset is None or _covers(o, fs, dataset)))
    newer = [fp for at, fp in newer if at > since]
    return newer[-1] if newer else None


def feature_modalities(store: Store, ref: str) -> list[str]:
    """The modalities a fingerprint or backbone name has features for in the store (sorted)."""
    fs = FeatureSet(store, ref)
    if fs.exists():
        return [fs.modality]
    return sorted({f.modality for f in list_feature_sets(store) if f.backbone == ref})


def resolve_features(store: Store, ref: str, *, modality: str | None = None, dataset=None) -> FeatureSet:
    """A fingerprint, or a backbone name meaning the fingerprint of that backbone that covers `dataset`.

    `dataset` (a `Dataset` or its name) picks, among the fingerprints of backbone `ref`, the one holding
    rows for the dataset's inputs; when several do, the one an extraction ran for on that dataset
    (`fs extract --dataset`). Never "the newest in the store": a fingerprint extracted for another
    dataset does not change what a name means here. Still several: a `ConfigError` listing each with
    its coverage and the full fingerprint to pass. Without `dataset`, a name must have one fingerprint.
    """
    fs = FeatureSet(store, ref)
    if fs.exists():
        if modality is not None and fs.modality != modality:
            raise ConfigError(f"features {ref!r} are {fs.modality} features, asked for as {modality}; "
                              f"pass {fs.modality}={ref}")
        return fs
    every = list_feature_sets(store)
    candidates = [f for f in every if f.backbone == ref and (modality is None or f.modality == modality)]
    what = f"features {ref!r}{' for ' + modality if modality else ''}"
    if not candidates:
        named = [f for f in every if f.backbone == ref]
        if named:
            raise ConfigError(f"{what}: {ref} has only {', '.join(sorted({f.modality for f in named}))} features "
                              f"in {store.root}; pass MODALITY={ref} with that modality")
        known = sorted({f"{f.backbone} ({f.fingerprint})" for f in every})
        raise NotFoundError(f"no {what} in {store.root}; have: {', '.join(known) or 'none'}. "
                            "Extract them with `fs extract`")
    if dataset is None:
        if len(candidates) == 1:
            return candidates[0]
        raise ConfigError(f"{what} names {len(candidates)} fingerprints: "
                          f"{', '.join(f'{f.modality}={f.fingerprint}' for f in candidates)}; pass the one you mean "
                          f"(its fingerprint, or MODALITY={ref} where the modalities differ)")
    if len(candidates) == 1:  # one fingerprint of that name: whether it covers the dataset shows on reading
        return candidates[0]
    if isinstance(dataset, str):
        from .datasets import get_dataset

        dataset = get_dataset(store, dataset)
    keys = {m: dataset_keys(dataset, m) for m in {f.modality for f in candidates}}
    have = {f.fingerprint: coverage(f, keys[f.modality]) for f in candidates}
    pool = [f for f in candidates if have[f.fingerprint]]
    if len(pool) == 1:
        return pool[0]
    extracted = [f for f in pool if dataset.name in extracted_for(f)]  # an extraction ran for this dataset
    if len(extracted) == 1:
        return extracted[0]
    listing = "; ".join(f"{f.fingerprint} ({f.modality}, {have[f.fingerprint]}/{len(keys[f.modality])} inputs of "
                        f"{dataset.name!r} cached, {_describe(f, candidates)})" for f in (extracted or candidates))
    if not pool:
        raise NotFoundError(f"no {what} cover dataset {dataset.name!r} (fingerprints of {ref}: {listing}); "
                            f"extract them first: fs extract --dataset {dataset.name} --modality "
                            f"{candidates[0].modality} --backbone {ref}")
    pool = extracted or pool
    raise ConfigError(f"{what} is ambiguous for dataset {dataset.name!r}: {len(pool)} fingerprints cover it: "
                      f"{listing}; pass the one you mean, e.g. --features {pool[0].modality}={pool[0].fingerprint}")


def _describe(fs: FeatureSet, others: Sequence[FeatureSet]) -> str:
    """What tells a fingerprint apart from `others`: the config values that differ, and when it was made."""
    def flat(f: FeatureSet) -> dict:
        try:
            spec = f.spec
        except Exception:
            return {}
        cfg = {k: v for k, v in spec.get("config", {}).items() if not k.startswith("_")}
        return {**cfg, "model": (spec.get("source") or {}).get("model"),
                "adapter": (spec.get("source") or {}).get("adapter")}

    mine, theirs = flat(fs), [flat(o) for o in others]
    differ = sorted(k for k in mine if any(t.get(k) != mine[k] for t in theirs))
    parts = [f"{k}={mine[k]}" for k in differ]
    return ", ".join(parts + [f"created {_fp_created(fs) or '?'}"])
