"""Keys a live job is computing but has not published yet, so that concurrent jobs writing the
same rows (two datasets sharing inputs, two shards) skip them instead of computing them twice.

Each job keeps one file `.claims/<pid>-<random>.keys` (one key a line) and holds an exclusive
lock on it for its whole life: a file whose lock can be taken belongs to a dead job and is
removed. Reads and rewrites of claim files happen under `.claims/.lock`, and a job clears its
claims only after publishing the rows, so a key is always either claimed or published.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ._io import file_lock, try_lock

__all__ = ["Claims"]


class Claims:
    def __init__(self, folder: Path):
        self.dir = Path(folder) / ".claims"
        self.mine: set[str] = set()
        self.path = self.dir / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.keys"
        self._fh = None

    def __enter__(self) -> "Claims":
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w+")
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        with self._guard():
            self.path.unlink(missing_ok=True)
            self._fh.close()

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        with file_lock(self.dir / ".lock", f"claims in {self.dir}", wait=True):
            yield

    def _others(self) -> set[str]:
        taken: set[str] = set()
        for path in self.dir.glob("*.keys"):
            if path == self.path:
                continue
            dead = try_lock(path)
            if dead is not None:  # its owner was killed: the kernel released its lock
                path.unlink(missing_ok=True)
                dead.close()
                continue
            taken.update(path.read_text().split())
        return taken

    def claim(self, keys: Iterable[str], published: Callable[[list[str]], list[bool]]) -> tuple[list[str], list[str]]:
        """(keys this job should compute now, keys another live job is computing).

        Keys already published (by anyone) are in neither list."""
        with self._guard():
            taken = self._others()
            keys = list(keys)
            theirs = [k for k in keys if k in taken]
            free = [k for k in keys if k not in taken]
            mine = [k for k, done in zip(free, published(free)) if not done]
            self.mine.update(mine)
            self._write()
        return mine, theirs

    def release(self, keep: Iterable[str] = ()) -> None:
        """Call after publishing: the rows are now visible, the claims are no longer needed (but for
        `keep`: keys still being worked on, e.g. failures held back and not yet recorded)."""
        with self._guard():
            self.mine = set(keep) & self.mine
            self._write()

    def _write(self) -> None:
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write("\n".join(sorted(self.mine)))
        self._fh.flush()
