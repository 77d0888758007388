"""Datasets in the store: a manifest (parquet) plus a small JSON of facts about it."""
from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Callable

import polars as pl

from .._io import cleaned_on_failure, publish, read_json, tmp_path, write_checksums, write_json_atomic
from ..backbones.base import MODALITIES
from ..errors import ConfigError, DatasetError, IntegrityError, NotFoundError
from ..hashing import file_digest
from ..store import Store, check_name, now_iso
from .adapters import read_folder, read_manifest_file
from .demo import build_demo
from .manifest import FILE_MODALITIES, add_content_keys, resolve_paths

__all__ = ["Dataset", "TARGET_NAMES", "describe_targets", "manifest_warnings", "add_dataset", "get_dataset", "list_datasets", "read_manifest_file", "read_folder",
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

    def targets(self) -> dict[str, dict]:
        """The targets this dataset has, by `--target` name: `label` (one class per item), `labels`
        (multi-label: a set of classes per item) and `va` (valence/arousal regression)."""
        m, out = self.manifest, {}
        if self.label_set:
            n = len(m) - m["label"].null_count()
            out["label"] = {"kind": "binary" if len(self.label_set) == 2 else "single-label",
                            "classes": list(self.label_set), "items": int(n)}
        if self.multilabel_set:
            n = int(m["labels"].list.len().fill_null(0).gt(0).sum())
            out["labels"] = {"kind": "multi-label", "classes": list(self.multilabel_set), "items": n}
        va = {d: int(len(m) - m[d].null_count()) for d in ("valence", "arousal")}
        if any(va.values()):
            out["va"] = {"kind": "valence/arousal regression", **va}
        return out

    def default_target(self) -> str:
        """The one target the dataset has; several or none: an error listing what there is."""
        have = self.targets()
        if len(have) == 1:
            return next(iter(have))
        if not have:
            raise DatasetError(f"dataset {self.name!r} has no targets: no item has a label, labels, valence or "
                               "arousal; add one of those columns and re-register it (fs datasets add --replace)")
        raise ConfigError(f"dataset {self.name!r} has several targets: {describe_targets(have)}; "
                          f"choose one with --target {'|'.join(have)}")

    def check_target(self, target: str) -> str:
        """`target`, or the default one when empty; a target the dataset lacks is an error naming those it has."""
        if not target:
            return self.default_target()
        if target not in TARGET_NAMES:
            raise ConfigError(f"target {target!r} is not one of {list(TARGET_NAMES)}")
        have = self.targets()
        if target not in have:
            what = {"label": "single labels (a 'label' column)", "labels": "multi-labels (a 'labels' column)",
                    "va": "valence or arousal values"}[target]
            raise DatasetError(f"dataset {self.name!r} has no {what}; it has "
                               f"{describe_targets(have) if have else 'no targets'}"
                               + (f"; use --target {'|'.join(have)}" if have else ""))
        return target

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


TARGET_NAMES = ("label", "labels", "va")


def describe_targets(targets: dict[str, dict]) -> str:
    """`label: single-label, 3 classes (6468 items); labels: multi-label, 8 classes (...)`: one line."""
    parts = []
    for name, t in targets.items():
        if name == "va":
            dims = ", ".join(f"{d} on {t[d]} items" for d in ("valence", "arousal") if t.get(d))
            parts.append(f"va: {t['kind']}, {dims}")
        else:
            parts.append(f"{name}: {t['kind']}, {len(t['classes'])} classes ({t['items']} items)")
    return "; ".join(parts) or "none"


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


def manifest_warnings(df: pl.DataFrame) -> list[str]:
    """What registering a manifest found that will bite later: unreadable files, blank texts, items
    without any target. One line each, with a count and examples."""
    out = []

    def some(mask: pl.Series, col: str = "item_id") -> str:
        ids = df.filter(mask)[col].head(3).to_list()
        return ", ".join(repr(i) for i in ids)

    for m in MODALITIES:
        bad = df[m].is_not_null() & df[f"{m}_key"].is_null()
        n = int(bad.sum())
        if n and m == "text":
            out.append(f"{n} item(s) have an empty text (e.g. {some(bad)}); they are skipped by extraction")
        elif n:
            out.append(f"{n} {m} file(s) are missing or unreadable (e.g. {some(bad, m)}); those items get no "
                       f"{m} features (fix the paths or --root, then add the dataset again with --replace)")
    no_target = (df["label"].is_null() & (df["labels"].list.len().fill_null(0) == 0)
                 & df["valence"].is_null() & df["arousal"].is_null())
    n = int(no_target.sum())
    if n == len(df):
        out.append("no item has a target (label, labels, valence or arousal): heads cannot train on it; "
                   "add a 'label' or 'labels' column (or valence/arousal)")
    elif n:
        out.append(f"{n} of {len(df)} item(s) have no target (no label, labels, valence or arousal, e.g. "
                   f"{some(no_target)}); training leaves them out")
    out += _misspelt_columns(df)
    return out


def _misspelt_columns(df: pl.DataFrame) -> list[str]:
    """A column the tool does not read whose name is close to one it does (`splt`, `lable`): likely a
    typo, whose values are then ignored (splits assigned by hash, items without a target)."""
    import difflib

    from .manifest import _ALIASES, CANONICAL

    known = sorted({*CANONICAL, *(a for a, t in _ALIASES.items() if t)} - {c for c in CANONICAL if c.endswith("_key")})
    out = []
    for col in (c for c in df.columns if c not in CANONICAL):
        near = difflib.get_close_matches(col.lower(), known, n=1, cutoff=0.75)
        if near:
            out.append(f"column {col!r} is not one this tool reads (did you mean {near[0]!r}?); its values are "
                       "ignored: rename it and add the dataset again with --replace")
    return out


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
            "created_at": now_iso(), "manifest_hash": file_digest(target), **_facts(df),
            "warnings": manifest_warnings(df), **(extra_info or {})}
    write_json_atomic(folder / "dataset.json", info)
    write_checksums(folder, ["manifest.parquet", "dataset.json"])  # a flipped byte in either is found by verify
    return Dataset(name, info, df)


def get_dataset(store: Store, name: str, *, check: bool = True) -> Dataset:
    """The registered dataset. With `check`, the manifest must be the one `dataset.json` records (its
    SHA-256): `datasets add --replace` publishes the manifest before `dataset.json`, so a kill between
    the two would otherwise pair a new manifest with the old counts, splits and hash."""
    folder = store.dataset_dir(name)
    if not (folder / "dataset.json").is_file():
        known = ", ".join(list_datasets(store)) or "none"
        raise NotFoundError(f"dataset {name!r} is not in the store at {store.root}; known: {known} "
                            "(add one with `fs datasets add`)")
    info = read_json(folder / "dataset.json")
    try:
        data = (folder / "manifest.parquet").read_bytes()
        manifest = pl.read_parquet(io.BytesIO(data))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise IntegrityError(f"{folder / 'manifest.parquet'} is damaged or missing ({type(exc).__name__}); "
                             f"re-add the dataset with `fs datasets add {name} ... --replace`") from None
    recorded = info.get("manifest_hash")
    if check and recorded and hashlib.sha256(data).hexdigest()[:len(recorded)] != recorded:
        raise IntegrityError(f"dataset {name!r}: manifest.parquet is not the one dataset.json records (manifest hash "
                             f"!= {recorded}; an interrupted `fs datasets add --replace`?): run that "
                             "`fs datasets add ... --replace` again")
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
