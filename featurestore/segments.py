"""Immutable, content-addressed HDF5 segments of keyed rows.

A *segment set* is one folder of `seg-<sha256>.h5` files. Each segment holds

- `keys`            fixed-width ASCII content keys, `[N]`
- `arrays/<name>`   dense rows aligned to `keys`, `[N, ...]` (e.g. `pooled`, `va`)
- `ragged/<name>/data` + `ragged/<name>/offsets`  variable-length rows (e.g. token or
  frame sequences): row i is `data[offsets[i]:offsets[i+1]]`
- `errors/*`        items of the same batch that failed, with their reason

Segments are built in memory (HDF5 never writes to the disk itself, so a full disk is a
clean error, not a crash inside the library), written to a temporary file and published by
an atomic rename to a name that is the SHA-256 of their bytes, so a reader only ever sees
whole segments, a killed writer loses only what it had not yet published, and `verify`
detects any flipped byte. Plain h5py or h5dump can read every file.

`catalogue.json` lists every published segment (rows, full SHA-256), so a deleted,
truncated or replaced segment is caught; it is rewritten atomically under a short lock.
Readers hold a shared lock (`.read.lock`) while they list and read; compaction deletes the
segments it merged only under the exclusive lock, and otherwise leaves them "retired"
(listed in the catalogue, ignored by readers) for the next `gc`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from . import __version__
from ._io import (TMP_SUFFIX, cleaned_on_failure, file_lock, publish, read_json, sha256_file, tmp_path, try_lock,
                  write_json_atomic, writer_alive, writer_running_here)
from .errors import FeatureStoreError, IntegrityError
from .hashing import KEY_BYTES, canonical_json

__all__ = ["SegmentSet", "SegmentWriter", "Segment", "ErrorRecord", "Problem", "KEY_DTYPE", "KeyIndex",
           "key_prefix64", "CATALOGUE"]

KEY_DTYPE = np.dtype(f"S{KEY_BYTES}")
_STR = h5py.string_dtype("utf-8")
_PREFIX, _SUFFIX = "seg-", ".h5"
CATALOGUE = "catalogue.json"
_CATALOGUE_DIGEST = "sha256"  # of the rest of the catalogue's canonical JSON: a flipped digit is caught too
_DELETE_WAIT_S = 5.0  # how long compaction waits for readers before leaving old segments retired


def _catalogue_digest(doc: dict) -> str:
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ErrorRecord:
    """One input that could not be turned into a row, and why."""

    key: str  # content key; "" when the input could not even be read
    dataset: str
    item_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Problem:
    """A finding of `verify`."""

    path: str
    message: str


def _as_keys(keys: Sequence[str] | np.ndarray) -> np.ndarray:
    arr = np.asarray(keys, dtype=KEY_DTYPE)
    return arr


class Segment:
    """Read access to one published segment file."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def digest(self) -> str:
        return self.path.name[len(_PREFIX):-len(_SUFFIX)]

    def open(self) -> h5py.File:
        try:
            return h5py.File(self.path, "r")
        except FileNotFoundError:
            raise IntegrityError(f"segment {self.path} is missing; run `fs verify` to see what was lost, "
                                 "then `fs extract` again to recompute its rows") from None
        except OSError as exc:
            raise IntegrityError(f"segment {self.path} is damaged ({exc}); run `fs verify`, delete it and "
                                 "re-run `fs extract` to recompute its rows") from None

    def keys(self) -> np.ndarray:
        with self.open() as f:
            return f["keys"][...]

    def errors(self) -> list[ErrorRecord]:
        with self.open() as f:
            if "errors" not in f:
                return []
            g = f["errors"]
            cols = [g[c].asstr()[...] if c != "keys" else g[c][...].astype(str) for c in
                    ("keys", "datasets", "item_ids", "reasons")]
            return [ErrorRecord(*row) for row in zip(*cols)]


