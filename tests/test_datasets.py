import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from featurestore.datasets import add_dataset, get_dataset, list_datasets, read_folder, read_manifest_file
from featurestore.errors import DatasetError, NotFoundError
from featurestore.hashing import content_key


def test_csv_manifest_with_aliases_and_pipe_separated_labels(tmp_path, store):
    (tmp_path / "m.csv").write_text(
        "id,split,emotion,labels,valence,speaker,text\n"
        "a,train,joy,joy|trust,0.5,s1,What a  lovely day\n"
        "b,validation,anger,anger,-0.4,s2,Stop it\n")
    df = read_manifest_file(tmp_path / "m.csv")
    ds = add_dataset(store, "tiny", df, root=tmp_path, source="test")
    m = ds.manifest
    assert m["item_id"].to_list() == ["a", "b"]
    assert m["split"].to_list() == ["train", "val"]  # aliases normalised
    assert m["labels"].to_list() == [["joy", "trust"], ["anger"]]
    assert m["group"].to_list() == ["s1", "s2"]
    # the content key of a text ignores whitespace differences
    assert m["text_key"][0] == content_key("text", "What a lovely day")
    assert ds.label_set == ["anger", "joy"] and ds.multilabel_set == ["anger", "joy", "trust"]
    assert get_dataset(store, "tiny").manifest_hash == ds.manifest_hash
    assert list_datasets(store) == ["tiny"]


def test_jsonl_and_parquet_manifests(tmp_path):
    rows = [{"id": 1, "text": "hello", "labels": ["joy"]}, {"id": 2, "text": "bye", "labels": ["sadness"]}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    a = read_manifest_file(tmp_path / "m.jsonl")
    pl.DataFrame(rows).write_parquet(tmp_path / "m.parquet")
    b = read_manifest_file(tmp_path / "m.parquet")
    assert a["item_id"].to_list() == b["item_id"].to_list() == ["1", "2"]
    assert set(a["split"]) <= {"train", "val", "test"}  # no split column: a stable hash split


def test_bad_jsonl_line_is_named(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"id": 1, "text": "a"}\n{oops\n')
    with pytest.raises(DatasetError, match="line 2"):
        read_manifest_file(tmp_path / "m.jsonl")


@pytest.mark.parametrize("content,match", [
    ("id,text\na,x\na,y\n", "duplicate item ids"),
    ("id,label\na,joy\n", "no modality column"),
    ("text,label\nx,joy\n", "no 'id'"),
    ("id,text,valence\na,x,3.0\n", "outside \\[-1, 1\\]"),
])
def test_bad_manifests_are_explained(tmp_path, content, match):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(DatasetError, match=match):
        read_manifest_file(tmp_path / "m.csv")


def test_paths_resolve_against_root_and_escapes_are_refused(tmp_path, store):
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4), "red").save(root / "img" / "a.png")
    (tmp_path / "outside.png").write_bytes((root / "img" / "a.png").read_bytes())
    (root / "m.csv").write_text("id,image\na,img/a.png\nb,../outside.png\n")
    df = read_manifest_file(root / "m.csv")
    with pytest.raises(DatasetError, match="escape the dataset root"):
        add_dataset(store, "d", df, root=root, source="t")
    ds = add_dataset(store, "d", df, root=root, source="t", allow_outside_root=True)
    assert ds.manifest["image"][0] == str((root / "img" / "a.png").resolve())
    assert ds.manifest["image_key"][0] == ds.manifest["image_key"][1]  # same bytes, same key


def test_file_paths_need_a_root(tmp_path, store):
    (tmp_path / "m.csv").write_text("id,image\na,a.png\n")
    with pytest.raises(DatasetError, match="--root"):
        add_dataset(store, "d", read_manifest_file(tmp_path / "m.csv"), root=None, source="t")


def test_missing_file_gets_no_key(tmp_path, store):
    (tmp_path / "m.csv").write_text("id,image\na,nothere.png\n")
    ds = add_dataset(store, "d", read_manifest_file(tmp_path / "m.csv"), root=tmp_path, source="t")
    assert ds.manifest["image_key"][0] is None


def test_folder_layout_with_splits(tmp_path):
    for split in ("train", "test"):
        for cls in ("happy", "sad"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(d / "x.png")
    (tmp_path / "train" / "happy" / "notes.txt").write_text("ignored")
    df = read_folder(tmp_path)
    assert sorted(df["split"].to_list()) == ["test", "test", "train", "train"]
    assert sorted(df["label"].to_list()) == ["happy", "happy", "sad", "sad"]
    assert df["image"].null_count() == 0 and df["audio"].null_count() == 4


def test_folder_without_media_is_explained(tmp_path):
    (tmp_path / "happy").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        read_folder(tmp_path)


def test_demo_is_built_from_real_lexicons(demo_df):
    assert len(demo_df) > 5000
    row = demo_df.filter(pl.col("item_id") == "abandoned").row(0, named=True)
    assert row["label"] == "negative" and "fear" in row["labels"]
    rated = demo_df.filter(pl.col("valence").is_not_null())
    assert len(rated) > 1000
    happy = demo_df.filter(pl.col("item_id") == "happy")["valence"][0]
    assert happy > 0.4  # VADER rates "happy" about +2.7 on [-4, 4]
    assert np.isclose(demo_df["split"].value_counts().filter(pl.col("split") == "train")["count"][0] / len(demo_df),
                      0.8, atol=0.03)


def test_unknown_dataset_lists_known(store):
    with pytest.raises(NotFoundError, match="known: none"):
        get_dataset(store, "nope")


def test_replace_is_explicit(store, demo_df):
    add_dataset(store, "d", demo_df.head(5), root=None, source="t")
    with pytest.raises(DatasetError, match="--replace"):
        add_dataset(store, "d", demo_df.head(5), root=None, source="t")
    assert add_dataset(store, "d", demo_df.head(7), root=None, source="t", replace=True).info["n_items"] == 7


def test_a_misspelt_column_is_a_warning_naming_the_column_it_meant(store, tmp_path):
    from featurestore.datasets import manifest_warnings

    path = tmp_path / "m.csv"
    path.write_text("id,text,splt,lable,notes\na,hi there,test,joy,x\nb,so sad,train,sad,y\n")
    ds = add_dataset(store, "t", read_manifest_file(path), root=None, source="t")
    warned = manifest_warnings(ds.manifest)
    assert any("'splt'" in w and "did you mean 'split'" in w for w in warned)
    assert any("'lable'" in w and "did you mean 'label'" in w for w in warned)
    assert not any("'notes'" in w for w in warned)
