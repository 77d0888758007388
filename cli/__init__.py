"""The `fs` command. One module per noun; each command parses options and calls a job."""
from __future__ import annotations

import os

import click

from featurestore import __version__
from ._common import FsGroup


@click.group(cls=FsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--store", "store_root", type=click.Path(file_okay=False), envvar="FS_STORE", default="store",
              show_default=True, help="Store root; also read from $FS_STORE.")
@click.option("--debug", is_flag=True, envvar="FS_DEBUG",
              help="Show the full traceback of an unexpected failure (also FS_DEBUG=1).")
@click.version_option(__version__, prog_name="fs")
@click.pass_context
def cli(ctx: click.Context, store_root: str, debug: bool) -> None:
    """featurestore: cache backbone embeddings once, train emotion heads from the cache.

    Typical flow: `fs init`, `fs datasets add`, `fs extract`, `fs train-head`, `fs sweep`.
    """
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    ctx.obj = {"store_root": store_root, "debug": debug}


def _register() -> None:
    """Every noun, explicitly: each module's `register(cli)` adds its commands and nothing else
    (no module changes another at import)."""
    from . import (backbones_cmd, datasets_cmd, extract_cmd, heads_cmd, lora_cmd, memory_cmd, predict_cmd,
                   refresh_cmd, store_cmd, sweep_cmd, va_cmd)

    for module in (store_cmd, datasets_cmd, extract_cmd, backbones_cmd, va_cmd, heads_cmd, memory_cmd, sweep_cmd,
                   predict_cmd, lora_cmd, refresh_cmd):
        module.register(cli)


_register()


def main() -> None:
    cli(prog_name="fs")
