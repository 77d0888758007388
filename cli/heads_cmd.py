"""`fs train-head`, `fs runs`, `fs eval`, `fs heads list|show`: heads trained from the cache."""
from __future__ import annotations

import click

from featurestore.config import SEED_MAX, describe, parse_params
from featurestore.errors import ConfigError
from featurestore.reader import parse_feature_refs
from ._common import emit, get_store, json_option, params_option, threads_option, progress, table


def _metric_rows(metrics: dict) -> list[dict]:
    return [{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, (list, dict))]


@click.command("train-head")
@click.option("--method", required=True, help="Head name (fs heads list).")
@click.option("--dataset", required=True, help="Registered dataset name.")
@click.option("--features", required=True, metavar="[MOD=]NAME_OR_FINGERPRINT[,...]",
              help="Cached features per modality: a backbone name (its fingerprint that covers the dataset) or a "
                   "fingerprint, e.g. text=minilm; the modality may be left out when the name has one.")
@params_option
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX), help="Seed of the head and of validation carving.")
@click.option("--target", default=None, type=click.Choice(["label", "labels", "va"]), metavar="label|labels|va",
              help="label: single-label (binary with two classes); labels: multi-label; va: regression. Default: the one target "
                   "the dataset has (fs datasets show); an error lists them when it has several.")
@click.option("--val-fraction", default=0.1, show_default=True, type=float,
              help="Fraction of train carved as validation when the dataset has no validation split.")
@click.option("--run-id", default="", help="Name of the run folder (default: generated).")
@click.option("--eval-split", default="test", show_default=True, help="Split evaluated once after training.")
@click.option("--memory", default="", help="Replay memory name (fs memory list), for heads that read one (concept).")
@click.option("--cv", default="", metavar="group|fold|K",
              help="Cross-validate over every item instead: group (leave one manifest group out, e.g. IEMOCAP "
                   "sessions), fold (one official fold out: the manifest's fold column, e.g. DFEW, MAFW) or K "
                   "stratified folds; validation is carved inside each training fold.")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Train with seeds --seed .. --seed+N-1 and report each metric's mean and std over them "
                   "(with --cv: of each seed's mean over folds).")
@threads_option
@json_option
@click.pass_context
def train_head_cmd(ctx, method, dataset, features, params, seed, target, val_fraction, run_id, eval_split, memory, cv,
                   seeds, as_json):
    """Train a head on the train split, early-stop on validation, evaluate on test once, save the run."""
    from featurestore.jobs.train_head import TrainHeadConfig, run

    store = get_store(ctx)
    params = parse_params(params)
    if memory:
        from featurestore.heads import get as get_head

        if "memory" not in get_head(method).param_names():  # else: "unknown parameter 'memory'", not typed as such
            raise ConfigError(f"--memory is for heads that read a replay memory (concept); head {method!r} reads none")
        params["memory"] = memory
    if "memory" in params:
        from featurestore.memory import memory_folder

        params["memory"] = str(memory_folder(store, params["memory"]).resolve())
    config = TrainHeadConfig(method=method, dataset=dataset, features=parse_feature_refs(features, store), params=params,
                             target=target or "", seed=seed, val_fraction=val_fraction, run_id=run_id,
                             eval_split=eval_split, cv=cv, seeds=seeds)
    result = run(config, store, log=None if as_json else lambda s: click.echo(s, err=True),
                 **({} if as_json else {"progress": progress}))
    if as_json:
        extra = ({"seeds": result.seed_runs, "std": result.std} if seeds > 1 else
                 {"folds": result.folds, "std": result.std} if cv else {})
        return emit({**result.to_dict(), **extra})
    if seeds > 1:
        return click.echo(_seed_table(result, cv))
    if cv:
        return click.echo(_fold_table(result))
    click.echo(f"run {result.run_id} ({result.method} on {result.dataset}, {result.kind}) in {result.seconds:.1f}s")
    click.echo(table(_metric_rows(result.to_dict()["metrics"])))
    if "confusion_matrix" in result.metrics:
        click.echo(f"confusion matrix: {result.folder / 'confusion.png'}")


_PAPER_METRICS = ("uar", "war", "weighted_f1", "macro_f1", "acc2", "acc", "micro_f1", "ccc")


def _seed_table(result, cv: str) -> str:
    """One row per seed and a mean +- std row (population std over the seeds)."""
    keys = [k for k in _PAPER_METRICS if k in result.metrics]
    rows = [{"seed": r["seed"], **{k: r.get(k) for k in keys}} for r in result.seed_runs]
    rows.append({"seed": "mean", **{k: f"{result.metrics[k]:.4f} +- {result.std[k]:.4f}" for k in keys}})
    what = f"cv {cv}, per seed the mean over folds" if cv else "test"
    return f"run {result.run_id} ({result.method} on {result.dataset}, {result.kind}, {len(result.seed_runs)} seeds, " \
           f"{what}) in {result.seconds:.1f}s\n" + table(rows)


