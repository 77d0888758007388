"""`drkf`: each loss against a loop written from its printed equation, emotionality shuffling,
padding, the one-pass pair fusion, the fused path, and bad input. The contract tests in
test_heads.py run on it too."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import featurestore.heads as heads
from featurestore.errors import ConfigError
from featurestore.heads import Features, Targets
import torch.nn.functional as F

from featurestore.heads import drkf as D
from featurestore.heads.drkf import (DRKFConfig, DRKFNet, cmie_paper, drkf_loss, kl_to_labels, nt_xent, recon_loss,
                                     shuffle_pairs)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_recon_loss_is_eq_10():
    g = torch.Generator().manual_seed(0)
    M, L, d = 5, 4, 3
    x = {m: torch.randn(M, L, d, generator=g) for m in ("audio", "text")}
    aug = {m: torch.randn(M, L, d, generator=g) for m in ("audio", "text")}
    steps = {"audio": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
             "text": torch.ones(M, L, dtype=torch.bool)}
    for scale in ("item", "element"):
        total = 0.0
        for i in range(M):  # 1/(2M) sum_i [||S_i - S~_i||^2 + ||T_i - T~_i||^2], valid steps only
            for m in x:
                n = int(steps[m][i].sum())
                sq = sum(float(((x[m][i, t] - aug[m][i, t]) ** 2).sum()) for t in range(n))
                total += sq / (n * d) if scale == "element" and n else sq
        want = total / (2 * M)
        assert float(recon_loss(x, aug, steps, 2, scale)) == pytest.approx(want, rel=1e-5)


def test_kl_to_labels_is_eq_11():
    g = torch.Generator().manual_seed(1)
    log_q = torch.log_softmax(torch.randn(6, 4, generator=g), -1)
    y = torch.softmax(torch.randn(6, 4, generator=g) * 3, -1)
    y[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # one-hot: 0 log 0 = 0
    present = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    want = 0.0
    for i in range(6):
        if present[i]:
            want += sum(float(y[i, c] * math.log(y[i, c] / log_q[i, c].exp())) for c in range(4) if y[i, c] > 0)
    assert float(kl_to_labels(log_q, y, present)) == pytest.approx(want / 6, rel=1e-5)


def test_cmie_paper_is_eq_14_to_17_with_the_positive_in_the_denominator():
    """Eq. 14-15 as InfoNCE bounds: the positive pair joins the cross-modal negatives k != i in the
    denominator (as printed, without it, the loss has no lower bound in a learnt tau)."""
    rng = np.random.default_rng(2)
    n, P, tau = 5, 7, 0.6
    zS, zS_, zT, zT_ = (rng.normal(size=(n, P)) for _ in range(4))
    total = 0.0
    for i in range(n):
        pos_s, pos_t = math.exp(_cos(zS[i], zS_[i]) / tau), math.exp(_cos(zT[i], zT_[i]) / tau)
        l_s = -math.log(pos_s / (pos_s + sum(math.exp(_cos(zS[i], zT_[k]) / tau) for k in range(n) if k != i)))
        l_t = -math.log(pos_t / (pos_t + sum(math.exp(_cos(zT[i], zS_[k]) / tau) for k in range(n) if k != i)))
        l_st = -math.log(math.exp(_cos(zS[i], zT[i]) / tau) / sum(math.exp(_cos(zS[i], zT[k]) / tau) for k in range(n)))
        total += l_s + l_t + l_st
    got = cmie_paper(*(torch.tensor(a, dtype=torch.float32) for a in (zS, zS_, zT, zT_)), torch.tensor(tau))
    assert float(got) == pytest.approx(total / n, rel=1e-4)


def test_cmie_is_bounded_below_so_the_learnt_temperature_has_a_floor():
    """Each term is -log of a probability: L_c >= 0 at any tau, and for views that already agree
    (every positive the best match) shrinking tau lowers the loss towards 0, never past it."""
    rng = np.random.default_rng(5)
    z = torch.tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    other = torch.tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    for tau in (1.0, 0.3, 0.05, 0.01):
        assert float(cmie_paper(z, z + 0.01 * other, z, z + 0.01 * other, torch.tensor(tau))) >= 0
        assert float(cmie_paper(z, other, other, z, torch.tensor(tau))) >= 0
    p = torch.tensor(0.0, requires_grad=True)
    loss = cmie_paper(z, z + 0.01 * other, z, z + 0.01 * other, torch.sigmoid(p))
    loss.backward()
    assert p.grad > 0  # descent lowers tau here, and the loss is bounded below by 0 as tau -> 0
    assert float(cmie_paper(z, z, z, z, torch.tensor(0.01))) == pytest.approx(0.0, abs=1e-4)


def test_nt_xent_is_the_simclr_loss():
    rng = np.random.default_rng(3)
    n, tau = 4, 0.5
    a, b = rng.normal(size=(n, 6)), rng.normal(size=(n, 6))
    views = np.concatenate([a, b])
    total = 0.0
    for k in range(2 * n):
        pos = (k + n) % (2 * n)
        den = sum(math.exp(_cos(views[k], views[j]) / tau) for j in range(2 * n) if j != k)
        total += -math.log(math.exp(_cos(views[k], views[pos]) / tau) / den)
    got = nt_xent(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), tau)
    assert float(got) == pytest.approx(total / (2 * n), rel=1e-4)


def test_shuffling_takes_every_ordered_pair_of_distinct_items_labelled_by_shared_emotion():
    y = torch.tensor([0, 1, 0, 2, 1])
    every = torch.ones(5, dtype=torch.bool)
    i, j, same = shuffle_pairs(y, every, every)
    assert len(i) == 5 * 4  # M(M-1), not M^2
    pairs = {(int(a), int(b)): float(s) for a, b, s in zip(i, j, same)}
    assert set(pairs) == {(a, b) for a in range(5) for b in range(5) if a != b}
    for (a, b), s in pairs.items():
        assert s == float(y[a] == y[b])
    assert sum(pairs.values()) == 4  # (0,2), (2,0), (1,4), (4,1)
    no_b = torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool)  # item 4 has no text: it cannot lend its text
    i, j, _ = shuffle_pairs(y, every, no_b)
    assert len(i) == 5 * 4 - 4 and not (j == 4).any()  # 5 lenders of audio x 4 of text, minus i == j


def _batch(seed=0, M=6, L=(3, 2), d=(5, 4), classes=3):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, m in enumerate(("audio", "text")):
        lengths = torch.randint(1, L[k] + 1, (M,), generator=g)
        steps = torch.arange(L[k])[None, :] < lengths[:, None]
        steps[1] = False if m == "audio" else steps[1]  # item 1 has no audio
        out[f"x.{m}"] = torch.randn(M, L[k], d[k], generator=g) * steps.unsqueeze(-1)
        out[f"s.{m}"] = steps
    out["y"] = torch.randint(0, classes, (M,), generator=g)
    return out


def _net(**params):
    torch.manual_seed(0)
    cfg = DRKFConfig(hidden=16, heads=2, proj=8, ae_width=8, ae_blocks=2, **params)
    return DRKFNet({"audio": 5, "text": 4}, 3, cfg).eval(), cfg


def test_padding_content_does_not_change_the_output():
    net, cfg = _net()
    batch = _batch()
    garbage = {k: v.clone() for k, v in batch.items()}
    for m in ("audio", "text"):
        pad = ~batch[f"s.{m}"]
        garbage[f"x.{m}"][pad] = 1e3 * torch.randn(int(pad.sum()), garbage[f"x.{m}"].shape[-1])
    wider = {k: v.clone() for k, v in batch.items()}  # two more padded steps
    for m in ("audio", "text"):
        wider[f"x.{m}"] = torch.cat([batch[f"x.{m}"], torch.randn(6, 2, batch[f"x.{m}"].shape[-1])], 1)
        wider[f"s.{m}"] = torch.cat([batch[f"s.{m}"], torch.zeros(6, 2, dtype=torch.bool)], 1)
    with torch.no_grad():
        ref = net(batch)
        torch.testing.assert_close(net(garbage), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(wider), ref, atol=1e-5, rtol=1e-5)
        torch.manual_seed(1)
        a = drkf_loss(net, batch, cfg, 3)
        torch.manual_seed(1)
        b = drkf_loss(net, garbage, cfg, 3)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_all_pairs_in_one_pass_equal_each_pair_fused_alone():
    net, _ = _net()
    batch = _batch(1)
    with torch.no_grad():
        x, steps, aug = net.augment(batch)
        toks = net.tokens(x, aug)
        i, j, _ = shuffle_pairs(batch["y"], steps["audio"].any(1), steps["text"].any(1))
        together = net.fuse(toks, steps, {"audio": i, "text": j})
        for k in (0, 5, len(i) - 1):
            alone = net.fuse({"audio": toks["audio"][i[k]][None], "text": toks["text"][j[k]][None]},
                             {"audio": steps["audio"][i[k]][None], "text": steps["text"][j[k]][None]})
            torch.testing.assert_close(together[k], alone[0], atol=1e-5, rtol=1e-5)


def test_the_autoencoder_shapes_the_prediction_only_on_the_augmented_path():
    for fuse, touched in (("augmented", True), ("raw", False)):
        net, _ = _net(fuse=fuse)
        net.zero_grad()
        net(_batch()).sum().backward()
        grads = [p.grad for p in net.ae.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads) == touched, fuse


W = dict(alpha=0.3, beta=0.7, gamma=1.3, delta=0.45)  # distinct: a swapped weight cannot cancel out


def _mean_valid(t, s):
    """Each item's mean over its valid steps, item by item (zeros for an absent item)."""
    return torch.stack([t[i, s[i]].mean(0) if s[i].any() else torch.zeros(t.shape[-1]) for i in range(len(t))])


