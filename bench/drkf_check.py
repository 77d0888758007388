"""The acceptance figures of `drkf` (docs/heads.md, "drkf"): two checks, decisions on validation, test once.

    .venv/bin/python bench/drkf_check.py [--store store] [--seeds 3] [--part demo|synthetic|both] [-p key=value ...]

(a) demo: the demo's words (MiniLM text features of `make demo`, target `label`: polarity,
    3 classes) plus a second modality that carries no emotion: a 384-d standard-normal vector per
    word, seeded by a hash of the word's text embedding (so a word always gets the same noise,
    and train/validation/test words get independent noise). `drkf` on text + noise against `mlp`
    on the text alone; test accuracy and UAR, mean +- std over seeds.
(b) synthetic: two modalities (16-d each) whose class cue (amplitude x one-hot on 3 dimensions,
    plus unit Gaussian noise) agrees for half the items; for the other half one modality, chosen
    at random, shows the true class with amplitude 2 and the other a wrong class with amplitude 1.
    `drkf` on the two modalities against `mlp` on the concatenated features (an `mlp` given both
    modalities concatenates them); accuracy on all, agreeing and conflicting test items.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def with_noise(X, dim: int = 384):
    from featurestore.heads import Features

    text = X.pooled["text"]
    noise = np.stack([np.random.default_rng(int.from_bytes(hashlib.sha256(row.tobytes()).digest()[:8], "little"))
                      .standard_normal(dim) for row in text]).astype(np.float32)
    return Features({"text": text, "noise": noise}, {"text": X.masks["text"], "noise": np.ones(len(text), bool)})


def text_only(X):
    from featurestore.heads import Features

    return Features({"text": X.pooled["text"]}, {"text": X.masks["text"]})


def fit_eval(method: str, params: dict, train, val, test, seed: int) -> tuple[dict, float]:
    import featurestore.heads as heads
    from featurestore.heads import metrics

    t0 = time.perf_counter()
    head = heads.create(method, **{**params, "seed": seed}).fit(*train, eval_set=val)
    got = metrics.evaluate(test[1], head.predict(test[0]))
    return got, time.perf_counter() - t0


def part_demo(store_dir: str, seeds: int, drkf_params: dict) -> None:
    from featurestore.store import open_store
    from featurestore.heads._data import prepare

    data = prepare(open_store(store_dir), "demo", {"text": "minilm"}, target="label")
    split = {k: data.splits[k] for k in ("train", "val", "test")}
    print(f"demo polarity: {len(split['train'][1])} train, {len(split['val'][1])} val, {len(split['test'][1])} test")
    runs = {"mlp (text)": ("mlp", {}, text_only), "drkf (text + noise)": ("drkf", drkf_params, with_noise)}
    for label, (method, params, view) in runs.items():
        scores = []
        for seed in range(seeds):
            sets = {k: (view(X), y) for k, (X, y) in split.items()}
            got, secs = fit_eval(method, params, sets["train"], sets["val"], sets["test"], seed)
            scores.append((got["accuracy"], got["uar"]))
            print(f"  {label} seed {seed}: acc {got['accuracy']:.4f} uar {got['uar']:.4f} ({secs:.0f}s)", flush=True)
        a = np.array(scores) * 100
        print(f"{label}: test acc {a[:, 0].mean():.2f} +- {a[:, 0].std():.2f}, "
              f"uar {a[:, 1].mean():.2f} +- {a[:, 1].std():.2f}  ({seeds} seeds)", flush=True)


def synthetic(n: int, seed: int):
    from featurestore.heads import Features, Targets

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    agree = rng.random(n) < 0.5
    wrong = (y + rng.integers(1, 3, n)) % 3
    truthful_a = rng.random(n) < 0.5
    cue = {"a": np.where(agree | truthful_a, y, wrong), "b": np.where(agree | ~truthful_a, y, wrong)}
    amp = {"a": np.where(agree, 1.5, np.where(truthful_a, 2.0, 1.0)),
           "b": np.where(agree, 1.5, np.where(~truthful_a, 2.0, 1.0))}
    pooled = {}
    for m in ("a", "b"):
        x = rng.standard_normal((n, 16)).astype(np.float32)
        x[:, :3] += (np.eye(3)[cue[m]] * amp[m][:, None]).astype(np.float32)
        pooled[m] = x
    return Features(pooled, {}), Targets("single", y.astype(np.int64), ["c0", "c1", "c2"]), agree


def part_synthetic(seeds: int, drkf_params: dict) -> None:
    import featurestore.heads as heads
    from featurestore.heads import metrics

    for method, params in (("mlp", {}), ("drkf", drkf_params)):
        rows = []
        for seed in range(seeds):
            (X, y, _), (Xv, yv, _), (Xt, yt, agree) = (synthetic(n, 10 * seed + k)
                                                       for k, n in enumerate((3000, 600, 3000)))
            head = heads.create(method, **{**params, "seed": seed}).fit(X, y, eval_set=(Xv, yv))
            pred = head.predict(Xt)
            rows.append([metrics.single(yt.y, pred)["accuracy"], (pred == yt.y)[agree].mean(),
                         (pred == yt.y)[~agree].mean()])
        a = np.array(rows) * 100
        print(f"synthetic {method}: acc {a[:, 0].mean():.2f} +- {a[:, 0].std():.2f}, agreeing "
              f"{a[:, 1].mean():.2f} +- {a[:, 1].std():.2f}, conflicting {a[:, 2].mean():.2f} +- {a[:, 2].std():.2f}"
              f" ({seeds} seeds)", flush=True)


def main() -> None:
    import torch

    from featurestore.config import parse_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="store")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--part", choices=("demo", "synthetic", "both"), default="both")
    ap.add_argument("-p", "--param", action="append", default=[], help="a drkf parameter key=value")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = parse_params(args.param)
    if args.part in ("demo", "both"):
        part_demo(args.store, args.seeds, params)
    if args.part in ("synthetic", "both"):
        part_synthetic(args.seeds, params)


if __name__ == "__main__":
    main()
