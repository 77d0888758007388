import numpy as np
import pytest

from featurestore.errors import IntegrityError
from featurestore.hashing import content_key
from featurestore.segments import ErrorRecord, SegmentSet


def keys(n, tag="t"):
    return [content_key("text", f"{tag}{i}") for i in range(n)]


def test_roundtrip_aligned_with_absent_and_repeated_keys(tmp_path):
    segset = SegmentSet(tmp_path)
    k = keys(10)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 4)).astype(np.float16)
    seqs = [rng.normal(size=(i + 1, 4)).astype(np.float16) for i in range(10)]
    segset.write(k[:6], {"pooled": a[:6]}, {"seq": seqs[:6]})
    segset.write(k[6:], {"pooled": a[6:]}, {"seq": seqs[6:]})
    want = [k[3], "", k[9], content_key("text", "absent"), k[3]]
    out, present = segset.read(want, "pooled")
    assert present.tolist() == [True, False, True, False, True]
    np.testing.assert_array_equal(out[[0, 2, 4]], a[[3, 9, 3]])
    assert not out[[1, 3]].any()
    rows, present = segset.read_ragged(want, "seq")
    np.testing.assert_array_equal(rows[0], seqs[3])
    np.testing.assert_array_equal(rows[2], seqs[9])
    assert rows[1] is None and rows[3] is None
    assert segset.verify(expect={"pooled": (4,)}) == []


def test_segment_name_is_its_checksum_and_a_flipped_byte_is_detected(tmp_path):
    segset = SegmentSet(tmp_path)
    path = segset.write(keys(50), {"pooled": np.ones((50, 8), np.float32)})
    assert segset.verify() == []
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    problems = segset.verify()
    assert len(problems) == 1 and "checksum mismatch" in problems[0].message


def test_a_changed_digit_in_the_catalogue_is_detected_and_an_unsealed_one_still_reads(tmp_path):
    import hashlib
    import json

    segset = SegmentSet(tmp_path)
    segset.write(keys(7), {"pooled": np.ones((7, 2), np.float32)})
    raw = segset.catalogue_path.read_text()
    doc = json.loads(raw)
    body = {k: v for k, v in doc.items() if k != "sha256"}
    want = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert doc["sha256"] == want  # the seal is the SHA-256 of the rest, in canonical JSON
    # a digit flipped in a row count is still valid JSON; only the seal can notice it
    segset.catalogue_path.write_text(raw.replace('"rows": 7', '"rows": 8'))
    assert segset.catalogue_path.read_text() != raw
    with pytest.raises(IntegrityError, match="does not match its SHA-256"):
        segset.catalogue()
    (problem,) = segset.verify()
    assert "SHA-256" in problem.message
    # a catalogue written before the seal existed reads as it is
    segset.catalogue_path.write_text(json.dumps(body))
    assert segset.catalogue()["segments"] == body["segments"] and segset.verify() == []


def test_errors_travel_with_their_segment(tmp_path):
    segset = SegmentSet(tmp_path)
    segset.write(keys(1), {"pooled": np.zeros((1, 2), np.float32)},
                 errors=[ErrorRecord("", "ds", "item-7", "missing file: /x.png")])
    (err,) = segset.errors()
    assert (err.dataset, err.item_id, err.reason) == ("ds", "item-7", "missing file: /x.png")


def test_compact_merges_dedupes_and_keeps_values(tmp_path):
    segset = SegmentSet(tmp_path)
    k = keys(30)
    a = np.arange(30 * 3, dtype=np.float32).reshape(30, 3)
    for lo in range(0, 30, 10):
        segset.write(k[lo:lo + 10], {"pooled": a[lo:lo + 10]})
    segset.write(k[:5], {"pooled": a[:5]})  # as if a compaction had been interrupted
    assert any("also in" in p.message for p in segset.verify())
    merged, path = segset.compact()
    assert merged == 4 and len(segset.segments()) == 1
    out, present = segset.read(k, "pooled")
    assert present.all()
    np.testing.assert_array_equal(out, a)
    assert segset.verify() == []


def test_temp_files_from_killed_writers_are_reported_and_removed(tmp_path):
    segset = SegmentSet(tmp_path)
    segset.write(keys(2), {"pooled": np.zeros((2, 2), np.float32)})
    (tmp_path / ".segment.h5.deadbeef.tmp").write_bytes(b"partial")
    assert any("unpublished" in p.message for p in segset.verify())
    assert len(segset.remove_temp_files()) == 1
    assert segset.verify() == []


def test_only_a_dead_writers_temp_files_are_removed_while_others_write(tmp_path):
    """`remove_temp_files(dead_only=True)` (what each extraction does first): a pid means a process only
    on the machine and pid namespace that wrote the name, so another one's temp file is kept."""
    import subprocess
    import sys

    from featurestore._io import tmp_path as temp_name, writer_tag

    segset = SegmentSet(tmp_path)
    segset.write(keys(2), {"pooled": np.zeros((2, 2), np.float32)})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    other = "0" * 8 if writer_tag() != "0" * 8 else "f" * 8
    mine = temp_name(tmp_path / "seg-x.h5")  # a live writer here: this process
    names = {"dead_here": f".seg-a.h5.{dead}-12345678-{writer_tag()}.tmp",
             "dead_pid_elsewhere": f".seg-b.h5.{dead}-12345678-{other}.tmp",
             "untagged_dead": f".seg-c.h5.{dead}-12345678.tmp",
             "alive_here": mine.name}
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    removed = {p.name for p in segset.remove_temp_files(dead_only=True)}
    assert removed == {names["dead_here"], names["untagged_dead"]}
    assert {p.name for p in segset.temp_files()} == {names["dead_pid_elsewhere"], names["alive_here"]}