def _eq_21_written_out(net, batch, cfg, n_classes):
    """alpha L_MSE + L_KLD + beta L_c + gamma L_f + delta L_b, each term from its equation: per-item loops
    for the pooling, the KL against one-hot labels (-log q_y), every shuffled pair fused alone with a
    scalar BCE, the cross-entropy from the network's own forward; eq. 10 and 14-17 from the functions
    checked against loops above; `cmie=code` from the authors' formula (NT-Xent per modality + eq. 16)."""
    x, steps, aug = net.augment(batch)
    y = batch["y"].tolist()
    M, (a, b) = len(y), net.mods
    present = {m: [bool(steps[m][i].any()) for i in range(M)] for m in net.mods}
    rec = float(recon_loss(x, aug, steps, 2, cfg.mse_scale))
    kl = 0.0
    for m in net.mods:
        logq = torch.log_softmax(net.aux[m](_mean_valid(aug[m], steps[m])), -1)
        kl += sum(-float(logq[i, y[i]]) for i in range(M) if present[m][i]) / M
    both = [i for i in range(M) if present[a][i] and present[b][i]]
    z = {m: net.g[m](_mean_valid(x[m], steps[m])[both]) for m in net.mods}
    za = {m: net.g[m](_mean_valid(aug[m], steps[m])[both]) for m in net.mods}
    tau = torch.sigmoid(net.p)
    if cfg.cmie == "paper":
        lc = float(cmie_paper(z[a], za[a], z[b], za[b], tau))
    else:
        modal = F.cross_entropy(F.normalize(z[a], dim=1) @ F.normalize(z[b], dim=1).T / tau, torch.arange(len(both)))
        lc = float(nt_xent(z[a], za[a], tau) + nt_xent(z[b], za[b], tau) + modal)
    toks = net.tokens(x, aug)
    bce, n = 0.0, 0
    for i in range(M):
        for j in range(M):
            if i != j and present[a][i] and present[b][j]:
                h = net.fuse({a: toks[a][i:i + 1], b: toks[b][j:j + 1]}, {a: steps[a][i:i + 1], b: steps[b][j:j + 1]})
                p, t = float(torch.sigmoid(net.ed(h)[0, 0])), float(y[i] == y[j])
                bce += -(t * math.log(p) + (1 - t) * math.log(1 - p))
                n += 1
    logits = net(batch)
    ce = sum(-float(torch.log_softmax(logits[i], -1)[y[i]]) for i in range(M)) / M
    return cfg.alpha * rec + kl + cfg.beta * lc + cfg.gamma * ce + cfg.delta * bce / n


