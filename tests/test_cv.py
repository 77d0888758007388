"""`fs train-head --cv group | K`: the folds, the validation carved inside each training fold, the run."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import ConfigError, DatasetError
from featurestore.heads import Targets
from featurestore.jobs import cv as cv_job
from featurestore.jobs.train_head import TrainHeadConfig, run

ROWS = 150
GROUPS = ("ses1", "ses2", "ses3")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def test_group_folds_hold_out_one_group_each_and_are_disjoint():
    groups = np.array([GROUPS[i % 3] for i in range(30)], object)
    y = Targets("single", np.arange(30) % 2, ["a", "b"])
    folds = cv_job.cv_folds("group", y, groups)
    assert len(folds) == 3
    for (train, held), name in zip(folds, sorted(GROUPS)):
        assert set(groups[held]) == {name} and name not in set(groups[train])
        assert sorted(np.r_[train, held]) == list(range(30))
    assert sorted(np.concatenate([h for _, h in folds])) == list(range(30))
    with pytest.raises(DatasetError, match="group"):
        cv_job.cv_folds("group", y, np.array([None] * 30, object))


def test_k_folds_are_stratified_seeded_and_partition_the_items():
    y = Targets("single", np.r_[np.zeros(50), np.ones(20), np.full(7, 2)].astype(np.int64), ["a", "b", "c"])
    folds = cv_job.cv_folds(5, y, np.full(77, None, object), seed=3)
    held = [h for _, h in folds]
    assert sorted(np.concatenate(held)) == list(range(77))
    for c in range(3):
        counts = [int((y.y[h] == c).sum()) for h in held]
        assert max(counts) - min(counts) <= 1, (c, counts)
    again = cv_job.cv_folds("5", y, np.full(77, None, object), seed=3)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = cv_job.cv_folds(5, y, np.full(77, None, object), seed=4)
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


@pytest.mark.parametrize("bad", ["1", "0", "groups", "-3", "2.5"])
def test_bad_cv_values_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="--cv") as err:
        TrainHeadConfig(method="linear", dataset="demo", cv=bad)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def grouped_store(tmp_path_factory):
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.store import open_store
    from featurestore.jobs.extract import ExtractConfig, run as extract

    store = open_store(tmp_path_factory.mktemp("cvstore"), create=True)
    df = build_demo()
    df = df.with_columns(pl.Series("group", [GROUPS[i % 3] for i in range(len(df))]))
    add_dataset(store, "demo", df, root=None, source="builtin demo")
    extract(ExtractConfig(dataset="demo", modality="text", backbone="minilm", limit=ROWS), store)
    return store


def test_leave_one_group_out_never_validates_on_the_held_out_group(grouped_store, monkeypatch):
    seen = []
    carve = cv_job.carve_validation

    def spy(n, *, fraction, seed, groups=None):
        tr, va, record = carve(n, fraction=fraction, seed=seed, groups=groups)
        seen.append((set(groups), set(groups[va])))
        return tr, va, record

    monkeypatch.setattr(cv_job, "carve_validation", spy)
    result = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, cv="group", target="label",
                                 params={"epochs": "3"}), grouped_store)
    assert len(seen) == 3
    doc = json.loads((result.folder / "metrics.json").read_text())
    lineage = json.loads((result.folder / "lineage.json").read_text())
    for (offered, validated), fold in zip(seen, lineage["folds"]):
        (held,) = fold["held_out_groups"]
        assert held not in offered and validated and held not in validated
    assert [f["n_test"] for f in doc["folds"]] and sum(f["n_test"] for f in doc["folds"]) == lineage["n_items"]
    uar = [f["uar"] for f in doc["folds"]]
    assert doc["mean"]["uar"] == pytest.approx(np.mean(uar)) and doc["std"]["uar"] == pytest.approx(np.std(uar))
    assert {"war", "weighted_f1", "precision", "recall", "micro_f1"} <= set(doc["mean"])
    assert all((result.folder / f"fold-{k}" / "model.safetensors").is_file() for k in range(3))


def test_cli_prints_a_fold_table(grouped_store):
    out = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "train-head", "--method", "linear",
                                   "--dataset", "demo", "--features", "text=minilm", "--target", "label", "--cv", "3", "-p", "epochs=2"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert any(line.startswith("mean") and "+-" in line for line in lines)
    assert sum(line.split()[0] in ("0", "1", "2") for line in lines if line.strip()) == 3
