"""Checking and tidying a whole store: `fs verify` and `fs gc` call these.

`verify_store` reports every finding (a check that cannot even run is itself a finding) and never
raises; `gc_store` removes what killed jobs left behind and optionally compacts segments.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from ._io import TMP_SUFFIX, check_checksums
from .datasets import get_dataset, list_datasets
from .errors import FeatureStoreError, LockedError
from .features import FeatureSet, list_feature_sets
from .hashing import file_digest

__all__ = ["verify_store", "feature_sets_on_disk", "artifact_dirs", "unverified", "stray_temp_files", "gc_store",
           "gc_va", "TEMP_GRACE_S"]

TEMP_GRACE_S = 600  # temp files outside feature sets younger than this may belong to a running job


def verify_store(store) -> list[dict]:
    """Every finding about the store as {"path", "message"}: datasets, feature sets, saved heads and
    memories, VA sources, and temporary files left by killed jobs."""
    problems: list[dict] = []

    def checked(where, check) -> None:
        try:
            problems.extend({"path": str(p), "message": m} for p, m in check())
        except Exception as exc:  # noqa: BLE001 - verify reports, it never crashes
            problems.append({"path": str(where), "message": f"cannot be read: {_one_line(exc)}"})

    for name in list_datasets(store):
        checked(store.dataset_dir(name), lambda: _verify_dataset(store, name))
    for fs in feature_sets_on_disk(store):
        checked(fs.folder, lambda: _verify_features(store, fs))
    for folder in artifact_dirs(store):
        checked(folder, lambda: [(folder, m) for m in check_checksums(folder) or []])
    problems += [{"path": str(t), "message": "temporary file left by a killed or failed job; `fs gc` removes it"}
                 for t in stray_temp_files(store)]
    checked(store.root, lambda: _verify_va(store))
    return problems


def _one_line(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _verify_dataset(store, name):
    folder = store.dataset_dir(name)
    ds = get_dataset(store, name)
    actual = file_digest(folder / "manifest.parquet")
    if actual != ds.manifest_hash:
        yield folder / "manifest.parquet", f"manifest hash {actual} != recorded {ds.manifest_hash}"
    if ds.info.get("n_items") != len(ds.manifest):
        yield folder / "dataset.json", f"says {ds.info.get('n_items')} items, the manifest has {len(ds.manifest)}"
    for message in check_checksums(folder) or []:
        yield folder, message


def feature_sets_on_disk(store) -> list[FeatureSet]:
    """Every folder with a spec.json, without reading any (a damaged one is verify's finding)."""
    root = store.features_dir()
    return [FeatureSet(store, p.name) for p in sorted(root.iterdir()) if (p / "spec.json").is_file()] \
        if root.is_dir() else []


def _verify_features(store, fs: FeatureSet):
    from .backbones.base import fingerprint_of

    spec = {k: v for k, v in fs.spec.items() if k not in ("fingerprint", "created_at")}
    if fingerprint_of(spec["backbone"], spec) != fs.fingerprint:
        yield fs.spec_path, "spec.json does not hash to its fingerprint"
    yield from ((p.path, p.message) for p in fs.verify())
    try:
        missing = list(_missing_rows(store, fs))
    except FeatureStoreError:  # a damaged segment, already reported above
        missing = []
    yield from missing


def _missing_rows(store, fs: FeatureSet):
    """Rows a dataset extracted into `fs` needs (recorded in its catalogue) that are neither stored
    nor recorded as failed: a deleted segment, or rows lost some other way."""
    known = set(list_datasets(store))
    failed = {e.key for e in fs.errors() if e.key}
    for dataset, need in sorted(fs.segments.catalogue()["datasets"].items()):
        if dataset not in known:
            continue
        ds = get_dataset(store, dataset)
        if ds.manifest_hash != need.get("manifest_hash"):
            continue  # replaced since: the new manifest's rows were never promised
        rows = ds.select(need.get("splits") or (), need.get("limit") or 0)
        keys = [k for k in rows[f"{fs.modality}_key"].drop_nulls().unique().to_list() if k not in failed]
        missing = int((~fs.has(keys)).sum()) if keys else 0
        if missing:
            yield fs.folder, (f"{missing} of the {len(keys)} rows dataset {dataset} needs are missing (a segment "
                              f"was deleted?); recompute them with `fs extract --dataset {dataset} "
                              f"--modality {fs.modality} --backbone {fs.backbone}`")


def _verify_va(store):
    from .va.cache import list_va_sets, va_root

    for vs in list_va_sets(store):
        yield from ((p.path, p.message) for p in vs.verify())
    root = va_root(store)
    if root.is_dir():  # a source folder whose spec.json is gone is not listed above
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not (p / "spec.json").exists()):
            if any(folder.glob("seg-*.h5")):
                yield folder / "spec.json", "spec.json is missing"


