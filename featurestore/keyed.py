"""The shared shape of a producer's rows: a folder of segments, a spec.json, a writer lock.

Feature sets (one per backbone fingerprint) and VA sets (one per VA scorer source) are
both this: rows keyed by content key in immutable segments, described by a spec that
must never silently change, written by one job at a time.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import time
from pathlib import Path
from typing import ClassVar, Iterator, Sequence

import numpy as np

from ._io import file_lock, read_json, write_json_atomic
from .errors import IntegrityError, NotFoundError
from .hashing import canonical_json
from .segments import ErrorRecord, KeyIndex, SegmentSet
from .store import Store

__all__ = ["KeyedSet", "selections_of", "selection_covers"]

Selection = tuple  # (limit, splits): the first `limit` rows (0: all) of these splits (empty: all)


def selections_of(entry: dict) -> list[Selection]:
    """What an extraction for a dataset selected, as its catalogue entry records it (an entry written
    before `selections` existed: its `limit` and `splits`)."""
    if entry.get("selections"):
        return [(int(lim or 0), tuple(sorted(spl or ()))) for lim, spl in entry["selections"]]
    return [(int(entry.get("limit") or 0), tuple(sorted(entry.get("splits") or ())))]


def selection_covers(a: Selection, b: Selection) -> bool:
    """Whether selection `a` holds every item selection `b` does, whatever the manifest."""
    (la, sa), (lb, sb) = a, b
    splits_ok = not sa or (bool(sb) and set(sb) <= set(sa))
    limit_ok = la == 0 or (lb != 0 and la >= lb and tuple(sa) == tuple(sb))
    return splits_ok and limit_ok


def _widest(sels: list[Selection]) -> list[Selection]:
    """The selections no other one covers (of two equal ones, one)."""
    out: list[Selection] = []
    for i, a in enumerate(sels):
        if any(selection_covers(b, a) and (not selection_covers(a, b) or j < i) for j, b in enumerate(sels) if j != i):
            continue
        out.append(a)
    return out


class KeyedSet:
    """Rows of one producer under `folder`. Reads see only published segments."""

    what: ClassVar[str] = "rows"  # how messages name one set, e.g. "features"
    list_hint: ClassVar[str] = "fs ls"
    informative: ClassVar[tuple[str, ...]] = ("created_at",)  # spec keys that may differ between runs

    def __init__(self, store: Store, name: str, folder: Path):
        self.store = store
        self.name = name
        self.folder = folder
        self.segments = SegmentSet(folder)
        self._index: KeyIndex | None = None
        self._index_names: tuple[str, ...] = ()

    # ---- spec ----------------------------------------------------------------------
    @property
    def spec_path(self) -> Path:
        return self.folder / "spec.json"

    def exists(self) -> bool:
        return self.spec_path.is_file()

    @property
    def spec(self) -> dict:
        if not self.exists():
            raise NotFoundError(f"no {self.what} {self.name!r} in {self.store.root} ({self.list_hint})")
        return read_json(self.spec_path)

    def _stamp(self) -> dict:
        """Keys added to spec.json when it is first written (all listed in `informative`)."""
        return {}

    def ensure_spec(self, spec: dict) -> None:
        """Write spec.json on first use; afterwards it must agree with what the job computed."""
        if self.exists():
            skip = self.informative
            old = canonical_json({k: v for k, v in self.spec.items() if k not in skip})
            new = canonical_json({k: v for k, v in spec.items() if k not in skip})
            if old != new:
                raise IntegrityError(f"{self.what} {self.name}: spec.json disagrees with the spec computed for "
                                     "the same name; the folder was edited by hand or is corrupt")
            return
        write_json_atomic(self.spec_path, {**spec, **self._stamp()})

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False, wait: bool = False, wait_option: bool = False) -> Iterator[None]:
        """The writer lock: extraction jobs share it (each publishes its own segments),
        compaction and single-writer jobs hold it alone. `wait` blocks instead of failing;
        `wait_option`: the command has `--wait` (its refusal says so)."""
        with file_lock(self.folder / ".lock", f"{self.what} {self.name}", shared=shared, wait=wait,
                       wait_option=wait_option):
            yield

    def record_dataset(self, dataset: str, entry: dict) -> None:
        """Remember which rows `dataset` needs from this set (checked by `fs verify`): `selections`, each
        `[limit, splits]` (0 / []: all) an extraction of the same manifest ran with, none covered by
        another (`--limit 3` then `--split train` is two, not "everything"). `first_at` (epoch seconds,
        sub-second) keeps when an extraction first completed for `dataset` here: staleness orders
        fingerprints by it, per dataset."""
        with self.segments.update_catalogue() as doc:
            old = doc["datasets"].get(dataset)
            entry = {**entry, "first_at": self._first_at(old, entry)}
            sels = selections_of(entry)
            if old and old.get("manifest_hash") == entry["manifest_hash"] and old.get("modality") == entry["modality"]:
                sels = selections_of(old) + sels
            entry["selections"] = [[lim, list(spl)] for lim, spl in _widest(sels)]
            doc["datasets"][dataset] = entry

    def _first_at(self, old: dict | None, entry: dict) -> float:
        """When `dataset` was first extracted here: kept from `old` while its manifest is the same; for an
        entry recorded before `first_at` existed, the set's creation time (what staleness assumed until
        now, so re-running an old extraction never makes it the newest); now for a new or replaced one."""
        if not old or old.get("manifest_hash") != entry["manifest_hash"]:
            return time.time()
        if old.get("first_at"):
            return float(old["first_at"])
        try:
            return _dt.datetime.fromisoformat(self.spec.get("created_at", "")).timestamp()
        except (ValueError, TypeError, NotFoundError):
            return time.time()

    # ---- reading -------------------------------------------------------------------
    def index(self, *, refresh: bool = False) -> KeyIndex:
        """The key index, rebuilt whenever the set of published segments has changed."""
        names = tuple(s.path.name for s in self.segments.segments())
        if self._index is None or refresh or names != self._index_names:
            self._index = self.segments.index()
            self._index_names = names
        return self._index

    def has(self, keys: Sequence[str] | np.ndarray) -> np.ndarray:
        return self.index().contains(np.asarray(keys, dtype="S32"))

    def errors(self, *, resolved: bool = False) -> list[ErrorRecord]:
        """Recorded failures, one per (key, dataset, item id), the newest reason kept. A record whose
        key has a row now (a later run, `--retry-errors` say, computed it) is resolved: left out
        unless `resolved`. Against one dataset's current manifest: `standing_errors`."""
        # oldest first, so a later record of an item replaces the earlier one
        latest = {(e.key, e.dataset, e.item_id): e for e in self.segments.errors()}
        if resolved or not latest:
            return list(latest.values())
        keyed = [k for k, _, _ in latest if k]
        done = {k for k, h in zip(keyed, self.has(keyed)) if h} if keyed else set()
        return [e for e in latest.values() if e.key not in done]

    def standing_errors(self, dataset) -> list[ErrorRecord]:
        """The failures still standing against `dataset` (a Dataset) as its manifest is now: records of
        its items whose content key is still the one recorded (none, for an unreadable input) and
        has no row. A record of an item since replaced (`datasets add --replace`) or removed is not."""
        mod = self.spec["modality"]
        df = dataset.manifest
        if f"{mod}_key" not in df.columns:
            return []
        df = df.filter(df[mod].is_not_null())  # an item whose input was removed has nothing to fail
        current = dict(zip(df["item_id"].to_list(), df[f"{mod}_key"].to_list()))
        return [e for e in self.errors() if e.dataset == dataset.name and e.item_id in current
                and (current[e.item_id] or "") == e.key]
