"""fs extract on real models: dedup, cache hits, bad items, kill-and-resume, verify."""
from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from _faults import failing_reads
import soundfile as sf
from PIL import Image

from featurestore.datasets import add_dataset, get_dataset, read_manifest_file
from featurestore.inventory import coverage
from featurestore.errors import ConfigError
from featurestore.features import FeatureSet, list_feature_sets
from featurestore.reader import load_split
from featurestore.jobs.extract import ExtractConfig, run


class Counting:
    """Wraps a real backbone and counts forward passes (instrumentation, not a mock)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, items):
        self.calls += 1
        return self.inner.encode(items)


def words_dataset(store, demo_df, n=40, name="words"):
    df = demo_df.head(n)
    return add_dataset(store, name, df, root=None, source="test")


def test_minilm_on_real_words_then_cache_hit(store, demo_df, minilm):
    words_dataset(store, demo_df)
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=8)
    bb = Counting(minilm)
    first = run(cfg, store, backbone=bb)
    assert first.computed == 40 and first.failed_new == 0 and bb.calls == 5
    again = Counting(minilm)
    second = run(cfg, store, backbone=again)
    assert second.cache_hit and second.cached == 40 and again.calls == 0
    data = load_split(store, "words", "train", {"text": "minilm"})
    assert data.masks["text"].all()
    emb = data.features["text"]
    assert emb.dtype == np.float32 and emb.shape[1] == 384
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=2e-3)  # MiniLM is L2-normalised


def test_identical_inputs_across_datasets_are_computed_once(store, demo_df, minilm):
    words_dataset(store, demo_df, 20, "a")
    b = demo_df.head(30).with_columns(pl.col("item_id") + "-b")  # 20 shared texts, 10 new
    add_dataset(store, "b", b, root=None, source="t")
    run(ExtractConfig(dataset="a", modality="text", backbone="minilm"), store, backbone=minilm)
    res = run(ExtractConfig(dataset="b", modality="text", backbone="minilm"), store, backbone=minilm)
    assert (res.cached, res.computed) == (20, 10)


def test_related_words_are_closer_with_the_real_model(minilm):
    e = minilm.encode([minilm.prepare(w) for w in ("furious", "angry", "delighted")]).pooled
    assert e[0] @ e[1] > e[0] @ e[2]


def test_bad_text_items_are_recorded_and_the_job_goes_on(store, tmp_path, minilm):
    (tmp_path / "m.jsonl").write_text('{"id": "ok", "text": "calm"}\n{"id": "blank", "text": "   "}\n'
                                      '{"id": "none", "label": "x"}\n')
    add_dataset(store, "t", read_manifest_file(tmp_path / "m.jsonl"), root=None, source="t")
    res = run(ExtractConfig(dataset="t", modality="text", backbone="minilm"), store, backbone=minilm)
    assert (res.computed, res.failed_new, res.failed_total) == (1, 1, 1)
    (err,) = FeatureSet(store, res.fingerprint).errors()
    assert (err.item_id, err.reason) == ("blank", "empty text")
    again = run(ExtractConfig(dataset="t", modality="text", backbone="minilm"), store, backbone=minilm)
    assert again.cache_hit and again.failed_total == 1  # known failures are not retried or re-recorded
    assert len(FeatureSet(store, res.fingerprint).errors()) == 1


def test_undecodable_text_bytes_are_a_bad_item(minilm):
    from featurestore.errors import BadItemError

    with pytest.raises(BadItemError, match="not valid UTF-8"):
        minilm.prepare(b"\xff\xfe\xfa")


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_images_are_recorded_with_reasons(store, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "good1.png").write_bytes(_png("white"))
    (root / "good2.png").write_bytes(_png("gray"))
    (root / "empty.png").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "truncated.png").write_bytes(_png("black")[:60])
    rows = ["good1", "good2", "empty", "corrupt", "truncated", "gone"]
    (root / "m.csv").write_text("id,image,label\n" + "".join(f"{r},{r}.png,x\n" for r in rows))
    add_dataset(store, "imgs", read_manifest_file(root / "m.csv"), root=root, source="t")
    res = run(ExtractConfig(dataset="imgs", modality="image", backbone="fer", batch_size=4), store)
    assert (res.computed, res.failed_new) == (2, 4)
    reasons = {e.item_id: e.reason for e in FeatureSet(store, res.fingerprint).errors()}
    assert set(reasons) == {"empty", "corrupt", "truncated", "gone"}
    assert "missing file" in reasons["gone"]
    assert all(reasons[k] for k in ("empty", "corrupt", "truncated"))


def test_bad_audio_is_recorded(store, tmp_path):
    root = tmp_path / "aud"
    root.mkdir()
    t = np.linspace(0, 1, 16000, dtype=np.float32)
    sf.write(root / "tone.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 16000)
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 16000)
    (root / "junk.wav").write_bytes(os.urandom(300))
    (root / "m.csv").write_text("id,audio\ntone,tone.wav\nempty,empty.wav\njunk,junk.wav\n")
    add_dataset(store, "aud", read_manifest_file(root / "m.csv"), root=root, source="t")
    res = run(ExtractConfig(dataset="aud", modality="audio", backbone="resemblyzer"), store)
    assert (res.computed, res.failed_new) == (1, 2)


def test_wrong_modality_backbone_is_refused_before_work(store, demo_df, minilm):
    words_dataset(store, demo_df, 5)
    with pytest.raises(ConfigError, match="encodes text, not image"):
        run(ExtractConfig(dataset="words", modality="image", backbone="minilm"), store, backbone=minilm)
    assert list_feature_sets(store) == []


def test_file_changed_after_add_is_a_bad_item_not_a_wrong_row(store, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_png("white"))
    (root / "m.csv").write_text("id,image\na,a.png\n")
    add_dataset(store, "imgs", read_manifest_file(root / "m.csv"), root=root, source="t")
    (root / "a.png").write_bytes(_png("black"))
    res = run(ExtractConfig(dataset="imgs", modality="image", backbone="fer"), store)
    (err,) = FeatureSet(store, res.fingerprint).errors()
    assert "changed since the dataset was added" in err.reason


def _fs(*args, store, **kw):
    return subprocess.Popen([sys.executable, "-m", "featurestore.cli", "--store", str(store), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_rows(tmp_path, demo_df):
    n, args = 700, ["extract", "--dataset", "demo", "--modality", "text", "--backbone", "minilm",
                    "--batch-size", "16", "--segment-rows", "32"]
    stores = {}
    for name in ("killed", "clean"):
        from featurestore.store import open_store

        s = open_store(tmp_path / name, create=True)
        add_dataset(s, "demo", demo_df.head(n), root=None, source="t")
        stores[name] = s
    clean = _fs(*args, store=stores["clean"].root)
    victim = _fs(*args, store=stores["killed"].root)
    # a handshake, not a timer: kill once the victim has published 3 segments (of about 22), however
    # slow a loaded machine is; the deadline only guards against a victim that hangs
    deadline = time.time() + 600
    fp_dir = stores["killed"].features_dir()
    while time.time() < deadline and victim.poll() is None:
        segs = list(fp_dir.glob("*/seg-*.h5")) if fp_dir.exists() else []
        if len(segs) >= 3:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert clean.wait(timeout=300) == 0, clean.stderr.read()
    (fs_killed,) = list_feature_sets(stores["killed"])
    partial = len(fs_killed.index(refresh=True).unique_keys())
    assert 0 < partial < n, "the kill must land mid-run for this test to mean anything"
    resumed = _fs(*args, "--json", store=stores["killed"].root)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    import json

    summary = json.loads(out)
    assert summary["cached"] == partial and summary["computed"] == n - partial
    (fs_clean,) = list_feature_sets(stores["clean"])
    assert fs_clean.fingerprint == fs_killed.fingerprint
    from featurestore.datasets import get_dataset

    keys = np.array(get_dataset(stores["clean"], "demo").manifest["text_key"].to_list(), dtype="S32")
    a, pa = fs_killed.read_pooled(keys)
    b, pb = fs_clean.read_pooled(keys)
    assert pa.all() and pb.all()
    assert a.tobytes() == b.tobytes()  # bit-identical
    assert len(fs_killed.index(refresh=True)._keys) == n  # no duplicate rows
    verify = _fs("verify", store=stores["killed"].root)
    assert verify.wait(timeout=60) == 0, verify.stdout.read()


def test_rerun_recognises_a_finished_extraction_without_loading_the_model(store, demo_df, minilm):
    from featurestore import backbones

    words_dataset(store, demo_df, 10)
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm")
    first = run(cfg, store, backbone=backbones.create("minilm"))
    fresh = backbones.create("minilm")
    again = run(cfg, store, backbone=fresh)
    assert again.cache_hit and again.fingerprint == first.fingerprint
    assert not fresh._loaded  # the remembered spec named the fingerprint: no weights read at all


def test_a_wrong_remembered_spec_is_caught_before_rows_are_written(store, demo_df):
    from featurestore import backbones, spec_cache

    words_dataset(store, demo_df, 10)
    truth = run(ExtractConfig(dataset="words", modality="text", backbone="minilm"), store,
                backbone=backbones.create("minilm"))
    bb = backbones.create("minilm")
    bogus = {**bb.load().spec(), "weights_hash": "not-the-weights"}
    spec_cache.remember(store, backbones.create("minilm"), bogus)
    add_dataset(store, "more", demo_df.slice(10, 5), root=None, source="t")
    res = run(ExtractConfig(dataset="more", modality="text", backbone="minilm"), store,
              backbone=backbones.create("minilm"))
    assert res.fingerprint == truth.fingerprint and res.computed == 5
    assert spec_cache.lookup(store, backbones.create("minilm"))["weights_hash"] != "not-the-weights"
    assert [f.fingerprint for f in list_feature_sets(store)] == [truth.fingerprint]


# ---- one bad item alone in its batch, unreadable storage, one item too big for memory -------------
class Poisoned:
    """A real backbone whose forward pass raises for one chosen input (the failure injection only):
    counts how often that input reaches the model."""

    def __init__(self, inner, text, exc=lambda t: ValueError(f"tokenizer blew up on {t!r}")):
        self.inner, self.poison, self.exc, self.poison_calls = inner, inner.prepare(text), exc, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, items):
        if self.poison in items:
            self.poison_calls += 1
            raise self.exc(self.poison)
        return self.inner.encode(items)


@pytest.mark.parametrize("n, batch, poison", [(17, 8, 16),  # alone in the last batch (17 mod 8 == 1)
                                              (5, 1, 2)])  # --batch-size 1
def test_a_bad_item_alone_in_its_batch_is_recorded_and_the_job_goes_on(store, demo_df, minilm, n, batch, poison):
    words_dataset(store, demo_df, n)
    text = demo_df["text"][poison]
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=batch)
    bb = Poisoned(minilm, text)
    res = run(cfg, store, backbone=bb)
    assert (res.computed, res.failed_new, res.failed_total) == (n - 1, 1, 1)
    assert bb.poison_calls == 1  # recorded from the one failure, not encoded a second time
    (err,) = FeatureSet(store, res.fingerprint).errors()
    assert err.item_id == demo_df["item_id"][poison]
    assert err.reason.startswith("backbone failed on this item: ValueError: tokenizer blew up")
    again = Poisoned(minilm, text)
    second = run(cfg, store, backbone=again)  # the job finished: a rerun has nothing left to do
    assert second.cache_hit and second.failed_total == 1 and again.poison_calls == 0


def _faces(store, tmp_path, n=6):
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(n):
        (root / f"{i}.png").write_bytes(_png((40 * i, 255 - 30 * i, 7 * i)))  # distinct bytes: distinct keys
    (root / "m.csv").write_text("id,image\n" + "".join(f"f{i},{i}.png\n" for i in range(n)))
    add_dataset(store, "faces", read_manifest_file(root / "m.csv"), root=root, source="t")
    return root


@pytest.mark.parametrize("code", ["EIO", "ESTALE", "ETIMEDOUT", "EMFILE", "ENOMEM"])
def test_an_io_error_reading_an_input_stops_the_job_records_nothing_and_a_rerun_retries(
        store, tmp_path, monkeypatch, code):
    import errno

    from click.testing import CliRunner

    from featurestore.cli import cli
    from featurestore.errors import InputReadError

    _faces(store, tmp_path)
    cfg = ExtractConfig(dataset="faces", modality="image", backbone="fer", batch_size=2)
    failing_reads(monkeypatch, {"3.png": getattr(errno, code)})
    with pytest.raises(InputReadError, match=f"cannot read .*3.png: .*{code}.*not the item"):
        run(cfg, store)
    (fs,) = list_feature_sets(store)
    assert fs.errors() == []  # nothing recorded against the item (or any other)
    assert len(fs.index(refresh=True).unique_keys()) == 2  # the batch before it is kept
    out = CliRunner().invoke(cli, ["--store", str(store.root), "extract", "--dataset", "faces", "--modality",
                                   "image", "--backbone", "fer", "--batch-size", "2"])
    assert out.exit_code == InputReadError.exit_code
    (line,) = [line for line in out.output.splitlines() if line.startswith("error:")]  # progress lines aside
    assert line.startswith("error: cannot read") and "not the item" in line and "Traceback" not in out.output
    monkeypatch.undo()  # the disk is back
    again = run(cfg, store)  # no --retry-errors needed
    assert (again.cached, again.computed, again.failed_total) == (2, 4, 0)


def test_a_missing_dataset_root_stops_the_job_with_one_line_and_records_nothing(store, tmp_path):
    from click.testing import CliRunner

    from featurestore.cli import cli
    from featurestore.errors import InputReadError

    root = _faces(store, tmp_path)
    root.rename(tmp_path / "unmounted")
    cfg = ExtractConfig(dataset="faces", modality="image", backbone="fer", batch_size=2)
    with pytest.raises(InputReadError, match=f"root {root} of dataset 'faces' is missing"):
        run(cfg, store)
    out = CliRunner().invoke(cli, ["--store", str(store.root), "extract", "--dataset", "faces", "--modality",
                                   "image", "--backbone", "fer"])
    assert out.exit_code == InputReadError.exit_code
    (line,) = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: the dataset root {root} of dataset 'faces' is missing")
    assert "--replace --root" in line
    assert "Traceback" not in out.output
    assert all(fs.errors() == [] for fs in list_feature_sets(store))
    (tmp_path / "unmounted").rename(root)
    again = run(cfg, store)
    assert (again.computed, again.failed_total) == (6, 0)


def test_an_unmounted_disk_leaving_an_empty_mount_point_is_a_missing_root(store, tmp_path):
    """The root folder is still there but empty, as a mount point is without its disk: the job stops
    and records nothing, rather than recording every item as a missing file."""
    from featurestore.errors import InputReadError

    root = _faces(store, tmp_path)
    root.rename(tmp_path / "disk")
    root.mkdir()  # the empty mount point
    cfg = ExtractConfig(dataset="faces", modality="image", backbone="fer", batch_size=2)
    with pytest.raises(InputReadError, match=f"root {root} of dataset 'faces' is missing"):
        run(cfg, store)
    assert all(fs.errors() == [] for fs in list_feature_sets(store))
    root.rmdir()
    (tmp_path / "disk").rename(root)
    assert run(cfg, store).failed_total == 0


def test_a_root_that_vanishes_mid_run_stops_the_job_not_records_the_rest(store, tmp_path, monkeypatch):
    """The mount goes away after the job started: ENOENT for every file, but not the items' fault."""
    import pathlib

    from featurestore.errors import InputReadError

    root = _faces(store, tmp_path)
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name == "2.png" and root.exists():
            root.rename(tmp_path / "gone")  # a real ENOENT for this and every later file
        return real(self)
    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(InputReadError, match="root .* is missing"):
        run(ExtractConfig(dataset="faces", modality="image", backbone="fer", batch_size=2), store)
    (fs,) = list_feature_sets(store)
    assert fs.errors() == [] and len(fs.index(refresh=True).unique_keys()) == 2


