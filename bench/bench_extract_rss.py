"""Streaming: peak RSS of extracting 50k items divided by 5k items. Target (issue 2): <= 1.3.

Each size runs in a fresh process (peak RSS is per process) that builds a store with n
distinct short texts of real lexicon words and extracts them with the packaged MiniLM.

    python bench/bench_extract_rss.py [--small 5000] [--large 50000]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def child(n: int, batch_size: int) -> None:
    import polars as pl
    from _common import phrases

    from featurestore.datasets import add_dataset
    from featurestore.datasets.manifest import normalise
    from featurestore.store import open_store
    from featurestore.jobs.extract import ExtractConfig, run

    texts = phrases(n)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        store = open_store(tmp, create=True)
        df = normalise(pl.DataFrame({"item_id": [f"i{i}" for i in range(n)], "text": texts}),
                       source="bench", default_split="train")
        add_dataset(store, "bench", df, root=None, source="bench")
        del df, texts
        t = time.perf_counter()
        res = run(ExtractConfig(dataset="bench", modality="text", backbone="minilm", batch_size=batch_size), store)
        print(json.dumps({"n": n, "computed": res.computed, "seconds": time.perf_counter() - t,
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=5000)
    ap.add_argument("--large", type=int, default=50000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.batch_size)
    out = {}
    for n in (args.small, args.large):
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size)],
                              capture_output=True, text=True, check=True)
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"n={n:6d}: peak RSS {out[n]['peak_rss_mb']:7.1f} MB, {out[n]['computed']} rows in "
              f"{out[n]['seconds']:.1f}s")
    ratio = out[args.large]["peak_rss_mb"] / out[args.small]["peak_rss_mb"]
    print(f"peak RSS ratio {args.large} / {args.small} items: {ratio:.3f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
