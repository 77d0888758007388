"""`fs extract`: run a backbone over a dataset's inputs into the feature cache, once.

Each distinct input (by content key) is computed once per fingerprint. Rows are
published in segments at batch boundaries, so a killed job loses at most one unpublished
segment and, resumed with the same batch size, forms the same batches and so writes
bit-identical rows on CPU. Bad items are recorded with their reason; the job goes on.
Errors that are not about an item (out of memory, a device error, a full disk, an input
file that cannot be read for a reason other than the item's own: EIO, a stale mount, a
missing dataset root) stop the job with what it computed published, and are not recorded:
a later run retries the items. A batch that runs out of memory is retried one item at a
time; an item that alone runs out of memory while the others of its batch fit is recorded.

Several jobs may extract into one fingerprint at once (two datasets, two shards): each
publishes its own segments, and keys another live job is computing are left to it
(featurestore.claims), so no input is computed twice.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from featurestore import backbones, spec_cache
from featurestore._io import NotRegularFile, check_regular, disk_full, regular_file_bytes
from featurestore.backbones.base import MODALITIES, Backbone, fingerprint_of, resolve_device
from featurestore.claims import Claims
from featurestore.config import field
from featurestore.datasets import get_dataset
from featurestore.errors import (BackboneError, BadItemError, ConfigError, DiskFullError, FeatureStoreError,
                                 InputReadError)
from featurestore.features import POOLED, SEQ, FeatureSet
from featurestore.hashing import content_key
from featurestore.segments import ErrorRecord, Segment
from featurestore.store import Store

__all__ = ["ExtractConfig", "ExtractResult", "run", "plan", "pending", "Pending"]


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    dataset: str = field("", "registered dataset name")
    modality: str = field("text", "which input of each item to encode: text | image | audio | video")
    backbone: str = field("minilm", "registered backbone name (fs backbones list)")
    params: dict = field({}, "backbone parameters (model, adapter, pooling, seq_cap, ...)")
    batch_size: int = field(32, "items per forward pass")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    limit: int = field(0, "only the first N manifest rows (0: all)")
    splits: tuple = field((), "only these splits (empty: all)")
    segment_rows: int = field(16384, "publish a segment after this many rows")
    segment_seconds: float = field(5.0, "... or after this many seconds of work, whichever comes first")
    retry_errors: bool = field(False, "retry items that failed in an earlier run")
    wait: bool = field(False, "wait for a compaction of the fingerprint to finish instead of failing")

    def __post_init__(self):
        from featurestore.devices import check_device

        check_device(self.device, "--device")
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality {self.modality!r} is not one of {list(MODALITIES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size} must be at least 1")
        if self.limit < 0:
            raise ConfigError(f"limit {self.limit} must be 0 (all) or positive")
        if self.segment_rows < 1 or not self.segment_seconds > 0:
            raise ConfigError(f"segment rows {self.segment_rows} and seconds {self.segment_seconds} must be positive")


@dataclasses.dataclass
class ExtractResult:
    fingerprint: str
    dataset: str
    modality: str
    items: int = 0  # manifest rows with this modality
    unique: int = 0  # distinct inputs among them
    cached: int = 0  # already in the store before this run
    computed: int = 0  # encoded by this run
    failed_new: int = 0  # failed in this run
    failed_total: int = 0  # items of this dataset with a recorded failure
    seconds: float = 0.0
    model_seconds: float = 0.0  # inside backbone.encode
    extract_seconds: float = 0.0  # the whole batch loop: decode, encode, checks, writes
    segments: int = 0

    @property
    def cache_hit(self) -> bool:
        return self.computed == 0 and self.failed_new == 0

    @property
    def items_per_s(self) -> float:
        """Throughput of the extraction loop (model loading excluded)."""
        return self.computed / self.extract_seconds if self.extract_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "cache_hit": self.cache_hit, "items_per_s": round(self.items_per_s, 2)}


@dataclasses.dataclass(frozen=True)
class _Item:
    key: str
    item_id: str
    source: str
    root: str | None = None  # the dataset root its file lies under (file modalities)


def plan(store: Store, config: ExtractConfig) -> tuple[list[_Item], list[ErrorRecord], int]:
    """Distinct inputs of the dataset in manifest order, items unreadable up front, row count."""
    ds = get_dataset(store, config.dataset)
    ds.check_splits(config.splits)
    df = ds.select(config.splits, config.limit)
    m = config.modality
    if df[m].null_count() == len(df):
        raise ConfigError(f"dataset {config.dataset!r} has no {m} inputs; it has "
                          f"{', '.join(ds.modalities) or 'none'}")
    root = ds.info.get("root") if m != "text" else None
    items, errors, seen = [], [], set()
    for item_id, source, key in zip(df["item_id"].to_list(), df[m].to_list(), df[f"{m}_key"].to_list()):
        if source is None:
            continue
        if key is None:
            errors.append(ErrorRecord("", config.dataset, item_id, _unreadable_reason(m, source)))
        elif key not in seen:
            seen.add(key)
            items.append(_Item(key, item_id, source, root))
    return items, errors, len(df) - df[m].null_count()


@dataclasses.dataclass
class Pending:
    """What a job over `items` still has to do against the rows already published."""

    cached: int  # items that already have a row
    todo: list  # items to compute
    new_errors: list  # failures to record now: unreadable items, and known-bad content under new item ids
    unreadable: int  # of new_errors, items that could not be read at all


def pending(rows, items: Sequence["_Item"], unreadable: Sequence[ErrorRecord], dataset: str, *,
            retry_errors: bool) -> Pending:
    """Split `items` into cached, to do, and known failures (`rows`: a FeatureSet or VASet, locked)."""
    done = rows.has([it.key for it in items]) if items else np.zeros(0, bool)
    old = [] if retry_errors else rows.errors()
    failed = {e.key: e.reason for e in old if e.key}
    recorded = {(e.dataset, e.item_id) for e in old}
    todo = [it for it, d in zip(items, done) if not d and it.key not in failed]
    # Known-bad content met again under another item id: record it for this item too, with no work.
    carried = [ErrorRecord(it.key, dataset, it.item_id, failed[it.key]) for it, d in zip(items, done)
               if not d and it.key in failed and (dataset, it.item_id) not in recorded]
    fresh = [e for e in unreadable if (e.dataset, e.item_id) not in recorded]
    return Pending(int(done.sum()), todo, fresh + carried, len(fresh))


def _unreadable_reason(modality: str, source: str) -> str:
    """Why an item that had no content key when the dataset was added cannot be read (as it is now)."""
    if modality == "text":
        return "empty text"
    try:
        check_regular(source)
        os.close(os.open(source, os.O_RDONLY))
    except NotRegularFile as exc:
        return f"'{source}' is {exc.strerror}: list regular files only"
    except FileNotFoundError:
        return f"missing file: '{source}'"
    except OSError as exc:
        return f"cannot read file '{source}': {exc.strerror}"
    return (f"file '{source}' could not be read when the dataset was added; it reads now: "
            "add the dataset again (`fs datasets add --replace`)")


# Read errors that are the item's own fault: recorded against it. Any other OSError (EIO, ESTALE,
# ETIMEDOUT, EMFILE, ENFILE, ENOMEM, ...) is about the disk or the mount: the job stops, a rerun retries.
_ITEM_ERRNOS = frozenset({errno.EACCES, errno.EPERM})
_PATH_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ELOOP,  # ... if the dataset root is there
                          errno.ENAMETOOLONG})
# OSErrors that are never about one item, wherever they come from (a decoder, a temp file).
_TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "EIO", "ESTALE", "ETIMEDOUT", "EMFILE", "ENFILE", "ENOMEM", "EAGAIN", "EINTR", "ENOLINK", "ECOMM",
    "EREMOTEIO", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH", "ECONNRESET", "ECONNABORTED",
    "ENOTCONN", "ESHUTDOWN", "ENXIO", "ENODEV", "ENOMEDIUM") if hasattr(errno, n))


def _root_there(root: str) -> bool:
    """The dataset root is a folder with something in it: an unmounted disk leaves its mount point
    as an empty folder, and then every item would look like a missing file."""
    try:
        with os.scandir(root) as entries:
            return next(entries, None) is not None
    except OSError:  # the root itself cannot be looked at (ENOENT, EIO, a stale mount): not there for us
        return False


def check_root(todo: Sequence[_Item], dataset: str) -> None:
    """Before anything is computed: stop, recording nothing, when the root that the pending items'
    files lie under is gone or empty. Items registered outside their root (--allow-outside-root)
    do not need it."""
    root = next((it.root for it in todo if it.root), None)
    if root is None:
        return
    inside = any(Path(it.source).is_relative_to(root) for it in todo if it.root == root and it.source)
    if inside and not _root_there(root):
        raise root_missing(root, dataset)


def root_missing(root: str, dataset: str = "") -> InputReadError:
    of = f" of dataset {dataset!r}" if dataset else ""
    return InputReadError(f"the dataset root {root}{of} is missing or unreadable (an unmounted or failed disk?): "
                          "nothing was recorded against its items and rows computed so far are kept; mount or "
                          "restore it and re-run, or re-register the dataset where it now lies "
                          "(fs datasets add --replace --root DIR)")


def _read_error(exc: OSError, item: _Item) -> FeatureStoreError:
    """A file that could not be read: the item's fault (BadItemError, recorded) or the storage's
    (InputReadError, transient: the job stops and a rerun retries the item)."""
    if isinstance(exc, NotRegularFile):
        return BadItemError(f"'{item.source}' is {exc.strerror}: list regular files only")
    code = exc.errno
    if code in _PATH_ERRNOS and item.root and Path(item.source).is_relative_to(item.root) \
            and not _root_there(item.root):
        return root_missing(item.root)
    if code in _PATH_ERRNOS or code in _ITEM_ERRNOS:
        return BadItemError(f"cannot read file '{item.source}': {exc.strerror}")
    name = errno.errorcode.get(code, str(code)) if code is not None else type(exc).__name__
    return InputReadError(f"cannot read {item.source}: {exc.strerror or exc} ({name}); that is the disk or mount "
                          "failing, not the item, so nothing was recorded against it and rows computed so far are "
                          "kept: re-run once the dataset's files read again")


def _raw(modality: str, item: _Item) -> bytes | str:
    if modality == "text":
        return item.source
    try:
        data = regular_file_bytes(item.source)
    except OSError as exc:
        raise _read_error(exc, item) from None
    if content_key(modality, data) != item.key:
        raise BadItemError(f"file '{item.source}' changed since the dataset was added; "
                           "re-add it with `fs datasets add --replace`")
    return data


def transient(exc: BaseException) -> bool:
    """Errors about the machine, not the item (memory, device, disk, unreadable storage): never recorded
    against an item (but see _encode_safely: an item that alone runs out of memory is)."""
    if isinstance(exc, (MemoryError, DiskFullError, InputReadError)) or disk_full(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if type(exc).__name__ in ("OutOfMemoryError", "AcceleratorError", "CudaError"):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "cuda error", "cudnn_status", "cublas_status",
                                   "device-side assert", "hip error", "mps backend out of memory"))


def stop_error(exc: BaseException, doing: str, done: str = "computed") -> BaseException:
    """The one-line error a transient failure stops a job with (`doing`: "extracting DATASET")."""
    if isinstance(exc, FeatureStoreError):
        return exc
    if disk_full(exc):
        return DiskFullError(f"disk full while {doing}: free space and re-run; rows {done} so far are kept")
    return BackboneError(f"{type(exc).__name__} while {doing} ({str(exc)[:200]}); this is not about an item, so "
                         f"nothing was recorded against one: rows {done} so far are kept, re-run to go on (perhaps "
                         "with a smaller --batch-size)")


def _prepare_one(bb: Backbone, modality: str, item: _Item) -> tuple[bool, Any]:
    """(True, prepared) or (False, reason) for one item."""
    try:
        return True, bb.prepare(_raw(modality, item))
    except BadItemError as exc:
        return False, str(exc)
    except Exception as exc:  # a decoder crash on one item must not stop a million-item job
        if transient(exc):
            raise
        return False, f"{type(exc).__name__}: {exc}"


def _prepare_batch(bb: Backbone, modality: str, batch: Sequence[_Item],
                   items_pool: ThreadPoolExecutor | None = None) -> tuple[list, list, list[tuple]]:
    """Decode and preprocess a batch: item after item, or its items at once on `items_pool` (video)."""
    if items_pool is None:
        outcomes = [_prepare_one(bb, modality, item) for item in batch]
    else:
        outcomes = list(items_pool.map(lambda item: _prepare_one(bb, modality, item), batch))
    good, prepared, bad = [], [], []
    for item, (ok, value) in zip(batch, outcomes):
        if ok:
            good.append(item)
            prepared.append(value)
        else:
            bad.append((item, value))
    return good, prepared, bad


def out_of_memory(exc: BaseException) -> bool:
    """A transient error that is running out of (host or device) memory."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    return "out of memory" in str(exc).lower()


