"""VA jobs: score a dataset's modality into the VA cache (`run`), fit a learned scorer (`fit`).

`run` scores each distinct input (by content key) once per source and publishes the
rows in segments, like `jobs.extract`; a scorer for the wrong modality is refused before
the dataset is even read. A feature scorer (`learned`) reads the cached embeddings of its
fingerprint and never reruns the backbone; inputs without a cached embedding are counted
as `missing_features` and left for a later run. A NaN or inf where the scorer claims to
give a value is recorded as an error for that item, never stored.

Failures follow `jobs.extract` (docs/store.md, Failures): an item the scorer or its decoder
raises on is recorded with the reason and the job goes on, also when it is alone in its batch
(it is not scored twice). Errors that are not about an item (`jobs.extract.transient`: an input
file that cannot be read because of the disk or mount (EIO, ESTALE, ...), a missing dataset
root, out of memory, a device error, a full disk) stop the job with one line after publishing
what it scored, and are not recorded, so a rerun retries those items. A batch that runs out of
memory is retried one item at a time; an item that alone runs out of memory while another item
of its batch fits is recorded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featurestore import va as va_registry
from featurestore._io import (cleaned_on_failure, publish, publish_folder, raise_if_disk_full, tmp_path,
                              write_checksums, write_json_atomic)
from featurestore.backbones.base import MODALITIES
from featurestore.config import field, from_strings, to_dict
from featurestore.datasets import get_dataset
from featurestore.errors import BadItemError, ConfigError, NotFoundError
from featurestore.features import FeatureSet, resolve_features
from featurestore.reader import load_split, parse_feature_refs
from featurestore.segments import ErrorRecord
from featurestore.store import Store, check_name, now_iso
from featurestore.va.base import VAScorer
from featurestore.va.cache import DTYPES, KNOWN, VA, VASet
from featurestore.va.learned import (CONFIG, METRICS, REGRESSORS, WEIGHTS, FitParams, evaluate, list_models,
                                     models_root)
from featurestore.jobs.extract import (Breaker, ExtractConfig, _batches, _Item, _raw, check_root, has_rows, isolate,
                                      pending, plan, stop_error, transient)

__all__ = ["VAConfig", "VAResult", "run", "make_scorer", "FitConfig", "FitResult", "fit"]


# ---- scoring ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VAConfig:
    dataset: str = field("", "registered dataset name")
    modality: str = field("text", "which input of each item to score: text | image | audio")
    scorer: str = field("lexicon", "VA scorer name (fs va list), or the name of a fitted model (fs va models)")
    params: dict = field({}, "scorer parameters (lexicon, scale, model, range, ...)")
    batch_size: int = field(64, "items per scorer call")
    device: str = field("auto", "auto | cpu | cuda[:N]")
    limit: int = field(0, "only the first N manifest rows (0: all)")
    splits: tuple = field((), "only these splits (empty: all)")
    segment_rows: int = field(4096, "publish a segment after this many rows")
    retry_errors: bool = field(False, "retry items that failed in an earlier run")

    def __post_init__(self):
        from featurestore.devices import check_device

        check_device(self.device, "--device")
        if self.modality not in MODALITIES:
            raise ConfigError(f"modality {self.modality!r} is not one of {list(MODALITIES)}")
        if self.batch_size < 1 or self.segment_rows < 1 or self.limit < 0:
            raise ConfigError("batch_size and segment_rows must be at least 1, limit 0 (all) or more")


@dataclasses.dataclass
class VAResult:
    source: str
    scorer: str
    dataset: str
    modality: str
    items: int = 0  # manifest rows with this modality
    unique: int = 0  # distinct inputs among them
    cached: int = 0  # already scored under this source
    computed: int = 0  # scored by this run
    unknown: int = 0  # of those, rows where a dimension the scorer gives had no evidence (stored as NaN)
    failed_new: int = 0
    failed_total: int = 0
    missing_features: int = 0  # feature scorers: inputs with no cached embedding yet
    segments: int = 0
    seconds: float = 0.0

    @property
    def cache_hit(self) -> bool:
        return self.computed == 0 and self.failed_new == 0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "cache_hit": self.cache_hit}


def make_scorer(store: Store, name: str, params: dict | None = None, *, device: str = "auto") -> VAScorer:
    """A registered scorer by name, or a fitted model's name meaning `learned` with that model."""
    params = dict(params or {})
    if name not in va_registry.REGISTRY and name in list_models(store):
        return va_registry.create("learned", {"model": name, **params}, device=device, store=store)
    if name not in va_registry.REGISTRY:
        models = list_models(store)
        raise NotFoundError(f"VA scorer {name!r} is not registered; known: {', '.join(va_registry.names())}"
                            f"{'; fitted models: ' + ', '.join(models) if models else ''} (fs va list)")
    return va_registry.create(name, params, device=device, store=store)


