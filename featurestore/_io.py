"""Crash-safe file publication: write beside the target, fsync, then rename over it.

A reader sees either the old file or the whole new one, never a partial write; a killed
writer leaves only a `*.tmp` file that `fs gc` removes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

from .errors import LockedError

__all__ = ["TMP_SUFFIX", "tmp_path", "publish", "write_json_atomic", "read_json", "file_lock", "json_safe"]

TMP_SUFFIX = ".tmp"


def tmp_path(target: Path) -> Path:
    """A unique temporary name in the target's folder (same filesystem, so rename is atomic)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished temporary file to its final name."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def write_json_atomic(target: Path, obj: Any) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(target)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    publish(tmp, target)


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN and inf -> None, numpy scalars -> Python, tuples -> lists."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive advisory lock, released by the kernel if the holder is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(
                f"{what} is locked by another process ({path}); wait for it to finish"
            ) from None
        yield
    finally:
        fh.close()
