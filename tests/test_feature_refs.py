"""`--features` resolution: a name means the fingerprint that covers the dataset, one syntax everywhere.

The scenario of issue 11: a demo-like dataset extracted with the packaged MiniLM, then `fs extract -p
pooling=cls` on a tiny other dataset (sharing some words) must not break training on the first nor mark
its runs stale. Real MiniLM, real HDF5 segments, the real CLI (click's runner, in-process).
"""
from __future__ import annotations

import json

import polars as pl
import pytest

from _cli import fs

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = 48  # rows of the demo-like dataset


@pytest.fixture(scope="module")
def store_root(tmp_path_factory, demo_df):
    root = tmp_path_factory.mktemp("refs") / "store"
    words = demo_df.filter(pl.col("valence").is_not_null()).head(WORDS)
    folder = root.parent
    words.select("item_id", "split", "label", "valence", "text").write_csv(folder / "words.csv")
    # the toy dataset shares 6 words with `words` (same content keys) and adds 4 of its own
    toy = pl.concat([words.head(6), demo_df.filter(pl.col("valence").is_null()).head(4)])
    toy = toy.with_columns(split=pl.Series(["train"] * 7 + ["test"] * 3))
    toy.select("item_id", "split", "label", "text").write_csv(folder / "toy.csv")
    return root


def _ls_features(root) -> list[dict]:
    return json.loads(fs(root, "ls", "--json").output)["features"]


def test_a_toy_extraction_with_other_params_breaks_nothing(store_root):
    root, folder = store_root, store_root.parent
    fs(root, "init")
    fs(root, "datasets", "add", "words", "--manifest", str(folder / "words.csv"))
    fs(root, "datasets", "add", "toy", "--manifest", str(folder / "toy.csv"))
    fs(root, "extract", "--dataset", "words", "--modality", "text", "--backbone", "minilm")
    (default,) = [f["fingerprint"] for f in _ls_features(root)]
    first = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "words", "--features",
                          "text=minilm", "--target", "label", "-p", "epochs=3", "--json").output)
    assert first["lineage"]["fingerprints"] == {"text": default}

    # the failing step: a newer minilm fingerprint, extracted for another dataset only
    fs(root, "extract", "--dataset", "toy", "--modality", "text", "--backbone", "minilm", "-p", "pooling=cls")
    cls_fp = next(f["fingerprint"] for f in _ls_features(root) if f["fingerprint"] != default)
    assert {f["fingerprint"]: f["extracted_for"] for f in _ls_features(root)} == {default: ["words"], cls_fp: ["toy"]}
    # a fast machine creates both fingerprints within one second (the CI failure of stop 18): staleness
    # must order the extractions for a dataset, not the fingerprints' second-resolution creation stamps
    specs = {fp: root / "features" / fp / "spec.json" for fp in (default, cls_fp)}
    same_second = json.loads(specs[default].read_text())["created_at"]
    specs[cls_fp].write_text(json.dumps({**json.loads(specs[cls_fp].read_text()), "created_at": same_second}))
    again = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "words", "--features",
                          "text=minilm", "--target", "label", "-p", "epochs=3", "--json").output)
    assert again["lineage"]["fingerprints"] == {"text": default}  # not the newest in the store
    runs = {r["run"]: r for r in json.loads(fs(root, "runs", "--json").output)["runs"]}
    assert not runs[first["run"]]["stale"] and not runs[again["run"]]["stale"]
    # on the toy dataset, both fingerprints hold rows for it; the one extracted for it wins
    toy = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "toy", "--features", "minilm",
                        "--target", "label", "-p", "epochs=2", "--json").output)
    assert toy["lineage"]["fingerprints"] == {"text": cls_fp}

    # one syntax everywhere: va fit takes MOD=NAME and a bare NAME, and resolves it for its dataset
    for i, features in enumerate(("text=minilm", "minilm")):
        out = json.loads(fs(root, "va", "fit", "--dataset", "words", "--features", features, "--out", f"v{i}",
                            "--test-split", "", "--json").output)
        assert out["fingerprint"] == default and out["modality"] == "text"
    # sweeps and cross-validation resolve the same way
    sweep = json.loads(fs(root, "sweep", "--method", "linear", "--dataset", "words", "--features", "minilm",
                          "--target", "label", "--grid", "epochs=1,2", "--json").output)
    saved = json.loads((root / "sweeps" / sweep["sweep"] / "sweep.json").read_text())
    assert saved["fingerprints"] == {"text": default}
    cv = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "words", "--features", "minilm",
                       "--target", "label", "-p", "epochs=1", "--cv", "2", "--json").output)
    assert cv["lineage"]["fingerprints"] == {"text": default}

    # now words itself is extracted with pooling=cls too: the name is ambiguous for it
    fs(root, "extract", "--dataset", "words", "--modality", "text", "--backbone", "minilm", "-p", "pooling=cls")
    res = fs(root, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
             "--target", "label", code=2)
    line = res.output.strip()
    assert line.count("\n") == 0 and "ambiguous" in line and "Traceback" not in line
    assert default in line and cls_fp in line and f"{WORDS}/{WORDS}" in line and "pooling=cls" in line
    # ... the run trained on `default` is stale for words now (a newer fingerprint was extracted for it)
    runs = {r["run"]: r for r in json.loads(fs(root, "runs", "--json").output)["runs"]}
    assert runs[first["run"]]["stale"] and runs[first["run"]]["superseded_by"] == {"text": cls_fp}
    # ... and the full fingerprint, with or without the modality, picks one
    for features in (f"text={default}", default):
        out = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "words", "--features", features,
                            "--target", "label", "-p", "epochs=1", "--json").output)
        assert out["lineage"]["fingerprints"] == {"text": default}


