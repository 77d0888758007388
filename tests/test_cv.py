"""`fs train-head --cv group | K`: the folds, the validation carved inside each training fold, the run."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.errors import ConfigError, DatasetError
from featurestore.heads import Features, Targets
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


@pytest.mark.filterwarnings("ignore:The least populated class")  # scikit-learn on 3 items of a class, K=4
@pytest.mark.parametrize("counts,k", [((7, 8, 9), 5), ((7, 8, 9), 4), ((3, 3, 3, 4), 4)])
def test_k_folds_are_as_even_as_scikit_learns_stratified_k_fold(counts, k):
    """Fold sizes as scikit-learn's StratifiedKFold makes them (they differ by at most one item), and each
    class spread within one item over the folds, for class sizes that are not multiples of K."""
    from sklearn.model_selection import StratifiedKFold

    y = Targets("single", np.repeat(np.arange(len(counts)), counts), [str(c) for c in range(len(counts))])
    ours = cv_job.cv_folds(k, y, np.full(len(y), None, object), seed=0)
    theirs = StratifiedKFold(k, shuffle=True, random_state=0).split(np.zeros(len(y)), y.y)
    assert sorted(len(h) for _, h in ours) == sorted(len(h) for _, h in theirs)
    for c in range(len(counts)):
        per_fold = [int((y.y[h] == c).sum()) for _, h in ours]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)


@pytest.mark.parametrize("cv", ["group", 4])
def test_fold_rows_carve_validation_inside_the_training_folds_without_sharing_a_group(cv):
    """Against scikit-learn's LeaveOneGroupOut for --cv group: the held-out rows are its test rows; in every
    fold (group or K) the training and validation rows together are exactly the rows not held out, the
    three parts are disjoint, validation shares no group with training, and every item is held out once."""
    from sklearn.model_selection import LeaveOneGroupOut

    n = 120
    rng = np.random.default_rng(0)
    groups = np.array([f"spk{i % 8}" for i in rng.permutation(n)], object)
    y = Targets("single", rng.integers(0, 3, n), ["a", "b", "c"])
    X = Features({"text": rng.normal(size=(n, 4)).astype(np.float32)}, {"text": np.ones(n, bool)})
    cs = cv_job.CVSet(X, y, groups, y.classes, np.array([f"i{i}" for i in range(n)], object),
                      np.full(n, "train", object), {}, "", np.full(n, None, object))
    folds = cv_job.fold_rows(cs, cv, seed=1, val_fraction=0.25)
    if cv == "group":
        held = [sorted(h) for _, h in LeaveOneGroupOut().split(np.zeros(n), groups=groups)]
        assert [sorted(f["held"]) for f in folds] == held
    for f in folds:
        tr, va, ho = set(f["train"].tolist()), set(f["val"].tolist()), set(f["held"].tolist())
        assert tr | va == set(range(n)) - ho and not tr & va and not (tr | va) & ho, f["fold"]
        assert va and not set(groups[f["val"]]) & set(groups[f["train"]])
        if cv == "group":
            assert not set(groups[f["train"]]) & set(groups[f["held"]]) and not set(groups[f["val"]]) & set(groups[f["held"]])
    assert sorted(np.concatenate([f["held"] for f in folds])) == list(range(n))


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
    assert not [w for w in result.warnings if "manifest groups" in w]
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
    # K folds are stratified by class, so the 3 speaker groups each have items in all 3 held-out folds
    assert "3 of 3 manifest groups" in out.output and "--cv group holds out whole groups" in out.output


def test_group_leak_warning_counts_groups_held_out_in_more_than_one_fold():
    folds = [{"held_out_groups": ["a", "b"]}, {"held_out_groups": ["b", "c"]}, {"held_out_groups": ["d"]}]
    assert "1 of 4 manifest groups" in cv_job.group_leak_warning(folds, 3)
    assert cv_job.group_leak_warning([{"held_out_groups": ["a"]}, {"held_out_groups": ["b"]}], 2) == ""
    assert cv_job.group_leak_warning(folds, "group") == "" and cv_job.group_leak_warning(folds, "fold") == ""
    assert cv_job.group_leak_warning([{"held_out_groups": []}, {"held_out_groups": []}], 2) == ""  # no groups


# ---- fs sweep --cv -----------------------------------------------------------------------
def test_cv_sweep_ranks_by_the_mean_validation_score_over_folds(grouped_store):
    """Each configuration's `val_uar` is the mean of the per-fold validation UARs that `train-head --cv`
    records for the same configuration (two separate code paths), and the held-out folds score only
    the exported best, equal to train-head --cv's held-out mean."""
    from featurestore.jobs.sweep import SweepConfig, export_best, run as sweep

    res = sweep(SweepConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", cv="group",
                            grid={"lr": ["1e-3", "1e-2"]}, params={"epochs": "3"}), grouped_store)
    assert res.definition["cv"] == "group" and res.definition["eval_split"] == "held-out folds"
    assert not [c for c in res.table.columns if c.startswith("test")]
    rows = {r["lr"]: r for r in res.table.to_dicts()}
    for lr, row in rows.items():
        ref = run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", cv="group",
                                  params={"epochs": "3", "lr": str(lr)}), grouped_store)
        per_fold = [f["val_primary"] for f in ref.folds]
        assert row["folds"] == 3
        assert row["val_uar"] == pytest.approx(np.mean(per_fold), abs=1e-9)
        assert row["val_uar_std"] == pytest.approx(np.std(per_fold), abs=1e-9)
        rows[lr] = (row, ref)
    best_lr = max(rows, key=lambda k: rows[k][0]["val_uar"])
    doc = export_best(res.definition, res.table, store=grouped_store)
    assert doc["params"]["lr"] == best_lr and "--cv group" in doc["command"]
    assert doc["eval"]["split"] == "held-out folds"
    assert doc["eval"]["metrics"]["uar"] == pytest.approx(rows[best_lr][1].metrics["uar"], abs=1e-9)
    plain = sweep(SweepConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label",
                              grid={"lr": ["1e-3", "1e-2"]}, params={"epochs": "3"}), grouped_store)
    assert plain.sweep_id != res.sweep_id  # a cv sweep is its own sweep, not a continuation


