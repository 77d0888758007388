import json

import pytest

from featurestore._io import file_lock, write_json_atomic
from featurestore.errors import ConfigError, LockedError, NotFoundError, StoreVersionError
from featurestore.store import FORMAT_VERSION, Store, check_name, open_store


def test_init_writes_versioned_store_json(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    meta = json.loads(store.meta_path.read_text())
    assert meta["format"] == "featurestore" and meta["format_version"] == FORMAT_VERSION
    assert Store(tmp_path / "s").init() is False  # second init is a no-op


def test_refuses_other_format_version(tmp_path):
    store = open_store(tmp_path / "s", create=True)
    write_json_atomic(store.meta_path, {**store.meta(), "format_version": FORMAT_VERSION + 1})
    with pytest.raises(StoreVersionError, match=f"version {FORMAT_VERSION + 1}"):
        open_store(tmp_path / "s")


def test_a_version_1_store_is_upgraded_in_place_and_keeps_its_fingerprints(tmp_path, monkeypatch):
    """Version 1 differs only in unsealed catalogues: opening it rewrites store.json (so releases that read
    version 1 only refuse it from then on) and nothing else; fingerprints hash the row format, not the
    store's layout version, so cached rows stay cache hits."""
    from featurestore import backbones

    store = open_store(tmp_path / "s", create=True)
    write_json_atomic(store.meta_path, {**store.meta(), "format_version": 1})
    before = sorted(p.name for p in store.root.rglob("*"))
    again = open_store(tmp_path / "s")
    meta = again.meta()
    assert meta["format_version"] == FORMAT_VERSION == 2 and meta["upgraded_from"] == 1
    assert sorted(p.name for p in store.root.rglob("*")) == before  # only store.json's content changed
    import featurestore.store as store_module

    minilm = backbones.create("minilm")
    assert minilm.spec()["store_format"] == 1  # the value every version-1 release hashed
    fingerprint = minilm.fingerprint()
    monkeypatch.setattr(store_module, "FORMAT_VERSION", 99)  # the layout version plays no part in it
    assert backbones.create("minilm").fingerprint() == fingerprint


def test_missing_store_says_how_to_create(tmp_path):
    with pytest.raises(NotFoundError, match="fs --store .* init"):
        open_store(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 200])
def test_names_that_would_escape_folders_are_refused(bad):
    with pytest.raises(ConfigError):
        check_name(bad, "dataset")


def test_file_lock_is_exclusive(tmp_path):
    with file_lock(tmp_path / ".lock", "thing"):
        with pytest.raises(LockedError, match="locked by another process"):
            with file_lock(tmp_path / ".lock", "thing"):
                pass
    with file_lock(tmp_path / ".lock", "thing"):  # released after the first holder exits
        pass


def test_feature_sets_created_within_one_second_list_in_creation_order(tmp_path):
    """Staleness fallbacks and `fs gc --keep-fingerprints` take "newest" from this order; fingerprints
    named against their creation order, created back to back, must still list oldest first."""
    from featurestore.features import FeatureSet, list_feature_sets

    store = open_store(tmp_path / "s", create=True)
    names = [f"minilm-{c * 16}" for c in "zyxwvutsrq"]  # reverse alphabetical
    for name in names:
        FeatureSet(store, name).ensure_spec({"backbone": "minilm", "modality": "text", "dim": 4})
    assert [f.fingerprint for f in list_feature_sets(store)] == names