def test_files_that_are_the_items_fault_are_still_recorded(store, tmp_path, monkeypatch):
    import errno

    root = _faces(store, tmp_path)
    (root / "1.png").unlink()  # deleted since `datasets add`, its root still there
    failing_reads(monkeypatch, {"4.png": errno.EACCES})
    res = run(ExtractConfig(dataset="faces", modality="image", backbone="fer", batch_size=2), store)
    assert (res.computed, res.failed_new) == (4, 2)
    reasons = {e.item_id: e.reason for e in FeatureSet(store, res.fingerprint).errors()}
    assert "No such file" in reasons["f1"] and "Permission denied" in reasons["f4"]


def test_an_item_that_alone_runs_out_of_memory_is_recorded_and_retry_errors_retries_it(store, demo_df, minilm):
    words_dataset(store, demo_df, 12)
    text = demo_df["text"][5]
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=4)
    bb = Poisoned(minilm, text, exc=lambda t: MemoryError(f"cannot allocate for {t!r}"))
    res = run(cfg, store, backbone=bb)
    assert (res.computed, res.failed_new, res.failed_total) == (11, 1, 1)
    assert bb.poison_calls == 2  # in its batch, then alone
    (err,) = FeatureSet(store, res.fingerprint).errors()
    assert err.item_id == demo_df["item_id"][5] and "out of memory on this item alone" in err.reason
    assert run(cfg, store, backbone=Counting(minilm)).cache_hit  # not retried by a plain rerun
    fixed = Counting(minilm)  # more memory now: --retry-errors computes it
    retried = run(dataclasses.replace(cfg, retry_errors=True), store, backbone=fixed)
    assert (retried.cached, retried.computed, retried.failed_new) == (11, 1, 0) and fixed.calls == 1
    # computed now: the record no longer counts as a failure anywhere, though it is kept
    fs = FeatureSet(store, res.fingerprint)
    assert retried.failed_total == 0 and fs.errors() == [] and fs.errors(resolved=True) == [err]
    assert [r["failed"] for r in coverage(store, get_dataset(store, "words"))] == [0]


