"""Concepts (eq. 6) and the concept-guided head, then the whole run on a real store: two datasets
with no paired items (MiniLM texts, and image features written under a fingerprint of their own)
-> scl -> derived features -> memory -> concept head -> queries by raw text, id and batch."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from featurestore.backbones.base import fingerprint_of
from featurestore.datasets import add_dataset
from featurestore.datasets.manifest import normalise
from featurestore.errors import IntegrityError
from featurestore.features import POOLED, FeatureSet
from featurestore.memory import open_memory
from featurestore.reader import load_split
from featurestore.heads import create
from featurestore.heads.base import Features, Head, Targets
from featurestore.heads.concepts import ConceptBank

# ---- concepts ------------------------------------------------------------------------------


def small_bank():
    rng = np.random.default_rng(0)
    groups = {("image", "a"): rng.normal(size=(5, 4)), ("image", "b"): rng.normal(size=(3, 4)),
              ("text", "a"): rng.normal(size=(2, 4)), ("audio", "b"): rng.normal(size=(4, 4))}
    return ConceptBank.from_groups(["a", "b", "c"], groups, 4), groups


def test_sampled_concepts_match_eq6_computed_item_by_item():
    bank, groups = small_bank()
    y = np.array([0, 1, 1, 0, 2])
    got, valid = bank.sample(y, np.random.default_rng(7), k=8)
    u = np.random.default_rng(7).random((len(bank.modalities), len(y), 8))  # the same draws, by hand
    for b, c in enumerate(y):
        per_mod = []
        for i, m in enumerate(bank.modalities):
            pool = groups.get((m, bank.classes[c]))
            if pool is not None:
                per_mod.append(np.mean([pool[int(v * len(pool))] for v in u[i, b]], 0))
        if per_mod:
            np.testing.assert_allclose(got[b], np.mean(per_mod, 0), atol=1e-6)
    assert valid.tolist() == [True, True, True, True, False] and not got[4].any()
    again, _ = bank.sample(y, np.random.default_rng(7), k=8)
    np.testing.assert_array_equal(got, again)  # seeded


def test_no_generalisation_draws_one_pool_member_and_means_cover_every_member():
    bank, groups = small_bank()
    one, valid = bank.sample(np.array([0] * 50 + [1] * 50), np.random.default_rng(1), mode="no_generalisation")
    members_a = np.concatenate([groups[("image", "a")], groups[("text", "a")]])
    assert all(np.isclose(members_a, row, atol=1e-6).all(1).any() for row in one[:50])
    assert valid.all()
    means, ok = bank.means()
    want_b = (groups[("image", "b")].mean(0) + groups[("audio", "b")].mean(0)) / 2
    np.testing.assert_allclose(means[1], want_b, atol=1e-6)
    assert ok.tolist() == [True, True, False]


def test_no_generalisation_picks_one_available_modality_at_random_then_one_of_its_rows():
    """docs/concepts.md: one random feature of one random available modality. Class `a` has 5 image rows
    and 2 text rows: each modality is picked about half the time (not by row count, 5:2, and not always
    the first), and every row of the picked modality comes up."""
    bank, groups = small_bank()
    one, valid = bank.sample(np.zeros(4000, np.int64), np.random.default_rng(2), mode="no_generalisation")
    image = np.isclose(one[:, None], groups[("image", "a")][None], atol=1e-6).all(2)  # [N, 5]
    text = np.isclose(one[:, None], groups[("text", "a")][None], atol=1e-6).all(2)  # [N, 2]
    assert valid.all() and (image.any(1) ^ text.any(1)).all()
    assert 0.45 < image.any(1).mean() < 0.55  # binomial sd 0.008
    assert image.any(0).all() and text.any(0).all()


def test_a_class_with_an_empty_pool_falls_back_to_all_its_rows_with_a_warning():
    """docs/concepts.md: a class whose pool is empty in every modality uses all its rows (as
    no_selectivity), with a warning; a class with a pool keeps to it."""
    from featurestore.memory import Memory

    rng = np.random.default_rng(5)
    sad, happy = rng.normal(size=(4, 3)), rng.normal(size=(6, 3))
    x = np.concatenate([sad, happy])
    mem = Memory(3, spec={"name": "t", "coarse_map": {}})
    mem.add(np.arange(10), x, {"modality": ["text"] * 10, "class": ["sad"] * 4 + ["happy"] * 6,
                               "pool": [False] * 4 + [True, False] * 3, "correct": [True] * 10,
                               "confidence": [1.0] * 10})
    with pytest.warns(UserWarning, match="'sad' has an empty replay pool"):
        bank = ConceptBank.from_memory(mem, ["sad", "happy"])
    assert bank.fallbacks == {"sad": "all rows"} and bank.counts.tolist() == [[4, 3]]
    means, valid = bank.means()
    np.testing.assert_allclose(means, [sad.mean(0), happy[::2].mean(0)], rtol=1e-5, atol=1e-6)
    assert valid.all()


def memory_of(groups: dict, *, pool_every: int = 2):
    """A real Memory holding `(modality, class) -> raw vectors`; every `pool_every`-th row of a group in its pool."""
    from featurestore.memory import Memory

    vecs, meta = [], {"modality": [], "class": [], "pool": [], "correct": [], "confidence": []}
    for (m, c), arr in groups.items():
        vecs.append(arr)
        meta["modality"] += [m] * len(arr)
        meta["class"] += [c] * len(arr)
        meta["pool"] += [i % pool_every == 0 for i in range(len(arr))]
        meta["correct"] += [True] * len(arr)
        meta["confidence"] += [1.0] * len(arr)
    x = np.concatenate(vecs)
    mem = Memory(x.shape[1], spec={"name": "t", "coarse_map": {"happy": "positive", "sad": "negative"}})
    mem.add(np.arange(len(x)), x, meta)
    return mem


def test_concepts_are_means_of_the_raw_features_of_the_pool_eq6(tmp_path):
    from featurestore.memory import Memory

    rng = np.random.default_rng(3)
    groups = {("text", "happy"): rng.normal(size=(6, 5)) * rng.uniform(0.5, 9, (6, 1)),
              ("image", "happy"): rng.normal(size=(4, 5)) * 3, ("text", "sad"): rng.normal(size=(5, 5))}
    mem = Memory.load(memory_of(groups).save(tmp_path / "m"))  # through the files
    np.testing.assert_allclose(mem.vectors(np.arange(6), raw=True), groups[("text", "happy")], rtol=1e-5, atol=1e-5)
    means, valid = ConceptBank.from_memory(mem, ["happy", "sad"]).means()
    want_happy = (groups[("text", "happy")][::2].mean(0) + groups[("image", "happy")][::2].mean(0)) / 2
    np.testing.assert_allclose(means[0], want_happy, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(means[1], groups[("text", "sad")][::2].mean(0), rtol=1e-5, atol=1e-5)
    unit = ConceptBank.from_memory(mem, ["sad"]).flat
    assert not np.allclose(np.linalg.norm(unit, axis=1), 1.0)  # not the normalised search vectors
    with pytest.warns(UserWarning, match="'fear' has no rows"):
        sims = ConceptBank.from_memory(mem, ["happy", "sad", "fear"]).similarity(groups[("text", "sad")])
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    assert sims[0, 0] == pytest.approx(cos(groups[("text", "sad")][0], want_happy), abs=1e-5)
    assert np.isnan(sims[:, 2]).all()  # fear: no concept


def test_class_names_match_through_synonyms_then_coarse_labels_and_no_match_is_an_error():
    from featurestore.errors import ConfigError

    rng = np.random.default_rng(4)
    mem = memory_of({("text", "happy"): rng.normal(size=(4, 3)), ("text", "sad"): rng.normal(size=(6, 3)),
                     ("image", "Anger"): rng.normal(size=(2, 3))}, pool_every=1)
    with pytest.warns(UserWarning, match="'trust' has no rows"):
        bank = ConceptBank.from_memory(mem, ["Joy", "sadness", "angry", "positive", "trust"])
    assert bank.counts.sum(0).tolist() == [4, 6, 2, 4, 0]  # positive: happy rows through coarse_map
    assert bank.fallbacks == {"trust": "none"}
    with pytest.raises(ConfigError, match=r"none of the classes \['trust', 'awe'\].*'happy'"):
        ConceptBank.from_memory(mem, ["trust", "awe"])


def test_concept_head_fails_when_no_class_gets_a_concept(tmp_path):
    from featurestore.errors import ConfigError

    folder = memory_of({("text", "happy"): np.ones((3, 4))}).save(tmp_path / "m")
    x = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
    X = Features({"text": x}, {"text": np.ones(20, bool)})
    y = Targets(kind="single", y=np.arange(20) % 2, classes=["trust", "awe"])
    with pytest.raises(ConfigError, match="none of the classes"):
        create("concept", memory=str(folder), epochs=1, device="cpu").fit(X, y)


def test_concept_loss_is_eq7_and_eq8_by_loops():
    import torch

    from featurestore.heads.concept import concept_loss

    rng = np.random.default_rng(6)
    C, B, K, W = 3, 7, 4, 5
    logits, f = rng.normal(size=(C, B, K)), rng.normal(size=(C, B, W))
    y, concept = rng.integers(0, K, B), rng.normal(size=(B, W))
    valid, lam = np.array([True, False, True, True, False, True, True]), np.array([0.5, 0.0, 2.0])
    got = concept_loss(*(torch.tensor(a) for a in (logits, f, y, concept, valid, lam)))
    for c in range(C):
        ce = np.mean([np.log(np.exp(logits[c, i]).sum()) - logits[c, i, y[i]] for i in range(B)])
        items = [i for i in range(B) if valid[i]]
        l_s = sum(sum((concept[i, d] - f[c, i, d]) ** 2 for d in range(W)) for i in items) / len(items)
        assert float(got[c]) == pytest.approx(ce + lam[c] * l_s, rel=1e-6)


def test_an_absent_modality_contributes_zeros_to_the_concept_guided_feature(tmp_path):
    """concept.py / docs: with several modalities the per-modality features are concatenated and fused,
    an absent modality contributing zeros. So an item without audio scores the same whatever the audio
    encoder's weights are, and an item with audio does not."""
    import torch

    rng = np.random.default_rng(8)
    folder = str(memory_of({("text", c): rng.normal(size=(6, 8)) for c in ("happy", "sad", "anger")},
                           pool_every=1).save(tmp_path / "m"))
    n = 90
    yy = np.arange(n) % 3
    X = Features({"text": (rng.normal(size=(n, 10)) + yy[:, None]).astype(np.float32),
                  "audio": rng.normal(size=(n, 4)).astype(np.float32)},
                 {"text": np.ones(n, bool), "audio": np.arange(n) % 2 == 0})
    y = Targets(kind="single", y=yy, classes=["happy", "sad", "anger"])
    head = create("concept", memory=folder, epochs=2, hidden=16, device="cpu").fit(X, y)
    before_f, before_p = head.concept_features(X), head.predict_proba(X)
    with torch.no_grad():
        for p in head.net_.enc["audio"].parameters():
            p.add_(1.0)
    after_f, after_p = head.concept_features(X), head.predict_proba(X)
    absent = ~X.masks["audio"]
    np.testing.assert_allclose(after_f[absent], before_f[absent], atol=1e-6)
    np.testing.assert_allclose(after_p[absent], before_p[absent], atol=1e-6)
    assert not np.allclose(after_f[~absent], before_f[~absent], atol=1e-3)


