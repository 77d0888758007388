"""`--engine ray` on a real local Ray (2 CPUs, one session for the module): extraction by an actor
pool equals one-process extraction row for row, a killed driver's run resumes without duplicates,
and a Ray sweep gives the local sweep's results."""
from __future__ import annotations

import io
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from PIL import Image

from featurestore.cli import cli
from featurestore.datasets import add_dataset, get_dataset, read_manifest_file
from featurestore.datasets.manifest import normalise
from featurestore.features import FeatureSet
from featurestore.store import open_store
from featurestore.jobs.extract import ExtractConfig, run as run_local

N_WORDS = 160


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def words(tmp_path_factory, demo_df):
    """A text dataset (with one blank text) and its one-process extraction: the reference."""
    root = tmp_path_factory.mktemp("ref")
    head = demo_df.head(N_WORDS)
    df = normalise(pl.DataFrame({"item_id": head["item_id"].to_list() + ["blank"],
                                 "text": head["text"].to_list() + ["   "],
                                 "label": head["label"].to_list() + ["neutral"]}), source="test")
    store = open_store(root / "store", create=True)
    add_dataset(store, "words", df, root=None, source="test")
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=8, segment_rows=32)
    res = run_local(cfg, store)
    return store, cfg, res


def _fresh(tmp_path, words_fixture, name="store"):
    """A new store holding only the dataset (no features)."""
    store_ref = words_fixture[0]
    store = open_store(tmp_path / name, create=True)
    add_dataset(store, "words", get_dataset(store_ref, "words").manifest, root=None, source="test")
    return store


def _rows(store, fingerprint):
    fs = FeatureSet(store, fingerprint)
    keys = np.array([k for k in get_dataset(store, "words").manifest["text_key"].to_list() if k], dtype="S32")
    values, present = fs.read_pooled(keys)
    return fs, values, present


def test_ray_extraction_equals_one_process_row_for_row(tmp_path, ray_session, words):
    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_extract import run as run_ray

    store_ref, cfg, ref = words
    store = _fresh(tmp_path, words)
    res = run_ray(cfg, store, RayOptions(workers=2))
    assert res.fingerprint == ref.fingerprint
    assert (res.computed, res.failed_new, res.failed_total) == (N_WORDS, 1, 1)
    assert res.ray["workers"] == 2 and res.ray["shards"] >= 2
    fs, got, present = _rows(store, res.fingerprint)
    _, want, want_present = _rows(store_ref, ref.fingerprint)
    assert present.all() and want_present.all()
    assert got.tobytes() == want.tobytes()  # bit-identical on CPU
    assert len(fs.index(refresh=True)._keys) == N_WORDS  # every row once
    assert [(e.item_id, e.reason) for e in fs.errors()] == [("blank", "empty text")]
    assert fs.verify() == []
    again = run_ray(cfg, store, RayOptions(workers=2))  # nothing pending: no Ray work at all
    assert again.cache_hit and again.cached == N_WORDS