def test_parse_feature_refs_without_modality(store):
    from featurestore.errors import ConfigError
    from featurestore.reader import parse_feature_refs

    assert parse_feature_refs("minilm") == {"text": "minilm"}  # the registered backbone's modality
    assert parse_feature_refs("text=minilm, image=fer") == {"text": "minilm", "image": "fer"}
    assert parse_feature_refs("fer,minilm", store) == {"image": "fer", "text": "minilm"}
    with pytest.raises(ConfigError, match="no fingerprint or backbone"):
        parse_feature_refs("nosuch", store)
    with pytest.raises(ConfigError, match="twice"):
        parse_feature_refs("text=minilm,minilm")
    with pytest.raises(ConfigError, match="not a modality"):
        parse_feature_refs({"txt": "minilm"})


def test_name_not_covering_the_dataset_says_extract(store_root):
    root = store_root
    if not (root / "store.json").exists():
        pytest.skip("needs the store of the first test")
    df = pl.DataFrame({"item_id": ["a", "b", "c", "d"], "split": ["train", "train", "test", "test"],
                       "label": ["x", "y", "x", "y"], "text": ["zzz qqq one", "zzz qqq two", "zzz three", "zzz 4"]})
    df.write_csv(root.parent / "fresh.csv")
    fs(root, "datasets", "add", "fresh", "--manifest", str(root.parent / "fresh.csv"))
    res = fs(root, "train-head", "--method", "linear", "--dataset", "fresh", "--features", "text=minilm",
             "--target", "label", code=4)
    assert "cover dataset 'fresh'" in res.output and "fs extract --dataset fresh" in res.output
    assert "0/4" in res.output
    res = fs(root, "train-head", "--method", "linear", "--dataset", "fresh", "--features", "audio=minilm", code=2)
    assert "only text features" in res.output and "\n" not in res.output.strip()


def test_re_extracting_an_entry_recorded_before_first_at_existed_does_not_make_it_newest(tmp_path, demo_df, minilm):
    """Catalogues written before `first_at` existed: re-running the older extraction must not make its
    fingerprint the newest for the dataset (it keeps the set's creation time), so runs on the newer
    fingerprint do not turn stale."""
    from featurestore import backbones
    from featurestore.datasets import add_dataset
    from featurestore.features import FeatureSet, superseded_by
    from featurestore.jobs.extract import ExtractConfig, run
    from featurestore.store import open_store

    store = open_store(tmp_path / "s", create=True)
    add_dataset(store, "words", demo_df.head(12), root=None, source="t")
    a = run(ExtractConfig(dataset="words", modality="text", backbone="minilm"), store, backbone=minilm).fingerprint
    b = run(ExtractConfig(dataset="words", modality="text", backbone="minilm", params={"pooling": "cls"}), store,
            backbone=backbones.create("minilm", {"pooling": "cls"})).fingerprint
    for fp, created in ((a, "2026-01-01T00:00:00+00:00"), (b, "2026-02-01T00:00:00+00:00")):
        fs_ = FeatureSet(store, fp)
        with fs_.segments.update_catalogue() as doc:  # as an older release recorded it
            doc["datasets"]["words"].pop("first_at")
        fs_.spec_path.write_text(json.dumps({**fs_.spec, "created_at": created}))
    assert superseded_by(store, a, "words") == b and superseded_by(store, b, "words") is None
    run(ExtractConfig(dataset="words", modality="text", backbone="minilm"), store, backbone=minilm)  # a again
    recorded = FeatureSet(store, a).segments.catalogue()["datasets"]["words"]["first_at"]
    assert recorded == pytest.approx(1767225600.0)  # 2026-01-01T00:00:00Z, the set's creation, not now
    assert superseded_by(store, a, "words") == b and superseded_by(store, b, "words") is None
