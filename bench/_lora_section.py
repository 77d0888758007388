"""The LoRA-refresh section of the results table (issue 12): does a refresh of MiniLM with the
default LoRA settings give an `mlp` head better features on the demo's multi-label target?

    from bench._lora_section import lora_section
    rows = lora_section(make_store, seeds=(0, 1, 2), cache=row_cache)   # rows for results.row_table

One `mlp` run per seed (defaults, target `labels`) on the frozen MiniLM features, then one forced
`fs refresh` (the product's own job: LoRA r=6/alpha=36/dropout=0.2 and the other defaults on the
train split, re-extraction with the adapter, each run retrained from its saved config) under a new
recipe name, so "before" is always the frozen features. It runs in a store of its own
(`make_store()`, called only when the rows are not cached): the adapter's features would otherwise
make the name `minilm` ambiguous for the demo in the results' store. Validation and test micro-F1 before and
after, per seed, from the refresh's report. Cached in the results' row cache under the code of the
LoRA and refresh jobs and of the `mlp` head.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["lora_section"]

TASK = "emotions (labels), LoRA refresh"
CODE = ("jobs/lora.py", "jobs/refresh.py", "heads/mlp.py", "heads/_torch.py", "heads/_engine.py")


def _key(seeds) -> str:
    code = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in CODE)).hexdigest()[:16]
    return json.dumps(["lora-refresh", "labels", "defaults", list(seeds), code])


def _compute(store, seeds, log) -> list[dict]:
    import polars as pl

    from featurestore.features import list_feature_sets
    from featurestore.jobs.refresh import load_recipe, run as refresh
    from featurestore.jobs.train_head import TrainHeadConfig, run as train

    frozen = next((f.fingerprint for f in reversed(list_feature_sets(store))
                   if f.backbone == "minilm" and not f.spec.get("adapter_hash")), None)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = {}
    for seed in seeds:
        run_id = f"results-lora-mlp-s{seed}-{stamp}"
        train(TrainHeadConfig(method="mlp", dataset="demo", features={"text": frozen}, target="labels", seed=seed,
                              run_id=run_id), store)
        runs[run_id] = seed
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"results-lora-{stamp}.json"
        path.write_text(json.dumps({"backbone": "minilm", "heads": list(runs), "lora": {}, "device": "cpu",
                                    "threads": 1, "finetune": {"dataset": "demo", "target": "labels"},
                                    "trigger": {"min_new_labelled": 1}}))
        t = time.perf_counter()
        res = refresh(load_recipe(path), store, force=True, log=log)
        seconds = time.perf_counter() - t
    log(f"refresh {res.id}: {res.message}; {seconds:.0f} s; adapter {res.adapter}")
    report = pl.read_parquet(Path(res.report) / "report.parquet").filter(pl.col("metric") == "micro_f1")
    rows = []
    for when, label in (("before", "mlp, frozen MiniLM"), ("after", "mlp, MiniLM after a LoRA refresh (defaults)")):
        for run_id, seed in runs.items():
            mine = report.filter(pl.col("head") == run_id)
            got = {f"{split}_micro_f1": float(mine.filter(pl.col("split") == split)[when][0]) for split in ("val", "test")}
            rows.append({"task": TASK, "row": label, "seed": seed, **got,
                         **({"refresh_s": seconds} if when == "after" else {})})
    return rows


def lora_section(make_store, *, seeds=(0, 1, 2), cache=None, log=print) -> list[dict]:
    """Rows {"task", "row", "seed", val_micro_f1, test_micro_f1} for `results.row_table`."""
    key = _key(seeds)
    rows = cache.get(key) if cache is not None else None
    if rows is None:
        rows = _compute(make_store(), seeds, log)
        if cache is not None:
            cache.put(key, rows)
    for r in rows:
        log(f"{r['row']:45s} seed {r['seed']}: val micro-F1 {r['val_micro_f1']:.4f}, test {r['test_micro_f1']:.4f}")
    return rows
