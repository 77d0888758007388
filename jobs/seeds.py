"""`fs train-head --seeds N`: the same run with N seeds, metrics averaged with their standard deviation.

Seeds are `seed, seed+1, ..., seed+N-1`; each changes the head's initialisation and the validation
carving (and, with `--cv K`, the folds). Each seed is a complete run (`seed-<s>/`, with `fold-<k>/`
inside under `--cv`), so any one can be inspected or re-evaluated; `metrics.json` holds per seed the
metrics (under `--cv`: the seed's mean over folds), and their mean and population std (ddof=0, as
for folds). The whole folder is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Callable

from featurestore import __version__
from featurestore._io import json_safe, publish_folder, tmp_path, write_checksums, write_json_atomic
from featurestore.store import Store, check_name, now_iso
from featurestore.heads import metrics

from .cv import _summary

__all__ = ["run_seeds", "seed_list", "seed_rows"]


def seed_list(seed: int, n: int) -> list[int]:
    return [seed + i for i in range(n)]


def run_seeds(config, store: Store, *, log: Callable[[str], None] | None = None, progress=None):
    """Run `config` once per seed into one run folder; return a TrainResult whose metrics are the means."""
    from .train_head import TrainResult, _new_run_id, run, run_exists

    start = time.perf_counter()
    say = log or (lambda s: None)
    run_id = config.run_id or _new_run_id(config.method, config.dataset)
    final = store.heads_dir() / check_name(run_id, "run")
    if final.exists():
        raise run_exists(store, run_id)
    tmp = tmp_path(final)  # names this process: gc and verify leave a running job's folder alone
    seeds = seed_list(config.seed, config.seeds)
    per_seed, lineages, kind = [], {}, None
    try:
        tmp.mkdir(parents=True)
        for i, s in enumerate(seeds):
            say(f"seed {s} ({i + 1}/{len(seeds)})")
            one = dataclasses.replace(config, seed=s, seeds=1, run_id=f"{run_id}-seed-{s}"[:128])
            result = run(one, store, log=log, into=tmp / f"seed-{s}", progress=progress,
                         desc=f"{config.method} seed {s} ({i + 1}/{len(seeds)})")
            kind = result.kind
            numbers = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if not config.cv:
                numbers["val_primary"] = result.val_score
            per_seed.append({"seed": s, **numbers})
            lineages[s] = result.lineage
        mean, std = _summary([{k: v for k, v in r.items() if k != "seed"} for r in per_seed])
        first = lineages[seeds[0]]
        doc = {"method": config.method, "kind": kind, "primary": metrics.PRIMARY[kind], "seeds": seeds,
               "cv": config.cv or None, "eval_split": None if config.cv else config.eval_split,
               "std_ddof": 0, "mean": mean, "std": std, "runs": per_seed}
        lineage = {"dataset": config.dataset, "features": first.get("features"),
                   "fingerprints": first.get("fingerprints"), "manifest_hash": first.get("manifest_hash"),
                   "target": config.target, "kind": kind, "classes": first.get("classes"), "seeds": seeds,
                   "cv": config.cv or None, "runs": {f"seed-{s}": f"seed-{s}/" for s in seeds},
                   "created_at": now_iso(), "featurestore": __version__}
        write_json_atomic(tmp / "metrics.json", json_safe(doc))
        write_json_atomic(tmp / "lineage.json", json_safe(lineage))
        # each seed-S/ has its own checksums.json; listing those here makes a lost one a finding too
        write_checksums(tmp, ["metrics.json", "lineage.json", *[f"seed-{s}/checksums.json" for s in seeds]])
        publish_folder(tmp, final, overwrite=False)  # fsyncs the tree, then heads/
    except FileExistsError:  # another job of the same --run-id published first
        shutil.rmtree(tmp, ignore_errors=True)
        raise run_exists(store, run_id, raced=True) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"saved {len(seeds)}-seed run {run_id} to {final}")
    result = TrainResult(run_id, final, config.method, config.dataset, kind, mean, mean.get("val_primary"),
                         time.perf_counter() - start, lineage)
    result.seed_runs, result.std = per_seed, std
    return result


def seed_rows(folder, doc: dict, lineage: dict, *, stale: dict, with_seeds: bool) -> list[dict]:
    """`fs runs` rows of a `--seeds N` run: one for the run (mean and std over its seeds), then with
    `with_seeds` one per seed (`RUN/seed-<s>`: its test score, or under `--cv` its mean over folds)."""
    primary, cv = doc.get("primary"), doc.get("cv")
    common = {"method": doc.get("method"), "dataset": lineage.get("dataset"), "target": lineage.get("target"),
              "metric": primary, "features": ",".join(f"{m}={fp}" for m, fp in (lineage.get("fingerprints") or {}).items()),
              "stale": bool(stale), "superseded_by": stale, "created_at": lineage.get("created_at")}
    seeds = doc.get("seeds") or []
    rows = [{"run": folder.name, **common, "score": (doc.get("mean") or {}).get(primary),
             "std": (doc.get("std") or {}).get(primary),
             "cv": f"{len(seeds)} seeds" + (f", cv {cv}" if cv else "")}]
    if with_seeds:
        rows += [{"run": f"{folder.name}/seed-{r['seed']}", **common, "score": r.get(primary), "std": None,
                  "cv": f"seed {r['seed']}" + (f", mean over folds ({cv})" if cv else "")} for r in doc.get("runs", [])]
    return rows
