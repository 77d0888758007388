"""`fs extract`: run a backbone over a dataset's inputs into the feature cache, once.

Each distinct input (by content key) is computed once per fingerprint. Rows are
published in segments at batch boundaries, so a killed job loses at most one unpublished
segment and, resumed with the same batch size, forms the same batches and so writes
bit-identical rows on CPU. Bad items are recorded with their reason; the job goes on.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from featurestore import backbones, spec_cache
from featurestore.backbones.base import MODALITIES, Backbone, fingerprint_of
from featurestore.config import field
from featurestore.datasets import get_dataset
from featurestore.errors import BadItemError, ConfigError
from featurestore.features import POOLED, SEQ, FeatureSet
from featurestore.hashing import content_key
from featurestore.segments import ErrorRecord
from featurestore.store import Store

__all__ = ["ExtractConfig", "ExtractResult", "run", "plan", "pending", "Pending"]


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
    dataset: str = field("", "registered dataset name")
    modality: str = field("text", "which input of each item to encode: text | image | audio")
    backbone: str = field("minilm", "registered backbone name (fs backbones list)")
    params: dict = field({}, "backbone parameters (model, adapter, pooling, seq_cap, ...)")
    batch_size: int = field(32, "items per forward pass")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    limit: int = field(0, "only the first N manifest rows (0: all)")
    splits: tuple = field((), "only these splits (empty: all)")
    segment_rows: int = field(16384, "publish a segment after this many rows")
    segment_seconds: float = field(30.0, "... or after this many seconds, whichever comes first")
    retry_errors: bool = field(False, "retry items that failed in an earlier run")

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality {self.modality!r} is not one of {list(MODALITIES)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size} must be at least 1")
        if self.limit < 0:
            raise ConfigError(f"limit {self.limit} must be 0 (all) or positive")


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


def plan(store: Store, config: ExtractConfig) -> tuple[list[_Item], list[ErrorRecord], int]:
    """Distinct inputs of the dataset in manifest order, items unreadable up front, row count."""
    ds = get_dataset(store, config.dataset)
    df = ds.manifest
    if config.splits:
        df = df.filter(df["split"].is_in(list(config.splits)))
    if config.limit:
        df = df.head(config.limit)
    m = config.modality
    if df[m].null_count() == len(df):
        raise ConfigError(f"dataset {config.dataset!r} has no {m} inputs; it has "
                          f"{', '.join(ds.modalities) or 'none'}")
    items, errors, seen = [], [], set()
    for item_id, source, key in zip(df["item_id"].to_list(), df[m].to_list(), df[f"{m}_key"].to_list()):
        if source is None:
            continue
        if key is None:
            errors.append(ErrorRecord("", config.dataset, item_id, _unreadable_reason(m, source)))
        elif key not in seen:
            seen.add(key)
            items.append(_Item(key, item_id, source))
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
    if modality == "text":
        return "empty text"
    path = Path(source)
    if not path.exists():
        return f"missing file: {source}"
    return f"cannot read file: {source}"


def _raw(modality: str, item: _Item) -> bytes | str:
    if modality == "text":
        return item.source
    try:
        data = Path(item.source).read_bytes()
    except OSError as exc:
        raise BadItemError(f"cannot read file {item.source}: {exc.strerror}") from None
    if content_key(modality, data) != item.key:
        raise BadItemError(f"file {item.source} changed since the dataset was added; "
                           "re-add it with `fs datasets add --replace`")
    return data


def _prepare_batch(bb: Backbone, modality: str, batch: Sequence[_Item]) -> tuple[list, list, list[tuple]]:
    good, prepared, bad = [], [], []
    for item in batch:
        try:
            prepared.append(bb.prepare(_raw(modality, item)))
            good.append(item)
        except BadItemError as exc:
            bad.append((item, str(exc)))
        except Exception as exc:  # a decoder crash on one item must not stop a million-item job
            bad.append((item, f"{type(exc).__name__}: {exc}"))
    return good, prepared, bad


def _encode_safely(bb: Backbone, good: list, prepared: list) -> tuple[list, np.ndarray | None, list | None, list]:
    """Encode a batch; if it fails, fall back to one item at a time to isolate the culprit."""
    try:
        enc = bb.encode(prepared)
        return good, enc.pooled, enc.sequences, []
    except Exception:
        if len(prepared) == 1:
            raise
    keep, pooled, seqs, bad = [], [], [], []
    for item, p in zip(good, prepared):
        try:
            enc = bb.encode([p])
        except Exception as exc:
            bad.append((item, f"backbone failed on this item: {type(exc).__name__}: {exc}"))
            continue
        keep.append(item)
        pooled.append(enc.pooled)
        seqs.extend(enc.sequences or [])
    if not keep:
        return [], None, None, bad
    return keep, np.concatenate(pooled), (seqs or None), bad


def _batches(items: Sequence[_Item], size: int) -> Iterator[Sequence[_Item]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run(config: ExtractConfig, store: Store, *, backbone: Backbone | None = None,
        progress: Callable[..., Any] | None = None, log: Callable[[str], None] = lambda s: None) -> ExtractResult:
    """Extract `config.dataset`'s `config.modality` inputs with `config.backbone` into `store`."""
    t0 = time.perf_counter()
    bb = backbone or backbones.create(config.backbone, config.params, device=config.device)
    if bb.modality != config.modality:
        raise ConfigError(f"backbone {bb.name!r} encodes {bb.modality}, not {config.modality}; "
                          f"pick {'an' if config.modality[0] in 'aeiou' else 'a'} {config.modality} backbone (fs backbones list)")
    items, unreadable, n_rows = plan(store, config)
    return _run(config, store, bb, items, unreadable, n_rows, t0, progress, log, trust_cache=True)


