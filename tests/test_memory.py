"""The FAISS replay memory against numpy brute force: exact and IVF search, add/remove by id,
save/load, pools."""
from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from featurestore.errors import ConfigError
from featurestore.memory import Memory, MemoryConfig, mark_pools, pool_counts
from featurestore.memory._index import exact_topk, recall_at


def clustered(n, dim=32, clusters=40, spread=0.35, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute(base, ids, queries, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    rows = exact_topk(base, q.astype(np.float32), k)
    return ids[rows], np.take_along_axis(q @ base.T, rows, 1)


def test_exact_search_matches_numpy_brute_force():
    x, queries = np.split(clustered(520), [500])
    ids = np.arange(1000, 1500)
    mem = Memory(32)
    mem.add(ids, x * 3.0, {"class": ["a"] * 500})  # stored normalised: cosine
    assert mem.kind == "flat" and len(mem) == 500
    scores, found = mem.search(queries, 10)
    want_ids, want_scores = brute(x, ids, queries, 10)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_ivf_above_threshold_reaches_recall_and_removes_by_id(tmp_path):
    x, queries = np.split(clustered(6200, seed=2), [6000])  # queries held out from the same clusters
    ids = np.arange(6000) * 7  # ids need not be positions
    mem = Memory(32, MemoryConfig(exact_max=2000, target_recall=0.95))
    mem.add(ids[:1000], x[:1000], {"modality": ["text"] * 1000})
    assert mem.kind == "flat"
    mem.add(ids[1000:], x[1000:], {"modality": ["text"] * 5000})  # crosses exact_max: rebuilt as IVF
    assert mem.kind == "ivf" and len(mem) == 6000 and mem.recall >= 0.95 and mem.nprobe >= 1
    _, found = mem.search(queries, 10)
    want, _ = brute(x, ids, queries, 10)
    assert recall_at(found, want) >= 0.9
    gone = ids[:50]
    assert mem.remove(np.concatenate([gone, [-5, 10**9]])) == 50
    assert len(mem) == len(mem.meta) == 5950
    _, found = mem.search(x[:50], 10)
    assert not np.isin(found, gone).any()
    mem.save(tmp_path / "m")
    again = Memory.load(tmp_path / "m")
    assert again.kind == "ivf" and again.nprobe == mem.nprobe and len(again) == 5950
    np.testing.assert_array_equal(again.search(queries, 10)[1], mem.search(queries, 10)[1])
    np.testing.assert_allclose(again.vectors(ids[100:103]), x[100:103], atol=1e-6)


def test_add_remove_save_load_round_trip(tmp_path):
    x = clustered(100, seed=4)
    mem = Memory(32, spec={"name": "t"})
    meta = {"item_id": [f"i{i}" for i in range(100)], "dataset": ["d"] * 100, "class": ["a", "b"] * 50,
            "confidence": np.linspace(0, 1, 100), "extra": list(range(100))}
    mem.add(np.arange(100), x, meta)
    with pytest.raises(ConfigError, match="already present"):
        mem.add([5], x[:1], {})
    with pytest.raises(ConfigError, match="shape"):
        mem.add([500], np.zeros((1, 8)), {})
    assert mem.remove([3, 4]) == 2
    mem.add([3], x[3:4], {"item_id": ["back"]})
    mem.save(tmp_path / "m")
    mem.save(tmp_path / "m")  # replacing a published memory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp folders left
    again = Memory.load(tmp_path / "m")
    assert again.spec["name"] == "t" and len(again) == 99
    _, found = again.search(x[3:4], 1)
    assert again.rows(found[0])[0]["item_id"] == "back"
    assert again.rows(np.array([-1]))[0] is None
    assert again.meta["extra"].drop_nulls().len() == 98


def test_raw_vectors_come_back_as_added_after_unsorted_adds_and_a_remove_and_re_add():
    rng = np.random.default_rng(11)
    ids = np.array([907, 12, 455, 3, 78, 600, 41])  # neither sorted nor positions
    x = rng.normal(size=(len(ids), 6)) * rng.uniform(0.2, 40, (len(ids), 1))  # a different norm per row
    mem = Memory(6)
    mem.add(ids[:4], x[:4], {})
    mem.add(ids[4:], x[4:], {})
    assert mem.remove([12]) == 1
    mem.add([12], x[1:2], {})  # re-added: now the last metadata row
    ask = np.array([12, 600, 3, 907, 41, 455, 78])  # any order, not the stored one
    want = x[[list(ids).index(i) for i in ask]]
    np.testing.assert_allclose(mem.vectors(ask, raw=True), want, rtol=1e-5, atol=1e-5)
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(mem.vectors(ask), unit, atol=1e-6)  # stored normalised


def test_search_scores_are_cosines_for_queries_of_any_norm():
    rng = np.random.default_rng(12)
    base = rng.normal(size=(30, 8)) * rng.uniform(0.1, 20, (30, 1))
    queries = rng.normal(size=(5, 8)) * np.array([[0.01], [0.5], [1.0], [7.0], [300.0]])
    mem = Memory(8)
    mem.add(np.arange(100, 130), base, {})
    scores, found = mem.search(queries, 30)  # every row: the whole cosine table, sorted
    cos = (queries @ base.T) / np.linalg.norm(queries, axis=1)[:, None] / np.linalg.norm(base, axis=1)[None]
    np.testing.assert_allclose(scores, np.take_along_axis(cos, found - 100, 1), atol=1e-5)
    np.testing.assert_allclose(scores, -np.sort(-cos, axis=1), atol=1e-5)
    assert (np.abs(scores) <= 1 + 1e-5).all()
    # a single 1-d query of norm 50: the same cosines as its unit version
    s1, f1 = mem.search(queries[4], 3)
    np.testing.assert_array_equal(f1, found[4:5, :3])
    np.testing.assert_allclose(s1, scores[4:5, :3], atol=1e-5)


@pytest.mark.parametrize("one_call", [True, False])
def test_exact_max_vectors_stay_flat_and_one_more_switches_to_ivf(one_call):
    # MemoryConfig.exact_max: "exact (flat) search up to this many vectors; IVF above it"
    n = 40
    x = clustered(n + 1, dim=8, clusters=4, seed=13)
    mem = Memory(8, MemoryConfig(exact_max=n))
    if one_call:
        mem.add(np.arange(n), x[:n], {})
    else:
        mem.add(np.arange(n - 1), x[:n - 1], {})
        mem.add([n - 1], x[n - 1:n], {})
    assert len(mem) == n and mem.kind == "flat" and mem.recall is None
    mem.add([n], x[n:], {})
    assert len(mem) == n + 1 and mem.kind == "ivf" and mem.recall is not None
    np.testing.assert_allclose(mem.vectors(np.arange(n + 1)), x, atol=1e-6)
    # the same n + 1 vectors in one add: IVF from the start
    direct = Memory(8, MemoryConfig(exact_max=n))
    direct.add(np.arange(n + 1), x, {})
    assert direct.kind == "ivf"


@pytest.mark.parametrize("min_pool", [1, 8, 30])
def test_pools_are_top_p_of_correct_rows_with_a_floor_per_modality_and_class(min_pool):
    rng = np.random.default_rng(5)
    n = 400
    df = pl.DataFrame({"modality": rng.choice(["image", "text"], n), "class": rng.choice(["a", "b", "c"], n),
                       "confidence": rng.random(n).astype(np.float32), "correct": rng.random(n) < 0.6})
    df = df.with_columns(pl.when((pl.col("class") == "c") & (pl.col("modality") == "text"))
                         .then(False).otherwise(pl.col("correct")).alias("correct"))  # no correct row
    df = pl.concat([df, pl.DataFrame({"modality": ["audio"] * 3, "class": ["a"] * 3,  # fewer rows than the floor
                                      "confidence": np.float32([0.1, 0.9, 0.5]), "correct": [False, True, False]})])
    out = mark_pools(df, 0.2, min_pool)
    for (m, c), group in out.group_by(["modality", "class"]):
        conf, correct = group["confidence"].to_numpy(), group["correct"].to_numpy()
        by_conf = np.argsort(-conf)
        ranked = [conf[i] for i in by_conf if correct[i]] + [conf[i] for i in by_conf if not correct[i]]
        size = max(math.ceil(0.2 * correct.sum()), min(min_pool, len(group)))
        assert set(group.filter(pl.col("pool"))["confidence"].to_list()) == set(ranked[:size]), (m, c)
    counts = pool_counts(out)
    assert counts["text"]["c"] == min_pool and counts["audio"]["a"] == min(min_pool, 3)
    with pytest.raises(ConfigError, match="top_p=0"):
        mark_pools(df, 0)
    with pytest.raises(ConfigError, match="min_pool=0"):
        mark_pools(df, 0.2, 0)


# ---- replacing a published memory is crash-safe (review finding 3) -------------------------------
_KILL_BETWEEN_RENAMES = """
import os, signal, sys, numpy as np
import featurestore._io as _io
from featurestore.store import open_store
from featurestore.memory import Memory, memory_path
store, fallback = open_store(sys.argv[1]), sys.argv[2] == "fallback"
if fallback:
    _io.exchange = lambda a, b: False  # as on a kernel or filesystem without renameat2
def build(seed):
    mem = Memory(8)
    mem.add(np.arange(5), np.random.default_rng(seed).normal(size=(5, 8)).astype(np.float32),
            {"item_id": [f"v{seed}-{i}" for i in range(5)], "class": ["a"] * 5})
    return mem
target = memory_path(store, "m1")
build(0).save(target)
real = os.replace
def replace(src, dst):
    real(src, dst)
    if os.fspath(src) == os.fspath(target):  # the old folder was just moved aside: a real SIGKILL here
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
build(1).save(target)
print("saved")
"""


def _save_twice_killing_between_renames(store, how):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _KILL_BETWEEN_RENAMES, str(store.root), how],
                          capture_output=True, text=True, timeout=120)


