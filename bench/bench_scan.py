"""Cache scan: read all pooled rows of a 200k x 384 cache vs `np.load` of the same array.

Target (issue 2): at most 2x the time of np.load. Both read the same dtype (float16, as
extraction stores by default) from the same disk, warm in the page cache. Two layouts:
as extraction leaves it (segments of 16384 rows) and after `fs gc --compact`.

    python bench/bench_scan.py [--rows 200000] [--dim 384]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from _common import best_of

from featurestore.features import FeatureSet
from featurestore.hashing import content_key
from featurestore.store import open_store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--segment-rows", type=int, default=16384)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.rows, args.dim), dtype=np.float32).astype(np.float16)
    keys = [content_key("text", f"item {i}") for i in range(args.rows)]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        np.save(Path(tmp) / "ref.npy", data)
        store = open_store(Path(tmp) / "store", create=True)
        fs = FeatureSet(store, "bench-0000000000000000")
        fs.ensure_spec({"backbone": "bench", "modality": "text", "dim": args.dim, "config": {"dtype": "float16"}})
        w = fs.segments.writer(dtypes={"pooled": "float16"})
        for lo in range(0, args.rows, args.segment_rows):
            w.add(keys[lo:lo + args.segment_rows], {"pooled": data[lo:lo + args.segment_rows]})
            w.flush()
        want = np.array(keys, dtype="S32")[rng.permutation(args.rows)]  # manifest order != storage order
        t_npy = best_of(lambda: np.load(Path(tmp) / "ref.npy"))
        perm = rng.permutation(args.rows)
        t_npy_perm = best_of(lambda: np.load(Path(tmp) / "ref.npy")[perm])
        results = {}
        for layout in ("segments", "compacted"):
            if layout == "compacted":
                fs.segments.compact()
            n_seg = len(fs.segments.segments())
            fresh = lambda: FeatureSet(store, fs.fingerprint)  # noqa: E731 - includes building the key index
            results[layout] = {
                "scan": best_of(lambda: fresh().scan_pooled()),
                "aligned": best_of(lambda: fresh().read_pooled(want)),
                "n_seg": n_seg,
            }
            out, present = fresh().read_pooled(want)
            assert present.all()
        print(f"np.load of {args.rows} x {args.dim} float16: {t_npy * 1e3:.1f} ms; "
              f"np.load + a shuffle (the same work as aligning): {t_npy_perm * 1e3:.1f} ms")
        for layout, r in results.items():
            print(f"{layout:9s} ({r['n_seg']:3d} segments): full scan {r['scan'] * 1e3:7.1f} ms = "
                  f"{r['scan'] / t_npy:.2f}x np.load;  aligned to a shuffled manifest (reader API) "
                  f"{r['aligned'] * 1e3:7.1f} ms = {r['aligned'] / t_npy_perm:.2f}x np.load+shuffle   (target <= 2x)")


if __name__ == "__main__":
    main()
