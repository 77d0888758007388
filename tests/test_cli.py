"""The `fs` commands as a user types them (in-process through click's runner)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from featurestore.cli import cli


@pytest.fixture
def fs(tmp_path):
    runner = CliRunner()
    root = str(tmp_path / "store")

    def invoke(*args, code=0):
        res = runner.invoke(cli, ["--store", root, *args], catch_exceptions=False)
        assert res.exit_code == code, (res.exit_code, res.output)
        return res
    return invoke


@pytest.fixture
def demo_store(fs):
    fs("init")
    fs("datasets", "add", "demo", "--builtin", "demo")
    return fs


def test_init_add_extract_ls_info_verify(demo_store):
    fs = demo_store
    out = json.loads(fs("extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm",
                        "--limit", "60", "--json").output)
    assert out["computed"] == 60 and out["failed_total"] == 0 and not out["cache_hit"]
    again = fs("extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--limit", "60")
    assert "cache hit" in again.output and "no model work" in again.output
    ls = json.loads(fs("ls", "--json").output)
    (feat,) = ls["features"]
    assert feat["rows"] == 60 and feat["backbone"] == "minilm" and feat["dim"] == 384
    assert ls["datasets"][0]["dataset"] == "demo"
    info = json.loads(fs("info", "demo", "--json").output)
    assert info["features"][0]["cached"] == 60
    spec = json.loads(fs("info", feat["fingerprint"], "--json").output)["spec"]
    assert spec["backbone"] == "minilm" and spec["weights_hash"]
    assert "ok" in fs("verify").output
    assert "demo" in fs("datasets", "list").output


def test_verify_fails_on_a_flipped_byte(demo_store, tmp_path):
    fs = demo_store
    fs("extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--limit", "20")
    (seg,) = (tmp_path / "store" / "features").glob("*/seg-*.h5")
    data = bytearray(seg.read_bytes())
    data[-100] ^= 0xFF
    seg.write_bytes(bytes(data))
    res = fs("verify", "--json", code=8)
    problems = json.loads(res.output)["problems"]
    assert any("checksum mismatch" in p["message"] for p in problems)


def test_gc_removes_temp_files_and_compacts(demo_store, tmp_path):
    fs = demo_store
    fs("extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--limit", "40",
       "--batch-size", "8", "--segment-rows", "8")
    (fp_dir,) = (tmp_path / "store" / "features").iterdir()
    assert len(list(fp_dir.glob("seg-*.h5"))) == 5
    (fp_dir / ".segment.h5.0badc0de.tmp").write_bytes(b"half a segment")
    fs("verify", code=8)
    report = json.loads(fs("gc", "--compact", "--json").output)
    assert len(report["removed_temp_files"]) == 1 and list(report["compacted"].values()) == [5]
    assert len(list(fp_dir.glob("seg-*.h5"))) == 1
    fs("verify")
    assert json.loads(fs("ls", "--json").output)["features"][0]["rows"] == 40


@pytest.mark.parametrize("args,code,match", [
    (["extract", "--dataset", "demo", "--modality", "text", "--backbone", "clip-vit-b33"], 4,
     "backbone 'clip-vit-b33' is not registered; known: .*minilm"),
    (["extract", "--dataset", "nope", "--modality", "text", "--backbone", "minilm"], 4, "dataset 'nope'"),
    (["extract", "--dataset", "demo", "--modality", "image", "--backbone", "minilm"], 2,
     "encodes text, not image; pick an image backbone"),
    (["extract", "--dataset", "demo", "--modality", "image", "--backbone", "fer"], 2, "no image inputs"),
    (["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "-p", "poolin=cls"], 2,
     "unknown parameter 'poolin'.*known: .*pooling"),
    (["extract", "--dataset", "demo", "--modality", "text", "--backbone", "hf-text",
      "--model", "no-such-org/no-such-model"], 7, "'no-such-org/no-such-model' is not in the local hub cache"),
])
def test_errors_name_the_value_and_exit_with_their_code(demo_store, args, code, match):
    import re

    res = demo_store(*args, code=code)
    assert re.search(match, res.output), res.output


def test_backbones_list_and_show(fs):
    out = json.loads(fs("backbones", "list", "--json").output)
    names = {b["name"]: b["modality"] for b in out}
    assert names["minilm"] == "text" and names["clip-image"] == "image" and names["wav2vec2"] == "audio"
    show = fs("backbones", "show", "minilm").output
    assert "seq_cap" in show and "pooling" in show


def test_other_store_version_is_refused(fs, tmp_path):
    fs("init")
    meta = tmp_path / "store" / "store.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "format_version": 99}))
    res = fs("ls", code=3)
    assert "format version 99" in res.output


def test_gc_keep_fingerprints_never_removes_a_datasets_only_embeddings(demo_store, tmp_path):
    """Review finding 8: a 2-item toy dataset extracted with `-p pooling=cls` is a newer fingerprint of
    minilm/text, but it does not cover demo, so `fs gc --keep-fingerprints 1` must keep demo's only
    embeddings. Once demo itself is extracted with the newer fingerprint, the old one may go."""
    fs = demo_store
    ext = ("extract", "--modality", "text", "--backbone", "minilm")
    demo_fp = json.loads(fs(*ext, "--dataset", "demo", "--limit", "12", "--json").output)["fingerprint"]
    (tmp_path / "toy.jsonl").write_text('{"id":"t1","text":"toy one","split":"train","label":"a"}\n'
                                        '{"id":"t2","text":"toy two","split":"train","label":"b"}\n')
    fs("datasets", "add", "toy", "--manifest", str(tmp_path / "toy.jsonl"))
    cls_fp = json.loads(fs(*ext, "--dataset", "toy", "-p", "pooling=cls", "--json").output)["fingerprint"]
    assert cls_fp != demo_fp
    features = tmp_path / "store" / "features"

    dry = json.loads(fs("gc", "--keep-fingerprints", "1", "--dry-run", "--json").output)["fingerprints"]
    assert dry["removed"] == [] and dry["kept_newest"] == {demo_fp: ["demo"]} and dry["by_dataset"] == {}
    out = fs("gc", "--keep-fingerprints", "1").output
    assert f"kept {demo_fp}: the newest extraction for dataset(s) demo" in out and "removed feature set" not in out
    assert (features / demo_fp / "spec.json").is_file() and (features / cls_fp / "spec.json").is_file()
    info = json.loads(fs("info", "demo", "--json").output)
    assert [f["cached"] for f in info["features"] if f["fingerprint"] == demo_fp] == [12]
    assert "ok" in fs("verify").output

    # demo extracted with the cls fingerprint too: the old one is superseded for its only dataset
    fs(*ext, "--dataset", "demo", "--limit", "12", "-p", "pooling=cls")
    dry = fs("gc", "--keep-fingerprints", "1", "--dry-run")
    assert f"dataset demo: would remove feature set {demo_fp} (superseded by {cls_fp})" in dry.output
    assert (features / demo_fp / "spec.json").is_file()
    gone = json.loads(fs("gc", "--keep-fingerprints", "1", "--json").output)["fingerprints"]
    assert gone["removed"] == [demo_fp] and gone["by_dataset"] == {"demo": [{"fingerprint": demo_fp,
                                                                              "superseded_by": cls_fp}]}
    assert not (features / demo_fp).exists() and (features / cls_fp / "spec.json").is_file()
    assert "ok" in fs("verify").output


def test_gc_keep_fingerprints_puts_a_half_replaced_run_back_before_judging_what_is_in_use(demo_store, tmp_path):
    """A run whose replacement was killed between its two renames lies as `.r1.<id>.old`: gc restores it
    first, so the feature set it was trained on counts as in use and is not removed under it."""
    fs = demo_store
    ext = ("extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--limit", "60")
    old_fp = json.loads(fs(*ext, "--json").output)["fingerprint"]
    fs("train-head", "--method", "linear", "--dataset", "demo", "--features", f"text={old_fp}", "--target",
       "label", "--run-id", "r1")
    new_fp = json.loads(fs(*ext, "-p", "pooling=cls", "--json").output)["fingerprint"]
    heads_dir = tmp_path / "store" / "heads"
    (heads_dir / "r1").rename(heads_dir / ".r1.1234abcd.old")
    dry = json.loads(fs("gc", "--keep-fingerprints", "1", "--dry-run", "--json").output)  # sees it too
    assert dry["fingerprints"]["removed"] == [] and dry["fingerprints"]["kept_in_use"] == {old_fp: ["run r1"]}
    assert not (heads_dir / "r1").exists()  # a dry run restores nothing
    out = json.loads(fs("gc", "--keep-fingerprints", "1", "--json").output)
    assert out["fingerprints"]["removed"] == [] and (heads_dir / "r1" / "lineage.json").is_file()
    assert [r["to"] for r in out["restored"]] == [str(heads_dir / "r1")]
    assert (tmp_path / "store" / "features" / old_fp / "spec.json").is_file() and new_fp != old_fp
    assert "ok" in fs("verify").output


def test_train_head_fsyncs_the_run_and_the_heads_folder(demo_store, tmp_path, monkeypatch):
    """Review finding 11: model.safetensors and config.json are fsynced before the run folder is
    renamed in, and heads/ after it."""
    import os

    fs = demo_store
    fs("extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm", "--limit", "120")
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fs("train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm", "--target", "label",
       "--run-id", "r1")
    monkeypatch.undo()
    heads = tmp_path / "store" / "heads"
    assert (heads / "r1" / "model.safetensors").is_file()
    names = {(os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p in synced}
    # fsynced under the temporary name the run folder had before its rename
    assert any(d.startswith(".r1.") and f == "model.safetensors" for d, f in names), sorted(names)
    assert any(d.startswith(".r1.") and f == "config.json" for d, f in names), sorted(names)
    assert str(heads) in synced
    last_tmp = max(i for i, p in enumerate(synced) if os.path.basename(p).startswith(".r1."))
    assert str(heads) in synced[last_tmp + 1:]  # heads/ after the run folder itself
