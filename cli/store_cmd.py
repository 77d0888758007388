"""`fs init`, `fs ls`, `fs info`, `fs verify`, `fs gc`: the store as a whole."""
from __future__ import annotations


import click

from featurestore.datasets import get_dataset, list_datasets
from featurestore.errors import IntegrityError, NotFoundError
from featurestore.features import FeatureSet, extracted_for, list_feature_sets
from featurestore.inventory import coverage
from featurestore.store import FORMAT_VERSION
from featurestore.va.inventory import model_rows, source_rows, va_facts
from featurestore.verify import (TEMP_GRACE_S, artifact_dirs, feature_sets_on_disk, gc_store,
                                 refuse_if_not_compacted, unverified, verify_store)
from ._common import _fmt, emit, get_store, json_option, table


@click.command("init")
@click.pass_context
def init_cmd(ctx: click.Context) -> None:
    """Create the store (a no-op if it exists)."""
    store = get_store(ctx, create=True)
    click.echo(f"store {store.root} (format version {FORMAT_VERSION}) is ready")


def _dataset_rows(store) -> list[dict]:
    rows = []
    for name in list_datasets(store):
        ds = get_dataset(store, name)
        info, targets = ds.info, ds.targets()
        rows.append({"dataset": name, "items": info["n_items"],
                     "splits": ",".join(f"{k}:{v}" for k, v in info["splits"].items()),
                     "modalities": ",".join(m for m, n in info["modalities"].items() if n),
                     # one column per --target name, so single labels, multi-labels and VA cannot be confused
                     "label": _classes(targets.get("label")),
                     "labels": _classes(targets.get("labels")),
                     "va": ",".join(d for d in ("valence", "arousal") if targets.get("va", {}).get(d)) or None})
    return rows


def _classes(target: dict | None) -> str | None:
    """`3 classes (single-label)`, `2 classes (binary)`, `8 classes (multi-label)`: the words of `datasets add`."""
    return f"{len(target['classes'])} classes ({target['kind']})" if target else None


def _feature_rows(store) -> list[dict]:
    rows = []
    for fs in list_feature_sets(store):
        s = fs.stats()
        rows.append({k: s[k] for k in ("fingerprint", "backbone", "modality", "dim", "dtype", "rows",
                                       "errors", "segments")} | {"mb": round(s["bytes"] / 2**20, 2),
                                                                  "extracted_for": sorted(extracted_for(fs))})
    return rows


@click.command("ls")
@json_option
@click.pass_context
def ls_cmd(ctx: click.Context, as_json: bool) -> None:
    """List datasets and cached feature sets, with row and error counts."""
    store = get_store(ctx)
    data = {"store": str(store.root), "datasets": _dataset_rows(store), "features": _feature_rows(store),
            "runs": _run_rows(store), "va_sources": source_rows(store), "va_models": model_rows(store)}
    if as_json:
        return emit(data)
    for section, rows in data.items():
        if section == "store":
            continue
        click.echo(f"{section}:")
        click.echo(table(rows) + "\n")


def _run_rows(store) -> list[dict]:
    from featurestore.jobs.train_head import list_runs

    return [{k: r[k] for k in ("run", "method", "dataset", "metric", "score", "stale")} for r in list_runs(store)]


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
    data.update(va_facts(store, name))  # VA counts, a dataset's VA coverage, or a VA source or model
    if not data:
        raise NotFoundError(f"{name!r} is not a dataset, fingerprint or VA source in {store.root} (fs ls)")
    if as_json:
        return emit(data)
    _print_nested(data)


def _print_nested(data: dict, indent: int = 0) -> None:
    pad = " " * indent
    for k, v in data.items():
        if isinstance(v, dict):
            click.echo(f"{pad}{k}:")
            _print_nested(v, indent + 2)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            click.echo(f"{pad}{k}:")
            click.echo("\n".join(pad + "  " + line for line in table(v).splitlines()))
        elif isinstance(v, (list, tuple)):
            click.echo(f"{pad}{k}: {', '.join(map(_fmt, v)) if v else '-'}")  # None as '-', as a table shows it
        else:
            click.echo(f"{pad}{k}: {'-' if v is None else v}")


