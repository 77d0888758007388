"""`fs init`, `fs ls`, `fs info`, `fs verify`, `fs gc`: the store as a whole."""
from __future__ import annotations

from pathlib import Path

import click

from featurestore.datasets import get_dataset, list_datasets
from featurestore.errors import FeatureStoreError, IntegrityError, NotFoundError
from featurestore.features import FeatureSet, list_feature_sets
from featurestore._io import TMP_SUFFIX, check_checksums
from featurestore.hashing import file_digest
from featurestore.store import FORMAT_VERSION
from ._common import emit, get_store, json_option, table


@click.command("init")
@click.pass_context
def init_cmd(ctx: click.Context) -> None:
    """Create the store (a no-op if it exists)."""
    store = get_store(ctx, create=True)
    click.echo(f"store {store.root} (format version {FORMAT_VERSION}) is ready")


def _dataset_rows(store) -> list[dict]:
    rows = []
    for name in list_datasets(store):
        info = get_dataset(store, name).info
        rows.append({"dataset": name, "items": info["n_items"],
                     "splits": ",".join(f"{k}:{v}" for k, v in info["splits"].items()),
                     "modalities": ",".join(m for m, n in info["modalities"].items() if n),
                     "labels": len(info["label_set"]) or len(info["multilabel_set"])})
    return rows


def _feature_rows(store) -> list[dict]:
    rows = []
    for fs in list_feature_sets(store):
        s = fs.stats()
        rows.append({k: s[k] for k in ("fingerprint", "backbone", "modality", "dim", "dtype", "rows",
                                       "errors", "segments")} | {"mb": round(s["bytes"] / 2**20, 2)})
    return rows


@click.command("ls")
@json_option
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List datasets and cached feature sets, with row and error counts."""
    store = get_store(ctx)
    data = {"store": str(store.root), "datasets": _dataset_rows(store), "features": _feature_rows(store)}
    for extra in _LS_EXTRAS:
        data.update(extra(store))
    if as_json:
        return emit(data)
    for section, rows in data.items():
        if section == "store":
            continue
        click.echo(f"{section}:")
        click.echo(table(rows) + "\n")


_LS_EXTRAS: list = []  # other nouns (runs, memories, VA) add sections here


def coverage(store, dataset) -> list[dict]:
    """For each feature set of a dataset's modality: how many of its items have a row."""
    rows = []
    for fs in list_feature_sets(store):
        col = f"{fs.modality}_key"
        keys = dataset.manifest[col].drop_nulls().unique()
        if not len(keys):
            continue
        have = int(fs.has(keys.to_numpy().astype("S32")).sum())
        failed = len({e.item_id for e in fs.errors() if e.dataset == dataset.name})
        if have or failed:
            rows.append({"fingerprint": fs.fingerprint, "modality": fs.modality, "inputs": len(keys),
                         "cached": have, "failed": failed})
    return rows


