"""`fs va list|show|score|fit|sources|models|info|gc`: per-modality valence-arousal scores.

`fs ls`, `fs info` and `fs verify` show VA too: they call featurestore.va.inventory and
featurestore.verify themselves.
"""
from __future__ import annotations

import click

from featurestore.config import describe, parse_params
from featurestore.errors import NotFoundError
from featurestore.va.inventory import model_rows, source_rows, va_info
from ._common import emit, get_store, json_option, params_option, progress, table

FAILED_EXIT = 10  # the job finished, but some items could not be scored


@click.group("va")
def va_group() -> None:
    """Per-modality valence-arousal (VA) scores, cached beside the embeddings (docs/va.md)."""


@va_group.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """List the registered VA scorers."""
    from featurestore import va

    rows = [{"name": n, "modalities": va.get(n).modality_hint, "description": va.get(n).description}
            for n in va.names()]
    emit(rows) if as_json else click.echo(table(rows))


@va_group.command("show")
@click.argument("name")
@json_option
def show_cmd(name: str, as_json: bool) -> None:
    """The parameters VA scorer NAME takes (pass them as --param KEY=VALUE)."""
    from featurestore import va

    cls = va.get(name)
    rows = [{"param": n, "type": t, "default": d, "help": h} for n, t, d, h in describe(cls.Config)]
    if as_json:
        return emit({"name": name, "modalities": cls.modality_hint, "params": rows})
    click.echo(f"{name} ({cls.modality_hint}): {cls.description}\n")
    click.echo(table(rows))


@va_group.command("score")
@click.option("--dataset", required=True, help="Registered dataset name.")
@click.option("--modality", type=click.Choice(["text", "image", "audio", "video"]), required=True,
              help="Input to score; video: frames scored by an image model and averaged (docs/video.md).")
@click.option("--scorer", required=True, help="VA scorer (fs va list) or fitted model name (fs va models).")
@params_option
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--limit", default=0, type=click.IntRange(0), help="Only the first N manifest rows.")
@click.option("--split", "splits", multiple=True, help="Only this split; repeat for several.")
@click.option("--retry-errors", is_flag=True, help="Retry items that failed in an earlier run.")
@json_option
@click.pass_context
def score_cmd(ctx, dataset, modality, scorer, params, batch_size, device, limit, splits, retry_errors, as_json):
    """Score a dataset's MODALITY inputs with a VA scorer into the VA cache.

    Inputs already scored under the same source are not rescored. Exit status: 0 when
    every item was scored, 10 when some failed (reasons: fs errors SOURCE).
    """
    from featurestore.jobs.va import VAConfig, run

    store = get_store(ctx, create=True)
    config = VAConfig(dataset=dataset, modality=modality, scorer=scorer, params=parse_params(params),
                      batch_size=batch_size, device=device, limit=limit, splits=tuple(splits),
                      retry_errors=retry_errors)
    result = run(config, store, progress=progress, log=lambda s: None if as_json else click.echo(s, err=True))
    report_score(ctx, result, as_json)


def report_score(ctx: click.Context, result, as_json: bool) -> None:
    """Print a VA job's result (shared with `fs extract --va`); exit 10 on recorded failures."""
    if as_json:
        emit(result.to_dict())
    else:
        if result.cache_hit:
            click.echo(f"cache hit: all {result.cached} inputs of {result.dataset}/{result.modality} are already "
                       f"scored in {result.source}")
        else:
            click.echo(f"{result.source}: {result.computed} scored ({result.unknown} with no evidence), "
                       f"{result.cached} cached, {result.failed_new} failed in {result.seconds:.1f}s")
        if result.missing_features:
            click.echo(f"{result.missing_features} input(s) have no cached embedding yet; run fs extract first")
        if result.failed_total:
            click.echo(f"{result.failed_total} item(s) of {result.dataset} failed; reasons: fs errors {result.source} --dataset {result.dataset}")
    if result.failed_total:
        ctx.exit(FAILED_EXIT)


@va_group.command("fit")
@click.option("--dataset", required=True, help="Dataset with valence/arousal labels.")
@click.option("--features", required=True, metavar="[MOD=]NAME_OR_FINGERPRINT",
              help="One feature set: a backbone name (its fingerprint that covers the dataset) or a fingerprint; "
                   "e.g. text=minilm or minilm.")
