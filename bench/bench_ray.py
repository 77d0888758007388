"""Ray extraction against one-process extraction on the same data, and the scale model's inputs.

Each run is a fresh `fs extract` process on a fresh store holding the same synthetic text dataset
(MiniLM, CPU). Reported, per run:

- loop items/s: rows computed / the extraction loop's time. One process: its batch loop (model
  load excluded). Ray: first shard started .. last shard ended (Ray start-up, actor start-up and
  model loads excluded);
- command items/s: rows / the whole command's wall time (start-up and model loads included);
- per-actor items/s: items / the seconds each actor spent in its shards.

`fs extract` in one process sets torch to every core; a Ray actor with 1 CPU uses 1 thread. On a
machine whose cores are shared with other work, that difference alone dominates, so a last run is
the local engine with torch at 1 thread: Ray with 1 actor against it is the engine's own overhead.

Then the store's write rate (rows/s and MB/s of `SegmentSet.write`: build, SHA-256, fsync-free
write, atomic rename, catalogue) for the scale model in docs/ray.md, and that model's prediction
for the 2-actor run checked against the measured 2-actor rate.

    python bench/bench_ray.py [--n 3000] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from _common import phrases

from featurestore.datasets import add_dataset
from featurestore.datasets.manifest import normalise
from featurestore.store import open_store


def fresh_store(root: Path, texts: list[str]):
    store = open_store(root, create=True)
    df = normalise(pl.DataFrame({"item_id": [f"i{i}" for i in range(len(texts))], "text": texts}),
                   source="bench", default_split="train")
    add_dataset(store, "bench", df, root=None, source="bench")
    return store


def extract(root: Path, batch_size: int, *extra: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "featurestore.cli", "--store", str(root), "extract", "--dataset", "bench",
           "--modality", "text", "--backbone", "minilm", "--batch-size", str(batch_size), "--json", *extra]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout), wall


ONE_THREAD = """
import json, sys, time, torch
from featurestore import backbones
from featurestore.store import open_store
from featurestore.jobs.extract import ExtractConfig, run
bb = backbones.create("minilm").load()
torch.set_num_threads(1)  # what one Ray actor with 1 CPU runs with
res = run(ExtractConfig(dataset="bench", modality="text", backbone="minilm", batch_size=int(sys.argv[2])),
          open_store(sys.argv[1]), backbone=bb)
print(json.dumps(res.to_dict()))
"""


def extract_one_thread(root: Path, batch_size: int) -> tuple[dict, float]:
    """The local engine with torch at 1 thread (fs extract itself uses every core): the engine-only baseline."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", ONE_THREAD, str(root), str(batch_size)], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t


def write_rate(dim: int = 384, rows: int = 16384, repeat: int = 3) -> tuple[float, float]:
    """Rows/s and MB/s of publishing float16 segments of `rows` rows (the default --segment-rows)."""
    from featurestore.segments import SegmentSet

    rng = np.random.default_rng(0)
    keys = [f"{i:032x}" for i in rng.integers(0, 2**62, rows)]
    pooled = rng.standard_normal((rows, dim)).astype(np.float16)
    best = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        segs = SegmentSet(Path(tmp) / "seg")
        for r in range(repeat):
            pooled[0, 0] = r  # new bytes, new segment
            t = time.perf_counter()
            segs.write(keys, {"pooled": pooled})
            best = min(best, time.perf_counter() - t)
    return rows / best, pooled.nbytes / best / 1e6


def claim_cost(others: int, keys: int = 64, repeat: int = 200) -> float:
    """Seconds one `Claims.claim` of a batch takes while `others` live writers hold claim files (each
    batch of every actor takes the claims lock once, so this is the pool's serial section)."""
    from featurestore.claims import Claims

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for j in range(others):
            c = stack.enter_context(Claims(Path(tmp)))
            c.claim([f"{j:08x}{i:024x}" for i in range(keys)], lambda ks: [False] * len(ks))
        me = stack.enter_context(Claims(Path(tmp)))
        batch = [f"ffffffff{i:024x}" for i in range(keys)]
        t = time.perf_counter()
        for _ in range(repeat):
            me.claim(batch, lambda ks: [False] * len(ks))
            me.release()
        return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--store-only", action="store_true", help="Only the store's write rate and claim cost.")
    args = ap.parse_args()
    if args.store_only:
        return store_figures()
    texts = phrases(args.n)
    print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}; n={args.n}, "
          f"batch {args.batch_size}, MiniLM on CPU")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("one process", ()), ("ray, 2 actors", ("--engine", "ray", "--workers", "2")),
                            ("ray, 1 actor", ("--engine", "ray", "--workers", "1")), ("1 proc, 1 thr", None)):
            root = Path(tmp) / name.replace(" ", "_").replace(",", "")
            fresh_store(root, texts)
            res, wall = extract(root, args.batch_size, *extra) if extra is not None else \
                extract_one_thread(root, args.batch_size)
            assert res["computed"] == args.n, res
            runs[name] = (res, wall)
            per = res.get("ray", {}).get("per_worker", {})
            actors = "  per actor " + ", ".join(f"{v['items_per_s']:.1f}" for v in per.values()) if per else ""
            print(f"{name:14s} loop {res['items_per_s']:8.1f} items/s   command {args.n / wall:8.1f} items/s "
                  f"(wall {wall:6.1f}s){actors}")
    local, _ = runs["one process"]
    ray2, ray2_wall = runs["ray, 2 actors"]
    ray1, _ = runs["ray, 1 actor"]
    print(f"ratio ray(2 actors)/one process: loop {ray2['items_per_s'] / local['items_per_s']:.3f} (target >= 0.8), "
          f"whole command {runs['one process'][1] / ray2_wall:.3f}")
    one = runs["1 proc, 1 thr"][0]
    print(f"engine overhead at equal threads: ray(1 actor, 1 thread)/one process(1 thread): loop "
          f"{ray1['items_per_s'] / one['items_per_s']:.3f}")
    rows_s = store_figures()
    r1 = np.mean([v["items_per_s"] for v in ray1["ray"]["per_worker"].values()])
    cores = os.cpu_count() or 1
    predicted = min(2 * r1, cores * r1, rows_s)  # 2 actors, each at the 1-actor rate, capped by cores and the store
    in_run = sum(v["items_per_s"] for v in ray2["ray"]["per_worker"].values())
    print(f"pool efficiency: 2-actor loop rate {ray2['items_per_s']:.1f} items/s against the sum of its actors' own "
          f"rates {in_run:.1f} items/s: {ray2['items_per_s'] / in_run:.2f} (gaps between shards, the tail)")
    print(f"scale model: per-actor rate {r1:.1f} items/s (1 actor alone); 2 actors on {cores} core(s) predicted "
          f"{predicted:.1f} items/s, measured {ray2['items_per_s']:.1f} items/s "
          f"({ray2['items_per_s'] / predicted:.2f} of the prediction)")


def store_figures() -> float:
    rows_s, mb_s = write_rate()
    print(f"store write rate: {rows_s:,.0f} rows/s ({mb_s:.0f} MB/s) for 16384-row float16 segments of 384 dims")
    for k in (1, 8, 32):
        print(f"claims: one batch's claim+release with {k:2d} other live writers: {claim_cost(k) * 1e3:.2f} ms")
    return rows_s


if __name__ == "__main__":
    main()
