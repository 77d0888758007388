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
from featurestore.jobs.extract import ExtractConfig, run


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


def test_gc_compact_refuses_a_bit_flipped_segment_and_verify_still_reports_it(store, tmp_path, minilm):
    """`fs gc --compact` must not seal a corrupt segment's values under a fresh checksum (review 5)."""
    import h5py

    fs = two_datasets(store, tmp_path, minilm)
    victim = next(s.path for s in fs.segments.segments() if len(s.keys()))
    with h5py.File(victim, "r") as f:
        offset = f["arrays/pooled"].id.get_offset()
    data = bytearray(victim.read_bytes())
    data[offset + 1] ^= 0x40  # the exponent of the first fp16 value
    victim.write_bytes(bytes(data))
    before = sorted(s.path.name for s in fs.segments.segments())
    # a second, healthy feature set (another pooling) in two segments: gc still compacts that one
    run(ExtractConfig(dataset="a", modality="text", backbone="minilm", params={"pooling": "cls"}, segment_rows=1,
                      batch_size=1),
        store)
    (healthy,) = [f for f in list_feature_sets(store) if f.fingerprint != fs.fingerprint]
    assert len(healthy.segments.segments()) == 2
    assert fs_cli(store, "verify").exit_code == 8
    res = fs_cli(store, "gc", "--compact")
    assert res.exit_code == 8, res.output
    assert victim.name in res.output and "nothing merged" in res.output and f"not compacted {fs.fingerprint}" in res.output
    assert [line for line in res.output.splitlines() if line.startswith("error:")] == [
        f"error: 1 set(s) not compacted because a segment is corrupt ({fs.fingerprint}); everything else was "
        "tidied: run `fs verify`, then re-extract"]
    assert f"merged 2 segments of {healthy.fingerprint} into one" in res.output
    assert len(healthy.segments.segments()) == 1
    assert sorted(s.path.name for s in fs.segments.segments()) == before
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8 and "checksum mismatch" in res.output


# ---- defect 2: verify catches deletions, missing rows, damaged heads and memories ----------------
@pytest.fixture(scope="module")
def trained_template(tmp_path_factory, demo_df, minilm):
    """120 demo words in 4 segments, a linear head trained on them, a memory saved beside it."""
    from featurestore.memory import Memory, memory_path
    from featurestore.store import open_store

    store = open_store(tmp_path_factory.mktemp("trained") / "store", create=True)
    add_dataset(store, "words", demo_df.head(120), root=None, source="t")
    run(ExtractConfig(dataset="words", modality="text", backbone="minilm", segment_rows=32), store, backbone=minilm)
    res = fs_cli(store, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
                 "--target", "label", "--run-id", "r1", "--json")
    assert res.exit_code == 0, res.output
    mem = Memory(8)
    mem.add(np.arange(5), np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32),
            {"item_id": [f"i{i}" for i in range(5)], "class": ["a"] * 5})
    mem.save(memory_path(store, "m1"))
    res = fs_cli(store, "va", "fit", "--dataset", "words", "--features", "text=minilm", "--out", "v1",
                 "--test-split", "", "--json")
    assert res.exit_code == 0, res.output
    assert fs_cli(store, "verify").exit_code == 0
    return store


@pytest.fixture
def trained(trained_template, tmp_path):
    """A fresh copy of the trained store for each test to damage."""
    import shutil

    from featurestore.store import open_store

    shutil.copytree(trained_template.root, tmp_path / "store", symlinks=True)
    return open_store(tmp_path / "store")


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
                                   "--features", "text=minilm", "--target", "label", "--run-id", "r2"], catch_exceptions=False)
    assert out.exit_code == 0
    assert "have no cached features" in out.output and "split 'train'" in out.output


@pytest.mark.parametrize("target", ["segment", "catalogue", "spec", "manifest", "dataset.json", "head weights",
                                    "head config", "faiss index", "memory meta", "va model weights", "va model config"])
def test_a_flipped_byte_anywhere_is_exit_8(trained, target):
    store = trained
    (fs,) = list_feature_sets(store)
    path = {"segment": lambda: fs.segments.segments()[0].path, "catalogue": lambda: fs.segments.catalogue_path,
            "spec": lambda: fs.spec_path, "manifest": lambda: store.dataset_dir("words") / get_dataset(store, "words").info["manifest_file"],
            "dataset.json": lambda: store.dataset_dir("words") / "dataset.json",
            "head weights": lambda: store.heads_dir() / "r1" / "model.safetensors",
            "head config": lambda: store.heads_dir() / "r1" / "config.json",
            "faiss index": lambda: store.memory_dir() / "m1" / "index.faiss",
            "memory meta": lambda: store.memory_dir() / "m1" / "meta.parquet",
            "va model weights": lambda: store.root / "va_models" / "v1" / "model.safetensors",
            "va model config": lambda: store.root / "va_models" / "v1" / "config.json"}[target]()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8, res.output
    assert json.loads(res.output)["problems"]


# ---- defect 3: readers never fail because of a concurrent compaction -----------------------------
_SETUP = """
import os, sys, time, numpy as np
from featurestore.store import open_store
from featurestore.features import FeatureSet
from featurestore.datasets import get_dataset
store = open_store(sys.argv[1]); fs = FeatureSet(store, "bench-0000000000000000")
keys = get_dataset(store, "d").manifest["text_key"].to_list()
def value(i): return np.full((1, 8), i % 1000, np.float32)
"""
_WRITER = _SETUP + """
for n in range(int(sys.argv[2])):
    lo = (n * 10) % len(keys)
    fs.segments.write(keys[lo:lo + 10], {"pooled": np.concatenate([value(i) for i in range(lo, lo + 10)])})
    time.sleep(0.02)
    if n % 30 == 29:  # a burst done: wait (60 s at most) for the compactor to merge it, so merges interleave
        end = time.time() + 60
        while time.time() < end and not (os.path.exists(sys.argv[4]) and
                                         int(open(sys.argv[4]).read() or 0) > n // 30):
            time.sleep(0.05)
open(sys.argv[3], "w").close()
"""
_GC = _SETUP + """
from featurestore.errors import LockedError
merged = 0
end = time.time() + float(sys.argv[2])  # a safety limit: it stops once the writer is done
while time.time() < end and not os.path.exists(sys.argv[3]):
    try:
        with fs.lock():
            merged += fs.segments.compact()[0] > 0
    except LockedError:
        pass
    with open(sys.argv[4] + ".tmp", "w") as f:
        f.write(str(merged))
    os.replace(sys.argv[4] + ".tmp", sys.argv[4])
open(sys.argv[5], "w").close()
print(merged)
"""
_READER = _SETUP + """
from featurestore.reader import load_split
failures, loops = [], 0
end = time.time() + float(sys.argv[2])  # a safety limit: readers run until the compactor is done
while time.time() < end and not os.path.exists(sys.argv[3]):
    loops += 1
    try:
        data = load_split(store, "d", "train", {"text": fs.fingerprint})
        idx = np.flatnonzero(data.masks["text"])
        want = np.array([keys.index(k.decode()) % 1000 for k in data.keys["text"][idx]], np.float32)
        assert (data.features["text"][idx, 0] == want).all(), "wrong rows"
        fs.stats(); fs.scan_pooled()
    except Exception as exc:
        failures.append(f"{type(exc).__name__}: {exc}")
print(loops, len(failures), failures[:3])
"""


