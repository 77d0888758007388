"""The two-modality section of the results table: does a fusion head stay right when its second
modality carries no emotion?

    from bench._two_modalities import noise_section
    rows = noise_section(store, seeds=(0, 1, 2), cache=row_cache)   # rows for results.row_table

    .venv/bin/python bench/_two_modalities.py [--store DIR] [--seeds 1] [--threads 1]   # this section alone

**Task.** The demo's polarity target (3 classes; MiniLM text features; the same train / val / test
split as the polarity table) with a second modality, `noise`: a 384-d standard-normal vector per
word, seeded by a hash of the word's text embedding (`bench/drkf_check.py:with_noise`), so it
identifies each word and carries no emotion. A fusion model can memorise training labels through it.

**Rows**, each trained with its defaults on train, every decision (early stopping) on validation,
test once: `drkf`, `mlp` and `linear` on text + noise (an `mlp` or `linear` given two modalities
concatenates them), and `mlp` and `linear` on the text alone (the reference: issue 14 asks `drkf`
on text + noise to stay within 2 points of `mlp` on the text alone).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

__all__ = ["noise_section", "ROWS", "TASK"]

TASK = "polarity, text + an emotion-free noise modality"
# label -> (head, params, view); the view is a function name of bench/drkf_check.py
ROWS = {"drkf (text + noise)": ("drkf", {}, "with_noise"),
        "mlp (text + noise)": ("mlp", {}, "with_noise"),
        "linear (text + noise)": ("linear", {}, "with_noise"),
        "mlp (text alone)": ("mlp", {}, "text_only"),
        "linear (text alone)": ("linear", {}, "text_only")}
METRICS = ("accuracy", "uar", "macro_f1", "weighted_f1")
VIEW_VERSION = "noise-384-sha256-v1"  # part of the cache key: change it when the noise view changes


def _fit(name: str, params: dict, seed: int, splits: dict) -> dict:
    import featurestore.heads as heads
    from featurestore.heads import metrics

    (Xtr, ytr), (Xv, yv), (Xte, yte) = splits["train"], splits["val"], splits["test"]
    cls = heads.get(name)
    p = {**params, **({"seed": seed} if "seed" in cls.param_names() else {})}
    start = time.perf_counter()
    head = cls(**p).fit(Xtr, ytr, eval_set=(Xv, yv))
    got = metrics.evaluate(yte, head.predict(Xte), head.predict_proba(Xte))
    out = {m: float(got[m]) for m in METRICS}
    out["val_uar"] = float(metrics.evaluate(yv, head.predict(Xv), head.predict_proba(Xv))["uar"])
    out["s_per_fit"] = time.perf_counter() - start
    return out


def noise_section(store, *, dataset: str = "demo", features: dict | None = None, seeds=(0, 1, 2), cache=None,
                  log=print) -> list[dict]:
    """Rows {"task", "row", "seed", metric: value} for `results.row_table`; `cache` (a results.RowCache)
    keeps finished (row, seed) results so a rerun computes only what changed."""
    from bench import drkf_check
    from featurestore.heads._data import prepare

    data = prepare(store, dataset, features or {"text": "minilm"}, target="label", seed=0)
    rows = []
    for label, (name, params, view_name) in ROWS.items():
        view = getattr(drkf_check, view_name)
        splits = {k: (view(X), y) for k, (X, y) in data.splits.items() if k in ("train", "val", "test")}
        for seed in seeds:
            key = cache.key("label", name, f"{TASK}: {label}", {**params, "_view": VIEW_VERSION}, seed) \
                if cache is not None else None
            got = cache.get(key) if cache is not None else None
            if got is None:
                got = _fit(name, params, seed, splits)
                if cache is not None:
                    cache.put(key, got)
            log(f"{label:24s} seed {seed}: test acc {got['accuracy']:.4f} uar {got['uar']:.4f} "
                f"(val uar {got['val_uar']:.4f}, {got['s_per_fit']:.0f} s)")
            rows.append({"task": "polarity, text + noise", "row": label, "seed": seed, **got})
    return rows


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(ROOT / "bench" / "out" / "results-store"),
                    help="store folder with the demo (added and extracted with MiniLM when missing)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench.results import row_table
    from bench.umbe_check import demo_store

    store = demo_store(Path(args.store))
    print(row_table(noise_section(store, seeds=tuple(range(args.seeds)))))


if __name__ == "__main__":
    main()
