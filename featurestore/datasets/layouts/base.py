"""The layout contract: a dataset as its authors ship it -> the canonical manifest plus a report.

A layout subclass reads its label files under `root` and yields one row per item (canonical
column names, file paths relative to `root`). The base class checks every file exists (a missing
one becomes a null source and a recorded problem; an item with no source left is dropped), turns
the rows into the canonical manifest and reports what it found: counts per split, class and fold,
files missing, and per-item problems with their reasons.

Whole-dataset failures (no root, no label file) raise one `DatasetError` line; one bad row or file
is recorded and the rest goes on.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections import Counter
from pathlib import Path
from typing import ClassVar, Iterable, Iterator

import polars as pl

from ...errors import ConfigError, DatasetError
from ..manifest import FILE_MODALITIES, normalise

__all__ = ["Layout", "LayoutResult", "MAX_PROBLEMS", "truthy", "parse_options"]

MAX_PROBLEMS = 1000  # kept in dataset.json; the count is always exact


def truthy(value: str) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"option value {value!r} is not a boolean; use true or false")


@dataclasses.dataclass
class LayoutResult:
    """What a layout found: the manifest, the root its paths resolve against, and the report."""

    df: pl.DataFrame
    root: Path
    report: dict


class Layout:
    """One dataset layout. Subclasses set `name`, `description`, `modalities`, `options`, and write `rows()`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[dict[str, tuple[str, str]]] = {}  # option -> (default, help)
    verified: ClassVar[str] = ""  # what of the layout could not be checked against the real files here

    def __init__(self, root: str | Path, *, options: dict[str, str] | None = None, workdir: Path | None = None,
                 progress=None):
        self.root = Path(os.path.expanduser(str(root)))
        given = dict(options or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(f"{k} (default {v[0]!r})" for k, v in self.options.items()) or "none"
            raise ConfigError(f"layout {self.name!r} has no option {unknown[0]!r}; its options: {known}")
        self.opt = {k: str(given.get(k, default)) for k, (default, _) in self.options.items()}
        self.workdir = workdir
        self.progress = progress or (lambda it, **kw: it)  # a tqdm-like wrapper for long loops
        self.problems: list[dict] = []
        self.n_problems = 0
        self.missing_files: Counter = Counter()

    # ---- for subclasses ---------------------------------------------------------------
    def rows(self) -> Iterable[dict]:
        raise NotImplementedError

    def problem(self, where: str, reason: str) -> None:
        """Record one bad item or row (kept up to MAX_PROBLEMS; counted always)."""
        self.n_problems += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"item": where, "reason": reason})

    def need(self, *relative: str, what: str = "label file") -> Path:
        """The first of these paths under root that exists, or one DatasetError naming what is missing."""
        for rel in relative:
            path = self.root / rel
            if path.exists():
                return path
        raise DatasetError(f"layout {self.name}: {what} {relative[0]!r} not found under {self.root}; "
                           f"see docs/datasets.md ({self.name}) for the layout it expects")

    def choice(self, option: str, allowed: Iterable[str]) -> str:
        value, allowed = self.opt[option], list(allowed)
        if value not in allowed:
            raise ConfigError(f"layout {self.name}: option {option}={value!r} must be one of {allowed}")
        return value

    def read_text(self, path: Path) -> str:
        """A label file as text: UTF-8 (with or without BOM), else cp1252 (some releases are)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"layout {self.name}: cannot read {path} ({exc.strerror or exc}); check its "
                               "permissions") from None
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError:
            return data.decode("cp1252", errors="replace")

    def csv_rows(self, path: Path, *, required: Iterable[str] = (), delimiter: str = ",") -> Iterator[tuple[int, dict]]:
        """(line number, row) of a headed CSV; a header without the required columns is one DatasetError."""
        reader = csv.DictReader(io.StringIO(self.read_text(path), newline=""), delimiter=delimiter)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"layout {self.name}: {path} has no column(s) {missing}; its header is {header}")
        try:
            for row in reader:
                yield reader.line_num, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k}
        except csv.Error as exc:  # a NUL byte, an unterminated quote: the rest of the file cannot be trusted
            self.problem(f"{path.name}:{reader.line_num}", f"CSV cannot be parsed from here on ({exc}): rest skipped")

    def index_files(self, extensions: Iterable[str], *, under: Path | None = None) -> dict[str, list[Path]]:
        """Files under `under` (default root) with these extensions, by stem (lower-case)."""
        exts = {e.lower() for e in extensions}
        out: dict[str, list[Path]] = {}
        base = under or self.root
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                p = Path(dirpath, name)
                if p.suffix.lower() in exts and not name.startswith("."):
                    out.setdefault(p.stem.lower(), []).append(p)
        return out

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)

    # ---- the run ----------------------------------------------------------------------
    def paths_root(self) -> Path:
        """What the rows' relative paths resolve against (root; fer2013: the materialised images)."""
        return self.root

    def run(self) -> LayoutResult:
        if not self.root.is_dir():
            raise DatasetError(f"layout {self.name}: dataset root {str(self.root)!r} is not a folder; pass "
                               "--root DIR, the folder the dataset was unpacked into")
        rows = []
        base = self.paths_root()
        for row in self.rows():
            for m in FILE_MODALITIES:
                p = row.get(m)
                if p is not None and not (base / p).is_file():
                    self.missing_files[m] += 1
                    self.problem(row["item_id"], f"{m} file missing: {p}")
                    row[m] = None
            if not any(row.get(m) is not None for m in (*FILE_MODALITIES, "text")):
                continue  # nothing to extract: recorded above as a missing file
            rows.append(row)
        if not rows:
            some = "; ".join(f"{p['item']}: {p['reason']}" for p in self.problems[:2])
            found = f"{self.n_problems} problem(s), e.g. {some}" if self.n_problems else "no files it recognises"
            raise DatasetError(f"layout {self.name}: found no usable items under {self.root} ({found}); see "
                               f"docs/datasets.md ({self.name}) for the layout it expects")
        df = pl.from_dicts(rows, infer_schema_length=None)
        df = normalise(df, source=f"layout {self.name} at {self.root}")
        return LayoutResult(df, base, self.report(df))

    def report(self, df: pl.DataFrame) -> dict:
        def counts(col: str) -> dict:
            return {str(k): int(v) for k, v in sorted(df.filter(pl.col(col).is_not_null()).group_by(col).len().iter_rows())}

        per_split = {}
        for split in sorted(df["split"].unique().to_list()):
            sub = df.filter(pl.col("split") == split)
            per_split[split] = {str(k): int(v) for k, v in
                                sorted(sub.filter(pl.col("label").is_not_null()).group_by("label").len().iter_rows())}
        return {"layout": {
            "name": self.name, "root": str(self.root.resolve()), "options": self.opt,
            "n_items": len(df), "splits": counts("split"), "classes": counts("label"),
            "classes_per_split": per_split,
            "multilabels": {str(k): int(v) for k, v in sorted(Counter(
                x for v in df["labels"].to_list() if v for x in v).items())},
            "folds": counts("fold"), "n_groups": int(df["group"].drop_nulls().n_unique()),
            "with_va": int(len(df) - df["valence"].null_count()),
            "modalities": {m: int(len(df) - df[m].null_count()) for m in (*FILE_MODALITIES, "text")
                           if df[m].null_count() < len(df)},
            "missing_files": dict(self.missing_files), "n_problems": self.n_problems, "problems": self.problems,
        }}


def parse_options(pairs: Iterable[str]) -> dict[str, str]:
    """`key=value` strings (the CLI's repeated --option) as a dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"option {pair!r} should be KEY=VALUE, e.g. classes=4")
        out[key.strip()] = value.strip()
    return out