@click.option("--out", required=True, help="Name of the fitted model (then: --scorer NAME).")
@params_option
@click.option("--train-split", "train_splits", multiple=True, default=("train",), show_default=True,
              help="Split to fit on; repeat for several.")
@click.option("--test-split", default="test", show_default=True, help="Held-out split for the metrics ('' none).")
@click.option("--replace", is_flag=True, help="Overwrite a model of the same name.")
@click.option("--score", "then_score", is_flag=True, help="Then score the whole dataset with the fitted model.")
@json_option
@click.pass_context
def fit_cmd(ctx, dataset, features, out, params, train_splits, test_split, replace, then_score, as_json):
    """Fit a VA regressor (--param kind=ridge|mlp) on cached embeddings; report held-out Pearson r and CCC."""
    from featurestore.jobs.va import FitConfig, VAConfig, fit, run

    store = get_store(ctx)
    config = FitConfig(dataset=dataset, features=features, out=out, params=parse_params(params),
                       train_splits=tuple(train_splits), test_split=test_split, replace=replace)
    result = fit(config, store, log=lambda s: None if as_json else click.echo(s, err=True))
    scored = None
    if then_score:
        scored = run(VAConfig(dataset=dataset, modality=result.modality, scorer=out), store, progress=progress)
    if as_json:
        return emit({**result.to_dict(), "scored": scored.to_dict() if scored else None})
    counts = ", ".join(f"{n} {d}" for d, n in result.n_train.items())
    click.echo(f"VA model {out}: {result.kind} on {result.fingerprint}; labelled training items: {counts}")
    rows = [{"dimension": d, **m} for d, m in result.metrics.items() if m.get("n")]
    click.echo(f"held-out ({test_split}):\n" + table(rows) if rows else "no held-out metrics (no labelled test items)")
    if scored is not None:
        report_score(ctx, scored, False)


@va_group.command("sources")
@json_option
@click.pass_context
def sources_cmd(ctx, as_json):
    """List the cached VA sources with their row, coverage and error counts."""
    rows = source_rows(get_store(ctx))
    emit(rows) if as_json else click.echo(table(rows))


@va_group.command("models")
@json_option
@click.pass_context
def models_cmd(ctx, as_json):
    """List fitted VA models with their held-out Pearson r."""
    rows = model_rows(get_store(ctx))
    emit(rows) if as_json else click.echo(table(rows))


@va_group.command("info")
@click.argument("name")
@json_option
@click.pass_context
def info_cmd(ctx, name, as_json):
    """Spec, counts and failed items of a VA source, or config and metrics of a fitted model."""
    from .store_cmd import _print_nested

    store = get_store(ctx)
    data = va_info(store, name)
    if not data:
        raise NotFoundError(f"{name!r} is neither a VA source nor a fitted VA model in {store.root} "
                            "(fs va sources, fs va models)")
    emit(data) if as_json else _print_nested(data)


@va_group.command("gc")
@click.option("--compact", is_flag=True, help="Also merge each VA source's segments into one.")
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
@json_option
@click.pass_context
def gc_cmd(ctx, compact, dry_run, as_json):
    """Remove temporary files left by killed VA jobs, and optionally compact VA segments."""
    from featurestore.verify import gc_va, refuse_if_not_compacted

    report = gc_va(get_store(ctx), compact=compact, dry_run=dry_run)
    if as_json:
        emit(report)
        return refuse_if_not_compacted(report)
    click.echo(f"{'would remove' if dry_run else 'removed'} {len(report['removed_temp_files'])} temporary file(s)")
    for src, n in report["compacted"].items():
        click.echo(f"{'would merge' if dry_run else 'merged'} {n} segments of {src} into one")
    for src in report["skipped_locked"]:
        click.echo(f"skipped {src}: a job is writing to it")
    for src, why in report["not_compacted"].items():
        click.echo(f"not compacted {src}: {why}")
    refuse_if_not_compacted(report)


def register(cli: click.Group) -> None:
    cli.add_command(va_group)