def _run(config: ExtractConfig, store: Store, bb: Backbone, items, unreadable, n_rows: int, t0: float,
         progress, log, *, trust_cache: bool) -> ExtractResult:
    spec = spec_cache.lookup(store, bb) if trust_cache else None
    if spec is None:  # resolve it the expensive way: load the model, hash its weights
        bb.load()
        spec = bb.spec()
        spec_cache.remember(store, bb, spec)
    fs = FeatureSet(store, fingerprint_of(bb.name, spec))
    if not bb._loaded and (not fs.exists() or pending(fs, items, unreadable, config.dataset,
                                                      retry_errors=config.retry_errors).todo):
        # A remembered spec is about to name rows: check it against the real model first.
        bb.load()
        if fingerprint_of(bb.name, bb.spec()) != fs.fingerprint:
            spec_cache.forget(store, bb)
            return _run(config, store, bb, items, unreadable, n_rows, t0, progress, log, trust_cache=False)
    result = ExtractResult(fs.fingerprint, config.dataset, config.modality, items=n_rows, unique=len(items))
    fs.folder.mkdir(parents=True, exist_ok=True)
    with fs.lock():
        fs.ensure_spec(spec)
        work = pending(fs, items, unreadable, config.dataset, retry_errors=config.retry_errors)
        result.cached, todo = work.cached, work.todo
        writer = fs.segments.writer(dtypes={POOLED: fs.dtype, SEQ: fs.dtype},
                                    attrs={"fingerprint": fs.fingerprint, "backbone": bb.name})
        writer.add_errors(work.new_errors)
        result.failed_new += work.unreadable
        if todo:
            log(f"{fs.fingerprint}: {len(todo)} to compute, {result.cached} cached")
            t_loop = time.perf_counter()
            _extract(bb, config, todo, writer, result, progress)
            result.extract_seconds = time.perf_counter() - t_loop
        result.segments += bool(writer.flush())
        result.failed_total = len({(e.dataset, e.item_id) for e in fs.errors() if e.dataset == config.dataset})
    result.seconds = time.perf_counter() - t0
    return result


def _extract(bb: Backbone, config: ExtractConfig, todo: list[_Item], writer, result: ExtractResult,
             progress: Callable[..., Any] | None) -> None:
    bar = progress(total=len(todo), desc=f"extract {config.dataset}/{config.modality}", unit="item") if progress else None
    last_flush = time.perf_counter()
    batches = list(_batches(todo, config.batch_size))
    # Decode batch i+1 on a thread while the model runs on batch i.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fs-decode") as pool:
        pending = pool.submit(_prepare_batch, bb, config.modality, batches[0])
        for i in range(len(batches)):
            good, prepared, bad = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(_prepare_batch, bb, config.modality, batches[i + 1])
            t = time.perf_counter()
            good, pooled, seqs, bad2 = _encode_safely(bb, good, prepared) if good else ([], None, None, [])
            result.model_seconds += time.perf_counter() - t
            bad += bad2
            if pooled is not None:
                finite = np.isfinite(pooled).all(axis=1)
                if seqs is not None:
                    finite &= np.array([np.isfinite(s).all() for s in seqs])
                bad += [(it, "backbone produced NaN or inf") for it, ok in zip(good, finite) if not ok]
                keep = np.flatnonzero(finite)
                writer.add([good[j].key for j in keep], {POOLED: pooled[keep]},
                           {SEQ: [seqs[j] for j in keep]} if seqs is not None else None)
                result.computed += len(keep)
            writer.add_errors(ErrorRecord(it.key, config.dataset, it.item_id, reason) for it, reason in bad)
            result.failed_new += len(bad)
            if writer.pending_rows >= config.segment_rows or time.perf_counter() - last_flush > config.segment_seconds:
                result.segments += bool(writer.flush())
                last_flush = time.perf_counter()
            if bar is not None:
                bar.update(len(batches[i]))
                bar.set_postfix(failed=result.failed_new, refresh=False)
    if bar is not None:
        bar.close()
