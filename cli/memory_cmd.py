"""`fs scl train`, `fs memory build|list|info`, `fs query`: supramodal concepts on the CLI."""
from __future__ import annotations

import warnings

import click

from featurestore.config import parse_params
from ._common import emit, get_store, json_option, params_option, progress, table


@click.group("scl")
def scl_group() -> None:
    """The supramodal concept encoder (paper 000)."""


@scl_group.command("train")
@click.option("--data", "data", multiple=True, required=True, metavar="DATASET:[MOD=]FEATURES[,...]",
              help="A dataset and its features per modality, as --features takes them, e.g. raf:image=clip-image; "
                   "repeat per dataset.")
@click.option("--run", "run_name", default="", help="Run name under heads/ (default: scl-<encoder hash>).")
@params_option
@click.option("--split", default="train", show_default=True)
@click.option("--replace", is_flag=True, help="Overwrite a run of the same name.")
@json_option
@click.pass_context
def scl_train(ctx, data, run_name, params, split, replace, as_json):
    """Train SCL over the datasets, then write its emotion features back as derived feature sets."""
    from featurestore.jobs.train_scl import TrainSCLConfig, run

    store = get_store(ctx)
    config = TrainSCLConfig(data=tuple(data), run=run_name, params=parse_params(params), split=split, replace=replace)
    result = run(config, store, log=lambda s: None if as_json else click.echo(s, err=True),
                 progress=None if as_json else progress)
    if as_json:
        emit(result.to_dict())
        return
    click.echo(f"run {result.run} ({result.folder}), encoder {result.encoder_hash}, {result.seconds:.1f}s")
    for m, fp in result.derived.items():
        click.echo(f"  {m}: derived features {fp} ({result.written.get(m, 0)} rows written)")
    for line in _accuracy_lines(result.metrics):
        click.echo(line)


@click.group("memory")
def memory_group() -> None:
    """Replay memories: FAISS over SCL features, with per-class replay pools."""


@memory_group.command("build")
@click.argument("name")
@click.option("--from", "run_name", required=True, help="A trained scl run (fs scl train).")
@click.option("--top-p", default=0.2, show_default=True, type=click.FloatRange(0, 1, min_open=True))
@click.option("--min-pool", default=8, show_default=True, type=click.IntRange(1),
              help="Pool floor: at least this many rows per (modality, class), or all the class has.")
@click.option("--split", default="", help="Split to fill it from (default: the run's training split).")
@click.option("--exact-max", default=50_000, show_default=True, type=click.IntRange(0),
              help="Exact search up to this many vectors, IVF above.")
@click.option("--replace", is_flag=True, help="Rebuild a memory of the same name.")
@json_option
@click.pass_context
def memory_build(ctx, name, run_name, top_p, min_pool, split, exact_max, replace, as_json):
    """Build memory NAME from scl run RUN."""
    from featurestore.jobs.build_memory import BuildMemoryConfig, run

    store = get_store(ctx)
    config = BuildMemoryConfig(name=name, run=run_name, top_p=top_p, min_pool=min_pool, split=split,
                               exact_max=exact_max, replace=replace)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(config, store, progress=None if as_json else progress)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if as_json:
        emit(result.to_dict())
        return
    recall = "" if result.recall_at_10 is None else f", nprobe {result.nprobe}, recall@10 {result.recall_at_10:.3f}"
    click.echo(f"memory {result.name}: {result.n} vectors, {result.kind} index{recall} ({result.folder})")
    for m, per in result.pools.items():
        click.echo(f"  {m} pools: " + ", ".join(f"{c}={n}" for c, n in per.items()))


@memory_group.command("list")
@json_option
@click.pass_context
def memory_list(ctx, as_json):
    """Memories in the store."""
    from featurestore.inventory import memory_rows

    rows = memory_rows(get_store(ctx))
    emit(rows) if as_json else click.echo(table(rows, ["name", "run", "n", "kind", "modalities", "created_at"]))


