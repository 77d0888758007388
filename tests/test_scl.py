"""The SCL encoder: its losses against direct loop computations, the stage schedule, and a fit on
two unpaired modalities."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from featurestore.errors import ConfigError
from featurestore.heads import create
from featurestore.heads.base import Features, Head, Targets
from featurestore.heads.scl import SCL, coarse_labels, orthogonality_loss, parse_cycle, triplet_loss


@pytest.mark.parametrize("normalize", [False, True])
def test_orthogonality_loss_is_eq2_by_loops(normalize):
    g = torch.Generator().manual_seed(0)
    emo, non = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    e, n = emo.numpy().astype(np.float64), non.numpy().astype(np.float64)
    if normalize:
        e, n = e / np.linalg.norm(e, axis=1, keepdims=True), n / np.linalg.norm(n, axis=1, keepdims=True)
    want = 0.0
    for a in range(5):
        for b in range(5):
            want += sum(e[i, a] * n[i, b] for i in range(7)) ** 2  # (F_emo^T F_non)_ab squared
    assert float(orthogonality_loss(emo, non, normalize=normalize)) == pytest.approx(want, rel=1e-5)


def triplet_by_loops(f, mod, lab, alpha):
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    total, count = 0.0, 0
    for i, j, k in itertools.product(range(len(f)), repeat=3):
        if mod[i] != mod[j] and mod[i] == mod[k] and lab[i] == lab[j] and lab[i] != lab[k]:
            total += max(0.0, alpha - f[i] @ f[j] + f[i] @ f[k])
            count += 1
    return total / count if count else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_loss_is_eq3_by_loops(seed):
    rng = np.random.default_rng(seed)
    n = 24
    f = rng.normal(size=(n, 6))
    mod, lab = rng.integers(0, 3, n), rng.integers(0, 4, n)
    got = triplet_loss(torch.tensor(f, dtype=torch.float64), torch.tensor(mod), torch.tensor(lab), 0.2)
    assert float(got) == pytest.approx(triplet_by_loops(f, mod, lab, 0.2), rel=1e-9, abs=1e-12)


def test_triplet_loss_is_zero_without_triplets_and_has_gradients():
    f = torch.randn(6, 4, requires_grad=True)
    one_modality = triplet_loss(f, torch.zeros(6, dtype=torch.long), torch.arange(6) % 2, 0.2)
    assert float(one_modality.detach()) == 0.0
    loss = triplet_loss(f, torch.arange(6) % 2, torch.arange(6) // 3, 0.2)
    loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()


def test_coarse_mapping_and_cycle_parsing():
    coarse, idx = coarse_labels(["anger", "Happy", "neutral", "surprise", "positive", "sad"],
                                SCL().coarse_map)
    assert coarse == ["negative", "neutral", "positive"]
    assert idx.tolist() == [0, 2, 1, -1, 2, 0]  # surprise excluded
    assert parse_cycle("1e") == (1, "epochs") and parse_cycle("100b") == (100, "batches")
    with pytest.raises(ConfigError):
        parse_cycle("2x")
    with pytest.raises(ConfigError):
        SCL(cycle="0b")


def unpaired(n_img=210, n_txt=150, seed=0):
    """Images of 7 emotions and texts of 3 polarities: different datasets, no paired items."""
    rng = np.random.default_rng(seed)
    img = ["anger", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    txt = ["negative", "neutral", "positive"]
    classes = sorted(set(img) | set(txt))
    yi, yt = np.arange(n_img) % 7, np.arange(n_txt) % 3
    xi = rng.normal(size=(7, 24))[yi] + 0.5 * rng.normal(size=(n_img, 24))
    xt = rng.normal(size=(3, 16))[yt] + 0.5 * rng.normal(size=(n_txt, 16))
    n = n_img + n_txt
    pooled = {"image": np.zeros((n, 24), np.float32), "text": np.zeros((n, 16), np.float32)}
    pooled["image"][:n_img], pooled["text"][n_img:] = xi, xt
    masks = {"image": np.arange(n) < n_img, "text": np.arange(n) >= n_img}
    y = np.array([classes.index(img[v]) for v in yi] + [classes.index(txt[v]) for v in yt])
    return Features(pooled, masks), Targets(kind="single", y=y, classes=classes), n_img


FAST = dict(joint_epochs=3, seq_epochs=6, lr=3e-3, width=32, proj_width=32, batch_size=32, device="cpu")


def test_fit_on_unpaired_modalities_then_save_and_load(tmp_path):
    X, y, n_img = unpaired()
    head = create("scl", **FAST, cycle="5b").fit(X, y)
    assert head.meta_["modalities"] == ["image", "text"]
    assert head.meta_["coarse_classes"] == ["negative", "neutral", "positive"]
    proba = head.predict_proba(X)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    # each modality's softmax covers only the labels it was trained on
    text_only = [head.meta_["classes"].index(c) for c in ("anger", "happy", "sad")]
    assert proba[n_img:, text_only].max() < 1e-6
    pred = proba.argmax(1)
    assert (pred[:n_img] == y.y[:n_img]).mean() > 0.5 and (pred[n_img:] == y.y[n_img:]).mean() > 0.6
    emo = head.encode(X)
    assert emo["image"].shape == (len(X), 32) and not emo["image"][n_img:].any()
    head.save(tmp_path / "scl")
    again = Head.load(tmp_path / "scl")
    np.testing.assert_allclose(again.predict_proba(X), proba, atol=1e-6)
    assert again.encoder_hash() == head.encoder_hash() == head.meta_["encoder_hash"]


def test_fit_is_seeded_and_stage_settings_change_the_encoder():
    X, y, _ = unpaired(70, 60)
    a = SCL(**FAST).fit(X, y)
    b = SCL(**FAST).fit(X, y)
    assert a.encoder_hash() == b.encoder_hash()
    c = SCL(**{**FAST, "joint_epochs": 0}).fit(X, y)
    assert c.encoder_hash() != a.encoder_hash() and "joint" not in c.meta_["history"]
    d = SCL(**{**FAST, "cycle": "2b"}).fit(X, y)
    assert d.meta_["history"]["sequential"]["turns"] > a.meta_["history"]["sequential"]["turns"]


def test_orthogonality_mean_reduction_divides_eq2_by_the_entries():
    g = torch.Generator().manual_seed(1)
    emo, non = torch.randn(9, 6, generator=g), torch.randn(9, 4, generator=g)
    e, n = emo.numpy().astype(np.float64), non.numpy().astype(np.float64)
    e, n = e / np.linalg.norm(e, axis=1, keepdims=True), n / np.linalg.norm(n, axis=1, keepdims=True)
    want = sum(sum(e[i, a] * n[i, b] for i in range(9)) ** 2 for a in range(6) for b in range(4)) / (6 * 4)
    assert float(orthogonality_loss(emo, non, reduction="mean")) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ConfigError, match="orth_reduction='max'"):
        SCL(orth_reduction="max")


def emotion_features_by_hand(head, x, final_relu):
    """f_emo from the saved tensors in numpy: proj, then Linear-BN-ReLU-Linear-BN[-ReLU] (eval mode)."""
    s = {k: v.detach().numpy().astype(np.float64) for k, v in head.net_.state_dict().items()}

    def bn(h, p):
        return (h - s[f"{p}.running_mean"]) / np.sqrt(s[f"{p}.running_var"] + 1e-5) * s[f"{p}.weight"] + s[f"{p}.bias"]

    h = x @ s["proj.text.weight"].T + s["proj.text.bias"]
    h = np.maximum(bn(h @ s["emo.0.weight"].T + s["emo.0.bias"], "emo.1"), 0)
    h = bn(h @ s["emo.3.weight"].T + s["emo.3.bias"], "emo.4")
    return np.maximum(h, 0) if final_relu else h


@pytest.mark.parametrize("final_relu", [False, True])
def test_emotion_features_are_taken_before_the_final_activation(final_relu, tmp_path):
    X, y, n_img = unpaired(70, 60)
    head = SCL(**FAST, final_relu=final_relu).fit(X, y)
    x = X.pooled["text"][n_img:]
    emo = head.encode_modality("text", x)
    np.testing.assert_allclose(emo, emotion_features_by_hand(head, x.astype(np.float64), final_relu), atol=1e-4)
    if final_relu:
        assert (emo == 0).mean() > 0.2  # the paper's layer: many exact zeros
    else:
        assert (emo < 0).mean() > 0.2 and np.linalg.norm(emo, axis=1).min() > 1e-3
    head.save(tmp_path / "h")
    np.testing.assert_array_equal(Head.load(tmp_path / "h").encode_modality("text", x), emo)


def test_a_validation_set_keeps_the_state_of_least_log_loss():
    X, y, n_img = unpaired(140, 90)
    Xv, yv, _ = unpaired(70, 60, seed=1)
    head = SCL(**{**FAST, "seq_epochs": 8}).fit(X, y, eval_set=(Xv, yv))
    seq = head.meta_["history"]["sequential"]
    assert len(seq["val_scores"]) == 8 and seq["best_val"] == max(seq["val_scores"])
    p = head.predict_proba(Xv)[np.arange(len(yv)), yv.y]
    assert np.log(p).mean() == pytest.approx(seq["best_val"], abs=1e-4)  # what it kept is what it scored best
    last = SCL(**{**FAST, "seq_epochs": seq["best_turn"] // 2}).fit(X, y)  # the same run, stopped there
    np.testing.assert_allclose(last.predict_proba(Xv), head.predict_proba(Xv), atol=1e-5)


def _first_joint_loss(monkeypatch, *, trip: float, orth: float, **kw) -> float:
    """The loss of the first joint step with the triplet term and each modality's orthogonality term
    replaced by constants (plus 0 x a feature, so gradients flow): the rest of that step is the same
    for every call (same seed, same first batch)."""
    import featurestore.heads.scl as scl_mod

    seen = []
    monkeypatch.setattr(scl_mod, "triplet_loss", lambda emo, *a, **k: emo.sum() * 0 + trip)
    monkeypatch.setattr(SCL, "_orth", lambda self, emo, non: emo.sum() * 0 + orth)
    real_step = SCL._step

    def step(self, opt, sched, loss):
        seen.append(float(loss.detach()))
        return real_step(self, opt, sched, loss)

    monkeypatch.setattr(SCL, "_step", step)
    X, y, _ = unpaired(70, 60)
    SCL(**{**FAST, "joint_epochs": 1, "seq_epochs": 0, **kw}).fit(X, y)
    return seen[0]


def test_joint_stage_is_eq4_task_plus_beta1_triplet_plus_beta2_orth_per_modality(monkeypatch):
    """docs/concepts.md: joint (eq. 4) = sum_m CE_m + beta1 L_contrast + beta2 sum_m L_orth_m (2 modalities
    here); gamma belongs to the sequential stage only."""
    kw = dict(beta1=0.3, beta2=0.07, gamma=0.9)
    base = _first_joint_loss(monkeypatch, trip=0.0, orth=0.0, **kw)
    with_trip = _first_joint_loss(monkeypatch, trip=1.0, orth=0.0, **kw)
    with_orth = _first_joint_loss(monkeypatch, trip=0.0, orth=1.0, **kw)
    assert with_trip - base == pytest.approx(0.3, abs=1e-5)
    assert with_orth - base == pytest.approx(2 * 0.07, abs=1e-5)


def test_scl_defaults_are_the_documented_ones():
    """docs/concepts.md: beta1 0.05, beta2 0.1, gamma 0.1, alpha 0.2, joint_epochs 10, seq_epochs 100, cycle 1e,
    orth_normalize and orth_reduction=mean by default."""
    c = SCL()
    assert (c.alpha, c.beta1, c.beta2, c.gamma) == (0.2, 0.05, 0.1, 0.1)
    assert (c.joint_epochs, c.seq_epochs, c.cycle, c.orth_normalize, c.orth_reduction) == (10, 100, "1e", True, "mean")
