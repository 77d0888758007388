"""What the readers' checksum costs: a keyed read of every row of a 200k x 384 float16 cache, the
first time in a process (each segment hashed and compared with its name) and again (checked already).

    python bench/bench_read_check.py [--rows 200000] [--dim 384]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import size_args

import featurestore.segments as segments
from featurestore.hashing import content_key
from featurestore.segments import SegmentSet


def main() -> None:
    args = size_args(__doc__)
    data = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32).astype(np.float16)
    keys = [content_key("text", f"item {i}") for i in range(args.rows)]
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        ss = SegmentSet(Path(tmp))
        for lo in range(0, args.rows, 16384):
            ss.write(keys[lo:lo + 16384], {"pooled": data[lo:lo + 16384]})
        index = ss.index()
        ss.read(keys[:10], "pooled", index=index)  # warm the page cache
        first, again = [], []
        for _ in range(args.repeat):
            segments._CHECKED.clear()  # a new process, as far as the check is concerned
            index.checked = False
            t = time.perf_counter()
            ss.read(keys, "pooled", index=index)
            first.append(time.perf_counter() - t)
            t = time.perf_counter()
            ss.read(keys, "pooled", index=index)
            again.append(time.perf_counter() - t)
        mb = data.nbytes / 1e6
        print(f"{args.rows} x {args.dim} float16 ({mb:.0f} MB), best of {args.repeat}: first keyed read in a process "
              f"{min(first):.3f} s (hashing each segment), later reads {min(again):.3f} s; "
              f"ratio {min(first) / min(again):.2f}")


if __name__ == "__main__":
    main()