def test_a_failure_of_an_input_since_replaced_no_longer_counts(store, tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png((40 * i, 90, 7 * i)))
    (root / "m.csv").write_text("id,image\n" + "".join(f"f{i},{i}.png\n" for i in range(3)))
    good = (root / "1.png").read_bytes()
    (root / "1.png").write_bytes(b"not an image")  # unreadable content: recorded against its key
    add_dataset(store, "faces", read_manifest_file(root / "m.csv"), root=root, source="t")
    cfg = ExtractConfig(dataset="faces", modality="image", backbone="fer")
    res = run(cfg, store)
    assert (res.computed, res.failed_new, res.failed_total) == (2, 1, 1)
    ds = get_dataset(store, "faces")
    assert [r["failed"] for r in coverage(store, ds)] == [1]
    (root / "1.png").write_bytes(good)  # fixed, and registered again: a new content key
    add_dataset(store, "faces", read_manifest_file(root / "m.csv"), root=root, source="t", replace=True)
    again = run(cfg, store)
    assert (again.computed, again.failed_new, again.failed_total) == (1, 0, 0)
    assert [r["failed"] for r in coverage(store, get_dataset(store, "faces"))] == [0]
    fs = FeatureSet(store, res.fingerprint)
    assert [e.item_id for e in fs.errors()] == ["f1"]  # the old content still has no row: kept in the set
    assert fs.standing_errors(get_dataset(store, "faces")) == []


