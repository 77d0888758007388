"""`fs predict RUN (--text T | --image F | --audio F | --batch FILE) [--json]`: score new inputs."""
from __future__ import annotations

import click

from featurestore.errors import ConfigError
from ._common import emit, get_store, json_option


@click.command("predict")
@click.argument("run_id", metavar="RUN")
@click.option("--text", default=None, help="A text to score.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None, help="An image file to score.")
@click.option("--audio", type=click.Path(exists=True, dir_okay=False), default=None, help="An audio file to score.")
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False), default=None,
              help="Score every line of FILE: JSONL objects with text / image / audio keys, or one text per line "
                   "in a .txt file.")
@click.option("--device", default="auto", show_default=True, help="Backbone device: auto | cpu | cuda[:N].")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1), help="Scores shown per input.")
@json_option
@click.pass_context
def predict_cmd(ctx, run_id, text, image, audio, batch_file, device, top, as_json):
    """Score new inputs with saved run RUN (an id from `fs runs`, or a prefix only one run has).

    Each input goes through the backbone(s) of the run's feature fingerprints (the cached row when the
    input is already in the store), then the head. Prints the predicted labels with their scores
    (valence and arousal for a VA head). Give --text/--image/--audio together for a multimodal run.
    Exit status 10 when a --batch finished but some lines could not be scored (each says why).
    """
    from featurestore.jobs.predict import read_batch, run

    single = {k: v for k, v in (("text", text), ("image", image), ("audio", audio)) if v is not None}
    if bool(single) == bool(batch_file):
        raise ConfigError("give an input: --text T, --image FILE or --audio FILE, or --batch FILE (not both)")
    inputs = read_batch(batch_file) if batch_file else [single]
    result = run(get_store(ctx), run_id, inputs, device=device)
    if single and "error" in result["results"][0]:  # one input: one error line and a failing status
        raise ConfigError(result["results"][0]["error"])
    if as_json:
        emit(result)
        return ctx.exit(10 if any("error" in r for r in result["results"]) else 0)
    click.echo(f"run {result['run']} ({result['method']} on {result['dataset']}, {_kind(result['kind'])})")
    failed = 0
    for r in result["results"]:
        shown = "; ".join(f"{k} {v!r}" if k == "text" else f"{k} {v}" for k, v in r.get("input", {}).items())
        where = f"line {r['line']}" if "line" in r else shown
        if "error" in r:
            failed += 1
            click.echo(f"{where or 'input'}: error: {r['error']}")
            continue
        click.echo(f"{where}: {_prediction(r)}")
        if "scores" in r:
            ranked = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:top]
            click.echo("  " + "  ".join(f"{c} {p:.3f}" for c, p in ranked))
    if failed:  # as `fs extract`: the job finished, but some inputs could not be scored
        ctx.exit(10)


def _kind(kind: str) -> str:
    return {"single": "single-label", "binary": "binary", "multi": "multi-label", "va": "valence/arousal"}[kind]


def _prediction(r: dict) -> str:
    p = r["prediction"]
    if r["kind"] == "va":
        return ", ".join(f"{d} {p[d]:+.3f}" if p[d] is not None else f"{d} - (no {d} labels in training)"
                         for d in ("valence", "arousal"))
    if r["kind"] == "multi":
        labels = ", ".join(p) if p else "(no label above the threshold)"
        return f"{labels}  (threshold {r['threshold']:.2f})"
    return f"{p} ({r['scores'][p]:.3f})"


def register(cli: click.Group) -> None:
    cli.add_command(predict_cmd)
