"""LoRA benchmarks, side by side on the packaged MiniLM and the demo's real words.

    python bench/bench_lora.py [--train 128] [--items 400] [--batch-size 32] [--device cpu|cuda]

(a) throughput: `fs lora train`'s training phase (items/s, validation excluded) against a bare
    peft + torch loop over the same items in the same batches (same tokenisation, pooling,
    loss and optimiser), one epoch each, --repeat pairs, which loop goes first alternating;
    the ratio of the best runs (target >= 0.9).
(b) a whole refresh (`jobs.refresh.run`, forced; after an untimed warm-up refresh in a third store)
    against the sum of its steps run by hand
    (lora train, extract with the adapter, retrain the head, evaluate before/after on val and
    test), each in its own fresh store with the same dataset (first N demo words) (target <= 1.1x).
(c) a trigger check with nothing to do: `refresh.run` in-process, and `fs refresh RECIPE` as a
    subprocess (Python start-up and imports included) (target < 2 s).

On CUDA the backbone runs under autocast (bf16, or fp16 with loss scaling), in both loops.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path, offline hub)
import numpy as np


def _store(root: Path, n: int):
    import polars as pl

    from featurestore.datasets import add_dataset, build_demo
    from featurestore.datasets.manifest import normalise
    from featurestore.store import open_store

    store = open_store(root, create=True)
    df = build_demo()
    df = pl.concat([df.filter(pl.col("split") == s).head(max(1, int(n * f))) for s, f in
                    (("train", 0.8), ("val", 0.1), ("test", 0.1))])
    cols = ["item_id", "split", "label", "labels", "valence", "text"]
    add_dataset(store, "words", normalise(df.select(cols), source="bench"), root=None, source="bench")
    return store


def bare_loop(store, settings: dict, device: str, backbone: str = "minilm", params: dict | None = None) -> float:
    """items/s of one epoch of a plain peft + torch loop: the backbone (MiniLM by default) + LoRA + the same
    mlp head, under the same autocast as the job."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from featurestore.backbones import create
    from featurestore.backbones._hf import autocast
    from featurestore.jobs.lora import LoraSettings, default_targets, load_splits, make_head

    s = LoraSettings(**settings)
    train, _, classes, _, _ = load_splits(store, "words", "labels", "text", s)
    ref = create(backbone, params or {}).model_ref
    tok, base = AutoTokenizer.from_pretrained(ref), AutoModel.from_pretrained(ref).to(device)
    torch.manual_seed(s.seed)
    model = get_peft_model(base, LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                                            target_modules=list(default_targets(base))))
    head = make_head(s.head, int(base.config.hidden_size), len(classes), s.hidden).to(device)
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": s.lr},
                             {"params": list(head.parameters()), "lr": s.head_lr}])
    y = torch.as_tensor(train.y)
    model.train()
    order = np.random.default_rng([s.seed, 0]).permutation(len(train.y))
    t = time.perf_counter()
    for i in range(0, len(order), s.batch_size):
        idx = order[i:i + s.batch_size]
        batch = tok([train.sources[j] for j in idx], padding=True, truncation=True, max_length=256,
                    return_tensors="pt").to(device)
        with autocast(device):
            states = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
        pooled = torch.nn.functional.normalize(((states * m).sum(1) / m.sum(1).clamp_min(1)).float(), dim=-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return len(order) / (time.perf_counter() - t)


def ours(store, settings: dict, device: str, name: str, backbone: str = "minilm", params: dict | None = None) -> float:
    from featurestore.jobs.lora import LoraTrainConfig, run

    res = run(LoraTrainConfig.build(backbone=backbone, params=params or {}, dataset="words", target="labels",
                                    name=name, settings=settings, device=device, threads=1), store)
    return res.train_items_per_s


def bench_throughput(tmp: Path, n_train: int, batch_size: int, device: str, repeat: int = 3,
                     backbone: str = "minilm", params: dict | None = None) -> dict:
    import torch

    torch.set_num_threads(1)
    store = _store(tmp / "tp", int(n_train / 0.8 / 0.6) + 10)  # ~60% of demo words carry an emotion
    settings = {"epochs": 1, "batch_size": batch_size, "max_train": n_train, "seed": 0}
    a, b = [], []
    for k in range(repeat):  # alternate which goes first: the second of a pair measured slower either way
        for which in (("bare", "ours") if k % 2 == 0 else ("ours", "bare")):
            if which == "bare":
                b.append(bare_loop(store, settings, device, backbone, params))
            else:
                a.append(ours(store, settings, device, f"tp{k}", backbone, params))
                torch.set_num_threads(1)  # Backbone.load raises it to the core count
    return {"ours_items_per_s": round(max(a), 2), "bare_items_per_s": round(max(b), 2),
            "ratio": round(max(a) / max(b), 3), "runs_ours": [round(x, 2) for x in a],
            "runs_bare": [round(x, 2) for x in b], "train_items": n_train, "batch_size": batch_size}


def _recipe(path: Path, lora: dict, device: str) -> Path:
    doc = {"name": "bench", "backbone": "minilm", "device": device, "heads": ["base"], "threads": 1,
           "finetune": {"dataset": "words", "target": "labels"}, "lora": lora,
           "trigger": {"min_new_labelled": 1}, "promote": {"rule": "mean", "min_delta": -1.0}}
    path.write_text(json.dumps(doc))
    return path


def _base_head(store) -> str:
    from featurestore.jobs.extract import ExtractConfig, run as extract
    from featurestore.jobs.train_head import TrainHeadConfig, run as train

    fp = extract(ExtractConfig(dataset="words", backbone="minilm", batch_size=64), store).fingerprint
    train(TrainHeadConfig(method="mlp", dataset="words", features={"text": fp}, target="labels", run_id="base"), store)
    return fp


def bench_refresh(tmp: Path, n_items: int, lora: dict, device: str) -> dict:
    import torch

    from featurestore.jobs.extract import ExtractConfig, run as extract
    from featurestore.jobs.lora import LoraTrainConfig, run as lora_train
    from featurestore.jobs.refresh import load_recipe, run as refresh
    from featurestore.jobs.train_head import TrainHeadConfig, evaluate, run as train

    by_hand, whole, warm = (_store(tmp / k, n_items) for k in ("hand", "whole", "warm"))
    for store in (by_hand, whole, warm):
        _base_head(store)
    torch.set_num_threads(1)
    recipe = load_recipe(_recipe(tmp / "bench.json", lora, device))
    refresh(recipe, warm, force=True)  # untimed: the process's first model loads and heads warm up here
    t = time.perf_counter()
    out = refresh(recipe, whole, force=True)
    total = time.perf_counter() - t
    torch.set_num_threads(1)
    steps = {}
    t = time.perf_counter()
    res = lora_train(LoraTrainConfig.build(backbone="minilm", dataset="words", target="labels", name="hand",
                                           settings=lora, device=device, threads=1), by_hand)
    steps["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    from featurestore import backbones

    bb = backbones.create("minilm", {"adapter": res.folder}, device=device).load()
    torch.set_num_threads(1)  # as the recipe's threads = 1 holds the refresh's extraction
    fp = extract(ExtractConfig(dataset="words", backbone="minilm", params={"adapter": res.folder}, batch_size=64,
                               device=device), by_hand, backbone=bb).fingerprint
    steps["extract"] = time.perf_counter() - t
    t = time.perf_counter()
    train(TrainHeadConfig(method="mlp", dataset="words", features={"text": fp}, target="labels", run_id="after"),
          by_hand)
    steps["heads"] = time.perf_counter() - t
    t = time.perf_counter()
    for run_id in ("base", "after"):
        for split in ("val", "test"):
            evaluate(run_id, "words", by_hand, split=split)
    steps["decide"] = time.perf_counter() - t
    hand = sum(steps.values())
    # (c) nothing to do, on the store that just refreshed
    t, c = time.perf_counter(), time.process_time()
    quiet = refresh(recipe, whole)
    in_process, in_process_cpu = time.perf_counter() - t, time.process_time() - c
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "featurestore.cli", "--store", str(whole.root), "refresh",
                          str(tmp / "bench.json")], capture_output=True, text=True)
    cli_s = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cli_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert not quiet.ran and "nothing to do" in cli.stdout, cli.stdout + cli.stderr
    return {"refresh_s": round(total, 2), "steps_by_hand_s": round(hand, 2), "ratio": round(total / hand, 3),
            "by_hand": {k: round(v, 2) for k, v in steps.items()}, "refresh_steps": out.step_seconds,
            "items": n_items, "nothing_to_do_in_process_s": round(in_process, 3),
            "nothing_to_do_cli_s": round(cli_s, 3), "nothing_to_do_in_process_cpu_s": round(in_process_cpu, 3),
            "nothing_to_do_cli_cpu_s": round(cli_cpu, 3), "load_average": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=128, help="train items of the throughput run")
    ap.add_argument("--items", type=int, default=400, help="demo words in the refresh run's dataset")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=4, help="(a): alternated runs of each loop; the best counts")
    ap.add_argument("--part", default="all", choices=["all", "a", "bc"], help="run only (a), or only (b) and (c)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.part in ("all", "a"):
            tp = bench_throughput(tmp, args.train, args.batch_size, args.device, args.repeat)
            print(f"(a) LoRA training: ours {tp['ours_items_per_s']} items/s vs bare peft+torch "
                  f"{tp['bare_items_per_s']} items/s: ratio {tp['ratio']} (target >= 0.9)  {tp}", flush=True)
        if args.part == "a":
            return
        lora = {"epochs": 1, "batch_size": args.batch_size, "max_train": args.train}
        rf = bench_refresh(tmp, args.items, lora, args.device)
        print(f"(b) whole refresh {rf['refresh_s']} s vs its steps by hand {rf['steps_by_hand_s']} s: "
              f"ratio {rf['ratio']} (target <= 1.1)  {rf}")
        print(f"(c) nothing to do: {rf['nothing_to_do_in_process_s']} s in process "
              f"({rf['nothing_to_do_in_process_cpu_s']} s CPU), {rf['nothing_to_do_cli_s']} s as `fs refresh` "
              f"({rf['nothing_to_do_cli_cpu_s']} s CPU, start-up included) (target < 2 s); "
              f"load average {rf['load_average']}")


if __name__ == "__main__":
    main()
