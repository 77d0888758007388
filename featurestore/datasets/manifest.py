"""The canonical dataset manifest: one row per item, stored as parquet.

Columns (every adapter produces exactly these, plus any extra columns it keeps):

| column | type | meaning |
| --- | --- | --- |
| item_id | str | unique within the dataset |
| split | str | train / val / test (or any name) |
| label | str, null | single-label target |
| labels | list[str], null | multi-label target |
| valence, arousal | f64, null | VA labels on [-1, 1] |
| group | str, null | speaker, session or subject: items that must share a split |
| fold | str, null | official cross-validation fold the item is tested in (DFEW, MAFW); `--cv fold` |
| text, image, audio, video | str, null | per modality the source: the text itself, or a file path |
| text_key, image_key, audio_key, video_key | str, null | content key of that source (null if unreadable) |
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import polars as pl

from .._io import regular_file_bytes
from ..backbones.base import MODALITIES
from ..errors import DatasetError
from ..hashing import content_key

__all__ = ["CANONICAL", "FILE_MODALITIES", "normalise", "add_content_keys", "resolve_paths", "split_by_hash", "SPLIT_ALIASES"]

CANONICAL = {
    "item_id": pl.String, "split": pl.String, "label": pl.String, "labels": pl.List(pl.String),
    "valence": pl.Float64, "arousal": pl.Float64, "group": pl.String, "fold": pl.String,
    **{m: pl.String for m in MODALITIES},
}
_ALIASES = {"id": "item_id", "speaker": "group", "session": "group", "subject": "group",
            "emotion": "label", "class": "label", "image_path": "image", "audio_path": "audio",
            "video_path": "video",
            "path": None}
FILE_MODALITIES = tuple(m for m in MODALITIES if m != "text")  # a file path per item
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "dev": "val", "testing": "test"}


def _rename_aliases(df: pl.DataFrame, source: str = "manifest") -> pl.DataFrame:
    renames, claimed = {}, {}
    for col in df.columns:
        target = _ALIASES.get(col.lower(), col.lower() if col.lower() in CANONICAL else None)
        if not target:
            continue
        if target == "group" and (target in claimed or ("group" in df.columns and col != "group")):
            continue  # speaker and session both given: a 'group' column, else the first, is the group
        if target in claimed:
            raise DatasetError(f"{source}: columns {claimed[target]!r} and {col!r} both give the {target!r} column; "
                               "drop or rename one of them")
        claimed[target] = col
        if target != col:
            renames[col] = target
    return df.rename(renames)


def _labels_column(df: pl.DataFrame) -> pl.DataFrame:
    if "labels" not in df.columns:
        return df
    dtype = df.schema["labels"]
    if dtype == pl.String:  # "joy|trust" or "joy;trust" or "joy,trust" in CSV
        return df.with_columns(
            pl.col("labels").str.replace_all(r"[;,]", "|").str.split("|")
            .list.eval(pl.element().str.strip_chars()).list.eval(pl.element().filter(pl.element() != ""))
        )
    return df.with_columns(pl.col("labels").cast(pl.List(pl.String)))


def normalise(df: pl.DataFrame, *, source: str, default_split: str | None = None) -> pl.DataFrame:
    """Bring a user's table to the canonical schema, or explain what is wrong with it."""
    if not len(df):
        raise DatasetError(f"{source}: no items (a header with no rows, or an empty file); columns are {df.columns}")
    dup = sorted({c.rsplit("_duplicated_", 1)[0] for c in df.columns if "_duplicated_" in c}
                 & {c for c in df.columns if "_duplicated_" not in c})
    if dup:
        raise DatasetError(f"{source}: column(s) {dup} appear more than once in the header; keep one of each")
    df = _labels_column(_rename_aliases(df, source))
    if "item_id" not in df.columns:
        raise DatasetError(f"{source}: no 'id' or 'item_id' column; columns are {df.columns}")
    df = df.with_columns(pl.col("item_id").cast(pl.String))
    if df["item_id"].null_count():
        raise DatasetError(f"{source}: {df['item_id'].null_count()} rows have no item id")
    dup = df["item_id"].filter(df["item_id"].is_duplicated()).unique().head(5).to_list()
    if dup:
        raise DatasetError(f"{source}: duplicate item ids, e.g. {dup}; every item needs its own id")
    if not any(m in df.columns for m in MODALITIES):
        raise DatasetError(f"{source}: no modality column; give at least one of {list(MODALITIES)} "
                           "(a text, or a path to an image, audio or video file)")
    if "split" not in df.columns:
        df = df.with_columns(split=pl.lit(default_split) if default_split else split_by_hash(df))
    df = df.with_columns(pl.col("split").cast(pl.String).str.strip_chars().str.to_lowercase().replace(SPLIT_ALIASES))
    no_split = df.filter(pl.col("split").is_null() | (pl.col("split") == ""))
    if len(no_split):
        raise DatasetError(f"{source}: {len(no_split)} row(s) have an empty split, e.g. item "
                           f"{no_split['item_id'][0]!r}; give every row a split (train, val, test) or drop the "
                           "split column to have all of them assigned by hash")
    for col, dtype in CANONICAL.items():
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=dtype).alias(col))
        else:
            try:
                df = df.with_columns(pl.col(col).cast(dtype))
            except pl.exceptions.PolarsError:
                raise DatasetError(_cast_failure(df, col, dtype, source)) from None
    for col in ("valence", "arousal"):
        bad = df.filter(pl.col(col).is_not_null() & ((pl.col(col) < -1) | (pl.col(col) > 1)))
        if len(bad):
            raise DatasetError(f"{source}: {len(bad)} rows have {col} outside [-1, 1], e.g. item "
                               f"{bad['item_id'][0]!r} = {bad[col][0]}; rescale VA labels to [-1, 1]")
    extra = [c for c in df.columns if c not in CANONICAL]
    return df.select(list(CANONICAL) + extra)