def test_each_ablation_switch_changes_the_training_loss(tmp_path):
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(3, 8))
    groups = {("text", c): centres[i] + 0.8 * rng.normal(size=(12, 8)) for i, c in enumerate(["happy", "sad", "fear"])}
    folder = str(memory_of(groups, pool_every=3).save(tmp_path / "m"))
    yy = np.arange(90) % 3
    X = Features({"text": (centres[yy] @ rng.normal(size=(8, 10)) + rng.normal(size=(90, 10))).astype(np.float32)},
                 {"text": np.ones(90, bool)})
    y = Targets(kind="single", y=yy, classes=["happy", "sad", "fear"])

    def first_loss(**p):
        head = create("concept", memory=folder, epochs=2, patience=0, hidden=16, device="cpu", **p).fit(X, y)
        return head.history_["train_loss"][0]

    base = first_loss()
    assert first_loss() == base  # seeded: a difference below is the switch's
    for switch in ({"mode": "no_selectivity"}, {"mode": "no_generalisation"}, {"lam": 0.0}, {"k": 1}):
        assert abs(first_loss(**switch) - base) > 1e-3 * base, switch


# ---- the whole run -------------------------------------------------------------------------
IMG = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]


def build_store(store, demo_df, minilm, root: Path):
    from featurestore.jobs.extract import ExtractConfig, run as extract

    words = pl.concat([demo_df.filter(pl.col("label") == c).head(60) for c in ("positive", "negative", "neutral")])
    words = words.with_columns(split=pl.Series(["val" if i % 5 == 0 else "test" if i % 5 == 1 else "train"
                                                for i in range(len(words))]))
    add_dataset(store, "words", words, root=None, source="test")
    extract(ExtractConfig(dataset="words", modality="text", backbone="minilm", batch_size=64), store, backbone=minilm)
    rows = []
    for i in range(168):
        c = IMG[i % 7]
        path = root / "faces" / c / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"face {i}".encode())
        rows.append({"item_id": f"{c}/{i}.png", "image": f"{c}/{i}.png", "label": c,
                     "split": "val" if i % 5 == 0 else "train"})
    faces = add_dataset(store, "faces", normalise(pl.from_dicts(rows), source="test"), root=root / "faces",
                        source="test")
    spec = {"backbone": "toy-image", "modality": "image", "dim": 24, "config": {"dtype": "float16"}}
    fs = FeatureSet(store, fingerprint_of("toy-image", spec))
    fs.folder.mkdir(parents=True)
    fs.ensure_spec(spec)
    rng = np.random.default_rng(0)
    y = np.array([IMG.index(c) for c in faces.manifest["label"]])
    writer = fs.segments.writer(dtypes={POOLED: "float16"})
    writer.add(faces.manifest["image_key"].to_list(), {POOLED: rng.normal(size=(7, 24))[y] + 0.5 * rng.normal(size=(len(y), 24))})
    writer.flush()
    return fs.fingerprint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_df, minilm):
    from featurestore.store import open_store
    from featurestore.jobs.build_memory import BuildMemoryConfig, run as build_memory
    from featurestore.jobs.train_scl import TrainSCLConfig, run as train_scl

    root = tmp_path_factory.mktemp("concepts")
    store = open_store(root / "store", create=True)
    image_fp = build_store(store, demo_df, minilm, root)
    params = {"joint_epochs": "3", "seq_epochs": "15", "lr": "3e-3", "width": "64", "proj_width": "64",
              "batch_size": "32", "device": "cpu"}
    result = train_scl(TrainSCLConfig(data=("words:text=minilm", f"faces:image={image_fp}"), run="scl1",
                                      params=params), store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny data: a class may have an empty pool
        memory = build_memory(BuildMemoryConfig(name="m1", run="scl1", top_p=0.5), store)
    return store, result, memory, image_fp


def test_scl_run_writes_derived_features_that_verify_and_read(trained):
    from featurestore.verify import verify_store

    store, result, _, image_fp = trained
    assert set(result.derived) == {"text", "image"} and result.written == {"text": 180, "image": 168}
    assert verify_store(store) == []
    for m, fp in result.derived.items():
        spec = {k: v for k, v in FeatureSet(store, fp).spec.items() if k not in ("fingerprint", "created_at")}
        assert spec["backbone"] == "scl" and spec["encoder_hash"] == result.encoder_hash and spec["dim"] == 64
        assert fingerprint_of("scl", spec) == fp
    faces = load_split(store, "faces", "val", {"image": result.derived["image"]})
    assert faces.masks["image"].all() and faces.features["image"].shape[1] == 64
    assert result.metrics["val"]["faces"]["image"] > 0.4
    # a derived feature set that goes missing: verify says to re-run the SCL training, not to extract it
    folder = store.features_dir() / result.derived["text"]
    folder.rename(folder.with_name("moved-away"))
    try:
        (problem,) = [p["message"] for p in verify_store(store) if p["path"] == str(folder)]
        assert "fs scl train" in problem and "fs extract" not in problem
    finally:
        folder.with_name("moved-away").rename(folder)
    assert verify_store(store) == []


def test_an_scl_run_killed_while_writing_its_features_is_not_left_published(tmp_path, demo_df, minilm,
                                                                              monkeypatch):
    """The run folder was published before its derived features were written: killed in between (here,
    after the text features and before the image ones), the run stood with features missing, `fs verify`
    said nothing, the same command refused it (the run exists) and `fs memory build` built from what
    was there. Now the features come first: the killed run is absent and the same command completes it."""
    from featurestore.jobs import train_scl as scl
    from featurestore.store import open_store

    store = open_store(tmp_path / "store", create=True)
    image_fp = build_store(store, demo_df, minilm, tmp_path)
    config = scl.TrainSCLConfig(data=("words:text=minilm", f"faces:image={image_fp}"), run="s1",
                                params={"joint_epochs": "1", "seq_epochs": "2", "width": "16", "proj_width": "16",
                                        "batch_size": "32", "device": "cpu"})
    real = scl.write_derived

    def killed_at_the_image_features(store_, head, modality, *a, **k):
        if modality == "image":
            raise KeyboardInterrupt  # as if SIGKILL: nothing after this point runs
        return real(store_, head, modality, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(scl, "write_derived", killed_at_the_image_features)
        with pytest.raises(KeyboardInterrupt):
            scl.run(config, store)
    assert not (store.heads_dir() / "s1").exists()
    result = scl.run(config, store)  # the same command: trains again and writes what is missing
    assert result.written == {"text": 0, "image": 168}  # the text rows were already there (same encoder)
    faces = load_split(store, "faces", "train", {"image": result.derived["image"]})
    assert faces.masks["image"].all()


def test_memory_holds_both_datasets_with_pools(trained):
    store, result, memory, _ = trained
    mem = open_memory(store, "m1")
    assert len(mem) == memory.n == 108 + 134  # train rows of words + faces
    assert set(mem.meta["dataset"].unique()) == {"words", "faces"}
    assert mem.spec["fingerprints"] == result.derived and mem.kind == "flat"
    groups = mem.meta.group_by(["modality", "class"]).agg(
        n=pl.len(), pool=pl.col("pool").sum(), correct=pl.col("correct").sum(),
        pooled_correct=(pl.col("pool") & pl.col("correct")).sum())
    for g in groups.iter_rows(named=True):  # the floor (8), and incorrect rows only to reach it
        assert g["pool"] >= min(8, g["n"]), g
        assert g["pool"] == g["pooled_correct"] or g["pooled_correct"] == g["correct"], g


def test_concept_head_trains_through_the_head_api_in_every_mode(trained, tmp_path):
    store, _, _, _ = trained
    data = load_split(store, "words", "train", {"text": "minilm"})
    classes = sorted(set(data.label))
    X = Features(data.features, data.masks)
    y = Targets(kind="single", y=np.array([classes.index(c) for c in data.label]), classes=classes)
    folder = str(store.memory_dir() / "m1")
    for mode in ("replay", "no_selectivity", "no_generalisation"):
        head = create("concept", memory=folder, mode=mode, epochs=20, device="cpu").fit(X, y)
        assert head.meta_["concept_dim"] == 64 and head.meta_["scl_run"] == "scl1"
        assert (head.predict(X) == y.y).mean() > 0.6
    head.save(tmp_path / "h")
    again = Head.load(tmp_path / "h")
    np.testing.assert_allclose(again.predict_proba(X), head.predict_proba(X), atol=1e-6)
    assert again.concept_features(X).shape == (len(X), 64)
    # multimodal: both modalities concatenated (each row has one of them)
    faces = load_split(store, "faces", "train", {"image": trained[3]})
    both = Features({"text": np.concatenate([data.features["text"], np.zeros((len(faces), 384), np.float32)]),
                     "image": np.concatenate([np.zeros((len(data), 24), np.float32), faces.features["image"]])},
                    {"text": np.arange(len(data) + len(faces)) < len(data),
                     "image": np.arange(len(data) + len(faces)) >= len(data)})
    labels = sorted(set(classes) | set(IMG))
    yy = Targets(kind="single", y=np.array([labels.index(c) for c in list(data.label) + list(faces.label)]),
                 classes=labels)
    multi = create("concept", memory=folder, epochs=4, device="cpu").fit(both, yy)
    assert multi.predict_proba(both).shape == (len(yy), len(labels))


def test_query_by_raw_text_id_and_batch(trained, tmp_path):
    from featurestore.jobs.query import Querier

    store, result, _, image_fp = trained
    q = Querier(store, "m1", k=4, device="cpu")
    ans = q.text("what a wonderful, happy day")
    assert {e["emotion"] for e in ans["emotions"]} <= set(q.classes) and len(ans["emotions"]) >= 3
    sims = [e["similarity"] for e in ans["emotions"]]
    assert sims == sorted(sims, reverse=True)
    assert len(ans["neighbours"]) == 4 and {"id", "item_id", "dataset", "label"} <= set(ans["neighbours"][0])
    # a train word finds itself first, from its cached features
    word = open_memory(store, "m1").meta.filter(pl.col("dataset") == "words")["item_id"][0]
    hit = q.item(f"words:{word}")
    # similarity: cosine between the word's SCL feature and eq. 6 over every pool member of the raw SCL
    # features, recomputed from the store's derived feature sets and the memory's pool column
    mem = open_memory(store, "m1")
    raw = {}
    for ds, m, fp in (("words", "text", result.derived["text"]), ("faces", "image", result.derived["image"])):
        data = load_split(store, ds, "train", {m: fp})
        raw.update({(m, i): v for i, v in zip(data.item_ids, data.features[m].astype(np.float64))})
    coarse = {k.lower(): v for k, v in mem.spec["coarse_map"].items()}
    pool = [(r["modality"], r["class"], r["item_id"]) for r in mem.meta.filter(pl.col("pool")).iter_rows(named=True)]
    for e in hit["emotions"]:
        per_mod = []
        for m in ("text", "image"):  # a modality without the label lends the rows whose coarse label it is
            rows = [raw[(m, i)] for mm, c, i in pool if mm == m and c == e["emotion"]] or \
                   [raw[(m, i)] for mm, c, i in pool if mm == m and coarse.get(c.lower()) == e["emotion"]]
            if rows:
                per_mod.append(np.mean(rows, 0))
        concept, f = np.mean(per_mod, 0), raw[("text", word)]
        assert e["similarity"] == pytest.approx(concept @ f / np.linalg.norm(concept) / np.linalg.norm(f), abs=2e-3)
        assert 0 <= e["probability"] <= 1
    assert any(abs(e["similarity"]) > 0.05 for e in hit["emotions"])
    assert hit["neighbours"][0]["item_id"] == word and hit["neighbours"][0]["similarity"] > 0.999
    with pytest.raises(IntegrityError, match=image_fp):
        q.features("image", np.zeros((1, 24)), fingerprint="toy-image-0000000000000000")
    lines = ['{"text": "dreadful"}', "not json", "", '{"id": "words:no-such-item"}', '{"image": "/nope.png"}',
             f'{{"id": "faces:{open_memory(store, "m1").meta.filter(pl.col("dataset") == "faces")["item_id"][0]}"}}']
    out = q.batch(lines)
    assert [r["line"] for r in out] == [1, 2, 4, 5, 6]
    assert "emotions" in out[0] and "emotions" in out[4]
    assert "not JSON" in out[1]["error"] and "no-such-item" in out[2]["error"] and "/nope.png" in out[3]["error"]


def test_query_probabilities_are_the_scl_classifiers_softmax_by_class_name(trained):
    from featurestore.datasets import get_dataset
    from featurestore.jobs.query import Querier

    store, result, _, _ = trained
    q = Querier(store, "m1", k=2, device="cpu")
    state = q.head._state()  # the classifier's weights, applied below by hand
    W, b = state["fine.weight"].astype(np.float64), state["fine.bias"].astype(np.float64)
    names = list(q.head.meta_["classes"])  # the classifier's output order
    words = get_dataset(store, "words").manifest
    text_classes = set(words.filter(pl.col("split") == "train")["label"])  # a text query: only the text labels compete
    assert text_classes == {"positive", "negative", "neutral"} and len(names) == len(W) > len(text_classes)
    scl = load_split(store, "words", "test", {"text": result.derived["text"]})
    src = load_split(store, "words", "test", {"text": "minilm"})
    assert list(scl.item_ids) == list(src.item_ids)
    for n in range(len(scl)):  # every test word (this small run's text classifier mostly says "positive")
        emo = scl.features["text"][n].astype(np.float64)
        logits = {c: emo @ W[i] + b[i] for i, c in enumerate(names) if c in text_classes}
        top = max(logits.values())
        z = sum(np.exp(v - top) for v in logits.values())
        want = {c: (np.exp(logits[c] - top) / z if c in logits else 0.0) for c in names}
        ans = q.features("text", scl.features["text"][n], fingerprint=result.derived["text"])
        got = {e["emotion"]: e["probability"] for e in ans["emotions"]}
        assert set(text_classes) <= set(got)
        for c, p in got.items():
            assert p == pytest.approx(want[c], abs=2e-4), (n, c)
        # from the backbone features: the most probable class is the one the head predicts
        one = q.features("text", src.features["text"][n], fingerprint=src.fingerprints["text"])
        best = max(one["emotions"], key=lambda e: e["probability"])["emotion"]
        X = Features({"text": src.features["text"][n:n + 1]}, {"text": np.ones(1, bool)})
        assert best == names[int(q.head.predict(X)[0])], n


def test_a_batch_line_with_two_inputs_is_refused_with_one_message():
    from featurestore.errors import ConfigError
    from featurestore.jobs.query import _parse_line

    msg = r"each line needs exactly one of \['text', 'image', 'audio', 'id'\] with a string value"
    for line in ('{"text": "a happy day", "id": "words:w1"}', '{"image": "a.png", "audio": "a.wav"}',
                 '{"text": "x", "image": "a.png", "audio": "a.wav", "id": "d:i"}', '{}', '{"label": "x"}',
                 '{"text": 3}', '["text", "x"]'):
        with pytest.raises(ConfigError, match=msg) as err:
            _parse_line(line)
        assert str(err.value).count("each line needs") == 1 and line[:40] in str(err.value), line
    assert _parse_line('{"text": "a happy day", "note": "extra keys are not inputs"}') == ("text", "a happy day")
    assert _parse_line('{"id": "words:w1"}') == ("id", "words:w1")


def test_cli_memory_list_info_and_query_json(trained, tmp_path):
    from featurestore.cli import cli

    store = trained[0]
    runner = CliRunner()
    listed = runner.invoke(cli, ["--store", str(store.root), "memory", "list", "--json"])
    assert listed.exit_code == 0 and json.loads(listed.output)[0]["name"] == "m1"
    info = runner.invoke(cli, ["--store", str(store.root), "memory", "info", "m1"])
    assert info.exit_code == 0 and "scl1" in info.output
    batch = tmp_path / "q.jsonl"
    batch.write_text('{"text": "joy"}\n{"oops": 1}\n')
    res = runner.invoke(cli, ["--store", str(store.root), "query", "--batch", str(batch), "--memory", "m1",
                              "--k", "2", "--json", "--device", "cpu"])
    assert res.exit_code == 10, res.output  # one bad line
    payload = json.loads(res.output[res.output.index("{"):])
    assert len(payload["results"][0]["neighbours"]) == 2 and "error" in payload["results"][1]
    missing = runner.invoke(cli, ["--store", str(store.root), "query", "--text", "x", "--memory", "nope"])
    assert missing.exit_code == 4 and "nope" in missing.output


def test_cli_train_head_concept_with_a_memory_by_name(trained):
    from featurestore.cli import cli

    store, result, _, _ = trained
    runner = CliRunner()
    args = ["--store", str(store.root), "train-head", "--method", "concept", "--dataset", "words",
            "--features", f"text={result.derived['text']}", "--memory", "m1", "-p", "epochs=3", "-p", "device=cpu", "--target", "label",
            "--eval-split", "test", "--json"]
    refused = runner.invoke(cli, [*args[:-3], "--eval-split", "val"])
    assert refused.exit_code == 2 and "validation split" in refused.output  # never evaluate on what chose
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["method"] == "concept" and 0 <= out["metrics"]["accuracy"] <= 1
    cfg = json.loads((Path(out["folder"]) / "config.json").read_text())
    assert cfg["params"]["memory"] == str((store.memory_dir() / "m1").resolve())
    bad = runner.invoke(cli, args[:-1] + ["--memory", "nope"])
    assert bad.exit_code == 4 and "memory 'nope'" in bad.output


# ---- the results table's concepts section ------------------------------------------------------
def test_concept_section_on_a_small_real_store(store, demo_df, minilm, tmp_path, monkeypatch):
    import importlib.util

    from featurestore.jobs.extract import ExtractConfig, run as extract

    path = Path(__file__).parents[1] / "bench" / "_concepts.py"
    spec = importlib.util.spec_from_file_location("bench_concepts", path)
    section = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(section)
    monkeypatch.setattr(section, "SCL_PARAMS", {"joint_epochs": 1, "seq_epochs": 4, "lr": 1e-3, "width": 32,
                                                "proj_width": 32, "device": "cpu"})
    words = pl.concat([demo_df.filter(pl.col("labels").list.len() == 1).filter(pl.col("split") == s).head(n)
                       for s, n in (("train", 240), ("val", 40), ("test", 40))] + [demo_df.head(5)])
    add_dataset(store, "w", words, root=None, source="test")
    extract(ExtractConfig(dataset="w", modality="text", backbone="minilm", batch_size=64), store, backbone=minilm)
    out = section.concept_section(store, dataset="w", seeds=(0,), workdir=tmp_path)

    rows = {r["row"]: r for r in out["query_rows"]}
    assert set(rows) == {"scl concepts (fs query)", "raw-feature centroid", "scl-feature centroid"}
    assert all(0 <= r["top1"] <= r["top2"] <= 1 and r["task"] == "concept query" for r in rows.values())
    assert rows["scl concepts (fs query)"]["pool_min"] >= 1
    # the baseline by hand: class means of the raw train features, cosine, over the single-emotion words
    data = {s: load_split(store, "w", s, {"text": "minilm"}) for s in ("train", "test")}
    one = {s: [lab[0] if len(lab) == 1 else None for lab in d.labels] for s, d in data.items()}
    classes = sorted({c for c in one["train"] if c})
    x_tr = data["train"].features["text"][[c is not None for c in one["train"]]]
    y_tr = np.array([classes.index(c) for c in one["train"] if c])
    keep = [c in classes for c in one["test"]]
    x_te = data["test"].features["text"][keep]
    y_te = np.array([classes.index(c) for c in np.array(one["test"], object)[keep]])
    means = np.stack([x_tr[y_tr == c].mean(0) for c in range(len(classes))])
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    ranked = np.argsort(-(unit(x_te) @ unit(means).T), 1)
    assert rows["raw-feature centroid"]["top1"] == pytest.approx((ranked[:, 0] == y_te).mean(), abs=1e-4)
    top2 = (ranked[:, :2] == y_te[:, None]).any(1).mean()
    assert rows["raw-feature centroid"]["top2"] == pytest.approx(top2, abs=1e-4)
    heads_ = {r["row"]: r for r in out["head_rows"]}
    assert set(heads_) == {"concept", "concept (no_selectivity)", "concept (no_generalisation)", "concept (lam=0)",
                           "mlp", "linear"}
    assert all(0 <= r["accuracy"] <= 1 and "uar" in r and r["seed"] == 0 for r in heads_.values())


def test_concept_defaults_are_the_documented_ones():
    """docs/concepts.md section 4: lambda 0.5, k 8 features per modality, mode replay, epochs 40, batch 64."""
    from featurestore.heads.concept import ConceptConfig

    c = ConceptConfig()
    assert (c.lam, c.k, c.mode, c.epochs, c.batch_size) == (0.5, 8, "replay", 40, 64)