def _py(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_readers_never_fail_during_concurrent_compaction(store):
    from featurestore.datasets.manifest import normalise

    df = pl.DataFrame({"item_id": [f"i{i}" for i in range(200)], "text": [f"text {i}" for i in range(200)],
                       "split": ["train"] * 200})
    add_dataset(store, "d", normalise(df, source="t"), root=None, source="t")
    fs = FeatureSet(store, "bench-0000000000000000")
    fs.ensure_spec({"backbone": "bench", "modality": "text", "dim": 8, "config": {"dtype": "float32"}})
    seconds = 90  # upper bounds only: the processes stop on markers, so a loaded machine changes nothing
    wrote, count, merged = store.root / "writer-done", store.root / "merges", store.root / "gc-done"
    procs = [_py(_WRITER, store.root, 150, wrote, count), _py(_GC, store.root, seconds, wrote, count, merged)] + \
        [_py(_READER, store.root, seconds, merged) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert int(outs[1][0]) >= 3, "compactions must have happened while the readers ran"
    for out, _ in outs[2:]:
        loops, failures, sample = out.split(" ", 2)
        assert int(loops) >= 5 and int(failures) == 0, sample
    with fs.lock():
        fs.segments.compact()
    assert fs.verify() == []  # (the made-up spec has no real fingerprint: check the rows only)


# ---- defect 4: a full disk is one line and a distinct exit code; temp files are found and removed -
@pytest.fixture
def tiny_disk(tmp_path):
    """A real 24 MB filesystem (tmpfs) to fill up; skipped where mounting is not allowed."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt, leave: int):
    """Fill the filesystem until `leave` bytes are free (a real full disk, not a simulated one)."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    filler = mnt / f"filler-{len(list(mnt.glob('filler-*')))}"
    with open(filler, "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - leave))
    return filler


def fs_proc(root, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "featurestore.cli", "--store", str(root), *args],
                          capture_output=True, text=True, timeout=timeout)


def one_line_disk_full(res, code=11):
    assert res.returncode == code, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and [ln for ln in lines if "error" in ln] == lines[-1:], res.stderr
    assert lines[-1].startswith("error: disk full writing ")


def temp_files(root):
    return [p for p in root.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
def test_extraction_with_sequences_on_a_full_disk_is_exit_11_and_resumes(tiny_disk, demo_df):
    from featurestore.store import open_store

    root = tiny_disk / "store"
    store = open_store(root, create=True)
    add_dataset(store, "a", demo_df.head(4), root=None, source="t")
    add_dataset(store, "b", demo_df.slice(4, 120), root=None, source="t")
    args = ["extract", "--modality", "text", "--backbone", "minilm", "--param", "seq_cap=64", "--batch-size", "8"]
    assert fs_proc(root, *args, "--dataset", "a").returncode == 0
    filler = fill(tiny_disk, 300_000)  # room for a few segments of b, not all of them
    one_line_disk_full(fs_proc(root, *args, "--dataset", "b", "--segment-rows", "16"))
    assert not temp_files(root)
    (fs,) = list_feature_sets(store)
    kept = len(fs.index(refresh=True).unique_keys())
    assert kept > 4, "rows published before the disk filled are kept"
    filler.unlink()
    res = fs_proc(root, *args, "--dataset", "b", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["computed"] == 120 - (kept - 4)
    assert fs_proc(root, "verify").returncode == 0


@pytest.mark.slow
def test_datasets_add_and_init_on_a_full_disk_leave_no_temp_files(tiny_disk, demo_df, tmp_path):
    from featurestore.store import open_store

    root = tiny_disk / "store"
    open_store(root, create=True)
    manifest = tmp_path / "big.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"i{i}", "text": f"some words {i} " * 20}) + "\n"
                                for i in range(20000)))
    fill(tiny_disk, 64_000)
    one_line_disk_full(fs_proc(root, "datasets", "add", "big", "--manifest", str(manifest)))
    fill(tiny_disk, 0)
    one_line_disk_full(fs_proc(tiny_disk / "other", "init"))
    assert not temp_files(tiny_disk)


def test_gc_removes_temp_files_of_killed_jobs_and_verify_reports_them(store, demo_df):
    add_dataset(store, "d", demo_df.head(3), root=None, source="t")
    stray = [store.dataset_dir("d") / ".manifest.parquet.0badf00d.tmp", store.root / ".store.json.12345678.tmp"]
    for path in stray:
        path.write_bytes(b"half a file")
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8
    assert {p["path"] for p in json.loads(res.output)["problems"]} == {str(p) for p in stray}
    assert "kept" in fs_cli(store, "gc").output and all(p.exists() for p in stray)  # may be a running job's
    for path in stray:
        os.utime(path, (0, 0))
    assert fs_cli(store, "gc").exit_code == 0
    assert not any(p.exists() for p in stray)
    assert fs_cli(store, "verify").exit_code == 0


# ---- defect 5: damaged files give one line naming the file, and verify never crashes --------------
def _flip_header(path):
    data = bytearray(path.read_bytes())
    data[:8] = b"garbage!"
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _not_utf8(path):
    path.write_bytes(b"\xff\xfe" + path.read_bytes())


def _broken_json(path):
    path.write_text(path.read_text()[:-5])


_DAMAGE = {  # what is damaged, how, and a command a user would run next
    "segment header": (lambda s: list_feature_sets(s)[0].segments.segments()[0].path, _flip_header, ["ls"]),
    "truncated segment": (lambda s: list_feature_sets(s)[0].segments.segments()[0].path, _truncate,
                          ["eval", "r1", "--dataset", "words"]),
    "manifest parquet": (lambda s: s.dataset_dir("words") / get_dataset(s, "words").info["manifest_file"], _truncate,
                         ["ls"]),
    "store.json not utf-8": (lambda s: s.meta_path, _not_utf8, ["ls"]),
    "store.json broken": (lambda s: s.meta_path, _broken_json, ["ls"]),
    "dataset.json": (lambda s: s.dataset_dir("words") / "dataset.json", _not_utf8, ["ls"]),
    "spec.json": (lambda s: next(s.features_dir().glob("*/spec.json")), _broken_json, ["ls"]),
    "catalogue": (lambda s: next(s.features_dir().glob("*/catalogue.json")), _broken_json,
                  ["eval", "r1", "--dataset", "words"]),
    "safetensors": (lambda s: s.heads_dir() / "r1" / "model.safetensors", _truncate,
                    ["eval", "r1", "--dataset", "words"]),
    "faiss index": (lambda s: s.memory_dir() / "m1" / "index.faiss", _flip_header, ["memory", "info", "m1"]),
}


@pytest.mark.parametrize("what", list(_DAMAGE))
def test_damaged_files_are_one_line_errors_and_verify_survives(trained, what):
    store = trained
    locate, damage, command = _DAMAGE[what]
    path = locate(store)
    damage(path)
    res = fs_cli(store, *command)  # catch_exceptions=False: a traceback fails the test
    assert res.exit_code not in (0, 1), res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and path.name in last, res.output
    if what.startswith("store.json"):
        return  # no command can run on a store whose version cannot be read; the error says so
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8
    assert any(path.name in p["path"] + p["message"] for p in json.loads(res.output)["problems"])


# ---- defect 6: many writers per fingerprint; the lock check comes before the model load ---------
def _popen_fs(root, *args):
    return subprocess.Popen([sys.executable, "-m", "featurestore.cli", "--store", str(root), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_datasets_and_two_shards_extract_into_one_fingerprint_at_once(store, demo_df, minilm):
    words = demo_df.head(150)
    add_dataset(store, "x", words.head(100), root=None, source="t")
    add_dataset(store, "y", words.slice(50, 100).with_columns(pl.col("item_id") + "-y"), root=None, source="t")
    run(ExtractConfig(dataset="x", modality="text", backbone="minilm", limit=1), store, backbone=minilm)  # spec known
    args = ["extract", "--modality", "text", "--backbone", "minilm", "--batch-size", "8", "--segment-rows", "16",
            "--json"]
    procs = [_popen_fs(store.root, *args, "--dataset", "x"), _popen_fs(store.root, *args, "--dataset", "y"),
             _popen_fs(store.root, *args, "--dataset", "y", "--split", "train")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    (fs,) = list_feature_sets(store)
    index = fs.index(refresh=True)
    assert len(index.unique_keys()) == 150
    assert len(index._keys) == 150, "no input was computed twice"
    assert sum(r["computed"] for r in results) == 149
    assert all(r["segments"] > 0 for r in results[:2]), "each job published its own segments"
    assert fs_cli(store, "verify").exit_code == 0


def test_a_compaction_lock_is_found_before_the_model_loads_and_wait_waits(store, demo_df, minilm):
    import threading
    import time

    from featurestore import backbones
    from featurestore.errors import LockedError

    add_dataset(store, "d", demo_df.head(20), root=None, source="t")
    run(ExtractConfig(dataset="d", modality="text", backbone="minilm", limit=5), store, backbone=minilm)
    (fs,) = list_feature_sets(store)
    cfg = ExtractConfig(dataset="d", modality="text", backbone="minilm")
    with fs.lock():  # what `fs gc --compact` holds
        fresh = backbones.create("minilm")
        with pytest.raises(LockedError, match="--wait"):
            run(cfg, store, backbone=fresh)
        assert not fresh._loaded, "the lock is checked before the model is loaded"
    holder = threading.Event()

    def hold():
        with fs.lock():
            holder.set()
            time.sleep(1.5)
    t = threading.Thread(target=hold)
    t.start()
    holder.wait()
    res = run(dataclasses_replace(cfg, wait=True), store, backbone=minilm)
    t.join()
    assert res.computed == 15


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ---- defect 7: publication interval is settable, and short by default ------------------------------
def test_segment_seconds_publishes_by_time_and_the_default_is_a_few_seconds(store, demo_df, minilm):
    assert ExtractConfig().segment_seconds <= 5
    add_dataset(store, "d", demo_df.head(40), root=None, source="t")
    res = run(ExtractConfig(dataset="d", modality="text", backbone="minilm", batch_size=8, segment_rows=10**6,
                            segment_seconds=1e-6), store, backbone=minilm)
    assert res.segments == 5  # one per batch: the time limit, not the row limit, published them
    out = fs_cli(store, "extract", "--dataset", "d", "--modality", "text", "--backbone", "minilm",
                 "--segment-seconds", "2", "--segment-rows", "100", "--json")
    assert out.exit_code == 0 and json.loads(out.output)["cache_hit"]


# ---- defect 8: out-of-memory and device errors are not item failures -----------------------------
class FailsFromThird:
    """A real backbone whose forward passes raise a transient error from the third on (no GPU here to
    run out of): the machine is out of memory, or the device is broken, for every batch and item after."""

    def __init__(self, inner, exc, times=None):
        self.inner, self.exc, self.calls, self.times = inner, exc, 0, times

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, items):
        self.calls += 1
        if self.calls >= 3 and (self.times is None or self.calls < 3 + self.times):
            raise self.exc
        return self.inner.encode(items)


@pytest.mark.parametrize("exc", [lambda: __import__("torch").cuda.OutOfMemoryError("CUDA out of memory. Tried 2 GiB"),
                                 lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
                                 lambda: MemoryError()])
def test_transient_errors_stop_the_job_and_are_retried_not_recorded(store, demo_df, minilm, exc):
    from featurestore.errors import BackboneError

    add_dataset(store, "d", demo_df.head(40), root=None, source="t")
    cfg = ExtractConfig(dataset="d", modality="text", backbone="minilm", batch_size=8, segment_seconds=1e-6)
    with pytest.raises(BackboneError, match="not about an item"):
        run(cfg, store, backbone=FailsFromThird(minilm, exc()))
    (fs,) = list_feature_sets(store)
    assert fs.errors() == []  # nothing recorded against the items of the failed batch
    assert len(fs.index(refresh=True).unique_keys()) == 16  # the two batches before it are kept
    again = run(cfg, store, backbone=minilm)  # no --retry-errors needed
    assert (again.cached, again.computed, again.failed_total) == (16, 24, 0)


def test_a_batch_that_runs_out_of_memory_once_goes_on_one_item_at_a_time(store, demo_df, minilm):
    add_dataset(store, "d", demo_df.head(40), root=None, source="t")
    bb = FailsFromThird(minilm, MemoryError(), times=1)  # the third batch does not fit; its items alone do
    res = run(ExtractConfig(dataset="d", modality="text", backbone="minilm", batch_size=8), store, backbone=bb)
    assert (res.computed, res.failed_new) == (40, 0) and bb.calls == 5 + 8
    (fs,) = list_feature_sets(store)
    assert fs.errors() == []


# ---- defect 9: 16-bit PNGs, JSONL encodings, long WAVs ------------------------------------------
def test_16_bit_grayscale_png_is_scaled_not_clipped():
    import io

    from PIL import Image

    from featurestore.backbones._media import decode_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    img.save(buf, format="PNG")
    rgb = np.asarray(decode_image(buf.getvalue()))
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_array_equal(rgb[..., 0], np.rint(ramp / 257.0).astype(np.uint8))
    assert len(np.unique(rgb)) > 200  # a ramp, not a saturated white block


@pytest.mark.parametrize("payload", [b'{"id": "a", "text": "caf\xe9"}\n', b'{"id": "a", "text": "\\ud800 x"}\n'])
def test_jsonl_with_bad_unicode_is_a_clean_dataset_error(store, tmp_path, payload):
    (tmp_path / "m.jsonl").write_bytes(b'{"id": "ok", "text": "fine"}\n' + payload)
    res = fs_cli(store, "datasets", "add", "bad", "--manifest", str(tmp_path / "m.jsonl"))
    assert res.exit_code == 5, res.output
    assert "m.jsonl" in res.output and "line 2" in res.output


def test_a_long_wav_is_read_only_as_far_as_the_cap_keeps(tmp_path):
    import io
    import tracemalloc

    import soundfile as sf

    from featurestore.backbones._media import decode_audio

    sr, minutes = 44100, 10
    wav = (np.sin(np.arange(sr * 60 * minutes, dtype=np.float32) * 0.01) * 8000).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="PCM_16")
    raw = buf.getvalue()
    del wav
    tracemalloc.start()
    capped = decode_audio(raw, 16000, max_samples=30 * 16000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(capped) == 30 * 16000
    assert peak < 40 * 2**20, f"peak {peak / 2**20:.0f} MiB: the whole 10 minutes were decoded"
    short = raw[: 44 + 2 * sr * 5]  # the same file cut to 5 s (a WAV header is 44 bytes): same numbers
    np.testing.assert_array_equal(decode_audio(short, 16000, max_samples=16000),
                                  decode_audio(short, 16000)[:16000])


# ---- the kill storm ----------------------------------------------------------------------------
_ZYGOTE = """
import os, sys
from featurestore import backbones
from featurestore.store import open_store
from featurestore.jobs.extract import ExtractConfig, run
bb = backbones.create("minilm").load()  # loaded once; no forward pass here (OpenMP is not fork-safe after one)
store = open_store(sys.argv[1])
cfg = ExtractConfig(dataset="d", modality="text", backbone="minilm", batch_size=int(sys.argv[2]),
                    segment_rows=int(sys.argv[2]))
for line in sys.stdin:
    if line.strip() == "run":
        pid = os.fork()
        if pid == 0:
            run(cfg, store, backbone=bb)
            os._exit(0)
        print(pid, flush=True)
    elif line.strip() == "reap":
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


@pytest.mark.slow
def test_kill_storm_leaves_byte_identical_rows_and_a_clean_verify(tmp_path, demo_df, minilm):
    """At least 20 SIGKILLs at random moments of real extraction processes (planning, encoding,
    publishing, registering), then a run to the end: every row is byte-identical to an
    uninterrupted run, no row is stored twice, and `fs verify` is clean.

    The processes are forked from one that loaded the model, so each kill costs no start-up."""
    import random
    import signal
    import time

    from featurestore.store import open_store

    n, batch = 320, 4  # 80 segments: 24 kills of at most 2 segments each (plus a random delay) never reach the end
    stores = {name: open_store(tmp_path / name, create=True) for name in ("storm", "clean")}
    for s in stores.values():
        add_dataset(s, "d", demo_df.head(n), root=None, source="t")
    zygote = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(stores["storm"].root), str(batch)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def command(word):
        zygote.stdin.write(word + "\n")
        zygote.stdin.flush()
        return int(zygote.stdout.readline())

    def rows():
        sets = list_feature_sets(stores["storm"])
        return len(sets[0].index(refresh=True).unique_keys()) if sets else 0

    def segments():
        sets = list_feature_sets(stores["storm"])
        return len(sets[0].segments.catalogue()["segments"]) if sets else 0

    rng, landed, progressed, before = random.Random(10), 0, 0, 0
    try:
        while landed < 24:
            # Kill after 0, 1 or 2 new segments plus a random delay: random moments, yet at most a few
            # segments of progress per kill whatever the machine's speed.
            start, wait_for, deadline = segments(), rng.choice([0, 1, 2]), time.time() + 20
            pid = command("run")
            while segments() < start + wait_for and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.05))
            os.kill(pid, signal.SIGKILL)
            status = command("reap")
            if status == 0:
                pytest.fail(f"the job finished after {landed} kills; make the dataset bigger")
            assert status == -signal.SIGKILL
            landed += 1
            now = rows()
            progressed += now > before
            before = now
        assert command("run") and command("reap") == 0  # the last run goes to the end
    finally:
        zygote.kill()
        zygote.wait()
    run(ExtractConfig(dataset="d", modality="text", backbone="minilm", batch_size=batch), stores["clean"],
        backbone=minilm)
    keys = np.array(get_dataset(stores["clean"], "d").manifest["text_key"].to_list(), dtype="S32")
    (storm,), (clean,) = list_feature_sets(stores["storm"]), list_feature_sets(stores["clean"])
    a, pa = storm.read_pooled(keys)
    b, pb = clean.read_pooled(keys)
    assert pa.all() and pb.all() and a.tobytes() == b.tobytes()
    assert len(storm.index(refresh=True)._keys) == n, "no row stored twice"
    verify = subprocess.run([sys.executable, "-m", "featurestore.cli", "--store", str(stores["storm"].root),
                             "verify"], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout
    print(f"kill storm: {landed} SIGKILLs, {progressed} of them after new rows were published, "
          f"{before} of {n} rows before the final run, {len(storm.segments.segments())} segments")
    assert progressed >= 8, "kills must land during the work"


def test_a_store_written_before_catalogues_is_adopted_by_gc(store, tmp_path, minilm):
    fs = two_datasets(store, tmp_path, minilm)
    fs.segments.catalogue_path.unlink()
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8
    (problem,) = json.loads(res.output)["problems"]
    assert "fs gc" in problem["message"]
    assert fs_cli(store, "gc").exit_code == 0
    assert len(fs.segments.catalogue()["segments"]) == 2
    assert fs_cli(store, "verify").exit_code == 0


# ---- review finding 4: verify finds a feature set, its spec or a dataset's metadata gone ----------
def _problems(store):
    res = fs_cli(store, "verify")
    lines = [line for line in res.output.splitlines() if line.startswith("PROBLEM")]
    assert "Traceback" not in res.output and all(len(line) < 600 for line in lines)
    return res.exit_code, lines


def test_a_feature_set_without_spec_is_a_problem_and_its_segments_are_still_checked(trained):
    (fs,) = list_feature_sets(trained)
    seg = fs.segments.segments()[1].path
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01
    seg.write_bytes(bytes(data))
    fs.spec_path.unlink()
    code, lines = _problems(trained)
    assert code == 8
    assert any(str(fs.spec_path) in line and "spec.json is missing" in line and "restore it" in line for line in lines)
    assert any(seg.name in line and "checksum mismatch" in line for line in lines)  # not hidden by the lost spec


def test_a_deleted_feature_set_used_by_a_run_is_a_problem(trained):
    import shutil

    (fs,) = list_feature_sets(trained)
    shutil.rmtree(fs.folder)
    code, lines = _problems(trained)
    assert code == 8
    assert [line for line in lines  # the run and the VA model fitted on the same features
            if f"feature set {fs.fingerprint} used by VA model v1, run r1 is missing" in line]


def test_a_dataset_without_dataset_json_is_a_problem(trained):
    (trained.dataset_dir("words") / "dataset.json").unlink()
    code, lines = _problems(trained)
    assert code == 8
    assert any("dataset.json is missing, so dataset words is not listed" in line and "fs datasets add words" in line
               for line in lines)


def test_a_feature_set_named_by_a_memory_must_exist(store):
    from featurestore.memory import Memory, memory_path

    mem = Memory(4, spec={"fingerprints": {"text": "scl-00000000deadbeef"},
                          "source_fingerprints": {"text": "minilm-00000000deadbeef"}})
    mem.add(np.arange(2), np.eye(2, 4, dtype=np.float32), {"item_id": ["a", "b"]})
    mem.save(memory_path(store, "m2"))
    code, lines = _problems(store)
    assert code == 8 and len(lines) == 2
    assert all("used by memory m2 is missing" in line for line in lines)


@pytest.mark.parametrize("at", ["manifest", "dataset.json", "cleanup"])
def test_a_kill_anywhere_in_datasets_add_replace_leaves_the_old_or_the_new_dataset_whole(store, tmp_path,
                                                                                         monkeypatch, at):
    """`datasets add --replace` publishes the manifest under its own name, then `dataset.json` (the one
    commit point), then removes the old manifest. A kill at each step (here: the step raises) leaves
    the old dataset (before the commit) or the new one (after), readable and verified; the manifest
    nobody names is reported by verify and removed by gc, never the named one."""
    from featurestore import datasets as D

    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w6.jsonl", 6)), root=None, source="t")
    folder = store.dataset_dir("words")
    real_publish, real_json, real_unlink = D.publish, D.write_json_atomic, type(folder).unlink

    def publish(tmp, target):
        if at == "manifest":
            raise KeyboardInterrupt  # the process dies with the new manifest not yet in place
        return real_publish(tmp, target)

    def write_json(path, obj):
        if at == "dataset.json" and path.name == "dataset.json":
            raise KeyboardInterrupt
        return real_json(path, obj)

    def unlink(path, *a, **k):
        if at == "cleanup" and path.name.startswith("manifest."):
            raise KeyboardInterrupt
        return real_unlink(path, *a, **k)
    monkeypatch.setattr(D, "publish", publish)
    monkeypatch.setattr(D, "write_json_atomic", write_json)
    monkeypatch.setattr(type(folder), "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w3.jsonl", 3)), root=None, source="t",
                    replace=True)
    monkeypatch.undo()
    from featurestore import verify

    monkeypatch.setattr(verify, "writer_running_here", lambda path: False)  # the killed process is gone
    expected = 3 if at == "cleanup" else 6
    ds = D.get_dataset(store, "words")
    assert len(ds.manifest) == expected and ds.info["n_items"] == expected
    assert fs_cli(store, "datasets", "show", "words").exit_code == 0
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    res = fs_cli(store, "verify", "--json")
    if at == "manifest":  # nothing new reached its final name: only the killed job's temp file is reported
        assert res.exit_code == 8 and len(files) == 2, (files, res.output)
        (problem,) = json.loads(res.output)["problems"]
        assert problem["message"].startswith("temporary file left by a killed")
        return
    assert res.exit_code == 8 and len(files) == 3, (files, res.output)
    (problem,) = json.loads(res.output)["problems"]
    assert "killed `fs datasets add`" in problem["message"]
    assert problem["path"] != str(folder / ds.info["manifest_file"])
    assert fs_cli(store, "gc").exit_code == 0
    assert fs_cli(store, "verify").exit_code == 0 and len(D.get_dataset(store, "words").manifest) == expected
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        ["dataset.json", ds.info["manifest_file"]])


def test_a_legacy_dataset_reads_verifies_and_is_converted_by_a_replace(store, tmp_path):
    """A dataset written before `manifest_file` (`manifest.parquet` + `checksums.json`) still loads and
    verifies (a changed dataset.json is caught by checksums.json); `add --replace` moves it to the new
    layout and removes both old files."""
    from featurestore import datasets as D
    from featurestore._io import write_checksums

    df = read_manifest_file(_jsonl(tmp_path / "w.jsonl", 5))
    add_dataset(store, "words", df, root=None, source="t")
    folder = store.dataset_dir("words")
    info = json.loads((folder / "dataset.json").read_text())
    (folder / info["manifest_file"]).rename(folder / "manifest.parquet")
    legacy = {k: v for k, v in info.items() if k not in ("manifest_file", "info_sha256")}
    (folder / "dataset.json").write_text(json.dumps(legacy))
    write_checksums(folder, ["manifest.parquet", "dataset.json"])
    assert len(D.get_dataset(store, "words").manifest) == 5 and fs_cli(store, "verify").exit_code == 0
    with pytest.raises(D.DatasetError, match="already exists"):
        add_dataset(store, "words", df, root=None, source="t")
    (folder / "dataset.json").write_text(json.dumps({**legacy, "source": "edited"}))
    assert fs_cli(store, "verify").exit_code == 8
    add_dataset(store, "words", df.head(4), root=None, source="t", replace=True)
    assert not (folder / "manifest.parquet").exists() and not (folder / "checksums.json").exists()
    assert len(D.get_dataset(store, "words").manifest) == 4 and fs_cli(store, "verify").exit_code == 0


def test_an_edited_dataset_json_is_refused_by_readers_and_verify(store, tmp_path):
    from featurestore import datasets as D
    from featurestore.errors import IntegrityError

    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w.jsonl", 5)), root=None, source="t")
    path = store.dataset_dir("words") / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_items": 4}))
    with pytest.raises(IntegrityError, match="info_sha256"):
        D.get_dataset(store, "words")
    res = fs_cli(store, "verify", "--json")
    assert res.exit_code == 8 and any("info_sha256" in p["message"] for p in json.loads(res.output)["problems"])


def _jsonl(path, n):
    path.write_text("".join(json.dumps({"id": f"w{i}", "text": f"word {i}", "split": "train"}) + "\n"
                            for i in range(n)))
    return path


_ADD_LOOP = """
import json, sys
from featurestore.store import open_store
from featurestore.datasets import add_dataset, read_manifest_file
store = open_store(sys.argv[1])
for _ in range(int(sys.argv[3])):
    add_dataset(store, "words", read_manifest_file(sys.argv[2]), root=None, source=sys.argv[2], replace=True)
"""
_READ_LOOP = """
import sys, time
from featurestore.store import open_store
from featurestore.datasets import get_dataset
store = open_store(sys.argv[1]); sizes = set()
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    ds = get_dataset(store, "words")  # raises (exit 1) on a mismatched or missing manifest
    assert len(ds.manifest) == ds.info["n_items"], (len(ds.manifest), ds.info["n_items"])
    sizes.add(len(ds.manifest))
print(sorted(sizes))
"""


def test_concurrent_replaces_and_readers_always_see_one_whole_dataset(store, tmp_path):
    """Three processes replace one dataset with different manifests, over and over, while a fourth
    reads it: every read is one whole manifest with its own dataset.json, and the end state verifies."""
    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w4.jsonl", 4)), root=None, source="t")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", _ADD_LOOP, str(store.root), str(_jsonl(tmp_path / f"w{n}.jsonl", n)),
                                 "15"], env=env) for n in (3, 5, 7)]
    reader = subprocess.run([sys.executable, "-c", _READ_LOOP, str(store.root), "12"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert [w.wait(timeout=300) for w in writers] == [0, 0, 0]
    assert reader.returncode == 0, reader.stderr[-2000:]
    assert len(json.loads(reader.stdout)) >= 2  # it did see replacements happen
    assert fs_cli(store, "verify").exit_code == 0
    folder = store.dataset_dir("words")
    assert len([p for p in folder.glob("manifest*.parquet")]) == 1


def test_a_first_add_killed_before_its_dataset_json_leaves_no_dataset_and_can_be_run_again(store, tmp_path,
                                                                                          monkeypatch):
    from featurestore import datasets as D

    df = read_manifest_file(_jsonl(tmp_path / "w.jsonl", 5))
    real = D.write_json_atomic

    def killed(path, obj):
        raise KeyboardInterrupt
    monkeypatch.setattr(D, "write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        add_dataset(store, "words", df, root=None, source="t")
    monkeypatch.setattr(D, "write_json_atomic", real)
    assert D.list_datasets(store) == []
    res = fs_cli(store, "verify", "--json")
    (problem,) = json.loads(res.output)["problems"]
    assert res.exit_code == 8 and "dataset.json is missing" in problem["message"]
    assert fs_cli(store, "gc").exit_code == 0 and list(store.dataset_dir("words").glob("manifest.*"))  # kept
    add_dataset(store, "words", df, root=None, source="t")  # no --replace needed: nothing was registered
    assert fs_cli(store, "verify").exit_code == 0 and len(D.get_dataset(store, "words").manifest) == 5


def test_a_lock_refusal_offers_wait_only_where_the_command_has_it(tmp_path):
    from featurestore._io import file_lock
    from featurestore.errors import LockedError

    with file_lock(tmp_path / ".lock", "sweep s1"):
        with pytest.raises(LockedError) as plain:
            with file_lock(tmp_path / ".lock", "sweep s1"):
                pass
        with pytest.raises(LockedError) as offered:
            with file_lock(tmp_path / ".lock", "feature set f", shared=True, wait_option=True):
                pass
    assert "--wait" not in str(plain.value) and "run this again" in str(plain.value)
    assert str(offered.value).endswith("or pass --wait")


def _flip_last(path, back=8):
    data = bytearray(path.read_bytes())
    data[len(data) - back] ^= 0x40  # inside the numbers, past every header: the file still loads
    path.write_bytes(bytes(data))


def test_damaged_weights_that_still_load_are_refused_by_every_reader(trained):
    """A bit flipped in a run's weights, a memory's index or a VA model's weights leaves a file that
    loads; readers check the folder's checksums.json first, so eval, predict, a memory and a VA
    model refuse with one line (exit 8) instead of answering from damaged numbers."""
    from featurestore.errors import IntegrityError
    from featurestore.jobs.va import make_scorer
    from featurestore.memory import open_memory

    store = trained
    _flip_last(store.heads_dir() / "r1" / "model.safetensors")
    for args in (["eval", "r1", "--dataset", "words"], ["predict", "r1", "--text", "a lovely day"]):
        res = fs_cli(store, *args)
        assert res.exit_code == 8 and "model.safetensors does not match its recorded SHA-256" in res.output, res.output
        assert "Traceback" not in res.output
    _flip_last(store.memory_dir() / "m1" / "index.faiss")
    with pytest.raises(IntegrityError, match="index.faiss does not match"):
        open_memory(store, "m1")
    _flip_last(store.root / "va_models" / "v1" / "model.safetensors")
    with pytest.raises(IntegrityError, match="model.safetensors does not match"):
        make_scorer(store, "v1", {}).load()


def test_a_segment_published_while_a_job_plans_is_not_computed_again(store, demo_df, minilm, monkeypatch):
    """Another job publishes rows for some of this job's inputs just after this job's `pending` has
    read the set: this job must still see them (it reads every segment it did not account for
    before claiming) and compute each input once; the set ends with no key twice."""
    from _faults import publish_after_each_plan

    add_dataset(store, "d", demo_df.head(40), root=None, source="t")
    run(ExtractConfig(dataset="d", modality="text", backbone="minilm", limit=5), store, backbone=minilm)
    (fs,) = list_feature_sets(store)
    published = publish_after_each_plan(monkeypatch, fs)  # the spec-cache check's plan, then the job's own
    res = run(ExtractConfig(dataset="d", modality="text", backbone="minilm"), store, backbone=minilm)
    monkeypatch.undo()
    unique = len(set(get_dataset(store, "d").manifest["text_key"].drop_nulls()))
    assert len(published) == len(set(published)) == 20
    assert res.computed == unique - 5 - 20  # before the fix: the last 10 were computed again
    assert fs.stats()["rows"] == unique
    assert fs_cli(store, "verify").exit_code == 0


def test_a_full_disk_registering_a_merged_segment_withdraws_it(trained, monkeypatch):
    """`gc --compact` publishes the merged segment, then rewrites catalogue.json; a full disk at that
    rewrite used to leave the merged copy on disk unregistered (a whole extra copy of the set, and
    verify failing). Now it is withdrawn under the same lock: exit 11, the store as it was."""
    from featurestore import segments as S
    from featurestore.errors import DiskFullError

    (fs,) = list_feature_sets(trained)
    before = sorted(p.name for p in fs.folder.glob("seg-*.h5"))
    rows = fs.stats()["rows"]
    real = S.write_json_atomic

    def full(path, obj):
        if path.name == "catalogue.json":
            raise DiskFullError(f"disk full writing {path}")
        return real(path, obj)
    monkeypatch.setattr(S, "write_json_atomic", full)
    assert fs_cli(trained, "gc", "--compact").exit_code == 11
    monkeypatch.undo()
    assert sorted(p.name for p in fs.folder.glob("seg-*.h5")) == before and len(before) == 4
    assert fs.stats()["rows"] == rows and fs_cli(trained, "verify").exit_code == 0
    assert fs_cli(trained, "gc", "--compact").exit_code == 0 and len(list(fs.folder.glob("seg-*.h5"))) == 1


_PUBLISHER = _SETUP + """
for n in range(int(sys.argv[2])):
    lo = (n * 10) % len(keys)
    fs.segments.write(keys[lo:lo + 10], {"pooled": np.concatenate([value(i) for i in range(lo, lo + 10)])})
open(sys.argv[3], "w").close()
"""


def test_verify_during_an_extraction_reports_nothing(store):
    """A writer renames its segment into place, then registers it; verify reads the catalogue and the
    folder together under the catalogue lock, so it never reports the segment between the two."""
    from featurestore.datasets.manifest import normalise

    df = pl.DataFrame({"item_id": [f"i{i}" for i in range(200)], "text": [f"text {i}" for i in range(200)],
                       "split": ["train"] * 200})
    add_dataset(store, "d", normalise(df, source="t"), root=None, source="t")
    fs = FeatureSet(store, "bench-0000000000000000")
    fs.ensure_spec({"backbone": "bench", "modality": "text", "dim": 8, "config": {"dtype": "float32"}})
    done = store.root / "writer-done"
    writer = _py(_PUBLISHER, store.root, 300, done)
    problems, checks = [], 0
    while not done.exists() and writer.poll() is None:
        problems += [p.message for p in fs.segments.verify()]
        checks += 1
    assert writer.wait(timeout=120) == 0, writer.stderr.read()[-2000:]
    assert checks >= 3 and problems == [], (checks, problems[:3])


def test_damaged_fold_weights_of_a_cv_run_are_refused(trained):
    """A `--cv` run has one checksums.json at its root covering `fold-K/` files; reading a fold checks
    its entries there (eval of the cv run, predict RUN/fold-K)."""
    res = fs_cli(trained, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
                 "--target", "label", "--cv", "3", "--run-id", "cvr", "-p", "epochs=2")
    assert res.exit_code == 0, res.output
    assert fs_cli(trained, "predict", "cvr/fold-0", "--text", "a lovely day").exit_code == 0
    _flip_last(trained.heads_dir() / "cvr" / "fold-0" / "model.safetensors")
    for args in (["eval", "cvr", "--dataset", "words"], ["predict", "cvr/fold-0", "--text", "a lovely day"]):
        res = fs_cli(trained, *args)
        assert res.exit_code == 8 and "fold-0/model.safetensors does not match" in res.output, res.output


def test_a_failed_fsync_after_the_catalogue_landed_keeps_the_segment(store, monkeypatch):
    """If the catalogue rewrite itself landed and only the folder's fsync after it failed, the segment
    is registered: it must stay on disk (withdrawing it would lose registered rows)."""
    import errno

    from featurestore import _io
    from featurestore.segments import SegmentSet

    segset = SegmentSet(store.root / "set")
    segset.write(["a" * 32], {"pooled": np.zeros((1, 2), np.float32)})
    real = _io._fsync_dir

    calls = []

    def failing(folder):  # the segment's own publish passes; the catalogue's publish fails after its rename
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", str(folder))
        return real(folder)
    monkeypatch.setattr(_io, "_fsync_dir", failing)
    with pytest.raises(OSError):
        segset.write(["b" * 32], {"pooled": np.ones((1, 2), np.float32)})
    monkeypatch.setattr(_io, "_fsync_dir", real)
    listed = set(segset.catalogue()["segments"])
    assert len(listed) == 2 and {p.name for p in segset.folder.glob("seg-*.h5")} == listed
    assert segset.verify() == []


def test_gc_dry_run_lists_a_stale_manifest_and_keeps_it(store, tmp_path, monkeypatch):
    from featurestore import datasets as D

    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w6.jsonl", 6)), root=None, source="t")
    folder = store.dataset_dir("words")
    real_unlink = type(folder).unlink

    def unlink(path, *a, **k):
        if path.name.startswith("manifest."):
            raise KeyboardInterrupt
        return real_unlink(path, *a, **k)
    monkeypatch.setattr(type(folder), "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w3.jsonl", 3)), root=None, source="t",
                    replace=True)
    monkeypatch.undo()
    (stale,) = D.stale_manifests(folder, D.get_dataset(store, "words").info)
    res = fs_cli(store, "gc", "--dry-run", "--json")
    assert res.exit_code == 0 and str(stale) in json.loads(res.output)["removed_temp_files"]
    assert stale.exists()


def test_verify_reports_a_dead_or_foreign_writers_temp_segment(tmp_path):
    """Only a live writer of this machine's own temp file is skipped; a live pid under another machine's
    tag is someone else's process, and its file is reported (gc removes it under the exclusive lock)."""
    import os

    from featurestore.segments import SegmentSet

    segset = SegmentSet(tmp_path / "set")
    segset.write(["a" * 32], {"pooled": np.zeros((1, 2), np.float32)})
    mine = segset.folder / f".seg-x.h5.{os.getpid()}-abcd1234-{__import__('featurestore._io', fromlist=['x']).writer_tag()}.tmp"
    mine.write_bytes(b"partial")
    assert segset.verify() == []
    foreign = segset.folder / f".seg-y.h5.{os.getpid()}-abcd1234-ffffffff.tmp"
    foreign.write_bytes(b"partial")
    assert [p.path for p in segset.verify()] == [str(foreign)]


def test_a_reader_that_loses_a_race_with_a_replacement_reads_the_new_dataset(store, tmp_path, monkeypatch):
    """The manifest `dataset.json` named is removed by a replacement between the reader's two reads:
    the reader reads `dataset.json` again and gets the new dataset, whole."""
    from pathlib import Path

    from featurestore import datasets as D

    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w6.jsonl", 6)), root=None, source="t")
    real = Path.read_bytes
    raced = []

    def read_bytes(path):
        if path.name.startswith("manifest.") and not raced:
            raced.append(path)
            monkeypatch.setattr(Path, "read_bytes", real)
            add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w3.jsonl", 3)), root=None,
                        source="t", replace=True)
            monkeypatch.setattr(Path, "read_bytes", read_bytes)
        return real(path)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    ds = D.get_dataset(store, "words")
    monkeypatch.undo()
    assert raced and len(ds.manifest) == 3 and ds.info["n_items"] == 3


def test_a_first_add_that_meets_a_competing_first_add_is_refused_and_keeps_the_other(store, tmp_path, monkeypatch):
    """Two first adds of one name: the one that takes the lock second finds the dataset registered
    meanwhile and refuses (no --replace), leaving the other's manifest in place."""
    from featurestore import datasets as D

    real = D.add_content_keys
    competed = []

    def hashing_while_another_add_finishes(df, progress=None):
        out = real(df, progress)
        if not competed:
            competed.append(1)
            add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w3.jsonl", 3)), root=None, source="t")
        return out
    monkeypatch.setattr(D, "add_content_keys", hashing_while_another_add_finishes)
    with pytest.raises(D.DatasetError, match="already exists"):
        add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w6.jsonl", 6)), root=None, source="t")
    monkeypatch.undo()
    assert len(D.get_dataset(store, "words").manifest) == 3 and fs_cli(store, "verify").exit_code == 0


def test_verify_waits_for_an_add_between_its_manifest_and_its_dataset_json(store, tmp_path, monkeypatch):
    import threading

    from featurestore import datasets as D
    from featurestore.verify import verify_store

    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w6.jsonl", 6)), root=None, source="t")
    real = D.write_json_atomic
    seen: dict = {}

    def verify_meanwhile(path, obj):
        if path.name == "dataset.json":  # the new manifest is published, not yet named: verify runs now
            t = threading.Thread(target=lambda: seen.setdefault("problems", verify_store(store)))
            t.start()
            t.join(0.5)
            seen["waited"] = t.is_alive()
            seen["thread"] = t
        return real(path, obj)
    monkeypatch.setattr(D, "write_json_atomic", verify_meanwhile)
    add_dataset(store, "words", read_manifest_file(_jsonl(tmp_path / "w3.jsonl", 3)), root=None, source="t",
                replace=True)
    seen["thread"].join(60)
    assert seen["waited"] and seen["problems"] == []


def test_a_folder_that_cannot_be_renamed_over_is_one_clear_error(tmp_path, monkeypatch):
    """A target that is a mount point (EXDEV / EBUSY from the rename) used to surface as an unexpected
    error; it is one IntegrityError naming the target, and the temporary folder is removed."""
    import errno

    from featurestore import _io
    from featurestore.errors import IntegrityError

    tmp, target = tmp_path / ".run.tmp", tmp_path / "run"
    tmp.mkdir()
    (tmp / "f").write_text("x")

    def cross_device(a, b):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(a), None, str(b))
    monkeypatch.setattr(_io.os, "replace", cross_device)
    with pytest.raises(IntegrityError, match="mount point"):
        _io.publish_folder(tmp, target)
    assert not tmp.exists() and not target.exists()


def test_a_folder_whose_dataset_json_was_lost_takes_a_plain_add(trained):
    """verify says to add the dataset again; that add needs no --replace (nothing is registered) and
    leaves the folder as a fresh add would."""
    folder = trained.dataset_dir("words")
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").unlink()
    (folder / info["manifest_file"]).rename(folder / "manifest.parquet")  # as a legacy store has it
    assert "fs datasets add words" in fs_cli(trained, "verify").output
    df = pl.read_parquet(folder / "manifest.parquet").select("item_id", "text", "label", "split")
    csv = _write_csv(df.rename({"item_id": "id"}), trained.root / "w.csv")
    add_dataset(trained, "words", read_manifest_file(csv), root=None, source="t")
    assert fs_cli(trained, "verify").exit_code == 0
    assert sorted(p.name for p in folder.glob("manifest*.parquet")) == [get_dataset(trained, "words").info["manifest_file"]]


def _write_csv(df, path):
    df.write_csv(path)
    return path


def _change_a_digit(path):
    """The first digit of the file changed (0->1, 1->2, others down by one): still valid JSON, as a flipped
    bit in a number often is."""
    text = path.read_text()
    i = next(i for i, c in enumerate(text) if c.isdigit())
    path.write_text(text[:i] + {"0": "1", "1": "2"}.get(text[i], str(int(text[i]) - 1)) + text[i + 1:])


@pytest.mark.parametrize("name,damage,command", [
    ("heads/r1/metrics.json", _change_a_digit, ["runs"]),
    ("heads/r1/metrics.json", lambda p: p.write_text("{" + p.read_text()), ["runs"]),
    ("heads/r1/lineage.json", _change_a_digit, ["ls"]),
    ("memory/m1/spec.json", _change_a_digit, ["memory", "list"]),
    ("va_models/v1/metrics.json", _change_a_digit, ["va", "models"]),
    ("va_models/v1/config.json", _change_a_digit, ["va", "info", "v1"]),
])
def test_listings_refuse_a_damaged_record_instead_of_showing_or_hiding_it(trained, name, damage, command):
    """`fs runs`, `fs ls`, `fs memory list`, `fs va models` and `fs va info` read these files without their
    checksums: a changed digit was shown as the run's score (exit 0), and a run whose metrics.json no
    longer parsed was silently left out of `fs runs`. Now: one line naming the file, exit 8."""
    path = trained.root / name
    damage(path)
    res = fs_cli(trained, *command)
    assert res.exit_code == 8, (command, res.output)
    assert res.output.strip().splitlines()[-1].startswith("error: ") and path.name in res.output


def test_two_trainings_of_one_run_id_at_once_keep_the_first_and_refuse_the_second(trained, monkeypatch):
    """Two `train-head --run-id R` at once: both passed the "already exists" check before training, and the
    one that published second died on the rename with `OSError: [Errno 39] Directory not empty` (exit 1).
    Now it is the usual one-line refusal (exit 2); the first run stays whole and no temp folder is left."""
    from featurestore.jobs import train_head

    real, other = train_head.plot, []

    def another_job_publishes_meanwhile(folder, *a, **k):
        final = folder.parent / "r2"
        if not other:  # the other job saves run r2 while this one writes its plots
            other.append("started")
            other.append(fs_cli(trained, "train-head", "--method", "linear", "--dataset", "words", "--features",
                                "text=minilm", "--target", "label", "--run-id", "r2").exit_code)
            other.append((final / "model.safetensors").read_bytes())
        return real(folder, *a, **k)
    monkeypatch.setattr(train_head, "plot", another_job_publishes_meanwhile)
    res = fs_cli(trained, "train-head", "--method", "mlp", "--dataset", "words", "--features", "text=minilm",
                 "--target", "label", "--run-id", "r2")
    assert other[1] == 0 and res.exit_code == 2, res.output
    assert res.output.strip().splitlines()[-1].startswith("error: run 'r2' already exists")
    assert (trained.heads_dir() / "r2" / "model.safetensors").read_bytes() == other[2]
    assert not list(trained.heads_dir().glob(".*.tmp")) and fs_cli(trained, "verify").exit_code == 0


@pytest.mark.slow
def test_parquet_written_on_a_full_disk_is_disk_full_not_an_unexpected_error(tiny_disk):
    """polars reports a parquet write whose footer meets a full disk as "Invalid thrift: transport error",
    without the errno: a sweep table (and a memory's metadata, a refresh report, a --cv run's folds, a
    manifest) written there was an unexpected error (exit 1). Through _io.write_parquet it is exit 11."""
    from featurestore.errors import DiskFullError
    from featurestore.jobs.sweep.results import write_table

    table = pl.DataFrame({"trial": list(range(2000)), "params": [f'{{"lr": {i}}}' for i in range(2000)]})
    fill(tiny_disk, 0)
    with pytest.raises(DiskFullError, match="disk full writing .*results.parquet"):
        write_table(table, tiny_disk / "results.parquet")
    assert not temp_files(tiny_disk) and not (tiny_disk / "results.parquet").exists()


def test_a_va_model_saved_by_another_job_meanwhile_is_kept_without_replace(trained, monkeypatch):
    """Two `va fit --out V` at once (no --replace): both passed the "already exists" check, and the second
    to publish died with `OSError: Directory not empty` (exit 1), or, had it gone on, replaced the first
    without --replace. Now it is the usual refusal (exit 2) and the first model stays."""
    from featurestore.jobs import va

    real, other = va.write_checksums, []

    def another_job_saves_meanwhile(folder, names):
        if not other:
            other.append("started")
            other.append(fs_cli(trained, "va", "fit", "--dataset", "words", "--features", "text=minilm", "--out", "v2",
                                "--test-split", "", "-p", "kind=mlp").exit_code)
            other.append((trained.root / "va_models" / "v2" / "model.safetensors").read_bytes())
        return real(folder, names)
    monkeypatch.setattr(va, "write_checksums", another_job_saves_meanwhile)
    res = fs_cli(trained, "va", "fit", "--dataset", "words", "--features", "text=minilm", "--out", "v2",
                 "--test-split", "")
    assert other[1] == 0 and res.exit_code == 2, res.output
    assert "already exists" in res.output.strip().splitlines()[-1]
    assert (trained.root / "va_models" / "v2" / "model.safetensors").read_bytes() == other[2]
    assert not list((trained.root / "va_models").glob(".*.tmp")) and fs_cli(trained, "verify").exit_code == 0


@pytest.mark.parametrize("damage", ["changed fold", "corrupt"])
def test_a_damaged_folds_table_of_a_cv_run_is_refused_by_eval(trained, damage):
    """`fs eval` of a --cv run (out-of-fold: folds.parquet says which fold head predicts which item) and of
    RUN/fold-K read folds.parquet without its checksum: a changed fold number scored items with heads that
    had trained on them (exit 0), a corrupt file was an unexpected error (exit 1). Now exit 8."""
    res = fs_cli(trained, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
                 "--target", "label", "--cv", "3", "--run-id", "cvr", "-p", "epochs=2")
    assert res.exit_code == 0, res.output
    path = trained.heads_dir() / "cvr" / "folds.parquet"
    if damage == "changed fold":
        pl.read_parquet(path).with_columns((pl.col("held_out_fold") + 1) % 3).write_parquet(path)
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    for args in (["eval", "cvr", "--dataset", "words"], ["eval", "cvr/fold-0", "--dataset", "words"]):
        res = fs_cli(trained, *args)
        assert res.exit_code == 8 and "folds.parquet does not match" in res.output, (args, res.output)


@pytest.mark.parametrize("damage", ["flip", "lose checksums"])
def test_verify_checks_each_seed_of_a_seeds_run(trained, damage):
    """A `--seeds` run's checksums.json lists only its metrics and lineage; each seed-S/ has its own, and
    `fs verify` never read those: a flipped byte in a seed's weights (or its checksums.json gone) passed."""
    res = fs_cli(trained, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
                 "--target", "label", "--seeds", "2", "--run-id", "sr", "-p", "epochs=2")
    assert res.exit_code == 0 and fs_cli(trained, "verify").exit_code == 0, res.output
    seed = trained.heads_dir() / "sr" / "seed-1"
    if damage == "flip":
        _flip_last(seed / "model.safetensors")
    else:
        (seed / "checksums.json").unlink()
    res = fs_cli(trained, "verify", "--json")
    assert res.exit_code == 8, res.output
    assert any("seed-1" in p["path"] + p["message"] for p in json.loads(res.output)["problems"])


def test_a_damaged_scl_run_is_refused_by_memory_build(trained, tmp_path):
    """`fs memory build --from RUN` read the run's lineage.json with json.loads before any check: damaged, it
    was 'fs memory failed: JSONDecodeError' (exit 1); a changed value would have been used. Now exit 8."""
    from featurestore.jobs.train_scl import load_run
    from featurestore.errors import IntegrityError

    res = fs_cli(trained, "scl", "train", "--data", "words:text=minilm", "--run", "s1", "-p", "joint_epochs=1",
                 "-p", "seq_epochs=1", "-p", "width=16", "-p", "proj_width=16")
    assert res.exit_code == 0, res.output
    lineage = trained.heads_dir() / "s1" / "lineage.json"
    lineage.write_text("{" + lineage.read_text())
    res = fs_cli(trained, "memory", "build", "m2", "--from", "s1")
    assert res.exit_code == 8 and "lineage.json does not match" in res.output, res.output
    with pytest.raises(IntegrityError, match="lineage.json does not match"):
        load_run(trained, "s1")


def test_gc_and_verify_leave_the_folder_of_a_running_seeds_run_alone(trained, monkeypatch):
    """A `--seeds` (or `--cv`) run fills a hidden temporary folder for as long as it trains. Once that
    folder was 10 minutes old, `fs gc` removed it under the running job, which then failed with
    'FileNotFoundError: ... seed-0/checksums.json' (exit 1, the training lost); `fs verify` reported it as
    left by a killed job. The folder names its writer now, and a running writer's folder is not touched."""
    from featurestore import verify
    from featurestore.jobs import train_head

    monkeypatch.setattr(verify, "TEMP_GRACE_S", 0)  # as if each seed took more than 10 minutes
    real, seen = train_head.run, []

    def train_then_gc_and_verify(config, store, **kw):
        result = real(config, store, **kw)
        seen.append((verify.gc_store(store)["removed_temp_files"], verify.verify_store(store)))
        return result
    monkeypatch.setattr(train_head, "run", train_then_gc_and_verify)
    res = fs_cli(trained, "train-head", "--method", "linear", "--dataset", "words", "--features", "text=minilm",
                 "--target", "label", "--seeds", "2", "--run-id", "sr", "-p", "epochs=2")
    assert res.exit_code == 0, res.output
    assert seen and all(removed == [] and problems == [] for removed, problems in seen), seen
    assert fs_cli(trained, "eval", "sr/seed-0", "--dataset", "words").exit_code == 0
