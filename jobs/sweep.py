"""`fs sweep`: many configurations of one head trained from the cache, features loaded once.

```
sweeps/<id>/sweep.json              the definition (method, dataset, fingerprints, space, fixed params, seed)
sweeps/<id>/parts/part-<cfg>.parquet one row per finished configuration, published by atomic rename
sweeps/<id>/results.parquet         all parts in one table (rewritten at the end of each invocation)
sweeps/<id>/metric_vs_<param>.png   the ranking metric against each swept hyperparameter
sweeps/<id>/optuna.journal          the Optuna study (--optuna, default file storage)
```
The id is a hash of the definition, so rerunning the same command continues the same sweep; a
configuration whose part exists is never trained again. `mlp` and `linear` configurations train
together as stacks (`heads._stacked`), `univa` and `concept` as vectorised stacks (`heads._vmapped`,
through the head's `fit_stack`), every other head one configuration after another.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shlex
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import featurestore.heads as heads
from featurestore._io import file_lock, json_safe, publish, read_json, tmp_path, write_json_atomic
from featurestore.config import field, from_strings
from featurestore.errors import ConfigError, NotFoundError
from featurestore.reader import parse_feature_refs
from featurestore.store import Store, check_name, now_iso
from featurestore.heads import metrics
from featurestore.heads._data import TARGETS, prepare

__all__ = ["SweepConfig", "SweepResult", "parse_grid", "load_space", "expand_grid", "sample_random", "run",
           "read_results", "list_sweeps", "show", "export_best", "best_test", "sweep_folder", "LOWER_IS_BETTER"]

LOWER_IS_BETTER = {"hamming_loss"}
CHUNK = 64  # configurations per stack at most
OPTUNA_BATCH = 16  # trials asked of TPE at once (trained as one stack where the head allows)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    method: str = field("mlp", "registered head name (fs heads list)")
    dataset: str = field("", "registered dataset name")
    features: dict = field({}, "modality -> backbone name or fingerprint")
    grid: dict = field({}, "param -> list of values (strings or values): the cartesian product")
    random: int = field(0, "number of random configurations drawn from `space`")
    optuna: int = field(0, "number of Optuna TPE trials over `space`")
    space: dict = field({}, "param -> list of choices or {low, high, log, type}")
    params: dict = field({}, "fixed head parameters")
    metric: str = field("", "validation metric ranking the configurations (default: the primary metric)")
    seed: int = field(0, "seed of the heads (unless swept or fixed), of validation carving and of sampling")
    target: str = field("label", "label | labels | va")
    val_fraction: float = field(0.1, "fraction of train carved as validation when the dataset has none")
    eval_split: str = field("test", "split the best configuration is evaluated on, once, at export or --show-test")
    storage: str = field("", "Optuna storage URL (default: a journal file in the sweep folder)")
    limit: int = field(0, "train at most this many new configurations in this invocation (0: all)")
    cv: str = field("", "rank by cross-validated validation score: group | K folds over every item (jobs/cv.py)")

    def __post_init__(self):
        if self.cv:
            from .cv import parse_cv
            parse_cv(self.cv)
        if self.target not in TARGETS:
            raise ConfigError(f"target {self.target!r} is not one of {list(TARGETS)}")
        if not self.dataset:
            raise ConfigError("no dataset given; use --dataset NAME (fs datasets list)")
        modes = [m for m, on in (("grid", bool(self.grid)), ("random", self.random), ("optuna", self.optuna)) if on]
        if len(modes) != 1:
            raise ConfigError("give exactly one of --grid, --random N --space FILE, --optuna N --space FILE"
                              + (f" (got {', '.join(modes)})" if modes else ""))
        if (self.random or self.optuna) and not self.space:
            raise ConfigError("--random and --optuna need a search space: --space FILE")
        if self.random < 0 or self.optuna < 0 or self.limit < 0:
            raise ConfigError("--random, --optuna and --limit must be >= 0")

    @property
    def mode(self) -> str:
        return "grid" if self.grid else "random" if self.random else "optuna"


@dataclasses.dataclass
class SweepResult:
    sweep_id: str
    folder: Path
    definition: dict
    table: Any  # polars DataFrame of every finished configuration
    trained_now: int
    reused: int
    seconds: float

    @property
    def metric(self) -> str:
        return self.definition["metric"]

    def leaderboard(self, top: int = 10) -> list[dict]:
        return leaderboard(self.table, self.definition, top)

    def to_dict(self, top: int = 10) -> dict:
        board = self.leaderboard(top)
        return json_safe({"sweep": self.sweep_id, "folder": str(self.folder), "method": self.definition["method"],
                       "dataset": self.definition["dataset"], "mode": self.definition["mode"],
                       "metric": self.metric, "kind": self.definition["kind"], "n_configs": self.table.height,
                       "trained_now": self.trained_now, "reused": self.reused, "seconds": round(self.seconds, 3),
                       "best": board[0] if board else None, "leaderboard": board})


# ---- the search space ----------------------------------------------------------------
def parse_grid(text: str | list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """`'lr=1e-4,3e-4 dropout=0.1,0.3'` (or several such strings) -> {param: [value strings]}."""
    items = [text] if isinstance(text, str) else list(text)
    out: dict[str, list[str]] = {}
    for item in " ".join(items).split():
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"grid entry {item!r} is not of the form param=v1,v2,...")
        vals = [v for v in values.split(",") if v.strip()]
        if not vals:
            raise ConfigError(f"grid entry {item!r} lists no values")
        if key in out:
            raise ConfigError(f"grid names {key!r} twice")
        out[key] = vals
    if not out:
        raise ConfigError("the grid is empty; give e.g. --grid 'lr=1e-4,1e-3 dropout=0.1,0.3'")
    return out


def load_space(path: str | Path) -> dict:
    """A JSON space file: per param a list of choices or {"low", "high", "log": bool, "type": "float|int"}."""
    try:
        space = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise NotFoundError(f"space file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"space file {path} is not valid JSON: {exc}") from None
    return space


def _check_space(space: dict, cls, fixed: dict) -> dict:
    if not isinstance(space, dict) or not space:
        raise ConfigError("the search space is empty; give per parameter a list of choices or {low, high}")
    out = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"space: {name!r} lists no choices")
            for v in spec:
                _validate(cls, {**fixed, name: v})
            out[name] = list(spec)
            continue
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
            raise ConfigError(f"space: {name!r} must be a list of choices or {{\"low\", \"high\", \"log\", \"type\"}}")
        extra = sorted(set(spec) - {"low", "high", "log", "type"})
        if extra:
            raise ConfigError(f"space: {name!r} has unknown keys {extra}; use low, high, log, type")
        typ = _kind(spec)
        if typ not in ("float", "int"):
            raise ConfigError(f"space: {name!r} type {typ!r} is not float or int")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or low > high:
            raise ConfigError(f"space: {name!r} needs numbers low <= high, got {low!r}, {high!r}")
        if log and low <= 0:
            raise ConfigError(f"space: {name!r} is log-scaled, so low must be > 0 (got {low})")
        for v in (low, high):
            _validate(cls, {**fixed, name: int(v) if typ == "int" else float(v)})
        out[name] = {"low": low, "high": high, "log": log, "type": typ}
    return out


def _kind(spec: dict) -> str:
    """A range's type: as given, else int when both bounds are ints."""
    return spec.get("type") or ("int" if all(isinstance(spec[k], int) and not isinstance(spec[k], bool)
                                             for k in ("low", "high")) else "float")


