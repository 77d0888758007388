"""Fault injection shared by the tests: what a failing disk or mount does to reads, and a job racing another."""
from __future__ import annotations

import os
import pathlib


def failing_reads(monkeypatch, errors: dict) -> None:
    """Path.read_bytes raises OSError(errno) for the chosen file names, as a failing disk or mount would."""
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name in errors:
            code = errors[self.name]
            raise OSError(code, os.strerror(code), str(self))
        return real(self)
    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)


def publish_after_each_plan(monkeypatch, fs, n: int = 10) -> list:
    """Each time an extraction's driver plans (`jobs.extract.pending`), another job publishes rows for
    the first `n` inputs it planned to compute, right after the plan read the set; returns the keys."""
    import numpy as np

    from featurestore.jobs import extract

    real, published = extract.pending, []

    def pending_then_another_job_publishes(rows, items, *a, **k):
        work = real(rows, items, *a, **k)
        keys = [it.key for it in work.todo[:n]]
        published.extend(keys)
        fs.segments.write(keys, {"pooled": np.ones((len(keys), fs.dim), fs.dtype)})
        return work
    monkeypatch.setattr(extract, "pending", pending_then_another_job_publishes)
    return published
