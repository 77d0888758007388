"""`fs lora train | list | show`: LoRA adapters fine-tuned on a dataset and stored by hash."""
from __future__ import annotations

import click

from featurestore.config import describe, parse_params
from ._common import MAX_THREADS, emit, get_store, json_option, params_option, progress, table


@click.group("lora")
def lora_group() -> None:
    """Fine-tune a backbone with LoRA (peft) and list the stored adapters."""


@lora_group.command("train")
@click.option("--backbone", required=True, help="Backbone to fine-tune (fs backbones list).")
@click.option("--model", default="", help="Hub id or local folder (default: the backbone's own).")
@click.option("--dataset", required=True, help="Registered dataset; its train split trains, val early-stops.")
@click.option("--target", default="label", show_default=True, type=click.Choice(["label", "labels", "va"]),
              help="label: single-label; labels: multi-label; va: valence/arousal regression.")
@click.option("--out", "name", required=True, help="Name of the adapter (fs lora list).")
@params_option
@click.option("--backbone-param", "bb_params", multiple=True, metavar="KEY=VALUE",
              help="A backbone parameter (pooling, max_length, ...); repeat for several.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] (CUDA uses autocast).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, MAX_THREADS),
              help="CPU threads for torch (0: every core).")
@json_option
@click.pass_context
def train_cmd(ctx, backbone, model, dataset, target, name, params, bb_params, device, threads, as_json):
    """Fine-tune BACKBONE with LoRA under a small head on DATASET's train split.

    Early-stops on validation; saves the adapter in peft's format under store/adapters/<hash>/
    with its metrics and lineage. A killed run resumes from its last epoch when started again
    with the same options. -p takes: r, alpha, dropout, target_modules, head (linear|mlp), hidden,
    lr, head_lr, weight_decay, epochs, patience, batch_size, seed, val_fraction, max_train
    (`fs lora settings` lists them with defaults).
    """
    from featurestore.jobs.lora import LoraTrainConfig, run

    store = get_store(ctx)
    bp = parse_params(bb_params)
    if model:
        bp["model"] = model
    config = LoraTrainConfig.build(backbone=backbone, params=bp, dataset=dataset, target=target, name=name,
                                   settings=parse_params(params), device=device, threads=threads)
    result = run(config, store, progress=None if as_json else progress,
                 log=(lambda s: None) if as_json else (lambda s: click.echo(s, err=True)))
    if as_json:
        return emit(result.to_dict())
    m = result.metrics
    click.echo(f"adapter {result.name} ({result.hash}): best epoch {m['best_epoch']}, val loss {m['val_loss']:.4f}, "
               f"val primary {m['val_primary']:.4f}; {result.train_items_per_s:.1f} items/s; {result.folder}")


@lora_group.command("settings")
def settings_cmd() -> None:
    """The -p settings of `fs lora train`, with their defaults."""
    from featurestore.jobs.lora import LoraSettings

    click.echo(table([{"name": n, "type": t, "default": d, "help": h} for n, t, d, h in describe(LoraSettings)]))


@lora_group.command("list")
@json_option
@click.pass_context
def list_cmd(ctx, as_json):
    """Stored adapters: name, hash, backbone, dataset, validation metrics, peft version."""
    from featurestore.jobs.lora import list_lora

    rows = list_lora(get_store(ctx))
    emit(rows) if as_json else click.echo(table(rows))


@lora_group.command("show")
@click.argument("name")
@json_option
@click.pass_context
def show_cmd(ctx, name, as_json):
    """One adapter (by name, hash or hash prefix): settings, lineage, metrics, peft config."""
    from featurestore.jobs.lora import show_lora

    info = show_lora(get_store(ctx), name)
    if as_json:
        return emit(info)
    for key in ("name", "hash", "folder", "created_at", "backbone", "base", "dataset", "manifest_hash", "target",
                "seed", "settings", "validation", "versions", "adapter_config"):
        click.echo(f"{key}: {info.get(key)}")
    m = info.get("metrics", {})
    click.echo(f"best epoch {m.get('best_epoch')}, val loss {m.get('val_loss')}, val primary {m.get('val_primary')}")
    click.echo(table(m.get("history", [])))


def register(cli: click.Group) -> None:
    cli.add_command(lora_group)
