"""What every CLI module shares: the store option, output, progress bars, errors."""
from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Iterable, Sequence

import click

from featurestore.errors import DiskFullError, FeatureStoreError
from featurestore.store import Store, open_store

__all__ = ["get_store", "emit", "table", "progress", "json_option", "params_option", "FsGroup", "one_line"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
params_option = click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE",
                             help="A parameter; repeat for several.")


def get_store(ctx: click.Context, *, create: bool = False) -> Store:
    root = ctx.find_root().obj["store_root"]
    return open_store(root, create=create)


def emit(obj: Any) -> None:
    """One JSON document on stdout (NaN and inf become null: strict JSON parsers accept it)."""
    from featurestore._io import json_safe

    click.echo(json.dumps(json_safe(obj), indent=2, sort_keys=True, default=str))


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def progress(iterable: Iterable | None = None, **kwargs):
    """A tqdm bar on stderr, shown only on a terminal (quiet in logs and tests)."""
    import shutil

    from tqdm.auto import tqdm

    # A pseudo-terminal may report a 0 x 0 size (script, some CI runners); tqdm would then hide
    # the bar, so give it a fixed size.
    size = shutil.get_terminal_size((0, 0))
    sized = size.columns > 0 and size.lines > 0
    return tqdm(iterable, file=sys.stderr, disable=None, dynamic_ncols=sized, ncols=None if sized else 100,
                nrows=None if sized else 24, **kwargs)


class FsGroup(click.Group):
    """The CLI's edge: project errors become one clear line on stderr and a meaningful exit code;
    anything unexpected becomes one line naming the command and the failure, with the traceback
    only under `fs --debug` (or FS_DEBUG=1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except FeatureStoreError as exc:
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:  # a full disk met outside the writers that name their file themselves
            from featurestore._io import disk_full

            if not disk_full(exc):
                self._unexpected(ctx, exc)
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"error: disk full writing {exc.filename or ctx.find_root().obj['store_root']}: free some "
                       "space and re-run; `fs gc` removes leftover temp files", err=True)
            ctx.exit(DiskFullError.exit_code)
        except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into a line
            self._unexpected(ctx, exc)

    @staticmethod
    def _unexpected(ctx: click.Context, exc: Exception):
        if _debug(ctx):
            raise exc
        click.echo(f"error: {command_path(ctx)} failed: {one_line(exc)}; run with --debug for the traceback "
                   f"(fs --debug ...)", err=True)
        ctx.exit(UNEXPECTED_EXIT)


UNEXPECTED_EXIT = 1


def _debug(ctx: click.Context) -> bool:
    import os

    return bool(ctx.find_root().params.get("debug")) or os.environ.get("FS_DEBUG", "") not in ("", "0")


def command_path(ctx: click.Context) -> str:
    """`fs extract`, `fs sweep`...: the command being run."""
    name = ctx.find_root().invoked_subcommand
    return f"fs {name}" if name else "fs"


def one_line(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` on one line, cut at `limit` characters."""
    text = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