def _validate(cls, params: dict) -> dict:
    """Typed values of `params` for head class `cls` (unknown names list its parameters)."""
    config = from_strings(cls.Config, params, what=f"head {cls.name!r}")
    return {k: getattr(config, k) for k in params}


def expand_grid(grid: dict[str, list]) -> list[dict]:
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def sample_random(space: dict, n: int, seed: int) -> list[dict]:
    """The first n draws of a seeded sequence (so a larger n extends a smaller one)."""
    rng = np.random.default_rng([seed, 6])
    out = []
    for _ in range(n):
        cfg = {}
        for name, spec in space.items():
            if isinstance(spec, list):
                cfg[name] = spec[int(rng.integers(len(spec)))]
                continue
            lo, hi = float(spec["low"]), float(spec["high"])
            u = rng.random()
            val = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))) if spec.get("log") else lo + u * (hi - lo)
            cfg[name] = min(int(spec["high"]), max(int(spec["low"]), int(round(val)))) if _kind(spec) == "int" \
                else val
        out.append(cfg)
    return out


def _suggest(trial, space: dict) -> dict:
    cfg = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            cfg[name] = trial.suggest_categorical(name, spec)
        elif spec["type"] == "int":
            cfg[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec["log"])
        else:
            cfg[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec["log"])
    return cfg


