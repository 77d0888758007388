"""Replay pools: per (modality, class), the top p% of the correctly classified rows by confidence,
and never fewer than a floor of rows while the class has them."""
from __future__ import annotations

import math

import polars as pl

from ..errors import ConfigError

__all__ = ["mark_pools", "pool_counts"]


def mark_pools(meta: pl.DataFrame, top_p: float = 0.2, min_pool: int = 8) -> pl.DataFrame:
    """Set the `pool` column: within each (modality, class), the ceil(top_p * n_correct) correct rows
    of highest confidence (ties broken by row order), topped up to min(min_pool, rows of the class)
    with the next rows by confidence in the true class (the correct ones first, then the others).
    `top_p=1` keeps every correct row."""
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    if min_pool < 1:
        raise ConfigError(f"min_pool={min_pool} must be at least 1 (a class with rows always has a pool)")
    group = ["modality", "class"]
    # correct rows rank before the others: their score is confidence + 2, the others' confidence (<= 1)
    order = pl.col("confidence").fill_null(0.0) + 2.0 * pl.col("correct").fill_null(False).cast(pl.Float64)
    rank = order.rank("ordinal", descending=True).over(group)
    top = (pl.col("correct").fill_null(False).cast(pl.Int64).sum().over(group) * top_p).map_batches(
        lambda s: s.map_elements(lambda v: math.ceil(v - 1e-9), return_dtype=pl.Int64), return_dtype=pl.Int64)
    floor = pl.min_horizontal(pl.len().over(group), pl.lit(min_pool))
    return meta.with_columns(pool=rank <= pl.max_horizontal(top, floor))


def pool_counts(meta: pl.DataFrame) -> dict[str, dict[str, int]]:
    """modality -> class -> pool size (zero where a class has rows but an empty pool)."""
    out: dict[str, dict[str, int]] = {}
    agg = meta.group_by(["modality", "class"]).agg(pl.col("pool").sum().alias("n")).sort(["modality", "class"])
    for mod, cls, n in agg.iter_rows():
        out.setdefault(mod, {})[cls] = int(n)
    return out