@pytest.mark.parametrize("extra", [{}, {"mse_scale": "item"}, {"cmie": "code"}])
def test_total_loss_is_eq_21_written_out(extra):
    net, cfg = _net(ed_pairs=0, **W, **extra)
    batch = _batch(2)
    with torch.no_grad():
        assert float(drkf_loss(net, batch, cfg, 3)) == pytest.approx(_eq_21_written_out(net, batch, cfg, 3), rel=1e-5)


def test_padding_length_leaves_the_loss_unchanged():
    net, cfg = _net()
    b = _batch()
    wider = dict(b)
    for m in ("audio", "text"):
        wider[f"x.{m}"] = torch.cat([b[f"x.{m}"], torch.randn(6, 2, b[f"x.{m}"].shape[-1])], 1)
        wider[f"s.{m}"] = torch.cat([b[f"s.{m}"], torch.zeros(6, 2, dtype=torch.bool)], 1)
    for scale in ("element", "item"):
        net, cfg = _net(mse_scale=scale)
        with torch.no_grad():
            torch.manual_seed(1)
            want = float(drkf_loss(net, b, cfg, 3))
            torch.manual_seed(1)
            assert float(drkf_loss(net, wider, cfg, 3)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("k", [0, 7])
def test_ed_sees_ed_pairs_shuffled_pairs(k):
    net, cfg = _net(ed_pairs=k)
    batch = _batch(2)
    seen = []
    net.ed.register_forward_hook(lambda mod, inp, out: seen.append(len(out)))
    steps = {m: batch[f"s.{m}"].any(1) for m in ("audio", "text")}
    every = len(shuffle_pairs(batch["y"], steps["audio"], steps["text"])[0])
    with torch.no_grad():
        drkf_loss(net, batch, cfg, 3)
    assert seen == [k or every]


def test_similarities_stay_float32_under_bfloat16_autocast():
    """CUDA runs the loss under bfloat16 autocast; the cosines (and so L_c at a small tau) must not round
    to bfloat16. CPU autocast stands in."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = D._cos(a, b)
        lc = cmie_paper(a, a + 0.1 * b, b, b + 0.1 * a, torch.tensor(0.05))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, D._cos(a, b), rtol=0, atol=0)
    assert float(lc) == pytest.approx(float(cmie_paper(a, a + 0.1 * b, b, b + 0.1 * a, torch.tensor(0.05))), rel=1e-6)


def _sequence_data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    seqs = []
    for i in range(n):
        s = rng.normal(size=(int(rng.integers(1, 5)), 4)).astype(np.float32)
        s[:, 0] += 2 * y[i]
        seqs.append(s)
    pooled = {"text": np.stack([s.mean(0) for s in seqs]), "audio": rng.normal(size=(n, 3)).astype(np.float32)}
    X = Features(pooled, {"text": np.ones(n, bool), "audio": rng.random(n) > 0.3}, sequences={"text": seqs})
    return X, Targets("binary", y.astype(np.int64), ["negative", "positive"])


def test_trains_on_ragged_sequences_and_a_subset_predicts_as_in_the_whole(tmp_path):
    X, y = _sequence_data()
    Xv, yv = _sequence_data(seed=1)
    head = heads.create("drkf", epochs=20, batch_size=16, lr=3e-3, hidden=16, heads=2, proj=8, ae_width=8,
                        ae_blocks=2, patience=0)
    head.fit(X, y, eval_set=(Xv, yv))
    assert head.meta_["seq_dims"] == {"text": 4}
    assert (head.predict(Xv) == yv.y).mean() > 0.8
    proba = head.predict_proba(Xv)
    short = np.array([i for i, s in enumerate(Xv.sequences["text"]) if len(s) == 1])  # padded to 1 step, not 4
    np.testing.assert_allclose(head.predict_proba(Xv.take(short)), proba[short], atol=1e-5)
    head.save(tmp_path / "run")
    np.testing.assert_array_equal(heads.Head.load(tmp_path / "run").predict_proba(Xv), proba)


@pytest.mark.parametrize("params, message", [
    ({"hidden": 30, "heads": 8}, "hidden=30"),
    ({"alpha": -1}, "alpha=-1"),
    ({"ae_width": 2}, "ae_width=2"),
    ({"fuse": "mean"}, "mean"),
    ({"alpha": float("nan")}, "alpha=nan"),
    ({"beta": float("inf")}, "beta=inf"),
    ({"lr": float("inf")}, "lr=inf"),
])
def test_bad_parameters_are_one_line_config_errors(params, message):
    with pytest.raises(ConfigError, match=message) as err:
        heads.create("drkf", **params)
    assert "\n" not in str(err.value)


def test_refuses_three_modalities_and_multi_label_targets():
    X, y = _sequence_data(n=8)
    three = Features({**X.pooled, "image": np.zeros((8, 2), np.float32)}, {})
    with pytest.raises(ConfigError, match="two modalities"):
        heads.create("drkf", epochs=1).fit(three, y)
    with pytest.raises(ConfigError, match="supports"):
        heads.create("drkf", epochs=1).fit(X, Targets("multi", np.eye(2, dtype=np.float32)[y.y], ["a", "b"]))


def test_empty_inputs_a_modality_no_training_item_has_and_nan_steps():
    """Zero items predict (0, C); an empty validation split trains as none; a modality absent from every
    training item, or a NaN step, is a one-line error rather than untrained weights or NaN predictions."""
    X, y = _sequence_data(n=24)
    params = dict(epochs=2, batch_size=8, hidden=16, heads=2, proj=8, ae_width=8, ae_blocks=1)
    head = heads.create("drkf", **params).fit(X, y, eval_set=(X.take(np.arange(0)), y.take(np.arange(0))))
    want = heads.create("drkf", **params).fit(X, y)
    np.testing.assert_array_equal(head.predict_proba(X), want.predict_proba(X))
    assert head.predict_proba(X.take(np.arange(0))).shape == (0, 2) and head.predict(X.take(np.arange(0))).shape == (0,)
    gone = Features(dict(X.pooled), {**X.masks, "audio": np.zeros(24, bool)}, sequences=X.sequences)
    with pytest.raises(ConfigError, match="modality audio has no item") as err:
        heads.create("drkf", **params).fit(gone, y)
    assert "\n" not in str(err.value)
    bad = [s.copy() for s in X.sequences["text"]]
    bad[3][0, 1] = np.nan
    with pytest.raises(ConfigError, match="text sequence of item 3 holds NaN"):
        heads.create("drkf", **params).fit(Features(dict(X.pooled), dict(X.masks), sequences={"text": bad}), y)


def test_each_modality_carries_its_own_segment_embedding():
    """The fusion encoder reads each modality's projected tokens plus that modality's own segment row
    (`segment[k]` for the k-th modality; the last row is CLS/SEP's): the two must differ."""
    net, _ = _net()
    batch = _batch()
    x = {m: batch[f"x.{m}"] for m in net.mods}
    with torch.no_grad():
        toks = net.tokens(x, x)
        for k, m in enumerate(net.mods):
            torch.testing.assert_close(toks[m] - net.inp[m](x[m]), net.segment[k].expand_as(toks[m]),
                                       atol=1e-6, rtol=1e-5)
    assert not torch.equal(net.segment[0], net.segment[1])


def test_standardisation_statistics_are_those_of_the_real_training_steps():
    """z-scoring uses the mean and (population) std of the training sequences' real steps, padding
    excluded: numpy over the ragged sequences concatenated by hand."""
    X, y = _sequence_data()
    head = heads.create("drkf", epochs=1, batch_size=16, hidden=16, heads=2, proj=8, ae_width=8, ae_blocks=2)
    head.fit(X, y)
    steps = np.concatenate(X.sequences["text"])
    np.testing.assert_allclose(head.norm_["text.mean"], steps.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.norm_["text.std"], steps.std(0) + 1e-6, rtol=1e-5, atol=1e-6)