@click.command("verify")
@json_option
@click.pass_context
def verify_cmd(ctx: click.Context, as_json: bool) -> None:
    """Check everything in the store; exit 8 on any problem.

    Datasets (manifest hash, counts; a folder without dataset.json), feature sets (spec, catalogue,
    segment checksums, shapes, alignment, rows each extracted dataset needs; a folder without
    spec.json; every feature set a saved run, memory or refresh uses), saved heads, memories, LoRA
    adapters and fitted VA models (checksums.json), VA sources, a folder a killed replacement left
    moved aside, and temporary files left by killed jobs."""
    store = get_store(ctx)
    problems = verify_store(store)
    n_sets, loose, n_datasets = len(feature_sets_on_disk(store)), unverified(store), len(list_datasets(store))
    kinds = {"heads": store.heads_dir(), "memories": store.memory_dir(), "adapters": store.adapters_dir(),
             "va_models": store.root / "va_models"}
    counts = {k: sum(1 for d in artifact_dirs(store) if d.parent == root) for k, root in kinds.items()}
    if as_json:
        emit({"ok": not problems, "problems": problems, "datasets": n_datasets, "feature_sets": n_sets, **counts,
              "heads_and_memories": sum(counts.values()), "unverified": loose})
    else:
        for p in problems:
            click.echo(f"PROBLEM {p['path']}: {p['message']}")
        for path in loose:
            click.echo(f"note: {path} has no checksums.json (saved by an older featurestore); not checked")
        what = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in counts.items())
        click.echo(f"{'ok' if not problems else f'{len(problems)} problem(s)'}: {n_datasets} datasets, {n_sets} "
                   f"feature sets, {what} checked")
    if problems:
        ctx.exit(IntegrityError.exit_code)


@click.command("gc")
@click.option("--compact", is_flag=True, help="Also merge each feature set's segments into one.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@click.option("--keep-fingerprints", "keep", type=click.IntRange(1), default=None, metavar="N",
              help="Also remove old feature sets: of each backbone and modality the N newest stay, and an "
                   "older one goes only if every dataset it was extracted for has a newer extraction (of the "
                   "same backbone and modality) that stays; never one a saved run (not retired by a refresh), "
                   "a memory or a refresh still uses.")
@json_option
@click.pass_context
def gc_cmd(ctx: click.Context, compact: bool, dry_run: bool, keep: int | None, as_json: bool) -> None:
    """Remove temporary files left by killed jobs, register or delete segments a killed job or an
    earlier compaction left behind, and optionally compact segments.

    A folder (memory, SCL run) whose replacement was killed half-way, leaving only its previous
    copy as `.NAME.<id>.old`, is put back as NAME first; such a copy is never removed.

    A feature set being written is skipped. Temporary files elsewhere (datasets, heads,
    memories) are removed once they are 10 minutes old (younger ones may belong to a running job)."""
    store = get_store(ctx)
    fingerprints = restored = None
    if keep is not None:  # old feature sets first, so the temp-file pass sees what they leave; but a
        # half-replaced memory or run goes back first, so what it uses counts as in use
        from featurestore.jobs.refresh import gc_fingerprints
        from featurestore.verify import restore_swapped_out

        restored = restore_swapped_out(store, dry_run=dry_run)
        fingerprints = gc_fingerprints(store, keep, dry_run=dry_run)
    report = gc_store(store, compact=compact, dry_run=dry_run)
    if restored and not dry_run:  # a dry run's gc_store lists the same ones again
        report["restored"] = [{"from": str(old), "to": str(to)} for old, to in restored] + report["restored"]
    if fingerprints is not None:
        report["fingerprints"] = fingerprints
    if as_json:
        emit(report)
        return refuse_if_not_compacted(report)
    for r in report["restored"]:
        click.echo(f"{'would restore' if dry_run else 'restored'} {r['to']} from {r['from']} "
                   "(a job replacing it was killed half-way)")
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(report['removed_temp_files'])} temporary file(s)")
    for path in report["kept_recent_temp_files"]:
        click.echo(f"kept {path}: younger than {TEMP_GRACE_S // 60} minutes, it may belong to a running job")
    for fp, n in report["compacted"].items():
        click.echo(f"{'would merge' if dry_run else 'merged'} {n} segments of {fp} into one")
    for fp in report["skipped_locked"]:
        click.echo(f"skipped {fp}: a job is writing to it")
    fps = report.get("fingerprints")
    if fps is not None:
        listed = set()
        for dataset, gone in sorted(fps["by_dataset"].items()):
            for g in gone:
                listed.add(g["fingerprint"])
                click.echo(f"dataset {dataset}: {'would remove' if dry_run else 'removed'} feature set "
                           f"{g['fingerprint']} (superseded by {g['superseded_by']})")
        for fp in fps["removed"]:
            if fp not in listed:  # its catalogue records no dataset
                click.echo(f"{'would remove' if dry_run else 'removed'} feature set {fp} (no dataset recorded)")
        for fp, users in fps["kept_in_use"].items():
            click.echo(f"kept {fp}: used by {', '.join(users[:3])}{' ...' if len(users) > 3 else ''}")
        for fp, datasets in fps["kept_newest"].items():
            click.echo(f"kept {fp}: the newest extraction for dataset(s) {', '.join(datasets)}")
        for fp in fps["kept_unreadable"]:
            click.echo(f"kept {fp}: its catalogue cannot be read (run `fs verify`)")
        for fp in fps["skipped_locked"]:
            click.echo(f"skipped {fp}: a job is writing to it")
    for fp, why in report["not_compacted"].items():
        click.echo(f"not compacted {fp}: {why}")
    refuse_if_not_compacted(report)


