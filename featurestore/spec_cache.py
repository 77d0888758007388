"""Remembered backbone specs, so a finished extraction can be recognised without loading a model.

A backbone's fingerprint needs its weights digest, which needs the weight files read and
usually the model loaded. For a model in a local folder, the resolved spec is remembered
in `<store>/cache/specs/`, keyed by the backbone, its config and the (path, size, mtime) of
every file of the model and adapter folders: any change to those files misses the cache.
Hub ids are not remembered (the local hub cache can change under the same id).
"""
from __future__ import annotations

from pathlib import Path

from . import __version__
from ._io import read_json, write_json_atomic
from .config import to_dict
from .errors import DiskFullError
from .hashing import spec_digest
from .store import ROW_FORMAT, Store

__all__ = ["lookup", "remember", "forget"]


def _files(folder: str) -> list | None:
    root = Path(folder).expanduser() if folder else None
    if root is None or not root.is_dir():
        return None
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*") if p.is_file())


def _key(bb) -> str | None:
    model = _files(bb.model_ref)
    if model is None:
        return None
    adapter = _files(bb.config.adapter) if bb.config.adapter else []
    if adapter is None:
        return None
    config = {k: v for k, v in to_dict(bb.config).items() if k != "_version"}
    return spec_digest({"backbone": bb.name, "class": type(bb).__qualname__, "config": config,
                        "model": [str(Path(bb.model_ref).expanduser().resolve()), model],
                        "adapter": adapter, "store_format": ROW_FORMAT, "featurestore": __version__}, 32)


def _path(store: Store, key: str) -> Path:
    return store.cache_dir() / "specs" / f"{key}.json"


def lookup(store: Store, bb) -> dict | None:
    """The remembered spec of backbone `bb` as configured, or None."""
    key = _key(bb)
    if key is None or not _path(store, key).is_file():
        return None
    try:
        return read_json(_path(store, key))
    except (OSError, ValueError):
        return None  # a damaged cache entry is only a miss


def remember(store: Store, bb, spec: dict) -> None:
    key = _key(bb)
    if key is not None:
        try:
            write_json_atomic(_path(store, key), spec)
        except (OSError, DiskFullError):
            pass  # only a cache: the next run resolves the spec by loading the model again


def forget(store: Store, bb) -> None:
    key = _key(bb)
    if key is not None:
        _path(store, key).unlink(missing_ok=True)
