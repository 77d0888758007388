"""Optuna's loop for `fs sweep --optuna`: the study in a journal file in the sweep folder (or any
`--storage` URL), checked against the parts before any trial, each round's TPE sampler seeded by the
seed and the finished trials, and a killed round finished (or proposed again) on resume."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from featurestore.errors import ConfigError, IntegrityError
from .results import LOWER_IS_BETTER
from .space import suggest, validate

__all__ = ["OPTUNA_BATCH", "open_storage", "run_optuna"]

OPTUNA_BATCH = 16  # trials asked of TPE at once (trained as one stack where the head allows)


def open_storage(url: str):
    """An Optuna storage for `--storage URL`, or one ConfigError naming the URL and why it cannot be opened."""
    import optuna

    try:
        return optuna.storages.get_storage(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy and optuna raise many kinds for a bad URL
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"--storage {url!r} cannot be opened by Optuna ({reason}); give a database URL such as "
                          "sqlite:///sweeps.db, or leave --storage out to keep the study in a journal file in the "
                          "sweep folder") from None


def run_optuna(runner, config, space: dict, fixed: dict, sweep_id: str, folder: Path,
               metric: str, storage: Any = None) -> None:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = folder / "optuna.journal" if storage is None else None
    direction = "minimize" if metric in LOWER_IS_BETTER else "maximize"
    rebuild = "delete it and run the sweep again: the study is rebuilt, identically, from the finished parts"
    try:  # the whole journal is read here; later calls read only what this process appends
        if journal is not None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            storage = JournalStorage(JournalFileBackend(str(journal)))
        optuna.create_study(study_name=sweep_id, storage=storage, direction=direction, load_if_exists=True)
        study = optuna.load_study(study_name=sweep_id, storage=storage)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    except OSError:  # a full disk, a lock: not the journal's content
        raise
    except Exception as exc:  # noqa: BLE001 - optuna raises KeyError, ValueError... on a damaged journal
        if journal is None:
            raise
        raise IntegrityError(f"{journal} is damaged ({type(exc).__name__}: {' '.join(str(exc).split())[:120]}); "
                             f"{rebuild}") from None
    for t in finished:  # a changed value would steer TPE without a word: each must be its part's
        try:
            params = validate(runner.cls, {**fixed, **t.params})
        except ConfigError:
            continue
        row = runner.finished(params)
        if row is not None and row.get(f"val_{metric}") != t.value:
            where = journal or "the Optuna storage"
            raise IntegrityError(f"{where} is damaged: trial {t.number} has value {t.value!r}, its part "
                                 f"{runner.part_path(params).name} {row.get(f'val_{metric}')!r}; {rebuild}")

    def complete() -> int:
        return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))

    def run_round(trials: list, configs: list) -> bool:
        """Train (or read back) the round's configurations and tell the study; False when --limit stopped it."""
        ok = [i for i, c in enumerate(configs) if c is not None]
        rows = runner.train([configs[i] for i in ok], [trials[i].number for i in ok])
        for i, t in enumerate(trials):
            row = rows[ok.index(i)] if i in ok else None
            value = None if row is None else row.get(f"val_{metric}")
            if value is None or not math.isfinite(value):
                study.tell(t.number, state=TrialState.FAIL)
            else:
                study.tell(t.number, value)
        return not any(rows[j] is None for j in range(len(ok)))

    def checked(params: dict) -> dict | None:
        try:
            return validate(runner.cls, {**fixed, **params})
        except ConfigError:
            return None

    done = complete()
    runner.reused += done  # finished trials of an earlier session: the study holds them, nothing reruns
    if done:
        runner.say(f"{done} trial(s) already finished, not rerun")
    runner.total = max(0, min(config.optuna - done, runner.budget()))
    if not config.storage:  # we hold the sweep's lock: a RUNNING trial in the local journal was killed
        killed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if killed and all(set(t.params) == set(space) for t in killed):
            # killed after its round was proposed: finish that round (its finished parts are read back), so
            # the study goes on exactly as an uninterrupted one would
            if not run_round(killed, [checked(t.params) for t in killed]):
                return
        else:  # killed while the round was being proposed: none of it ran; it is proposed again, identically
            for t in killed:
                study.tell(t.number, state=TrialState.FAIL)
    while True:
        done = complete()
        per_round = getattr(runner, "optuna_batch", 0) or (OPTUNA_BATCH if getattr(runner.cls, "stacked", False)
                                                           else 1)
        want = min(config.optuna - done, per_round, runner.budget())
        if want <= 0:
            return
        # each round's sampler is seeded by the seed and the finished trials before it, so a killed and resumed
        # sweep proposes what an uninterrupted one does, and a later session never replays an earlier one's draws
        study.sampler = optuna.samplers.TPESampler(seed=config.seed + done)
        trials = [study.ask() for _ in range(want)]
        configs = []
        for t in trials:
            try:
                configs.append(validate(runner.cls, {**fixed, **suggest(t, space)}))
            except ConfigError:
                configs.append(None)
        if not run_round(trials, configs):  # the job limit stopped training
            return
