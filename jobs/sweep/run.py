"""Running a sweep: validate every configuration, load the features once, train what is not
finished (stacked where the head allows), publish one part per configuration (Optuna's loop: study.py)."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

import featurestore.heads as heads
from featurestore._io import file_lock, json_safe
from featurestore.config import field
from featurestore.errors import ConfigError
from featurestore.heads import metrics
from featurestore.heads._data import prepare
from featurestore.reader import parse_feature_refs
from featurestore.store import Store, now_iso
from .plots import plot_sweep
from .results import LOWER_IS_BETTER, config_id, jsonable, leaderboard, read_definition, read_part, read_results, scalar, \
    short, write_definition, write_part, write_table, digest
from .._progress import Counter, epoch_progress
from .space import check_space, expand_grid, parse_grid, sample_random, validate
from .study import OPTUNA_BATCH, open_storage, run_optuna

__all__ = ["SweepConfig", "SweepResult", "run", "CHUNK", "OPTUNA_BATCH"]

CHUNK = 64  # configurations per stack at most
MAX_TRIALS = 1_000_000  # --random / --optuna N


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
    target: str = field("", "label | labels | va; empty: the one target the dataset has")
    val_fraction: float = field(0.1, "fraction of train carved as validation when the dataset has none")
    eval_split: str = field("test", "split the best configuration is evaluated on, once, at export or --show-test")
    storage: str = field("", "Optuna storage URL (default: a journal file in the sweep folder)")
    limit: int = field(0, "train at most this many new configurations in this invocation (0: all)")
    cv: str = field("", "rank by cross-validated validation score: group | fold | K folds over every item (jobs/cv.py)")

    def __post_init__(self):
        from ..train_head import check_request
        check_request(self.dataset, self.target, self.cv)
        modes = [m for m, on in (("grid", bool(self.grid)), ("random", self.random), ("optuna", self.optuna)) if on]
        if len(modes) != 1:
            raise ConfigError("give exactly one of --grid, --random N --space FILE, --optuna N --space FILE"
                              + (f" (got {', '.join(modes)})" if modes else ""))
        if (self.random or self.optuna) and not self.space:
            raise ConfigError("--random and --optuna need a search space: --space FILE")
        if self.random < 0 or self.optuna < 0 or self.limit < 0:
            raise ConfigError("--random, --optuna and --limit must be >= 0")
        if max(self.random, self.optuna) > MAX_TRIALS:  # the draws are made up front: 10**20 never ends
            raise ConfigError(f"--{'random' if self.random else 'optuna'} {max(self.random, self.optuna)} is more "
                              f"configurations than one sweep draws (at most {MAX_TRIALS:,})")
        if self.storage and not self.optuna:
            raise ConfigError(f"--storage {self.storage!r} is the Optuna study's database: it goes with --optuna N "
                              "only")

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
    warnings: list = dataclasses.field(default_factory=list)

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
                       "best": board[0] if board else None, "leaderboard": board, "warnings": self.warnings})


def run(config: SweepConfig, store: Store, *, log: Callable[[str], None] | None = None,
        progress: Callable | None = None, runner_cls: Callable | None = None) -> SweepResult:
    """Validate every configuration, load the features once, train what is not finished, save the table.

    `progress` (a tqdm-like factory, or None) shows configurations done with the best validation
    score so far, and each training's epochs."""
    start = time.perf_counter()
    say = log or (lambda s: None)
    cls = heads.get(config.method)
    storage = open_storage(config.storage) if config.mode == "optuna" and config.storage else None
    fixed = validate(cls, dict(config.params)) if config.params else {}
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
        configs = [validate(cls, {**fixed, **c}) for c in expand_grid(grid)]  # every config, before any work
        space = grid
    else:
        space = check_space(dict(config.space), cls, fixed)
        if config.mode == "random":
            configs = [validate(cls, {**fixed, **c}) for c in sample_random(space, config.random, config.seed)]
    refs = parse_feature_refs(config.features, store)
    probe = cls(**{k: v for k, v in (configs[0] if configs else fixed).items()})
    reading = dict(target=config.target, val_fraction=config.val_fraction, seed=config.seed,
                   sequences=cls.uses_sequences and getattr(probe, "sequences", True), va=cls.uses_va)
    if config.cv:  # every item, in folds, instead of the splits (jobs/cv.py)
        from ..cv import prepare_cv
        data = prepare_cv(store, config.dataset, refs, cv=config.cv, **reading)
    else:
        data = prepare(store, config.dataset, refs, eval_split=config.eval_split, **reading)
    if data.kind not in cls.supports:
        raise ConfigError(f"head {config.method!r} does not train {data.kind!r} targets (--target {data.target}); "
                          f"it supports {sorted(cls.supports)}")
    known_metrics = _metric_names(data)
    metric = config.metric or metrics.PRIMARY[data.kind]
    if metric not in known_metrics:
        raise ConfigError(f"metric {metric!r} is not reported for {data.kind!r} targets; choose one of {known_metrics}")
    definition = {"method": config.method, "dataset": config.dataset, "fingerprints": data.fingerprints,
                  "target": data.target, "kind": data.kind, "mode": config.mode, "space": space,
                  "params": jsonable(fixed), "seed": config.seed, "val_fraction": config.val_fraction,
                  "eval_split": config.eval_split, "metric": metric}
    if config.cv:
        definition.update(cv=data.cv, eval_split="held-out folds")
    from ..cv import group_leak_warning
    from ..train_head import coverage_warnings, dropped_message
    leak = [group_leak_warning(data.folds, config.cv)] if config.cv else []
    warned = [m for m in coverage_warnings(data, config.dataset) + [dropped_message(data, config.dataset)] + leak if m]
    for message in warned:
        say(message)
    ident = {k: v for k, v in definition.items() if k not in ("kind", "metric")}
    partial = {s: n for s, n in sorted(getattr(data, "no_features", {}).items()) if n}
    if partial:  # trained on part of the dataset: once the rest is extracted, the same command is a new sweep
        definition["missing_features"] = ident["missing_features"] = partial
    sweep_id = f"{config.method}-{config.dataset}-{digest(ident)}"[:128]
    folder = store.sweeps_dir() / sweep_id
    definition = {**definition, "id": sweep_id, "features": refs, "swept": sorted(swept)}
    with file_lock(store.sweeps_dir() / f".{sweep_id}.lock", f"sweep {sweep_id}"):
        if not (folder / "sweep.json").is_file():
            write_definition(folder, {**definition, "created_at": now_iso()})
        else:
            read_definition(folder)  # a damaged definition is refused before anything is trained or reused
        (folder / "parts").mkdir(parents=True, exist_ok=True)
        # `runner_cls`: the same interface, training elsewhere (`--engine ray`: jobs/ray_sweep.py)
        if config.cv:
            if runner_cls is not None:
                raise ConfigError("--cv sweeps run locally for now; leave out --engine ray or --cv")
            from ..cv import sweep_runner
            runner = sweep_runner(cls, data, folder, metric, config.limit, say, progress)
        else:
            runner = (runner_cls or _Runner)(cls, data, folder, metric, config.limit, say, progress)
        say(f"sweep {sweep_id}: {config.method} on {config.dataset} ({data.kind}), ranking by val {metric}")
        if config.mode == "optuna":
            try:
                run_optuna(runner, config, space, fixed, sweep_id, folder, metric, storage)
            finally:
                runner.close()
        else:
            try:
                runner.train(configs)
            finally:
                runner.close()
        table = read_results(folder)
        if table.height:
            write_table(table, folder / "results.parquet")
            plot_sweep(folder, table, definition)
    return SweepResult(sweep_id, folder, definition, table, runner.trained, runner.reused,
                       time.perf_counter() - start, warned)