# ---- identity --------------------------------------------------------------------------
def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def sweep_folder(store: Store, sweep_id: str) -> Path:
    folder = store.sweeps_dir() / check_name(sweep_id, "sweep")
    if not (folder / "sweep.json").is_file():
        known = ", ".join(d["sweep"] for d in list_sweeps(store)) or "none"
        raise NotFoundError(f"sweep {sweep_id!r} is not in {store.sweeps_dir()}; known: {known} (fs sweep list)")
    return folder


# ---- running ---------------------------------------------------------------------------
def run(config: SweepConfig, store: Store, *, log: Callable[[str], None] | None = None) -> SweepResult:
    """Validate every configuration, load the features once, train what is not finished, save the table."""
    start = time.perf_counter()
    say = log or (lambda s: None)
    cls = heads.get(config.method)
    fixed = _validate(cls, dict(config.params)) if config.params else {}
    if "seed" in cls.param_names() and "seed" not in fixed and "seed" not in (config.grid or config.space):
        fixed["seed"] = config.seed
    swept = set(config.grid or config.space)
    both = sorted(swept & set(config.params))
    if both:
        raise ConfigError(f"{both} are both swept and fixed (--param); give each once")
    configs: list[dict] = []
    space: dict = {}
    if config.mode == "grid":
        grid = {k: list(v) if isinstance(v, (list, tuple)) else parse_grid(f"{k}={v}")[k]
                for k, v in config.grid.items()}
        for k, v in grid.items():
            if not v:
                raise ConfigError(f"the grid lists no values for {k!r}")
        configs = [_validate(cls, {**fixed, **c}) for c in expand_grid(grid)]  # every config, before any work
        space = grid
    else:
        space = _check_space(dict(config.space), cls, fixed)
        if config.mode == "random":
            configs = [_validate(cls, {**fixed, **c}) for c in sample_random(space, config.random, config.seed)]
    refs = parse_feature_refs(config.features)
    probe = cls(**{k: v for k, v in (configs[0] if configs else fixed).items()})
    reading = dict(target=config.target, val_fraction=config.val_fraction, seed=config.seed,
                   sequences=cls.uses_sequences and getattr(probe, "sequences", True), va=cls.uses_va)
    if config.cv:  # every item, in folds, instead of the splits (jobs/cv.py)
        from .cv import prepare_cv
        data = prepare_cv(store, config.dataset, refs, cv=config.cv, **reading)
    else:
        data = prepare(store, config.dataset, refs, eval_split=config.eval_split, **reading)
    if data.kind not in cls.supports:
        raise ConfigError(f"head {config.method!r} does not train {data.kind!r} targets (--target {config.target}); "
                          f"it supports {sorted(cls.supports)}")
    known_metrics = _metric_names(data)
    metric = config.metric or metrics.PRIMARY[data.kind]
    if metric not in known_metrics:
        raise ConfigError(f"metric {metric!r} is not reported for {data.kind!r} targets; choose one of {known_metrics}")
    definition = {"method": config.method, "dataset": config.dataset, "fingerprints": data.fingerprints,
                  "target": config.target, "kind": data.kind, "mode": config.mode, "space": space,
                  "params": _jsonable(fixed), "seed": config.seed, "val_fraction": config.val_fraction,
                  "eval_split": config.eval_split, "metric": metric}
    if config.cv:
        definition.update(cv=data.cv, eval_split="held-out folds")
    ident = {k: v for k, v in definition.items() if k not in ("kind", "metric")}
    sweep_id = f"{config.method}-{config.dataset}-{_hash(ident)}"[:128]
    folder = store.sweeps_dir() / sweep_id
    definition = {**definition, "id": sweep_id, "features": refs, "swept": sorted(swept)}
    with file_lock(store.sweeps_dir() / f".{sweep_id}.lock", f"sweep {sweep_id}"):
        if not (folder / "sweep.json").is_file():
            write_json_atomic(folder / "sweep.json", {**definition, "created_at": now_iso()})
        (folder / "parts").mkdir(parents=True, exist_ok=True)
        if config.cv:
            from .cv import sweep_runner
            runner = sweep_runner(cls, data, folder, metric, config.limit, say)
        else:
            runner = _Runner(cls, data, folder, metric, config.limit, say)
        say(f"sweep {sweep_id}: {config.method} on {config.dataset} ({data.kind}), ranking by val {metric}")
        if config.mode == "optuna":
            _run_optuna(runner, config, space, fixed, sweep_id, folder, metric)
        else:
            runner.train(configs)
        table = read_results(folder)
        if table.height:
            _write_table(table, folder / "results.parquet")
            plot_sweep(folder, table, definition)
    return SweepResult(sweep_id, folder, definition, table, runner.trained, runner.reused,
                       time.perf_counter() - start)


