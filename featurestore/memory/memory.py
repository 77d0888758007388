"""`Memory`: a FAISS index with int64 ids plus one metadata row per id (parquet) and a spec.

```
memory/<name>/index.faiss     faiss.write_index of the CPU index (flat or IVF-Flat)
memory/<name>/meta.parquet    id, item_id, dataset, modality, class, confidence, correct, pool,
                              fingerprint (+ any extra columns the builder kept)
memory/<name>/spec.json       what it was built from, index kind and parameters, measured recall
```

Vectors are L2-normalised on `add` and queries on `search`, so scores are cosine similarities;
each row's original L2 norm is kept (meta column `norm`), so `vectors(ids, raw=True)` gives the
vectors as they were added (concepts are means of raw emotion features, eq. 6).
Below `exact_max` vectors the index is exact; past it, `add` rebuilds it as IVF and tunes
`nprobe` to the target recall (measured, kept in the spec). Saving writes a new folder and
publishes it by renaming (see `publish_folder`).
"""
from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from .._io import (publish_folder, raise_if_disk_full, read_json, require_intact, tmp_path, write_checksums,
                   write_json_atomic, write_parquet)
from ..config import field, from_dict, to_dict
from ..errors import ConfigError, IntegrityError, NotFoundError
from ..store import now_iso
from . import _index

__all__ = ["Memory", "MemoryConfig", "META_COLUMNS", "publish_folder"]

META_COLUMNS = {"item_id": pl.String, "dataset": pl.String, "modality": pl.String, "class": pl.String,
                "confidence": pl.Float32, "correct": pl.Boolean, "pool": pl.Boolean, "fingerprint": pl.String,
                "norm": pl.Float32}
INDEX_FILE, META_FILE, SPEC_FILE = "index.faiss", "meta.parquet", "spec.json"


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    exact_max: int = field(50_000, "exact (flat) search up to this many vectors; IVF above it")
    nlist: int = field(0, "IVF lists (0: about 4*sqrt(n))")
    target_recall: float = field(0.95, "IVF: nprobe is raised until recall@10 vs exact reaches this")
    device: str = field("auto", "search device: auto (GPU when faiss sees one) | cpu | gpu")
    seed: int = field(0, "seed of IVF training and of the recall sample")

    def __post_init__(self):
        if self.exact_max < 0:
            raise ValueError(f"exact_max={self.exact_max} must be >= 0")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall={self.target_recall} must be in (0, 1]")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"device={self.device!r} must be auto, cpu or gpu")


