"""Immutable, content-addressed HDF5 segments of keyed rows.

A *segment set* is one folder of `seg-<sha256>.h5` files. Each segment holds

- `keys`            fixed-width ASCII content keys, `[N]`
- `arrays/<name>`   dense rows aligned to `keys`, `[N, ...]` (e.g. `pooled`, `va`)
- `ragged/<name>/data` + `ragged/<name>/offsets`  variable-length rows (e.g. token or
  frame sequences): row i is `data[offsets[i]:offsets[i+1]]`
- `errors/*`        items of the same batch that failed, with their reason

Segments are written to a temporary file and published by an atomic rename to a name
that is the SHA-256 of their bytes, so a reader only ever sees whole segments, a killed
writer loses only what it had not yet published, and `verify` detects any flipped byte.
Plain h5py or h5dump can read every file.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from . import __version__
from ._io import TMP_SUFFIX, publish, tmp_path
from .errors import IntegrityError
from .hashing import KEY_BYTES, file_digest

__all__ = ["SegmentSet", "SegmentWriter", "Segment", "ErrorRecord", "Problem", "KEY_DTYPE", "KeyIndex",
           "key_prefix64"]

KEY_DTYPE = np.dtype(f"S{KEY_BYTES}")
_STR = h5py.string_dtype("utf-8")
_PREFIX, _SUFFIX = "seg-", ".h5"


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
        return h5py.File(self.path, "r")

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

    def __init__(self, segset: "SegmentSet", *, dtypes: Mapping[str, str], attrs: Mapping | None = None):
        self.segset = segset
        self.dtypes = dict(dtypes)
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
        path = self.segset.write(self._keys,
                                 {k: np.concatenate(v) for k, v in self._dense.items()},
                                 self._ragged, self._errors, attrs=self.attrs)
        self._reset()
        return path


class SegmentSet:
    """A folder of published segments that share one row schema."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    # ---- listing -------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        if not self.folder.is_dir():
            return []
        return [Segment(p) for p in sorted(self.folder.glob(f"{_PREFIX}*{_SUFFIX}"))]

    def temp_files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f".*{TMP_SUFFIX}"))

    def keys(self) -> np.ndarray:
        parts = [s.keys() for s in self.segments()]
        return np.concatenate(parts) if parts else np.empty(0, KEY_DTYPE)

    def errors(self) -> list[ErrorRecord]:
        return [e for s in self.segments() for e in s.errors()]

    def writer(self, *, dtypes: Mapping[str, str], attrs: Mapping | None = None) -> SegmentWriter:
        return SegmentWriter(self, dtypes=dtypes, attrs=attrs)

    # ---- writing -------------------------------------------------------------------
    def write(self, keys: Sequence[str], dense: Mapping[str, np.ndarray],
              ragged: Mapping[str, Sequence[np.ndarray]] | None = None,
              errors: Sequence[ErrorRecord] = (), *, attrs: Mapping | None = None) -> Path:
        """Write one segment and publish it atomically; returns its final path."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(self.folder / "segment.h5")
        try:
            with h5py.File(tmp, "w", track_order=True) as f:
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
            digest = file_digest(tmp, 32)
            final = self.folder / f"{_PREFIX}{digest}{_SUFFIX}"
            publish(tmp, final)
            return final
        finally:
            if tmp.exists():
                tmp.unlink()

    # ---- reading -------------------------------------------------------------------
    def index(self) -> "KeyIndex":
        return KeyIndex.build(self.segments())

    def read(self, keys: Sequence[str] | np.ndarray, name: str, *, dtype=None,
             index: "KeyIndex | None" = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of dense array `name` for `keys` (empty string = no key).

        Returns `(values, present)`: values `[len(keys), ...]` (zeros where absent) and a
        boolean mask of the keys that were found.
        """
        index = index or self.index()
        want = _as_keys(keys)
        seg_of, row_of, present = index.lookup(want)
        shape, stored = index.shape_of(name)
        if len(want) * 4 >= index.total_rows:  # most of the cache: one sequential scan, one gather
            _, everything = self.scan(name)
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
                block = _take_rows(f[f"arrays/{name}"], row_of[sel])
            if len(sel) == len(want):  # one segment holds everything: a single gather
                out[...] = block
            else:
                out[sel] = block
        return out, present

    def scan(self, name: str, *, dtype=None) -> tuple[np.ndarray, np.ndarray]:
        """All stored rows of `name` and their keys, in storage order (no alignment, no dedup)."""
        segs = self.segments()
        shapes = []
        for seg in segs:
            with seg.open() as f:
                shapes.append((f[f"arrays/{name}"].shape, f[f"arrays/{name}"].dtype))
        if not segs:
            return np.empty(0, KEY_DTYPE), np.empty((0,), dtype or np.float32)
        total = sum(sh[0][0] for sh in shapes)
        out = np.empty((total,) + shapes[0][0][1:], dtype=dtype or shapes[0][1])
        keys = np.empty(total, KEY_DTYPE)
        lo = 0
        for seg, (shape, stored) in zip(segs, shapes):
            hi = lo + shape[0]
            with seg.open() as f:
                f["keys"].read_direct(keys, dest_sel=np.s_[lo:hi])
                ds = f[f"arrays/{name}"]
                if hi > lo:
                    if np.dtype(stored) == out.dtype:
                        ds.read_direct(out, dest_sel=np.s_[lo:hi])
                    else:
                        out[lo:hi] = ds[...]
            lo = hi
        return keys, out

    def read_ragged(self, keys: Sequence[str] | np.ndarray, name: str, *, dtype=None,
                    index: "KeyIndex | None" = None) -> tuple[list[np.ndarray | None], np.ndarray]:
        """Variable-length rows of `name` for `keys`; None where absent."""
        index = index or self.index()
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
        for seg in self.segments():
            with seg.open() as f:
                yield f["keys"][...], f[f"arrays/{name}"][...]

    # ---- maintenance ---------------------------------------------------------------
    def verify(self, *, expect: Mapping[str, tuple] | None = None) -> list[Problem]:
        """Checksums, shapes, alignment, finiteness and duplicates of every segment."""
        problems: list[Problem] = []
        seen: dict[bytes, str] = {}
        for seg in self.segments():
            problems.extend(_verify_segment(seg, expect or {}, seen))
        for tmp in self.temp_files():
            problems.append(Problem(str(tmp), "unpublished temporary file (left by a killed job; `fs gc` removes it)"))
        return problems

    def compact(self, *, attrs: Mapping | None = None) -> tuple[int, Path | None]:
        """Merge all segments into one (published before the old ones are removed)."""
        segs = self.segments()
        if len(segs) < 2:
            return 0, None
        index = KeyIndex.build(segs)
        keys = index.unique_keys()
        dense, ragged = {}, {}
        with segs[0].open() as f:
            dense_names = list(f["arrays"].keys()) if "arrays" in f else []
            ragged_names = list(f["ragged"].keys()) if "ragged" in f else []
        for name in dense_names:
            dense[name], _ = self.read(keys, name, index=index)
        for name in ragged_names:
            rows, _ = self.read_ragged(keys, name, index=index)
            ragged[name] = rows
        errors = self.errors()
        done = set(keys.tolist())
        errors = list({(e.key, e.dataset, e.item_id): e for e in errors
                       if e.key.encode() not in done}.values())
        merged = self.write([k.decode() for k in keys], dense, ragged, errors, attrs=attrs)
        for seg in segs:
            if seg.path != merged:
                seg.path.unlink()
        return len(segs), merged

    def remove_temp_files(self) -> list[Path]:
        removed = []
        for tmp in self.temp_files():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed


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


def _verify_segment(seg: Segment, expect: Mapping[str, tuple], seen: dict) -> list[Problem]:
    where = str(seg.path)
    digest = file_digest(seg.path, 32)
    if digest != seg.digest:
        return [Problem(where, f"checksum mismatch: file hashes to {digest}, name says {seg.digest}; "
                               "the segment is corrupt: delete it and re-run `fs extract` to recompute its rows")]
    problems = []
    try:
        with seg.open() as f:
            keys = f["keys"][...]
            if len(np.unique(keys)) != len(keys):
                problems.append(Problem(where, "duplicate keys inside one segment"))
            for k in keys:
                if k in seen:
                    problems.append(Problem(where, f"key {k.decode()} also in {seen[k]} (left by an "
                                                   "interrupted compaction; `fs gc --compact` merges them)"))
                    break
            seen.update(dict.fromkeys(keys.tolist(), seg.path.name))
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
    except (OSError, KeyError) as exc:
        problems.append(Problem(where, f"unreadable segment: {exc}"))
    return problems
