"""`fs sweep`: stacked training faithful to solo runs, grids/random/Optuna, resume, export, the CLI."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

import featurestore.heads as heads
from featurestore.cli import cli
from featurestore.errors import ConfigError
from featurestore.heads import Features, Targets
from featurestore.heads._stacked import fit_heads
from featurestore.jobs import sweep as sweep_job

CLASSES = ["happy", "sad", "anger"]
# stacked vs solo agree to float summation order on the CPU; on CUDA both run under autocast (bf16 matrix
# products), where summation order moves probabilities by ~1e-3 (seen on an H100) and may flip an item
ON_CUDA = torch.cuda.is_available()
ATOL = 2e-2 if ON_CUDA else 1e-4
SCORE_ABS = 0.05 if ON_CUDA else 1e-9
ROWS = 300


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def synthetic(kind: str, n: int, seed: int) -> tuple[Features, Targets]:
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    pooled = {"text": rng.normal(size=(n, 24)).astype(np.float32), "audio": rng.normal(size=(n, 8)).astype(np.float32)}
    pooled["text"][:, :3] += np.eye(3)[cls] * 1.5
    masks = {"text": np.ones(n, bool), "audio": rng.random(n) > 0.3}
    X = Features(pooled, masks)
    if kind == "multi":
        y = np.eye(3, dtype=np.float32)[cls]
        y[:, 2] = np.maximum(y[:, 2], rng.random(n) < 0.3)
        return X, Targets("multi", y, CLASSES)
    if kind == "va":
        return X, Targets("va", np.c_[cls / 2 - 0.5, np.where(rng.random(n) < 0.5, np.nan, cls / 3)].astype(np.float32))
    return X, Targets("single", cls, CLASSES)


# ---- faithfulness -------------------------------------------------------------------------
MLP_GRID = [dict(lr=lr, weight_decay=wd, dropout=d) for lr, wd, d in
            [(1e-3, 0.0, 0.0), (3e-3, 1e-2, 0.2), (1e-2, 1e-4, 0.5), (3e-4, 0.1, 0.1), (3e-3, 0.0, 0.3),
             (1e-3, 0.05, 0.0)]]


@pytest.mark.parametrize("method,kind,grid", [
    ("mlp", "single", MLP_GRID),
    ("mlp", "multi", MLP_GRID[:3]),
    ("linear", "single", [dict(lr=lr, weight_decay=wd) for lr in (1e-3, 1e-2) for wd in (0.0, 0.1)]),
    ("linear", "va", [dict(lr=lr) for lr in (1e-3, 3e-2)]),
])
def test_stacked_configs_match_solo_training(method, kind, grid):
    X, y = synthetic(kind, 240, 0)
    Xv, yv = synthetic(kind, 80, 1)
    Xt, yt = synthetic(kind, 80, 2)
    fixed = dict(epochs=6, patience=2, batch_size=32, seed=3, **({"hidden": 16} if method == "mlp" else {}))
    stacked = fit_heads([heads.create(method, **fixed, **g) for g in grid], X, y, eval_set=(Xv, yv))
    epochs = set()
    for g, head in zip(grid, stacked):
        solo = heads.create(method, **fixed, **g).fit(X, y, eval_set=(Xv, yv))
        np.testing.assert_allclose(head.predict_proba(Xt), solo.predict_proba(Xt), atol=ATOL)
        np.testing.assert_allclose(head.predict_proba(Xv), solo.predict_proba(Xv), atol=ATOL)
        assert head.score(Xt, yt) == pytest.approx(solo.score(Xt, yt), abs=SCORE_ABS)
        assert head.history_["epochs_run"] == solo.history_["epochs_run"]
        assert head.history_["val_score"] == pytest.approx(solo.history_["val_score"], abs=SCORE_ABS)
        epochs.add(head.history_["epochs_run"])
    distinct = {tuple(np.round(h.predict_proba(Xt)[:5].ravel(), 5)) for h in stacked}
    assert len(distinct) == len(grid)  # the configurations really differ


def test_stack_groups_shapes_and_seeds_and_mixed_epochs():
    X, y = synthetic("single", 160, 0)
    Xv, yv = synthetic("single", 60, 1)
    configs = [dict(hidden=8, seed=0, epochs=2), dict(hidden=16, seed=0, epochs=4), dict(hidden=8, seed=1, epochs=3),
               dict(hidden=8, seed=0, epochs=5, layers=1, patience=0)]
    common = dict(batch_size=16, dropout=0.2, lr=3e-3)
    stacked = fit_heads([heads.create("mlp", **common, **c) for c in configs], X, y, eval_set=(Xv, yv))
    for c, head in zip(configs, stacked):
        solo = heads.create("mlp", **common, **c).fit(X, y, eval_set=(Xv, yv))
        np.testing.assert_allclose(head.predict_proba(Xv), solo.predict_proba(Xv), atol=ATOL)
        assert head.history_["epochs_run"] == solo.history_["epochs_run"] <= c["epochs"]


def test_solo_fit_leaves_the_global_rng_alone():
    import torch

    X, y = synthetic("single", 64, 0)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    heads.create("mlp", epochs=1, hidden=8).fit(X, y)
    assert torch.equal(torch.rand(3), want)


# ---- parsing and bad input --------------------------------------------------------------
def test_parse_grid_and_its_errors():
    assert sweep_job.parse_grid("lr=1e-4,3e-4 dropout=0.1") == {"lr": ["1e-4", "3e-4"], "dropout": ["0.1"]}
    assert sweep_job.parse_grid(["lr=1", "hidden=8,16"]) == {"lr": ["1"], "hidden": ["8", "16"]}
    for bad, msg in [("", "empty"), ("   ", "empty"), ("lr", "form"), ("lr=", "no values"), ("=1", "form"),
                     ("lr=1 lr=2", "twice")]:
        with pytest.raises(ConfigError, match=msg):
            sweep_job.parse_grid(bad)
    assert len(sweep_job.expand_grid({"a": [1, 2], "b": [3, 4, 5]})) == 6


def test_random_sampling_is_seeded_and_extends():
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True, "type": "float"}, "hidden": [8, 16],
             "layers": {"low": 1, "high": 3, "type": "int"}}
    a = sweep_job.sample_random(space, 5, 0)
    assert sweep_job.sample_random(space, 8, 0)[:5] == a
    assert all(1e-4 <= c["lr"] <= 1e-2 and c["hidden"] in (8, 16) and c["layers"] in (1, 2, 3) for c in a)


# ---- jobs on a real store ----------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.store import open_store
    from featurestore.jobs.extract import ExtractConfig, run

    store = open_store(tmp_path_factory.mktemp("sweepstore"), create=True)
    add_dataset(store, "demo", build_demo(), root=None, source="builtin demo")
    run(ExtractConfig(dataset="demo", modality="text", backbone="minilm", limit=ROWS), store)
    return store


def fs(store, *args):
    return CliRunner().invoke(cli, ["--store", str(store.root), *args], catch_exceptions=False)


BASE = ["--dataset", "demo", "--features", "text=minilm", "--target", "label"]
QUICK = ["-p", "epochs=3", "-p", "hidden=16", "-p", "batch_size=32"]


def test_bad_input_is_refused_before_training(demo_store):
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "lr=1e-3 nope=1,2")
    assert r.exit_code == 2 and "nope" in r.output and "dropout" in r.output and "weight_decay" in r.output
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "")
    assert r.exit_code == 2 and "empty" in r.output
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "lr=1e-3,abc")
    assert r.exit_code == 2 and "abc" in r.output
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "dropout=0.1,1.5")
    assert r.exit_code == 2 and "dropout" in r.output
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "lr=1e-3", "--metric", "nosuch")
    assert r.exit_code == 2 and "uar" in r.output
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "lr=1e-3", "-p", "lr=1")
    assert r.exit_code == 2 and "both swept and fixed" in r.output
    assert not demo_store.sweeps_dir().exists() or not any(demo_store.sweeps_dir().glob("*/parts/*.parquet"))


def test_bad_space_is_refused(demo_store, tmp_path):
    cls = heads.get("mlp")
    for space, msg in [({}, "empty"), ({"nope": [1]}, "nope"), ({"lr": {"low": 1}}, "choices"),
                       ({"lr": {"low": 0, "high": 1, "log": True}}, "low must be > 0"),
                       ({"dropout": {"low": 0.1, "high": 2.0}}, "dropout"), ({"hidden": []}, "no choices")]:
        with pytest.raises(ConfigError, match=msg):
            sweep_job._check_space(space, cls, {})


def test_grid_sweep_resumes_without_rerunning_and_exports_best(demo_store, tmp_path):
    from featurestore.jobs.train_head import TrainHeadConfig, run as train

    cfg = dict(method="mlp", dataset="demo", features={"text": "minilm"}, seed=2, target="label",
               grid={"lr": ["3e-4", "1e-3", "3e-3"], "dropout": ["0.0", "0.3"]},
               params={"epochs": "3", "hidden": "16", "batch_size": "32"})
    first = sweep_job.run(sweep_job.SweepConfig(**cfg, limit=4), demo_store)
    parts = sorted((first.folder / "parts").glob("part-*.parquet"))
    assert first.trained_now == 4 and len(parts) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    second = sweep_job.run(sweep_job.SweepConfig(**cfg), demo_store)
    assert second.sweep_id == first.sweep_id and second.trained_now == 2 and second.reused == 4
    assert {p.name: p.stat().st_mtime_ns for p in parts} == stamps  # finished parts untouched
    third = sweep_job.run(sweep_job.SweepConfig(**cfg), demo_store)
    assert third.trained_now == 0 and third.reused == 6
    table = pl.read_parquet(third.folder / "results.parquet")
    assert table.height == 6 and table["config_id"].n_unique() == 6
    assert {"lr", "dropout", "val_uar", "epochs", "seconds", "params"} <= set(table.columns)
    assert not [c for c in table.columns if c.startswith("test_")]  # choices see validation only
    assert sorted(set(zip(table["lr"], table["dropout"]))) == sorted(
        (lr, d) for lr in (3e-4, 1e-3, 3e-3) for d in (0.0, 0.3))
    assert (third.folder / "metric_vs_lr.png").is_file() and (third.folder / "metric_vs_dropout.png").is_file()
    # export-best: the same configuration trained by `fs train-head` semantics scores the same
    assert "eval" not in sweep_job.export_best(third.definition, third.table)  # no store: no test metric
    doc = sweep_job.export_best(third.definition, third.table, tmp_path / "best.json", store=demo_store)
    saved = json.loads((tmp_path / "best.json").read_text())
    assert saved == doc and saved["command"].startswith("fs train-head --method mlp --dataset demo")
    computed = json.loads((third.folder / "best_test.json").read_text())
    again = sweep_job.export_best(third.definition, third.table, store=demo_store)  # computed once, read back
    assert json.loads((third.folder / "best_test.json").read_text()) == computed and again["eval"] == doc["eval"]
    assert "-p lr=" in saved["command"] and "--seed 2" in saved["command"]
    res = train(TrainHeadConfig(method=saved["method"], dataset=saved["dataset"], features=saved["features"],
                                params=saved["params"], target=saved["target"], seed=saved["seed"],
                                val_fraction=saved["val_fraction"]), demo_store)
    assert saved["eval"]["split"] == "test"
    assert res.metrics["uar"] == pytest.approx(saved["eval"]["metrics"]["uar"], abs=1e-9)
    assert res.val_score == pytest.approx(saved["val"], abs=1e-9)


def test_random_and_optuna_sweeps_resume(demo_store, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "dropout": [0.0, 0.2],
                                 "weight_decay": {"low": 0.0, "high": 0.1}}))
    r = fs(demo_store, "sweep", "--method", "linear", *BASE, "--random", "4", "--space", str(space),
           "-p", "epochs=2", "--json")
    assert r.exit_code == 2 and "dropout" in r.output  # linear has no dropout: refused before training
    args = ["sweep", "--method", "mlp", *BASE, "--space", str(space), *QUICK, "--json"]
    rnd = json.loads(fs(demo_store, *args, "--random", "3").output)
    assert rnd["n_configs"] == 3 and rnd["trained_now"] == 3
    more = json.loads(fs(demo_store, *args, "--random", "5").output)
    assert more["sweep"] == rnd["sweep"] and more["trained_now"] == 2 and more["n_configs"] == 5
    opt = json.loads(fs(demo_store, *args, "--optuna", "5", "--limit", "3").output)
    assert opt["trained_now"] == 3
    folder = demo_store.sweeps_dir() / opt["sweep"]
    assert (folder / "optuna.journal").is_file()
    opt2 = json.loads(fs(demo_store, *args, "--optuna", "5").output)
    assert opt2["sweep"] == opt["sweep"] and opt2["n_configs"] >= 5
    assert opt2["trained_now"] == 2 and opt2["reused"] >= 3  # the study's 3 finished trials are not rerun
    opt3 = json.loads(fs(demo_store, *args, "--optuna", "5").output)
    assert opt3["trained_now"] == 0 and opt3["reused"] == 5
    import optuna

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=opt["sweep"],
                              storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5
    # any database URL optuna accepts
    pytest.importorskip("sqlalchemy")
    (tmp_path / "s2.json").write_text(json.dumps({"lr": [1e-3, 1e-2]}))
    db = f"sqlite:///{tmp_path / 'study.db'}"
    other = json.loads(fs(demo_store, "sweep", "--method", "linear", *BASE, "--optuna", "2", "--storage", db,
                          "--space", str(tmp_path / "s2.json"), "-p", "epochs=2", "--json").output)
    assert other["n_configs"] >= 1 and (tmp_path / "study.db").is_file()
    assert not (demo_store.sweeps_dir() / other["sweep"] / "optuna.journal").exists()


def test_cli_grid_show_list_and_export(demo_store, tmp_path):
    r = fs(demo_store, "sweep", "--method", "mlp", *BASE, "--grid", "lr=1e-3,1e-2 weight_decay=0,0.01", *QUICK,
           "--export-best", str(tmp_path / "best.json"))
    assert r.exit_code == 0, r.output
    assert "val_uar" in r.output and "fs train-head --method mlp" in r.output
    assert "test_uar" not in r.output and "best configuration on test (computed once)" in r.output
    listed = json.loads(fs(demo_store, "sweep", "list", "--json").output)["sweeps"]
    row = next(s for s in listed if s["configs"] == 4 and s["method"] == "mlp")
    shown = json.loads(fs(demo_store, "sweep", "show", row["sweep"], "--json").output)
    assert shown["n_configs"] == 4 and len(shown["results"]) == 4
    assert shown["leaderboard"][0]["val_uar"] == max(x["val_uar"] for x in shown["results"])
    plain = fs(demo_store, "sweep", "show", row["sweep"]).output
    assert "val_uar" in plain and "test" not in plain.split("ranked by")[1]
    assert "best configuration on test" in fs(demo_store, "sweep", "show", row["sweep"], "--show-test").output
    assert "best_test" not in fs(demo_store, "sweep", "list").output
    assert fs(demo_store, "sweep", "show", "no-such-sweep").exit_code == 4
    best = json.loads((tmp_path / "best.json").read_text())
    r = fs(demo_store, *best["command"].split()[1:], "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["metrics"]["uar"] == pytest.approx(best["eval"]["metrics"]["uar"], abs=1e-9)


def test_univa_sweeps_as_one_stack_and_other_heads_sequentially(demo_store):
    res = sweep_job.run(sweep_job.SweepConfig(method="univa", dataset="demo", features={"text": "minilm"},
                                              target="labels", grid={"lr": ["1e-3", "1e-2"]},
                                              params={"epochs": "2", "hidden": "16"}), demo_store)
    assert res.table.height == 2 and set(res.table["stack"]) == {2}  # vectorised (heads._vmapped)
    assert "val_acc" in res.table.columns and res.metric == "acc"
    pytest.importorskip("xgboost")
    res = sweep_job.run(sweep_job.SweepConfig(method="xgboost", dataset="demo", features={"text": "minilm"},
                                              target="label", grid={"max_depth": ["2", "3"]},
                                              params={"n_estimators": "5", "nthread": "1"}), demo_store)
    assert res.table.height == 2 and set(res.table["stack"]) == {1}


# ---- univa: vectorised over configurations (heads._vmapped) ----------------------------------
def univa_synthetic(n: int, seed: int, sequences: bool = True) -> tuple[Features, Targets]:
    """Multi-label items with per-modality VA (audio VA partly unknown), an audio modality partly absent."""
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    y = np.eye(3, dtype=np.float32)[cls]
    y[:, 2] = np.maximum(y[:, 2], rng.random(n) < 0.2)
    text = rng.normal(size=(n, 10)).astype(np.float32)
    text[:, 0] += 2 * cls
    audio = rng.normal(size=(n, 6)).astype(np.float32)
    audio_mask = rng.random(n) > 0.2
    va_audio = np.c_[cls / 2 - 0.5 + rng.normal(0, 0.05, n), rng.uniform(-0.5, 0.5, n)].astype(np.float32)
    va_audio[rng.random(n) < 0.3] = np.nan
    X = Features({"text": text, "audio": audio}, {"audio": audio_mask},
                 va={"text": np.c_[cls / 2 - 0.5, np.zeros(n)].astype(np.float32), "audio": va_audio})
    if sequences:
        X.sequences = {
            "text": [np.repeat(text[i:i + 1], 1 + i % 3, 0) for i in range(n)],
            "audio": [rng.normal(size=(1 + i % 4, 6)).astype(np.float32) if audio_mask[i] else None
                      for i in range(n)]}
    return X, Targets("multi", y, CLASSES)


UNIVA_GRID = [dict(lr=1e-3, lam=0.4, tau=0.6), dict(lr=3e-3, lam=0.2, tau=0.3, weight_decay=0.05),
              dict(lr=1e-2, lam=0.7, tau=1.0, delta=0.3), dict(lr=3e-4, lam=0.0, epochs=3, patience=0)]


@pytest.mark.parametrize("sequences", [True, False])
def test_univa_stacked_configs_match_solo_training(sequences):
    X, y = univa_synthetic(160, 0, sequences)
    Xv, yv = univa_synthetic(60, 1, sequences)
    Xt, _ = univa_synthetic(50, 2, sequences)
    fixed = dict(epochs=5, patience=2, batch_size=32, seed=4, hidden=16, heads=2, dropout=0.2)
    said: list[str] = []
    stacked = fit_heads([heads.create("univa", **{**fixed, **g}) for g in UNIVA_GRID], X, y, eval_set=(Xv, yv),
                        log=said.append)
    assert [h.history_["stack_size"] for h in stacked] == [len(UNIVA_GRID)] * 4  # one stack, not one after another
    assert any("stack of 4 univa" in s for s in said)
    for g, head in zip(UNIVA_GRID, stacked):
        solo = heads.create("univa", **{**fixed, **g}).fit(X, y, eval_set=(Xv, yv))
        assert solo.history_["stack_size"] == 1  # the solo fit is the same engine, a stack of one
        np.testing.assert_allclose(head.predict_proba(Xt), solo.predict_proba(Xt), atol=ATOL)
        np.testing.assert_allclose(head.predict_proba(Xv), solo.predict_proba(Xv), atol=ATOL)
        assert head.history_["epochs_run"] == solo.history_["epochs_run"]
        assert head.history_.get("best_epoch") == solo.history_.get("best_epoch")
        np.testing.assert_allclose(head.history_["val_score"], solo.history_["val_score"], atol=ATOL)
        np.testing.assert_allclose(head.history_["train_loss"], solo.history_["train_loss"], atol=ATOL)
    assert stacked[3].history_["epochs_run"] == 3  # its own epochs; the others went on without it
    distinct = {tuple(np.round(h.predict_proba(Xt)[:5].ravel(), 4)) for h in stacked}
    assert len(distinct) == len(UNIVA_GRID)  # the configurations really differ


def test_univa_stack_keys_split_what_cannot_share_a_stack():
    X, y = univa_synthetic(80, 0, False)
    Xv, yv = univa_synthetic(40, 1, False)
    fixed = dict(epochs=2, batch_size=32, hidden=16, heads=2)
    grid = [dict(lr=1e-3), dict(lr=1e-2), dict(lr=1e-3, dropout=0.3), dict(lr=1e-3, seed=1),
            dict(lr=1e-3, contrast="self"), dict(lr=1e-3, contrast="self", tau=0.2),
            dict(lr=1e-3, contrast="label", lam=0.6), dict(lr=3e-3, contrast="none", prior=False),
            dict(lr=1e-3, views=1, normalize=False, prior_weight=0.5, delta=0.5)]
    stacked = fit_heads([heads.create("univa", **fixed, **g) for g in grid], X, y, eval_set=(Xv, yv))
    sizes = [h.history_["stack_size"] for h in stacked]
    assert sorted(sizes) == [1, 1, 2, 2, 5, 5, 5, 5, 5]  # stacks of 5, 2, 1, 1: losses of every form in one
    for g, head in zip(grid, stacked):
        solo = heads.create("univa", **fixed, **g).fit(X, y, eval_set=(Xv, yv))
        np.testing.assert_allclose(head.predict_proba(Xv), solo.predict_proba(Xv), atol=ATOL)
        assert head.history_["val_score"] == pytest.approx(solo.history_["val_score"], abs=1e-4)


def test_concept_stacked_configs_match_solo_training(tmp_path):
    from featurestore.heads.concept import ConceptHead

    memory = ConceptHead.example_params(tmp_path)["memory"]
    X, y = synthetic("single", 200, 0)
    Xv, yv = synthetic("single", 60, 1)
    Xt, _ = synthetic("single", 50, 2)
    fixed = dict(memory=memory, epochs=5, patience=2, batch_size=32, seed=2, hidden=16, dropout=0.2, device="cpu")
    grid = [dict(lr=1e-3, lam=0.5), dict(lr=3e-3, lam=0.1, weight_decay=0.05), dict(lr=1e-2, lam=2.0),
            dict(lr=3e-4, lam=0.0, epochs=2)]
    stacked = fit_heads([heads.create("concept", **{**fixed, **g}) for g in grid], X, y, eval_set=(Xv, yv))
    assert [h.history_["stack_size"] for h in stacked] == [len(grid)] * len(grid)
    for g, head in zip(grid, stacked):
        solo = heads.create("concept", **{**fixed, **g}).fit(X, y, eval_set=(Xv, yv))
        np.testing.assert_allclose(head.predict_proba(Xt), solo.predict_proba(Xt), atol=ATOL)
        np.testing.assert_allclose(head.concept_features(Xt), solo.concept_features(Xt), atol=ATOL)
        assert head.history_["epochs_run"] == solo.history_["epochs_run"]
        np.testing.assert_allclose(head.history_["val_score"], solo.history_["val_score"], atol=ATOL)
        np.testing.assert_allclose(head.history_["train_loss"], solo.history_["train_loss"], atol=ATOL)
    assert stacked[3].history_["epochs_run"] == 2
    distinct = {tuple(np.round(h.predict_proba(Xt)[:5].ravel(), 4)) for h in stacked}
    assert len(distinct) == len(grid)


def test_sweep_limit_must_be_at_least_one(tmp_path):
    from _cli import fs

    res = fs(tmp_path / "store", "sweep", "--method", "mlp", "--dataset", "d", "--features", "text=minilm",
             "--grid", "lr=1e-3", "--limit", "0", code=2)
    assert "--limit" in res.output and "Traceback" not in res.output


def test_random_draws_follow_their_distributions():
    """A `log` range is log-uniform (median at the geometric mean, not the midpoint), and an int
    range rounds, so its end values are drawn half as often as the inner ones (1: u < 0.25)."""
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True, "type": "float"},
             "wd": {"low": 0.0, "high": 1.0, "type": "float"}, "layers": {"low": 1, "high": 3, "type": "int"}}
    draws = sweep_job.sample_random(space, 4000, 3)
    lr = np.array([c["lr"] for c in draws])
    assert np.median(lr) == pytest.approx(1e-3, rel=0.1)  # uniform would give about 5e-3
    assert np.mean(np.log10(lr) < -3.5) == pytest.approx(0.25, abs=0.03)
    assert np.median([c["wd"] for c in draws]) == pytest.approx(0.5, abs=0.03)
    layers = np.array([c["layers"] for c in draws])
    assert [np.mean(layers == k) for k in (1, 2, 3)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)


def test_a_nan_validation_score_ranks_last_and_is_never_exported():
    """A diverged configuration (constant predictions: Pearson r is NaN) must not top the leaderboard."""
    from featurestore.heads import metrics
    from featurestore.jobs.sweep.results import export_best, leaderboard

    y = np.random.default_rng(0).uniform(-1, 1, (50, 2))
    assert np.isnan(metrics.va(y, np.zeros((50, 2)))["r"])
    table = pl.DataFrame({"trial": [0, 1, 2, 3], "lr": [1e-4, 1.0, 1e-3, 2.0],
                          "val_r": [0.41, float("nan"), 0.63, None],
                          "params": ['{"lr": 0.0001}', '{"lr": 1.0}', '{"lr": 0.001}', '{"lr": 2.0}'],
                          "epochs": [5] * 4, "seconds": [1.0] * 4})
    definition = {"metric": "r", "swept": ["lr"], "id": "x", "seed": 0, "features": {"text": "minilm"},
                  "method": "mlp", "dataset": "d", "target": "va", "val_fraction": 0.1, "fingerprints": {}}
    assert [r["trial"] for r in leaderboard(table, definition, 4)][:2] == [2, 0]
    assert export_best(definition, table)["params"]["lr"] == 1e-3


def test_optuna_minimises_a_lower_is_better_metric(demo_store, tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    (tmp_path / "s.json").write_text(json.dumps({"lr": {"low": 1e-3, "high": 3e-1, "log": True}}))
    out = json.loads(fs(demo_store, "sweep", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
                        "--target", "labels", "--metric", "hamming_loss", "--optuna", "3", "--space",
                        str(tmp_path / "s.json"), "-p", "epochs=2", "--json").output)
    folder = demo_store.sweeps_dir() / out["sweep"]
    study = optuna.load_study(study_name=out["sweep"],
                              storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))))
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    values = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert study.best_value == min(values)


def test_a_sweep_on_partly_extracted_features_warns_and_is_a_new_sweep_once_the_rest_is_there(tmp_path):
    """As train-head does, a sweep says how many items have no cached features; and the results of
    a sweep trained on part of a dataset are not reused once the rest is extracted."""
    from _cli import fs as fs_ok

    words = ["good", "bad", "happy", "sad", "calm", "angry", "joy", "fear", "love", "hate"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": f"w{i}", "text": f"{words[i % 10]} {i}", "label": "pos" if i % 2 else
                                        "neg", "split": ["train", "train", "val", "test"][i % 4]}) + "\n"
                            for i in range(48)))
    root = tmp_path / "store"
    fs_ok(root, "datasets", "add", "d", "--manifest", str(path))
    fs_ok(root, "extract", "--dataset", "d", "--modality", "text", "--backbone", "minilm", "--limit", "36")
    args = ["sweep", "--method", "linear", "--dataset", "d", "--features", "minilm", "--target", "label",
            "--grid", "lr=1e-3,1e-2", "-p", "epochs=2", "--json"]
    first = json.loads(fs_ok(root, *args).output)
    assert first["warnings"] and all("have no cached features" in w for w in first["warnings"])
    assert sum(int(w.split()[1]) for w in first["warnings"]) == 12
    fs_ok(root, "extract", "--dataset", "d", "--modality", "text", "--backbone", "minilm")
    second = json.loads(fs_ok(root, *args).output)
    assert second["warnings"] == [] and second["sweep"] != first["sweep"] and second["trained_now"] == 2
    again = json.loads(fs_ok(root, *args).output)
    assert again["sweep"] == second["sweep"] and again["trained_now"] == 0


# ---- a damaged result is refused, a killed Optuna sweep resumes into the same study ------------------
def test_a_damaged_sweep_file_is_refused_by_show_list_a_rerun_and_verify(demo_store, tmp_path):
    """A part whose value changed (a flipped bit in a parquet data page still reads) was ranked by `show`
    and reused by a rerun, and `fs verify` did not look at sweeps; a truncated part was an unexpected
    error (exit 1). Each sweep file is now checked against its seal: exit 8 naming the file."""
    import shutil

    store_root = tmp_path / "store"
    shutil.copytree(demo_store.root, store_root)
    from featurestore.store import open_store

    store = open_store(store_root)
    args = ["sweep", "--method", "mlp", *BASE, *QUICK, "--grid", "lr=2e-3,4e-3", "--json"]
    first = json.loads(fs(store, *args).output)
    folder = store.sweeps_dir() / first["sweep"]
    part = sorted((folder / "parts").glob("part-*.parquet"))[0]
    clean = part.read_bytes()
    df = pl.read_parquet(part)
    df.with_columns(pl.col("val_uar") + 0.25).write_parquet(part)  # what a flipped bit in the value does
    for command in (["sweep", "show", first["sweep"]], ["sweep", "list"], args):
        res = fs(store, *command)
        assert res.exit_code == 8 and part.name in res.output and "Traceback" not in res.output, (command, res.output)
    res = fs(store, "verify", "--json")
    assert res.exit_code == 8 and any(part.name in p["path"] for p in json.loads(res.output)["problems"])
    part.write_bytes(clean[: len(clean) // 2])  # truncated: unreadable
    res = fs(store, "sweep", "show", first["sweep"])
    assert res.exit_code == 8 and part.name in res.output
    part.unlink()  # what the message says: the configuration is trained again, to the same row
    again = json.loads(fs(store, *args).output)
    assert again["trained_now"] == 1 and pl.read_parquet(part)["val_uar"].to_list() == df["val_uar"].to_list()
    assert fs(store, "verify").exit_code == 0

    definition = folder / "sweep.json"
    definition.write_text(definition.read_text().replace('"uar"', '"acc"'))  # ranks by another metric, silently
    res = fs(store, "sweep", "show", first["sweep"])
    assert res.exit_code == 8 and "sweep.json" in res.output


class _Killed(Exception):
    """Stands for SIGKILL at an exact point of a sweep (the process dies: nothing after it runs)."""


def _after(n: int, real):
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) > n:
            raise _Killed()
        return real(*a, **k)
    return wrapped


@pytest.mark.parametrize("where,n", [("proposing", 6), ("training", 5), ("telling", 6), ("telling", 2)])
def test_an_optuna_sweep_killed_anywhere_resumes_into_what_an_uninterrupted_one_gives(demo_store, tmp_path,
                                                                                      monkeypatch, where, n):
    """Killed while a round was proposed, trained or told, the resumed sweep went on differently from an
    uninterrupted one: the killed round's trials were failed and TPE reseeded past every trial, failed ones
    included, so other configurations were drawn. Now a killed round is finished (or, killed before it
    ran, proposed again by a sampler seeded by the finished trials), so the same study results."""
    import importlib
    import shutil

    import optuna

    from featurestore.store import open_store

    sweep_run = importlib.import_module("featurestore.jobs.sweep.run")  # the module (`sweep.run` is the job)
    study = importlib.import_module("featurestore.jobs.sweep.study")

    monkeypatch.setattr(study, "OPTUNA_BATCH", 4)  # rounds of 4 trials: 4, 4, 4, 2 (TPE proper after 10)
    (tmp_path / "space.json").write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                                     "dropout": {"low": 0.0, "high": 0.5}}))
    config = sweep_job.SweepConfig(method="mlp", dataset="demo", features={"text": "minilm"}, target="label",
                                   optuna=14, space=json.loads((tmp_path / "space.json").read_text()),
                                   params={"epochs": 2, "hidden": 16, "batch_size": 32})
    stores = {}
    for name in ("whole", "killed"):
        shutil.copytree(demo_store.root, tmp_path / name)
        stores[name] = open_store(tmp_path / name)
        shutil.rmtree(stores[name].sweeps_dir(), ignore_errors=True)
    whole = sweep_job.run(config, stores["whole"])

    with monkeypatch.context() as m:
        if where == "proposing":  # the 7th suggestion: in the second round, after 2 of its trials were proposed
            m.setattr(study, "suggest", _after(n, study.suggest))
        elif where == "training":  # the 6th part published: the second round half trained
            m.setattr(sweep_run, "write_part", _after(n, sweep_run.write_part))
        else:  # a round's trials half told
            m.setattr(optuna.study.Study, "tell", _after(n, optuna.study.Study.tell))
        with pytest.raises(_Killed):
            sweep_job.run(config, stores["killed"])
    resumed = sweep_job.run(config, stores["killed"])

    def rows(res):
        return res.table.select("config_id", "lr", "dropout", "val_uar", "epochs").sort("config_id").to_dicts()
    assert rows(resumed) == rows(whole) and resumed.table.height == 14


def test_a_sweep_with_parts_from_before_rows_were_sealed_reads_and_verifies(demo_store, tmp_path):
    """A sweep begun by an older featurestore (parts without row_sha256) and continued by this one:
    results.parquet gathers both, the old rows with a null digest, and `fs verify` called it damaged."""
    import shutil

    from featurestore.store import open_store

    shutil.copytree(demo_store.root, tmp_path / "store")
    store = open_store(tmp_path / "store")
    (tmp_path / "space.json").write_text(json.dumps({"lr": {"low": 1e-3, "high": 1e-2, "log": True}}))
    args = ["sweep", "--method", "mlp", *BASE, *QUICK, "--space", str(tmp_path / "space.json"), "--json"]
    folder = store.sweeps_dir() / json.loads(fs(store, *args, "--random", "1").output)["sweep"]
    (part,) = (folder / "parts").glob("part-*.parquet")
    pl.read_parquet(part).drop("row_sha256").write_parquet(part)  # as an older featurestore wrote it
    more = json.loads(fs(store, *args, "--random", "2").output)  # the same sweep, one more configuration
    assert more["trained_now"] == 1 and more["sweep"] == folder.name
    table = pl.read_parquet(store.sweeps_dir() / more["sweep"] / "results.parquet")
    assert table["row_sha256"].null_count() == 1 and table.height == 2
    res = fs(store, "verify")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("damage", ["changed value", "flipped key"])
def test_a_damaged_optuna_journal_is_refused_and_deleting_it_rebuilds_the_study(demo_store, tmp_path, damage):
    """optuna.journal was used as read: a changed value steered TPE (the next proposals changed without a
    word), a flipped byte in a key was 'fs sweep failed: KeyError' (exit 1). Now the journal is read and
    checked against the parts first (exit 8, naming it), and deleting it rebuilds the same study."""
    import shutil

    from featurestore.store import open_store

    shutil.copytree(demo_store.root, tmp_path / "store")
    store = open_store(tmp_path / "store")
    (tmp_path / "space.json").write_text(json.dumps({"lr": {"low": 1e-4, "high": 1e-2, "log": True}}))
    args = ["sweep", "--method", "mlp", *BASE, *QUICK, "--space", str(tmp_path / "space.json"), "--seed", "7",
            "--json"]
    first = json.loads(fs(store, *args, "--optuna", "3").output)
    journal = store.sweeps_dir() / first["sweep"] / "optuna.journal"
    text = journal.read_text()
    if damage == "changed value":
        at = text.index('"values":[') + len('"values":[')
        journal.write_text(text[:at] + "0.9" + text[at + 3:])
    else:
        raw = bytearray(text.encode())
        raw[raw.index(b'"values"') + 2] ^= 0x40
        journal.write_bytes(bytes(raw))
    res = fs(store, *args, "--optuna", "4")
    assert res.exit_code == 8 and "optuna.journal is damaged" in res.output, res.output
    journal.unlink()
    again = json.loads(fs(store, *args, "--optuna", "3").output)
    assert again["trained_now"] == 0 and again["leaderboard"] == first["leaderboard"]