@memory_group.command("info")
@click.argument("name")
@json_option
@click.pass_context
def memory_info(ctx, name, as_json):
    """What memory NAME holds and what it was built from."""
    from featurestore.memory import open_memory

    mem = open_memory(get_store(ctx), name)
    info = {**mem.spec, "index": mem.info()}
    if as_json:
        emit(info)
        return
    idx = info["index"]
    click.echo(f"memory {name}: {idx['n']} vectors of {idx['dim']}-d, {idx['kind']} index"
               + (f", nprobe {idx['nprobe']}, recall@10 {idx['recall_at_10']:.3f}" if idx["recall_at_10"] else ""))
    click.echo(f"  from scl run {info.get('run')} (encoder {info.get('encoder_hash')}), top_p {info.get('top_p')}, "
               f"min_pool {info.get('min_pool')}")
    for m, fp in info.get("fingerprints", {}).items():
        click.echo(f"  {m}: {fp} (source {info['source_fingerprints'][m]})")
    for m, per in info.get("pools", {}).items():
        click.echo(f"  {m} pools: " + ", ".join(f"{c}={n}" for c, n in per.items()))


@click.command("query")
@click.option("--text", default=None, help="A text to query with.")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="An image file.")
@click.option("--audio", type=click.Path(dir_okay=False), default=None, help="An audio file.")
@click.option("--id", "item", default=None, help="An item in the store: DATASET:ITEM_ID (or ITEM_ID).")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), default=None,
              help='A JSONL file, one {"text"|"image"|"audio"|"id": ...} object per line.')
@click.option("--memory", required=True, help="Memory name (fs memory list).")
@click.option("--k", default=5, show_default=True, type=click.IntRange(1), help="Nearest exemplars to return.")
@click.option("--device", default="auto", show_default=True)
@json_option
@click.pass_context
def query_cmd(ctx, text, image, audio, item, batch_file, memory, k, device, as_json):
    """Emotions of an input ranked by similarity to the memory's concepts, and its nearest exemplars.

    Exit status 0, or 10 when some lines of a --batch file failed (each has its error), as `fs predict`.
    """
    from featurestore.jobs.query import QueryConfig, run

    given = {n: v for n, v in (("text", text), ("image", image), ("audio", audio), ("id", item)) if v is not None}
    if len(given) + bool(batch_file) != 1:
        raise click.UsageError("give exactly one of --text, --image, --audio, --id, --batch")
    kind, value = next(iter(given.items())) if given else ("", "")
    out = run(QueryConfig(memory=memory, k=k, device=device), get_store(ctx), kind=kind, value=value,
              batch_file=batch_file or "")
    for w in out["warnings"]:
        click.echo(f"warning: {w}", err=True)
    if as_json:
        emit(out)
    else:
        for res in out["results"]:
            _print_result(res)
    if any("error" in r for r in out["results"]):
        ctx.exit(10)


def _print_result(res: dict) -> None:
    head = f"line {res['line']}: " if "line" in res else ""
    if "error" in res:
        click.echo(f"{head}error: {res['error']}")
        return
    click.echo(f"{head}{_describe_input(res['input'])}")
    click.echo("  emotions (concept cosine, classifier p): "
               + ", ".join(f"{e['emotion']} {e['similarity']:.3f} (p {e['probability']:.2f})" for e in res["emotions"]))
    click.echo(table(res["neighbours"], ["similarity", "label", "dataset", "item_id", "modality", "id"]))


def _describe_input(given) -> str:
    """`text: what a day`, `image: face.png`, `id: demo:17`: the input as typed, not a Python dict."""
    if isinstance(given, dict):
        return "; ".join(f"{k}: {v}" for k, v in given.items())
    return str(given)


def _accuracy_lines(metrics: dict) -> list[str]:
    """`train demo: text 0.812, audio 0.640` per split and dataset, from {split: {dataset: {modality: acc}}}."""
    lines = []
    for split, per_ds in metrics.items():
        for ds, per_mod in (per_ds or {}).items():
            accs = ", ".join(f"{m} {v:.3f}" if isinstance(v, (int, float)) else f"{m} {v}"
                             for m, v in (per_mod or {}).items()) if isinstance(per_mod, dict) else str(per_mod)
            lines.append(f"  accuracy on {split} {ds}: {accs or '-'}")
    return lines


def register(cli: click.Group) -> None:
    cli.add_command(scl_group)
    cli.add_command(memory_group)
    cli.add_command(query_cmd)
