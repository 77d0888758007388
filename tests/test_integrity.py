"""Issue 10: a store that never loses a row and never lies (real files, real subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from featurestore.cli import cli
from featurestore.datasets import add_dataset, get_dataset, read_manifest_file
from featurestore.features import FeatureSet, list_feature_sets
from featurestore.reader import load_split
from jobs.extract import ExtractConfig, run


def fs_cli(store, *args):
    return CliRunner().invoke(cli, ["--store", str(store.root), *args], catch_exceptions=False)


def two_datasets(store, tmp_path, minilm):
    """Defect 1's reproduction: dataset b's only new input is empty, so its batch has no rows."""
    (tmp_path / "a.jsonl").write_text('{"id": "a1", "text": "calm lake", "split": "train"}\n'
                                      '{"id": "a2", "text": "angry crowd", "split": "train"}\n')
    (tmp_path / "b.jsonl").write_text('{"id": "b1", "text": "calm lake", "split": "train"}\n'
                                      '{"id": "b2", "text": "  ", "split": "train"}\n')
    for name in ("a", "b"):
        add_dataset(store, name, read_manifest_file(tmp_path / f"{name}.jsonl"), root=None, source="t")
        run(ExtractConfig(dataset=name, modality="text", backbone="minilm"), store, backbone=minilm)
    (fs,) = list_feature_sets(store)
    return fs


def test_a_batch_with_no_rows_keeps_the_store_readable(store, tmp_path, minilm):
    fs = two_datasets(store, tmp_path, minilm)
    assert len(fs.segments.segments()) == 2
    data = load_split(store, "a", "train", {"text": "minilm"})
    assert data.masks["text"].all()
    keys, rows = fs.scan_pooled()
    assert len(keys) == 2 and rows.shape == (2, 384)
    assert fs_cli(store, "verify").exit_code == 0


def test_compaction_keeps_every_row_of_a_set_with_a_rowless_segment(store, tmp_path, minilm):
    fs = two_datasets(store, tmp_path, minilm)
    before = load_split(store, "a", "train", {"text": "minilm"}).features["text"]
    res = fs_cli(store, "gc", "--compact")
    assert res.exit_code == 0, res.output
    assert len(fs.segments.segments()) == 1
    after = load_split(store, "a", "train", {"text": "minilm"})
    assert after.masks["text"].all()
    np.testing.assert_array_equal(after.features["text"], before)
    assert len(fs.errors()) == 1 and fs_cli(store, "verify").exit_code == 0


def test_compaction_refuses_to_delete_when_the_merge_is_short(store, tmp_path, minilm, monkeypatch):
    """The merged segment is checked (rows, arrays, checksum) before any old segment goes."""
    from featurestore import segments as seg_mod
    from featurestore.errors import IntegrityError

    fs = two_datasets(store, tmp_path, minilm)
    old = sorted(s.path.name for s in fs.segments.segments())
    real = seg_mod._segment_image

    def lossy(keys, dense, ragged, errors, attrs):  # a merge that drops the pooled array
        return real(keys, {}, ragged, errors, attrs)
    monkeypatch.setattr(seg_mod, "_segment_image", lossy)
    with pytest.raises(IntegrityError, match="nothing deleted"):
        fs.segments.compact()
    monkeypatch.undo()
    assert sorted(s.path.name for s in fs.segments.segments()) == old  # the bad merge was withdrawn
    assert load_split(store, "a", "train", {"text": "minilm"}).masks["text"].all()
    assert fs_cli(store, "verify").exit_code == 0


# ---- defect 2: verify catches deletions, missing rows, damaged heads and memories ----------------
@pytest.fixture
def trained(store, demo_df, minilm):
    """120 demo words in 4 segments, a linear head trained on them, a memory saved beside it."""
    from featurestore.memory import Memory, memory_path

    add_dataset(store, "words", demo_df.head(120), root=None, source="t")
    run(ExtractConfig(dataset="words", modality="text", backbone="minilm", segment_rows=32), store, backbone=minilm)
    res = fs_cli(store, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
                 "--run-id", "r1", "--json")
    assert res.exit_code == 0, res.output
    mem = Memory(8)
    mem.add(np.arange(5), np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32),
            {"item_id": [f"i{i}" for i in range(5)], "class": ["a"] * 5})
    mem.save(memory_path(store, "m1"))
    assert fs_cli(store, "verify").exit_code == 0
    return store


def test_a_deleted_segment_is_found_and_training_warns(trained):
    store = trained
    (fs,) = list_feature_sets(store)
    assert len(fs.segments.segments()) == 4
    victim = fs.segments.segments()[1].path
    victim.unlink()
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8
    messages = " ".join(p["message"] for p in json.loads(res.output)["problems"])
    assert "missing: it was deleted" in messages and "rows dataset words needs are missing" in messages
    out = CliRunner().invoke(cli, ["--store", str(store.root), "train-head", "--method", "linear", "--dataset", "words",
                                   "--features", "text=minilm", "--run-id", "r2"], catch_exceptions=False)
    assert out.exit_code == 0
    assert "have no cached features" in out.output and "split 'train'" in out.output


@pytest.mark.parametrize("target", ["segment", "catalogue", "spec", "manifest", "dataset.json", "head weights",
                                    "head config", "faiss index", "memory meta"])
def test_a_flipped_byte_anywhere_is_exit_8(trained, target):
    store = trained
    (fs,) = list_feature_sets(store)
    path = {"segment": lambda: fs.segments.segments()[0].path, "catalogue": lambda: fs.segments.catalogue_path,
            "spec": lambda: fs.spec_path, "manifest": lambda: store.dataset_dir("words") / "manifest.parquet",
            "dataset.json": lambda: store.dataset_dir("words") / "dataset.json",
            "head weights": lambda: store.heads_dir() / "r1" / "model.safetensors",
            "head config": lambda: store.heads_dir() / "r1" / "config.json",
            "faiss index": lambda: store.memory_dir() / "m1" / "index.faiss",
            "memory meta": lambda: store.memory_dir() / "m1" / "meta.parquet"}[target]()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8, res.output
    assert json.loads(res.output)["problems"]