def _metric_names(data) -> list[str]:
    X, y = data.splits["val"]
    fake = y.y[:2]
    pred = fake if data.kind != "multi" else fake.astype(np.int64)
    from featurestore.heads.base import Targets

    res = metrics.evaluate(Targets(data.kind, fake, list(data.classes)), pred, None)
    return sorted(k for k, v in res.items() if not isinstance(v, (list, dict)))


class _Runner:
    """Trains pending configurations (stacked where the head allows) and publishes one part each."""

    def __init__(self, cls, data, folder: Path, metric: str, limit: int, say):
        self.cls, self.data, self.folder, self.metric, self.limit, self.say = cls, data, folder, metric, limit, say
        self.trained = 0
        self.reused = 0

    def part_path(self, params: dict) -> Path:
        return self.folder / "parts" / f"part-{config_id(params)}.parquet"

    def finished(self, params: dict) -> dict | None:
        path = self.part_path(params)
        if not path.is_file():
            return None
        import polars as pl

        return pl.read_parquet(path).to_dicts()[0]

    def budget(self) -> int:
        return self.limit - self.trained if self.limit else 1 << 62

    def train(self, configs: list[dict], trials: list[int] | None = None) -> list[dict]:
        """Rows of `configs` (finished ones read back, others trained), in order; None where the limit stopped."""
        rows: list[dict | None] = [None] * len(configs)
        pending: list[int] = []
        seen: set[str] = set()
        for i, params in enumerate(configs):
            row = self.finished(params)
            if row is not None:
                rows[i] = row
                self.reused += 1
            elif config_id(params) not in seen and len(pending) < self.budget():
                seen.add(config_id(params))
                pending.append(i)
        if self.reused:
            self.say(f"{self.reused} configuration(s) already finished, not rerun")
        if not pending:
            return rows
        if getattr(self.cls, "stacked", False):
            from featurestore.heads._stacked import group_key

            groups: dict[tuple, list[int]] = {}
            for i in pending:
                groups.setdefault(group_key(self.cls(**configs[i])), []).append(i)
            for members in groups.values():
                for k in range(0, len(members), CHUNK):
                    chunk = members[k:k + CHUNK]
                    self._fit([configs[i] for i in chunk], [trials[i] if trials else i for i in chunk])
        else:
            for i in pending:
                self._fit([configs[i]], [trials[i] if trials else i])
        for i in pending:
            rows[i] = self.finished(configs[i])
        return rows

    def _fit(self, configs: list[dict], trials: list[int]) -> None:
        (Xtr, ytr), (Xv, yv) = self.data.splits["train"], self.data.splits["val"]
        hs = [self.cls(**p) for p in configs]
        t0 = time.perf_counter()
        if len(hs) > 1 and getattr(self.cls, "stacked", False):
            from featurestore.heads._stacked import fit_heads

            fit_heads(hs, Xtr, ytr, eval_set=(Xv, yv), log=self.say)
        else:
            self.say(f"training {self.cls.name} {_short(configs[0])}")
            hs[0].fit(Xtr, ytr, eval_set=(Xv, yv))
        seconds = (time.perf_counter() - t0) / len(hs)
        for head, params, trial in zip(hs, configs, trials):
            self._publish(head, params, trial, seconds, len(hs))
            self.trained += 1

    def _publish(self, head, params: dict, trial: int, seconds: float, stack: int) -> None:
        import polars as pl

        Xv, yv = self.data.splits["val"]
        t0 = time.perf_counter()
        val = metrics.evaluate(yv, head.predict(Xv), head.predict_proba(Xv))  # no test metric: choices see val only
        history = getattr(head, "history_", None) or {}
        row = {"config_id": config_id(params), "trial": int(trial), **{k: _scalar(v) for k, v in params.items()},
               "params": json.dumps(_jsonable(params), sort_keys=True),
               **{f"val_{k}": float(v) for k, v in val.items() if isinstance(v, (int, float))},
               "epochs": int(history.get("epochs_run", 0) or 0), "best_epoch": int(history.get("best_epoch", 0) or 0),
               "seconds": seconds + time.perf_counter() - t0, "stack": stack, "finished_at": now_iso()}
        target = self.part_path(params)
        tmp = tmp_path(target)
        pl.DataFrame([row]).write_parquet(tmp)
        publish(tmp, target)


