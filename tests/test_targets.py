"""`--target` defaults to what a dataset has; `fs ls` / `datasets show` / `datasets add` say what that is.

Real manifests on disk, the real CLI, features from the packaged MiniLM.
"""
from __future__ import annotations

import json

import polars as pl
import pytest
from click.testing import CliRunner

from _cli import fs
from featurestore.cli import cli

pytestmark = pytest.mark.usefixtures("one_thread")

EMOTIONS = ["joy", "anger", "fear"]


@pytest.fixture(scope="module")
def root(tmp_path_factory, demo_df):
    folder = tmp_path_factory.mktemp("targets")
    words = demo_df.filter(pl.col("labels").list.len() > 0).head(60)
    words = words.with_columns(split=pl.Series(["test", "val", "train", "train", "train"] * 12))
    multi = words.select("item_id", "split", "text",
                         labels=pl.col("labels").list.eval(pl.element().filter(pl.element().is_in(EMOTIONS)))
                         .list.join("|"))
    multi.write_csv(folder / "multi.csv")
    # every target kind, and 5 training items without a single label
    every = words.select("item_id", "split", "text", "label", "valence",
                         labels=pl.col("labels").list.join("|"))
    no_label = every.filter(pl.col("split") == "train")["item_id"].head(5).to_list()
    every = every.with_columns(label=pl.when(pl.col("item_id").is_in(no_label)).then(None).otherwise(pl.col("label")))
    every.write_csv(folder / "every.csv")
    root = folder / "store"
    fs(root, "init")
    fs(root, "datasets", "add", "multi", "--manifest", str(folder / "multi.csv"))
    fs(root, "datasets", "add", "every", "--manifest", str(folder / "every.csv"))
    fs(root, "extract", "--dataset", "every", "--modality", "text", "--backbone", "minilm")
    return root


def test_target_defaults_to_the_one_the_dataset_has(root):
    out = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "multi", "--features", "minilm",
                        "-p", "epochs=2", "--json").output)
    assert out["kind"] == "multi" and out["lineage"]["target"] == "labels"
    assert out["lineage"]["classes"] == sorted(EMOTIONS)
    res = fs(root, "train-head", "--method", "linear", "--dataset", "multi", "--features", "minilm",
             "--target", "label", code=5)
    assert "no single labels" in res.output and "labels: multi-label, 3 classes" in res.output
    assert "use --target labels" in res.output and "Traceback" not in res.output
    res = fs(root, "sweep", "--method", "linear", "--dataset", "multi", "--features", "minilm", "--grid", "epochs=1",
             "--json")
    sweep = json.loads(res.output)
    assert sweep["kind"] == "multi"


def test_several_targets_is_an_error_listing_them(root):
    res = fs(root, "train-head", "--method", "linear", "--dataset", "every", "--features", "minilm", code=2)
    line = res.output.strip()
    assert "\n" not in line and "several targets" in line and "--target label|labels|va" in line
    assert "label: single-label, 3 classes" in line and "labels: multi-label, 8 classes" in line
    assert "va: valence/arousal regression" in line


def test_training_says_how_many_items_had_no_target(root):
    res = CliRunner().invoke(cli, ["--store", str(root), "train-head", "--method", "linear", "--dataset", "every",
                                   "--features", "minilm", "--target", "label", "-p", "epochs=2"])
    assert res.exit_code == 0, res.output
    n_train = len(pl.read_csv(root.parent / "every.csv").filter(pl.col("split") == "train"))
    assert "5 item(s) of 'every' have no label (--target label) and were left out (5 of train)" in res.output
    assert f"training linear on {n_train - 5} items" in res.output
    out = json.loads(fs(root, "train-head", "--method", "linear", "--dataset", "every", "--features", "minilm",
                        "--target", "label", "-p", "epochs=1", "--json").output)
    assert out["lineage"]["dropped_without_target"]["train"] == 5
    assert any("5 item(s)" in w for w in out["warnings"])


def test_ls_and_show_tell_the_targets_apart(root):
    rows = {r["dataset"]: r for r in json.loads(fs(root, "ls", "--json").output)["datasets"]}
    assert rows["every"]["label"] == "3 classes (single-label)" and rows["every"]["labels"] == "8 classes (multi-label)"
    assert rows["every"]["va"] == "valence"
    assert rows["multi"]["label"] is None and rows["multi"]["labels"] == "3 classes (multi-label)" and rows["multi"]["va"] is None
    text = fs(root, "ls").output
    assert "3 classes (single-label)" in text and "8 classes (multi-label)" in text
    show = fs(root, "datasets", "show", "every", "--head", "3").output
    manifest = pl.read_csv(root.parent / "every.csv")
    for word in manifest["text"].head(3):
        assert word in show  # the texts themselves, not only their keys
    assert "_key" not in show
    assert "label   single-label, 3 classes" in show and "labels  multi-label, 8 classes" in show
    shown = json.loads(fs(root, "datasets", "show", "every", "--json").output)
    assert shown["targets"]["labels"]["kind"] == "multi-label" and shown["rows"][0]["text"] == manifest["text"][0]


def test_add_reports_bad_manifests(tmp_path):
    root = tmp_path / "store"
    (tmp_path / "header.csv").write_text("id,text,label\n")
    res = fs(root, "datasets", "add", "h", "--manifest", str(tmp_path / "header.csv"), code=5)
    assert "no items" in res.output and "header" in res.output
    (tmp_path / "dup.csv").write_text("id,text,label,label\n1,hello,joy,anger\n")
    res = fs(root, "datasets", "add", "d", "--manifest", str(tmp_path / "dup.csv"), code=5)
    assert "['label']" in res.output and "more than once" in res.output
    (tmp_path / "alias.csv").write_text("id,text,label,emotion\n1,hello,joy,anger\n")
    res = fs(root, "datasets", "add", "a", "--manifest", str(tmp_path / "alias.csv"), code=5)
    assert "'label' and 'emotion'" in res.output
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "img" / "a.png")
    pl.DataFrame({"id": ["a", "b", "c", "d"], "image": ["img/a.png", "img/gone.png", "img/gone2.png", "img/a.png"],
                  "label": ["joy", "fear", None, None], "split": ["train"] * 4}).write_csv(tmp_path / "files.csv")
    res = CliRunner().invoke(cli, ["--store", str(root), "datasets", "add", "f", "--manifest",
                                   str(tmp_path / "files.csv")])
    assert res.exit_code == 0, res.output
    assert "warning: 2 image file(s) are missing or unreadable" in res.output and "gone.png" in res.output
    assert "warning: 2 of 4 item(s) have no target" in res.output
    info = json.loads(fs(root, "datasets", "add", "f", "--manifest", str(tmp_path / "files.csv"), "--replace",
                         "--json").output)
    assert len(info["warnings"]) == 2


def test_add_list_and_ls_use_the_same_words_for_a_binary_target(tmp_path):
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"id": f"w{i}", "text": f"word {i}", "label": "pos" if i % 2 else "neg"}) + "\n"
                            for i in range(6)))
    root = tmp_path / "store"
    added = fs(root, "datasets", "add", "two", "--manifest", str(path)).output
    assert "label: binary, 2 classes" in added
    listed = json.loads(fs(root, "datasets", "list", "--json").output)
    assert [r["label"] for r in listed] == ["2 classes (binary)"]
    assert "2 classes (binary)" in fs(root, "ls").output