def test_an_actor_whose_model_gives_another_fingerprint_never_writes(tmp_path, ray_session, words):
    """A remembered spec naming an existing feature set, but not the weights the actors load (the
    case of a node holding other weights): the actors refuse to write there, the driver drops the
    remembered spec, reads the true one and extracts under it."""
    from featurestore import backbones, spec_cache
    from featurestore.backbones.base import fingerprint_of
    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_extract import run as run_ray

    store_ref, cfg, ref = words
    store = _fresh(tmp_path, words)
    true_spec = backbones.create("minilm").load().spec()
    bogus = {**true_spec, "weights_hash": "other-weights"}
    wrong = FeatureSet(store, fingerprint_of("minilm", bogus))
    wrong.ensure_spec(bogus)  # an existing feature set of "other weights"
    spec_cache.remember(store, backbones.create("minilm"), bogus)
    small = ExtractConfig(**{**cfg.__dict__, "limit": 16})
    res = run_ray(small, store, RayOptions(workers=1))
    assert res.fingerprint == ref.fingerprint and res.computed == 16
    assert wrong.segments.segments() == []  # nothing was written under the wrong fingerprint
    assert spec_cache.lookup(store, backbones.create("minilm"))["weights_hash"] == true_spec["weights_hash"]


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_items_met_by_actors_are_recorded(tmp_path, ray_session):
    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_extract import run as run_ray

    root = tmp_path / "imgs"
    root.mkdir()
    (root / "white.png").write_bytes(_png("white"))
    (root / "gray.png").write_bytes(_png("gray"))
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "cut.png").write_bytes(_png("black")[:60])
    names = ["white", "gray", "corrupt", "cut"]
    (root / "m.csv").write_text("id,image,label\n" + "".join(f"{r},{r}.png,x\n" for r in names))
    out = {}
    for engine in ("local", "ray"):
        store = open_store(tmp_path / engine, create=True)
        add_dataset(store, "imgs", read_manifest_file(root / "m.csv"), root=root, source="t")
        cfg = ExtractConfig(dataset="imgs", modality="image", backbone="fer", batch_size=2)
        res = run_local(cfg, store) if engine == "local" else run_ray(cfg, store, RayOptions(workers=1))
        assert (res.computed, res.failed_new) == (2, 2)
        fs = FeatureSet(store, res.fingerprint)
        keys = np.array(get_dataset(store, "imgs").manifest["image_key"].to_list(), dtype="S32")
        out[engine] = (fs.read_pooled(keys)[0].tobytes(), sorted((e.item_id, e.reason) for e in fs.errors()))
    assert out["ray"] == out["local"]
    assert [i for i, _ in out["ray"][1]] == ["corrupt", "cut"]


@pytest.mark.slow
def test_killed_driver_then_rerun_completes_without_duplicates(tmp_path, ray_session, words):
    """The driver (a separate `fs extract --engine ray` joining this module's Ray) is SIGKILLed once it
    has published; a rerun computes the rest: every row once, bit-identical to one process."""
    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_extract import run as run_ray

    store_ref, cfg, ref = words
    store = _fresh(tmp_path, words)
    address = ray_session.get_runtime_context().gcs_address
    args = [sys.executable, "-m", "featurestore.cli", "--store", str(store.root), "extract", "--dataset", "words",
            "--modality", "text", "--backbone", "minilm", "--batch-size", "8", "--segment-rows", "8",
            "--segment-seconds", "0.05", "--engine", "ray", "--address", address, "--workers", "1"]
    victim = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    fp_dir = store.feature_dir(ref.fingerprint)
    deadline = time.time() + 600  # a guard against a hang only: the loop waits for 3 segments
    while time.time() < deadline and victim.poll() is None:
        if len(list(fp_dir.glob("seg-*.h5"))) >= 3:
            break
        time.sleep(0.05)
    assert victim.poll() is None, victim.stderr.read()  # still running: the kill lands mid-run
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(1.0)  # let Ray notice the driver is gone (its actor dies with it)
    fs = FeatureSet(store, ref.fingerprint)
    partial = len(fs.index(refresh=True).unique_keys())
    assert 0 < partial < N_WORDS
    res = run_ray(cfg, store, RayOptions(workers=2))
    done = len(fs.index(refresh=True).unique_keys())
    assert done == N_WORDS and res.computed + res.cached == N_WORDS and res.cached >= partial
    assert len(fs.index(refresh=True)._keys) == N_WORDS  # no duplicates
    _, got, present = _rows(store, ref.fingerprint)
    _, want, _ = _rows(store_ref, ref.fingerprint)
    assert present.all() and got.tobytes() == want.tobytes()
    assert [e.item_id for e in fs.errors()] == ["blank"]
    assert fs.verify() == []