def _free_memory() -> None:
    """Give back what a failed forward pass left allocated before trying again."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _failed_reason(exc: BaseException) -> str:
    return f"backbone failed on this item: {type(exc).__name__}: {str(exc)[:500]}"


def isolate(good: list, whole: Callable[[], Any], single: Callable[[int], Any],
            reason: Callable[[BaseException], str]) -> tuple[list, list, list]:
    """Run `whole()` for a batch of items `good`; if it fails, run `single(i)` for each item to isolate
    the culprit. Returns (kept items, outputs: `[whole()]` or one per kept item, bad (item, reason)).

    An error that is not transient is the item's: a one-item batch's item is recorded at once (not
    run twice). A batch that runs out of memory is retried one item at a time; an item that alone
    still runs out of memory while another item of the batch fits is recorded ("out of memory on
    this item alone"); if none fits, the machine is out of memory and the error stops the job. Any
    other transient error (device, disk, storage) stops the job."""
    try:
        return good, [whole()], []
    except Exception as exc:
        if transient(exc) and (len(good) == 1 or not out_of_memory(exc)):
            raise
        if len(good) == 1:
            return [], [], [(good[0], reason(exc))]
        freeing = out_of_memory(exc)
    if freeing:  # out here, once the failed pass's frames are gone
        _free_memory()
    keep, outs, bad, oom = [], [], [], []
    for i, item in enumerate(good):
        out = None
        try:
            out = single(i)
        except Exception as exc:
            if out_of_memory(exc):
                oom.append((item, exc.with_traceback(None)))  # no frames kept: they may hold the memory
            elif transient(exc):
                raise
            else:
                bad.append((item, reason(exc)))
        if out is None:
            if oom and oom[-1][0] is item:
                _free_memory()
            continue
        keep.append(item)
        outs.append(out)
    if oom and not keep:  # nothing fits, not even one item alone: the machine, not the items
        raise oom[0][1]
    bad += [(item, f"out of memory on this item alone ({type(exc).__name__}: {str(exc)[:200]}) while the other "
                   "items of its batch fit; `--retry-errors` tries it again") for item, exc in oom]
    return keep, outs, bad


class Breaker:
    """A model that fails on every item is broken (its weights, parameters or environment), not the
    items. While a model has computed no row here, not in this job nor before it (`worked`: the set
    holds rows of it), its failures on items are held back, not recorded. If it fails on each of
    `LIMIT` items in a row, or on every item (2 or more) of a job that ends without a row, and still
    no row of it has appeared (another job or shard may have computed some meanwhile), the job
    stops with a BackboneError and nothing is recorded against those items, so a fixed rerun
    computes them without `--retry-errors`. Once it computes a row, what was held is recorded.
    Items that fail before the model (a file that does not decode) are theirs: recorded as always.
    Held keys stay claimed (`keys`). A job killed while holding records nothing: a rerun retries."""

    LIMIT = 32

    def __init__(self, model: str, doing: str, worked: Callable[[], bool] = lambda: False):
        self.model, self.doing, self.worked = model, doing, worked
        self.held: list = []  # (item, reason)
        self.holding = not worked()

    @property
    def keys(self) -> list[str]:
        return [it.key for it, _ in self.held]

    def passed(self, computed: int, failed: list) -> list:
        """The model computed `computed` rows of a batch and failed on `failed`: what to record now."""
        if not self.holding:
            return failed
        if computed:
            self.holding = False
            out, self.held = self.held + failed, []
            return out
        self.held += failed
        return self._judge() if len(self.held) >= self.LIMIT else []

    def release(self) -> list:
        """At the end of a job: what is still held, to record; or the stop, if that is every item (2 or
        more) the model was given."""
        if self.holding and len(self.held) >= 2:
            return self._judge()
        out, self.held = self.held, []
        return out

    def _judge(self) -> list:
        out, self.held, self.holding = self.held, [], False
        if self.worked():  # rows of this model appeared meanwhile: these items are bad, not the model
            return out
        raise BackboneError(f"{self.model} failed on all {len(out)} items it was given while {self.doing} and "
                            f"computed none (first: {out[0][1][:300]}); the model is broken, not the items, so "
                            "nothing was recorded against them: fix its weights, parameters or environment and "
                            "run again")


def has_rows(segset) -> Callable[[], bool]:
    """Whether a segment set holds any row (its catalogue's counts: cheap, no index built)."""
    def check() -> bool:
        try:
            return any(e.get("rows", 0) > 0 for e in segset.catalogue()["segments"].values())
        except FeatureStoreError:  # a damaged catalogue: `fs verify` names it; assume nothing
            return False
    return check


def _encode_safely(bb: Backbone, good: list, prepared: list) -> tuple[list, np.ndarray | None, list | None, list]:
    """Encode a batch, isolating the items the backbone fails on (`isolate`)."""
    keep, encs, bad = isolate(good, lambda: bb.encode(prepared), lambda i: bb.encode([prepared[i]]), _failed_reason)
    if not keep:
        return [], None, None, bad
    if keep is good and not bad:  # the whole batch in one pass
        return good, encs[0].pooled, encs[0].sequences, bad
    seqs = [s for enc in encs for s in (enc.sequences or [])]
    return keep, np.concatenate([enc.pooled for enc in encs]), (seqs or None), bad


def _batches(items: Sequence[_Item], size: int) -> Iterator[Sequence[_Item]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run(config: ExtractConfig, store: Store, *, backbone: Backbone | None = None,
        progress: Callable[..., Any] | None = None, log: Callable[[str], None] = lambda s: None) -> ExtractResult:
    """Extract `config.dataset`'s `config.modality` inputs with `config.backbone` into `store`."""
    t0 = time.perf_counter()
    if config.device.startswith("cuda") and backbone is None:  # asked for a GPU: checked even on a cache hit
        resolve_device(config.device)
    if config.params.get("adapter") and backbone is None:  # a stored adapter by name or hash, or a folder
        from featurestore.adapters import resolve_adapter

        config = dataclasses.replace(config, params={**config.params,
                                                     "adapter": resolve_adapter(store, config.params["adapter"])})
    bb = backbone or backbones.create(config.backbone, config.params, device=config.device, modality=config.modality)
    if bb.modality != config.modality:
        need = "an image" if config.modality == "video" else \
            f"{'an' if config.modality[0] in 'aeiou' else 'a'} {config.modality}"
        raise ConfigError(f"backbone {bb.name!r} encodes {bb.modality}, not {config.modality}; "
                          f"pick {need} backbone (fs backbones list)")
    job = _Job(config, store, bb, *plan(store, config), t0, progress, log)
    remembered = spec_cache.lookup(store, bb)
    if remembered is not None:
        fs = FeatureSet(store, fingerprint_of(bb.name, remembered))
        # a compaction in progress is found before any model load
        with fs.lock(shared=True, wait=config.wait, wait_option=True):
            if fs.exists() and not pending(fs, job.items, job.unreadable, config.dataset,
                                           retry_errors=config.retry_errors).todo:
                return job.extract(fs, remembered)  # nothing to compute: no model needed
            # A remembered spec is about to name rows: check it against the real model first.
            if fingerprint_of(bb.name, bb.load().spec()) == fs.fingerprint:
                return job.extract(fs, remembered)
        spec_cache.forget(store, bb)
    bb.load()
    spec = bb.spec()
    spec_cache.remember(store, bb, spec)
    fs = FeatureSet(store, fingerprint_of(bb.name, spec))
    with fs.lock(shared=True, wait=config.wait, wait_option=True):
        return job.extract(fs, spec)


@dataclasses.dataclass
class _Job:
    config: ExtractConfig
    store: Store
    bb: Backbone
    items: list
    unreadable: list
    n_rows: int
    t0: float
    progress: Any
    log: Callable[[str], None]

    def extract(self, fs: FeatureSet, spec: dict) -> ExtractResult:
        """The work, under the fingerprint's (shared) writer lock."""
        config = self.config
        result = ExtractResult(fs.fingerprint, config.dataset, config.modality, items=self.n_rows,
                               unique=len(self.items))
        fs.ensure_spec(spec)
        fs.segments.remove_temp_files(dead_only=True)  # what killed jobs left half-written
        fs.segments.adopt_orphans()  # segments of a job killed between publishing and registering
        # Segments named before `pending` reads: what `pending` accounted for is at least these, and any
        # segment another job publishes later is read by `_Output.published` before its keys are claimed.
        # (Taken after `pending`, a segment published in between was in neither: its keys computed twice.)
        self.accounted = set(fs.segments.catalogue()["segments"])
        work = pending(fs, self.items, self.unreadable, config.dataset, retry_errors=config.retry_errors)
        result.cached, todo = work.cached, work.todo
        check_root(todo, config.dataset)  # an unmounted disk: stop before recording anything against items
        writer = fs.segments.writer(dtypes={POOLED: fs.dtype, SEQ: fs.dtype}, shapes={POOLED: (fs.dim,)},
                                    attrs={"fingerprint": fs.fingerprint, "backbone": self.bb.name})
        writer.add_errors(work.new_errors)
        result.failed_new += work.unreadable
        try:
            if todo:
                self.log(f"{fs.fingerprint}: {len(todo)} to compute, {result.cached} cached")
                t_loop = time.perf_counter()
                self.compute(fs, todo, writer, result)
                result.extract_seconds = time.perf_counter() - t_loop
        except BaseException as exc:
            with contextlib.suppress(Exception):  # publish what was computed before the job stopped
                writer.flush()
            if isinstance(exc, Exception) and transient(exc):
                raise stop_error(exc, f"extracting {config.dataset}") from None
            raise
        result.segments += bool(writer.flush())
        ds = get_dataset(self.store, config.dataset)
        fs.record_dataset(config.dataset, {"modality": config.modality, "limit": config.limit,
                                           "splits": sorted(config.splits), "manifest_hash": ds.manifest_hash})
        result.failed_total = len({e.item_id for e in fs.standing_errors(ds)})
        result.seconds = time.perf_counter() - self.t0
        return result


    def compute(self, fs: FeatureSet, todo: list, writer, result: ExtractResult) -> None:
        """Encode `todo` into `fs` in this process (`--engine ray` overrides this: jobs/ray_extract.py)."""
        with Claims(fs.folder) as claims:
            _extract(self.bb, self.config, todo, _Output(fs, writer, claims, result, set(self.accounted)),
                     self.progress)


class _Output:
    """Where computed rows go: the writer, the claims of this job, and what others have published."""

    def __init__(self, fs: FeatureSet, writer, claims: Claims, result: ExtractResult, accounted: set | None = None,
                 done: set | None = None):
        """`accounted`: the segments whose rows the job's `pending` already excluded (taken before it
        read); any other segment is read here before its keys are claimed. A Ray actor passes the same
        `accounted` and `done` sets for shard after shard (updated in place), so each segment is read once."""
        self.fs, self.writer, self.claims, self.result = fs, writer, claims, result
        self.breaker: Breaker | None = None  # set by _extract: the failures it holds stay claimed
        self.seen = accounted if accounted is not None else set(fs.segments.catalogue()["segments"])
        self.done: set[str] = done if done is not None else set()
        self._stamp: tuple = ()
        self.last_flush = time.perf_counter()

    def published(self, keys: list[str]) -> list[bool]:
        """Which keys are in segments published since this job started (by other jobs)."""
        try:
            st = self.fs.segments.catalogue_path.stat()
        except FileNotFoundError:  # nothing published yet
            return [False] * len(keys)
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:  # unchanged: no need to parse it
            return [k in self.done for k in keys]
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        for name in set(self.fs.segments.catalogue()["segments"]) - self.seen:
            self.seen.add(name)
            with contextlib.suppress(FeatureStoreError):  # retired or gone since: its rows are in the merge
                seg = Segment(self.fs.folder / name)
                self.done.update(k.decode() for k in seg.keys())
                self.done.update(e.key for e in seg.errors() if e.key)
        return [k in self.done for k in keys]

    def claim(self, batch: Sequence[_Item]) -> tuple[list[_Item], list[_Item]]:
        mine, theirs = self.claims.claim([it.key for it in batch], self.published)
        mine, theirs = set(mine), set(theirs)
        return [it for it in batch if it.key in mine], [it for it in batch if it.key in theirs]

    def maybe_flush(self, config: ExtractConfig, *, force: bool = False) -> None:
        due = self.writer.pending_rows >= config.segment_rows or \
            time.perf_counter() - self.last_flush > config.segment_seconds
        if force or due:
            path = self.writer.flush()
            if path is not None:
                self.seen.add(path.name)
                self.result.segments += 1
            self.claims.release(keep=self.breaker.keys if self.breaker else ())
            self.last_flush = time.perf_counter()


def _extract(bb: Backbone, config: ExtractConfig, todo: list[_Item], out: _Output,
             progress: Callable[..., Any] | None) -> None:
    bar = progress(total=len(todo), desc=f"extract {config.dataset}/{config.modality}", unit="item") if progress else None
    queue = todo
    breaker = out.breaker = Breaker(f"backbone {bb.name}", f"extracting {config.dataset}", has_rows(out.fs.segments))
    while queue:
        later = _extract_pass(bb, config, queue, out, bar, breaker)
        if later:  # inputs another live job is computing: wait for its segments (or its death)
            out.maybe_flush(config, force=True)
            time.sleep(0.2)
        queue = later
    held = breaker.release()
    out.writer.add_errors(ErrorRecord(it.key, config.dataset, it.item_id, reason) for it, reason in held)
    out.result.failed_new += len(held)
    if bar is not None:
        bar.close()


def _extract_pass(bb: Backbone, config: ExtractConfig, todo: list[_Item], out: _Output, bar,
                  breaker: Breaker) -> list[_Item]:
    """One pass over `todo` in fixed batches; returns the items left to another job."""
    result, writer, later = out.result, out.writer, []
    batches = list(_batches(todo, config.batch_size))
    # Decode batch i+1 on a thread while the model runs on batch i; a backbone with
    # prepare_workers > 1 (video) decodes that batch's items on as many threads at once.
    workers = max(1, int(getattr(bb, "prepare_workers", 1)))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-decode") as pool, \
            (ThreadPoolExecutor(workers, thread_name_prefix="fs-decode-item") if workers > 1
             else contextlib.nullcontext()) as items_pool:
        decoding = pool.submit(_prepare_batch, bb, config.modality, batches[0], items_pool)
        for i in range(len(batches)):
            good, prepared, bad = decoding.result()
            if i + 1 < len(batches):
                decoding = pool.submit(_prepare_batch, bb, config.modality, batches[i + 1], items_pool)
            mine, theirs = out.claim(batches[i])
            later += theirs
            if len(mine) < len(batches[i]):
                keep = {it.key for it in mine}
                prepared = [p for it, p in zip(good, prepared) if it.key in keep]
                good = [it for it in good if it.key in keep]
                bad = [(it, r) for it, r in bad if it.key in keep]
            t = time.perf_counter()
            good, pooled, seqs, bad2 = _encode_safely(bb, good, prepared) if good else ([], None, None, [])
            result.model_seconds += time.perf_counter() - t
            keep = []
            if pooled is not None:
                finite = np.isfinite(pooled).all(axis=1)
                if seqs is not None:
                    finite &= np.array([np.isfinite(s).all() for s in seqs])
                bad2 += [(it, "backbone produced NaN or inf") for it, ok in zip(good, finite) if not ok]
                keep = np.flatnonzero(finite)
                writer.add([good[j].key for j in keep], {POOLED: pooled[keep]},
                           {SEQ: [seqs[j] for j in keep]} if seqs is not None else None)
                result.computed += len(keep)
            bad += breaker.passed(len(keep), bad2)  # the model's failures, held while it has computed nothing
            writer.add_errors(ErrorRecord(it.key, config.dataset, it.item_id, reason) for it, reason in bad)
            result.failed_new += len(bad)
            out.maybe_flush(config)
            if bar is not None:
                bar.update(len(batches[i]) - len(theirs))
                bar.set_postfix(failed=result.failed_new, refresh=False)
    return later
