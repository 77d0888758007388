"""A sweep's results on disk: one parquet part per finished configuration, the table, the
leaderboard, the list of sweeps, and the best configuration exported (with its test metrics, once)."""
from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np

import featurestore.heads as heads
from featurestore._io import cleaned_on_failure, json_safe, publish, tmp_path, write_json_atomic, write_parquet
from featurestore.errors import NotFoundError
from featurestore.sealed import read_sealed_json, read_sealed_table, seal_rows, write_sealed_json
from featurestore.heads import metrics
from featurestore.heads._data import prepare
from featurestore.store import Store, check_name, now_iso

__all__ = ["LOWER_IS_BETTER", "config_id", "sweep_folder", "read_results", "write_table", "rank", "leaderboard",
           "show", "list_sweeps", "export_best", "best_test", "scalar", "jsonable", "digest", "short", "read_part",
           "write_part", "read_definition", "write_definition"]

LOWER_IS_BETTER = {"hamming_loss"}


def digest(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def sweep_folder(store: Store, sweep_id: str) -> Path:
    folder = store.sweeps_dir() / check_name(sweep_id, "sweep")
    if not (folder / "sweep.json").is_file():
        known = ", ".join(d["sweep"] for d in list_sweeps(store)) or "none"
        raise NotFoundError(f"sweep {sweep_id!r} is not in {store.sweeps_dir()}; known: {known} (fs sweep list)")
    return folder


def config_id(params: dict) -> str:
    return digest(jsonable(params), 16)


_PART_FIX = "delete it and run the sweep command again: that configuration is trained again (`fs verify` lists every damaged file)"


def read_definition(folder: Path) -> dict:
    """A sweep's `sweep.json` (checked against its seal)."""
    return read_sealed_json(Path(folder) / "sweep.json", "delete the sweep folder and run the sweep again "
                            "(`fs verify` lists every damaged file)")


def write_definition(folder: Path, definition: dict) -> None:
    write_sealed_json(Path(folder) / "sweep.json", definition)


def read_part(path: Path):
    """One finished configuration's part (a one-row DataFrame), checked against its row's seal: a damaged
    part is refused, never ranked or reused."""
    from featurestore.errors import IntegrityError

    df = read_sealed_table(path, _PART_FIX)
    if df.height != 1:
        raise IntegrityError(f"{path} is damaged (holds {df.height} rows, a part holds one); {_PART_FIX}")
    return df


def write_part(target: Path, row: dict) -> None:
    """Publish one configuration's row, sealed, as its own parquet part (atomically)."""
    import polars as pl

    write_table(pl.DataFrame(seal_rows([row])), target)


def read_results(folder: Path):
    import polars as pl

    parts = sorted((folder / "parts").glob("part-*.parquet"))
    if not parts:
        return pl.DataFrame()
    return pl.concat([read_part(p) for p in parts], how="diagonal_relaxed").sort("trial")


def write_table(table, target: Path) -> None:
    tmp = tmp_path(target)
    with cleaned_on_failure(tmp, target):  # a full disk: one DiskFullError naming the file, no temp file left
        write_parquet(table, tmp)
    publish(tmp, target)


def rank(table, definition: dict):
    col = f"val_{definition['metric']}"
    if not table.height or col not in table.columns:
        return table
    import polars as pl

    # NaN (a Pearson r of constant predictions: a diverged configuration) sorts as the largest float
    # in polars, so it would rank first under `descending`; it ranks last, with the nulls
    return table.sort(pl.col(col).fill_nan(None), descending=definition["metric"] not in LOWER_IS_BETTER,
                      nulls_last=True)


def leaderboard(table, definition: dict, top: int = 10) -> list[dict]:
    metric = definition["metric"]
    cols = ["trial", *definition.get("swept", []), f"val_{metric}", "epochs", "seconds"]
    if definition.get("cv"):  # a cross-validated sweep: the mean over folds, its std
        cols.insert(cols.index(f"val_{metric}") + 1, f"val_{metric}_std")
    ranked = rank(table, definition)
    if not ranked.height:
        return []
    return [{c: r.get(c) for c in cols} for r in ranked.head(top).to_dicts()]


def show(store: Store, sweep_id: str) -> tuple[dict, Any]:
    folder = sweep_folder(store, sweep_id)
    definition = read_definition(folder)
    return definition, read_results(folder)


def list_sweeps(store: Store) -> list[dict]:
    root = store.sweeps_dir()
    rows = []
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if (p / "sweep.json").is_file()):
        d = read_definition(folder)
        table = read_results(folder)
        board = leaderboard(table, d, 1)
        best = board[0] if board else {}
        rows.append({"sweep": folder.name, "method": d["method"], "dataset": d["dataset"], "mode": d["mode"],
                     "configs": table.height, "metric": d["metric"], "best_val": best.get(f"val_{d['metric']}"),
                     "created_at": d.get("created_at")})
    return rows


