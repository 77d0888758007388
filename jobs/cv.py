"""`fs train-head --cv group | fold | K`: cross-validation over every item of a dataset, for any head.

`--cv group` is leave-one-group-out: it holds out one manifest `group` at a time (the IEMOCAP
layout's group is the session, so this is the papers' leave-one-session-out); `--cv fold` holds
out one official fold at a time (the manifest's `fold` column: DFEW's and MAFW's five folds);
`--cv K` makes K folds, stratified by class for single/binary targets, seeded. Each fold
trains a fresh head on the other folds, early-stops on a validation split carved from its training
folds only (by group when the items have groups, so with `--cv group` never from the held-out
group), and is evaluated once on its held-out fold. The run folder holds `fold-<k>/` (each a saved
head), `metrics.json` (per fold, mean and std), `lineage.json` (the folds' groups and sizes, the features'
fingerprints), `folds.parquet` (per item: its id, source split and the fold that held it out) and
`checksums.json`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections import Counter
from typing import Callable

import numpy as np

from featurestore import __version__
from featurestore._io import json_safe, publish_folder, tmp_path, write_checksums, write_json_atomic
from featurestore.datasets import get_dataset
from featurestore.errors import ConfigError, DatasetError
from featurestore.features import resolve_features
from featurestore.reader import parse_feature_refs, resolve_refs
from featurestore.store import Store, check_name, now_iso
from featurestore.heads import Features, Targets, metrics
from featurestore.heads._data import _label_va, _load, carve_validation, target_kind, usable

__all__ = ["parse_cv", "cv_folds", "held_out_values", "load_all", "load_cv_set", "CVSet", "fold_rows", "run_cv",
           "is_cv_run", "fold_dirs", "cv_rows", "held_out_rows", "evaluate_cv", "prepare_cv", "sweep_runner",
           "best_test_cv"]


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


@dataclasses.dataclass
class CVSet:
    """Every usable item of a dataset (all splits), for cross-validation."""

    X: Features
    y: Targets
    groups: np.ndarray  # manifest group per item (None where it has none)
    classes: list[str]
    item_ids: np.ndarray  # manifest item id per row
    source_split: np.ndarray  # the split each row came from
    fingerprints: dict[str, str]
    manifest_hash: str
    folds: np.ndarray  # the manifest's official fold per item (None where it has none)
    target: str = ""  # the target trained on, after the dataset's default was applied
    no_features: dict = dataclasses.field(default_factory=dict)  # per split: items with a target, no cached row


def load_cv_set(store: Store, dataset: str, features, *, target: str, sequences: bool, va: bool) -> CVSet:
    """Every usable item of every split of `dataset`, with its id, group, official fold and source split.
    `features` are resolved for this dataset (a backbone name -> the fingerprint covering it); `target`
    "" takes the dataset's one target."""
    ds = get_dataset(store, dataset)
    target = ds.check_target(target)
    features = resolve_refs(store, ds, features)
    classes = list(ds.multilabel_set if target == "labels" else ds.label_set if target == "label" else [])
    splits = [s for s, count in sorted(ds.splits().items()) if count]
    raw = {s: _load(store, ds, s, features, sequences=sequences, va=va) for s in splits}
    label_va, _ = _label_va(ds, target, classes, raw[splits[0]])
    Xs, ys, groups, ids, names, folds, no_features = [], [], [], [], [], [], {}
    for s in splits:
        try:
            X, y, keep, _, no_features[s] = usable(raw[s], target, classes, sequences=sequences, va=va,
                                                   label_va=label_va)
        except DatasetError:  # a split with no target or no cached features adds nothing
            continue
        Xs.append(X), ys.append(y), groups.append(raw[s].groups[keep])
        ids.append(np.asarray(raw[s].item_ids)[keep]), names.append(np.full(len(keep), s, object))
        f = raw[s].folds
        folds.append(f[keep] if f is not None else np.full(len(keep), None, object))
    if not Xs:
        raise DatasetError(f"dataset {dataset!r} has no items with a {target!r} target and cached features "
                           f"{dict(features)}; extract them first (fs extract --dataset {dataset})")
    y = Targets(target_kind(target, classes), np.concatenate([t.y for t in ys]), classes, label_va)
    first = raw[splits[0]]
    return CVSet(_concat(Xs), y, np.concatenate(groups), classes, np.concatenate(ids), np.concatenate(names),
                 dict(first.fingerprints), ds.manifest_hash, np.concatenate(folds), target, no_features)


