"""`fs train-head`: train a registered head from cached features, evaluate once, save the run.

```
heads/<run-id>/model.safetensors   the head's learned tensors
heads/<run-id>/config.json         head name, parameters, meta (dims, classes, kind)
heads/<run-id>/metrics.json        test metrics (once), best validation score, training history
heads/<run-id>/lineage.json        feature fingerprints, dataset + manifest hash, seed, validation carving
heads/<run-id>/confusion.png | per_class_f1.png | va.png
```
The run folder is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

import featurestore.heads as heads
from featurestore import __version__
from featurestore._io import (check_checksums, json_safe, require_intact, publish_folder, tmp_path, read_checked_json,
                              write_checksums, write_json_atomic)
from featurestore.config import SEED_MAX, field
from featurestore.errors import ConfigError, FeatureStoreError, IntegrityError, NotFoundError
from featurestore.features import superseded_by
from featurestore.reader import parse_feature_refs
from featurestore.store import Store, check_name, now_iso
from featurestore.heads import metrics
from featurestore.heads._data import TARGETS, features_of, prepare, usable

__all__ = ["TrainHeadConfig", "TrainResult", "run", "evaluate", "list_runs", "run_folder", "make_head"]


MAX_SEEDS = 10_000  # --seeds N


@dataclasses.dataclass(frozen=True)
class TrainHeadConfig:
    method: str = field("linear", "registered head name (fs heads list)")
    dataset: str = field("", "registered dataset name")
    features: dict = field({}, "modality -> backbone name or fingerprint, e.g. {'text': 'minilm'}")
    params: dict = field({}, "head parameters as strings or values (fs heads show NAME)")
    target: str = field("", "label (single/binary) | labels (multi-label) | va (regression); empty: the one "
                            "target the dataset has (an error lists them when it has several)")
    seed: int = field(0, "seed of the head and of validation carving")
    val_fraction: float = field(0.1, "fraction of train carved as validation when the dataset has none")
    eval_split: str = field("test", "split evaluated once after training")
    run_id: str = field("", "name of the run folder (default: method-dataset-time-random)")
    cv: str = field("", "cross-validation over every item instead of the splits: group (leave one group out) "
                        "| fold (the manifest's official folds) | K (K stratified folds); jobs/cv.py")
    seeds: int = field(1, "train with seeds seed, seed+1, ..., seed+seeds-1 and report mean and std; jobs/seeds.py")

    def __post_init__(self):
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"--seeds {self.seeds!r} must be a whole number >= 1 (the runs to average)")
        if self.seeds > MAX_SEEDS or self.seed + self.seeds - 1 > SEED_MAX:  # one run each, planned up front
            raise ConfigError(f"--seeds {self.seeds} from --seed {self.seed} is too many: at most {MAX_SEEDS:,} "
                              f"seeds, the last at most {SEED_MAX}")
        check_request(self.dataset, self.target, self.cv)


def check_request(dataset: str, target: str, cv: str) -> None:
    """The checks every training request shares (train-head, sweep): a dataset, a known target, a valid --cv."""
    if cv:
        from .cv import parse_cv
        parse_cv(cv)
    if target and target not in TARGETS:
        raise ConfigError(f"target {target!r} is not one of {list(TARGETS)}")
    if not dataset:
        raise ConfigError("no dataset given; use --dataset NAME (fs datasets list)")


@dataclasses.dataclass
class TrainResult:
    run_id: str
    folder: Path
    method: str
    dataset: str
    kind: str
    metrics: dict
    val_score: float | None
    seconds: float
    lineage: dict
    warnings: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"run": self.run_id, "folder": str(self.folder), "method": self.method, "dataset": self.dataset,
                "kind": self.kind, "metrics": json_safe(self.metrics), "val_score": json_safe(self.val_score),
                "seconds": round(self.seconds, 3), "lineage": self.lineage, "warnings": self.warnings}


def make_head(method: str, params: dict, seed: int) -> heads.Head:
    """The head with `params` (unknown names list the head's parameters) and the run seed."""
    cls = heads.get(method)
    params = dict(params)
    if "seed" in cls.param_names() and "seed" not in params:
        params["seed"] = seed
    return cls(**params)


def resolve_run_id(store: Store, ref: str) -> str:
    """`ref` with its run name (before any `/fold-<k>` or `/seed-<s>`) completed when it is a prefix
    only one saved run has (`univa-demo`); an exact name, or one no run starts with, as given."""
    name, sep, rest = ref.partition("/")
    dirs = _run_dirs(store)
    if not name or any(d.name == name for d in dirs):
        return ref
    hits = [d.name for d in dirs if d.name.startswith(name)]
    if len(hits) > 1:
        raise ConfigError(f"run {name!r} matches {len(hits)} runs ({', '.join(hits[:6])}"
                          f"{', ...' if len(hits) > 6 else ''}); give more of its id (fs runs)")
    return hits[0] + sep + rest if hits else ref


def run_folder(store: Store, run_id: str) -> Path:
    """A saved run's folder: `RUN`, `RUN/fold-<k>` for one fold of a cross-validated run, or
    `RUN/seed-<s>` for one seed of a `--seeds` run."""
    name, sep, fold = run_id.partition("/")
    folder = store.heads_dir() / check_name(name, "run")
    seed, slash, inner = fold.partition("/")
    if slash and re.fullmatch(r"seed-[0-9]+", seed):  # RUN/seed-S/fold-K: a fold of one seed of --seeds --cv
        sub = folder / seed
        if sub not in _seed_dirs(folder) or not _is_cv(sub):
            raise NotFoundError(f"run {run_id!r}: {name}/{seed} is not a cross-validated seed of a --seeds run "
                                "(fs runs --folds)")
        folder, name, fold = sub, f"{name}/{seed}", inner
    if sep:
        sub = folder / check_name(fold, "fold")
        is_fold = fold.startswith("fold-") and (sub / "config.json").is_file()
        is_seed = sub in _seed_dirs(folder) and ((sub / "config.json").is_file() or _is_cv(sub))
        if not (is_fold or is_seed):
            from .cv import fold_dirs

            parts = (fold_dirs(folder) if folder.is_dir() else []) + _seed_dirs(folder)
            known = ", ".join(f"{name}/{p.name}" for p in parts)
            raise NotFoundError(f"run {run_id!r} is not a fold of a cross-validated run or a seed of a --seeds run; "
                                f"{'its parts: ' + known if known else 'see fs runs --folds'}")
        return sub
    if not (folder / "config.json").is_file() and not _is_cv(folder):
        seeds = [f"{name}/{p.name}" for p in _seed_dirs(folder)]
        if seeds:
            raise ConfigError(f"run {run_id!r} holds one run per seed (train-head --seeds); name one: {', '.join(seeds)}")
        known = ", ".join(p.name for p in _run_dirs(store)) or "none"
        raise NotFoundError(f"run {run_id!r} is not in {store.heads_dir()}; known: {known} (fs runs)")
    return folder


def _is_cv(folder: Path) -> bool:
    from .cv import is_cv_run

    return is_cv_run(folder)


def run(config: TrainHeadConfig, store: Store, *, log: Callable[[str], None] | None = None,
        into: Path | None = None, progress: Callable | None = None, desc: str = "") -> TrainResult:
    """Train on train, early-stop on validation, evaluate on `eval_split` once, save the run
    (into folder `into` when given: one seed of a `--seeds` run, published with its parent).

    `progress` (a tqdm-like factory, or None) shows each epoch: its loss and best validation score
    (one bar per training: per fold under --cv, per seed under --seeds; `desc` labels it)."""
    if config.seeds > 1:
        from .seeds import run_seeds
        return run_seeds(config, store, log=log, progress=progress)
    if config.cv:
        from .cv import run_cv
        return run_cv(config, store, log=log, into=into, progress=progress, desc=desc)
    start = time.perf_counter()
    say = log or (lambda s: None)
    if into is None and config.run_id:  # a bad or taken --run-id fails here, not after the training
        _refuse_taken(store, config.run_id)
    head = make_head(config.method, config.params, config.seed)  # bad --param fails here, before any reading
    if isinstance(getattr(head, "device", None), str) and config.method != "xgboost":
        from featurestore.heads._engine import pick_device

        pick_device(head.device)  # -p device=cuda with no GPU: refused before any reading or training
    for need in getattr(head, "requires", ()):
        if not getattr(head, need, None):
            raise ConfigError(f"head {config.method!r} needs a replay {need}: pass --{need} NAME (fs {need} list; "
                              f"build one with fs {need} build NAME --from SCL_RUN)")
    refs = parse_feature_refs(config.features, store)
    data = prepare(store, config.dataset, refs, target=config.target, val_fraction=config.val_fraction,
                   seed=config.seed, sequences=head.uses_sequences and getattr(head, "sequences", True),
                   va=head.uses_va, eval_split=config.eval_split)
    if data.kind not in head.supports:
        raise ConfigError(f"head {config.method!r} does not train {data.kind!r} targets (--target "
                          f"{data.target}); it supports {sorted(head.supports)}")
    warned = coverage_warnings(data, config.dataset)
    for message in warned:
        say(message)
    dropped = dropped_message(data, config.dataset)
    if dropped:
        warned.append(dropped)
        say(dropped)
    (Xtr, ytr), (Xv, yv) = data.splits["train"], data.splits["val"]
    what = data.kind if data.kind == "va" else f"{data.kind}, {len(data.classes)} classes"
    say(f"training {config.method} on {len(ytr)} items ({what}), validating on {len(yv)}")
    from ._progress import epoch_progress

    with epoch_progress(progress, desc or config.method):
        head.fit(Xtr, ytr, eval_set=(Xv, yv))
    Xte, yte = data.splits[config.eval_split]
    pred, proba = head.predict(Xte), head.predict_proba(Xte)
    test = metrics.evaluate(yte, pred, proba)
    val = metrics.primary(yv, head.predict(Xv), head.predict_proba(Xv))
    run_id = config.run_id or _new_run_id(config.method, config.dataset)
    lineage = {
        "dataset": config.dataset, "manifest_hash": data.manifest_hash, "features": refs,
        "fingerprints": data.fingerprints, "target": data.target, "kind": data.kind, "classes": data.classes,
        "seed": config.seed, "validation": data.validation, "eval_split": config.eval_split,
        "dropped_without_target": data.dropped, "dropped_without_features": data.no_features,
        "va_sources": data.va_sources, "n_train": len(ytr), "n_eval": len(yte),
        "label_va_note": data.label_va_note, "created_at": now_iso(), "featurestore": __version__,
    }
    history = getattr(head, "history_", None)
    doc = {"method": config.method, "kind": data.kind, "primary": metrics.PRIMARY[data.kind],
           config.eval_split: test, "val_primary": val, "history": history}
    if "threshold" in head.meta_:  # multi-label: the decision and where it was chosen
        doc["decision"] = {"threshold": head.meta_["threshold"], "chosen_on": head.meta_["threshold_chosen_on"]}
    folder = _publish_run(store, run_id, head, doc, lineage, (yte, pred, proba), into=into)
    if into is None:  # a seed or fold of a bigger run: its folder is a temporary one until that run is saved
        say(f"saved run {run_id} to {folder}")
    return TrainResult(run_id, folder, config.method, config.dataset, data.kind, test, val,
                       time.perf_counter() - start, lineage, warned)


def dropped_message(data, dataset: str) -> str:
    """One line saying how many items were left out for lack of a `data.target` target, per split ('' if none)."""
    if not any(getattr(data, "dropped", {}).values()):
        return ""
    per = ", ".join(f"{n} of {s}" for s, n in data.dropped.items() if n)
    what = {"label": "label", "labels": "multi-labels", "va": "valence or arousal"}.get(data.target, data.target)
    return (f"note: {sum(data.dropped.values())} item(s) of {dataset!r} have no {what} (--target {data.target}) and "
            f"were left out ({per})")


def coverage_warnings(data, dataset: str) -> list[str]:
    """One line per split where cached features cover fewer items than the split has: training on
    what is left would be silent otherwise (a deleted segment, an extraction with --limit)."""
    out = []
    for split, missing in getattr(data, "no_features", {}).items():
        if missing:
            splits = getattr(data, "splits", {})
            used = f" ({len(splits[split][1])} used)" if split in splits else ""
            out.append(f"warning: {missing} item(s) of split {split!r} of {dataset!r} have no cached features"
                       f"{used}; `fs verify` checks the store, `fs extract --dataset {dataset}` fills gaps")
    return out


_RUN_FIX = "run `fs verify`, then delete the run and train it again (fs train-head)"


def load_head(folder: Path, loader=None) -> heads.Head:
    """A saved head, or one IntegrityError naming the folder when its files are damaged (checked against
    its checksums.json first: damaged weights can still load)."""
    require_intact(folder, "run `fs verify`, then train it again")
    try:
        return (loader or heads.Head.load)(folder)
    except FeatureStoreError:
        raise
    except Exception as exc:  # safetensors, JSON and config errors of a damaged run folder
        which = "; ".join(check_checksums(folder) or []) or f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
        raise IntegrityError(f"run {folder} is damaged ({which}); run `fs verify`, then train it again "
                             "with `fs train-head`") from None


def _new_run_id(method: str, dataset: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{method}-{dataset}-{stamp}-{uuid.uuid4().hex[:6]}"[:128]


def _refuse_taken(store: Store, run_id: str) -> Path:
    """The folder a new run `run_id` gets; an invalid name or one a saved run has is an error."""
    final = store.heads_dir() / check_name(run_id, "run")
    if final.exists():
        raise run_exists(store, run_id)
    return final


def _publish_run(store: Store, run_id: str, head: heads.Head, doc: dict, lineage: dict, evaluated,
                 into: Path | None = None) -> Path:
    final = into or _refuse_taken(store, run_id)
    tmp = tmp_path(final)  # names this process: gc and verify leave a running job's folder alone
    try:
        head.save(tmp)
        write_json_atomic(tmp / "metrics.json", json_safe(doc))
        write_json_atomic(tmp / "lineage.json", lineage)
        split = lineage.get("eval_split", "test")
        plot(tmp, head.meta_["kind"], list(head.meta_.get("classes", [])), *evaluated, run=run_id,
             dataset=lineage.get("dataset", ""), split=split, metrics=doc.get(split) or {})
        write_checksums(tmp, [p.name for p in tmp.iterdir() if p.is_file()])  # checked by `fs verify`
        publish_folder(tmp, final, overwrite=False)  # fsyncs the tree, then heads/
    except FileExistsError:  # another job of the same --run-id published first
        shutil.rmtree(tmp, ignore_errors=True)
        raise run_exists(store, run_id, raced=True) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def run_exists(store: Store, run_id: str, *, raced: bool = False) -> ConfigError:
    """The error for a run id that is taken (`raced`: by another job that saved it while this one trained)."""
    how = " (another job saved it while this one trained; that run is kept)" if raced else ""
    return ConfigError(f"run {run_id!r} already exists in {store.heads_dir()}{how}; choose another run id")


# ---- plots -------------------------------------------------------------------------
def plot(folder: Path, kind: str, classes: list[str], targets, pred: np.ndarray, proba: np.ndarray, **about) -> Path:
    """confusion.png (single/binary), per_class_f1.png (multi) or va.png (regression), titled with
    `about`: run, dataset, split, metrics (jobs/plots.py)."""
    from .plots import plot_run

    return plot_run(folder, kind, classes, targets, pred, proba, **about)


# ---- saved runs --------------------------------------------------------------------
def _run_dirs(store: Store) -> list[Path]:
    root = store.heads_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and p.is_dir()
                  and ((p / "config.json").is_file() or _is_cv(p) or _seed_dirs(p)))


def _seed_dirs(folder: Path) -> list[Path]:
    """`seed-<s>` sub-runs of a `--seeds` run (empty for any other folder)."""
    if not (folder / "metrics.json").is_file():
        return []
    return sorted(p for p in folder.glob("seed-*") if p.is_dir() and re.fullmatch(r"seed-[0-9]+", p.name))


def staleness(store: Store, lineage: dict) -> dict[str, str]:
    """modality -> newer fingerprint, for each fingerprint the run used that has been superseded for the
    run's dataset (a newer extraction of the same backbone on that dataset; other datasets do not count)."""
    out = {}
    for mod, fp in lineage.get("fingerprints", {}).items():
        newer = superseded_by(store, fp, lineage.get("dataset"))
        if newer:
            out[mod] = newer
    return out


def list_runs(store: Store, *, folds: bool = False) -> list[dict]:
    """One row per saved run; a cross-validated run's row holds the mean over its folds (`std`,
    `cv`), and with `folds` each of its folds follows as `RUN/fold-<k>`."""
    rows = []
    for folder in _run_dirs(store):
        try:  # a damaged file is refused (one line naming it), never listed from or silently left out
            lineage = read_checked_json(folder / "lineage.json", _RUN_FIX)
            doc = read_checked_json(folder / "metrics.json", _RUN_FIX)
        except FileNotFoundError:  # removed while we listed (a rejected refresh candidate)
            continue
        stale = staleness(store, lineage)
        if doc.get("seeds"):
            from .seeds import seed_rows

            rows += seed_rows(folder, doc, lineage, stale=stale, with_seeds=folds)
            continue
        if doc.get("cv"):
            from .cv import cv_rows

            rows += cv_rows(folder, doc, lineage, stale=stale, with_folds=folds)
            continue
        split = lineage.get("eval_split", "test")
        rows.append({"run": folder.name, "method": doc.get("method"), "dataset": lineage.get("dataset"),
                     "target": lineage.get("target"), "metric": doc.get("primary"),
                     "score": (doc.get(split) or {}).get(doc.get("primary")), "std": None, "cv": None,
                     "features": ",".join(f"{m}={fp}" for m, fp in lineage.get("fingerprints", {}).items()),
                     "stale": bool(stale), "superseded_by": stale, "created_at": lineage.get("created_at")})
    return rows


def evaluate(run_id: str, dataset: str, store: Store, *, split: str = "test") -> dict:
    """Evaluate a saved run on a split of a dataset, reading the exact fingerprints it was trained on.
    A cross-validated run: `featurestore.jobs.cv.evaluate_cv`; one of its folds (`RUN/fold-<k>`): that
    fold's head alone, and on the dataset it cross-validated only on the items its fold held out; one
    seed of a `--seeds` run (`RUN/seed-<s>`): that seed's run."""
    from featurestore.reader import load_split

    run_id = resolve_run_id(store, run_id)
    folder = run_folder(store, run_id)
    if _is_cv(folder) and not folder.name.startswith("fold-"):  # a cv run, or one seed of a --seeds --cv run
        from .cv import evaluate_cv

        return evaluate_cv(folder, run_id, dataset, store, split=split)
    fold = "/" in run_id and folder.name.startswith("fold-")  # a seed of a --seeds run is a whole run
    head = load_head(folder)
    lineage = read_checked_json((folder.parent if fold else folder) / "lineage.json", _RUN_FIX)
    classes = list(head.meta_.get("classes", []))
    seq = bool(head.meta_.get("seq_dims"))
    data = load_split(store, dataset, split, lineage.get("fingerprints") or lineage["features"], sequences=seq)
    head._check_features(features_of(data, va_from_labels=False))  # wrong widths: a clear error before any work
    _check_labels(data, lineage, classes, run_id)
    X, y, keep, no_target, no_features = usable(data, lineage.get("target") or "label", classes,  # scl: labels
                                                sequences=seq)
    extra = {}
    if fold and dataset == lineage.get("dataset"):  # one fold: only the items it held out are unseen
        from .cv import held_out_rows

        rows = held_out_rows(folder.parent, int(folder.name[5:]), np.asarray(data.item_ids)[keep])
        extra = {"mode": "held-out items of this fold", "not_held_out": int(len(y) - len(rows))}
        if not len(rows):
            raise ConfigError(f"no item of {dataset}/{split} was held out by {run_id} (the others trained or "
                              "validated it); evaluate the whole run, or another split or dataset")
        X, y = X.take(rows), y.take(rows)
    result = metrics.evaluate(y, head.predict(X), head.predict_proba(X))
    return json_safe({"run": run_id, "dataset": dataset, "split": split, "n": len(y), "dropped_without_target": no_target,
                   "dropped_without_features": no_features, "kind": head.meta_["kind"],
                   "metrics": result, "stale": staleness(store, lineage), **extra})


def trained_on(lineage: dict) -> str:
    """The dataset(s) a run was trained on, for messages: 'demo', or an scl run's 'raf, meld'."""
    if lineage.get("dataset"):
        return repr(lineage["dataset"])
    return ", ".join(repr(s["dataset"]) for s in lineage.get("sources", []) if s.get("dataset")) or "-"


def _check_labels(data, lineage: dict, classes: list, run_id: str) -> None:
    """A run scores only the classes it was trained on: labels outside them are the run's limit, not a
    fault of the dataset, so say which run, which labels and what to do."""
    if lineage.get("kind") in ("va", None) or not classes:
        return
    known = set(classes)
    if lineage.get("kind") == "multi":
        seen = {c for row in data.labels for c in (row or [])}
    else:
        seen = {lab for lab in data.label if lab is not None}
    outside = sorted(seen - known)
    if outside:
        raise ConfigError(f"run {run_id!r} was trained on dataset {trained_on(lineage)} with classes "
                          f"{', '.join(map(str, classes))}; dataset {data.dataset!r} split {data.split!r} has "
                          f"labels it cannot predict: {', '.join(map(str, outside[:10]))}"
                          f"{' ...' if len(outside) > 10 else ''}. Evaluate it on a dataset labelled with the "
                          f"run's classes, or train a run on {data.dataset!r} (fs train-head --dataset {data.dataset})")
