"""Replay pools: per (modality, class), the top p% of the correctly classified rows by confidence."""
from __future__ import annotations

import math

import polars as pl

from ..errors import ConfigError

__all__ = ["mark_pools", "pool_counts"]


def mark_pools(meta: pl.DataFrame, top_p: float = 0.2) -> pl.DataFrame:
    """Set the `pool` column: within each (modality, class), the ceil(top_p * n_correct) correct rows
    of highest confidence (ties broken by row order). `top_p=1` keeps every correct row."""
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    group = ["modality", "class"]
    rank = (pl.when(pl.col("correct")).then(pl.col("confidence")).otherwise(None)
            .rank("ordinal", descending=True).over(group))
    keep = (pl.col("correct").cast(pl.Int64).sum().over(group) * top_p).map_batches(
        lambda s: s.map_elements(lambda v: math.ceil(v - 1e-9), return_dtype=pl.Int64), return_dtype=pl.Int64)
    return meta.with_columns(pool=(pl.col("correct") & (rank <= keep)).fill_null(False))


def pool_counts(meta: pl.DataFrame) -> dict[str, dict[str, int]]:
    """modality -> class -> pool size (zero where a class has rows but an empty pool)."""
    out: dict[str, dict[str, int]] = {}
    agg = meta.group_by(["modality", "class"]).agg(pl.col("pool").sum().alias("n")).sort(["modality", "class"])
    for mod, cls, n in agg.iter_rows():
        out.setdefault(mod, {})[cls] = int(n)
    return out