def load_all(store: Store, dataset: str, features, *, target: str, sequences: bool, va: bool, with_folds: bool = False):
    """Every usable item of every split: (features, targets, groups, classes), and the folds if asked."""
    cs = load_cv_set(store, dataset, features, target=target, sequences=sequences, va=va)
    if with_folds:
        return cs.X, cs.y, cs.groups, cs.classes, cs.folds
    return cs.X, cs.y, cs.groups, cs.classes


def _summary(per_fold: list[dict]) -> tuple[dict, dict]:
    keys = [k for k, v in per_fold[0].items() if isinstance(v, (int, float))]
    vals = {k: np.array([f[k] for f in per_fold], np.float64) for k in keys}
    mean = {k: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for k, v in vals.items()}
    std = {k: float(np.nanstd(v)) if np.isfinite(v).any() else math.nan for k, v in vals.items()}
    return mean, std


def fold_rows(cs: CVSet, cv: str | int, *, seed: int, val_fraction: float) -> list[dict]:
    """Per fold: `train`, `val` (carved inside the training folds, by group when items have groups) and
    `held` row indices, the carving record, the held-out groups and what `--cv group|fold` held out."""
    cv_kind = parse_cv(cv)
    held_by = held_out_values(cv_kind, cs.groups, cs.folds)
    out = []
    for k, (train, held) in enumerate(cv_folds(cv_kind, cs.y, cs.groups, seed=seed, folds=cs.folds)):
        tr, va_rows, carving = carve_validation(len(train), fraction=val_fraction, seed=seed, groups=cs.groups[train])
        out.append({"fold": k, "train": train[tr], "val": train[va_rows], "held": held, "validation": carving,
                    "held_out_groups": sorted({str(g) for g in cs.groups[held] if g is not None}),
                    "held_out": sorted({str(g) for g in held_by[held]}, key=_natural) if held_by is not None else None})
    return out


def group_leak_warning(folds: list[dict], cv) -> str:
    """A warning when `--cv K` spread a manifest group (a speaker, a session) over several held-out folds:
    K folds are stratified by class, not by group, so a head is then tested on a speaker it trained on."""
    if parse_cv(cv) in ("group", "fold"):
        return ""
    spread = Counter(g for f in folds for g in f["held_out_groups"])
    shared = sum(1 for n in spread.values() if n > 1)
    if not shared:
        return ""
    return (f"warning: --cv {cv} folds are stratified by class, not by group: {shared} of {len(spread)} manifest "
            "groups (speakers, sessions) have items in more than one held-out fold, so a fold is tested on groups "
            "it trained on; --cv group holds out whole groups")


FOLDS_FILE = "folds.parquet"


