"""Records that carry their own SHA-256, so a flipped digit in one is refused instead of being used.

A JSON record (a sweep's `sweep.json` and `best_test.json`, a refresh's `state.json`, `pending.json`
and `summary.json`) holds `sha256`, the SHA-256 of the canonical JSON of its other fields, as a
feature set's catalogue does. A parquet table of result rows (a sweep's parts and `results.parquet`,
a refresh's `report.parquet`) holds `row_sha256` per row, over the row's non-null values with every
number as a float (so a table that gathers rows of several parts, where polars widens an integer
column to floats and fills absent columns with nulls, still checks). Files written before the seal
existed have none and are read as they are.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ._io import read_json, write_json_atomic
from .errors import IntegrityError
from .hashing import canonical_json

__all__ = ["SEAL", "ROW_DIGEST", "write_sealed_json", "read_sealed_json", "json_problem", "row_digest", "seal_rows",
           "read_sealed_table", "table_problem"]

SEAL = "sha256"
ROW_DIGEST = "row_sha256"


def _digest(doc: dict) -> str:
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()


def write_sealed_json(path: Path, obj: dict) -> None:
    """Write `obj` atomically with its seal (over what a reader will load: its JSON round trip)."""
    doc = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL}, default=str))
    write_json_atomic(Path(path), {**doc, SEAL: _digest(doc)})


def read_sealed_json(path: Path, fix: str) -> dict:
    """The record without its seal, or one IntegrityError naming the file and `fix` when it is damaged."""
    doc = read_json(path)
    problem = _json_doc_problem(doc)
    if problem:
        raise IntegrityError(f"{path} is damaged ({problem}); {fix}")
    doc.pop(SEAL, None)
    return doc


def _json_doc_problem(doc) -> str:
    if not isinstance(doc, dict):
        return "not a JSON object"
    seal = doc.get(SEAL)
    if seal is not None and seal != _digest({k: v for k, v in doc.items() if k != SEAL}):
        return "its content does not match its SHA-256"
    return ""


def json_problem(path: Path) -> str:
    """What is wrong with a sealed JSON record ('' when nothing): for `fs verify`."""
    try:
        return _json_doc_problem(read_json(path))
    except IntegrityError:
        return "not valid JSON (damaged)"


def _norm(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    v = float(v)
    return v if math.isfinite(v) else repr(v)


def row_digest(row: dict) -> str:
    """SHA-256 of a result row: its non-null values (not the digest), numbers as floats."""
    return _digest({k: _norm(v) for k, v in row.items() if k != ROW_DIGEST and v is not None})


def seal_rows(rows: list[dict]) -> list[dict]:
    """The rows, each with its `row_sha256`."""
    return [{**{k: v for k, v in r.items() if k != ROW_DIGEST}, ROW_DIGEST: row_digest(r)} for r in rows]


def _table(path: Path):
    import polars as pl

    try:
        return pl.read_parquet(path), ""
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - polars/arrow raise many kinds for a damaged file
        return None, f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"


def _rows_problem(df) -> str:
    if ROW_DIGEST not in df.columns:
        return ""  # written before rows were sealed
    for i, row in enumerate(df.to_dicts()):  # a null digest: a row written before rows were sealed
        if row[ROW_DIGEST] is not None and row[ROW_DIGEST] != row_digest(row):
            return f"row {i} does not match its SHA-256"
    return ""


def read_sealed_table(path: Path, fix: str):
    """A parquet table of sealed rows (a polars DataFrame), or one IntegrityError naming the file and `fix`."""
    df, problem = _table(Path(path))
    problem = problem or _rows_problem(df)
    if problem:
        raise IntegrityError(f"{path} is damaged ({problem}); {fix}")
    return df


def table_problem(path: Path) -> str:
    """What is wrong with a parquet table of sealed rows ('' when nothing): for `fs verify`."""
    df, problem = _table(Path(path))
    return problem or _rows_problem(df)