def _item_ids(store):
    from featurestore.memory import open_memory

    return open_memory(store, "m1").meta["item_id"].to_list()


def test_a_replacement_swaps_atomically_so_there_is_never_a_moment_without_the_memory(store, tmp_path):
    from featurestore import _io

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir(), (a / "f").write_text("a")
    if not _io.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    assert (b / "f").read_text() == "a" and not any(a.iterdir())
    res = _save_twice_killing_between_renames(store, "exchange")
    assert res.returncode == 0 and "saved" in res.stdout, res.stderr[-2000:]  # the old folder never moved aside
    assert _item_ids(store) == [f"v1-{i}" for i in range(5)]
    assert sorted(p.name for p in store.memory_dir().iterdir()) == ["m1"]


def test_gc_restores_a_memory_whose_replacement_was_killed_between_the_renames(store):
    import json
    import os

    from click.testing import CliRunner

    from featurestore.cli import cli

    def fs(*args):
        return CliRunner().invoke(cli, ["--store", str(store.root), *args], catch_exceptions=False)

    res = _save_twice_killing_between_renames(store, "fallback")
    assert res.returncode == -9, (res.returncode, res.stderr[-2000:])
    left = sorted(p.name for p in store.memory_dir().iterdir())
    assert "m1" not in left and len(left) == 2 and left[0].endswith(".old") ^ left[1].endswith(".old")
    out = fs("verify", "--json")
    assert out.exit_code == 8
    problems = {os.path.basename(p["path"]): p["message"] for p in json.loads(out.output)["problems"]}
    old = next(n for n in left if n.endswith(".old"))
    assert "m1 is missing" in problems[old] and "`fs gc` puts this copy back" in problems[old]
    for name in left:  # even once the grace period for temporary files is over
        os.utime(store.memory_dir() / name, (0, 0))
    out = fs("gc")
    assert out.exit_code == 0 and "restored" in out.output, out.output
    assert _item_ids(store) == [f"v0-{i}" for i in range(5)]  # the complete previous memory
    assert sorted(p.name for p in store.memory_dir().iterdir()) == ["m1"]  # the half-published copy is gone
    assert fs("verify").exit_code == 0