def test_out_of_memory_on_every_item_alone_stops_the_job_and_records_nothing(store, demo_df, minilm):
    from featurestore.errors import BackboneError

    words_dataset(store, demo_df, 8)

    class Starved(Counting):
        def encode(self, items):
            self.calls += 1
            if self.calls > 1:  # the first batch fits; then the machine runs out of memory
                raise MemoryError()
            return self.inner.encode(items)
    bb = Starved(minilm)
    with pytest.raises(BackboneError, match="not about an item"):
        run(ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=4), store, backbone=bb)
    assert bb.calls == 1 + 1 + 4  # batch 1, batch 2, then each of its items alone
    (fs,) = list_feature_sets(store)
    assert fs.errors() == [] and len(fs.index(refresh=True).unique_keys()) == 4



class Broken:
    """A real backbone that is broken for its first `first` items (the failure injection only): every
    forward pass raises (or, with `nan`, returns NaN rows) until `first` items have failed alone."""

    def __init__(self, inner, first=10**9, nan=False):
        self.inner, self.left, self.nan = inner, first, nan

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, items):
        if self.left <= 0:
            return self.inner.encode(items)
        if len(items) == 1:
            self.left -= 1
        if self.nan:
            enc = self.inner.encode(items)
            return dataclasses.replace(enc, pooled=np.full_like(enc.pooled, np.nan))
        raise RuntimeError("size mismatch for encoder.layer.0.weight")


