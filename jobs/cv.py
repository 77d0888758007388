"""`fs train-head --cv group | fold | K`: cross-validation over every item of a dataset, for any head.

`--cv group` is leave-one-group-out: it holds out one manifest `group` at a time (the IEMOCAP
layout's group is the session, so this is the papers' leave-one-session-out); `--cv fold` holds
out one official fold at a time (the manifest's `fold` column: DFEW's and MAFW's five folds);
`--cv K` makes K folds, stratified by class for single/binary targets, seeded. Each fold
trains a fresh head on the other folds, early-stops on a validation split carved from its training
folds only (by group when the items have groups, so with `--cv group` never from the held-out
group), and is evaluated once on its held-out fold. The run folder holds `fold-<k>/` (each a saved
head), `metrics.json` (per fold, mean and std) and `lineage.json` (the folds' groups and sizes).
"""
from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from typing import Callable

import numpy as np

from featurestore import __version__
from featurestore._io import json_safe, write_json_atomic
from featurestore.datasets import get_dataset
from featurestore.errors import ConfigError, DatasetError
from featurestore.features import resolve_features
from featurestore.reader import parse_feature_refs
from featurestore.store import Store, check_name, now_iso
from featurestore.heads import Features, Targets, metrics
from featurestore.heads._data import _label_va, _load, carve_validation, target_kind, usable

__all__ = ["parse_cv", "cv_folds", "load_all", "run_cv"]


def parse_cv(value: str) -> str | int:
    """`group`, `fold` or an integer K >= 2 (the CLI's `--cv`)."""
    text = str(value).strip().lower()
    if text in ("group", "fold"):
        return text
    if text.isdigit() and int(text) >= 2:
        return int(text)
    raise ConfigError(f"--cv {value!r} is not 'group' (leave one group out), 'fold' (the manifest's official "
                      "folds) or a number of folds K >= 2")


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def held_out_values(cv: str | int, groups: np.ndarray, folds: np.ndarray | None) -> np.ndarray | None:
    """Per item, what `--cv group|fold` holds out together (None for --cv K)."""
    cv = parse_cv(cv)
    return groups if cv == "group" else folds if cv == "fold" else None


