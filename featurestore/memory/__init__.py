"""The replay memory: FAISS over SCL emotion features, with per-(modality, class) replay pools.

    mem = open_memory(store, "affect")         # store/memory/affect/
    scores, ids = mem.search(queries, k=5)      # cosine, exact or IVF by size
    mem.rows(ids[0])                            # item_id, dataset, modality, class, confidence, ...

`jobs.build_memory` fills one from a trained `scl` run; docs/concepts.md describes the layout.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import NotFoundError
from ..store import Store, check_name
from .memory import META_COLUMNS, Memory, MemoryConfig, publish_folder
from .pools import mark_pools, pool_counts

__all__ = ["Memory", "MemoryConfig", "META_COLUMNS", "publish_folder", "mark_pools", "pool_counts",
           "memory_path", "open_memory", "memory_folder", "list_memories"]


def memory_path(store: Store, name: str) -> Path:
    return store.memory_dir() / check_name(name, "memory")


def open_memory(store: Store, name_or_path: str | Path, *, device: str | None = None) -> Memory:
    """A memory by name in `store`, or by folder path."""
    return Memory.load(memory_folder(store, name_or_path), device=device)


def memory_folder(store: Store, name_or_path: str | Path) -> Path:
    """The folder of a memory given by name in `store` or by path; a clear error if there is none."""
    path = Path(name_or_path)
    if not (path / "spec.json").is_file():
        path = memory_path(store, str(name_or_path))
        if not (path / "spec.json").is_file():
            known = ", ".join(list_memories(store)) or "none"
            raise NotFoundError(f"memory {str(name_or_path)!r} is not in {store.memory_dir()}; known: {known} "
                                "(build one with `fs memory build NAME --from RUN`)")
    return path


def list_memories(store: Store) -> list[str]:
    root = store.memory_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / "spec.json").is_file())