@click.command("errors")
@click.argument("name")
@click.option("--dataset", "-d", default=None, help="Only this dataset's items, as its manifest is now "
              "(records of items since replaced or removed are left out).")
@click.option("--resolved", is_flag=True, help="Also records whose content has a row now (a retry computed it).")
@click.option("--limit", type=click.IntRange(0), default=50, show_default=True,
              help="Items listed (0: all); the counts by reason cover every one.")
@json_option
@click.pass_context
def errors_cmd(ctx: click.Context, name: str, dataset: str | None, resolved: bool, limit: int,
               as_json: bool) -> None:
    """The items that failed in a feature set or a VA source, and why.

    NAME is a fingerprint, a backbone name, or MODALITY=NAME (as `--features` takes them), or a VA
    source or scorer name. Prints the count of each reason, then the items (`--json`: all of them, as records
    with key, dataset, item_id and reason). `fs extract --retry-errors` and `fs va score
    --retry-errors` try them again."""
    from featurestore.features import resolve_features
    from featurestore.va.cache import resolve_va

    store = get_store(ctx)
    ds = get_dataset(store, dataset) if dataset is not None else None
    modality, _, ref = name.rpartition("=")  # MODALITY=NAME, as --features takes it
    try:
        rows = resolve_features(store, ref, modality=modality or None, dataset=ds)
    except NotFoundError:
        if any(f.backbone == ref for f in list_feature_sets(store)):
            raise  # a backbone's feature sets, none right for --dataset: that error says which
        try:
            rows = resolve_va(store, name)
        except NotFoundError:
            raise NotFoundError(f"{name!r} is neither a feature set nor a VA source in {store.root}; "
                                "see `fs ls` and `fs va list`") from None
    if ds is not None and resolved:
        raise click.UsageError("--resolved lists every record; it cannot be combined with --dataset")
    records = rows.standing_errors(ds) if ds is not None else rows.errors(resolved=resolved)
    records.sort(key=lambda e: (e.dataset, e.item_id))
    what = getattr(rows, "fingerprint", None) or rows.source
    if as_json:
        return emit({"name": what, "dataset": dataset, "n": len(records), "errors": [e.__dict__ for e in records]})
    if not records:
        click.echo(f"{what}: no failed items{' of ' + dataset if dataset else ''}")
        return
    counts: dict[str, int] = {}
    for e in records:
        kind = _reason_kind(e.reason)
        counts[kind] = counts.get(kind, 0) + 1
    click.echo(f"{what}: {len(records)} failed item(s){' of ' + dataset if dataset else ''}")
    click.echo(table([{"count": n, "reason": k} for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]))
    shown = records if limit == 0 else records[:limit]
    click.echo("")
    click.echo(table([{"dataset": e.dataset, "item_id": e.item_id, "reason": e.reason[:160]} for e in shown]))
    if len(shown) < len(records):
        click.echo(f"... {len(records) - len(shown)} more (--limit 0 or --json lists them all)")


def _reason_kind(reason: str) -> str:
    """A reason without what names one item, so that like failures count together: quoted values
    (`<path>` when they hold a slash: this tool quotes the paths it names, spaces and all),
    anything with a slash (a path), long hex strings (keys) and numbers are replaced by placeholders,
    and the rest cut at 100 characters."""
    import re

    kind = re.sub(r"(?<!\w)'[^']*'(?!\w)|(?<!\w)\"[^\"]*\"(?!\w)",
                  lambda m: "<path>" if "/" in m.group() else "<value>", reason)  # a quoted path may hold spaces
    kind = re.sub(r"[^\s:'\"(),]*/[^\s:'\"(),]*", "<path>", kind)
    kind = re.sub(r"\b[0-9a-fA-F]{16,}\b", "<key>", kind)
    kind = re.sub(r"\d+(\.\d+)?", "N", kind)
    return kind if len(kind) <= 100 else kind[:97] + "..."


def register(cli: click.Group) -> None:
    for cmd in (init_cmd, ls_cmd, info_cmd, verify_cmd, gc_cmd, errors_cmd):
        cli.add_command(cmd)
