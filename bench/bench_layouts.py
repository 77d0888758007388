"""Registering FER2013 by its layout: pixel strings -> PNGs in the store (fsynced, atomic) -> content keys.

Compares `add_layout_dataset(..., "fer2013", ...)` with a bare loop that parses the same CSV and
writes the same PNGs with no fsync, no rename and no manifest: the ratio is what crash safety and
registration cost. Default 5,000 rows (the real file has 35,887); a few seconds to a minute.

    .venv/bin/python bench/bench_layouts.py [--rows 5000]
"""
from __future__ import annotations

import argparse
import csv
import io
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path, offline hub)
import numpy as np


def write_csv(path: Path, rows: int) -> None:
    rng = np.random.default_rng(0)
    usage = ["Training", "PublicTest", "PrivateTest"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["emotion", "pixels", "Usage"])
        for i in range(rows):
            w.writerow([i % 7, " ".join(map(str, rng.integers(0, 256, 48 * 48))), usage[i % 3]])


def bare(path: Path, out: Path) -> int:
    from PIL import Image

    out.mkdir(parents=True)
    n = 0
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            pixels = np.array(row["pixels"].split(), dtype=np.int64).astype(np.uint8).reshape(48, 48)
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buf, format="PNG")
            (out / f"{i}.png").write_bytes(buf.getvalue())
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=5000)
    args = ap.parse_args()
    from featurestore.datasets.layouts import add_layout_dataset
    from featurestore.store import open_store

    work = Path(tempfile.mkdtemp(prefix="bench-layouts-"))
    try:
        write_csv(work / "fer2013.csv", args.rows)
        t = time.perf_counter()
        bare(work / "fer2013.csv", work / "bare")
        t_bare = time.perf_counter() - t
        store = open_store(work / "store", create=True)
        t = time.perf_counter()
        ds = add_layout_dataset(store, "fer", "fer2013", work)
        t_fs = time.perf_counter() - t
        assert ds.info["n_items"] == args.rows
        print(f"fer2013 layout, {args.rows} rows: fs {args.rows / t_fs:.0f} img/s ({t_fs:.1f} s), "
              f"bare parse+PNG loop {args.rows / t_bare:.0f} img/s ({t_bare:.1f} s), ratio {t_bare / t_fs:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
