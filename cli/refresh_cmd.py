"""`fs refresh RECIPE`, `fs refresh status RECIPE`: the periodic LoRA refresh (jobs/refresh.py)."""
from __future__ import annotations

import click

from ._common import emit, get_store, json_option, progress, table


class _RunByDefault(click.Group):
    """`fs refresh RECIPE` means `fs refresh run RECIPE`; `status` is the other subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group("refresh", cls=_RunByDefault)
def refresh_group() -> None:
    """Periodic LoRA refresh: `fs refresh RECIPE` (run, for cron) or `fs refresh status RECIPE`.

    A recipe (JSON or TOML; docs/lora.md) names the backbone, LoRA settings, the dataset to
    fine-tune on, the datasets to re-extract, the saved head runs to retrain, the memories to
    rebuild, a trigger and a promotion rule.
    """


@refresh_group.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Run even if the trigger does not fire.")
@json_option
@click.pass_context
def run_cmd(ctx, recipe, force, as_json):
    """Run one refresh of RECIPE if its trigger fires (exit 0 with "nothing to do" otherwise).

    Fine-tunes, re-extracts, retrains the listed heads, promotes the new adapter only if the
    validation metric improves per the recipe's rule, rebuilds memories, writes a report.
    A killed refresh resumes at the step it stopped in; a second one of the same recipe
    exits 9 while the first runs.
    """
    from featurestore.jobs.refresh import load_recipe, run

    store = get_store(ctx)
    result = run(load_recipe(recipe), store, force=force, progress=None if as_json else progress,
                 log=(lambda s: None) if as_json else (lambda s: click.echo(s, err=True)))
    if as_json:
        return emit(result.to_dict())
    if not result.ran:
        return click.echo(result.message)
    click.echo(f"refresh {result.id}: {result.message} ({result.reason})")
    click.echo(f"adapter {result.adapter}, features {result.fingerprint}; report {result.report}/report.png")
    click.echo(table([{"step": k, "seconds": v} for k, v in result.step_seconds.items()]))


@refresh_group.command("status")
@click.argument("recipe", type=click.Path(dir_okay=False))
@json_option
@click.pass_context
def status_cmd(ctx, recipe, as_json):
    """Last run, trigger state, current adapter and any unfinished refresh of RECIPE."""
    from featurestore.jobs.refresh import load_recipe, status

    info = status(load_recipe(recipe), get_store(ctx))
    if as_json:
        return emit(info)
    t = info["trigger"]
    click.echo(f"recipe {info['recipe']}: {info['refreshes']} refresh(es); "
               f"{'running now' if info['running'] else 'not running'}")
    click.echo(f"trigger: {t['added']} labelled item(s) added since the last refresh (needs {t['min_new_labelled']}): "
               f"{'fires' if t['fires'] else 'does not fire'}")
    cur = info["current"]
    click.echo(f"current adapter: {cur.get('adapter') or 'none (frozen backbone)'}, features {cur.get('fingerprint') or '-'}")
    for slot, run in (cur.get("heads") or {}).items():
        click.echo(f"  head {slot}: {run}")
    if info["last"]:
        last = info["last"]
        click.echo(f"last: {last['id']} at {last['finished_at']}: {'promoted' if last['promoted'] else 'kept'} "
                   f"({last['reason']})")
    if info["pending"]:
        click.echo(f"unfinished refresh {info['pending']['id']}: done {info['pending']['steps_done']}; "
                   "the next `fs refresh` resumes it")


def register(cli: click.Group) -> None:
    cli.add_command(refresh_group)
