"""What every CLI module shares: the store option, output, progress bars, errors."""
from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Iterable, Sequence

import click

from featurestore.errors import DiskFullError, FeatureStoreError
from featurestore.store import Store, open_store

__all__ = ["get_store", "emit", "table", "progress", "json_option", "threads_option", "params_option", "FsGroup", "one_line",
           "ray_options", "ray_config"]

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")


def _set_threads(ctx: click.Context, param: click.Parameter, value: int) -> int:
    if value:
        import torch

        torch.set_num_threads(value)
    return value


MAX_THREADS = 1024  # torch takes an int32; far more threads than cores only slows training down

threads_option = click.option(
    "--threads", type=click.IntRange(0, MAX_THREADS), default=0, show_default=True, envvar="FS_THREADS", metavar="N",
    expose_value=False, callback=_set_threads,
    help="CPU threads torch trains with (also $FS_THREADS; 0: torch's default, every core). On a CPU "
         "that other jobs are using, 1 avoids oversubscribed threads, which made training 2-13x slower "
         "(docs/heads.md, 'Threads').")
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
        except BrokenPipeError:  # `fs ... | head`: the reader has gone, having read what it wanted
            _silence_stdout()
            ctx.exit(SIGPIPE_EXIT)
        except KeyboardInterrupt:  # Ctrl-C: not a failure of the tool (click would say "Aborted!", exit 1)
            if _debug(ctx):
                traceback.print_exc()
            click.echo(f"\ninterrupted: {command_path(ctx)} stopped; what it had published is kept and nothing "
                       "half-written is used (`fs verify` checks the store); run it again to go on", err=True)
            ctx.exit(INTERRUPTED_EXIT)
        except Exception as exc:  # noqa: BLE001 - the one place that turns any failure into a line
            from featurestore._io import disk_full

            # a full disk met outside the writers that name their file themselves: an OSError, or one a
            # library wrapped (safetensors' SafetensorError, h5py's, faiss's RuntimeError) with errno 28
            if not disk_full(exc):
                self._unexpected(ctx, exc)
            if _debug(ctx):
                traceback.print_exc()
            where = getattr(exc, "filename", None) or ctx.find_root().obj["store_root"]
            click.echo(f"error: disk full writing {where}: free some space and re-run; `fs gc` removes leftover "
                       "temp files", err=True)
            ctx.exit(DiskFullError.exit_code)

    @staticmethod
    def _unexpected(ctx: click.Context, exc: Exception):
        if _debug(ctx):
            raise exc
        click.echo(f"error: {command_path(ctx)} failed: {one_line(exc)}; run with --debug for the traceback "
                   f"(fs --debug ...)", err=True)
        ctx.exit(UNEXPECTED_EXIT)


UNEXPECTED_EXIT = 1
SIGPIPE_EXIT = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a command stopped with Ctrl-C


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail a second time."""
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real descriptor (a test runner's capture)
        pass


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



def ray_options(f):
    """--engine and the Ray options of `fs extract` and `fs sweep` (docs/ray.md)."""
    opts = [
        click.option("--engine", default="local", show_default=True, type=click.Choice(["local", "ray"]),
                     help="local: this process; ray: a Ray pool (local, or a cluster with --address); "
                          "needs `pip install 'featurestore[ray]'`."),
        click.option("--address", default="", metavar="ADDR",
                     help="[ray] Join this Ray cluster (auto, HOST:6379, ray://HOST:10001); default: a local Ray."),
        click.option("--workers", default=0, type=click.IntRange(0), metavar="N",
                     help="[ray] Actors / concurrent tasks (default: as many as the CPUs or GPUs hold)."),
        click.option("--cpus-per-worker", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="[ray] CPUs each worker reserves (and its torch threads)."),
        click.option("--gpus-per-worker", default=-1.0, type=float, metavar="G",
                     help="[ray] GPUs each worker reserves (default: 1 where the cluster has GPUs, else 0)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def ray_config(engine: str, address: str, workers: int, cpus_per_worker: float, gpus_per_worker: float):
    """RayOptions for --engine ray (None for local); Ray options without --engine ray are refused."""
    from featurestore.errors import ConfigError

    if engine != "ray":
        given = [n for n, v, d in (("--address", address, ""), ("--workers", workers, 0),
                                   ("--cpus-per-worker", cpus_per_worker, 1.0),
                                   ("--gpus-per-worker", gpus_per_worker, -1.0)) if v != d]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --engine ray")
        return None
    from featurestore.jobs._ray import RayOptions, require_ray

    require_ray()
    return RayOptions(address=address, workers=workers, cpus_per_worker=cpus_per_worker,
                      gpus_per_worker=gpus_per_worker)