class Memory:
    """Add, remove, search and persist id-keyed vectors with metadata."""

    def __init__(self, dim: int, config: MemoryConfig | None = None, *, spec: Mapping[str, Any] | None = None):
        self.dim = int(dim)
        self.config = config or MemoryConfig()
        self.spec: dict = dict(spec or {})
        self.index = _index.make_flat(self.dim)
        self.nprobe = 0
        self.recall: float | None = None  # measured recall@10 of the IVF index (None: exact)
        self.meta = pl.DataFrame(schema={"id": pl.Int64, **META_COLUMNS})
        self._search_index = None

    # ---- contents ------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        return _index.kind_of(self.index)

    def add(self, ids: Sequence[int], vectors: np.ndarray, meta: Mapping[str, Sequence] | pl.DataFrame) -> None:
        """Add rows; `meta` has one value per id for (some of) META_COLUMNS and any extra columns."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        raw = np.atleast_2d(np.asarray(vectors, np.float32)) if len(ids) else np.zeros((0, self.dim), np.float32)
        vectors = _index.normalise(raw)
        if vectors.shape != (len(ids), self.dim):
            raise ConfigError(f"memory add: {len(ids)} ids but vectors of shape {vectors.shape}; "
                              f"expected ({len(ids)}, {self.dim})")
        if len(np.unique(ids)) != len(ids):
            raise ConfigError("memory add: the same id appears twice in one call")
        clash = self.meta.filter(pl.col("id").is_in(ids.tolist()))["id"]
        if len(clash):
            raise ConfigError(f"memory add: ids already present, e.g. {clash.head(5).to_list()}; remove them first")
        rows = self._meta_frame(ids, meta).with_columns(norm=pl.Series(np.linalg.norm(raw, axis=1), dtype=pl.Float32))
        if self.kind == "flat" and len(self) + len(ids) > self.config.exact_max:
            old_ids = self.meta["id"].to_numpy()
            old = _index.reconstruct(self.index, old_ids)
            self._rebuild_ivf(np.concatenate([old_ids, ids]), np.concatenate([old, vectors]))
        else:
            self.index.add_with_ids(vectors, ids)
        self.meta = pl.concat([self.meta, rows], how="diagonal_relaxed")
        self._search_index = None

    def _meta_frame(self, ids: np.ndarray, meta) -> pl.DataFrame:
        df = meta if isinstance(meta, pl.DataFrame) else pl.DataFrame(dict(meta) if meta else {})
        if len(df.columns) and len(df) != len(ids):
            raise ConfigError(f"memory add: metadata has {len(df)} rows for {len(ids)} ids")
        cols = [pl.Series("id", ids, pl.Int64)]
        for name, dtype in META_COLUMNS.items():
            cols.append(df[name].cast(dtype) if name in df.columns else pl.Series(name, [None] * len(ids), dtype))
        extra = [df[c] for c in df.columns if c not in META_COLUMNS and c != "id"]
        return pl.DataFrame(cols + extra)

    def _rebuild_ivf(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        index = _index.make_ivf(vectors, nlist=self.config.nlist, seed=self.config.seed)
        index.add_with_ids(vectors, ids)
        self.nprobe, self.recall = _index.tune_nprobe(index, vectors, ids, target=self.config.target_recall,
                                                      seed=self.config.seed)
        index.nprobe = self.nprobe
        self.index = index

    def remove(self, ids: Sequence[int]) -> int:
        """Remove these ids (unknown ids are ignored); returns how many were removed."""
        import faiss

        ids = np.ascontiguousarray(ids, dtype=np.int64)
        ids = ids[np.isin(ids, self.meta["id"].to_numpy())]  # IVF's hash-table direct map needs known ids
        n = int(self.index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids)))) if len(ids) else 0
        self.meta = self.meta.filter(~pl.col("id").is_in(ids.tolist()))
        self._search_index = None
        return n

    def vectors(self, ids: Sequence[int], *, raw: bool = False) -> np.ndarray:
        """The stored (normalised) vectors of these ids; `raw=True`: times each row's norm, as added."""
        ids = np.asarray(ids, dtype=np.int64)
        out = _index.reconstruct(self.index, ids)
        if not raw or not len(ids):
            return out
        norms = self.meta["norm"] if "norm" in self.meta.columns else pl.Series([None], dtype=pl.Float32)
        if norms.null_count():
            raise ConfigError(f"memory {self.spec.get('name', '')!r} does not keep its vectors' norms (built before "
                              "they were kept); rebuild it: fs memory build NAME --from RUN --replace")
        known = self.meta["id"].to_numpy()
        order = np.argsort(known)
        pos = order[np.searchsorted(known, ids, sorter=order)]
        return out * norms.to_numpy()[pos, None].astype(np.float32)

    # ---- search --------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Cosine scores `[Q, k]` and ids `[Q, k]` of the k nearest rows (id -1 where fewer); a k beyond the
        rows the memory holds is that many (`fs query --k 10**12` would allocate [Q, k] arrays)."""
        queries = _index.normalise(queries)
        if queries.shape[1] != self.dim:
            raise ConfigError(f"memory search: queries are {queries.shape[1]}-d, the memory holds {self.dim}-d vectors")
        if k < 1:
            raise ConfigError(f"k={k} must be at least 1")
        if self._search_index is None:
            self._search_index = self._make_search_index()
        return self._search_index.search(queries, min(int(k), max(len(self), 1)))

    def _make_search_index(self):
        if self.kind == "ivf":
            self.index.nprobe = self.nprobe
        try:
            return _index.to_search_index(self.index, self.config.device, self.nprobe)
        except RuntimeError as exc:  # a GPU that faiss sees but cannot use: fall back, loudly
            warnings.warn(f"memory: GPU index failed ({exc}); searching on the CPU", stacklevel=3)
            return self.index

    def rows(self, ids: np.ndarray) -> list[dict | None]:
        """Metadata rows of these ids, in order (None for -1 or unknown ids)."""
        lookup = {r["id"]: r for r in self.meta.filter(pl.col("id").is_in(np.unique(ids).tolist())).iter_rows(named=True)}
        return [lookup.get(int(i)) for i in np.asarray(ids).ravel()]

    # ---- persistence ---------------------------------------------------------------
    def info(self) -> dict:
        return {"dim": self.dim, "n": len(self), "kind": self.kind, "nprobe": self.nprobe,
                "recall_at_10": self.recall, "config": to_dict(self.config)}

    def save(self, folder: str | Path, *, overwrite: bool = True) -> Path:
        """Write the whole memory to a new folder and publish it at `folder` (replacing one there, unless
        not `overwrite`: then FileExistsError, as `_io.publish_folder`)."""
        import faiss

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(folder)  # names this process: gc and verify leave a running job's folder alone
        tmp.mkdir()
        try:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            write_parquet(self.meta, tmp / META_FILE)
            write_json_atomic(tmp / SPEC_FILE, {**self.spec, "index": self.info(), "saved_at": now_iso()})
            write_checksums(tmp, [INDEX_FILE, META_FILE, SPEC_FILE])  # checked by `fs verify`
            publish_folder(tmp, folder, overwrite=overwrite)
        except Exception as exc:
            raise_if_disk_full(exc, folder)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None) -> "Memory":
        import faiss

        folder = Path(folder)
        if not (folder / SPEC_FILE).is_file():
            raise NotFoundError(f"no memory at {folder} (fs memory list; build one with fs memory build)")
        require_intact(folder, "rebuild the memory with `fs memory build ... --replace`")
        spec = read_json(folder / SPEC_FILE)
        info = spec.pop("index")
        config = from_dict(MemoryConfig, info["config"], what=str(folder / SPEC_FILE))
        if device:
            config = dataclasses.replace(config, device=device)
        mem = cls(info["dim"], config, spec={k: v for k, v in spec.items() if k != "saved_at"})
        path = folder / INDEX_FILE
        try:
            mem.index = faiss.read_index(str(path))
            path = folder / META_FILE
            mem.meta = pl.read_parquet(path)
        except (RuntimeError, OSError, pl.exceptions.PolarsError) as exc:
            raise IntegrityError(f"{path} is damaged ({' '.join(str(exc).split())[:120]}); run `fs verify`, "
                                 "then rebuild the memory with `fs memory build`") from None
        mem.nprobe, mem.recall = int(info.get("nprobe") or 0), info.get("recall_at_10")
        if mem.index.ntotal != len(mem.meta) or mem.index.d != mem.dim:
            raise IntegrityError(f"memory {folder}: the index holds {mem.index.ntotal} {mem.index.d}-d vectors but "
                                 f"meta.parquet has {len(mem.meta)} rows for {mem.dim}-d; rebuild it (fs memory build)")
        return mem