def run(config: VAConfig, store: Store, *, scorer: VAScorer | None = None,
        progress: Callable[..., Any] | None = None, log: Callable[[str], None] = lambda s: None) -> VAResult:
    """Score `config.dataset`'s `config.modality` inputs with `config.scorer` into the VA cache."""
    t0 = time.perf_counter()
    scorer = scorer or make_scorer(store, config.scorer, config.params, device=config.device)
    scorer.check_modality(config.modality)  # before any data is read or weights loaded
    features, frames = _feature_set(store, scorer, config.modality)
    items, unreadable, n_rows = plan(store, ExtractConfig(dataset=config.dataset, modality=config.modality,
                                                          limit=config.limit, splits=tuple(config.splits)))
    spec = scorer.full_spec(config.modality)
    vs = VASet(store, scorer.source(config.modality))
    result = VAResult(vs.source, scorer.name, config.dataset, config.modality, items=n_rows, unique=len(items))
    vs.folder.mkdir(parents=True, exist_ok=True)
    with vs.lock():
        vs.ensure_spec(spec)
        vs.segments.remove_temp_files()  # the lock is exclusive: these are a killed job's
        vs.segments.adopt_orphans()
        work = pending(vs, items, unreadable, config.dataset, retry_errors=config.retry_errors)
        result.cached, todo = work.cached, work.todo
        if features is None:  # an unmounted disk: stop before recording anything against items
            check_root(todo, config.dataset)
        writer = vs.segments.writer(dtypes=DTYPES, shapes={VA: (2,), KNOWN: (2,)},
                                    attrs={"source": vs.source, "scorer": scorer.name})
        writer.add_errors(work.new_errors)
        result.failed_new += work.unreadable
        if features is not None and todo:
            have = features.has([it.key for it in todo])
            result.missing_features = int((~have).sum())
            todo = [it for it, h in zip(todo, have) if h]
        try:
            if todo:
                log(f"{vs.source}: {len(todo)} to score, {result.cached} cached")
                _score_all(scorer, config, todo, features, frames, writer, result, progress)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # publish what was scored before the job stopped
                writer.flush()
            if isinstance(exc, Exception) and transient(exc):
                raise stop_error(exc, f"scoring VA for {config.dataset}", "scored") from None
            raise
        result.segments += bool(writer.flush())
        result.failed_total = len({e.item_id for e in vs.standing_errors(get_dataset(store, config.dataset))})
    result.seconds = time.perf_counter() - t0
    return result


def _feature_set(store: Store, scorer: VAScorer, modality: str) -> tuple[FeatureSet | None, bool]:
    if scorer.inputs != "features":
        return None, False
    fingerprint, frames = scorer.features_for(modality)
    fs = FeatureSet(store, fingerprint)
    if not fs.exists():
        raise NotFoundError(f"VA scorer {scorer.name!r} reads features {fingerprint!r}, which are not in "
                            f"{store.root}; extract them first with `fs extract` (same backbone and parameters)")
    return fs, frames


def _score_all(scorer: VAScorer, config: VAConfig, todo: list[_Item], features: FeatureSet | None, frames: bool,
               writer, result: VAResult, progress) -> None:
    bar = progress(total=len(todo), desc=f"va {config.dataset}/{config.modality}", unit="item") if progress else None
    breaker = Breaker(f"VA scorer {scorer.name}", f"scoring VA for {config.dataset}", has_rows(writer.segset))
    for batch in _batches(todo, config.batch_size):
        if features is not None:
            keys = [it.key for it in batch]
            rows = features.read_sequences(keys, dtype=np.float32)[0] if frames else \
                features.read_pooled(keys, dtype=np.float32)[0]
            bad = []
            good, values, failed = _score_safely(scorer, config.modality, list(batch), rows)
        else:
            good, prepared, bad = _prepare(scorer, config.modality, batch)
            good, values, failed = _score_safely(scorer, config.modality, good, prepared) if good else ([], None, [])
        before = result.computed
        if values is not None:
            failed += _add_rows(writer, scorer, good, values, result)
        bad += breaker.passed(result.computed - before, failed)  # the scorer's failures, held while it has scored none
        writer.add_errors(ErrorRecord(it.key, config.dataset, it.item_id, reason) for it, reason in bad)
        result.failed_new += len(bad)
        if writer.pending_rows >= config.segment_rows:
            result.segments += bool(writer.flush())
        if bar is not None:
            bar.update(len(batch))
    held = breaker.release()
    writer.add_errors(ErrorRecord(it.key, config.dataset, it.item_id, reason) for it, reason in held)
    result.failed_new += len(held)
    if bar is not None:
        bar.close()


