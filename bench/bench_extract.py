"""Extraction overhead: `fs extract` items/s divided by a bare forward loop on the same batches.

Target (issue 10): >= 0.9. The bare loop runs only `backbone.encode` (tokenise + forward +
pool) on the same batches. The job is timed as a whole: the entire `run()` call (planning,
reading the manifest, dedup, claims, decoding on a thread, NaN checks, segment building and
SHA-256, atomic publication every few seconds, the catalogue, the final publish), with the
model already loaded (its load time is the only thing left out).

    python bench/bench_extract.py [--n 4000] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import polars as pl
from _common import phrases

from featurestore import backbones
from featurestore.datasets import add_dataset
from featurestore.datasets.manifest import normalise
from featurestore.store import open_store
from featurestore.jobs.extract import ExtractConfig, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    texts = phrases(args.n)
    bb = backbones.create("minilm").load()
    batches = [[bb.prepare(t) for t in texts[i:i + args.batch_size]] for i in range(0, len(texts), args.batch_size)]
    bb.encode(batches[0])  # warm up
    ratios, bares, jobs, shares = [], [], [], []
    for r in range(args.repeat):
        t = time.perf_counter()
        for b in batches:
            bb.encode(b)
        bare = len(texts) / (time.perf_counter() - t)
        with tempfile.TemporaryDirectory() as tmp:
            store = open_store(tmp, create=True)
            df = normalise(pl.DataFrame({"item_id": [f"i{i}" for i in range(len(texts))], "text": texts}),
                           source="bench", default_split="train")
            add_dataset(store, "bench", df, root=None, source="bench")
            t = time.perf_counter()
            res = run(ExtractConfig(dataset="bench", modality="text", backbone="minilm",
                                    batch_size=args.batch_size), store, backbone=bb)
            elapsed = time.perf_counter() - t
            whole = res.computed / elapsed  # the whole run(), model already loaded
        shares.append(res.model_seconds / elapsed)
        ratios.append(whole / bare)
        bares.append(bare)
        jobs.append(whole)
        print(f"run {r}: bare loop {bare:8.1f} items/s   fs extract (whole run) {whole:8.1f} items/s   "
              f"ratio {ratios[-1]:.3f}   ({res.segments} segments; encode = {shares[-1]:.3f} of the run)")
    print(f"extraction overhead ratio: median of paired runs {sorted(ratios)[len(ratios) // 2]:.3f}, "
          f"best vs best {max(jobs) / max(bares):.3f}  (target >= 0.9; n={len(texts)}, batch {args.batch_size}, "
          "minilm, CPU; best-vs-best is the robust figure on a shared machine)")
    print(f"share of the whole run spent in backbone.encode: median {sorted(shares)[len(shares) // 2]:.3f} "
          "(what the job adds is the rest; immune to load changes between the bare loop and the job)")


if __name__ == "__main__":
    main()