def _run_optuna(runner: _Runner, config: SweepConfig, space: dict, fixed: dict, sweep_id: str, folder: Path,
                metric: str) -> None:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if config.storage:
        storage: Any = config.storage
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(study_name=sweep_id, storage=storage, direction=direction, load_if_exists=True)
    # a resumed study reseeds TPE past its history, so it does not replay the first session's draws
    study = optuna.load_study(study_name=sweep_id, storage=storage, sampler=optuna.samplers.TPESampler(
        seed=config.seed + len(study.get_trials(deepcopy=False))))
    if not config.storage:  # we hold the sweep's lock: a RUNNING trial in the local journal was killed
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
    while True:
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        want = min(config.optuna - done, OPTUNA_BATCH if getattr(runner.cls, "stacked", False) else 1,
                   runner.budget())
        if want <= 0:
            return
        trials = [study.ask() for _ in range(want)]
        configs = []
        for t in trials:
            try:
                configs.append(_validate(runner.cls, {**fixed, **_suggest(t, space)}))
            except ConfigError:
                configs.append(None)
        ok = [i for i, c in enumerate(configs) if c is not None]
        rows = runner.train([configs[i] for i in ok], [trials[i].number for i in ok])
        for i, t in enumerate(trials):
            row = rows[ok.index(i)] if i in ok else None
            value = None if row is None else row.get(f"val_{metric}")
            if value is None or not math.isfinite(value):
                study.tell(t, state=TrialState.FAIL)
            else:
                study.tell(t, value)
        if any(rows[j] is None for j in range(len(ok))):  # the job limit stopped training
            return


# ---- results -----------------------------------------------------------------------------
def config_id(params: dict) -> str:
    return _hash(_jsonable(params), 16)


def read_results(folder: Path):
    import polars as pl

    parts = sorted((folder / "parts").glob("part-*.parquet"))
    if not parts:
        return pl.DataFrame()
    return pl.concat([pl.read_parquet(p) for p in parts], how="diagonal_relaxed").sort("trial")


