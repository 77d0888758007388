"""Why a LoRA refresh lifts test but not validation micro-F1 on the demo (issue 12's acceptance).

    python bench/lora_shift.py --adapter NAME [--store bench/out/lora-demo-store] [--seeds 0,1,2]

The refresh fine-tunes MiniLM on the demo's train split and the retrained heads learn from those
same train words' embeddings: the adapter has already fitted their labels. This script measures
that: for the frozen MiniLM features and for the features with the stored adapter NAME (extracted
here if missing), an `mlp` head per seed (target `labels`, defaults, decisions on validation), and
its micro-F1 on train, validation and test. A head whose train micro-F1 rises far more than its
held-out micro-F1 learned from a train/held-out shift the adapter made, not from better features.
Then a paired bootstrap over the words of each held-out split (the same resampled words for both
feature sets, the three seeds' heads summed): how sure is the change refreshed - frozen of micro-F1?
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(Path(__file__).resolve().parent / "out" / "lora-demo-store"),
                    help="the store bench/lora_demo.py refreshed (its adapters are there)")
    ap.add_argument("--adapter", required=True, help="a stored adapter's name or hash (fs lora list)")
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    import numpy as np
    import torch

    from featurestore.adapters import find_adapter
    from featurestore.features import list_feature_sets
    from featurestore.jobs.extract import ExtractConfig, run as extract
    from featurestore.jobs.train_head import TrainHeadConfig, evaluate, run as train
    from featurestore.store import open_store

    torch.set_num_threads(1)
    store = open_store(args.store)
    frozen = next((f.fingerprint for f in reversed(list_feature_sets(store))
                   if f.backbone == "minilm" and not f.spec.get("adapter_hash")), None)
    if frozen is None:
        raise SystemExit(f"no frozen MiniLM features in {args.store}: run bench/lora_demo.py first")
    meta = find_adapter(store, args.adapter)
    tuned = extract(ExtractConfig(dataset="demo", modality="text", backbone="minilm",
                                  params={"adapter": args.adapter}, batch_size=64), store).fingerprint
    rows, counts = [], {}
    for name, fp in (("frozen", frozen), ("refreshed", tuned)):
        for seed in (int(s) for s in args.seeds.split(",")):
            res = train(TrainHeadConfig(method="mlp", dataset="demo", features={"text": fp}, target="labels",
                                        seed=seed), store)
            f1 = {split: evaluate(res.run_id, "demo", store, split=split)["metrics"]["micro_f1"]
                  for split in ("train", "val", "test")}
            rows.append({"features": name, "seed": seed, **f1})
            print(json.dumps(rows[-1]), flush=True)
            for split in ("val", "test"):
                counts.setdefault((name, split), []).append(item_counts(store, res.run_id, split))
    print(f"adapter {meta.get('name')} ({meta.get('hash')}): frozen {frozen} -> refreshed {tuned}")
    print("| features | train micro-F1 | val micro-F1 | test micro-F1 | train - test |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("frozen", "refreshed"):
        r = [x for x in rows if x["features"] == name]
        cell = {k: (np.mean([x[k] for x in r]), np.std([x[k] for x in r])) for k in ("train", "val", "test")}
        gap = np.mean([x["train"] - x["test"] for x in r])
        print(f"| {name} | " + " | ".join(f"{cell[k][0]:.4f} ± {cell[k][1]:.4f}" for k in ("train", "val", "test"))
              + f" | {gap:+.4f} |")
    rng = np.random.default_rng(0)
    print("| split | words | change of micro-F1 (3 seeds pooled) | 95% paired bootstrap interval | P(change > 0) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for split in ("val", "test"):
        a, b = (np.sum(counts[(n, split)], axis=0) for n in ("frozen", "refreshed"))  # [items, 3]: tp, fp, fn
        draws = rng.integers(0, len(a), size=(2000, len(a)))
        delta = micro(b[draws].sum(1)) - micro(a[draws].sum(1))
        point = micro(b.sum(0)[None])[0] - micro(a.sum(0)[None])[0]
        lo, hi = np.percentile(delta, [2.5, 97.5])
        print(f"| {split} | {len(a)} | {point:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {(delta > 0).mean():.3f} |")


def micro(c):
    """micro-F1 of summed (tp, fp, fn) rows [..., 3]."""
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    return 2 * tp / (2 * tp + fp + fn)


def item_counts(store, run_id: str, split: str):
    """Per held-out word, its (true positive, false positive, false negative) label counts under the run."""
    import numpy as np

    from featurestore.heads._data import usable
    from featurestore.jobs.train_head import load_head, run_folder
    from featurestore.reader import load_split
    from featurestore._io import read_json

    folder = run_folder(store, run_id)
    head, lineage = load_head(folder), read_json(folder / "lineage.json")
    data = load_split(store, "demo", split, lineage["fingerprints"])
    X, y, *_ = usable(data, "labels", list(head.meta_["classes"]))
    pred, true = np.asarray(head.predict(X)) > 0.5, np.asarray(y.y) > 0.5
    return np.stack([(pred & true).sum(1), (pred & ~true).sum(1), (~pred & true).sum(1)], 1)


if __name__ == "__main__":
    main()
