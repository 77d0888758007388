"""`fs extract`: the CLI face of jobs.extract."""
from __future__ import annotations

import click

from featurestore.config import parse_params
from featurestore.errors import ConfigError
from ._common import emit, get_store, json_option, params_option, progress, ray_config, ray_options

FAILED_EXIT = 10  # the job finished, but some items could not be encoded


@click.command("extract")
@click.option("--dataset", required=True, help="Registered dataset name.")
@click.option("--modality", type=click.Choice(["text", "image", "audio", "video"]), required=True,
              help="Input to encode; video: sampled frames through an image backbone (docs/video.md).")
@click.option("--backbone", required=True, help="Backbone name (fs backbones list).")
@click.option("--model", default="", help="Hub id or local folder (default: the backbone's own).")
@click.option("--adapter", default="", help="A peft (LoRA) adapter: a folder, or a stored adapter's name or hash "
                                           "(fs lora list).")
@params_option
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--limit", default=0, type=click.IntRange(0), help="Only the first N manifest rows.")
@click.option("--split", "splits", multiple=True, help="Only this split; repeat for several.")
@click.option("--retry-errors", is_flag=True, help="Retry items that failed in an earlier run.")
@click.option("--segment-rows", default=16384, show_default=True, type=click.IntRange(1),
              help="Publish a segment after this many rows (smaller: less lost on a kill).")
@click.option("--segment-seconds", default=5.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="... or after this many seconds of work, whichever comes first.")
@click.option("--wait", is_flag=True, help="Wait while `fs gc --compact` holds the fingerprint instead of exiting 9.")
@click.option("--va", "va_scorer", default="", metavar="NAME",
              help="Then score VA for the same dataset/modality (a scorer of fs va list, or a fitted VA model).")
@click.option("--va-param", "va_params", multiple=True, metavar="KEY=VALUE", help="A parameter of the --va scorer.")
@ray_options
@json_option
@click.pass_context
def extract_cmd(ctx, dataset, modality, backbone, model, adapter, params, batch_size, device, limit, splits,
                retry_errors, segment_rows, segment_seconds, wait, va_scorer, va_params, engine, address, workers,
                cpus_per_worker, gpus_per_worker, as_json):
    """Encode a dataset's inputs with a backbone into the feature cache.

    Inputs already cached under the same fingerprint are not recomputed; a killed run
    resumes where it stopped; several jobs may extract into one fingerprint at once.
    Exit status: 0 when every item was encoded, 10 when the job finished but some items
    failed (they are recorded with their reason: fs errors FP), 9 when a compaction holds the
    fingerprint (or wait for it with --wait), 11 when the disk is full.

    With --engine ray the model runs in a pool of Ray actors (a local Ray, or a cluster with
    --address; the store must then be on a filesystem every node mounts): same rows, see docs/ray.md.
    """
    from featurestore.jobs.extract import ExtractConfig, run

    ray = ray_config(engine, address, workers, cpus_per_worker, gpus_per_worker)
    if va_params and not va_scorer:
        raise ConfigError(f"--va-param {va_params[0]} is a parameter of the --va scorer; add --va NAME (fs va list) "
                          "or leave it out")
    store = get_store(ctx, create=True)
    p = parse_params(params)
    if model:
        p["model"] = model
    if adapter:
        p["adapter"] = adapter
    config = ExtractConfig(dataset=dataset, modality=modality, backbone=backbone, params=p, batch_size=batch_size,
                           device=device, limit=limit, splits=tuple(splits), retry_errors=retry_errors,
                           segment_rows=segment_rows, segment_seconds=segment_seconds, wait=wait)
    scorer = _va_scorer(store, va_scorer, va_params, modality, device) if va_scorer else None
    say = lambda s: None if as_json else click.echo(s, err=True)  # noqa: E731
    if ray is not None:
        from featurestore.jobs.ray_extract import run as run_ray

        result = run_ray(config, store, ray, progress=progress, log=say)
    else:
        result = run(config, store, progress=progress, log=say)
    va_result = _va_pass(store, scorer, config) if scorer else None
    if as_json:
        emit(result.to_dict() | ({"va": va_result.to_dict()} if va_result else {})
             | ({"engine": "ray", "ray": getattr(result, "ray", {})} if ray is not None else {}))
    else:
        if result.cache_hit:
            click.echo(f"cache hit: all {result.unique} inputs of {dataset}/{modality} are already in "
                       f"{result.fingerprint}; no model work done")
        else:
            click.echo(f"{result.fingerprint}: {result.computed} computed, {result.cached} cached, "
                       f"{result.failed_new} failed in {result.seconds:.1f}s ({result.items_per_s:.1f} items/s)")
        if result.failed_total:
            click.echo(f"{result.failed_total} item(s) of {dataset} failed; reasons: fs errors {result.fingerprint} --dataset {dataset}")
        if va_result:
            click.echo(f"VA {va_result.source}: {va_result.computed} scored, {va_result.cached} cached, "
                       f"{va_result.failed_total} failed (fs va info {va_result.source})")
    if result.failed_total or (va_result and va_result.failed_total):
        ctx.exit(FAILED_EXIT)


def _va_scorer(store, name, params, modality, device):
    """The --va scorer, refused before extraction starts if it cannot score this modality."""
    from featurestore.jobs.va import make_scorer

    scorer = make_scorer(store, name, parse_params(params), device=device)
    scorer.check_modality(modality)
    return scorer


def _va_pass(store, scorer, config):
    from featurestore.jobs.va import VAConfig, run as run_va

    return run_va(VAConfig(dataset=config.dataset, modality=config.modality, scorer=scorer.name,
                           device=config.device, limit=config.limit, splits=config.splits), store,
                  scorer=scorer, progress=progress)


def register(cli: click.Group) -> None:
    cli.add_command(extract_cmd)