def _prepare(scorer: VAScorer, modality: str, batch: Sequence[_Item]) -> tuple[list, list, list]:
    good, prepared, bad = [], [], []
    for item in batch:
        try:
            prepared.append(scorer.prepare(_raw(modality, item), modality))
            good.append(item)
        except BadItemError as exc:
            bad.append((item, str(exc)))
        except Exception as exc:  # a decoder crash on one item must not stop the job ...
            if transient(exc):  # ... but unreadable storage, memory or a full disk is not the item's fault
                raise
            bad.append((item, f"{type(exc).__name__}: {exc}"))
    return good, prepared, bad


def _failed_reason(exc: BaseException) -> str:
    return f"VA scorer failed on this item: {type(exc).__name__}: {str(exc)[:500]}"


def _score_safely(scorer: VAScorer, modality: str, good: list, inputs) -> tuple[list, np.ndarray | None, list]:
    """Score a batch, isolating the items the scorer fails on (`jobs.extract.isolate`)."""
    keep, rows, bad = isolate(good, lambda: _checked(scorer.score(inputs, modality), len(good)),
                              lambda i: _checked(scorer.score(inputs[i:i + 1], modality), 1), _failed_reason)
    return keep, (np.concatenate(rows) if rows else None), bad


def _checked(values, n: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (n, 2):
        raise ConfigError(f"VA scorer returned shape {values.shape}, expected ({n}, 2)")
    return values


def _add_rows(writer, scorer: VAScorer, items: list[_Item], values: np.ndarray, result: VAResult) -> list:
    """Store the finite values; non-finite ones where the scorer gives a value become errors."""
    provides = np.array(scorer.provides(), bool)
    finite = np.isfinite(values)
    broken = np.isinf(values) if scorer.nan_is_unknown else ~finite
    bad_rows = (broken & provides).any(1) | (finite & (np.abs(values) > 1.0 + 1e-6)).any(1)
    known = finite & provides & ~bad_rows[:, None]
    keep = np.flatnonzero(~bad_rows)
    writer.add([items[i].key for i in keep], {VA: np.where(known, values, 0.0)[keep], KNOWN: known[keep]})
    result.computed += len(keep)
    result.unknown += int((~known[keep] & provides).any(1).sum())
    return [(items[i], _reason(values[i])) for i in np.flatnonzero(bad_rows)]


def _reason(row: np.ndarray) -> str:
    if not np.isfinite(row).all():
        return f"VA scorer produced NaN or inf (valence={row[0]}, arousal={row[1]})"
    return f"VA scorer produced a value outside [-1, 1] (valence={row[0]}, arousal={row[1]})"


# ---- fitting ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitConfig:
    dataset: str = field("", "dataset with VA labels (its manifest's valence/arousal columns)")
    features: str = field("", "[MODALITY=]BACKBONE_OR_FINGERPRINT: one feature set; a backbone name means its "
                              "fingerprint that covers the dataset")
    out: str = field("", "name of the fitted model (store/va_models/<out>/)")
    params: dict = field({}, "regressor parameters: kind=ridge|mlp, alpha, hidden, epochs, lr, ...")
    train_splits: tuple = field(("train",), "splits to fit on")
    test_split: str = field("test", "held-out split the metrics are measured on (empty: none)")
    replace: bool = field(False, "overwrite an existing model of the same name")

    def __post_init__(self):
        if not self.dataset or not self.features or not self.out:
            raise ConfigError("fitting a VA model needs a dataset, features and an output name")
        check_name(self.out, "VA model")
        if self.test_split and self.test_split in self.train_splits:
            raise ConfigError(f"test split {self.test_split!r} is also a training split")


@dataclasses.dataclass
class FitResult:
    name: str
    folder: str
    kind: str
    fingerprint: str
    modality: str
    n_train: dict
    metrics: dict  # held-out: dimension -> {n, pearson, ccc, rmse}
    train_metrics: dict
    fit_info: dict
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _labelled(store: Store, dataset, split: str, fs: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    data = load_split(store, dataset, split, {fs.modality: fs.fingerprint}, allow_empty=True)
    y = np.stack([data.valence, data.arousal], axis=1)
    rows = data.masks[fs.modality] & np.isfinite(y).any(1)
    return data.features[fs.modality][rows].astype(np.float64), y[rows]


def fit(config: FitConfig, store: Store, *, log: Callable[[str], None] = lambda s: None) -> FitResult:
    """Fit a VA regressor on cached embeddings and the dataset's VA labels; save it with its metrics."""
    t0 = time.perf_counter()
    params = from_strings(FitParams, {k: str(v) for k, v in config.params.items()}, what="VA model")
    folder = models_root(store) / config.out
    if (folder / CONFIG).exists() and not config.replace:
        raise ConfigError(f"VA model {config.out!r} already exists in {store.root}; pass --replace to overwrite it")
    ds = get_dataset(store, config.dataset)
    refs = parse_feature_refs(config.features, store)
    if len(refs) != 1:
        raise ConfigError(f"--features {config.features!r} names {len(refs)} feature sets; a VA model is fitted on "
                          "one, e.g. --features text=minilm")
    (mod, ref), = refs.items()
    fs = resolve_features(store, ref, modality=mod, dataset=ds)
    for split in (*config.train_splits, *([config.test_split] if config.test_split else [])):
        if split not in ds.splits():
            raise ConfigError(f"dataset {ds.name!r} has no split {split!r}; splits: {', '.join(ds.splits())}")
    parts = [_labelled(store, ds, s, fs) for s in config.train_splits]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if len(x) < 2:
        raise ConfigError(f"only {len(x)} item(s) of {ds.name!r} in {list(config.train_splits)} have both a cached "
                          f"embedding under {fs.fingerprint} and a VA label; extract them (fs extract) or give a "
                          "dataset with valence/arousal labels")
    log(f"fitting {params.kind} on {len(x)} items of {ds.name} ({fs.fingerprint})")
    model = REGRESSORS[params.kind](params).fit(x, y)
    train_metrics = evaluate(model.predict(x), y)
    metrics = {}
    if config.test_split:
        xt, yt = _labelled(store, ds, config.test_split, fs)
        metrics = evaluate(model.predict(xt), yt) if len(xt) else {}
    provides = [bool(np.isfinite(y[:, j]).any()) for j in range(2)]
    n_train = {d: int(np.isfinite(y[:, j]).sum()) for j, d in enumerate(("valence", "arousal"))}
    info = {"name": config.out, "modality": fs.modality, "fingerprint": fs.fingerprint, "backbone": fs.backbone,
            "dim": fs.dim, "provides": provides, "params": to_dict(params), "created_at": now_iso(),
            "fitted_on": {"dataset": ds.name, "manifest_hash": ds.manifest_hash,
                          "train_splits": list(config.train_splits), "test_split": config.test_split,
                          "n_train": n_train}}
    try:
        _save(folder, model.tensors(), info, {"test": metrics, "train": train_metrics, "fit": model.fit_info()},
              overwrite=config.replace)
    except FileExistsError:  # another `va fit --out` of the same name saved its model while this one fitted
        raise ConfigError(f"VA model {config.out!r} already exists in {store.root} (another job saved it while this "
                          "one fitted; that model is kept); pass --replace to overwrite it") from None
    return FitResult(config.out, str(folder), params.kind, fs.fingerprint, fs.modality, n_train, metrics,
                     train_metrics, model.fit_info(), time.perf_counter() - t0)


def _save(folder, tensors: dict, info: dict, metrics: dict, *, overwrite: bool = True) -> None:
    """Build the whole model folder (weights, metrics.json, config.json, checksums.json over the three)
    under a hidden temporary name beside it, and only then publish it as one unit (`_io.publish_folder`:
    a new model by one rename, a replaced one by an atomic exchange of the two folders, after which the
    old one is deleted). A kill or a full disk at any point leaves the old model and its checksums whole
    (plus at most a `.NAME.*.tmp` folder that `fs gc` removes); a full disk is a DiskFullError."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(folder)
    try:
        tmp.mkdir()
        weights = tmp / WEIGHTS
        part = tmp_path(weights)
        with cleaned_on_failure(part, folder / WEIGHTS):
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(part),
                      metadata={"format": "featurestore-va-model", "kind": info["params"]["kind"]})
        publish(part, weights)  # fsyncs the file and the temporary folder
        write_json_atomic(tmp / METRICS, metrics)
        write_json_atomic(tmp / CONFIG, info)
        write_checksums(tmp, [WEIGHTS, METRICS, CONFIG])
        publish_folder(tmp, folder, overwrite=overwrite)  # one rename, or an atomic exchange with the old one
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, folder)
        raise