def run_cv(config, store: Store, *, log: Callable[[str], None] | None = None, into=None, progress=None,
           desc: str = ""):
    """Train and evaluate `config.method` on each fold of `config.cv`; save every fold's head and the summary
    (into run folder `into` when given: a seed of a `--seeds` run, published with its parent).
    `progress`: a bar per fold's training (`desc` prefixes its label)."""
    from ._progress import epoch_progress
    from .train_head import TrainResult, _new_run_id, coverage_warnings, make_head, run_exists

    start = time.perf_counter()
    say = log or (lambda s: None)
    probe = make_head(config.method, config.params, config.seed)
    refs = parse_feature_refs(config.features, store)
    ds = get_dataset(store, config.dataset)
    target = ds.check_target(config.target)
    fingerprints = {m: resolve_features(store, r, modality=m, dataset=ds).fingerprint for m, r in refs.items()}
    cs = load_cv_set(store, config.dataset, fingerprints, target=target,
                     sequences=probe.uses_sequences and getattr(probe, "sequences", True), va=probe.uses_va)
    X, y, classes = cs.X, cs.y, cs.classes
    if y.kind not in probe.supports:
        raise ConfigError(f"head {config.method!r} does not train {y.kind!r} targets (--target {target}); "
                          f"it supports {sorted(probe.supports)}")
    folds = fold_rows(cs, config.cv, seed=config.seed, val_fraction=config.val_fraction)
    warned = coverage_warnings(cs, config.dataset)  # once the folds are sound: a refused run says one line
    warned += [m for m in [group_leak_warning(folds, config.cv)] if m]
    for message in warned:
        say(message)
    cv_kind = parse_cv(config.cv)
    run_id = config.run_id or _new_run_id(config.method, config.dataset)
    final = into or store.heads_dir() / check_name(run_id, "run")
    if final.exists():
        raise run_exists(store, run_id)
    tmp = tmp_path(final)  # names this process: gc and verify leave a running job's folder alone
    per_fold, records = [], []
    held_out_fold = np.full(len(y), -1, np.int64)
    try:
        for f in folds:
            k, tr, va_rows, held = f["fold"], f["train"], f["val"], f["held"]
            held_out_fold[held] = k
            held_names = f["held_out"]
            say(f"fold {k + 1}/{len(folds)}: training on {len(tr)}, validating on {len(va_rows)}, "
                f"testing on {len(held)}" + (f" (held out {cv_kind}: {', '.join(held_names)})" if held_names else ""))
            head = make_head(config.method, config.params, config.seed)
            with epoch_progress(progress, f"{desc or config.method} fold {k + 1}/{len(folds)}"):
                head.fit(X.take(tr), y.take(tr), eval_set=(X.take(va_rows), y.take(va_rows)))
            Xh, yh = X.take(held), y.take(held)
            result = metrics.evaluate(yh, head.predict(Xh), head.predict_proba(Xh))
            val = metrics.primary(y.take(va_rows), head.predict(X.take(va_rows)), head.predict_proba(X.take(va_rows)))
            head.save(tmp / f"fold-{k}")
            per_fold.append({"fold": k, "held_out": ",".join(held_names) if held_names else None,
                             "n_train": len(tr), "n_val": len(va_rows), "n_test": len(held),
                             "val_primary": val, **result})
            records.append({"fold": k, "held_out_groups": f["held_out_groups"] if cv_kind == "group" else None,
                            "held_out_folds": held_names if cv_kind == "fold" else None,
                            "validation": f["validation"]})
        mean, std = _summary([{k: v for k, v in f.items() if k not in ("fold", "n_train", "n_val", "n_test")}
                              for f in per_fold])
        doc = {"method": config.method, "kind": y.kind, "primary": metrics.PRIMARY[y.kind], "cv": str(config.cv),
               "mean": mean, "std": std, "folds": per_fold}
        lineage = {"dataset": config.dataset, "manifest_hash": cs.manifest_hash, "features": refs,
                   "fingerprints": fingerprints, "target": target, "kind": y.kind, "classes": classes,
                   "seed": config.seed, "cv": str(config.cv), "folds": records, "n_items": len(y),
                   "eval_split": "held-out folds", "created_at": now_iso(), "featurestore": __version__}
        write_json_atomic(tmp / "metrics.json", json_safe(doc))
        write_json_atomic(tmp / "lineage.json", json_safe(lineage))
        _write_folds(tmp / FOLDS_FILE, cs, held_out_fold)
        write_checksums(tmp, [str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file()])
        publish_folder(tmp, final, overwrite=False)  # fsyncs the tree, then heads/
    except FileExistsError:  # another job of the same --run-id published first
        shutil.rmtree(tmp, ignore_errors=True)
        raise run_exists(store, run_id, raced=True) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"saved cross-validation run {run_id} to {final}")
    result = TrainResult(run_id, final, config.method, config.dataset, y.kind, mean, mean.get("val_primary"),
                         time.perf_counter() - start, lineage, warned)
    result.folds, result.std = per_fold, std
    return result