def test_ray_sweep_equals_local_sweep(tmp_path, ray_session, words):
    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_sweep import run as run_ray
    from featurestore.jobs.sweep import SweepConfig, run as run_sweep

    stores = {}
    for name in ("local", "ray"):
        shutil.copytree(words[0].root, tmp_path / name)
        stores[name] = open_store(tmp_path / name)
    # two network shapes: two stacks, trained as two tasks at once
    cfg = SweepConfig(method="mlp", dataset="words", features={"text": "minilm"},
                      grid={"lr": ["1e-3", "3e-3"], "hidden": ["16", "32"]}, params={"epochs": 4}, seed=3,
                      val_fraction=0.2)
    local = run_sweep(cfg, stores["local"])
    remote = run_ray(cfg, stores["ray"], RayOptions(workers=2))
    assert remote.sweep_id == local.sweep_id and remote.trained_now == 4
    assert (remote.folder / "results.parquet").is_file() and len(list((remote.folder / "parts").iterdir())) == 4
    drop = ["seconds", "finished_at", "row_sha256"]  # the seal covers the wall-clock columns too
    a = local.table.drop(drop).sort("config_id")
    b = pl.read_parquet(remote.folder / "results.parquet").drop(drop).sort("config_id")
    assert a.columns == b.columns and a.height == 4
    assert a.equals(b), (a, b)  # same configurations, seeds and numbers
    again = run_ray(cfg, stores["ray"], RayOptions(workers=2))  # resumable: nothing left to train
    assert (again.trained_now, again.reused) == (0, 4)


def test_ray_optuna_sweep_runs_tpe_rounds_and_resumes(tmp_path, ray_session, words):
    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_sweep import run as run_ray
    from featurestore.jobs.sweep import SweepConfig

    shutil.copytree(words[0].root, tmp_path / "s")
    store = open_store(tmp_path / "s")
    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}}
    cfg = SweepConfig(method="mlp", dataset="words", features={"text": "minilm"}, optuna=5, space=space,
                      params={"epochs": 2, "hidden": 16}, seed=1, limit=3)
    first = run_ray(cfg, store, RayOptions(workers=2))
    assert first.trained_now == 3  # the job limit stops after three
    second = run_ray(dataclass_replace(cfg, limit=0), store, RayOptions(workers=2))
    assert second.sweep_id == first.sweep_id and second.table.height == 5 and second.trained_now == 2
    import optuna

    study = optuna.load_study(study_name=first.sweep_id, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(first.folder / "optuna.journal"))))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5
    assert sorted(t.params["lr"] for t in complete) == sorted(second.table["lr"].to_list())


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


def test_without_ray_engine_ray_says_what_to_install(tmp_path, words):
    """In a fresh interpreter where `import ray` fails, as on a machine without the extra."""
    code = ("import sys; sys.modules['ray'] = None; from featurestore.cli import main; "
            "sys.argv = ['fs'] + sys.argv[1:]; main()")
    args = ["--store", str(words[0].root), "extract", "--dataset", "words", "--modality", "text",
            "--backbone", "minilm"]
    res = subprocess.run([sys.executable, "-c", code, *args, "--engine", "ray"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "pip install 'featurestore[ray]'" in lines[0], lines
    res = CliRunner().invoke(cli, [*args, "--workers", "2"])
    assert res.exit_code == 2 and "only apply with --engine ray" in res.output


def test_ray_actors_read_a_segment_published_while_the_driver_planned(tmp_path, ray_session, words, monkeypatch):
    """Another job publishes rows for some of the driver's planned inputs just after the driver's plan
    read the set; the actors start from the driver's accounted segments, so they read that segment
    before claiming and compute each input once (before: the actors' own later snapshot hid it)."""
    from _faults import publish_after_each_plan

    from featurestore.jobs._ray import RayOptions
    from featurestore.jobs.ray_extract import run as run_ray

    _, cfg, ref = words
    store = _fresh(tmp_path, words)
    run_local(ExtractConfig(dataset="words", modality="text", backbone="minilm", limit=5), store)
    fs = FeatureSet(store, ref.fingerprint)
    published = publish_after_each_plan(monkeypatch, fs)
    res = run_ray(cfg, store, RayOptions(workers=2))
    monkeypatch.undo()
    assert len(published) == len(set(published)) >= 10
    assert res.computed == N_WORDS - 5 - len(published)
    assert len(fs.index(refresh=True)._keys) == N_WORDS and fs.verify() == []