def test_cli_sweep_cv_prints_the_fold_std(grouped_store):
    out = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "sweep", "--method", "linear", "--dataset",
                                   "demo", "--features", "text=minilm", "--target", "label", "--grid", "lr=1e-3,3e-3", "-p", "epochs=2",
                                   "--cv", "3"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "val_uar_std" in out.output and "--cv 3" in out.output
    assert "3 of 3 manifest groups" in out.output
    bad = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "sweep", "--method", "linear", "--dataset",
                                   "demo", "--features", "text=minilm", "--target", "label", "--grid", "lr=1e-3", "--cv", "one"])
    assert bad.exit_code != 0 and "--cv" in bad.output and "Traceback" not in bad.output


# ---- fs runs / fs eval of a cross-validated run ---------------------------------------------
@pytest.fixture(scope="module")
def cv_run(grouped_store):
    return run(TrainHeadConfig(method="linear", dataset="demo", features={"text": "minilm"}, target="label", cv="group",
                               params={"epochs": "3"}, run_id="cvrun"), grouped_store)


def test_runs_lists_a_cv_run_with_its_fold_mean_and_its_folds(grouped_store, cv_run):
    from featurestore.jobs.train_head import list_runs

    rows = {r["run"]: r for r in list_runs(grouped_store)}
    assert rows["cvrun"]["score"] == pytest.approx(np.mean([f["uar"] for f in cv_run.folds]))
    assert rows["cvrun"]["std"] == pytest.approx(np.std([f["uar"] for f in cv_run.folds]))
    assert "cvrun/fold-0" not in rows
    rows = {r["run"]: r for r in list_runs(grouped_store, folds=True)}
    assert [rows[f"cvrun/fold-{k}"]["score"] for k in range(3)] == [f["uar"] for f in cv_run.folds]
    out = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "runs", "--folds"], catch_exceptions=False)
    assert out.exit_code == 0 and "cvrun/fold-2" in out.output and "group (3 folds)" in out.output


def _balanced_accuracy(y, pred):
    from sklearn.metrics import balanced_accuracy_score

    return balanced_accuracy_score(y, pred)


