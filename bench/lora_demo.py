"""Acceptance on real data: does a LoRA refresh of MiniLM help an `mlp` head on the demo's words?

    python bench/lora_demo.py [--store bench/out/lora-demo-store] [--seeds 0,1,2] [-p epochs=2 -p max_train=1200 ...]

Works in a store of its own (built on first use as `bench/results.py` builds its store: the demo
dataset and its frozen MiniLM features), never in ./store: a refresh leaves a second MiniLM
fingerprint for the demo there, and `--features minilm` would then be ambiguous for it. Trains
one `mlp` head per seed on the frozen MiniLM features (target `labels`, the NRC multi-labels),
then runs one forced refresh whose recipe lists those runs: LoRA fine-tuning on the train split
(r=6, alpha=36, dropout=0.2; `-p` overrides other LoRA settings, e.g. fewer epochs on a busy
CPU), re-extraction of the demo, and each head retrained from its saved config on the new
features. Prints validation and test micro-F1 before and after, per seed and on average.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(Path(__file__).resolve().parent / "out" / "lora-demo-store"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("-p", dest="params", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", default="lora-demo")
    ap.add_argument("--stamp", default="", help="reuse the runs and resume the refresh of an earlier (killed) call")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (1 on a busy shared CPU)")
    args = ap.parse_args()

    import polars as pl
    import torch

    from featurestore.config import parse_params
    from featurestore.features import list_feature_sets
    from featurestore.jobs.refresh import load_recipe, run as refresh
    from featurestore.jobs.train_head import TrainHeadConfig, run as train

    from results import build_store

    torch.set_num_threads(1)
    store = build_store(Path(args.store))
    frozen = next((f.fingerprint for f in reversed(list_feature_sets(store))  # newest without an adapter
                   if f.backbone == "minilm" and not f.spec.get("adapter_hash")), None)
    if frozen is None:
        raise SystemExit(f"no frozen MiniLM features in {args.store}")
    stamp = args.stamp or time.strftime("%H%M%S")
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        run_id = f"{args.name}-mlp-s{seed}-{stamp}"
        runs.append(run_id)
        if (store.heads_dir() / run_id).is_dir():
            continue
        train(TrainHeadConfig(method="mlp", dataset="demo", features={"text": frozen}, target="labels", seed=seed,
                              run_id=run_id), store)
    lora = parse_params(args.params)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.name}-{stamp}.json"
        path.write_text(json.dumps({"backbone": "minilm", "heads": runs, "lora": lora, "device": "cpu",
                                    "threads": args.threads,
                                    "finetune": {"dataset": "demo", "target": "labels"},
                                    "trigger": {"min_new_labelled": 1}}))
        t = time.perf_counter()
        res = refresh(load_recipe(path), store, force=True, log=print)
        seconds = time.perf_counter() - t
    report = pl.read_parquet(Path(res.report) / "report.parquet").filter(pl.col("metric") == "micro_f1")
    print(f"refresh {res.id}: {res.message} ({res.reason}); {seconds:.0f} s; steps {res.step_seconds}")
    print(f"frozen {frozen} -> refreshed {res.fingerprint} (adapter {res.adapter}); LoRA settings {lora or 'defaults'}")
    print(report.select("head", "split", "before", "after", "delta").sort("split", "head"))
    print(report.group_by("split").agg(pl.col("before").mean(), pl.col("after").mean(), pl.col("delta").mean(),
                                       (pl.col("delta") > 0).sum().alias("improved")).sort("split"))


if __name__ == "__main__":
    main()
