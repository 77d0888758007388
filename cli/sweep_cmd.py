"""`fs sweep`, `fs sweep show ID`, `fs sweep list`: hyperparameter sweeps of a head from the cache."""
from __future__ import annotations

import click

from featurestore.config import SEED_MAX, parse_params
from featurestore.errors import ConfigError
from featurestore.reader import parse_feature_refs
from ._common import emit, get_store, json_option, params_option, progress, ray_config, ray_options, table, threads_option


@click.group("sweep", invoke_without_command=True)
@click.option("--method", help="Head name (fs heads list).")
@click.option("--dataset", help="Registered dataset name.")
@click.option("--features", metavar="[MOD=]NAME_OR_FINGERPRINT[,...]",
              help="Cached features per modality, as for train-head: a backbone name (its fingerprint that covers "
                   "the dataset) or a fingerprint, e.g. text=minilm.")
@click.option("--grid", "grid", multiple=True, metavar="'P=V1,V2 Q=...'",
              help="A grid: space-separated param=comma-separated values (the cartesian product).")
@click.option("--random", "n_random", type=int, default=0, help="Draw N random configurations from --space.")
@click.option("--optuna", "n_optuna", type=int, default=0, help="Run N Optuna TPE trials over --space.")
@click.option("--space", "space_file", type=click.Path(dir_okay=False),
              help='JSON: per param a list of choices or {"low", "high", "log": true, "type": "float|int"}.')
@click.option("--storage", default="", help="Optuna storage URL (default: a journal file in the sweep folder).")
@params_option
@click.option("--metric", default="", help="Validation metric ranking the configurations (default: primary).")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help="Seed of the heads, validation carving, sampling.")
@click.option("--target", default=None, type=click.Choice(["label", "labels", "va"]), metavar="label|labels|va",
              help="label: single-label (binary with two classes); labels: multi-label; va: regression. Default: the one target "
                   "the dataset has (fs datasets show); an error lists them when it has several.")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Fraction of train carved as validation when the dataset has no validation split.")
@click.option("--cv", default="", metavar="group|fold|K",
              help="Rank configurations by their cross-validated validation score: each trains once per fold "
                   "(group: leave one manifest group out; fold: the manifest's official folds; K: stratified folds) over every item of the dataset, "
                   "validation carved inside each training fold; the held-out folds score only the best, at "
                   "--export-best / --show-test.")
@click.option("--limit", default=None, type=click.IntRange(1), metavar="N",
              help="Train at most N new configurations in this invocation (default: all that are left).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(0), help="Rows of the leaderboard shown.")
@click.option("--export-best", "export_path", type=click.Path(dir_okay=False),
              help="Write the best configuration as `fs train-head` takes it (JSON + command line).")
@ray_options
@threads_option
@json_option
@click.pass_context
def sweep_group(ctx, method, dataset, features, grid, n_random, n_optuna, space_file, storage, params, metric, seed,
                target, val_fraction, cv, limit, top, export_path, engine, address, workers, cpus_per_worker,
                gpus_per_worker, as_json):
    """Train many configurations of a head at once from the cache, resumably.

    \b
    fs sweep --method mlp --dataset D --features text=minilm --grid 'lr=1e-4,1e-3 dropout=0.1,0.3'
    fs sweep --method mlp --dataset D --features text=minilm --random 32 --space space.json
    fs sweep --method mlp --dataset D --features text=minilm --optuna 50 --space space.json
    fs sweep --method mlp --dataset D --features text=minilm --grid 'lr=1e-4,1e-3' --cv group
    fs sweep list;  fs sweep show ID

    Rerunning the same command continues the same sweep; finished configurations are not rerun.
    With --engine ray the configurations train as Ray tasks (same results, same folder; docs/ray.md).
    """
    if ctx.invoked_subcommand is not None:
        return
    from featurestore.jobs.sweep import SweepConfig, export_best, load_space, parse_grid, run

    missing = [f"--{n}" for n, v in (("method", method), ("dataset", dataset), ("features", features)) if not v]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or use a subcommand: list, show)")
    if grid and (n_random or n_optuna):
        raise ConfigError("give exactly one of --grid, --random N, --optuna N")
    if space_file and not (n_random or n_optuna):
        raise ConfigError("--space goes with --random N or --optuna N")
    parsed_grid = parse_grid(list(grid)) if grid else {}
    space = load_space(space_file) if space_file else {}
    store = get_store(ctx)
    config = SweepConfig(method=method, dataset=dataset, features=parse_feature_refs(features, store), grid=parsed_grid,
                         random=n_random, optuna=n_optuna, space=space, params=parse_params(params), metric=metric,
                         seed=seed, target=target or "", val_fraction=val_fraction, storage=storage, limit=limit or 0,
                         cv=cv)
    ray = ray_config(engine, address, workers, cpus_per_worker, gpus_per_worker)
    say = None if as_json else lambda s: click.echo(s, err=True)  # noqa: E731
    bar = None if as_json else progress
    if ray is not None:
        if cv:
            raise ConfigError("--cv sweeps run locally for now; leave out --engine ray or --cv")
        from featurestore.jobs.ray_sweep import run as run_ray

        result = run_ray(config, store, ray, log=say, progress=bar)
    else:
        result = run(config, store, log=say, progress=bar)
    exported = export_best(result.definition, result.table, export_path, store=store) \
        if export_path and result.table.height else None
    if as_json:
        return emit({**result.to_dict(top), "exported": exported})
    if config.cv:
        click.echo(f"ranked by the mean validation {result.metric} over the --cv {config.cv} folds")
    click.echo(f"sweep {result.sweep_id}: {result.table.height} configuration(s), {result.trained_now} trained now, "
               f"{result.reused} already finished, {result.seconds:.1f}s; folder {result.folder}")
    click.echo(table(result.leaderboard(top)))
    _say_exported(exported, export_path)


