"""Helpers for the benchmarks: timing, a scratch store, synthetic text items."""
from __future__ import annotations

import itertools
import os
import statistics
import threading
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def best_of(fn, repeat: int = 3) -> float:
    """Best wall time of `repeat` runs (seconds): the least-disturbed measurement."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def median(xs):
    return statistics.median(xs)


def phrases(n: int) -> list[str]:
    """n distinct short texts made of real lexicon words (deterministic)."""
    from featurestore.datasets.demo import nrc_lexicon

    words = sorted(nrc_lexicon())
    out = []
    for a, b in itertools.product(words, words[::7]):
        if a != b:
            out.append(f"{a} {b}")
        if len(out) == n:
            return out
    raise ValueError(f"cannot make {n} phrases")


class GPUSampler:
    """Mean GPU utilisation (%) while running, sampled every 50 ms (CUDA only)."""

    def __init__(self, device: str):
        self.on, self.samples, self._stop = device.startswith("cuda"), [], threading.Event()

    def __enter__(self):
        if self.on:
            import torch

            def loop():
                while not self._stop.wait(0.05):
                    try:
                        self.samples.append(torch.cuda.utilization())
                    except Exception:  # no pynvml: nothing to sample
                        return
            self.thread = threading.Thread(target=loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


def size_args(doc: str, *, rows: int = 200_000, dim: int = 384, repeat: int = 3):
    """`--rows`, `--dim` and `--repeat` of a benchmark over an N x D array, parsed (`doc`: its docstring)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rows", type=int, default=rows)
    ap.add_argument("--dim", type=int, default=dim)
    ap.add_argument("--repeat", type=int, default=repeat)
    return ap.parse_args()