def _write_table(table, target: Path) -> None:
    tmp = tmp_path(target)
    table.write_parquet(tmp)
    publish(tmp, target)


def _ranked(table, definition: dict):
    col = f"val_{definition['metric']}"
    if not table.height or col not in table.columns:
        return table
    return table.sort(col, descending=definition["metric"] not in LOWER_IS_BETTER, nulls_last=True)


def leaderboard(table, definition: dict, top: int = 10) -> list[dict]:
    metric = definition["metric"]
    cols = ["trial", *definition.get("swept", []), f"val_{metric}", "epochs", "seconds"]
    if definition.get("cv"):  # a cross-validated sweep: the mean over folds, its std
        cols.insert(cols.index(f"val_{metric}") + 1, f"val_{metric}_std")
    ranked = _ranked(table, definition)
    if not ranked.height:
        return []
    return [{c: r.get(c) for c in cols} for r in ranked.head(top).to_dicts()]


def show(store: Store, sweep_id: str) -> tuple[dict, Any]:
    folder = sweep_folder(store, sweep_id)
    definition = read_json(folder / "sweep.json")
    return definition, read_results(folder)


def list_sweeps(store: Store) -> list[dict]:
    root = store.sweeps_dir()
    rows = []
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if (p / "sweep.json").is_file()):
        d = read_json(folder / "sweep.json")
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
    ranked = _ranked(table, definition)
    if not ranked.height:
        raise NotFoundError(f"sweep {definition['id']!r} has no finished configuration yet")
    best = ranked.row(0, named=True)
    params = json.loads(best["params"])
    seed = params.pop("seed", definition["seed"])
    features = ",".join(f"{m}={b}" for m, b in sorted(definition["features"].items()))
    argv = ["fs", "train-head", "--method", definition["method"], "--dataset", definition["dataset"],
            "--features", features, "--target", definition["target"], "--seed", str(seed),
            "--val-fraction", str(definition["val_fraction"])] + (["--cv", definition["cv"]] if definition.get("cv") else [])
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
    if definition.get("cv"):
        from .cv import best_test_cv
        return best_test_cv(store, definition, params)
    folder = sweep_folder(store, definition["id"])
    cached = folder / "best_test.json"
    cid = config_id(params)
    if cached.is_file():
        doc = read_json(cached)
        if doc.get("config_id") == cid:
            return doc["metrics"]
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
    write_json_atomic(cached, json_safe({"config_id": cid, "split": definition.get("eval_split", "test"),
                                         "metrics": result, "computed_at": now_iso()}))
    return result



def plot_sweep(folder: Path, table, definition: dict) -> list[Path]:
    """metric_vs_<param>.png per swept hyperparameter (matplotlib Agg, no pyplot)."""
    from matplotlib.figure import Figure

    metric = definition["metric"]
    col = f"val_{metric}"
    out = []
    if col not in table.columns:
        return out
    y = np.array([np.nan if v is None else v for v in table[col].to_list()], float)
    for name in definition.get("swept", []):
        if name not in table.columns:
            continue
        vals = table[name].to_list()
        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if numeric:
            x = np.array(vals, float)
            ax.scatter(x, y, s=14)
            if (x > 0).all() and x.max() / max(x.min(), 1e-300) >= 20:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in vals})
            ax.scatter([labels.index(str(v)) for v in vals], y, s=14)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        ax.set_ylabel(f"val {metric}")
        ax.set_title(f"{definition['method']} on {definition['dataset']}")
        fig.tight_layout()
        path = folder / f"metric_vs_{name}.png"
        tmp = tmp_path(path).with_suffix(".png")
        fig.savefig(tmp, dpi=90, format="png")
        publish(tmp, path)
        out.append(path)
    return out


# ---- small helpers -------------------------------------------------------------------------
def _scalar(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return json.dumps(_jsonable(v), sort_keys=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _short(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