def artifact_dirs(store) -> list[Path]:
    """Saved heads, memories, LoRA adapters and fitted VA models (their files are checked against
    checksums.json)."""
    from .va.learned import models_root

    out = []
    for root in (store.heads_dir(), store.memory_dir(), store.adapters_dir(), models_root(store)):
        if root.is_dir():
            out += [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return out


def unverified(store) -> list[str]:
    """Saved heads, memories, adapters and VA models with no checksums.json (saved by an older featurestore)."""
    return [str(p) for p in artifact_dirs(store) if check_checksums(p) is None]


def stray_temp_files(store, *, older_than: float = 0.0) -> list[Path]:
    """Temporary files and folders (`.*.tmp`, `.*.old`) outside the segment sets, which report their own."""
    now, out = time.time(), []
    for dirpath, dirnames, filenames in os.walk(store.root):
        here = Path(dirpath)
        if here.parent in (store.features_dir(), store.root / "va"):
            dirnames[:] = []  # a segment set: `fs verify` of the set reports its temp files
            continue
        for name in list(dirnames) + filenames:
            path = here / name
            if name.startswith(".") and name.endswith((TMP_SUFFIX, ".old")):
                if name in dirnames:
                    dirnames.remove(name)
                if now - path.lstat().st_mtime >= older_than:
                    out.append(path)
    return sorted(out)


def _tidy(sets, *, compact: bool, dry_run: bool, name_of, attrs_of, report: dict) -> None:
    """Temp files, orphan and retired segments (and compaction) of segment sets, each under its lock."""
    for s in sets:
        try:
            with s.lock():
                report["removed_temp_files"] += [str(t) for t in s.segments.temp_files()]
                if not dry_run:
                    s.segments.remove_temp_files()
                    s.segments.adopt_orphans()
                    s.segments.delete_retired()
                n = len(s.segments.segments())
                if compact and n > 1:
                    if not dry_run:
                        s.segments.compact(attrs=attrs_of(s))
                    report["compacted"][name_of(s)] = n
        except LockedError:
            report["skipped_locked"].append(name_of(s))


def gc_store(store, *, compact: bool = False, dry_run: bool = False) -> dict:
    """Remove temporary files left by killed jobs, register or delete segments a killed job or an earlier
    compaction left behind, optionally compact; a feature set being written is skipped. Temporary files
    elsewhere are removed once they are TEMP_GRACE_S old. Returns what was (or would be) done."""
    report: dict = {"removed_temp_files": [], "compacted": {}, "skipped_locked": [], "kept_recent_temp_files": []}
    _tidy(list_feature_sets(store), compact=compact, dry_run=dry_run, name_of=lambda fs: fs.fingerprint,
          attrs_of=lambda fs: {"fingerprint": fs.fingerprint, "compacted": True}, report=report)
    old = stray_temp_files(store, older_than=TEMP_GRACE_S)
    report["removed_temp_files"] += [str(t) for t in old]
    report["kept_recent_temp_files"] = [str(t) for t in stray_temp_files(store) if t not in old]
    if not dry_run:
        for path in old:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return report


def gc_va(store, *, compact: bool = False, dry_run: bool = False) -> dict:
    """`gc_store` for the VA sources' segment sets."""
    from .va.cache import list_va_sets

    report: dict = {"removed_temp_files": [], "compacted": {}, "skipped_locked": []}
    _tidy(list_va_sets(store), compact=compact, dry_run=dry_run, name_of=lambda vs: vs.source,
          attrs_of=lambda vs: {"source": vs.source, "compacted": True}, report=report)
    return report