def test_a_failed_second_rename_puts_the_old_folder_back_and_everything_is_fsynced(tmp_path, monkeypatch):
    import os

    from featurestore import _io

    target, tmp = tmp_path / "x", tmp_path / ".x.1234abcd.tmp"
    for folder, text in ((target, "old"), (tmp, "new")):
        (folder / "sub").mkdir(parents=True)
        (folder / "f").write_text(text)
        (folder / "sub" / "g").write_text(text)
    synced = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(_io, "exchange", lambda a, b: False)
    calls = []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        _io.publish_folder(tmp, target)
    assert (target / "f").read_text() == "old" and (tmp / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.1234abcd.tmp", "x"]
    assert {str(tmp / "f"), str(tmp / "sub" / "g"), str(tmp / "sub"), str(tmp)} <= set(synced)
    monkeypatch.setattr(os, "replace", real_replace)
    synced.clear()
    _io.publish_folder(tmp, target)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert str(tmp_path) in synced  # the parent, after the rename


def test_a_published_folder_is_not_reported_as_failed_when_its_parent_cannot_be_fsynced(tmp_path, monkeypatch):
    """The swap has happened: a parent folder that refuses fsync (some filesystems do) must not make the
    caller report a failure and clean up what is now the live copy."""
    import os

    from featurestore import _io

    target, tmp = tmp_path / "x", tmp_path / ".x.1234abcd.tmp"
    for folder, text in ((target, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(tmp_path):
            raise OSError(22, "Invalid argument")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    _io.publish_folder(tmp, target)
    assert (target / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_swap_refused_by_a_sandbox_falls_back_to_the_two_renames(tmp_path, monkeypatch):
    """renameat2 failing with EPERM (a seccomp filter) is 'cannot swap here', not an error."""
    import ctypes
    import errno

    from featurestore import _io

    monkeypatch.setattr(_io, "_libc_renameat2", lambda: (lambda *a: -1))
    monkeypatch.setattr(ctypes, "get_errno", lambda: errno.EPERM)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    assert _io.exchange(a, b) is False
    (a / "f").write_text("new")
    _io.publish_folder(a, b)
    assert (b / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_k_beyond_the_memory_returns_every_row_without_allocating_k():
    """`fs query --k 99999999999999` was a MemoryError (faiss allocates [Q, k] results)."""
    x, queries = np.split(clustered(43, seed=5), [40])
    ids = np.arange(40) + 500
    mem = Memory(32)
    mem.add(ids, x, {})
    scores, found = mem.search(queries, 99_999_999_999_999)
    want_ids, want_scores = brute(x, ids, queries, 40)
    assert found.shape == (3, 40)
    np.testing.assert_array_equal(found, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
