"""`fs backbones list|show`."""
from __future__ import annotations

import click

from featurestore import backbones
from featurestore.backbones.hub import default_source
from featurestore.config import describe
from ._common import emit, json_option, table


@click.group("backbones")
def backbones_group() -> None:
    """The registered backbones and their parameters."""


@backbones_group.command("list")
@json_option
def list_cmd(as_json: bool) -> None:
    """Name, modality and description of every registered backbone."""
    rows = []
    for name in backbones.names():
        cls = backbones.get(name)
        default, packaged = default_source(cls)
        rows.append({"name": name, "modality": cls.modality, "default_model": default or "-",
                     "packaged": packaged, "description": cls.description})
    emit(rows) if as_json else click.echo(table(rows, ["name", "modality", "default_model", "description"]))


@backbones_group.command("show")
@click.argument("name")
@json_option
def show_cmd(name: str, as_json: bool) -> None:
    """The parameters backbone NAME takes (pass them as --param KEY=VALUE)."""
    cls = backbones.get(name)
    rows = [{"param": n, "type": t, "default": d, "help": h} for n, t, d, h in describe(cls.Config)]
    video = []
    if cls.modality == "image":  # image backbones also encode video frames (--modality video)
        from featurestore.backbones.video import VIDEO_FIELDS, video_config_class

        video = [{"param": n, "type": t, "default": d, "help": h}
                 for n, t, d, h in describe(video_config_class(cls.Config)) if n in VIDEO_FIELDS]
    if as_json:
        return emit({"name": name, "modality": cls.modality, "params": rows, "video_params": video})
    click.echo(f"{name} ({cls.modality}): {cls.description}\n")
    click.echo(table(rows))
    if video:
        click.echo("\nwith --modality video (frames of each clip through this backbone), also:\n")
        click.echo(table(video))


def register(cli: click.Group) -> None:
    cli.add_command(backbones_group)
