"""`fs init`, `fs ls`, `fs info`, `fs verify`, `fs gc`: the store as a whole."""
from __future__ import annotations

import click

from ..datasets import get_dataset, list_datasets
from ..errors import IntegrityError, NotFoundError
from ..features import FeatureSet, list_feature_sets
from ..hashing import file_digest
from ..store import FORMAT_VERSION
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
    problems = []
    for name in list_datasets(store):
        ds = get_dataset(store, name)
        actual = file_digest(store.dataset_dir(name) / "manifest.parquet")
        if actual != ds.manifest_hash:
            problems.append({"path": f"datasets/{name}/manifest.parquet",
                             "message": f"manifest hash {actual} != recorded {ds.manifest_hash}"})
    from ..backbones.base import fingerprint_of

    for fs in list_feature_sets(store):
        spec = {k: v for k, v in fs.spec.items() if k not in ("fingerprint", "created_at")}
        if fingerprint_of(spec["backbone"], spec) != fs.fingerprint:
            problems.append({"path": str(fs.spec_path), "message": "spec.json does not hash to its fingerprint"})
        problems += [{"path": p.path, "message": p.message} for p in fs.verify()]
    for extra in _VERIFY_EXTRAS:
        problems += extra(store)
    return problems


_VERIFY_EXTRAS: list = []


@click.command("verify")
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, as_json: bool) -> None:
    """Check checksums, alignment and counts of everything in the store; exit non-zero on any problem."""
    store = get_store(ctx)
    problems = verify_store(store)
    n_sets = len(list_feature_sets(store))
    if as_json:
        emit({"ok": not problems, "problems": problems, "feature_sets": n_sets})
    else:
        for p in problems:
            click.echo(f"PROBLEM {p['path']}: {p['message']}")
        click.echo(f"{'ok' if not problems else f'{len(problems)} problem(s)'}: "
                   f"{len(list_datasets(store))} datasets, {n_sets} feature sets checked")
    if problems:
        ctx.exit(IntegrityError.exit_code)


@click.command("gc")
@click.option("--compact", is_flag=True, help="Also merge each feature set's segments into one.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, compact: bool, dry_run: bool, as_json: bool) -> None:
    """Remove temporary files left by killed jobs, and optionally compact segments."""
    from ..errors import LockedError

    store = get_store(ctx)
    report = {"removed_temp_files": [], "compacted": {}, "skipped_locked": []}
    for fs in list_feature_sets(store):
        try:
            with fs.lock():
                temps = fs.segments.temp_files()
                report["removed_temp_files"] += [str(t) for t in temps]
                if not dry_run:
                    fs.segments.remove_temp_files()
                if compact and len(fs.segments.segments()) > 1:
                    n = len(fs.segments.segments())
                    if not dry_run:
                        fs.segments.compact(attrs={"fingerprint": fs.fingerprint, "compacted": True})
                    report["compacted"][fs.fingerprint] = n
        except LockedError:
            report["skipped_locked"].append(fs.fingerprint)
    if as_json:
        return emit(report)
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report['removed_temp_files'])} temporary file(s)")
    for fp, n in report["compacted"].items():
        click.echo(f"{'would merge' if dry_run else 'merged'} {n} segments of {fp} into one")
    for fp in report["skipped_locked"]:
        click.echo(f"skipped {fp}: a job is writing to it")


def register(cli: click.Group) -> None:
    for cmd in (init_cmd, ls_cmd, info_cmd, verify_cmd, gc_cmd):
        cli.add_command(cmd)
