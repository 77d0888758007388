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