@pytest.mark.parametrize("n, nan", [(40, False), (40, True), (3, False)])
def test_a_backbone_that_fails_on_every_item_stops_the_job_and_records_nothing(store, demo_df, minilm, n, nan):
    from featurestore.errors import BackboneError

    words_dataset(store, demo_df, n)
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=8)
    with pytest.raises(BackboneError, match=f"failed on all {min(n, 32)} items it was given .* computed none"):
        run(cfg, store, backbone=Broken(minilm, nan=nan))
    (fs,) = list_feature_sets(store)
    assert fs.errors(resolved=True) == [] and len(fs.index(refresh=True).unique_keys()) == 0
    res = run(cfg, store, backbone=minilm)  # fixed: everything is computed, no --retry-errors needed
    assert (res.computed, res.failed_total) == (n, 0)


def test_a_broken_backbone_is_one_line_and_exit_code_7_at_the_cli(store, demo_df, minilm, monkeypatch):
    from _cli import fs

    import featurestore.jobs.extract as ex

    words_dataset(store, demo_df, 5)
    real = ex.backbones.create
    monkeypatch.setattr(ex.backbones, "create", lambda *a, **k: Broken(real(*a, **k)))
    r = fs(store.root, "extract", "--dataset", "words", "--modality", "text", "--backbone", "minilm", code=7)
    assert "Traceback" not in r.output and "failed on all 5 items it was given" in r.output
    assert "size mismatch" in r.output


def test_failures_held_before_the_first_row_are_recorded_once_the_backbone_works(store, demo_df, minilm, monkeypatch):
    from featurestore.jobs.extract import Breaker

    monkeypatch.setattr(Breaker, "LIMIT", 6)
    words_dataset(store, demo_df, 20)
    bb = Broken(minilm, first=5)  # the first 5 items fail, then it works
    res = run(ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=1), store, backbone=bb)
    assert (res.computed, res.failed_new, res.failed_total) == (15, 5, 5)
    fs = FeatureSet(store, res.fingerprint)
    assert sorted(e.item_id for e in fs.errors()) == sorted(demo_df["item_id"][:5].to_list())
    assert all("size mismatch" in e.reason for e in fs.errors())