def _write_folds(path, cs: CVSet, held_out_fold: np.ndarray) -> None:
    """item_id, the split it came from and the fold that held it out: what `fs eval` needs to predict
    each item of the cross-validated dataset with the one fold head that never saw it."""
    import polars as pl

    from featurestore._io import write_parquet

    write_parquet(pl.DataFrame({"item_id": [str(i) for i in cs.item_ids], "split": [str(s) for s in cs.source_split],
                                "held_out_fold": held_out_fold}), path)


# ---- cross-validated runs after training: listing and evaluation -----------------------------
def is_cv_run(folder) -> bool:
    return (folder / "fold-0" / "config.json").is_file() and (folder / "metrics.json").is_file()


def fold_dirs(folder) -> list:
    """`fold-<k>` sub-folders of a cross-validated run, in fold order."""
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("fold-") and p.name[5:].isdigit()
             and (p / "config.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def cv_rows(folder, doc: dict, lineage: dict, *, stale: dict, with_folds: bool) -> list[dict]:
    """`fs runs` rows of a cross-validated run: one for the run (the mean over folds), then with
    `with_folds` one per fold (`RUN/fold-<k>`, its held-out fold's metrics)."""
    primary = doc.get("primary")
    common = {"method": doc.get("method"), "dataset": lineage.get("dataset"), "target": lineage.get("target"),
              "metric": primary, "features": ",".join(f"{m}={fp}" for m, fp in lineage.get("fingerprints", {}).items()),
              "stale": bool(stale), "superseded_by": stale, "created_at": lineage.get("created_at")}
    folds = doc.get("folds", [])
    rows = [{"run": folder.name, **common, "score": (doc.get("mean") or {}).get(primary),
             "std": (doc.get("std") or {}).get(primary), "cv": f"{doc.get('cv')} ({len(folds)} folds)"}]
    if with_folds:
        rows += [{"run": f"{folder.name}/fold-{f['fold']}", **common, "score": f.get(primary), "std": None,
                  "cv": f"fold {f['fold']} (n_test {f.get('n_test')})"} for f in folds]
    return rows


def held_out_rows(folder, fold: int, item_ids) -> np.ndarray:
    """Positions in `item_ids` of the items fold `fold` of the run in `folder` held out."""
    import polars as pl

    from featurestore._io import require_recorded

    require_recorded(folder / FOLDS_FILE, "run `fs verify`, then train the run again")  # which items each fold held out
    table = pl.read_parquet(folder / FOLDS_FILE)
    mine = set(table.filter(pl.col("held_out_fold") == fold)["item_id"].to_list())
    return np.flatnonzero([str(i) in mine for i in item_ids])


def evaluate_cv(folder, run_id: str, dataset: str, store: Store, *, split: str = "test") -> dict:
    """`fs eval` of a cross-validated run. On the dataset it cross-validated: each item of `split`
    is predicted by the fold head that held it out (out-of-fold), so no item is scored by a head
    that trained or validated on it. On another dataset: every fold head on the whole split (per
    fold, mean and std) and, for single-label targets, their ensemble (mean of the fold heads'
    probabilities)."""
    import polars as pl

    from featurestore._io import read_json, require_intact
    from featurestore.reader import load_split
    from featurestore.heads._data import features_of
    from .train_head import _check_labels, load_head, staleness

    # every file: the fold heads, and the lineage and folds.parquet that say which head predicts which item
    require_intact(folder, "run `fs verify`, then train the run again")
    lineage = read_json(folder / "lineage.json")
    dirs = fold_dirs(folder)
    hs = [load_head(d) for d in dirs]
    classes = list(hs[0].meta_.get("classes", []))
    seq = bool(hs[0].meta_.get("seq_dims"))
    data = load_split(store, dataset, split, lineage.get("fingerprints") or lineage["features"], sequences=seq)
    hs[0]._check_features(features_of(data, va_from_labels=False))
    _check_labels(data, lineage, classes, run_id)
    X, y, keep, no_target, no_features = usable(data, lineage["target"], classes, sequences=seq)
    kind = hs[0].meta_["kind"]
    out = {"run": run_id, "dataset": dataset, "split": split, "kind": kind, "cv": lineage.get("cv"),
           "folds": len(hs), "dropped_without_target": no_target, "dropped_without_features": no_features,
           "stale": staleness(store, lineage)}
    if dataset == lineage.get("dataset") and (folder / FOLDS_FILE).is_file():
        table = pl.read_parquet(folder / FOLDS_FILE)
        fold_of = dict(zip(table["item_id"].to_list(), table["held_out_fold"].to_list()))
        ids = [str(i) for i in np.asarray(data.item_ids)[keep]]
        which = np.array([fold_of.get(i, -1) for i in ids], np.int64)
        rows = np.flatnonzero(which >= 0)
        if not len(rows):
            raise DatasetError(f"no item of {dataset}/{split} was in a held-out fold of run {run_id}; "
                               "evaluate on another split or dataset")
        X, y, which = X.take(rows), y.take(rows), which[rows]
        parts_pred, parts_proba, order = [], [], []
        for k, head in enumerate(hs):
            at = np.flatnonzero(which == k)
            if len(at):
                Xk = X.take(at)
                parts_pred.append(head.predict(Xk)), parts_proba.append(head.predict_proba(Xk)), order.append(at)
        at = np.concatenate(order)
        inv = np.empty_like(at)
        inv[at] = np.arange(len(at))
        pred = np.concatenate(parts_pred)[inv]
        proba = np.concatenate(parts_proba)[inv] if all(p is not None for p in parts_proba) else None
        out.update(mode="out-of-fold", n=len(y), not_in_cv=int(len(keep) - len(rows)),
                   metrics=metrics.evaluate(y, pred, proba))
        return json_safe(out)
    per_fold, probas = [], []
    for k, head in enumerate(hs):
        proba = head.predict_proba(X)
        per_fold.append({"fold": k, **metrics.evaluate(y, head.predict(X), proba)})
        probas.append(proba)
    mean, std = _summary([{k: v for k, v in f.items() if k != "fold"} for f in per_fold])
    out.update(mode="every fold head", n=len(y), metrics=mean, std=std, per_fold=per_fold)
    if kind in ("single", "binary") and all(p is not None and p.ndim == 2 for p in probas):
        avg = np.mean(probas, 0)
        out["ensemble"] = metrics.evaluate(y, avg.argmax(1), avg)
    return json_safe(out)


# ---- `fs sweep --cv`: configurations ranked by their cross-validated validation score --------
@dataclasses.dataclass
class CVPrepared:
    """What a cross-validated sweep trains on: the folds of every usable item of the dataset.
    `splits` holds the first fold's validation split (the sweep reads metric names from it)."""

    kind: str
    classes: list[str]
    cv: str
    folds: list[dict]  # per fold: train / val / held as (Features, Targets), the carving record
    fingerprints: dict[str, str]
    manifest_hash: str
    splits: dict
    target: str = ""  # the target trained on, after the dataset's default was applied
    no_features: dict = dataclasses.field(default_factory=dict)  # per split: items with a target, no cached row


def prepare_cv(store: Store, dataset: str, features, *, cv: str | int, target: str, val_fraction: float, seed: int,
               sequences: bool, va: bool) -> CVPrepared:
    """The folds of `cv` (as `fs train-head --cv`), each with its validation carved inside its training folds."""
    cs = load_cv_set(store, dataset, features, target=target, sequences=sequences, va=va)
    folds = []
    for f in fold_rows(cs, cv, seed=seed, val_fraction=val_fraction):
        folds.append({"fold": f["fold"], "validation": f["validation"], "held_out_groups": f["held_out_groups"],
                      "held_out": f["held_out"],
                      **{part: (cs.X.take(f[part]), cs.y.take(f[part])) for part in ("train", "val", "held")}})
    return CVPrepared(cs.y.kind, cs.classes, str(parse_cv(cv)), folds, cs.fingerprints, cs.manifest_hash,
                      {"val": folds[0]["val"]}, cs.target, cs.no_features)


def _fit_configs(cls, configs: list[dict], train, val, say) -> list:
    """Fresh heads of `configs` trained on `train`, early-stopped on `val` (as one stack where the head allows)."""
    hs = [cls(**p) for p in configs]
    if len(hs) > 1 and getattr(cls, "stacked", False):
        from featurestore.heads._stacked import fit_heads

        fit_heads(hs, *train, eval_set=val, log=say)
    else:
        for h in hs:
            h.fit(*train, eval_set=val)
    return hs


def _fold_mean(per_fold: list[dict]) -> tuple[dict, dict]:
    numeric = [{k: float(v) for k, v in f.items() if isinstance(v, (int, float))} for f in per_fold]
    return _summary(numeric)


def sweep_runner(cls, data: CVPrepared, folder, metric: str, limit: int, say, progress=None):
    """The sweep's runner for `--cv`: each configuration trains once per fold; its row holds the mean over
    folds of each validation metric (`val_<m>`, what ranks it), the std of the ranking metric and the
    number of folds. Held-out folds are never read here: `best_test_cv` scores them for the best one."""
    from .sweep.run import _Runner

    class CVRunner(_Runner):
        def _fit(self, configs: list[dict], trials: list[int]) -> None:
            t0 = time.perf_counter()
            vals = [[] for _ in configs]
            epochs = [[] for _ in configs]
            from ._progress import epoch_progress

            for f in data.folds:
                if self.progress is None:  # with bars, the bars say it
                    say(f"fold {f['fold'] + 1}/{len(data.folds)}: training {len(configs)} configuration(s) of "
                        f"{cls.name} on {len(f['train'][1])}, validating on {len(f['val'][1])}")
                with epoch_progress(self.progress, f"fold {f['fold'] + 1}/{len(data.folds)}", position=1):
                    hs = _fit_configs(cls, configs, f["train"], f["val"], None if self.progress else say)
                Xv, yv = f["val"]
                for j, head in enumerate(hs):
                    vals[j].append(metrics.evaluate(yv, head.predict(Xv), head.predict_proba(Xv)))
                    history = getattr(head, "history_", None) or {}
                    epochs[j].append(history.get("epochs_run", 0) or 0)
            seconds = (time.perf_counter() - t0) / len(configs)
            for params, trial, val, ep in zip(configs, trials, vals, epochs):
                self._publish_cv(params, trial, val, ep, seconds, len(configs))
                self.trained += 1

        def _publish_cv(self, params, trial, per_fold, epochs, seconds, stack) -> None:
            from .sweep.results import config_id, jsonable, scalar

            mean, std = _fold_mean(per_fold)
            row = {"config_id": config_id(params), "trial": int(trial), **{k: scalar(v) for k, v in params.items()},
                   "params": json.dumps(jsonable(params), sort_keys=True),
                   **{f"val_{k}": v for k, v in mean.items()}, f"val_{metric}_std": std.get(metric, math.nan),
                   "folds": len(per_fold), "epochs": int(round(float(np.mean(epochs)))), "best_epoch": 0,
                   "seconds": seconds, "stack": stack, "finished_at": now_iso()}
            self._write_row(params, row)

    return CVRunner(cls, data, folder, metric, limit, say, progress)


def best_test_cv(store: Store, definition: dict, params: dict) -> dict:
    """The held-out score of one configuration of a `--cv` sweep: trained again on each fold (the same
    seeded computation as in the sweep) and evaluated once on that fold's held-out items; the mean over
    folds (`<m>`) and std (`<m>_std`); `sweep.results.best_test` keeps it in `best_test.json`."""
    import featurestore.heads as heads

    cls = heads.get(definition["method"])
    data = prepare_cv(store, definition["dataset"], definition["fingerprints"], cv=definition["cv"],
                      target=definition["target"], val_fraction=definition["val_fraction"], seed=definition["seed"],
                      sequences=cls.uses_sequences and getattr(cls(**params), "sequences", True), va=cls.uses_va)
    per_fold = []
    for f in data.folds:
        (head,) = _fit_configs(cls, [params], f["train"], f["val"], None)
        Xh, yh = f["held"]
        per_fold.append(metrics.evaluate(yh, head.predict(Xh), head.predict_proba(Xh)))
    mean, std = _fold_mean(per_fold)
    return {**mean, **{f"{k}_std": v for k, v in std.items()}}