def _metric_names(data) -> list[str]:
    X, y = data.splits["val"]
    fake = y.y[:2]
    pred = fake if data.kind != "multi" else fake.astype(np.int64)
    from featurestore.heads.base import Targets

    res = metrics.evaluate(Targets(data.kind, fake, list(data.classes)), pred, None)
    return sorted(k for k, v in res.items() if not isinstance(v, (list, dict)))


class _Runner:
    """Trains pending configurations (stacked where the head allows) and publishes one part each."""

    def __init__(self, cls, data, folder: Path, metric: str, limit: int, say, progress=None):
        self.cls, self.data, self.folder, self.metric, self.limit, self.say = cls, data, folder, metric, limit, say
        self.progress, self.counter, self.total = progress, None, None  # total: configurations this invocation
        self.trained = 0
        self.reused = 0

    def part_path(self, params: dict) -> Path:
        return self.folder / "parts" / f"part-{config_id(params)}.parquet"

    def finished(self, params: dict) -> dict | None:
        path = self.part_path(params)
        if not path.is_file():
            return None
        return read_part(path).to_dicts()[0]

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
        if self.counter is None:
            self.counter = Counter(self.progress, self.total or len(pending), "configurations", self.metric,
                                   self.metric in LOWER_IS_BETTER)
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

            if self.progress is None:  # with bars, the bars say it
                self.say(f"training {len(hs)} {self.cls.name} configurations together")
            with epoch_progress(self.progress, "training", position=1):
                fit_heads(hs, Xtr, ytr, eval_set=(Xv, yv))
        else:
            if self.progress is None:
                self.say(f"training {self.cls.name} {short(configs[0])}")
            with epoch_progress(self.progress, "training", position=1):
                hs[0].fit(Xtr, ytr, eval_set=(Xv, yv))
        seconds = (time.perf_counter() - t0) / len(hs)
        for head, params, trial in zip(hs, configs, trials):
            self._publish(head, params, trial, seconds, len(hs))
            self.trained += 1

    def close(self) -> None:
        if self.counter is not None:
            self.counter.close()

    def _publish(self, head, params: dict, trial: int, seconds: float, stack: int) -> None:
        Xv, yv = self.data.splits["val"]
        t0 = time.perf_counter()
        val = metrics.evaluate(yv, head.predict(Xv), head.predict_proba(Xv))  # no test metric: choices see val only
        history = getattr(head, "history_", None) or {}
        row = {"config_id": config_id(params), "trial": int(trial), **{k: scalar(v) for k, v in params.items()},
               "params": json.dumps(jsonable(params), sort_keys=True),
               **{f"val_{k}": float(v) for k, v in val.items() if isinstance(v, (int, float))},
               "epochs": int(history.get("epochs_run", 0) or 0), "best_epoch": int(history.get("best_epoch", 0) or 0),
               "seconds": seconds + time.perf_counter() - t0, "stack": stack, "finished_at": now_iso()}
        self._write_row(params, row)

    def _write_row(self, params: dict, row: dict) -> None:
        """Publish one configuration's result row (its own parquet part, atomically) and count it."""
        write_part(self.part_path(params), row)
        if self.counter is not None:
            self.counter.done(1, row.get(f"val_{self.metric}"))