def test_a_one_item_job_whose_item_fails_still_records_it(store, demo_df, minilm):
    words_dataset(store, demo_df, 1)
    res = run(ExtractConfig(dataset="words", modality="text", backbone="minilm"), store, backbone=Broken(minilm))
    assert (res.computed, res.failed_new, res.failed_total) == (0, 1, 1)


class FailsOn:
    """A real backbone whose forward pass raises for any batch holding one of `texts` (the failure
    injection only), with a reason that can change between runs."""

    def __init__(self, inner, texts, reason="tokenizer blew up"):
        self.inner, self.poison, self.reason = inner, {inner.prepare(t) for t in texts}, reason

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, items):
        if any(it in self.poison for it in items):
            raise ValueError(self.reason)
        return self.inner.encode(items)


def test_once_a_backbone_has_worked_its_failures_are_the_items_and_are_recorded(store, demo_df, minilm,
                                                                                 monkeypatch):
    """Review: a model with rows in the set is never judged broken, in this job or a later one: an
    incremental run or a --retry-errors run whose only items are bad records them."""
    from featurestore.jobs.extract import Breaker

    monkeypatch.setattr(Breaker, "LIMIT", 4)
    words_dataset(store, demo_df, 8)
    texts = demo_df["text"].to_list()
    bb = FailsOn(minilm, texts[1:8])  # the first item computes, then 7 failures in a row: more than LIMIT
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=1)
    res = run(cfg, store, backbone=bb)
    assert (res.computed, res.failed_new, res.failed_total) == (1, 7, 7)
    add_dataset(store, "more", demo_df.slice(20, 3), root=None, source="t")  # 3 new items, all bad
    more = run(dataclasses.replace(cfg, dataset="more"), store, backbone=FailsOn(minilm, texts[20:23]))
    assert (more.computed, more.failed_new, more.failed_total) == (0, 3, 3)
    again = run(dataclasses.replace(cfg, retry_errors=True), store, backbone=FailsOn(minilm, texts[1:8]))
    assert (again.computed, again.failed_new, again.failed_total) == (0, 7, 7)


def test_the_newest_reason_of_an_item_is_the_one_kept(store, demo_df, minilm):
    from featurestore.verify import gc_store

    words_dataset(store, demo_df, 4)
    text = demo_df["text"][2]
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=1, retry_errors=True)
    for i in range(5):  # one segment a run: their names (content hashes) sort in no particular order
        res = run(cfg, store, backbone=FailsOn(minilm, [text], reason=f"reason {i}"))
        fs = FeatureSet(store, res.fingerprint)
        (err,) = fs.errors()  # one record per item, not one per run
        assert err.reason.endswith(f"reason {i}") and len(fs.errors(resolved=True)) == 1
    gc_store(store, compact=True)
    (err,) = FeatureSet(store, res.fingerprint).errors()
    assert err.reason.endswith("reason 4") and len(FeatureSet(store, res.fingerprint).segments.segments()) == 1


def test_a_small_job_whose_model_fails_on_every_item_it_is_given_stops(store, tmp_path):
    """Review: items that fail before the model (a file that does not decode) do not count."""
    from featurestore.errors import BackboneError
    from featurestore.backbones import create

    root = _faces(store, tmp_path, n=3)
    (root / "0.png").write_bytes(b"not an image")  # its key no longer matches: recorded, the item's fault
    real = create("fer", {}, device="cpu", modality="image")
    with pytest.raises(BackboneError, match="failed on all 2 items it was given"):
        run(ExtractConfig(dataset="faces", modality="image", backbone="fer"), store, backbone=Broken(real))
    (fs,) = list_feature_sets(store)
    assert [e.item_id for e in fs.errors()] == ["f0"]  # the decode failure only


def test_a_breaker_lets_go_when_another_job_computed_rows_meanwhile():
    from featurestore.errors import BackboneError
    from featurestore.jobs.extract import Breaker

    class It:
        def __init__(self, key):
            self.key = key

    rows = []
    b = Breaker("backbone m", "extracting d", lambda: bool(rows))
    assert b.passed(0, [(It("a"), "boom"), (It("b"), "boom")]) == [] and b.keys == ["a", "b"]
    rows.append(1)  # another shard published a row of the same model
    assert [it.key for it, _ in b.release()] == ["a", "b"]
    b = Breaker("backbone m", "extracting d", lambda: False)
    b.passed(0, [(It("a"), "boom")])
    b.passed(0, [(It("b"), "boom")])
    with pytest.raises(BackboneError, match="failed on all 2 items"):
        b.release()
    assert Breaker("backbone m", "d", lambda: True).passed(0, [(It("a"), "x")])  # a model with rows: at once


