"""Datasets in the store: a manifest (parquet) plus a small JSON of facts about it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import polars as pl

from .._io import cleaned_on_failure, publish, read_json, tmp_path, write_checksums, write_json_atomic
from ..backbones.base import MODALITIES
from ..errors import DatasetError, IntegrityError, NotFoundError
from ..hashing import file_digest
from ..store import Store, check_name, now_iso
from .adapters import read_folder, read_manifest_file
from .demo import build_demo
from .manifest import FILE_MODALITIES, add_content_keys, resolve_paths

__all__ = ["Dataset", "add_dataset", "get_dataset", "list_datasets", "read_manifest_file", "read_folder",
           "build_demo", "BUILTINS"]

BUILTINS: dict[str, Callable[[], pl.DataFrame]] = {"demo": build_demo}


@dataclasses.dataclass
class Dataset:
    """A registered dataset: its manifest table and facts about it (`dataset.json`)."""

    name: str
    info: dict
    manifest: pl.DataFrame

    @property
    def manifest_hash(self) -> str:
        return self.info["manifest_hash"]

    @property
    def label_set(self) -> list[str]:
        return self.info.get("label_set", [])

    @property
    def multilabel_set(self) -> list[str]:
        return self.info.get("multilabel_set", [])

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if self.info["modalities"].get(m, 0)]

    def select(self, splits=(), limit: int = 0) -> pl.DataFrame:
        """The manifest rows of these splits (all when empty), the first `limit` of them (0: all)."""
        df = self.manifest
        if splits:
            df = df.filter(df["split"].is_in(list(splits)))
        return df.head(limit) if limit else df

    def split(self, name: str) -> pl.DataFrame:
        return self.manifest.filter(pl.col("split") == name)

    def splits(self) -> dict[str, int]:
        return self.info.get("splits", {})


def _facts(df: pl.DataFrame) -> dict:
    labels = sorted(df["label"].drop_nulls().unique().to_list())
    multi = sorted(df["labels"].explode().drop_nulls().unique().to_list())
    return {
        "n_items": len(df),
        "splits": dict(sorted(df.group_by("split").len().iter_rows())),
        "modalities": {m: int(len(df) - df[m].null_count()) for m in MODALITIES},
        "label_set": labels,
        "multilabel_set": multi,
        "va_labels": {c: int(len(df) - df[c].null_count()) for c in ("valence", "arousal")},
        "folds": dict(sorted(df.filter(pl.col("fold").is_not_null()).group_by("fold").len().iter_rows())),
    }


def add_dataset(store: Store, name: str, df: pl.DataFrame, *, root: str | Path | None, source: str,
                replace: bool = False, allow_outside_root: bool = False,
                progress: Callable | None = None, extra_info: dict | None = None) -> Dataset:
    """Register a normalised manifest under `name`: resolve paths, hash contents, publish.
    `extra_info` is added to `dataset.json` (a layout adapter's report)."""
    folder = store.dataset_dir(check_name(name, "dataset"))
    if (folder / "manifest.parquet").exists() and not replace:
        raise DatasetError(f"dataset {name!r} already exists in {store.root}; pass --replace to overwrite "
                           "its manifest (cached features are kept: they are keyed by content)")
    if root is not None:
        df = resolve_paths(df, Path(root), allow_outside_root=allow_outside_root, source=source)
    elif any(df[m].null_count() < len(df) for m in FILE_MODALITIES):
        raise DatasetError(f"{source}: has file paths but no dataset root; pass --root DIR")
    df = add_content_keys(df, progress)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "manifest.parquet"
    tmp = tmp_path(target)
    with cleaned_on_failure(tmp, target):
        df.write_parquet(tmp, statistics=False)
    publish(tmp, target)
    info = {"name": name, "source": source, "root": str(Path(root).resolve()) if root else None,
            "created_at": now_iso(), "manifest_hash": file_digest(target), **_facts(df), **(extra_info or {})}
    write_json_atomic(folder / "dataset.json", info)
    write_checksums(folder, ["manifest.parquet", "dataset.json"])  # a flipped byte in either is found by verify
    return Dataset(name, info, df)


def get_dataset(store: Store, name: str) -> Dataset:
    folder = store.dataset_dir(name)
    if not (folder / "dataset.json").is_file():
        known = ", ".join(list_datasets(store)) or "none"
        raise NotFoundError(f"dataset {name!r} is not in store {store.root}; known: {known} "
                            "(add one with `fs datasets add`)")
    info = read_json(folder / "dataset.json")
    try:
        manifest = pl.read_parquet(folder / "manifest.parquet")
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise IntegrityError(f"{folder / 'manifest.parquet'} is damaged or missing ({type(exc).__name__}); "
                             f"re-add the dataset with `fs datasets add {name} ... --replace`") from None
    missing = [m for m in MODALITIES if m not in manifest.columns]
    if missing:  # registered before a modality existed (video): it has no such inputs
        manifest = manifest.with_columns([pl.lit(None, dtype=pl.String).alias(c)
                                          for m in missing for c in (m, f"{m}_key")])
    return Dataset(name, info, manifest)


def list_datasets(store: Store) -> list[str]:
    root = store.datasets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "dataset.json").is_file())
