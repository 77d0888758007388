"""The papers' protocols: `--cv fold` (official folds), `--cv group` (leave one group out), `--seeds N`."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from sklearn.metrics import balanced_accuracy_score

import featurestore.heads as heads
from featurestore.cli import cli
from featurestore.errors import DatasetError
from featurestore.heads import Targets
from featurestore.jobs import cv as cv_job
from featurestore.jobs.train_head import TrainHeadConfig, run

ROWS = 150
PARAMS = {"epochs": "4"}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fold_cv_holds_out_each_official_fold_in_natural_order():
    folds = np.array([str(1 + i % 10) for i in range(40)], object)  # "10" sorts after "9"
    y = Targets("single", np.arange(40) % 2, ["a", "b"])
    got = cv_job.cv_folds("fold", y, np.full(40, None, object), folds=folds)
    assert len(got) == 10
    for k, (train, held) in enumerate(got):
        assert set(folds[held]) == {str(k + 1)} and str(k + 1) not in set(folds[train])
        assert sorted(np.r_[train, held]) == list(range(40))
    with pytest.raises(DatasetError, match="fold for every item"):
        cv_job.cv_folds("fold", y, np.full(40, None, object), folds=np.array([None] * 40, object))
    with pytest.raises(DatasetError, match="fold for every item"):
        cv_job.cv_folds("fold", y, np.full(40, None, object), folds=None)
    with pytest.raises(DatasetError, match="at least 2"):
        cv_job.cv_folds("fold", y, np.full(40, None, object), folds=np.array(["1"] * 40, object))


@pytest.fixture(scope="module")
def folded_store(tmp_path_factory):
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.jobs.extract import ExtractConfig, run as extract
    from featurestore.store import open_store

    store = open_store(tmp_path_factory.mktemp("protocols"), create=True)
    df = build_demo()
    df = df.with_columns(pl.Series("fold", [str(1 + i % 3) for i in range(len(df))]),
                         pl.Series("group", [f"ses{1 + i % 4}" for i in range(len(df))]))
    add_dataset(store, "demo", df, root=None, source="builtin demo")
    add_dataset(store, "nofold", build_demo(), root=None, source="builtin demo")
    extract(ExtractConfig(dataset="demo", modality="text", backbone="minilm", limit=ROWS), store)
    return store


def test_cv_fold_trains_one_head_per_official_fold(folded_store):
    result = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", cv="fold",
                                 params=PARAMS), folded_store)
    doc = json.loads((result.folder / "metrics.json").read_text())
    lineage = json.loads((result.folder / "lineage.json").read_text())
    assert [f["held_out_folds"] for f in lineage["folds"]] == [["1"], ["2"], ["3"]]
    assert [f["held_out"] for f in doc["folds"]] == ["1", "2", "3"]
    # independently: every fold's saved head, on that fold's items, scores what was reported
    X, y, groups, classes, folds = cv_job.load_all(folded_store, "demo", {"text": "minilm"}, target="label",
                                                   sequences=False, va=False, with_folds=True)
    for k, name in enumerate(["1", "2", "3"]):
        rows = np.flatnonzero(folds == name)
        assert doc["folds"][k]["n_test"] == len(rows)
        head = heads.Head.load(result.folder / f"fold-{k}")
        pred = head.predict(X.take(rows))
        assert doc["folds"][k]["uar"] == pytest.approx(balanced_accuracy_score(y.y[rows], pred))
    uar = [f["uar"] for f in doc["folds"]]
    assert doc["mean"]["uar"] == pytest.approx(np.mean(uar)) and doc["std"]["uar"] == pytest.approx(np.std(uar))


def test_cv_group_is_leave_one_group_out(folded_store):
    result = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", cv="group",
                                 params=PARAMS), folded_store)
    lineage = json.loads((result.folder / "lineage.json").read_text())
    assert [f["held_out_groups"] for f in lineage["folds"]] == [["ses1"], ["ses2"], ["ses3"], ["ses4"]]
    assert [f["held_out"] for f in result.folds] == ["ses1", "ses2", "ses3", "ses4"]


def test_seeds_average_independent_runs_with_their_std(folded_store):
    seeds = [3, 4, 5]
    alone = []
    for s in seeds:  # the reference: each seed trained on its own, as a plain run
        r = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", params=PARAMS, seed=s,
                                run_id=f"alone-{s}"), folded_store)
        alone.append(r.metrics)
    result = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", params=PARAMS, seed=3,
                                 seeds=3, run_id="three"), folded_store)
    doc = json.loads((result.folder / "metrics.json").read_text())
    assert doc["seeds"] == seeds and [r["seed"] for r in doc["runs"]] == seeds
    for metric in ("uar", "war", "macro_f1"):
        values = np.array([m[metric] for m in alone])
        assert [r[metric] for r in doc["runs"]] == pytest.approx(values.tolist())
        assert doc["mean"][metric] == pytest.approx(values.mean())
        assert doc["std"][metric] == pytest.approx(values.std(ddof=0))
    assert len({round(m["uar"], 9) for m in alone}) > 1 or len({round(m["war"], 9) for m in alone}) > 1
    for s in seeds:
        assert (result.folder / f"seed-{s}" / "model.safetensors").is_file()
        assert json.loads((result.folder / f"seed-{s}" / "lineage.json").read_text())["seed"] == s
    assert not list(folded_store.heads_dir().glob(".*.tmp"))


def test_seeds_with_cv_fold_average_the_fold_means(folded_store):
    result = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", params=PARAMS,
                                 cv="fold", seeds=2, run_id="cvseeds"), folded_store)
    doc = json.loads((result.folder / "metrics.json").read_text())
    per_seed = [json.loads((result.folder / f"seed-{s}" / "metrics.json").read_text())["mean"]["uar"] for s in (0, 1)]
    assert [r["uar"] for r in doc["runs"]] == pytest.approx(per_seed)
    assert doc["mean"]["uar"] == pytest.approx(np.mean(per_seed)) and doc["std"]["uar"] == pytest.approx(np.std(per_seed))
    assert all((result.folder / f"seed-{s}" / f"fold-{k}" / "model.safetensors").is_file()
               for s in (0, 1) for k in range(3))
    # listed and evaluated like the seeds of any run: RUN/seed-<s> is a cross-validated run
    runner, root = CliRunner(), str(folded_store.root)
    rows = {r["run"]: r for r in json.loads(runner.invoke(cli, ["--store", root, "runs", "--folds", "--json"],
                                                          catch_exceptions=False).output)["runs"]}
    assert rows["cvseeds"]["cv"] == "2 seeds, cv fold" and rows["cvseeds"]["score"] == pytest.approx(np.mean(per_seed))
    assert [rows[f"cvseeds/seed-{s}"]["score"] for s in (0, 1)] == pytest.approx(per_seed)
    one = runner.invoke(cli, ["--store", root, "eval", "cvseeds/seed-1", "--dataset", "demo", "--json"])
    assert one.exit_code == 0, one.output
    assert json.loads(one.output)["cv"] == "fold" and json.loads(one.output)["folds"] == 3
    whole = runner.invoke(cli, ["--store", root, "eval", "cvseeds", "--dataset", "demo"])
    assert whole.exit_code == 2 and "cvseeds/seed-0, cvseeds/seed-1" in whole.output and "known" not in whole.output


def test_cli_seeds_table_and_fold_errors(folded_store):
    runner = CliRunner()
    base = ["--store", str(folded_store.root), "train-head", "--method", "linear", "--features", "text=minilm", "--target", "label",
            "-p", "epochs=2"]
    out = runner.invoke(cli, base + ["--dataset", "demo", "--seeds", "2"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if line.strip()]
    assert any(line.startswith("mean") and "+-" in line for line in lines)
    assert sum(line.split()[0] in ("0", "1") for line in lines) == 2
    js = runner.invoke(cli, base + ["--dataset", "demo", "--seeds", "2", "--json"], catch_exceptions=False)
    doc = json.loads(js.output)
    assert [r["seed"] for r in doc["seeds"]] == [0, 1] and "uar" in doc["std"]
    bad = runner.invoke(cli, base + ["--dataset", "demo", "--seeds", "0"])
    assert bad.exit_code == 2
    nofold = runner.invoke(cli, base + ["--dataset", "nofold", "--cv", "fold"])
    assert nofold.exit_code == 5 and "fold for every item" in nofold.output and nofold.output.count("\n") == 1


def test_iemocap_layout_leave_one_session_out_end_to_end(tmp_path):
    """An IEMOCAP replica registered by its layout, its transcripts encoded, 4 classes, one session out at a time."""
    from test_layouts import _iemocap

    from featurestore.datasets.layouts import add_layout_dataset
    from featurestore.jobs.extract import ExtractConfig, run as extract
    from featurestore.store import open_store

    words = {"neu": ["the table is there", "it is on the list", "we will meet at noon"],
             "exc": ["this is wonderful news", "i love it so much", "what a great day"],
             "sad": ["i miss her terribly", "everything is lost", "i feel so alone"],
             "ang": ["get out of my way", "i hate this", "you ruined everything"],
             "fru": ["this never works", "why is it so hard", "i give up on this"]}
    data = {}
    for ses in range(1, 6):
        turns = []
        for k, (code, texts) in enumerate(words.items()):
            for j, text in enumerate(texts):
                turns.append((f"Ses0{ses}F_impro0{k}_F00{j}", code, 3.0, 3.0, 3.0, [code.title()], f"{text} {ses}"))
        data[ses] = turns
    _iemocap(tmp_path / "IEMOCAP", data, missing="")
    store = open_store(tmp_path / "store", create=True)
    ds = add_layout_dataset(store, "iemo", "iemocap", tmp_path / "IEMOCAP", options={"classes": "4"})
    assert ds.info["layout"]["classes"] == {"anger": 15, "happiness": 15, "neutral": 15, "sadness": 15}
    extract(ExtractConfig(dataset="iemo", modality="text", backbone="minilm"), store)
    result = run(TrainHeadConfig(method="linear", dataset="iemo", features={"text": "minilm"}, target="label", cv="group",
                                 params=PARAMS), store)
    assert [f["held_out"] for f in result.folds] == [f"Session{s}" for s in range(1, 6)]
    assert [f["n_test"] for f in result.folds] == [12] * 5  # frustration has no 4-class label
    assert result.metrics["uar"] == pytest.approx(np.mean([f["uar"] for f in result.folds]))


def test_seeds_runs_are_listed_with_their_std_and_each_seed_evaluates(folded_store):
    result = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", params=PARAMS,
                                 seed=7, seeds=2, run_id="twoseeds"), folded_store)
    doc = json.loads((result.folder / "metrics.json").read_text())
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["--store", str(folded_store.root), "runs", "--folds", "--json"],
                                      catch_exceptions=False).output)["runs"]
    rows = {r["run"]: r for r in listed if r["run"].startswith("twoseeds")}
    assert set(rows) == {"twoseeds", "twoseeds/seed-7", "twoseeds/seed-8"}
    per_seed = [json.loads((result.folder / f"seed-{s}" / "metrics.json").read_text())["test"]["uar"] for s in (7, 8)]
    assert rows["twoseeds"]["metric"] == "uar"
    assert rows["twoseeds"]["score"] == pytest.approx(np.mean(per_seed))
    assert rows["twoseeds"]["std"] == pytest.approx(np.std(per_seed)) and rows["twoseeds"]["cv"] == "2 seeds"
    assert [rows[f"twoseeds/seed-{s}"]["score"] for s in (7, 8)] == pytest.approx(per_seed)
    assert doc["mean"]["uar"] == pytest.approx(np.mean(per_seed))
    # one seed is a whole run: fs eval scores it on the test split as its own training reported
    out = runner.invoke(cli, ["--store", str(folded_store.root), "eval", "twoseeds/seed-8", "--dataset", "demo", "--json"],
                        catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["metrics"]["uar"] == pytest.approx(per_seed[1])
    bad = runner.invoke(cli, ["--store", str(folded_store.root), "eval", "twoseeds/seed-9", "--dataset", "demo"])
    assert bad.exit_code != 0 and "twoseeds/seed-7" in bad.output and "Traceback" not in bad.output
