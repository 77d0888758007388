"""`fs memory build NAME --from RUN`: the replay memory of a trained SCL run.

Every labelled row of the run's training datasets goes in, per modality, as its SCL emotion
feature (read from the derived feature set the run wrote), with metadata: item id, dataset,
modality, class, confidence (the encoder's probability of the true class), whether the encoder
classified it correctly, the fingerprint, and `pool`: in the top p% (default 20%) of the
correctly classified rows of its (modality, class) by confidence, topped up to a floor of
`min_pool` rows (default 8) while the class has them (featurestore/memory/pools.py). Concepts
sample from the pools; queries search every row.
"""
from __future__ import annotations

import dataclasses
import time
import warnings

import numpy as np
import polars as pl

from featurestore.config import field, to_dict
from featurestore.errors import ConfigError
from featurestore.memory import Memory, MemoryConfig, mark_pools, memory_path, pool_counts
from featurestore.reader import load_split
from featurestore.store import Store, check_name, now_iso

from .train_scl import load_run

__all__ = ["BuildMemoryConfig", "BuildMemoryResult", "run", "exemplar_meta", "assemble"]


@dataclasses.dataclass(frozen=True)
class BuildMemoryConfig:
    name: str = field("", "memory name (folder under memory/)")
    run: str = field("", "trained scl run (fs scl train)")
    split: str = field("", "split whose rows fill the memory (default: the split the run trained on)")
    top_p: float = field(0.2, "pool size: top fraction of correctly classified rows per (modality, class)")
    min_pool: int = field(8, "pool floor: at least this many rows per (modality, class), or all it has")
    exact_max: int = field(50_000, "exact search up to this many vectors, IVF above")
    nlist: int = field(0, "IVF lists (0: about 4*sqrt(n))")
    target_recall: float = field(0.95, "IVF nprobe is tuned until recall@10 vs exact reaches this")
    replace: bool = field(False, "overwrite an existing memory of the same name")

    def __post_init__(self):
        check_name(self.name, "memory")
        if not self.run:
            raise ConfigError("memory build needs --from RUN, a trained scl run (fs scl train)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.min_pool < 1:
            raise ConfigError(f"min_pool={self.min_pool} must be at least 1")


@dataclasses.dataclass
class BuildMemoryResult:
    name: str
    folder: str
    n: int
    kind: str
    nprobe: int
    recall_at_10: float | None
    pools: dict
    empty_pools: list
    seconds: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def exemplar_meta(head, modality: str, emo: np.ndarray, y: np.ndarray, **columns) -> pl.DataFrame:
    """Memory metadata of one modality's labelled rows: class, the encoder's confidence in it, whether
    it classified the row correctly, its prediction, plus `columns` (item_id, dataset, ...)."""
    classes = head.meta_["classes"]
    proba = head.proba_of(modality, emo)
    return pl.DataFrame({
        **columns, "modality": modality, "class": [classes[i] for i in y],
        "confidence": proba[np.arange(len(y)), y].astype(np.float32), "correct": proba.argmax(1) == y,
        "predicted": [classes[i] for i in proba.argmax(1)],
    })


def _rows(head, lineage: dict, store: Store, split: str) -> tuple[np.ndarray, pl.DataFrame]:
    index = {c: i for i, c in enumerate(head.meta_["classes"])}
    vecs, frames = [], []
    for src in lineage["sources"]:
        for m in src["modalities"]:
            fp = lineage["derived"][m]
            data = load_split(store, src["dataset"], split, {m: fp}, allow_empty=True)
            keep = data.masks[m] & np.array([lab in index for lab in data.label], bool)
            if not keep.any():
                continue
            vecs.append(data.features[m][keep])
            frames.append(exemplar_meta(head, m, vecs[-1], np.array([index[lab] for lab in data.label[keep]]),
                                        item_id=data.item_ids[keep].astype(str), dataset=src["dataset"],
                                        fingerprint=fp, split=split))
    if not frames:
        raise ConfigError(f"run {lineage['run']!r}: no labelled rows with SCL features in split {split!r}")
    return np.concatenate(vecs), pl.concat(frames)


def assemble(vecs: np.ndarray, meta: pl.DataFrame, config: BuildMemoryConfig, spec: dict
             ) -> tuple[Memory, dict, list]:
    """Mark the pools and fill a Memory; returns it, the pool sizes and the (modality, class) pools left empty."""
    meta = mark_pools(meta, config.top_p, config.min_pool)
    counts = pool_counts(meta)
    empty = [[m, c] for m, per in counts.items() for c, n in per.items() if n == 0]
    for m, c in empty:
        warnings.warn(f"memory {config.name!r}: the pool of class {c!r} in modality {m!r} is empty; concepts use "
                      "the class's other modalities, or all of its rows (docs/concepts.md)", stacklevel=2)
    spec = {**spec, "top_p": config.top_p, "min_pool": config.min_pool, "pools": counts, "build": to_dict(config)}
    mem = Memory(vecs.shape[1], MemoryConfig(exact_max=config.exact_max, nlist=config.nlist,
                                             target_recall=config.target_recall), spec=spec)
    mem.add(np.arange(len(vecs), dtype=np.int64), vecs, meta)
    return mem, counts, empty


def run(config: BuildMemoryConfig, store: Store, *, log=lambda s: None, progress=None) -> BuildMemoryResult:
    """Build memory `config.name` from an scl run. `progress` (a tqdm-like factory, or None) shows
    the stages: reading the run's rows, building the index (and measuring its recall), saving."""
    t0 = time.perf_counter()
    folder = memory_path(store, config.name)
    if folder.exists() and not config.replace:
        raise ConfigError(f"memory {config.name!r} already exists ({folder}); pass --replace to rebuild it")
    bar = progress(total=3, desc=f"memory {config.name}", unit="stage") if progress is not None else None

    def stage(name: str) -> None:
        if bar is not None:
            bar.set_postfix_str(name, refresh=False)
            bar.update(0 if bar.n == 0 and name.startswith("reading") else 1)

    try:
        stage("reading rows")
        head, lineage = load_run(store, config.run)
        split = config.split or lineage.get("split", "train")
        vecs, meta = _rows(head, lineage, store, split)
        spec = {
            "name": config.name, "run": config.run, "encoder_hash": lineage["encoder_hash"], "split": split,
            "fingerprints": lineage["derived"], "source_fingerprints": lineage["fingerprints"],
            "classes": head.meta_["classes"], "coarse_map": head.coarse_map, "sources": lineage["sources"],
            "created_at": now_iso(),
        }
        stage(f"indexing {len(vecs)} vectors")
        mem, counts, empty = assemble(vecs, meta, config, spec)
        from featurestore._io import file_lock

        stage("saving")
        with file_lock(store.memory_dir() / f".{config.name}.lock", f"memory {config.name}"):
            try:
                mem.save(folder, overwrite=config.replace)
            except FileExistsError:  # another build of the same name saved it while this one built
                raise ConfigError(f"memory {config.name!r} already exists ({folder}; another job saved it while this "
                                  "one built, and it is kept); pass --replace to rebuild it") from None
        if bar is not None:
            bar.update(bar.total - bar.n)
    finally:
        if bar is not None:
            bar.close()
    pools = "; ".join(f"{m}: " + ", ".join(f"{c} {n}" for c, n in per.items()) for m, per in counts.items())
    log(f"memory {config.name}: {len(mem)} vectors ({mem.kind}), pools {pools}")
    return BuildMemoryResult(config.name, str(folder), len(mem), mem.kind, mem.nprobe, mem.recall, counts, empty,
                             round(time.perf_counter() - t0, 3))