class SegmentWriter:
    """Accumulates rows in memory and publishes them as segments.

    `flush()` publishes whatever is buffered as one segment; the caller decides when
    (every N rows or T seconds) so that a kill loses at most that much work.
    """

    def __init__(self, segset: "SegmentSet", *, dtypes: Mapping[str, str], shapes: Mapping[str, tuple] | None = None,
                 attrs: Mapping | None = None):
        self.segset = segset
        self.dtypes = dict(dtypes)
        self.shapes = dict(shapes or {})  # row shape of each dense array: written even when a segment has 0 rows
        self.attrs = dict(attrs or {})
        self._reset()

    def _reset(self) -> None:
        self._keys: list[str] = []
        self._dense: dict[str, list[np.ndarray]] = {}
        self._ragged: dict[str, list[np.ndarray]] = {}
        self._errors: list[ErrorRecord] = []

    @property
    def pending_rows(self) -> int:
        return len(self._keys) + len(self._errors)

    @property
    def pending_keys(self) -> list[str]:
        return list(self._keys)

    def add(self, keys: Sequence[str], dense: Mapping[str, np.ndarray] | None = None,
            ragged: Mapping[str, Sequence[np.ndarray]] | None = None) -> None:
        n = len(keys)
        for name, arr in (dense or {}).items():
            if len(arr) != n:
                raise ValueError(f"array {name!r} has {len(arr)} rows for {n} keys")
            self._dense.setdefault(name, []).append(np.asarray(arr, dtype=self.dtypes[name]))
        for name, rows in (ragged or {}).items():
            if len(rows) != n:
                raise ValueError(f"ragged {name!r} has {len(rows)} rows for {n} keys")
            self._ragged.setdefault(name, []).extend(np.asarray(r, dtype=self.dtypes[name]) for r in rows)
        self._keys.extend(keys)

    def add_errors(self, errors: Iterable[ErrorRecord]) -> None:
        self._errors.extend(errors)

    def flush(self) -> Path | None:
        if not self.pending_rows:
            return None
        dense = {k: np.empty((0, *shape), self.dtypes[k]) for k, shape in self.shapes.items()}
        dense.update({k: np.concatenate(v) for k, v in self._dense.items()})
        path = self.segset.write(self._keys, dense, self._ragged, self._errors, attrs=self.attrs)
        self._reset()
        return path