def cv_folds(cv: str | int, y: Targets, groups: np.ndarray, *, seed: int = 0,
             folds: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) per fold. `group`: one fold per group (every item needs one);
    `fold`: one per value of the manifest's `fold` column (every item needs one);
    K: K folds, stratified by class for single/binary targets, dealt round-robin after a seeded shuffle."""
    cv = parse_cv(cv)
    n = len(y)
    if cv in ("group", "fold"):
        values = groups if cv == "group" else folds
        if values is None:
            values = np.full(n, None, object)
        column = "group" if cv == "group" else "fold"
        missing = int(sum(g is None for g in values))
        if missing:
            raise DatasetError(f"--cv {cv} needs a manifest {column} for every item; {missing} of {n} have none "
                               f"(add a {column} column, or register the dataset with a layout that has one, "
                               "or use --cv K)")
        keys = np.array([str(g) for g in values], object)
        names = sorted(set(keys), key=_natural)
        if len(names) < 2:
            raise DatasetError(f"--cv {cv} needs at least 2 values of {column}; the items have {names}; use --cv K")
        return [(np.flatnonzero(keys != g), np.flatnonzero(keys == g)) for g in names]
    if cv > n:
        raise ConfigError(f"--cv {cv} asks for more folds than the {n} items; choose K <= {n}")
    rng = np.random.default_rng(seed)
    strata = y.y if y.kind in ("single", "binary") else np.zeros(n, np.int64)
    fold = np.empty(n, np.int64)
    offset = 0
    for c in np.unique(strata):  # each class dealt round-robin, continuing where the last one stopped
        rows = rng.permutation(np.flatnonzero(strata == c))
        fold[rows] = (offset + np.arange(len(rows))) % cv
        offset += len(rows)
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(cv)]


def _concat(parts: list[Features]) -> Features:
    mods = parts[0].pooled
    return Features(pooled={m: np.concatenate([p.pooled[m] for p in parts]) for m in mods},
                    masks={m: np.concatenate([p.masks[m] for p in parts]) for m in mods},
                    sequences={m: sum((list(p.sequences[m]) for p in parts), []) for m in parts[0].sequences
                               if all(m in p.sequences for p in parts)},
                    va={m: np.concatenate([p.va[m] for p in parts]) for m in parts[0].va
                        if all(m in p.va for p in parts)})


def load_all(store: Store, dataset: str, features, *, target: str, sequences: bool, va: bool, with_folds: bool = False):
    """Every usable item of every split: (features, targets, groups, classes), and the folds if asked."""
    ds = get_dataset(store, dataset)
    classes = list(ds.multilabel_set if target == "labels" else ds.label_set if target == "label" else [])
    splits = [s for s, count in sorted(ds.splits().items()) if count]
    raw = {s: _load(store, ds, s, features, sequences=sequences, va=va) for s in splits}
    label_va, _ = _label_va(ds, target, classes, raw[splits[0]])
    Xs, ys, groups, folds = [], [], [], []
    for s in splits:
        try:
            X, y, keep, _, _ = usable(raw[s], target, classes, sequences=sequences, va=va, label_va=label_va)
        except DatasetError:  # a split with no target or no cached features adds nothing
            continue
        Xs.append(X), ys.append(y), groups.append(raw[s].groups[keep])
        f = raw[s].folds
        folds.append(f[keep] if f is not None else np.full(len(keep), None, object))
    if not Xs:
        raise DatasetError(f"dataset {dataset!r} has no items with a {target!r} target and cached features "
                           f"{dict(features)}; extract them first (fs extract --dataset {dataset})")
    y = Targets(target_kind(target, classes), np.concatenate([t.y for t in ys]), classes, label_va)
    if with_folds:
        return _concat(Xs), y, np.concatenate(groups), classes, np.concatenate(folds)
    return _concat(Xs), y, np.concatenate(groups), classes


def _summary(per_fold: list[dict]) -> tuple[dict, dict]:
    keys = [k for k, v in per_fold[0].items() if isinstance(v, (int, float))]
    vals = {k: np.array([f[k] for f in per_fold], np.float64) for k in keys}
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in vals.items()}
    std = {k: float(np.nanstd(v)) if np.isfinite(v).any() else math.nan for k, v in vals.items()}
    return mean, std


def run_cv(config, store: Store, *, log: Callable[[str], None] | None = None, into=None):
    """Train and evaluate `config.method` on each fold of `config.cv`; save every fold's head and the summary
    (into run folder `into` when given: a seed of a `--seeds` run, published with its parent)."""
    from .train_head import TrainResult, _new_run_id, make_head

    start = time.perf_counter()
    say = log or (lambda s: None)
    probe = make_head(config.method, config.params, config.seed)
    refs = parse_feature_refs(config.features, store)
    ds = get_dataset(store, config.dataset)
    target = ds.check_target(config.target)
    fingerprints = {m: resolve_features(store, r, modality=m, dataset=ds).fingerprint for m, r in refs.items()}
    X, y, groups, classes, item_folds = load_all(
        store, config.dataset, fingerprints, target=target,
        sequences=probe.uses_sequences and getattr(probe, "sequences", True), va=probe.uses_va, with_folds=True)
    if y.kind not in probe.supports:
        raise ConfigError(f"head {config.method!r} does not train {y.kind!r} targets (--target {target}); "
                          f"it supports {sorted(probe.supports)}")
    folds = cv_folds(config.cv, y, groups, seed=config.seed, folds=item_folds)
    held_by = held_out_values(config.cv, groups, item_folds)
    cv_kind = parse_cv(config.cv)
    run_id = config.run_id or _new_run_id(config.method, config.dataset)
    final = into or store.heads_dir() / check_name(run_id, "run")
    if final.exists():
        raise ConfigError(f"run {run_id!r} already exists in {store.heads_dir()}; choose another run id")
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    per_fold, records = [], []
    try:
        for k, (train, held) in enumerate(folds):
            tr, va_rows, carving = carve_validation(len(train), fraction=config.val_fraction, seed=config.seed,
                                                    groups=groups[train])
            tr, va_rows = train[tr], train[va_rows]
            held_groups = sorted({str(g) for g in groups[held] if g is not None})
            held_names = sorted({str(g) for g in held_by[held]}) if held_by is not None else None
            say(f"fold {k + 1}/{len(folds)}: training on {len(tr)}, validating on {len(va_rows)}, "
                f"testing on {len(held)}" + (f" (held out {cv_kind}: {', '.join(held_names)})" if held_names else ""))
            head = make_head(config.method, config.params, config.seed)
            head.fit(X.take(tr), y.take(tr), eval_set=(X.take(va_rows), y.take(va_rows)))
            Xh, yh = X.take(held), y.take(held)
            result = metrics.evaluate(yh, head.predict(Xh), head.predict_proba(Xh))
            val = metrics.primary(y.take(va_rows), head.predict(X.take(va_rows)), head.predict_proba(X.take(va_rows)))
            head.save(tmp / f"fold-{k}")
            per_fold.append({"fold": k, "held_out": ",".join(held_names) if held_names else None,
                             "n_train": len(tr), "n_val": len(va_rows), "n_test": len(held),
                             "val_primary": val, **result})
            records.append({"fold": k, "held_out_groups": held_groups if cv_kind == "group" else None,
                            "held_out_folds": held_names if cv_kind == "fold" else None,
                            "validation": carving})
        mean, std = _summary([{k: v for k, v in f.items() if k not in ("fold", "n_train", "n_val", "n_test")}
                              for f in per_fold])
        doc = {"method": config.method, "kind": y.kind, "primary": metrics.PRIMARY[y.kind], "cv": str(config.cv),
               "mean": mean, "std": std, "folds": per_fold}
        lineage = {"dataset": config.dataset, "features": refs, "fingerprints": fingerprints, "target": target,
                   "kind": y.kind,
                   "classes": classes, "seed": config.seed, "cv": str(config.cv), "folds": records,
                   "n_items": len(y), "created_at": now_iso(), "featurestore": __version__}
        write_json_atomic(tmp / "metrics.json", json_safe(doc))
        write_json_atomic(tmp / "lineage.json", json_safe(lineage))
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"saved cross-validation run {run_id} to {final}")
    result = TrainResult(run_id, final, config.method, config.dataset, y.kind, mean, mean.get("val_primary"),
                         time.perf_counter() - start, lineage)
    result.folds, result.std = per_fold, std
    return result