def test_unknown_array_name_is_a_clear_error(tmp_path):
    segset = SegmentSet(tmp_path)
    segset.write(keys(2), {"pooled": np.zeros((2, 2), np.float32)})
    with pytest.raises(IntegrityError, match="no array 'va'"):
        segset.read(keys(2), "va")


def _flip_array_byte(path, name="pooled", byte=1):
    """Flip one bit inside the stored values of `arrays/<name>` (not in HDF5 metadata)."""
    import h5py

    with h5py.File(path, "r") as f:
        offset = f[f"arrays/{name}"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + byte] ^= 0x40
    path.write_bytes(bytes(data))


def test_compact_refuses_a_corrupt_source_and_merges_nothing(tmp_path):
    """A bit-flipped segment must not be sealed under a fresh checksum (and its evidence deleted)."""
    segset = SegmentSet(tmp_path)
    k = keys(30)
    a = np.linspace(-1, 1, 30 * 4, dtype=np.float32).reshape(30, 4)
    paths = [segset.write(k[lo:lo + 10], {"pooled": a[lo:lo + 10]}) for lo in range(0, 30, 10)]
    _flip_array_byte(paths[1])
    with pytest.raises(IntegrityError, match="is corrupt"):  # readers refuse it too
        segset.read(k, "pooled")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("seg-*.h5")}
    with pytest.raises(IntegrityError, match=f"nothing merged: segment {paths[1].name} is corrupt") as err:
        segset.compact()
    assert "\n" not in str(err.value) and "fs verify" in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("seg-*.h5")} == before  # nothing written or deleted
    assert len(segset.segments()) == 3 and not segset.catalogue()["retired"]
    assert [p.message for p in segset.verify() if "checksum mismatch" in p.message]


@pytest.mark.parametrize("what", ["dense", "ragged"])
def test_compact_refuses_a_merge_whose_values_differ_from_the_sources(tmp_path, monkeypatch, what):
    """Keys, shapes and counts right, one value wrong (a gather bug): nothing is retired."""
    from featurestore import segments as seg_mod

    segset = SegmentSet(tmp_path)
    k = keys(20)
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 3)).astype(np.float32)
    seqs = [rng.normal(size=(i % 3 + 1, 3)).astype(np.float16) for i in range(20)]
    for lo in (0, 10):
        segset.write(k[lo:lo + 10], {"pooled": a[lo:lo + 10]}, {"seq": seqs[lo:lo + 10]})
    old = sorted(s.path.name for s in segset.segments())
    if what == "dense":
        real = seg_mod.SegmentSet._scan

        def bad_scan(self, segs, name, dtype=None):
            got_keys, rows = real(self, segs, name, dtype)
            rows = rows.copy()
            rows[[3, 4]] = rows[[4, 3]]  # two rows swapped: same keys, shapes and counts
            return got_keys, rows
        monkeypatch.setattr(seg_mod.SegmentSet, "_scan", bad_scan)
    else:
        real = seg_mod.SegmentSet.read_ragged

        def bad_ragged(self, *args, **kw):
            rows, present = real(self, *args, **kw)
            rows[7] = rows[7] + np.float16(1)
            return rows, present
        monkeypatch.setattr(seg_mod.SegmentSet, "read_ragged", bad_ragged)
    with pytest.raises(IntegrityError, match="nothing deleted: merged (array pooled|ragged seq) differs"):
        segset.compact()
    monkeypatch.undo()
    assert sorted(s.path.name for s in segset.segments()) == old  # the bad merge was withdrawn
    out, present = segset.read(k, "pooled")
    assert present.all()
    np.testing.assert_array_equal(out, a)
    assert segset.verify() == []


def test_the_writer_tag_tells_pid_namespaces_and_machines_apart(monkeypatch):
    import os
    import socket

    import featurestore._io as io_

    def tag() -> str:
        monkeypatch.setattr(io_, "_TAG", [])
        return io_.writer_tag()

    here = tag()
    real_stat = os.stat

    def other_namespace(path, *a, **k):
        st = real_stat(path, *a, **k)
        if str(path) == "/proc/self/ns/pid":
            return os.stat_result((st.st_mode, st.st_ino + 1, *tuple(st)[2:]))
        return st

    monkeypatch.setattr(os, "stat", other_namespace)
    in_a_container = tag()
    monkeypatch.setattr(os, "stat", real_stat)
    monkeypatch.setattr(socket, "gethostname", lambda: "another-node")
    elsewhere = tag()
    assert len({here, in_a_container, elsewhere}) == 3
    monkeypatch.setattr(io_, "_TAG", [])


def test_a_flipped_bit_is_caught_by_the_first_keyed_read_not_trained_on(tmp_path):
    segset = SegmentSet(tmp_path)
    a = np.arange(40, dtype=np.float32).reshape(10, 4)
    segset.write(keys(10), {"pooled": a})
    out, present = segset.read(keys(10), "pooled")  # whole: read, and remembered as checked
    np.testing.assert_array_equal(out, a)
    (seg,) = segset.segments()
    data = bytearray(seg.path.read_bytes())
    at = data.find(a.tobytes())
    data[at + 17] ^= 0x01  # one bit of one value
    seg.path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="is corrupt: its bytes hash to .* nothing was read"):
        segset.read(keys(3), "pooled")
    with pytest.raises(IntegrityError, match="is corrupt"):
        segset.read_ragged(keys(3), "pooled")
