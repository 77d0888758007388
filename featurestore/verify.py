"""Checking and tidying a whole store: `fs verify` and `fs gc` call these.

`verify_store` reports every finding (a check that cannot even run is itself a finding) and never
raises; `gc_store` removes what killed jobs left behind and optionally compacts segments.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

from ._io import (CHECKSUMS, OLD_SUFFIX, TMP_SUFFIX, check_checksums, fsync_dir, read_json, swapped_out_target,
                  writer_running_here)
from .datasets import (dataset_lock, get_dataset, info_digest, list_datasets, manifest_name,
                       stale_manifests)
from .errors import FeatureStoreError, IntegrityError, LockedError
from .features import FeatureSet, list_feature_sets
from .keyed import selections_of
from .hashing import file_digest

__all__ = ["verify_store", "feature_sets_on_disk", "artifact_dirs", "unverified", "stray_temp_files", "gc_store",
           "gc_va", "gc_datasets", "TEMP_GRACE_S", "swapped_out", "restore_swapped_out"]

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
    checked(store.datasets_dir(), lambda: _unlisted_datasets(store))
    for fs in feature_sets_on_disk(store):
        checked(fs.folder, lambda: _verify_features(store, fs))
    checked(store.features_dir(), lambda: _spec_less_feature_sets(store))
    checked(store.root, lambda: _missing_feature_sets(store))
    for folder in artifact_dirs(store):
        checked(folder, lambda: _artifact_problems(folder))
    problems += [{"path": str(old), "message": f"{target.name} is missing: a job replacing it was killed after moving "
                                                f"the previous copy here; `fs gc` puts this copy back as {target}"}
                 for old, target in swapped_out(store)]
    problems += [{"path": str(t), "message": "temporary file left by a killed or failed job; `fs gc` removes it"}
                 for t in stray_temp_files(store)]
    checked(store.root, lambda: _verify_va(store))
    checked(store.root, lambda: _files_among_folders(store))
    checked(store.sweeps_dir(), lambda: _verify_records(store))
    return problems


_ONE_FOLDER_EACH = {"datasets": "dataset", "features": "feature set", "heads": "run", "memory": "memory",
                    "adapters": "adapter", "sweeps": "sweep", "va": "VA source", "va_models": "VA model"}


def _files_among_folders(store):
    """A plain file where a section keeps one folder per item (heads/lin a file): what it replaced is
    missing, and listings skip it silently."""
    for section, what in _ONE_FOLDER_EACH.items():
        root = store.root / section
        for p in (sorted(root.iterdir()) if root.is_dir() else []):
            if not p.name.startswith(".") and not p.is_dir():
                yield p, (f"is a file where {section}/ keeps one folder per {what}: not a {what}, and no {what} of "
                          f"this name can be saved; move it away (restore the {what} from a backup if it was one)")


def _verify_records(store):
    """Sweeps (`sweep.json`, every part, `results.parquet`, `best_test.json`) and refreshes (`state.json`,
    `pending.json`, each refresh's `summary.json` and `report.parquet`) against their seals
    (featurestore/sealed.py): a flipped digit would otherwise be ranked, reused or acted on."""
    from .sealed import json_problem, table_problem

    def records(folder: Path, sealed_json, tables, fix: str):
        for path in [folder / name for name in sealed_json if (folder / name).is_file()]:
            problem = json_problem(path)
            if problem:
                yield path, f"damaged ({problem}); {fix}"
        for path in [folder / name for name in tables if (folder / name).is_file()]:
            problem = table_problem(path)
            if problem:
                yield path, f"damaged ({problem}); {fix}"

    for folder in _subfolders(store.sweeps_dir()):
        parts = [f"parts/{p.name}" for p in sorted((folder / "parts").glob("part-*.parquet"))]
        yield from records(folder, ("sweep.json", "best_test.json"), [*parts, "results.parquet"],
                           "delete it and run the sweep command again (a part: that configuration is trained again)")
    for recipe in _subfolders(store.root / "refresh"):
        yield from records(recipe, ("state.json", "pending.json"), (), "restore it from a backup (a refresh acts on "
                           "it: until then run no `fs refresh` of this recipe)")
        for one in _subfolders(recipe):
            yield from records(one, ("summary.json",), ("report.parquet",), "delete it: it is this refresh's "
                               "report only (state.json keeps the outcome)")


def _artifact_problems(folder: Path):
    """A saved artifact's files against its checksums.json, and those of every part of it with a
    checksums.json of its own (each `seed-S/` of a `--seeds` run: the run's own lists only its files)."""
    out = [(folder, m) for m in check_checksums(folder) or []]
    for part in sorted(p.parent for p in folder.rglob(CHECKSUMS) if p.parent != folder):
        out += [(part, m) for m in check_checksums(part) or []]
    return out


def _subfolders(root: Path) -> list[Path]:
    """The folders under `root` (a store section), hidden ones (temporary, swapped out) left out."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def _one_line(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


@contextlib.contextmanager
def _add_finished(store, name: str):
    """Hold dataset `name`'s lock (what `datasets add` holds from its manifest to its dataset.json), so
    verify never looks between the two; a read-only store is looked at without it."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError, FeatureStoreError):  # read-only, or a folder no add could name
            stack.enter_context(dataset_lock(store, name))
        yield


def _verify_dataset(store, name):
    with _add_finished(store, name):
        return list(_dataset_problems(store, name))


def _dataset_problems(store, name):
    folder = store.dataset_dir(name)
    ds = get_dataset(store, name, check=False)  # the mismatches are reported below, with both hashes
    if "info_sha256" in ds.info and info_digest(ds.info) != ds.info["info_sha256"]:
        yield folder / "dataset.json", "does not match its recorded info_sha256 (damaged or edited by hand)"
    path = folder / manifest_name(ds.info)
    actual = file_digest(path)
    if actual != ds.manifest_hash:
        yield path, f"manifest hash {actual} != recorded {ds.manifest_hash}"
    if ds.info.get("n_items") != len(ds.manifest):
        yield folder / "dataset.json", f"says {ds.info.get('n_items')} items, the manifest has {len(ds.manifest)}"
    if "info_sha256" not in ds.info:  # a legacy dataset: its dataset.json is covered by checksums.json
        for message in check_checksums(folder) or []:
            yield folder, message
    for stale in stale_manifests(folder, ds.info):
        yield stale, "not the manifest dataset.json names: left by a killed `fs datasets add`; `fs gc` removes it"


def _unlisted_datasets(store):
    """Dataset folders whose dataset.json is gone: `list_datasets` does not list them, so nothing else
    checks them."""
    root = store.datasets_dir()
    for folder in _subfolders(root):
        if (folder / "dataset.json").exists():
            continue
        with _add_finished(store, folder.name):  # a first add between its manifest and its dataset.json
            unlisted = not (folder / "dataset.json").exists() and \
                bool(stale_manifests(folder, None) or (folder / "checksums.json").exists())
        if unlisted:
            yield folder / "dataset.json", (f"dataset.json is missing, so dataset {folder.name} is not listed or "
                                            "checked (lost, or its first `fs datasets add` was killed before "
                                            "publishing it); restore it from a backup, or add the dataset again "
                                            f"with `fs datasets add {folder.name} ...`")


def gc_datasets(store, *, dry_run: bool = False) -> list[str]:
    """Remove the manifests no `dataset.json` names (see `stale_manifests`), each dataset under its lock."""
    removed = []
    root = store.datasets_dir()
    for folder in _subfolders(root):
        try:
            with dataset_lock(store, folder.name):
                if not (folder / "dataset.json").exists():
                    continue  # lost, or a first add killed: verify reports it; only the user's next add tidies
                for stale in stale_manifests(folder, read_json(folder / "dataset.json")):
                    removed.append(str(stale))
                    if not dry_run:
                        with contextlib.suppress(FileNotFoundError):
                            stale.unlink()
        except (FeatureStoreError, OSError):  # a damaged dataset.json: verify reports it; nothing is removed
            continue
    return removed


def _spec_less_feature_sets(store):
    """Feature set folders with segments or a catalogue but no spec.json: not listed, so not checked
    otherwise. Their segments are still checked (checksums, catalogue) so damage is not hidden."""
    from .segments import CATALOGUE

    root = store.features_dir()
    for folder in _subfolders(root):
        if (folder / "spec.json").exists() or not (any(folder.glob("seg-*.h5")) or (folder / CATALOGUE).exists()):
            continue
        yield folder / "spec.json", ("spec.json is missing, so these features cannot be read; restore it from a "
                                     "backup, or delete the folder and re-run the extraction that made it "
                                     "(`fs extract`)")
        yield from ((p.path, p.message) for p in FeatureSet(store, folder.name).segments.verify())


def fingerprint_users(store) -> tuple[dict[str, list[str]], set[str]]:
    """fingerprint -> what names it: every saved run not retired by a refresh (heads/*/lineage.json, an
    SCL run's derived feature sets when it wrote them), every memory (memory/*/spec.json), every
    refresh's current fingerprint, every fitted VA model (va_models/*/config.json, the features it was
    fitted on and scores); and the set of those an SCL run wrote (not extracted). A damaged
    JSON is skipped here: its own check reports it."""
    users: dict[str, list[str]] = {}
    retired: set[str] = set()
    derived: set[str] = set()

    def used(fp, by: str) -> None:
        if isinstance(fp, str) and fp:
            users.setdefault(fp, []).append(by)

    def folders(root: Path) -> list[tuple[Path, str]]:
        """(folder, name) under `root`, and for each X that is missing its swapped-out copies
        `.X.<id>.old` under X's name (`fs gc` puts one back first: a dry run must count them too)."""
        if not root.is_dir():
            return []
        out = {}
        for p in sorted(root.iterdir()):
            target = swapped_out_target(p) if p.name.startswith(".") else p
            if target is not None and p.is_dir() and (target == p or not os.path.lexists(target)):
                out.setdefault(target.name, []).append(p)
        return [(p, name) for name, ps in sorted(out.items()) for p in ps]

    for folder, name in folders(store.root / "refresh"):
        state = _json_or_none(folder / "state.json")
        if isinstance(state, dict):
            retired |= set(state.get("retired_runs") or [])
            used((state.get("current") or {}).get("fingerprint"), f"refresh {name} (current)")
    for run, name in folders(store.heads_dir()):
        lineage = None if name in retired else _json_or_none(run / "lineage.json")
        if not isinstance(lineage, dict):
            continue
        fps = list((lineage.get("fingerprints") or {}).values())
        if (lineage.get("config") or {}).get("write_features"):  # an SCL run wrote its derived features
            written = [v for v in (lineage.get("derived") or {}).values() if isinstance(v, str)]
            derived.update(written)
            fps += written
        for fp in fps:
            used(fp, f"run {name}")
    for mem, name in folders(store.memory_dir()):
        spec = _json_or_none(mem / "spec.json")
        if isinstance(spec, dict):
            for fp in [*(spec.get("fingerprints") or {}).values(), *(spec.get("source_fingerprints") or {}).values()]:
                used(fp, f"memory {name}")
    for model, name in folders(store.root / "va_models"):
        config = _json_or_none(model / "config.json")
        if isinstance(config, dict):
            used(config.get("fingerprint"), f"VA model {name}")
    return users, derived


def _missing_feature_sets(store):
    """Every feature set a saved run, a memory or a refresh names (`fingerprint_users`) must exist."""
    users, derived = fingerprint_users(store)
    for fp, who in sorted(users.items()):
        if (store.features_dir() / fp / "spec.json").is_file():
            continue
        who = sorted(set(who))
        users_text = ", ".join(who[:3]) + (" ..." if len(who) > 3 else "")
        redo = "re-run the SCL training that wrote it (`fs scl train ... --replace`)" if fp in derived else \
            "re-extract it with the same backbone and settings (`fs extract`)"
        yield store.features_dir() / fp, (f"feature set {fp} used by {users_text} is missing; restore it from a "
                                           f"backup, or {redo}")


def _json_or_none(path: Path):
    """A JSON file, or None where it is absent or damaged (its own check reports the damage)."""
    try:
        return read_json(path) if path.is_file() else None
    except (FeatureStoreError, OSError):
        return None


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
        col = f"{fs.modality}_key"
        wanted = {k for lim, spl in selections_of(need) for k in ds.select(spl, lim)[col].drop_nulls().to_list()}
        keys = [k for k in sorted(wanted) if k not in failed]
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
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                             and not (p / "spec.json").exists()):
            if any(folder.glob("seg-*.h5")) or (folder / "catalogue.json").exists():
                yield folder / "spec.json", ("spec.json is missing, so these VA scores cannot be read; restore it "
                                             "from a backup, or delete the folder and re-score (`fs va score`)")


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


def _hidden_leftovers(store) -> list[Path]:
    """`.*.tmp` and `.*.old` files and folders outside the segment sets, which report their own."""
    out = []
    for dirpath, dirnames, filenames in os.walk(store.root):
        here = Path(dirpath)
        if here.parent in (store.features_dir(), store.root / "va"):
            dirnames[:] = []  # a segment set: `fs verify` of the set reports its temp files
            continue
        for name in list(dirnames) + filenames:
            if name.startswith(".") and name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
                if name in dirnames:
                    dirnames.remove(name)
                out.append(here / name)
    return sorted(out)


def swapped_out(store) -> list[tuple[Path, Path]]:
    """(`.X.<id>.old`, X) where X is missing: a replacement killed between its two renames (see
    `_io.publish_folder`) left the complete previous copy there. Never a temporary file: gc restores it."""
    out = []
    for path in _hidden_leftovers(store):
        target = swapped_out_target(path)
        if target is not None and not os.path.lexists(target):
            out.append((path, target))
    return out


def restore_swapped_out(store, *, dry_run: bool = False) -> list[tuple[Path, Path]]:
    """Rename each `.X.<id>.old` whose X is missing back to X (the most recently moved one where there
    are several); returns what was (or would be) restored."""
    newest: dict[Path, Path] = {}
    for old, target in swapped_out(store):
        if target not in newest or old.lstat().st_ctime > newest[target].lstat().st_ctime:
            newest[target] = old
    done = []
    for target, old in sorted(newest.items()):
        if not dry_run:
            if os.path.lexists(target):  # published meanwhile by a live job: leave both alone
                continue
            try:
                os.rename(old, target)
            except OSError:  # raced with a live job that just published or removed it: the next gc looks again
                continue
            with contextlib.suppress(OSError):
                fsync_dir(target.parent)
        done.append((old, target))
    return done


def stray_temp_files(store, *, older_than: float = 0.0) -> list[Path]:
    """Temporary files and folders (`.*.tmp`, and `.*.old` whose original is in place) outside the
    segment sets, which report their own. One whose name says a process of this machine that is still
    running wrote it is a job at work (a `--seeds` or `--cv` run fills its folder for as long as it trains),
    not a leftover, whatever its age."""
    now, out = time.time(), []
    for path in _hidden_leftovers(store):
        target = swapped_out_target(path)
        if target is not None and not os.path.lexists(target):
            continue  # the only copy of X: restored by gc, never removed
        if path.name.endswith(TMP_SUFFIX) and writer_running_here(path):
            continue
        try:
            if now - path.lstat().st_mtime >= older_than:
                out.append(path)
        except FileNotFoundError:
            continue
    return out


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
        except IntegrityError as exc:  # a corrupt segment: this set is left as it is, the others go on
            report["not_compacted"][name_of(s)] = str(exc)


def gc_store(store, *, compact: bool = False, dry_run: bool = False) -> dict:
    """Remove temporary files left by killed jobs, register or delete segments a killed job or an earlier
    compaction left behind, optionally compact; a feature set being written is skipped. Temporary files
    elsewhere are removed once they are TEMP_GRACE_S old. Returns what was (or would be) done."""
    report: dict = {"removed_temp_files": [], "compacted": {}, "skipped_locked": [], "kept_recent_temp_files": [],
                    "restored": [], "not_compacted": {}}
    report["restored"] = [{"from": str(old), "to": str(target)}
                          for old, target in restore_swapped_out(store, dry_run=dry_run)]
    _tidy(list_feature_sets(store), compact=compact, dry_run=dry_run, name_of=lambda fs: fs.fingerprint,
          attrs_of=lambda fs: {"fingerprint": fs.fingerprint, "compacted": True}, report=report)
    report["removed_temp_files"] += gc_datasets(store, dry_run=dry_run)
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


def refuse_if_not_compacted(report: dict) -> None:
    """After a gc has done everything else: exit as an integrity problem when a set was not compacted."""
    if report.get("not_compacted"):
        names = ", ".join(report["not_compacted"])
        raise IntegrityError(f"{len(report['not_compacted'])} set(s) not compacted because a segment is corrupt "
                             f"({names}); everything else was tidied: run `fs verify`, then re-extract")


def gc_va(store, *, compact: bool = False, dry_run: bool = False) -> dict:
    """`gc_store` for the VA sources' segment sets."""
    from .va.cache import list_va_sets

    report: dict = {"removed_temp_files": [], "compacted": {}, "skipped_locked": [], "not_compacted": {}}
    _tidy(list_va_sets(store), compact=compact, dry_run=dry_run, name_of=lambda vs: vs.source,
          attrs_of=lambda vs: {"source": vs.source, "compacted": True}, report=report)
    return report
