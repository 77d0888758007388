"""`fs sweep --engine ray`: the configurations of a sweep trained as Ray tasks.

Everything but the training is the local sweep's (jobs/sweep.py): validation of every
configuration before any work, the sweep id, the folder, resumption from published parts, the
Optuna study (TPE, asked and told on the driver, in the same storage), `results.parquet`, the plots.
Only `_Runner._fit` moves to Ray:

- the train and validation splits are put in the object store once (`ray.put`); every task gets
  the same reference, so the features are never serialised again per trial or per stack;
- a task trains one stack (the local sweep's own stacks: the same configurations together, so the
  same numbers) or one configuration of a head that does not stack, with the local `_Runner`
  writing its part into a scratch folder on the worker, and returns the part's bytes;
- the driver publishes each part into `sweeps/<id>/parts/` by atomic rename as tasks finish, so a
  killed run keeps every finished configuration and a rerun (local or Ray) trains only the rest.

Workers need no access to the store: only the driver reads features and writes results. With
`--optuna N`, each round asks TPE for as many trials as the workers can train at once (stacks of
`OPTUNA_BATCH` for stacked heads), so a round keeps the whole pool busy.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from featurestore._io import publish, tmp_path
from featurestore.store import Store
from featurestore.jobs._ray import RayOptions, session, unwrap
from featurestore.jobs.sweep import CHUNK, OPTUNA_BATCH, SweepConfig, SweepResult
from featurestore.jobs.sweep import run as run_sweep
from featurestore.jobs.sweep.run import _Runner

__all__ = ["run"]


def run(config: SweepConfig, store: Store, options: RayOptions = RayOptions(), *,
        log: Callable[[str], None] | None = None, progress: Callable | None = None) -> SweepResult:
    """`jobs.sweep.run` with the training on Ray (started only once the sweep is validated)."""
    with contextlib.ExitStack() as stack:
        def runner(cls, data, folder, metric, limit, say, progress=None):
            ray = stack.enter_context(session(options))
            return _RayRunner(cls, data, folder, metric, limit, say, progress, ray=ray, options=options,
                              stack=OPTUNA_BATCH if config.mode == "optuna" else CHUNK)

        return run_sweep(config, store, log=log, progress=progress, runner_cls=runner)


class _RayRunner(_Runner):
    """`_Runner` whose `_fit` submits a Ray task; `train` waits for them and publishes their parts."""

    def __init__(self, cls, data, folder: Path, metric: str, limit: int, say, progress=None, *, ray,
                 options: RayOptions, stack: int):
        super().__init__(cls, data, folder, metric, limit, say, progress)
        self.ray, self.stack = ray, stack
        self.gpus = options.gpus(ray)
        self.width = options.width(ray)
        self.threads = max(1, int(options.cpus_per_worker))
        self.remote = ray.remote(_train).options(num_cpus=options.cpus_per_worker, num_gpus=self.gpus)
        only = dataclasses.replace(data, splits={k: data.splits[k] for k in ("train", "val")})  # never the test split
        self.data_ref = ray.put(only)  # once: every task reads this one copy
        stacked = getattr(cls, "stacked", False)
        self.optuna_batch = self.width * (OPTUNA_BATCH if stacked else 1)  # trials asked of TPE per round
        self.futures: dict[Any, int] = {}  # task -> configurations it trains
        say(f"Ray: up to {self.width} task(s) at once ({options.cpus_per_worker:g} CPU, {self.gpus:g} GPU each); "
            "features in the object store once")

    def _fit(self, configs: list[dict], trials: list[int]) -> None:
        step = self.stack if getattr(self.cls, "stacked", False) else 1
        for k in range(0, len(configs), step):
            ref = self.remote.remote(self.data_ref, self.cls.name, self.metric, configs[k:k + step],
                                     trials[k:k + step], self.threads)
            self.futures[ref] = len(configs[k:k + step])

    def train(self, configs: list[dict], trials: list[int] | None = None) -> list[dict]:
        rows = super().train(configs, trials)  # finished ones read back, the rest submitted
        if self.futures:
            self._drain()
            rows = [row if row is not None else self.finished(c) for row, c in zip(rows, configs)]
        return rows

    def _drain(self) -> None:
        ray, t0, done, total = self.ray, time.perf_counter(), 0, sum(self.futures.values())
        try:
            while self.futures:
                ready, _ = ray.wait(list(self.futures), num_returns=1)
                for ref in ready:
                    n = self.futures.pop(ref)
                    for name, data in ray.get(ref).items():
                        target = self.folder / "parts" / name
                        tmp = tmp_path(target)
                        tmp.write_bytes(data)
                        publish(tmp, target)
                        if self.counter is not None:  # the progress bar, with the best validation score
                            import polars as pl

                            row = pl.read_parquet(io.BytesIO(data)).to_dicts()[0]
                            self.counter.done(1, row.get(f"val_{self.metric}"))
                    self.trained += n
                    done += n
                    if self.progress is None:
                        self.say(f"{done}/{total} configuration(s) trained on Ray "
                                 f"({time.perf_counter() - t0:.1f}s)")
        except Exception as exc:
            for ref in self.futures:
                ray.cancel(ref)
            self.futures.clear()
            raise unwrap(exc) from None


def _train(data, method: str, metric: str, configs: list[dict], trials: list[int], threads: int) -> dict[str, bytes]:
    """On a worker: train one stack (or one configuration) as the local sweep does; the parts' bytes."""
    import torch

    import featurestore.heads as heads

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="fs-sweep-") as tmp:
        folder = Path(tmp)
        (folder / "parts").mkdir()
        _Runner(heads.get(method), data, folder, metric, 0, lambda s: None)._fit(configs, trials)
        return {p.name: p.read_bytes() for p in sorted((folder / "parts").glob("part-*.parquet"))}