@click.command("info")
@click.argument("name", required=False)
@json_option
@click.pass_context
def info_cmd(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Facts about the store, or about one dataset or fingerprint."""
    store = get_store(ctx)
    if name is None:
        data = {**store.meta(), "root": str(store.root.resolve()), "datasets": len(list_datasets(store)),
                "feature_sets": len(list_feature_sets(store))}
    elif name in list_datasets(store):
        ds = get_dataset(store, name)
        data = {"dataset": ds.info, "features": coverage(store, ds)}
    elif FeatureSet(store, name).exists():
        fs = FeatureSet(store, name)
        errors = fs.errors()
        data = {"spec": fs.spec, "stats": fs.stats(),
                "errors_sample": [e.__dict__ for e in errors[:20]]}
    else:
        data = {}
    for extra in _INFO_EXTRAS:  # other nouns add facts, or answer for names of their own (VA sources)
        data.update(extra(store, name))
    if not data:
        raise NotFoundError(f"{name!r} is not a dataset, fingerprint or VA source in {store.root} (fs ls)")
    if as_json:
        return emit(data)
    _print_nested(data)


_INFO_EXTRAS: list = []


def _print_nested(data: dict, indent: int = 0) -> None:
    pad = " " * indent
    for k, v in data.items():
        if isinstance(v, dict):
            click.echo(f"{pad}{k}:")
            _print_nested(v, indent + 2)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            click.echo(f"{pad}{k}:")
            click.echo("\n".join(pad + "  " + line for line in table(v).splitlines()))
        else:
            click.echo(f"{pad}{k}: {v}")


def verify_store(store) -> list[dict]:
    """Every finding about the store; a check that cannot even run is itself a finding."""
    problems: list[dict] = []

    def checked(where, check) -> None:
        try:
            problems.extend({"path": str(p), "message": m} for p, m in check())
        except Exception as exc:  # noqa: BLE001 - verify reports, it never crashes
            problems.append({"path": str(where), "message": f"cannot be read: {_one_line(exc)}"})

    for name in list_datasets(store):
        checked(store.dataset_dir(name), lambda: _verify_dataset(store, name))
    for fs in _feature_sets(store):
        checked(fs.folder, lambda: _verify_features(store, fs))
    for folder in _artifact_dirs(store):
        checked(folder, lambda: [(folder, m) for m in check_checksums(folder) or []])
    problems += [{"path": str(t), "message": "temporary file left by a killed or failed job; `fs gc` removes it"}
                 for t in stray_temp_files(store)]
    for extra in _VERIFY_EXTRAS:
        checked(store.root, lambda: [(p["path"], p["message"]) for p in extra(store)])
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


def _feature_sets(store) -> list[FeatureSet]:
    """Every folder with a spec.json, without reading any (a damaged one is verify's finding)."""
    root = store.features_dir()
    return [FeatureSet(store, p.name) for p in sorted(root.iterdir()) if (p / "spec.json").is_file()] \
        if root.is_dir() else []


def _verify_features(store, fs: FeatureSet):
    from featurestore.backbones.base import fingerprint_of

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


def _artifact_dirs(store) -> list:
    """Saved heads, memories and LoRA adapters (their files are checked against checksums.json)."""
    out = []
    for root in (store.heads_dir(), store.memory_dir(), store.adapters_dir()):
        if root.is_dir():
            out += [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return out


def unverified(store) -> list[str]:
    """Saved heads and memories with no checksums.json (saved by an older featurestore)."""
    return [str(p) for p in _artifact_dirs(store) if check_checksums(p) is None]


_TEMP_GRACE_S = 600  # temp files outside feature sets younger than this may belong to a running job


def stray_temp_files(store, *, older_than: float = 0.0) -> list:
    """Temporary files and folders (`.*.tmp`, `.*.old`) outside the segment sets, which report their own."""
    import os
    import time

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


_VERIFY_EXTRAS: list = []


@click.command("verify")
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, as_json: bool) -> None:
    """Check everything in the store; exit 8 on any problem.

    Datasets (manifest hash, counts), feature sets (spec, catalogue, segment checksums,
    shapes, alignment, rows each extracted dataset needs), saved heads and memories
    (checksums.json), VA sources, and temporary files left by killed jobs."""
    store = get_store(ctx)
    problems = verify_store(store)
    n_sets, n_art, loose = len(_feature_sets(store)), len(_artifact_dirs(store)), unverified(store)
    if as_json:
        emit({"ok": not problems, "problems": problems, "feature_sets": n_sets, "heads_and_memories": n_art,
              "unverified": loose})
    else:
        for p in problems:
            click.echo(f"PROBLEM {p['path']}: {p['message']}")
        for path in loose:
            click.echo(f"note: {path} has no checksums.json (saved by an older featurestore); not checked")
        click.echo(f"{'ok' if not problems else f'{len(problems)} problem(s)'}: "
                   f"{len(list_datasets(store))} datasets, {n_sets} feature sets, {n_art} heads and memories checked")
    if problems:
        ctx.exit(IntegrityError.exit_code)


@click.command("gc")
@click.option("--compact", is_flag=True, help="Also merge each feature set's segments into one.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@click.option("--keep-fingerprints", "keep", type=click.IntRange(1), default=None, metavar="N",
              help="Also remove all but the N newest feature sets of each backbone and modality, never one a "
                   "saved run (not retired by a refresh), a memory or a refresh still uses.")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, compact: bool, dry_run: bool, keep: int | None, as_json: bool) -> None:
    """Remove temporary files left by killed jobs, register or delete segments a killed job or an
    earlier compaction left behind, and optionally compact segments.

    A feature set being written is skipped. Temporary files elsewhere (datasets, heads,
    memories) are removed once they are 10 minutes old (younger ones may belong to a running job)."""
    from featurestore.errors import LockedError

    store = get_store(ctx)
    report = {"removed_temp_files": [], "compacted": {}, "skipped_locked": [], "kept_recent_temp_files": []}
    if keep is not None:
        from featurestore.jobs.refresh import gc_fingerprints

        report["fingerprints"] = gc_fingerprints(store, keep, dry_run=dry_run)
    for fs in list_feature_sets(store):
        try:
            with fs.lock():
                report["removed_temp_files"] += [str(t) for t in fs.segments.temp_files()]
                if dry_run:
                    n = len(fs.segments.segments())
                else:
                    fs.segments.remove_temp_files()
                    fs.segments.adopt_orphans()
                    fs.segments.delete_retired()
                    n = len(fs.segments.segments())
                    if compact and n > 1:
                        fs.segments.compact(attrs={"fingerprint": fs.fingerprint, "compacted": True})
                if compact and n > 1:
                    report["compacted"][fs.fingerprint] = n
        except LockedError:
            report["skipped_locked"].append(fs.fingerprint)
    old = stray_temp_files(store, older_than=_TEMP_GRACE_S)
    report["removed_temp_files"] += [str(t) for t in old]
    report["kept_recent_temp_files"] = [str(t) for t in stray_temp_files(store) if t not in old]
    if not dry_run:
        _remove(old)
    if as_json:
        return emit(report)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report['removed_temp_files'])} temporary file(s)")
    for path in report["kept_recent_temp_files"]:
        click.echo(f"kept {path}: younger than {_TEMP_GRACE_S // 60} minutes, it may belong to a running job")
    for fp, n in report["compacted"].items():
        click.echo(f"{'would merge' if dry_run else 'merged'} {n} segments of {fp} into one")
    for fp in report["skipped_locked"]:
        click.echo(f"skipped {fp}: a job is writing to it")
    fps = report.get("fingerprints")
    if fps is not None:
        for fp in fps["removed"]:
            click.echo(f"{'would remove' if dry_run else 'removed'} feature set {fp}")
        for fp, users in fps["kept_in_use"].items():
            click.echo(f"kept {fp}: used by {', '.join(users[:3])}{' ...' if len(users) > 3 else ''}")
        for fp in fps["skipped_locked"]:
            click.echo(f"skipped {fp}: a job is writing to it")


def _remove(paths) -> None:
    import shutil

    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def register(cli: click.Group) -> None:
    for cmd in (init_cmd, ls_cmd, info_cmd, verify_cmd, gc_cmd):
        cli.add_command(cmd)
