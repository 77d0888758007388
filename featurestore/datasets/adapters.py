"""Dataset adapters: each turns one kind of source into a canonical manifest table."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from ..errors import DatasetError
from .manifest import SPLIT_ALIASES, normalise

__all__ = ["read_manifest_file", "read_folder", "IMAGE_EXT", "AUDIO_EXT", "VIDEO_EXT"]

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
AUDIO_EXT = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif"}
VIDEO_EXT = {".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v"}


def read_manifest_file(path: str | Path) -> pl.DataFrame:
    """A user's CSV, JSONL or parquet manifest, normalised."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            df = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        elif suffix in (".jsonl", ".ndjson"):
            df = _read_jsonl(path)
        elif suffix in (".parquet", ".pq"):
            df = pl.read_parquet(path)
        else:
            raise DatasetError(f"manifest {str(path)!r}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    except pl.exceptions.PolarsError as exc:
        raise DatasetError(f"manifest {str(path)!r} cannot be parsed: {polars_reason(exc)}") from None
    return normalise(df, source=f"manifest {str(path)!r}")


def _read_delimited(path: Path, separator: str) -> pl.DataFrame:
    """A CSV/TSV: non-UTF-8 bytes are refused with their line; a column whose type the first rows
    guess wrong is read again with the whole file scanned (normalise then names any bad cell)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DatasetError(f"manifest {str(path)!r} line {line}, byte {column} of the line: not valid UTF-8 "
                           f"(byte 0x{data[exc.start]:02x}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                           ) from None
    try:
        try:
            return pl.read_csv(data, separator=separator, infer_schema_length=10000)
        except pl.exceptions.ComputeError:
            return pl.read_csv(data, separator=separator, infer_schema_length=None)
    except pl.exceptions.PolarsError as exc:
        ragged = _ragged_line(data, separator) if "more fields" in str(exc) else None
        if not ragged:
            raise
        line, fields, header = ragged
        held = "a tab" if separator == "\t" else 'a comma ("a, b")'
        raise DatasetError(f"manifest {str(path)!r} line {line} has {fields} fields, the header {header}; quote cells "
                           f"that hold {held} or fix the row") from None


def _ragged_line(data: bytes, separator: str) -> tuple[int, int, int] | None:
    """(line, fields, header fields) of the first row with more fields than the header, as the csv
    module splits it (polars only says 'found more fields than defined in Schema'); None if none."""
    import csv
    import io

    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""), delimiter=separator)
    header = next(reader, None)
    for row in reader:
        if header is not None and len(row) > len(header):
            return reader.line_num, len(row), len(header)
    return None


def polars_reason(exc: Exception) -> str:
    """The reason in a polars error, on one line, without its advice about polars' own arguments
    (which a user of this tool cannot pass)."""
    text = str(exc)
    for cut in ("You might want to try", "This error occurred", "Original error", "Resolved plan", "Consider setting"):
        if cut in text:
            text = text[: text.index(cut)]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("- ")]
    return " ".join(" ".join(lines).split())[:300] or type(exc).__name__


def _read_jsonl(path: Path) -> pl.DataFrame:
    rows = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        where = f"manifest {str(path)!r} line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{where}: not valid UTF-8 (byte {exc.start}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON ({exc.msg})") from None
        try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 column can hold
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DatasetError(f"{where}: holds a lone surrogate ({exc.object[exc.start:exc.end]!r}); "
                               "fix that \\u escape") from None
        rows.append(row)
    return pl.from_dicts(rows, infer_schema_length=None)


def read_folder(root: str | Path) -> pl.DataFrame:
    """`root/<class>/<file>` or `root/<split>/<class>/<file>`, images, audio or video by extension."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder {str(root)!r} does not exist")
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_names = {"train", "val", "test", *SPLIT_ALIASES}
    by_split = bool(tops) and all(p.name.lower() in split_names for p in tops)
    rows = []
    for split_dir in (tops if by_split else [root]):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(class_dir.rglob("*")):
                ext = f.suffix.lower()
                modality = ("image" if ext in IMAGE_EXT else "audio" if ext in AUDIO_EXT
                            else "video" if ext in VIDEO_EXT else None)
                if modality is None or not f.is_file():
                    continue
                rel = f.relative_to(root).as_posix()
                rows.append({"item_id": rel, "label": class_dir.name, modality: rel,
                             **({"split": split_dir.name} if by_split else {})})
    if not rows:
        raise DatasetError(f"folder {str(root)!r} holds no images ({sorted(IMAGE_EXT)}), audio "
                           f"({sorted(AUDIO_EXT)}) or video ({sorted(VIDEO_EXT)}) under <class>/ or "
                           "<split>/<class>/ folders")
    return normalise(pl.from_dicts(rows, infer_schema_length=None), source=f"folder {str(root)!r}")
