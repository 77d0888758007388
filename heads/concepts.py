"""Supramodal emotion concepts (paper 000, eq. 6), sampled from a replay memory.

For an item of class y: from each available modality's pool of y, draw k features at random,
average them, then average over the modalities that have a pool for y:

    f_ec = 1/|M| sum_m 1/k sum_j f_m_j^emo

Vectorised over a batch (one gather of `[M, B, k, D]`), seeded by a numpy Generator.

Modes (the paper's ablations):

- `replay`: the above; pools are the top-p% correctly classified rows (the memory's `pool`).
- `no_selectivity`: draw from all of the class's rows in the memory, not only its pool.
- `no_generalisation`: one random feature (of one random available modality) instead of a mean.

Features are the memory's raw emotion features (`Memory.vectors(raw=True)`), not the normalised
search vectors, so the mean is eq. 6's and lambda weighs the distance eq. 7 prints.

Which memory rows belong to a target class, per modality: rows labelled with it; else rows whose
label is the same emotion through the synonym table (`featurestore.va.labels.canonical_label`:
case-insensitive, `joy` = `happy`, `sadness` = `sad`); else rows whose coarse label (the memory's
`coarse_map`) is it, so a `positive` target draws on `happy` images. Pools have a floor of rows
(featurestore/memory/pools.py), so a class with rows has a pool; a memory built without one may
still have an empty pool: that class's concept then uses all its rows (as `no_selectivity`) with a
warning. A class with no rows at all has no concept (a warning; `valid` is False for its items,
and the concept head trains them on cross-entropy alone); when no class has one, building the
bank fails.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np
import polars as pl

from featurestore.errors import ConfigError
from featurestore.va.labels import canonical_label

__all__ = ["MODES", "ConceptBank"]

MODES = ("replay", "no_selectivity", "no_generalisation")


@dataclasses.dataclass
class ConceptBank:
    """Pool vectors grouped by (modality, class): `flat[offsets[m, c] : offsets[m, c] + counts[m, c]]`."""

    classes: list[str]
    modalities: list[str]
    flat: np.ndarray  # [R, D] float32
    offsets: np.ndarray  # [M, C] int64
    counts: np.ndarray  # [M, C] int64
    fallbacks: dict = dataclasses.field(default_factory=dict)  # class -> "all rows" | "none"

    @property
    def dim(self) -> int:
        return int(self.flat.shape[1])

    @property
    def valid(self) -> np.ndarray:
        """[C] whether each class has a concept."""
        return self.counts.sum(0) > 0

    # ---- building ------------------------------------------------------------------
    @classmethod
    def from_groups(cls, classes: Sequence[str], groups: dict[tuple[str, str], np.ndarray], dim: int,
                    fallbacks: dict | None = None) -> "ConceptBank":
        """From `(modality, class) -> [n, D]` arrays (missing pairs: empty)."""
        mods = sorted({m for m, _ in groups})
        counts = np.zeros((len(mods), len(classes)), np.int64)
        parts = []
        for i, m in enumerate(mods):
            for j, c in enumerate(classes):
                arr = groups.get((m, c))
                if arr is not None and len(arr):
                    parts.append(np.asarray(arr, np.float32))
                    counts[i, j] = len(arr)
        offsets = (np.cumsum(counts.ravel()) - counts.ravel()).reshape(counts.shape)
        flat = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return cls(list(classes), mods, np.ascontiguousarray(flat), offsets, counts, dict(fallbacks or {}))

    @classmethod
    def from_memory(cls, memory, classes: Sequence[str], *, selective: bool = True) -> "ConceptBank":
        """Rows of a `featurestore.memory.Memory` per (modality, target class); see the module doc."""
        meta = memory.meta
        coarse = {str(k).lower(): v for k, v in (memory.spec.get("coarse_map") or {}).items()}
        meta = meta.with_columns(
            coarse=pl.col("class").map_elements(lambda c: coarse.get(str(c).lower()), return_dtype=pl.String),
            canonical=pl.col("class").map_elements(canonical_label, return_dtype=pl.String))
        ids: dict[tuple[str, str], np.ndarray] = {}
        fallbacks = {}
        known = sorted(meta["class"].unique().drop_nulls().to_list())
        for c in classes:
            chosen = _rows_of(meta, c, selective)
            if selective and not chosen:
                chosen = _rows_of(meta, c, False)
                if chosen:
                    fallbacks[c] = "all rows"
            if not chosen:
                fallbacks[c] = "none"
            for m, rows in chosen.items():
                ids[(m, c)] = rows
        if not ids:
            raise ConfigError(f"none of the classes {list(classes)} matches a class of memory "
                              f"{memory.spec.get('name', '')!r} ({known}) by name, synonym or coarse_map; "
                              "build the memory from an scl run trained on these labels")
        for c, why in fallbacks.items():
            warnings.warn(f"class {c!r} has an empty replay pool in every modality of the memory; its concept "
                          "falls back to all of its rows (no selectivity)" if why == "all rows" else
                          f"class {c!r} has no rows in the memory (classes there: {known}); it gets no concept",
                          stacklevel=2)
        all_ids = np.concatenate(list(ids.values()))
        vecs = memory.vectors(all_ids, raw=True)
        groups, start = {}, 0
        for key, rows in ids.items():
            groups[key] = vecs[start:start + len(rows)]
            start += len(rows)
        return cls.from_groups(list(classes), groups, memory.dim, fallbacks)

    # ---- concepts ------------------------------------------------------------------
    def sample(self, y: np.ndarray, rng: np.random.Generator, *, k: int = 8, mode: str = "replay"
               ) -> tuple[np.ndarray, np.ndarray]:
        """Concepts `[B, D]` for class indices `y` `[B]`, and which items have one `[B]`.

        `mode` `no_selectivity` changes what the bank holds (build it with selective=False), so here
        it samples like `replay`."""
        if mode not in MODES:
            raise ConfigError(f"concept mode {mode!r} is not one of {list(MODES)}")
        if k < 1:
            raise ConfigError(f"k={k} must be at least 1")
        y = np.asarray(y, np.int64)
        counts, offsets = self.counts[:, y], self.offsets[:, y]  # [M, B]
        avail = counts > 0
        valid = avail.any(0)
        if mode == "no_generalisation":
            return self._one_feature(counts, offsets, avail, valid, rng), valid
        u = rng.random((len(self.modalities), len(y), k))
        idx = offsets[..., None] + np.minimum((u * counts[..., None]).astype(np.int64),
                                              np.maximum(counts[..., None] - 1, 0))
        idx = np.minimum(idx, max(len(self.flat) - 1, 0))  # empty groups point anywhere; masked below
        per_mod = self.flat[idx].mean(2) if len(self.flat) else np.zeros((*idx.shape[:2], self.dim), np.float32)
        per_mod *= avail[..., None]
        concept = per_mod.sum(0) / np.maximum(avail.sum(0), 1)[:, None]
        return concept.astype(np.float32), valid

    def _one_feature(self, counts, offsets, avail, valid, rng) -> np.ndarray:
        n_avail = avail.sum(0)
        pick = (rng.random(len(n_avail)) * np.maximum(n_avail, 1)).astype(np.int64)  # which available modality
        order = np.cumsum(avail, 0) - 1
        m = np.argmax(avail & (order == pick[None]), 0)
        cols = np.arange(len(n_avail))
        cnt = counts[m, cols]
        row = offsets[m, cols] + np.minimum((rng.random(len(cnt)) * cnt).astype(np.int64), np.maximum(cnt - 1, 0))
        row = np.minimum(row, max(len(self.flat) - 1, 0))
        out = self.flat[row] if len(self.flat) else np.zeros((len(cnt), self.dim), np.float32)
        return np.where(valid[:, None], out, 0).astype(np.float32)

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic class concepts `[C, D]` (eq. 6 over every pool member) and validity `[C]`."""
        M, C = self.counts.shape
        per_mod = np.zeros((M, C, self.dim), np.float32)
        for i in range(M):
            for j in range(C):
                n = self.counts[i, j]
                if n:
                    per_mod[i, j] = self.flat[self.offsets[i, j]:self.offsets[i, j] + n].mean(0)
        avail = self.counts > 0
        concept = per_mod.sum(0) / np.maximum(avail.sum(0), 1)[:, None]
        return concept, self.valid

    def similarity(self, emo: np.ndarray) -> np.ndarray:
        """Cosine similarity `[N, C]` of emotion features to each class concept (`means`); NaN for a
        class without one. This is how `fs query` ranks emotions."""
        from featurestore.memory._index import normalise

        concepts, valid = self.means()
        sims = normalise(np.asarray(emo, np.float32)) @ normalise(concepts).T
        sims[:, ~valid] = np.nan
        return sims


def _rows_of(meta: pl.DataFrame, cls: str, selective: bool) -> dict[str, np.ndarray]:
    """modality -> memory ids for target class `cls` (exact label, else synonym, else coarse label), pool only
    if asked."""
    if selective:
        meta = meta.filter(pl.col("pool"))
    out = {}
    for m in sorted(meta["modality"].unique().drop_nulls().to_list()):
        sub = meta.filter(pl.col("modality") == m)
        rows = sub.filter(pl.col("class") == cls)
        if not len(rows):
            rows = sub.filter(pl.col("canonical") == canonical_label(cls))
        if not len(rows):
            rows = sub.filter(pl.col("coarse") == cls)
        if len(rows):
            out[m] = rows["id"].to_numpy().astype(np.int64)
    return out
