"""`fs datasets add|list|show`."""
from __future__ import annotations

from pathlib import Path

import click

from featurestore.datasets import BUILTINS, add_dataset, describe_targets, get_dataset, read_folder, read_manifest_file
from featurestore.errors import ConfigError
from ._common import emit, get_store, json_option, progress, table


@click.group("datasets")
def datasets_group() -> None:
    """Register and inspect datasets (manifests of items, labels and inputs)."""


@datasets_group.command("add")
@click.argument("name")
@click.option("--manifest", type=click.Path(dir_okay=False), help="CSV, TSV, JSONL or parquet manifest.")
@click.option("--folder", type=click.Path(file_okay=False), help="Folder of <class>/ or <split>/<class>/ files.")
@click.option("--builtin", type=click.Choice(sorted(BUILTINS)), help="A built-in dataset (made from packaged lexicons).")
@click.option("--root", type=click.Path(file_okay=False), help="Root that file paths resolve against "
              "(default: the manifest's folder, or --folder).")
@click.option("--allow-outside-root", is_flag=True, help="Accept paths that resolve outside the root.")
@click.option("--replace", is_flag=True, help="Overwrite an existing dataset's manifest.")
@json_option
@click.pass_context
def add_cmd(ctx, name, manifest, folder, builtin, root, allow_outside_root, replace, as_json):
    """Register dataset NAME from a manifest file, a class folder, or a built-in."""
    store = get_store(ctx, create=True)
    given = [o for o in (manifest, folder, builtin) if o]
    if len(given) != 1:
        raise ConfigError("give exactly one of --manifest FILE, --folder DIR, --builtin NAME")
    if manifest:
        df, source, root = read_manifest_file(manifest), f"manifest {manifest}", root or Path(manifest).parent
    elif folder:
        df, source, root = read_folder(folder), f"folder {folder}", root or folder
    else:
        df, source = BUILTINS[builtin](), f"builtin {builtin}"
    ds = add_dataset(store, name, df, root=root, source=source, replace=replace,
                     allow_outside_root=allow_outside_root, progress=progress)
    if as_json:
        return emit(ds.info)
    click.echo(f"dataset {name}: {ds.info['n_items']} items; splits {_counts(ds.info['splits'])}; "
               f"modalities {', '.join(ds.modalities)}")
    click.echo(f"targets: {describe_targets(ds.targets())}")
    for warning in ds.info.get("warnings", []):
        click.echo(f"warning: {warning}", err=True)


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


@datasets_group.command("list")
@json_option
@click.pass_context
def list_cmd(ctx, as_json):
    """List registered datasets."""
    from .store_cmd import _dataset_rows

    rows = _dataset_rows(get_store(ctx))
    emit(rows) if as_json else click.echo(table(rows))


@datasets_group.command("show")
@click.argument("name")
@click.option("--head", default=5, show_default=True, help="Rows of the manifest to print.")
@json_option
@click.pass_context
def show_cmd(ctx, name, head, as_json):
    """Facts and the first rows of dataset NAME."""
    ds = get_dataset(get_store(ctx), name)
    if as_json:
        return emit({**ds.info, "targets": ds.targets(), "rows": _rows(ds, head)})
    info = ds.info
    click.echo(f"dataset {name}: {info['n_items']} items, from {info.get('source')}, added {info.get('created_at')}")
    click.echo(f"splits: {_counts(info['splits'])}")
    click.echo(f"modalities: {_counts({m: n for m, n in info['modalities'].items() if n})}")
    targets = ds.targets()
    click.echo("targets (--target):" + ("" if targets else " none"))
    for t, d in targets.items():
        if t == "va":
            click.echo(f"  va      {d['kind']}: " + ", ".join(f"{k} on {d[k]} items" for k in ("valence", "arousal")
                                                              if d[k]))
        else:
            click.echo(f"  {t:<7} {d['kind']}, {len(d['classes'])} classes on {d['items']} items: "
                       f"{', '.join(d['classes'])}")
    if info.get("root"):
        click.echo(f"root: {info['root']}")
    click.echo(f"manifest hash: {info['manifest_hash']}")
    for warning in info.get("warnings", []):
        click.echo(f"warning: {warning}")
    if head > 0:
        click.echo(f"\nfirst {min(head, info['n_items'])} items:")
        click.echo(table(_rows(ds, head)))


def _rows(ds, head: int) -> list[dict]:
    """The first manifest rows as a reader wants them: the inputs themselves, not their content keys."""
    cols = [c for c in ("item_id", "split", "label", "labels", "valence", "arousal", "group", "text", "image", "audio")
            if ds.manifest[c].null_count() < len(ds.manifest)]
    rows = []
    for r in ds.manifest.head(max(head, 0)).select(cols).iter_rows(named=True):
        if "labels" in r:
            r["labels"] = "|".join(r["labels"] or [])
        if isinstance(r.get("text"), str) and len(r["text"]) > 80:
            r["text"] = r["text"][:77] + "..."
        rows.append(r)
    return rows


def register(cli: click.Group) -> None:
    cli.add_command(datasets_group)
