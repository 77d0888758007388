"""`fs datasets add|list|show`."""
from __future__ import annotations

from pathlib import Path

import click

from featurestore.datasets import BUILTINS, add_dataset, describe_targets, get_dataset, read_folder, read_manifest_file
from featurestore.datasets.layouts import add_layout_dataset, parse_options
from featurestore.datasets.layouts import get as get_layout
from featurestore.datasets.layouts import names as layout_names
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
@click.option("--layout", type=click.Choice(layout_names()), help="A dataset as its authors ship it, read from "
              "--root (fs datasets layouts; docs/datasets.md).")
@click.option("--option", "-o", "options", multiple=True, metavar="KEY=VALUE",
              help="A layout option (fs datasets layouts); repeat for several.")
@click.option("--root", type=click.Path(file_okay=False), help="Root that file paths resolve against "
              "(default: the manifest's folder, or --folder); with --layout, the dataset's folder.")
@click.option("--allow-outside-root", is_flag=True, help="Accept paths that resolve outside the root.")
@click.option("--replace", is_flag=True, help="Overwrite an existing dataset's manifest.")
@json_option
@click.pass_context
def add_cmd(ctx, name, manifest, folder, builtin, layout, options, root, allow_outside_root, replace, as_json):
    """Register dataset NAME from a manifest file, a class folder, a built-in, or a dataset layout."""
    store = get_store(ctx, create=True)
    given = [o for o in (manifest, folder, builtin, layout) if o]
    if len(given) != 1:
        raise ConfigError("give exactly one of --manifest FILE, --folder DIR, --builtin NAME, --layout L --root DIR")
    if options and not layout:
        raise ConfigError("--option is for --layout only")
    if layout:
        if not root:
            raise ConfigError(f"--layout {layout} needs --root DIR, the folder the dataset was unpacked into")
        ds = add_layout_dataset(store, name, layout, root, options=parse_options(options), replace=replace,
                                allow_outside_root=allow_outside_root, progress=progress)
        if as_json:
            return emit(ds.info)
        return click.echo(layout_summary(name, ds.info))
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


def layout_summary(name: str, info: dict, examples: int = 5) -> str:
    """What a layout found: items, splits, classes, folds, missing files, the first problems."""
    rep = info["layout"]
    lines = [f"dataset {name} ({rep['name']} at {rep['root']}): {rep['n_items']} items, "
             f"modalities {', '.join(f'{m} {n}' for m, n in rep['modalities'].items())}"]
    for split, classes in rep["classes_per_split"].items():
        lines.append(f"  {split}: {rep['splits'].get(split, 0)} items; " +
                     (", ".join(f"{c} {n}" for c, n in classes.items()) or "no labels"))
    if rep["multilabels"]:
        lines.append("  multi-labels: " + ", ".join(f"{c} {n}" for c, n in rep["multilabels"].items()))
    if rep["folds"]:
        lines.append("  folds (--cv fold): " + ", ".join(f"{f}: {n}" for f, n in rep["folds"].items()))
    if rep["n_groups"]:
        lines.append(f"  groups (--cv group): {rep['n_groups']}")
    if rep["with_va"]:
        lines.append(f"  valence/arousal labels: {rep['with_va']} items")
    missing = ", ".join(f"{m} {n}" for m, n in rep["missing_files"].items())
    lines.append(f"  files missing: {missing or 'none'}; problems: {rep['n_problems']}")
    for p in rep["problems"][:examples]:
        lines.append(f"    {p['item']}: {p['reason']}")
    if rep["n_problems"] > examples:
        lines.append(f"    ... all of them: fs datasets show {name} --json (layout.problems)")
    return "\n".join(lines)


@datasets_group.command("layouts")
@json_option
def layouts_cmd(as_json):
    """The dataset layouts `fs datasets add --layout` reads, with their options."""
    rows = []
    for layout in layout_names():
        cls = get_layout(layout)
        rows.append({"layout": layout, "modalities": ",".join(cls.modalities), "description": cls.description,
                     "options": {k: {"default": d, "help": h} for k, (d, h) in cls.options.items()}})
    if as_json:
        return emit({"layouts": rows})
    for r in rows:
        click.echo(f"{r['layout']} ({r['modalities']}): {r['description']}")
        for k, o in r["options"].items():
            click.echo(f"    -o {k}=...  {o['help']} (default {o['default']!r})")


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
@click.option("--head", default=5, show_default=True, type=click.IntRange(0), help="Rows of the manifest to print "
              "(0: none).")
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
    if "layout" in info:
        click.echo(layout_summary(name, info))
    if head > 0:
        click.echo(f"\nfirst {min(head, info['n_items'])} items:")
        click.echo(table(_rows(ds, head)))


def _rows(ds, head: int) -> list[dict]:
    """The first manifest rows as a reader wants them: the inputs themselves, not their content keys."""
    cols = [c for c in ("item_id", "split", "fold", "label", "labels", "valence", "arousal", "group", "text", "image",
                      "audio", "video")
            if ds.manifest[c].null_count() < len(ds.manifest)]
    rows = []
    for r in ds.manifest.head(min(head, len(ds.manifest))).select(cols).iter_rows(named=True):
        if "labels" in r:
            r["labels"] = "|".join(r["labels"] or [])
        if isinstance(r.get("text"), str) and len(r["text"]) > 80:
            r["text"] = r["text"][:77] + "..."
        rows.append(r)
    return rows


def register(cli: click.Group) -> None:
    cli.add_command(datasets_group)