def test_eval_of_a_cv_run_predicts_each_item_with_the_fold_that_held_it_out(grouped_store, cv_run):
    """Out-of-fold on the cross-validated dataset: item i (group GROUPS[i % 3]) is predicted by the fold
    whose held-out group is its own, checked against the fold heads loaded by hand and scikit-learn."""
    import featurestore.heads as heads
    from featurestore.heads._data import usable
    from featurestore.reader import load_split
    from featurestore.jobs.train_head import evaluate

    res = evaluate("cvrun", "demo", grouped_store, split="test")
    assert res["mode"] == "out-of-fold"
    data = load_split(grouped_store, "demo", "test", cv_run.lineage["fingerprints"])
    X, y, keep, _, _ = usable(data, "label", cv_run.lineage["classes"])
    groups = np.asarray(data.groups)[keep]
    fold_of_group = {f["held_out_groups"][0]: f["fold"] for f in cv_run.lineage["folds"]}
    pred = np.empty(len(y), np.int64)
    for g, k in fold_of_group.items():
        head = heads.Head.load(cv_run.folder / f"fold-{k}")
        at = np.flatnonzero(groups == g)
        pred[at] = head.predict(X.take(at))
    assert res["n"] == len(y)
    assert res["metrics"]["uar"] == pytest.approx(_balanced_accuracy(y.y, pred), abs=1e-9)
    one = evaluate("cvrun/fold-1", "demo", grouped_store, split="test")
    held = cv_run.lineage["folds"][1]["held_out_groups"][0]
    at = np.flatnonzero(groups == held)
    assert one["n"] == len(at) and one["not_held_out"] == len(y) - len(at)
    assert one["metrics"]["uar"] == pytest.approx(_balanced_accuracy(y.y[at], pred[at]), abs=1e-9)


def test_out_of_fold_eval_pairs_each_item_with_its_own_prediction(grouped_store, cv_run):
    """On the 124-item train split (the test split's 12 are too few to tell an order apart): the confusion
    matrix of the pooled out-of-fold predictions is scikit-learn's for the fold heads' predictions made by
    hand, item by item."""
    import featurestore.heads as heads
    from sklearn.metrics import confusion_matrix

    from featurestore.heads._data import usable
    from featurestore.reader import load_split
    from featurestore.jobs.train_head import evaluate

    res = evaluate("cvrun", "demo", grouped_store, split="train")
    data = load_split(grouped_store, "demo", "train", cv_run.lineage["fingerprints"])
    X, y, keep, _, _ = usable(data, "label", cv_run.lineage["classes"])
    groups = np.asarray(data.groups)[keep]
    pred = np.empty(len(y), np.int64)
    for f in cv_run.lineage["folds"]:
        at = np.flatnonzero(groups == f["held_out_groups"][0])
        pred[at] = heads.Head.load(cv_run.folder / f"fold-{f['fold']}").predict(X.take(at))
    assert res["mode"] == "out-of-fold" and res["n"] == len(y) > 100
    assert res["metrics"]["confusion_matrix"] == confusion_matrix(y.y, pred, labels=range(len(y.classes))).tolist()


def test_eval_of_a_cv_run_on_another_dataset_reports_every_fold_and_the_ensemble(grouped_store, cv_run):
    import featurestore.heads as heads
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.heads._data import usable
    from featurestore.reader import load_split
    from featurestore.jobs.train_head import evaluate

    add_dataset(grouped_store, "demo2", build_demo(), root=None, source="builtin demo, again")
    res = evaluate("cvrun", "demo2", grouped_store, split="train")
    data = load_split(grouped_store, "demo2", "train", cv_run.lineage["fingerprints"])
    X, y, _, _, _ = usable(data, "label", cv_run.lineage["classes"])
    hs = [heads.Head.load(cv_run.folder / f"fold-{k}") for k in range(3)]
    per = [_balanced_accuracy(y.y, h.predict(X)) for h in hs]
    assert [f["uar"] for f in res["per_fold"]] == pytest.approx(per, abs=1e-9)
    assert res["metrics"]["uar"] == pytest.approx(np.mean(per)) and res["std"]["uar"] == pytest.approx(np.std(per))
    avg = np.mean([h.predict_proba(X) for h in hs], 0)
    assert res["ensemble"]["uar"] == pytest.approx(_balanced_accuracy(y.y, avg.argmax(1)), abs=1e-9)
    out = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "eval", "cvrun", "--dataset", "demo2",
                                   "--split", "train"], catch_exceptions=False)
    assert out.exit_code == 0 and "ensemble" in out.output and "every fold head" in out.output
    missing = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "eval", "cvrun/fold-9", "--dataset", "demo"])
    assert missing.exit_code != 0 and "cvrun/fold-0" in missing.output and "Traceback" not in missing.output


def test_verify_checks_every_file_of_a_cv_run(grouped_store, cv_run):
    from featurestore._io import check_checksums

    assert check_checksums(cv_run.folder) == []
    target = cv_run.folder / "fold-2" / "model.safetensors"
    original = target.read_bytes()
    try:
        target.write_bytes(original[:-4] + b"\0\0\0\0")
        out = CliRunner().invoke(cli, ["--store", str(grouped_store.root), "verify"])
        assert out.exit_code != 0 and "fold-2/model.safetensors" in out.output
    finally:
        target.write_bytes(original)