def _say_exported(exported: dict | None, export_path: str | None) -> None:
    if not exported:
        return
    if "eval" in exported:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in sorted(exported["eval"]["metrics"].items()))
        click.echo(f"best configuration on {exported['eval']['split']} (computed once): {scores}")
    if export_path:
        click.echo(f"best configuration written to {export_path}:\n  {exported['command']}")


@sweep_group.command("show")
@click.argument("sweep_id", metavar="ID")
@click.option("--top", default=20, show_default=True, type=click.IntRange(0))
@click.option("--export-best", "export_path", type=click.Path(dir_okay=False),
              help="Write the best configuration (and its test metrics, computed once) to this JSON file. "
                   "The test metrics come from training that configuration again (as long as one fit, "
                   "or K under --cv), as sweeps keep no weights.")
@click.option("--show-test", is_flag=True, help="Also evaluate the best configuration on the test split, once "
                                                 "(training it again, as --export-best).")
@json_option
@click.pass_context
def sweep_show_cmd(ctx, sweep_id, top, export_path, show_test, as_json):
    """A sweep's definition and leaderboard (validation metrics only)."""
    from featurestore.jobs.sweep import export_best, leaderboard, show

    store = get_store(ctx)
    definition, results = show(store, sweep_id)
    board = leaderboard(results, definition, top)
    exported = export_best(definition, results, export_path, store=store) \
        if (export_path or show_test) and results.height else None
    if as_json:
        return emit({"sweep": sweep_id, "definition": definition, "n_configs": results.height,
                     "leaderboard": board, "results": results.to_dicts(), "exported": exported})
    click.echo(f"sweep {sweep_id}: {definition['method']} on {definition['dataset']} ({definition['mode']}), "
               f"{results.height} configuration(s), ranked by val {definition['metric']}"
               + (f" (mean over --cv {definition['cv']} folds)" if definition.get("cv") else ""))
    click.echo(table(board))
    _say_exported(exported, export_path)


@sweep_group.command("list")
@json_option
@click.pass_context
def sweep_list_cmd(ctx, as_json):
    """Sweeps in the store with their best configuration."""
    from featurestore.jobs.sweep import list_sweeps

    rows = list_sweeps(get_store(ctx))
    if as_json:
        return emit({"sweeps": rows})
    click.echo(table(rows, ["sweep", "method", "dataset", "mode", "configs", "metric", "best_val"]))


def register(cli: click.Group) -> None:
    cli.add_command(sweep_group)