def _cast_failure(df: pl.DataFrame, col: str, dtype, source: str) -> str:
    """Which cells of `col` cannot be read as `dtype`, named by item and row, without polars' advice."""
    what = "a number" if dtype == pl.Float64 else "a list of labels" if isinstance(dtype, pl.List) else "text"
    try:
        bad = df.with_row_index("_row").filter(pl.col(col).is_not_null()
                                               & pl.col(col).cast(dtype, strict=False).is_null())
    except pl.exceptions.PolarsError:
        bad = None
    if bad is None or not len(bad):
        return f"{source}: column {col!r} cannot be read as {what}; fix its cells"
    first = bad.row(0, named=True)
    return (f"{source}: column {col!r} must hold {what}, but {len(bad)} row(s) do not, e.g. row {first['_row'] + 1} "
            f"(item {first.get('item_id')!r}) has {first[col]!r}; fix or empty those cells")


def split_by_hash(df: pl.DataFrame, fractions=(0.8, 0.1, 0.1)) -> pl.Series:
    """A seed-free, stable split: by a hash of the group (or the item id) into train/val/test."""
    basis = df["group"] if "group" in df.columns and df["group"].null_count() < len(df) else df["item_id"]
    out = []
    for value in basis.cast(pl.String).fill_null("").to_list():
        u = int.from_bytes(hashlib.sha256(value.encode()).digest()[:8], "big") / 2**64
        out.append("train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test")
    return pl.Series("split", out)


def resolve_paths(df: pl.DataFrame, root: Path, *, allow_outside_root: bool, source: str) -> pl.DataFrame:
    """Make file paths absolute against the dataset root, refusing ones that escape it."""
    root = root.resolve()
    for m in FILE_MODALITIES:
        if df[m].null_count() == len(df):
            continue
        resolved, escaping = [], []
        for item, p in zip(df["item_id"].to_list(), df[m].to_list()):
            if p is None:
                resolved.append(None)
                continue
            path = Path(os.path.expanduser(p))
            path = (path if path.is_absolute() else root / path).resolve()
            if not allow_outside_root and not path.is_relative_to(root):
                escaping.append(f"{item}: {p}")
            resolved.append(str(path))
        if escaping:
            raise DatasetError(
                f"{source}: {len(escaping)} {m} paths escape the dataset root {root}, e.g. "
                f"{escaping[:3]}; move the files under the root, pass --root, or allow it with "
                "--allow-outside-root")
        df = df.with_columns(pl.Series(m, resolved, dtype=pl.String))
    return df


def _file_key(modality: str, path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return content_key(modality, regular_file_bytes(path))
    except OSError:  # NotRegularFile too: a FIFO is never read
        return None  # recorded as a bad item ("cannot read file") at extraction


def add_content_keys(df: pl.DataFrame, progress: Iterable | None = None) -> pl.DataFrame:
    """Compute `<modality>_key` for every source: a hash of the file bytes or normalised text."""
    cols = {}
    for m in MODALITIES:
        values = df[m].to_list()
        if m == "text":
            cols[f"{m}_key"] = [content_key(m, v) if v is not None and v.strip() else None for v in values]
        else:
            it = progress(values, desc=f"hashing {m} files") if progress and df[m].null_count() < len(df) else values
            cols[f"{m}_key"] = [_file_key(m, v) for v in it]
    return df.with_columns([pl.Series(k, v, dtype=pl.String) for k, v in cols.items()])
