"""What checking a saved memory against its checksums.json costs when it is loaded (`fs query`,
`concept` heads): `Memory.load` of a flat index of N x D float32 vectors, with the check and without.

    python bench/bench_load_check.py [--rows 200000] [--dim 384] [--repeat 3]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import best_of, size_args

import featurestore.memory.memory as memory_module
from featurestore.memory import Memory


def main() -> None:
    args = size_args(__doc__)
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        mem = Memory(args.dim, memory_module.MemoryConfig(exact_max=args.rows))  # flat: the raw vectors
        mem.add(np.arange(args.rows), x, {})
        folder = Path(tmp) / "m"
        mem.save(folder)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
        Memory.load(folder)  # warm the page cache
        checked = best_of(lambda: Memory.load(folder), args.repeat)
        real = memory_module.require_intact
        memory_module.require_intact = lambda *a, **k: None
        try:
            unchecked = best_of(lambda: Memory.load(folder), args.repeat)
        finally:
            memory_module.require_intact = real
    print(f"memory of {args.rows} x {args.dim} float32 ({size:.0f} MB on disk), best of {args.repeat}: "
          f"load with the check {checked:.3f} s, without {unchecked:.3f} s")


if __name__ == "__main__":
    main()