def export_best(definition: dict, table, target: str | Path | None = None, *, store: Store | None = None) -> dict:
    """The best configuration (by validation) as `fs train-head` takes it: method, dataset, features,
    params, command. With `store`, its metrics on the evaluation split too, computed once (`best_test`)."""
    ranked = rank(table, definition)
    if not ranked.height:
        raise NotFoundError(f"sweep {definition['id']!r} has no finished configuration yet")
    best = ranked.row(0, named=True)
    params = json.loads(best["params"])
    seed = params.pop("seed", definition["seed"])
    features = ",".join(f"{m}={b}" for m, b in sorted(definition["features"].items()))
    argv = ["fs", "train-head", "--method", definition["method"], "--dataset", definition["dataset"],
            "--features", features, "--target", definition["target"], "--seed", str(seed),
            "--val-fraction", str(definition["val_fraction"])] \
        + (["--cv", definition["cv"]] if definition.get("cv") else [])
    for k, v in sorted(params.items()):
        argv += ["-p", f"{k}={v}"]
    doc = {"method": definition["method"], "dataset": definition["dataset"], "features": definition["features"],
           "fingerprints": definition["fingerprints"], "target": definition["target"], "seed": seed,
           "val_fraction": definition["val_fraction"], "params": params, "sweep": definition["id"],
           "metric": definition["metric"], "val": best.get(f"val_{definition['metric']}"),
           "command": shlex.join(argv)}
    if store is not None:
        doc["eval"] = {"split": definition.get("eval_split", "test"),
                       "metrics": best_test(store, definition, json.loads(best["params"]))}
    doc = json_safe(doc)
    if target is not None:
        write_json_atomic(Path(target), doc)
    return doc


def best_test(store: Store, definition: dict, params: dict) -> dict:
    """Metrics of one configuration on the sweep's evaluation split: trained again (the same seeded
    computation as in the sweep) and evaluated once; kept in `best_test.json` for that configuration."""
    folder = sweep_folder(store, definition["id"])
    cached = folder / "best_test.json"
    cid = config_id(params)
    if cached.is_file():
        doc = read_sealed_json(cached, "delete it: the next --export-best or --show-test computes it again")
        if doc.get("config_id") == cid:
            return doc["metrics"]
    if definition.get("cv"):
        from ..cv import best_test_cv

        result = best_test_cv(store, definition, params)
        write_sealed_json(cached, json_safe({"config_id": cid, "split": "held-out folds", "metrics": result,
                                             "computed_at": now_iso()}))
        return result
    cls = heads.get(definition["method"])
    head = cls(**params)
    data = prepare(store, definition["dataset"], definition["fingerprints"], target=definition["target"],
                   val_fraction=definition["val_fraction"], seed=definition["seed"],
                   sequences=cls.uses_sequences and getattr(head, "sequences", True), va=cls.uses_va,
                   eval_split=definition.get("eval_split", "test"))
    (Xtr, ytr), (Xv, yv) = data.splits["train"], data.splits["val"]
    head.fit(Xtr, ytr, eval_set=(Xv, yv))
    Xte, yte = data.splits[definition.get("eval_split", "test")]
    result = {k: v for k, v in metrics.evaluate(yte, head.predict(Xte), head.predict_proba(Xte)).items()
              if isinstance(v, (int, float))}
    write_sealed_json(cached, json_safe({"config_id": cid, "split": definition.get("eval_split", "test"),
                                         "metrics": result, "computed_at": now_iso()}))
    return result


def scalar(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return json.dumps(jsonable(v), sort_keys=True)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def short(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())
