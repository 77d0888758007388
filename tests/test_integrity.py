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
