"""Datasets in the store: a manifest (parquet) plus a small JSON of facts about it."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import polars as pl

from .._io import CHECKSUMS, cleaned_on_failure, file_lock, publish, read_json, tmp_path, write_json_atomic, write_parquet
from ..backbones.base import MODALITIES
from ..errors import ConfigError, DatasetError, IntegrityError, NotFoundError
from ..hashing import file_digest
from ..store import Store, check_name, now_iso
from .adapters import read_folder, read_manifest_file
from .demo import build_demo
from .manifest import FILE_MODALITIES, add_content_keys, resolve_paths

__all__ = ["Dataset", "TARGET_NAMES", "manifest_name", "info_digest", "is_registered", "stale_manifests",
           "dataset_lock", "LEGACY_MANIFEST", "describe_targets", "manifest_warnings", "add_dataset", "get_dataset", "list_datasets", "read_manifest_file", "read_folder",
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
        return df.head(min(limit, len(df))) if limit else df  # polars overflows on a limit beyond int64

    def split(self, name: str) -> pl.DataFrame:
        return self.manifest.filter(pl.col("split") == name)

    def splits(self) -> dict[str, int]:
        return self.info.get("splits", {})

    def describe_splits(self) -> str:
        """`test (642), train (5184), val (642)`: for messages."""
        return ", ".join(f"{k} ({v})" for k, v in self.splits().items()) or "none"

    def check_splits(self, splits) -> None:
        """A split (`--split`) this dataset has no items in is an error naming the ones it has."""
        for split in splits:
            if not self.splits().get(split):
                raise DatasetError(f"dataset {self.name!r} has no items in split {split!r}; splits: "
                                   f"{self.describe_splits()}")


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


LEGACY_MANIFEST = "manifest.parquet"  # stores before the self-checking dataset.json: + checksums.json


def manifest_name(info: dict) -> str:
    """The manifest file `dataset.json` names (`manifest.<hash>.parquet`; a legacy store's
    `manifest.parquet`)."""
    return info.get("manifest_file") or LEGACY_MANIFEST


def info_digest(info: dict) -> str:
    """SHA-256 of `dataset.json`'s fields other than `info_sha256`, canonically serialised: the file
    checks itself, so it is the single commit point of a dataset (no separate checksums file)."""
    body = {k: v for k, v in json.loads(json.dumps(info, default=str)).items() if k != "info_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def is_registered(folder: Path) -> bool:
    """A dataset is there once its `dataset.json` is: a manifest without one (a first add killed, or a
    lost dataset.json) registers nothing, and the next add, which replaces it, needs no --replace."""
    return (folder / "dataset.json").exists()


def stale_manifests(folder: Path, info: dict | None) -> list[Path]:
    """Manifest files in `folder` that its `dataset.json` does not name: left by an `add` killed before
    it published `dataset.json`, or by one killed before it removed the manifest it replaced."""
    keep = manifest_name(info) if info is not None else None
    return sorted(p for p in folder.glob("manifest*.parquet") if p.name != keep)


def dataset_lock(store: Store, name: str):
    """Held by `datasets add` for the whole registration: two adds of one name run one after the other."""
    return file_lock(store.dataset_dir(name) / ".lock", f"dataset {name!r}", wait=True)


def add_dataset(store: Store, name: str, df: pl.DataFrame, *, root: str | Path | None, source: str,
                replace: bool = False, allow_outside_root: bool = False,
                progress: Callable | None = None, extra_info: dict | None = None) -> Dataset:
    """Register a normalised manifest under `name`: resolve paths, hash contents, publish.
    `extra_info` is added to `dataset.json` (a layout adapter's report).

    Publishing is one atomic step: the manifest goes to its own content-named file
    (`manifest.<hash>.parquet`), then `dataset.json`, which names it, records its SHA-256 and checks
    itself (`info_sha256`), replaces the old one by rename. A kill at any moment leaves the old
    dataset or the new one, whole; the manifest it left unnamed is removed by the next add or `fs gc`."""
    folder = store.dataset_dir(check_name(name, "dataset"))
    if folder.exists() and not folder.is_dir():
        raise IntegrityError(f"{folder} is a file where dataset {name!r} would be registered; move it away "
                             "(`fs verify` lists such files)")
    _refuse_existing(store, name, folder, replace)
    if root is not None:
        df = resolve_paths(df, Path(root), allow_outside_root=allow_outside_root, source=source)
    elif any(df[m].null_count() < len(df) for m in FILE_MODALITIES):
        raise DatasetError(f"{source}: has file paths but no dataset root; pass --root DIR")
    df = add_content_keys(df, progress)
    facts = {**_facts(df), "warnings": manifest_warnings(df)}  # before anything is written: a failure leaves nothing
    folder.mkdir(parents=True, exist_ok=True)
    with dataset_lock(store, name):
        _refuse_existing(store, name, folder, replace)  # another add may have registered it meanwhile
        tmp = tmp_path(folder / LEGACY_MANIFEST)
        with cleaned_on_failure(tmp, folder / LEGACY_MANIFEST):
            write_parquet(df, tmp, statistics=False)
            digest = file_digest(tmp)
        target = folder / f"manifest.{digest[:16]}.parquet"
        publish(tmp, target)
        info = {"name": name, "source": source, "root": str(Path(root).resolve()) if root else None,
                "created_at": now_iso(), "manifest_file": target.name, "manifest_hash": digest, **facts,
                **(extra_info or {})}
        info["info_sha256"] = info_digest(info)
        write_json_atomic(folder / "dataset.json", info)  # the commit point
        for old in stale_manifests(folder, info) + [folder / CHECKSUMS]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return Dataset(name, info, df)


def _refuse_existing(store: Store, name: str, folder: Path, replace: bool) -> None:
    if is_registered(folder) and not replace:
        raise DatasetError(f"dataset {name!r} already exists in {store.root}; pass --replace to overwrite "
                           "its manifest (cached features are kept: they are keyed by content)")


def get_dataset(store: Store, name: str, *, check: bool = True) -> Dataset:
    """The registered dataset. With `check`, `dataset.json` must match its own `info_sha256` and the
    manifest the SHA-256 it records (a legacy store's `dataset.json`, written before `info_sha256`,
    is checked by `fs verify` against its `checksums.json`)."""
    folder = store.dataset_dir(name)
    if not (folder / "dataset.json").is_file():
        known = ", ".join(list_datasets(store)) or "none"
        raise NotFoundError(f"dataset {name!r} is not in the store at {store.root}; known: {known} "
                            "(add one with `fs datasets add`)")
    info, data = _read_pair(folder)
    if check and "info_sha256" in info and info_digest(info) != info["info_sha256"]:
        raise IntegrityError(f"{folder / 'dataset.json'} does not match its recorded info_sha256 (damaged or edited "
                             f"by hand); re-add the dataset with `fs datasets add {name} ... --replace`")
    path = folder / manifest_name(info)
    try:
        if data is None:
            raise FileNotFoundError(path)
        manifest = pl.read_parquet(io.BytesIO(data))
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise IntegrityError(f"{path} is damaged or missing ({type(exc).__name__}); "
                             f"re-add the dataset with `fs datasets add {name} ... --replace`") from None
    recorded = info.get("manifest_hash")
    if check and recorded and hashlib.sha256(data).hexdigest()[:len(recorded)] != recorded:
        raise IntegrityError(f"dataset {name!r}: {path.name} is not the one dataset.json records (manifest hash "
                             f"!= {recorded}; damaged, or an interrupted `fs datasets add --replace` of an older "
                             "version of this tool?): run that `fs datasets add ... --replace` again")
    missing = [m for m in MODALITIES if m not in manifest.columns]
    if missing:  # registered before a modality existed (video): it has no such inputs
        manifest = manifest.with_columns([pl.lit(None, dtype=pl.String).alias(c)
                                          for m in missing for c in (m, f"{m}_key")])
    return Dataset(name, info, manifest)


def _read_pair(folder: Path) -> tuple[dict, bytes | None]:
    """`dataset.json` and the bytes of the manifest it names (None if that file is missing). A
    concurrent `add --replace` removes the manifest it replaced right after publishing its
    `dataset.json`: a reader that lost that race reads `dataset.json` again."""
    for _ in range(5):
        info = read_json(folder / "dataset.json")
        try:
            return info, (folder / manifest_name(info)).read_bytes()
        except FileNotFoundError:
            if read_json(folder / "dataset.json").get("manifest_file") == info.get("manifest_file"):
                return info, None  # not a replacement: the manifest is gone
    return info, None


def list_datasets(store: Store) -> list[str]:
    root = store.datasets_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "dataset.json").is_file())