def _fold_table(result) -> str:
    """One row per fold and a mean +- std row, with the metrics the papers report."""
    keys = [k for k in _PAPER_METRICS if k in result.metrics]
    rows = [{"fold": f["fold"], **({"held_out": f["held_out"]} if f.get("held_out") else {}),
             "n_test": f["n_test"], **{k: f[k] for k in keys}} for f in result.folds]
    rows.append({"fold": "mean", **({"held_out": ""} if result.folds[0].get("held_out") else {}),
                 "n_test": sum(f["n_test"] for f in result.folds),
                 **{k: f"{result.metrics[k]:.4f} +- {result.std[k]:.4f}" for k in keys}})
    return f"run {result.run_id} ({result.method} on {result.dataset}, {result.kind}, cv) in " \
           f"{result.seconds:.1f}s\n" + table(rows)


@click.command("runs")
@click.option("--folds", is_flag=True, help="Also list each fold of a cross-validated run (RUN/fold-<k>) and each "
                                           "seed of a --seeds run (RUN/seed-<s>).")
@json_option
@click.pass_context
def runs_cmd(ctx, folds, as_json):
    """List saved runs; a run whose feature fingerprint has since been superseded is marked stale.

    A cross-validated run (train-head --cv) shows the mean and std of its folds' held-out scores;
    its folds are RUN/fold-<k> (listed with --folds, evaluated with fs eval RUN/fold-<k>). A --seeds
    run shows the mean and std over its seeds; --folds lists each seed as RUN/seed-<s>."""
    from featurestore.jobs.train_head import list_runs

    rows = list_runs(get_store(ctx), folds=folds)
    if as_json:
        return emit({"runs": rows})
    columns = ["run", "method", "dataset", "target", "metric", "score", "stale", "features"]
    if any(r.get("cv") for r in rows):
        columns[6:6] = ["std", "cv"]
    click.echo(table(rows, columns))


@click.command("eval")
@click.argument("run_id", metavar="RUN")
@click.option("--dataset", required=True, help="Dataset to evaluate on (its labels must be in the run's set).")
@click.option("--split", default="test", show_default=True, help="Split of --dataset to evaluate on.")
@json_option
@click.pass_context
def eval_cmd(ctx, run_id, dataset, split, as_json):
    """Evaluate a saved run on a dataset split, with the exact features it was trained on.

    RUN may be a cross-validated run: on the dataset it cross-validated, each item is predicted by
    the fold head that held it out (out-of-fold); on another dataset, every fold head (mean +- std)
    and their ensemble. RUN/fold-<k> evaluates one fold's head (on the cross-validated dataset, only
    the items that fold held out)."""
    from featurestore.jobs.train_head import evaluate

    result = evaluate(run_id, dataset, get_store(ctx), split=split)
    if as_json:
        return emit(result)
    mode = f", {result['mode']}" if result.get("mode") else ""
    click.echo(f"run {result.get('run', run_id)} on {dataset}/{split} ({result['n']} items{mode})")
    if result["stale"]:
        newer = ", ".join(f"{mod} by {fp}" for mod, fp in result["stale"].items())
        click.echo(f"stale: its features were superseded ({newer})")
    if result.get("per_fold"):
        keys = [k for k, v in result["metrics"].items() if isinstance(v, (int, float))]
        rows = [{"metric": k, "mean": result["metrics"][k], "std": result["std"][k],
                 **({"ensemble": result["ensemble"].get(k)} if result.get("ensemble") else {})} for k in keys]
        return click.echo(table(rows))
    click.echo(table(_metric_rows(result["metrics"])))


@click.group("heads")
def heads_group():
    """Registered heads and their parameters."""


@heads_group.command("list")
@json_option
def heads_list_cmd(as_json):
    """List registered heads."""
    import featurestore.heads as heads

    rows = []
    for name in heads.names():
        cls = heads.get(name)
        rows.append({"head": name, "targets": ",".join(sorted(cls.supports)), "description": cls.description})
    if as_json:
        return emit({"heads": rows})
    click.echo(table(rows))


@heads_group.command("show")
@click.argument("name")
@json_option
def heads_show_cmd(name, as_json):
    """A head's parameters, with defaults and help."""
    import featurestore.heads as heads

    cls = heads.get(name)
    rows = [{"param": n, "type": t, "default": d, "help": h} for n, t, d, h in describe(cls.Config)]
    if as_json:
        return emit({"head": name, "description": cls.description, "targets": sorted(cls.supports), "params": rows})
    click.echo(f"{name}: {cls.description}\ntargets: {', '.join(sorted(cls.supports))}\n")
    click.echo(table(rows))


def register(cli: click.Group) -> None:
    for cmd in (train_head_cmd, runs_cmd, eval_cmd, heads_group):
        cli.add_command(cmd)