def test_held_failures_stay_claimed_when_rows_are_published(tmp_path):
    from featurestore.claims import Claims

    with Claims(tmp_path) as mine, Claims(tmp_path) as other:
        nothing = lambda keys: [False] * len(keys)  # noqa: E731
        assert mine.claim(["a", "b", "c"], nothing) == (["a", "b", "c"], [])
        mine.release(keep=["b", "z"])  # z was never claimed: not claimed now either
        assert other.claim(["a", "b", "c", "z"], nothing) == (["a", "c", "z"], ["b"])


def test_standing_errors_leave_out_items_of_another_dataset_or_without_the_input(store, demo_df, minilm):
    df = demo_df.head(5).with_columns(text=pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("   "))
                                      .otherwise(pl.col("text")))  # item 3: an empty text, recorded with no key
    add_dataset(store, "words", df, root=None, source="t")
    add_dataset(store, "same-ids", df, root=None, source="t")  # the same item ids and texts
    cfg = ExtractConfig(dataset="words", modality="text", backbone="minilm")
    res = run(cfg, store, backbone=minilm)
    other = run(dataclasses.replace(cfg, dataset="same-ids"), store, backbone=minilm)
    assert res.failed_total == other.failed_total == 1
    fs = FeatureSet(store, res.fingerprint)
    assert [e.dataset for e in fs.standing_errors(get_dataset(store, "words"))] == ["words"]
    gone = df.with_columns(text=pl.when(pl.col("text") == "   ").then(None).otherwise(pl.col("text")))
    add_dataset(store, "words", gone, root=None, source="t", replace=True)  # the item has no text now
    assert fs.standing_errors(get_dataset(store, "words")) == []
    assert run(cfg, store, backbone=minilm).failed_total == 0
    assert [r["failed"] for r in coverage(store, get_dataset(store, "words"))] == [0]


def test_fs_errors_lists_the_failed_items_and_counts_their_reasons(store, tmp_path, monkeypatch):
    import errno
    import json

    from _cli import fs

    root = _faces(store, tmp_path)
    (root / "1.png").unlink()  # deleted since `datasets add`
    failing_reads(monkeypatch, {"3.png": errno.EACCES, "4.png": errno.EACCES})
    r = fs(store.root, "extract", "--dataset", "faces", "--modality", "image", "--backbone", "fer", code=10)
    fp = FeatureSet(store, list_feature_sets(store)[0].fingerprint).fingerprint
    assert f"reasons: fs errors {fp} --dataset faces" in r.output
    out = fs(store.root, "errors", "fer", "--dataset", "faces").output  # a backbone name works as --features does
    assert f"{fp}: 3 failed item(s) of faces" in out
    lines = out.splitlines()
    assert [line.split(None, 1) for line in lines[3:5]] == [  # the most frequent reason first
        ["2", "cannot read file <path>: Permission denied"], ["1", "cannot read file <path>: No such file or directory"]]
    listed = [line.split()[1] for line in lines if line.startswith("faces ")]
    assert listed == ["f1", "f3", "f4"]
    data = json.loads(fs(store.root, "errors", fp, "--json").output)
    assert data["n"] == 3 and {e["item_id"] for e in data["errors"]} == {"f1", "f3", "f4"}
    assert "1 more" in fs(store.root, "errors", fp, "--limit", "2").output
    r = fs(store.root, "errors", "no-such-thing", code=4)
    assert "neither a feature set nor a VA source" in r.output and "fs va list" in r.output
    # another dataset of the same files: --dataset lists only its own failures
    monkeypatch.undo()
    add_dataset(store, "faces2", read_manifest_file(root / "m.csv"), root=root, source="t")
    fs(store.root, "extract", "--dataset", "faces2", "--modality", "image", "--backbone", "fer", code=10)
    assert "3 failed item(s) of faces2" in fs(store.root, "errors", fp, "--dataset", "faces2").output  # bad content met again
    assert ": 6 failed item(s)\n" in fs(store.root, "errors", fp).output


@pytest.mark.parametrize("reason, kind", [
    ("text of item it's fine failed: don't", "text of item it's fine failed: don't"),
    ("missing file: clips/happy.wav", "missing file: <path>"),
    ("cannot read file '/data/my clips/a b.wav': Permission denied", "cannot read file <path>: Permission denied"),
    ("key 386dcf0094dd5b74dfa1194c237fdf82 is bad", "key <key> is bad"),
    ("decoder said 'bad header' at byte 12", "decoder said <value> at byte N")])