class SegmentSet:
    """A folder of published segments that share one row schema."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    # ---- the catalogue -------------------------------------------------------------
    @property
    def catalogue_path(self) -> Path:
        return self.folder / CATALOGUE

    def catalogue(self) -> dict:
        """{"segments": {name: {rows, errors, sha256}}, "retired": [names], "datasets": {...}}."""
        doc = read_json(self.catalogue_path) if self.catalogue_path.is_file() else {}
        if not isinstance(doc, dict):
            raise IntegrityError(f"{self.catalogue_path} is damaged (not a JSON object); run `fs verify`")
        digest = doc.pop(_CATALOGUE_DIGEST, None)
        if digest is not None and digest != _catalogue_digest(doc):
            raise IntegrityError(f"{self.catalogue_path} is damaged (its content does not match its SHA-256); "
                                 "restore it from a backup, or delete it, run `fs gc` (it rebuilds the segment list) and re-run "
                                 "`fs extract` for the datasets extracted into it (it re-records what they need)")
        for key, empty in (("segments", {}), ("retired", []), ("datasets", {})):
            doc.setdefault(key, empty)
        return doc

    def _catalogue_lock(self):
        return file_lock(self.folder / ".catalogue.lock", f"catalogue of {self.folder}", wait=True)

    @contextlib.contextmanager
    def update_catalogue(self, *, on_failure: Callable[[], None] | None = None) -> Iterator[dict]:
        """Read, change and atomically rewrite the catalogue, one process at a time. `on_failure` runs,
        still under the lock, if the rewrite fails (then the exception goes on)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._catalogue_lock():
            doc = self.catalogue()
            yield doc
            try:
                write_json_atomic(self.catalogue_path, {**doc, _CATALOGUE_DIGEST: _catalogue_digest(doc)})
            except BaseException:
                if on_failure is not None:
                    with contextlib.suppress(Exception):
                        on_failure()
                raise

    def adopt_orphans(self) -> list[str]:
        """Register sound segments missing from the catalogue (a job killed between publishing a
        segment and registering it, or a store written before catalogues existed)."""
        known = self.catalogue()
        orphans = [p for p in self._files() if p.name not in known["segments"] and p.name not in known["retired"]]
        entries = {}
        for path in orphans:
            entry = _describe(Segment(path))
            if entry is not None:
                entries[path.name] = entry
        if entries:
            with self.update_catalogue() as doc:
                doc["segments"].update(entries)
        return sorted(entries)

    # ---- listing -------------------------------------------------------------------
    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f"{_PREFIX}*{_SUFFIX}"))

    def segments(self) -> list[Segment]:
        """Published segments a reader should see (those a compaction retired are left out)."""
        files = self._files()
        if not files:
            return []
        retired = set(self.catalogue()["retired"])
        return [Segment(p) for p in files if p.name not in retired]

    def temp_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f".*{TMP_SUFFIX}"))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A shared lock: compaction does not delete segments while a reader holds it."""
        path = self.folder / ".read.lock"
        try:
            fh = try_lock(path, shared=True, seconds=3600.0) if self.folder.is_dir() else None
        except OSError:  # a read-only store: nobody can be compacting it either
            fh = None
        try:
            yield
        finally:
            if fh is not None:
                fh.close()

    def keys(self) -> np.ndarray:
        with self.reading():
            parts = [s.keys() for s in self.segments()]
        return np.concatenate(parts) if parts else np.empty(0, KEY_DTYPE)

    def errors(self) -> list[ErrorRecord]:
        """Every segment's error records, oldest segment first (by publication time), so that of two
        records of one item the later one comes last."""
        with self.reading():
            return [e for s in _by_age(self.segments()) for e in s.errors()]

    def writer(self, *, dtypes: Mapping[str, str], shapes: Mapping[str, tuple] | None = None,
               attrs: Mapping | None = None) -> SegmentWriter:
        return SegmentWriter(self, dtypes=dtypes, shapes=shapes, attrs=attrs)

    # ---- writing -------------------------------------------------------------------
    def write(self, keys: Sequence[str], dense: Mapping[str, np.ndarray],
              ragged: Mapping[str, Sequence[np.ndarray]] | None = None,
              errors: Sequence[ErrorRecord] = (), *, attrs: Mapping | None = None) -> Path:
        """Write one segment, publish it atomically and register it; returns its final path."""
        image = _segment_image(keys, dense, ragged, errors, attrs)
        digest = hashlib.sha256(image).hexdigest()
        final = self.folder / f"{_PREFIX}{digest[:32]}{_SUFFIX}"
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(final)
        with cleaned_on_failure(tmp, final):
            tmp.write_bytes(image)
        # Rename and register under the catalogue lock: a compaction deleting a retired segment of
        # the same name (the same bytes published again) cannot slip in between. If the catalogue
        # cannot be rewritten (a full disk), the segment is withdrawn again under the same lock, so a
        # failed write leaves no unregistered copy behind (a compaction's would be a whole extra set).
        new_file: list[Path] = []

        def withdraw() -> None:  # only if the catalogue on disk does not name it (the rewrite may have
            if new_file and final.name not in self.catalogue()["segments"]:  # landed, and a later fsync failed)
                final.unlink(missing_ok=True)
        with self.update_catalogue(on_failure=withdraw) as doc:
            if not final.exists():
                new_file.append(final)
            publish(tmp, final)
            doc["segments"][final.name] = {"rows": len(keys), "errors": len(errors), "sha256": digest}
            if final.name in doc["retired"]:  # the same bytes published again: live, not retired
                doc["retired"].remove(final.name)
        return final

    # ---- reading -------------------------------------------------------------------
    def index(self) -> "KeyIndex":
        with self.reading():
            return KeyIndex.build(self.segments())

    def _current(self, index: "KeyIndex | None") -> "KeyIndex":
        """`index` if it still names the published segments, else a fresh one (under `reading`)."""
        if index is not None and [s.path.name for s in index.segments] == [s.path.name for s in self.segments()]:
            return index
        return KeyIndex.build(self.segments())

    def read(self, keys: Sequence[str] | np.ndarray, name: str, *, dtype=None,
             index: "KeyIndex | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of dense array `name` for `keys` (empty string = no key).

        Returns `(values, present)`: values `[len(keys), ...]` (zeros where absent) and a
        boolean mask of the keys that were found.
        """
        with self.reading():
            index = self._current(index)
            _check_once(index)
            return self._read(keys, name, dtype, index)

    def _read(self, keys, name: str, dtype, index: "KeyIndex") -> tuple[np.ndarray, np.ndarray]:
        want = _as_keys(keys)
        seg_of, row_of, present = index.lookup(want)
        shape, stored = index.shape_of(name)
        if len(want) * 4 >= index.total_rows:  # most of the cache: one sequential scan, one gather
            _, everything = self._scan(index.segments, name)
            rows = np.where(present, index.seg_starts[np.maximum(seg_of, 0)] + row_of, 0)
            out = np.take(everything, rows, axis=0)
            out[~present] = 0
            return (out if dtype is None else out.astype(dtype, copy=False)), present
        out = np.zeros((len(want),) + shape, dtype=dtype or stored)
        order = np.argsort(seg_of, kind="stable")  # group wanted rows by segment in one pass
        bounds = np.searchsorted(seg_of[order], np.arange(len(index.segments) + 1))
        for s, seg in enumerate(index.segments):
            sel = order[bounds[s]:bounds[s + 1]]
            if not len(sel):
                continue
            with seg.open() as f:
                block = _take_rows(_array(f, seg, name), row_of[sel])
            if len(sel) == len(want):  # one segment holds everything: a single gather
                out[...] = block
            else:
                out[sel] = block
        return out, present

    def scan(self, name: str, *, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """All stored rows of `name` and their keys, in storage order (no alignment, no dedup)."""
        with self.reading():
            return self._scan(self.segments(), name, dtype)

    def _scan(self, segs: list[Segment], name: str, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        layout = []  # (segment, rows, keys location, array location), read once
        for seg in segs:
            with seg.open() as f:
                n = f["keys"].shape[0]
                layout.append((seg, n, _where(f["keys"]), _where(_array(f, seg, name)) if n else None))
        first = next((loc for *_, loc in layout if loc is not None), None)
        if first is None:
            return np.empty(0, KEY_DTYPE), np.empty((0,), dtype or np.float32)
        total = sum(n for _, n, _, _ in layout)
        out = np.empty((total,) + tuple(first[1][1:]), dtype=dtype or first[2])
        keys = np.empty(total, KEY_DTYPE)
        lo = 0
        for seg, n, key_loc, loc in layout:
            if n:
                _read_into(seg, "keys", key_loc, keys[lo:lo + n])
                _read_into(seg, f"arrays/{name}", loc, out[lo:lo + n])
            lo += n
        return keys, out

    def read_ragged(self, keys: Sequence[str] | np.ndarray, name: str, *, dtype=None,
                    index: "KeyIndex | None" = None) -> tuple[list[np.ndarray | None], np.ndarray]:
        """Variable-length rows of `name` for `keys`; None where absent."""
        with self.reading():
            index = self._current(index)
            _check_once(index)
            want = _as_keys(keys)
            seg_of, row_of, present = index.lookup(want)
            out: list[np.ndarray | None] = [None] * len(want)
            for s, seg in enumerate(index.segments):
                sel = np.flatnonzero(seg_of == s)
                if not len(sel):
                    continue
                with seg.open() as f:
                    if f"ragged/{name}" not in f:
                        continue
                    offsets = f[f"ragged/{name}/offsets"][...]
                    data = f[f"ragged/{name}/data"]
                    lo, hi = offsets[row_of[sel].min()], offsets[row_of[sel].max() + 1]
                    block = data[lo:hi]
                    for i, r in zip(sel, row_of[sel]):
                        row = block[offsets[r] - lo: offsets[r + 1] - lo]
                        out[i] = row.astype(dtype) if dtype else row
        return out, present

    def iter_rows(self, name: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys, values) per segment, for full scans that need no alignment."""
        with self.reading():
            for seg in self.segments():
                with seg.open() as f:
                    keys = f["keys"][...]
                    yield keys, (_array(f, seg, name)[...] if len(keys) else np.empty((0,)))

    # ---- maintenance ---------------------------------------------------------------
    def verify(self, *, expect: Mapping[str, tuple] | None = None) -> list[Problem]:
        """Checksums, catalogue, shapes, alignment, finiteness and duplicates of every segment."""
        try:
            catalogue, on_disk = self._snapshot()
        except FeatureStoreError as exc:
            return [Problem(str(self.catalogue_path), f"{exc}")]
        problems: list[Problem] = []
        seen: dict[bytes, str] = {}
        if on_disk and not self.catalogue_path.is_file():
            return [Problem(str(self.catalogue_path), f"no {CATALOGUE} (segments written before catalogues "
                                                      "existed); `fs gc` builds it from the segments")]
        for name, entry in sorted(catalogue["segments"].items()):
            if name not in on_disk:
                problems.append(Problem(str(self.folder / name), f"segment with {entry.get('rows')} rows is listed in "
                                        f"{CATALOGUE} but missing: it was deleted, and its rows are lost; re-run "
                                        "`fs extract` for the datasets that need them"))
        retired = set(catalogue["retired"])
        for seg in [Segment(self.folder / name) for name in sorted(on_disk - retired)]:
            entry = catalogue["segments"].get(seg.path.name)
            problems.extend(_verify_segment(seg, expect or {}, seen, entry))
        for tmp in self.temp_files():
            if writer_running_here(tmp):  # a running job's segment in the making: not a leftover
                continue
            problems.append(Problem(str(tmp), "unpublished temporary file (left by a killed job; `fs gc` removes it)"))
        for name in sorted(retired & on_disk):
            problems.append(Problem(str(self.folder / name), "segment merged by a compaction but not yet deleted "
                                    "(a reader was busy); `fs gc` deletes it"))
        return problems

    def _snapshot(self) -> tuple[dict, set[str]]:
        """The catalogue and the segment files on disk, read together under the catalogue lock: a writer
        renames its segment into place and registers it under that lock, so a segment seen between the
        two is never taken for an unregistered one (a read-only store is read without the lock)."""
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(OSError):
                stack.enter_context(self._catalogue_lock())
            return self.catalogue(), {p.name for p in self._files()}

    def compact(self, *, attrs: Mapping | None = None) -> tuple[int, Path | None]:
        """Merge all segments into one, check it, and only then retire and delete the old ones.

        Every source segment must first hash to its name and catalogue record (else IntegrityError,
        nothing merged); the merged one must hold every key with the values of the source it came from.

        The caller holds the set's exclusive writer lock."""
        self.adopt_orphans()
        self.delete_retired()
        segs = self.segments()
        if len(segs) < 2:
            return 0, None
        _check_sources(segs, self.catalogue())  # never seal a corrupt segment's rows under a fresh checksum
        with self.reading():
            index = KeyIndex.build(segs)
            keys = index.unique_keys()
            dense_names, ragged_names = _array_names(segs)
            dense = {name: self._read(keys, name, None, index)[0] for name in dense_names}
            ragged = {name: self.read_ragged(keys, name, index=index)[0] for name in ragged_names}
            errors = [e for s in _by_age(segs) for e in s.errors()]  # the newest record of an item last
        done = set(keys.tolist())
        errors = list({(e.key, e.dataset, e.item_id): e for e in errors
                       if e.key.encode() not in done}.values())
        merged = self.write([k.decode() for k in keys], dense, ragged, errors, attrs=attrs)
        try:
            _check_merged(Segment(merged), keys, dense, ragged_names, len(errors), self.catalogue(), index)
        except IntegrityError:
            if merged not in {s.path for s in segs}:  # withdraw the bad merge; the old segments stay
                with self.update_catalogue() as doc:
                    doc["segments"].pop(merged.name, None)
                merged.unlink(missing_ok=True)
            raise
        with self.update_catalogue() as doc:
            for seg in segs:
                if seg.path != merged:
                    doc["segments"].pop(seg.path.name, None)
                    doc["retired"] = sorted(set(doc["retired"]) | {seg.path.name})
        self.delete_retired()
        return len(segs), merged

    def delete_retired(self, *, wait: float = _DELETE_WAIT_S) -> list[str]:
        """Delete retired segments once no reader holds the shared lock (else leave them for later)."""
        retired = self.catalogue()["retired"] if self.catalogue_path.is_file() else []
        if not retired:
            return []
        fh = try_lock(self.folder / ".read.lock", seconds=wait)
        if fh is None:
            return []
        try:
            with self.update_catalogue() as doc:  # no writer can publish a retired name meanwhile
                gone = [name for name in doc["retired"] if name not in doc["segments"]]
                for name in gone:
                    (self.folder / name).unlink(missing_ok=True)
                doc["retired"] = []
        finally:
            fh.close()
        return gone

    def remove_temp_files(self, *, dead_only: bool = False) -> list[Path]:
        """Remove temp files (with `dead_only`, only those whose writer process is gone: safe
        while other jobs write here)."""
        removed = []
        for tmp in self.temp_files():
            if dead_only and writer_alive(tmp):
                continue
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed


_CHECKED: set = set()  # (path, inode, size, mtime) of the segments this process has hashed and found whole


def _check_once(index: "KeyIndex") -> None:
    """Before rows are read by key (what training, evaluation and VA scoring read through), each
    segment's bytes are hashed once per process and compared with its name, so a flipped bit fails
    here, one line, instead of training on it. `scan` (the bulk path, benchmarked against np.load) is
    left to `fs verify`. An index whose segments were all checked is not looked at again (a job
    reading batch after batch stats nothing)."""
    if index.checked:
        return
    for seg in index.segments:
        try:
            st = seg.path.stat()
        except FileNotFoundError:  # retired since the listing: the read itself says so
            continue
        ident = (str(seg.path), st.st_ino, st.st_size, st.st_mtime_ns)
        if ident in _CHECKED:
            continue
        digest = sha256_file(seg.path)
        if digest[:32] != seg.digest:
            raise IntegrityError(f"segment {seg.path} is corrupt: its bytes hash to {digest[:32]}, its name says "
                                 f"{seg.digest}; nothing was read from it. Run `fs verify`, delete it and re-run "
                                 "`fs extract` to recompute its rows")
        _CHECKED.add(ident)
    index.checked = True


def _by_age(segs: list[Segment]) -> list[Segment]:
    """Oldest first, by when each was published (a segment is never rewritten: its mtime is that)."""
    def age(seg: Segment) -> tuple:
        try:
            return (seg.path.stat().st_mtime_ns, seg.path.name)
        except OSError:  # gone since the listing: its rows are in a merge; order does not matter
            return (0, seg.path.name)
    return sorted(segs, key=age)


def _segment_image(keys, dense, ragged, errors, attrs) -> bytes:
    """The bytes of one segment file, built in memory."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", track_order=True) as f:
        f.attrs["writer"] = f"featurestore {__version__}"
        for k, v in (attrs or {}).items():
            f.attrs[k] = v
        f.create_dataset("keys", data=_as_keys(keys), track_times=False)
        for name, arr in dense.items():
            # Contiguous and uncompressed: a full scan is one sequential read.
            f.create_dataset(f"arrays/{name}", data=arr, track_times=False)
        for name, rows in (ragged or {}).items():
            _write_ragged(f, name, rows)
        if errors:
            g = f.create_group("errors")
            g.create_dataset("keys", data=_as_keys([e.key for e in errors]))
            for col in ("dataset", "item_id", "reason"):
                g.create_dataset(col + "s", data=[getattr(e, col) for e in errors], dtype=_STR)
    return buf.getvalue()


def _describe(seg: Segment) -> dict | None:
    """A catalogue entry for a sound segment file, or None if it is not one."""
    try:
        digest = sha256_file(seg.path)
        if digest[:32] != seg.digest:
            return None
        with seg.open() as f:
            return {"rows": int(f["keys"].shape[0]),
                    "errors": int(f["errors/keys"].shape[0]) if "errors" in f else 0, "sha256": digest}
    except (OSError, KeyError, FeatureStoreError):
        return None


def _array(f: h5py.File, seg: Segment, name: str) -> h5py.Dataset:
    if f"arrays/{name}" not in f:
        raise IntegrityError(f"segment {seg.path} holds {f['keys'].shape[0]} rows but no array {name!r}; "
                             "run `fs verify`, delete it and re-run `fs extract` to recompute its rows")
    return f[f"arrays/{name}"]


def _array_names(segs: list[Segment]) -> tuple[list[str], list[str]]:
    dense, ragged = set(), set()
    for seg in segs:
        with seg.open() as f:
            dense.update(f["arrays"].keys() if "arrays" in f else ())
            ragged.update(f["ragged"].keys() if "ragged" in f else ())
    return sorted(dense), sorted(ragged)


def _check_sources(segs: list[Segment], catalogue: dict) -> None:
    """Refuse to merge unless every source segment still hashes to its name and its catalogue record:
    a merge would otherwise seal a flipped byte's values under a fresh, valid checksum and delete
    the only evidence."""
    for seg in segs:
        try:
            digest = sha256_file(seg.path)
        except OSError as exc:
            raise IntegrityError(f"compaction of {seg.path.parent} stopped, nothing merged: cannot read segment "
                                 f"{seg.path.name} ({exc.strerror or exc}); run `fs verify`") from None
        recorded = (catalogue["segments"].get(seg.path.name) or {}).get("sha256")
        if digest[:32] != seg.digest or (recorded is not None and recorded != digest):
            raise IntegrityError(f"compaction of {seg.path.parent} stopped, nothing merged: segment {seg.path.name} "
                                 "is corrupt (its SHA-256 does not match its name or catalogue record); run "
                                 "`fs verify`, delete it and re-run `fs extract` to recompute its rows, then compact again")


def _check_merged(seg: Segment, keys: np.ndarray, dense: Mapping[str, np.ndarray], ragged: Sequence[str],
                  n_errors: int, catalogue: dict, index: "KeyIndex | None" = None) -> None:
    """Refuse to retire anything unless the merged segment holds every row, array and error, and
    (given the sources' `index`) each key's values are the ones its source segment holds."""
    entry = catalogue["segments"].get(seg.path.name)
    problems = _verify_segment(seg, {}, {}, entry)
    with seg.open() as f:
        keys_ok = f["keys"].shape[0] == len(keys) and np.array_equal(f["keys"][...], keys)
        if not keys_ok:
            problems.append(Problem(str(seg.path), "merged keys differ from the union of the old segments"))
        for name, arr in dense.items():
            if f"arrays/{name}" not in f or f[f"arrays/{name}"].shape != arr.shape:
                problems.append(Problem(str(seg.path), f"merged array {name} is missing or has the wrong shape"))
        for name in ragged:
            if f"ragged/{name}" not in f:
                problems.append(Problem(str(seg.path), f"merged ragged {name} is missing"))
        got_errors = f["errors/keys"].shape[0] if "errors" in f else 0
        if got_errors != n_errors:
            problems.append(Problem(str(seg.path), f"merged segment has {got_errors} errors, expected {n_errors}"))
        if not problems and index is not None:
            problems += _merged_values_differ(seg, f, keys, list(dense), list(ragged), index)
    if problems:
        raise IntegrityError(f"compaction of {seg.path.parent} stopped, nothing deleted: {problems[0].message}")


def _merged_values_differ(seg: Segment, merged: h5py.File, keys: np.ndarray, dense: list[str], ragged: list[str],
                          index: "KeyIndex") -> list[Problem]:
    """Compare the merged segment's rows, key by key, with the rows of the source copy each key was
    taken from (the one `index` finds), read straight through h5py: a gather bug in the merge is
    caught before the sources go. Reads one array at a time."""
    order = np.argsort(keys, kind="stable")  # merged keys are unique: each source key has one place
    sorted_keys = keys[order]
    sources = []  # (segment, merged rows, source rows) of the copies the merge took
    for s, src in enumerate(index.segments):
        with src.open() as f:
            src_keys = f["keys"][...]
        seg_of, row_of, _ = index.lookup(src_keys)
        mine = np.flatnonzero((seg_of == s) & (row_of == np.arange(len(src_keys))))
        if len(mine):
            at = order[np.minimum(np.searchsorted(sorted_keys, src_keys[mine]), len(keys) - 1)]
            if not np.array_equal(keys[at], src_keys[mine]):
                return [Problem(str(seg.path), f"merged segment lacks keys of {src.path.name}")]
            sources.append((src, at, mine))
    where = str(seg.path)
    for name in dense:
        got = merged[f"arrays/{name}"][...]
        for src, at, rows in sources:
            with src.open() as f:
                want = f[f"arrays/{name}"][...][rows] if f"arrays/{name}" in f else None
            if want is None or not np.array_equal(got[at], want, equal_nan=got.dtype.kind in "fc"):
                return [Problem(where, f"merged array {name} differs from the rows of {src.path.name}")]
    for name in ragged:
        off, data = merged[f"ragged/{name}/offsets"][...], merged[f"ragged/{name}/data"][...]
        for src, at, rows in sources:
            with src.open() as f:
                if f"ragged/{name}" not in f:
                    if (off[at + 1] != off[at]).any():
                        return [Problem(where, f"merged ragged {name} has rows {src.path.name} does not hold")]
                    continue
                s_off, s_data = f[f"ragged/{name}/offsets"][...], f[f"ragged/{name}/data"][...]
            for a, r in zip(at.tolist(), rows.tolist()):
                if not np.array_equal(data[off[a]:off[a + 1]], s_data[s_off[r]:s_off[r + 1]],
                                      equal_nan=data.dtype.kind in "fc"):
                    return [Problem(where, f"merged ragged {name} differs from the rows of {src.path.name}")]
    return []


def _where(ds: h5py.Dataset):
    """(byte offset or None, shape, dtype): where a plain contiguous dataset's bytes lie in its file."""
    offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
    return offset, ds.shape, ds.dtype


def _read_into(seg: Segment, path: str, loc, out: np.ndarray) -> None:
    """Fill `out` with a whole dataset. A contiguous one whose dtype matches is read straight into
    `out` with one `readinto` (HDF5's own read path is about 2x slower on large arrays)."""
    offset, shape, stored = loc
    if offset is not None and np.dtype(stored) == out.dtype and out.flags.c_contiguous \
            and np.dtype(stored).isnative and out.nbytes:
        with open(seg.path, "rb") as fh:
            fh.seek(offset)
            if fh.readinto(memoryview(out).cast("B")) == out.nbytes:
                return
    with seg.open() as f:
        ds = f[path]
        if np.dtype(stored) == out.dtype and out.flags.c_contiguous:
            ds.read_direct(out)
        else:
            out[...] = ds[...]


_HEX = np.zeros(256, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def key_prefix64(keys: np.ndarray) -> np.ndarray:
    """The first 64 bits of hex content keys as uint64: sorts and searches ~10x faster than bytes."""
    if not len(keys):
        return np.empty(0, np.uint64)
    raw = np.ascontiguousarray(keys, dtype=KEY_DTYPE).view(np.uint8).reshape(len(keys), KEY_BYTES)[:, :16]
    nib = _HEX[raw]
    packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])
    return packed.view(">u8").ravel().astype(np.uint64)


class KeyIndex:
    """Where each key lives: the keys of all segments, sorted by a 64-bit prefix.

    Lookups search the prefix and then confirm the full key, so a prefix shared by two
    different keys (astronomically rare) can only make a key look absent, never wrong;
    `build` detects that case and falls back to searching the full keys.
    """

    def __init__(self, segments: list[Segment], keys: np.ndarray, seg_ids: np.ndarray,
                 rows: np.ndarray, shapes: dict):
        self.segments = segments
        prefix = key_prefix64(keys)
        order = np.argsort(prefix, kind="stable")  # stable: the first copy of a key wins
        self._keys, self._seg, self._row = keys[order], seg_ids[order], rows[order]
        self._prefix = prefix[order]
        same = self._prefix[1:] == self._prefix[:-1]
        if same.any() and (self._keys[1:][same] != self._keys[:-1][same]).any():
            order = np.argsort(self._keys, kind="stable")
            self._keys, self._seg, self._row = self._keys[order], self._seg[order], self._row[order]
            self._prefix = None  # search full keys
        self._shapes = shapes
        counts = np.bincount(seg_ids, minlength=len(segments)) if len(seg_ids) else np.zeros(len(segments), int)
        self.seg_starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.total_rows = int(len(keys))
        self.checked = False  # its segments' checksums, by `_check_once`

    @classmethod
    def build(cls, segments: list[Segment]) -> "KeyIndex":
        keys, seg_ids, rows, shapes = [], [], [], {}
        for i, seg in enumerate(segments):
            with seg.open() as f:
                k = f["keys"][...]
                for name, ds in f.get("arrays", {}).items():
                    shapes.setdefault(name, (ds.shape[1:], ds.dtype))
            keys.append(k)
            seg_ids.append(np.full(len(k), i, np.int32))
            rows.append(np.arange(len(k), dtype=np.int64))
        if not keys:
            return cls(segments, np.empty(0, KEY_DTYPE), np.empty(0, np.int32), np.empty(0, np.int64), shapes)
        return cls(segments, np.concatenate(keys), np.concatenate(seg_ids), np.concatenate(rows), shapes)

    def __len__(self) -> int:
        return len(self.unique_keys())

    def unique_keys(self) -> np.ndarray:
        if not len(self._keys):
            return self._keys
        first = np.ones(len(self._keys), bool)
        first[1:] = self._keys[1:] != self._keys[:-1]
        return self._keys[first]

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.lookup(_as_keys(keys))[2]

    def shape_of(self, name: str) -> tuple[tuple, np.dtype]:
        if name not in self._shapes:
            raise IntegrityError(f"no array {name!r} in these segments; have {sorted(self._shapes)}")
        return self._shapes[name]

    def lookup(self, want: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(segment id, row, present) for each wanted key; -1 where absent."""
        n = len(self._keys)
        if not n:
            none = np.full(len(want), -1)
            return none, none, np.zeros(len(want), bool)
        if self._prefix is not None:
            pos = np.searchsorted(self._prefix, key_prefix64(want), side="left")
        else:
            pos = np.searchsorted(self._keys, want, side="left")
        pos = np.minimum(pos, n - 1)
        present = (self._keys[pos] == want) & (want != b"")
        seg_of = np.where(present, self._seg[pos], -1)
        row_of = np.where(present, self._row[pos], -1)
        return seg_of, row_of, present


def _take_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows of an HDF5 dataset in the given order, reading as little as is sensible."""
    n = ds.shape[0]
    if len(rows) * 20 >= n:  # many rows: one sequential read beats scattered ones
        block = ds[...]
        if len(rows) == n and (rows[1:] > rows[:-1]).all():
            return block  # all rows in storage order: no gather at all
        return block[rows]
    uniq, inverse = np.unique(rows, return_inverse=True)
    return ds[uniq][inverse]


def _write_ragged(f: h5py.File, name: str, rows: Sequence[np.ndarray]) -> None:
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    width = rows[0].shape[1:] if len(rows) else (0,)
    data = np.concatenate(rows) if len(rows) else np.empty((0,) + tuple(width), np.float16)
    chunk_rows = max(1, min(len(data), 1 << 14))
    f.create_dataset(f"ragged/{name}/data", data=data, track_times=False,
                     chunks=(chunk_rows,) + data.shape[1:] if len(data) else None,
                     compression="lzf" if len(data) else None)
    f.create_dataset(f"ragged/{name}/offsets", data=offsets, track_times=False)


def _verify_segment(seg: Segment, expect: Mapping[str, tuple], seen: dict, entry: dict | None) -> list[Problem]:
    where = str(seg.path)
    digest = sha256_file(seg.path)
    if digest[:32] != seg.digest:
        return [Problem(where, f"checksum mismatch: file hashes to {digest[:32]}, name says {seg.digest}; "
                               "the segment is corrupt (truncated or changed): delete it and re-run `fs extract` "
                               "to recompute its rows")]
    problems = []
    if entry is None:
        problems.append(Problem(where, f"segment is not in {CATALOGUE} (left by a job killed while publishing, "
                                       "or copied in by hand); `fs gc` registers it"))
    elif entry.get("sha256") != digest:
        problems.append(Problem(where, f"segment was replaced: its SHA-256 is not the one in {CATALOGUE}"))
    try:
        with h5py.File(seg.path, "r") as f:
            keys = f["keys"][...]
            if entry is not None and entry.get("rows") != len(keys):
                problems.append(Problem(where, f"segment holds {len(keys)} rows, {CATALOGUE} says {entry.get('rows')}"))
            if len(np.unique(keys)) != len(keys):
                problems.append(Problem(where, "duplicate keys inside one segment"))
            for k in keys:
                if k in seen:
                    problems.append(Problem(where, f"key {k.decode()} also in {seen[k]} (left by an "
                                                   "interrupted compaction; `fs gc --compact` merges them)"))
                    break
            seen.update(dict.fromkeys(keys.tolist(), seg.path.name))
            for name in expect:
                if len(keys) and f"arrays/{name}" not in f:
                    problems.append(Problem(where, f"segment holds {len(keys)} rows but no array {name}: "
                                                   "delete it and re-run `fs extract`"))
            for name, ds in f.get("arrays", {}).items():
                if ds.shape[0] != len(keys):
                    problems.append(Problem(where, f"array {name} has {ds.shape[0]} rows for {len(keys)} keys"))
                if name in expect and tuple(ds.shape[1:]) != tuple(expect[name]):
                    problems.append(Problem(where, f"array {name} rows are {ds.shape[1:]}, spec says {expect[name]}"))
                if ds.dtype.kind == "f" and len(keys) and not np.isfinite(ds[...]).all():
                    problems.append(Problem(where, f"array {name} holds NaN or inf"))
            for name, g in f.get("ragged", {}).items():
                off = g["offsets"][...]
                if len(off) != len(keys) + 1 or off[0] != 0 or np.any(np.diff(off) < 0) \
                        or off[-1] != g["data"].shape[0]:
                    problems.append(Problem(where, f"ragged {name} offsets do not match its data"))
    except (OSError, KeyError, ValueError) as exc:
        problems.append(Problem(where, f"unreadable segment: {exc}"))
    return problems