def test_like_failures_count_together(reason, kind):
    from featurestore.cli.store_cmd import _reason_kind

    assert _reason_kind(reason) == kind


@pytest.mark.parametrize("a, b, covers", [
    ((0, ()), (20, ("train",)), True), ((100, ("test", "train")), (20, ("train",)), False),
    ((0, ("train",)), (0, ()), False), ((100, ("train",)), (0, ("train",)), False),
    ((0, ("test", "train")), (0, ("train",)), True), ((30, ("train",)), (20, ("train",)), True),
    ((20, ()), (30, ()), False), ((0, ()), (0, ()), True)])
def test_which_selection_covers_which(a, b, covers):
    from featurestore.keyed import selection_covers

    assert selection_covers(a, b) is covers


def test_two_partial_extractions_into_one_set_are_not_recorded_as_everything(store, demo_df, minilm):
    """Review: `--limit 3` then `--split train` into one fingerprint was merged into "all items", so
    that fingerprint superseded a whole extraction, gc removed the whole one, and verify wanted rows
    nobody had asked for."""
    from featurestore.features import superseded_by
    from featurestore.jobs.refresh import gc_fingerprints
    from featurestore.verify import verify_store

    words_dataset(store, demo_df, 12)
    whole = run(ExtractConfig(dataset="words", modality="text", backbone="minilm"), store, backbone=minilm)
    part = ExtractConfig(dataset="words", modality="text", backbone="minilm", params={"max_length": 32}, limit=3)
    fp = run(part, store).fingerprint
    run(dataclasses.replace(part, limit=0, splits=("train",)), store)
    entry = FeatureSet(store, fp).segments.catalogue()["datasets"]["words"]
    assert entry["selections"] == [[3, []], [0, ["train"]]]  # neither covers the other: both kept
    assert superseded_by(store, whole.fingerprint, "words") is None
    assert gc_fingerprints(store, 1)["removed"] == [] and FeatureSet(store, whole.fingerprint).exists()
    assert verify_store(store) == []
    run(dataclasses.replace(part, limit=0), store)  # now all of it: the whole one is superseded
    assert superseded_by(store, whole.fingerprint, "words") == fp
    assert [s for s in FeatureSet(store, fp).segments.catalogue()["datasets"]["words"]["selections"]] == [[0, []]]


def test_train_head_on_a_corrupt_segment_stops_with_one_line(store, demo_df, minilm):
    from _cli import fs

    words_dataset(store, demo_df, 60)
    res = run(ExtractConfig(dataset="words", modality="text", backbone="minilm"), store, backbone=minilm)
    (seg,) = FeatureSet(store, res.fingerprint).segments.segments()
    data = bytearray(seg.path.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.path.write_bytes(bytes(data))
    r = fs(store.root, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
           "--target", "label", "-p", "epochs=1", code=8)
    assert "is corrupt" in r.output and "Traceback" not in r.output and "saved run" not in r.output


def test_a_fifo_and_a_symlink_loop_are_bad_items_not_a_hang_or_a_stop(store, tmp_path):
    """A FIFO in place of an image would block a read forever, and a symlink loop (ELOOP) stopped
    every run as a failing disk; both are the item's fault: recorded with their reason, the job goes on."""
    import os

    from _cli import fs

    root = _faces(store, tmp_path)
    (root / "2.png").unlink()
    os.mkfifo(root / "2.png")
    (root / "4.png").unlink()
    (root / "4.png").symlink_to("4.png")
    fs(store.root, "extract", "--dataset", "faces", "--modality", "image", "--backbone", "fer", code=10)
    (fset,) = list_feature_sets(store)
    reasons = {e.item_id: e.reason for e in fset.errors()}
    assert set(reasons) == {"f2", "f4"}
    assert "not a regular file" in reasons["f2"] and "Too many levels of symbolic links" in reasons["f4"]
    assert fset.stats()["rows"] == 4


def test_datasets_add_does_not_read_a_fifo(store, tmp_path):
    import os

    from _cli import fs

    root = tmp_path / "pipes"
    root.mkdir()
    (root / "a.png").write_bytes(_png((1, 2, 3)))
    os.mkfifo(root / "b.png")
    (root / "m.csv").write_text("id,image\nfa,a.png\nfb,b.png\n")
    fs(store.root, "datasets", "add", "pipes", "--manifest", str(root / "m.csv"))
    fs(store.root, "extract", "--dataset", "pipes", "--modality", "image", "--backbone", "fer", code=10)
    (fset,) = list_feature_sets(store)
    assert [e.item_id for e in fset.errors()] == ["fb"] and "not a regular file" in fset.errors()[0].reason
