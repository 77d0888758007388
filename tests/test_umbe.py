"""`umbe`: the FAISS lookup against torch and a numpy loop, per-item queries, key gradients, the L1 term,
masked modalities, two-stage training, the plateau schedule, and the job / sweep / eval paths."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import featurestore.heads as heads
from featurestore.errors import ConfigError, FeatureStoreError
from featurestore.heads import Features, Head, Targets
from featurestore.heads import umbe as U
from featurestore.heads._torch import Plateau, TorchParams, train_loop

CLASSES = ["c0", "c1", "c2"]
SMALL = dict(epochs=3, patience=0, hidden=16, heads=2, batch_size=32, pool_size=8, top_k=3, prompt_length=8,
             sff_hidden=4, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def three(n: int, seed: int, sequences: bool = False) -> tuple[Features, Targets]:
    """Class c is visible in modality c; the image modality is absent for about a third of the items."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    pooled = {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in (("audio", 5), ("image", 6), ("text", 7))}
    for c, m in enumerate(("audio", "image", "text")):
        pooled[m][y == c, 0] += 3
    masks = {"image": rng.random(n) > 0.3}
    X = Features(pooled, masks)
    if sequences:
        X.sequences = {"audio": [np.repeat(pooled["audio"][i:i + 1], 1 + i % 3, 0) + rng.normal(0, 0.1, (1 + i % 3, 5))
                                 .astype(np.float32) for i in range(n)]}
    return X, Targets("single", y, CLASSES)


@pytest.fixture(scope="module")
def fitted():
    X, y = three(150, 0)
    Xv, yv = three(60, 1)
    return heads.create("umbe", **SMALL).fit(X, y, eval_set=(Xv, yv)), Xv


def bare_net(n: int, data_seed: int, torch_seed: int, **params):
    """(head with its meta set, an untrained network, one batch of n items) for unit checks of the net."""
    X, y = three(n, data_seed)
    head = heads.create("umbe", **{**SMALL, **params})
    head._set_meta(X, y, seq_dims={})
    torch.manual_seed(torch_seed)
    return head, head._network(), next(head._tensors(X, y).batches(n))


def numpy_topk(q: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Cosine top-k written out item by item (the reference for both selections)."""
    out = []
    for row in q:
        sims = [float(row @ key / np.linalg.norm(key)) for key in keys]
        out.append(sorted(range(len(keys)), key=lambda j: -sims[j])[:k])
    return np.array(out)


# ---- the prompt-key lookup ----------------------------------------------------------------
def test_faiss_selection_equals_torch_selection_and_a_numpy_loop(fitted, tmp_path):
    head, X = fitted
    batch = next(head._tensors(X).batches(len(X)))
    with torch.no_grad():
        q = head.net_.fuse(batch)
        by_torch = head.net_.select(q).numpy()
    by_faiss = head.select_faiss(q.numpy())
    reference = numpy_topk(q.numpy().astype(np.float64), head.net_.keys.detach().numpy().astype(np.float64), 3)
    np.testing.assert_array_equal(by_faiss, by_torch)
    np.testing.assert_array_equal(by_faiss, reference)
    # predictions go through that selection, also after a save/load that reads the index file
    with torch.no_grad():
        want = torch.softmax(head.net_.logits(q, torch.from_numpy(reference)), -1).numpy()
    want = U._shifted(want, head.meta_["prior"], head.meta_["shift"])  # the chosen prior shift (tested below)
    np.testing.assert_allclose(head.predict_proba(X), want, atol=1e-6)
    # and prediction reads the index, not torch: an index over the negated keys selects the least similar
    import faiss

    saved = head.index_
    keys = head.net_.normalised_keys().detach().numpy()
    head.index_ = faiss.IndexFlatIP(keys.shape[1])
    head.index_.add(np.ascontiguousarray(-keys))
    least = numpy_topk(-q.numpy().astype(np.float64), head.net_.keys.detach().numpy().astype(np.float64), 3)
    with torch.no_grad():
        other = torch.softmax(head.net_.logits(q, torch.from_numpy(least)), -1).numpy()
    np.testing.assert_allclose(head.predict_proba(X), U._shifted(other, head.meta_["prior"], head.meta_["shift"]),
                               atol=1e-6)
    assert not np.allclose(other, want, atol=1e-3)
    head.index_ = saved
    head.save(tmp_path / "run")
    assert (tmp_path / "run" / U.INDEX_FILE).is_file()
    loaded = Head.load(tmp_path / "run")
    np.testing.assert_array_equal(loaded.select_faiss(q.numpy()), reference)
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    (tmp_path / "run" / U.INDEX_FILE).unlink()
    with pytest.raises(FeatureStoreError, match=U.INDEX_FILE):
        Head.load(tmp_path / "run")


def test_a_prediction_does_not_depend_on_its_batch_neighbours(fitted):
    head, X = fitted
    alone = head.predict_proba(X.take(np.arange(5)))
    rng = np.random.default_rng(3)
    mixed_order = np.r_[rng.permutation(np.arange(5, len(X)))[:20], np.arange(5)]
    mixed = head.predict_proba(X.take(mixed_order))[-5:]
    np.testing.assert_allclose(mixed, alone, atol=1e-6)
    # in training too (torch selection, dropout off): an item's logits ignore the rest of its batch
    net = copy.deepcopy(head.net_).train()
    full = next(head._tensors(X).batches(len(X)))
    small = {k: v[:4] for k, v in full.items()}
    np.testing.assert_allclose(net(full)[0][:4].detach(), net(small)[0].detach(), atol=1e-5)


def test_keys_are_trained_by_the_matching_term_only():
    _, net, batch = bare_net(40, 2, 0)
    loss, _ = U.umbe_loss(net, batch, l1=0.01, match_weight=0.5)
    loss.backward()
    with torch.no_grad():
        q = net.fuse(batch)
    idx = numpy_topk(q.numpy().astype(np.float64), net.keys.detach().numpy().astype(np.float64), 3)
    # reference: the gradient of 0.5 * mean_b sum_{j in top-k(b)} (1 - q_b . k_j / |k_j|), written out
    keys = net.keys.detach().clone().requires_grad_(True)
    ref = sum(1 - q[b] @ keys[j] / keys[j].norm() for b in range(len(q)) for j in idx[b]) * 0.5 / len(q)
    ref.backward()
    np.testing.assert_allclose(net.keys.grad.numpy(), keys.grad.numpy(), atol=1e-6)
    assert set(np.flatnonzero(np.abs(net.keys.grad.numpy()).sum(1))) == set(idx.ravel())
    net.zero_grad()
    U.umbe_loss(net, batch, l1=0.01, match_weight=0.0)[0].backward()
    assert net.keys.grad is None or not net.keys.grad.abs().sum()
    assert net.values.grad.abs().sum() > 0  # the selected values learn through the classifier


@pytest.mark.parametrize("sff", ["mlp", "linear"])
def test_sff_gate_and_its_l1_term_are_in_the_loss(sff):
    X, y = three(30, 4)
    head = heads.create("umbe", **{**SMALL, "sff": sff})
    head._set_meta(X, y, seq_dims={})
    torch.manual_seed(1)
    net = head._network().eval()
    batch = next(head._tensors(X, y).batches(30))
    with torch.no_grad():
        without, _ = U.umbe_loss(net, batch, l1=0.0, match_weight=0.1)
        with_l1, _ = U.umbe_loss(net, batch, l1=0.25, match_weight=0.1)
    W1 = net.gate.first.weight.detach().numpy()
    assert W1.shape == ((4, 16) if sff == "mlp" else (1, 16))
    assert float(with_l1 - without) == pytest.approx(0.25 * np.abs(W1).sum(), rel=1e-5)
    # eq. 11 by hand on one value token
    v = net.values.detach().numpy()[2, 1]
    h = W1 @ v + net.gate.first.bias.detach().numpy()
    if sff == "mlp":
        h = net.gate.second.weight.detach().numpy() @ np.maximum(h, 0) + net.gate.second.bias.detach().numpy()
    with torch.no_grad():
        got = float(net.gate(net.values)[2, 1, 0])
    assert got == pytest.approx(float(1 / (1 + np.exp(-h[0]))), rel=1e-5)


def test_the_prompt_tokens_are_the_gated_selected_values_summed_then_the_inherent_ones():
    """Eq. 10-11 in the forward pass: the decoder reads P' = sum over the item's top-k prompts of
    gate(v_j) * v_j, token by token (the gate of eq. 11 written in numpy), followed by the inherent tokens."""
    _, net, batch = bare_net(20, 13, 3)
    net.eval()
    seen = []
    net.text.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().numpy()))
    with torch.no_grad():
        q = net.fuse(batch)
        net(batch)
    idx = numpy_topk(q.numpy().astype(np.float64), net.keys.detach().numpy().astype(np.float64), 3)
    v = net.values.detach().numpy().astype(np.float64)  # [P, L, H]
    W1, b1 = net.gate.first.weight.detach().numpy(), net.gate.first.bias.detach().numpy()
    W2, b2 = net.gate.second.weight.detach().numpy(), net.gate.second.bias.detach().numpy()
    gate = 1 / (1 + np.exp(-(np.maximum(v @ W1.T + b1, 0) @ W2.T + b2)))  # [P, L, 1]
    want = np.stack([sum(gate[j] * v[j] for j in row) for row in idx])  # [B, L, H]
    memory = seen[0]
    assert memory.shape == (20, 8, 16)
    np.testing.assert_allclose(memory[:, :4], want, atol=1e-5)
    np.testing.assert_allclose(memory[:, 4:], np.broadcast_to(net.inherent.detach().numpy(), (20, 4, 16)))


def test_the_matching_term_moves_the_keys_and_nothing_upstream():
    """The query is held fixed in 1 - cos(query, key): the term alone gives no gradient to the encoders,
    the modality embeddings or the fusion transformer, only to the selected keys."""
    _, net, batch = bare_net(30, 14, 4)
    q = net.fuse(batch)
    net.match_loss(q, net.select(q)).backward()
    assert net.keys.grad is not None and net.keys.grad.abs().sum() > 0
    upstream = [*net.encoders.parameters(), net.modality, *net.fusion.parameters()]
    assert all(p.grad is None or not p.grad.abs().sum() for p in upstream)


def test_selection_and_logits_stay_float32_under_bfloat16_autocast():
    """On CUDA the loss runs under bfloat16 autocast; the top-k and the scale-100 logits must not, or
    training would select other prompts than the float32 FAISS index at prediction. CPU autocast stands in."""
    _, net, _ = bare_net(20, 15, 5, hidden=64, pool_size=32, top_k=5)
    net.eval()
    q = torch.nn.functional.normalize(torch.randn(3000, 64), dim=-1)
    with torch.no_grad():
        plain_idx, plain_logits = net.select(q), net.logits(q[:50], net.select(q[:50]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto_idx = net.select(q)
            auto_logits = net.logits(q[:50], plain_idx[:50])
    np.testing.assert_array_equal(auto_idx.numpy(), plain_idx.numpy())
    assert auto_logits.dtype == torch.float32


def test_class_weight_balanced_weights_the_cross_entropy_as_scikit_learn():
    """`class_weight=balanced`: the weights of scikit-learn's compute_class_weight, and the loss is the
    weighted mean of per-item cross-entropies written out by hand (plus the same L1 and match terms)."""
    from sklearn.utils.class_weight import compute_class_weight

    X, y = three(40, 7)
    y = Targets("single", np.r_[np.zeros(25), np.ones(10), np.full(5, 2)].astype(np.int64), CLASSES)
    w = U.class_weights(y.y, 3).numpy()
    assert w == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=y.y), rel=1e-6)
    assert U.class_weights(np.array([0, 0, 2]), 3).numpy()[1] == 0  # a class absent from training
    head = heads.create("umbe", **SMALL, class_weight="balanced")
    head._set_meta(X, y, seq_dims={})
    torch.manual_seed(2)
    net = head._network().eval()
    batch = next(head._tensors(X, y).batches(40))
    with torch.no_grad():
        plain, parts = U.umbe_loss(net, batch, l1=0.0, match_weight=0.0)
        weighted, wparts = U.umbe_loss(net, batch, l1=0.0, match_weight=0.0, weight=torch.tensor(w))
        logits = net(batch)[0].double().numpy()
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    ce = -logp[np.arange(40), y.y]
    assert float(plain) == pytest.approx(ce.mean(), rel=1e-5)
    assert float(weighted) == pytest.approx((w[y.y] * ce).sum() / w[y.y].sum(), rel=1e-5)
    Xv, yv = three(30, 8)
    fitted = heads.create("umbe", **{**SMALL, "epochs": 1, "stages": 1}, class_weight="balanced").fit(
        X, y, eval_set=(Xv, yv))
    assert fitted.class_weights_.cpu().numpy() == pytest.approx(w) and fitted.predict_proba(Xv).shape == (30, 3)
    root = heads.create("umbe", **{**SMALL, "epochs": 1, "stages": 1}, class_weight="sqrt").fit(X, y)
    assert root.class_weights_.cpu().numpy() == pytest.approx(np.sqrt(w), rel=1e-6)


def test_select_loss_keeps_the_epoch_with_the_least_validation_loss():
    """`select=loss`: the kept weights give the smallest of the validation losses recorded per epoch,
    recomputed here as a hand-written weighted cross-entropy over the validation split."""
    X, y = three(120, 3)
    Xv, yv = three(50, 4)
    head = heads.create("umbe", **{**SMALL, "epochs": 6, "patience": 0, "stages": 1, "lr": 3e-2},
                        class_weight="balanced", select="loss", shift="0").fit(X, y, eval_set=(Xv, yv))
    losses = head.history_["val_loss"]
    assert len(losses) == 6 and len(set(np.round(losses, 6))) > 1  # a real choice among different losses
    logits = np.log(np.clip(head.predict_proba(Xv), 1e-30, None))  # softmax probabilities -> log-probabilities
    w = head.class_weights_.cpu().numpy()[yv.y]
    mine = float((w * -logits[np.arange(len(yv)), yv.y]).sum() / w.sum())
    assert mine == pytest.approx(min(losses), rel=1e-4)
    assert head.history_["val_score"] == pytest.approx([-v for v in losses], rel=1e-6)


@pytest.mark.parametrize("sequences", [False, True])
def test_a_masked_modality_content_does_not_change_the_output(sequences):
    X, y = three(80, 5, sequences=sequences)
    Xv, yv = three(30, 6, sequences=sequences)
    head = heads.create("umbe", **SMALL).fit(X, y, eval_set=(Xv, yv))
    assert ("audio" in head.meta_["seq_dims"]) == sequences
    batch = next(head._tensors(Xv).batches(30))
    gone = torch.tensor(np.arange(30) % 2 == 0)
    masked = dict(batch, **{"m.text": (~gone).float()})
    noisy = dict(masked, **{"x.text": torch.where(gone[:, None], torch.randn_like(batch["x.text"]) * 50,
                                                   batch["x.text"])})
    if sequences:  # a masked item's frames too
        masked["m.audio"] = noisy["m.audio"] = (~gone).float()
        noisy["x.audio"] = torch.where(gone[:, None, None], torch.randn_like(batch["x.audio"]) * 50, batch["x.audio"])
    with torch.no_grad():
        np.testing.assert_allclose(head.net_(noisy)[0].numpy(), head.net_(masked)[0].numpy(), atol=1e-5)
        assert not np.allclose(head.net_(batch)[0].numpy(), head.net_(masked)[0].numpy(), atol=1e-3)
    # through the head: a masked modality's rows may hold anything
    Xn = Features({m: a.copy() for m, a in Xv.pooled.items()}, {**Xv.masks, "text": ~gone.numpy()},
                  sequences=Xv.sequences)
    Xz = Features({m: a.copy() for m, a in Xv.pooled.items()}, {**Xv.masks, "text": ~gone.numpy()},
                  sequences=Xv.sequences)
    Xn.pooled["text"][gone.numpy()] = 99.0
    Xz.pooled["text"][gone.numpy()] = 0.0
    np.testing.assert_allclose(head.predict_proba(Xn), head.predict_proba(Xz), atol=1e-6)


# ---- two-stage training -----------------------------------------------------------------
def test_stage_one_rows_and_stage_two_drops():
    batch = {"m.a": torch.tensor([1.0, 1.0, 0.0, 1.0]), "m.b": torch.tensor([1.0, 0.0, 1.0, 0.0]),
             "x.a": torch.arange(4.0)[:, None], "y": torch.arange(4)}
    rows = U.unimodal_batch(batch, ["a", "b"])
    # (item, modality) pairs: a of items 0, 1, 3; b of items 0, 2
    assert rows["y"].tolist() == [0, 1, 3, 0, 2]
    assert rows["m.a"].tolist() == [1, 1, 1, 0, 0] and rows["m.b"].tolist() == [0, 0, 0, 1, 1]
    torch.manual_seed(0)
    n = 20000
    big = {"m.a": torch.ones(n), "m.b": (torch.arange(n) % 2).float(), "m.c": torch.zeros(n)}
    out = U.drop_modalities(big, ["a", "b", "c"], 0.3)
    have = torch.stack([out["m.a"], out["m.b"], out["m.c"]], 1)
    assert (have.sum(1) >= 1).all() and not out["m.c"].any()  # one always stays; absent ones never appear
    assert not (have[:, 1] > big["m.b"]).any()
    both = big["m.b"] > 0  # both present: both dropped (p^2) is undone, so a is kept with 0.7 + 0.3*0.3*0.5
    assert float(out["m.a"][both].mean()) == pytest.approx(0.7 + 0.045, abs=0.015)
    assert float(out["m.a"][~both].mean()) == 1.0  # the only present modality is never dropped


def test_stage_two_starts_from_the_prompts_stage_one_activated(monkeypatch):
    X, y = three(120, 7)
    Xv, yv = three(40, 8)
    seen = []

    def spy(net, *args, **kwargs):
        seen.append(("start", copy.deepcopy(net.state_dict())))
        hist = train_loop(net, *args, **kwargs)
        seen.append(("end", copy.deepcopy(net.state_dict())))
        return hist

    monkeypatch.setattr(U, "train_loop", spy)
    head = heads.create("umbe", **{**SMALL, "pool_size": 16, "top_k": 2}).fit(X, y, eval_set=(Xv, yv))
    assert [s for s, _ in seen] == ["start", "end", "start", "end"]
    stage1, stage2 = seen[1][1], seen[2][1]
    # the counts, recomputed: each training item with each of its modalities alone, cosine top-k
    net = head._network()
    net.load_state_dict(stage1)
    net.eval()
    counts = np.zeros(16, int)
    batch = next(head._tensors(X, y).batches(len(X)))
    keys = stage1["keys"].cpu().numpy().astype(np.float64)
    for m in net.mods:
        present = {o: (batch[f"m.{o}"] > 0) & (o == m) for o in net.mods}
        rows = present[m].numpy()
        with torch.no_grad():
            q = net.fuse(batch, present).numpy()[rows]
        for sel in numpy_topk(q.astype(np.float64), keys, 2):
            counts[sel] += 1
    assert head.meta_["stages"]["counts"] == counts.tolist()
    carried = sorted(np.flatnonzero(counts), key=lambda j: (-counts[j], j))
    assert head.meta_["stages"]["carried"] == carried
    n = len(carried)
    np.testing.assert_array_equal(stage2["keys"][:n], stage1["keys"][carried])
    np.testing.assert_array_equal(stage2["values"][:n], stage1["values"][carried])
    if n < 16:  # the free slots are fresh prompts, not stage 1's unused ones
        assert not np.isin(stage2["keys"][n:].numpy(), stage1["keys"].numpy()).any()
    for k in stage1:  # everything else continues from stage 1
        if k not in ("keys", "values"):
            np.testing.assert_array_equal(stage2[k], stage1[k])


def test_an_empty_validation_split_trains_as_without_one():
    X, y = three(60, 9)
    Xv, yv = three(40, 10)
    empty = (Xv.take(np.arange(0)), yv.take(np.arange(0)))
    params = {**SMALL, "epochs": 2}
    got = heads.create("umbe", **params).fit(X, y, eval_set=empty)
    want = heads.create("umbe", **params).fit(X, y)
    np.testing.assert_array_equal(got.predict_proba(Xv), want.predict_proba(Xv))
    assert got.history_["chosen_stage"] == 2


def test_binary_targets_undo_the_class_weighting_too():
    """A binary target trained with balanced weights predicts p x prior renormalised (tau -1), the decisions
    of the unweighted problem, and scores its epochs on them (accuracy, scikit-learn's)."""
    X, y = three(200, 33)
    yb = Targets("binary", (y.y > 0).astype(np.int64), ["negative", "positive"])  # 2 : 1 positive
    Xv, yv = three(60, 34)
    yvb = Targets("binary", (yv.y > 0).astype(np.int64), ["negative", "positive"])
    head = heads.create("umbe", **{**SMALL, "epochs": 4, "stages": 1}).fit(X, yb, eval_set=(Xv, yvb))
    prior = np.bincount(yb.y, minlength=2) / len(yb)
    assert head.meta_["shift"] == -1.0
    proba = head.predict_proba(Xv)
    head.meta_["shift"] = 0.0
    want = head.predict_proba(Xv) * prior
    np.testing.assert_allclose(proba, want / want.sum(1, keepdims=True), rtol=1e-5)
    assert max(head.history_["val_score"]) == pytest.approx(float((proba.argmax(1) == yvb.y).mean()), abs=1e-9)
    auto = heads.create("umbe", **{**SMALL, "epochs": 1, "stages": 1, "shift": "auto"}).fit(X, yb, eval_set=(Xv, yvb))
    assert auto.meta_["shift"] == 0.0 and "shift_curve" not in auto.history_  # auto: single labels only


def test_one_stage_is_a_single_run_of_the_loop(monkeypatch):
    calls = []
    monkeypatch.setattr(U, "train_loop", lambda *a, **k: calls.append(1) or train_loop(*a, **k))
    X, y = three(60, 9)
    head = heads.create("umbe", **{**SMALL, "stages": 1}).fit(X, y)
    assert len(calls) == 1 and head.meta_["stages"] == {}
    two = heads.create("umbe", **SMALL).fit(X, y)  # without validation the last stage is the model
    assert len(calls) == 3 and two.meta_["stages"]["chosen"] == 2 and two.history_["chosen_stage"] == 2


@pytest.mark.parametrize("sequences", [False, True])
def test_a_model_trained_on_all_modalities_predicts_from_any_subset(fitted, sequences):
    """Leaving modalities out of the features is the same as masking them off (any content), also for a
    modality the model read as stored sequences."""
    head, X = fitted
    if sequences:
        Xt, yt = three(80, 5, sequences=True)
        X = three(30, 6, sequences=True)[0]
        head = heads.create("umbe", **{**SMALL, "stages": 1}).fit(Xt, yt)
        assert "audio" in head.meta_["seq_dims"]
    for keep in (["audio"], ["image"], ["text"], ["audio", "text"], ["image", "text"]):
        sub = Features({m: X.pooled[m] for m in keep}, {m: X.masks[m] for m in keep if m in X.masks},
                       sequences={m: s for m, s in X.sequences.items() if m in keep})
        off = Features({m: a if m in keep else np.full_like(a, 7.0) for m, a in X.pooled.items()},
                       {m: (X.masks[m] if m in X.masks else np.ones(len(X), bool)) if m in keep
                        else np.zeros(len(X), bool) for m in X.pooled}, sequences=X.sequences)
        proba = head.predict_proba(sub)
        assert proba.shape == (len(X), 3) and np.isfinite(proba).all()
        np.testing.assert_allclose(proba, head.predict_proba(off), atol=1e-6)
    assert not np.allclose(head.predict_proba(sub), head.predict_proba(X), atol=1e-3)  # audio mattered


# ---- the schedule -----------------------------------------------------------------------
def test_train_loop_plateau_follows_torch_and_stops_below_min_lr():
    from featurestore.heads._data import TensorSet

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    data = TensorSet({"x": torch.randn(8, 2)}, 8)
    params = TorchParams(epochs=50, batch_size=4, lr=1e-3, patience=0)
    hist = train_loop(model, lambda m, b: m(b["x"]).pow(2).mean(), data, params=params, device=torch.device("cpu"),
                      plateau=Plateau(factor=0.5, patience=0, min_lr=2e-4), val_loss=lambda m: 1.0)
    # a validation loss that never improves: halved every epoch after the first, stop once below 2e-4
    assert hist["lr"] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4]) and hist["epochs_run"] == 4
    assert hist["val_loss"] == [1.0] * 4
    # reductions smaller than 1e-8 still happen (torch's default eps would stall the lr at ~1.6e-8 forever)
    tiny = train_loop(model, lambda m, b: m(b["x"]).pow(2).mean(), data,
                      params=TorchParams(epochs=50, batch_size=4, lr=1e-6, patience=0), device=torch.device("cpu"),
                      plateau=Plateau(factor=0.5, patience=0, min_lr=1e-8), val_loss=lambda m: 1.0)
    assert tiny["lr"] == pytest.approx([1e-6 * 0.5 ** i for i in range(8)]) and tiny["epochs_run"] == 8
    plain = train_loop(torch.nn.Linear(2, 1), lambda m, b: m(b["x"]).pow(2).mean(), data,
                       params=TorchParams(epochs=3, batch_size=4), device=torch.device("cpu"))
    assert plain["epochs_run"] == 3 and "lr" not in plain


def test_train_loop_ema_validates_and_keeps_the_moving_average_of_a_plain_adamw_loop():
    from featurestore.heads._data import TensorSet

    torch.manual_seed(1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    data = TensorSet({"x": x, "y": y}, 16)
    loss = lambda m, b: (m(b["x"]) - b["y"]).pow(2).mean()  # noqa: E731
    start = torch.nn.Linear(3, 1)

    def reference(steps: int, ema: float) -> list[torch.Tensor]:
        """torch.optim.AdamW on the whole split, the average written from its definition."""
        m = copy.deepcopy(start)
        opt = torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=1e-4)
        avg = [p.detach().clone() for p in m.parameters()]
        for t in range(steps):
            opt.zero_grad()
            loss(m, {"x": x, "y": y}).backward()
            opt.step()
            d = min(ema, (1 + t) / (10 + t))
            avg = [d * a + (1 - d) * p.detach() for a, p in zip(avg, m.parameters())]
        return avg

    params = TorchParams(epochs=6, batch_size=16, lr=0.05, weight_decay=1e-4, patience=0)
    seen = []

    def score(m):  # the weights validation sees; a constant score keeps the first epoch's snapshot
        seen.append([p.detach().clone() for p in m.parameters()])
        return 1.0

    model = copy.deepcopy(start)
    train_loop(model, loss, data, params=params, device=torch.device("cpu"), val_score=score, ema=0.2)
    for epoch in (1, 6):  # decay min(0.2, (1 + t) / (10 + t)): 0.1, 0.18, then the cap 0.2 from step 2
        for got, want in zip(seen[epoch - 1], reference(epoch, 0.2)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(model.parameters(), reference(1, 0.2)):  # kept: the first epoch's average
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reference(6, 0.2)[0], reference(6, 0.0)[0])  # the average is not the live weights
    assert not torch.allclose(reference(6, 0.2)[0], reference(6, 0.9)[0])  # and the cap is what sets it
    model = copy.deepcopy(start)  # no validation: the loop ends on the average of every step
    train_loop(model, loss, data, params=params, device=torch.device("cpu"), ema=0.9)
    for got, want in zip(model.parameters(), reference(6, 0.9)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    # the schedule's validation loss and the stop rule see the average too; a stop rule that never fires
    # leaves the spent learning rate to end training (halved every epoch after the first: 4 epochs)
    at_loss, at_stop = [], []
    hist = train_loop(copy.deepcopy(start), loss, data, params=params, device=torch.device("cpu"), ema=0.9,
                      plateau=Plateau(factor=0.5, patience=0, min_lr=0.01),
                      val_loss=lambda m: at_loss.append([p.detach().clone() for p in m.parameters()]) or 1.0,
                      stop_when=lambda m: at_stop.append([p.detach().clone() for p in m.parameters()]) and False)
    assert hist["epochs_run"] == 4 and len(at_loss) == len(at_stop) == 4
    for seen_at in (at_loss, at_stop):
        for got, want in zip(seen_at[1], reference(2, 0.9)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_train_loop_ema_puts_the_live_weights_back_when_validation_fails():
    from featurestore.heads._data import TensorSet

    torch.manual_seed(2)
    data = TensorSet({"x": torch.randn(16, 3)}, 16)
    model = torch.nn.Linear(3, 1)
    mine = copy.deepcopy(model)
    opt = torch.optim.AdamW(mine.parameters(), lr=0.05, weight_decay=1e-4)
    loss = lambda m, b: m(b["x"]).pow(2).mean()  # noqa: E731
    opt.zero_grad()
    loss(mine, {"x": data.tensors["x"]}).backward()
    opt.step()  # one AdamW step on the whole split: the live weights when validation raises

    def broken(m):
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        train_loop(model, loss, data, params=TorchParams(epochs=3, batch_size=16, lr=0.05, weight_decay=1e-4),
                   device=torch.device("cpu"), val_score=broken, ema=0.9)
    for got, want in zip(model.parameters(), mine.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,bar", [("single", 0.7), ("binary", 0.9)])
def test_stop_train_acc_ends_training_once_the_training_accuracy_exceeds_it(kind, bar):
    """The paper's early end: the accuracies recorded per epoch stay at or below the bar until the last,
    which exceeds it and equals the accuracy of the head's own predictions (FAISS selection, shifted
    decisions) on the training split, the weights the loop ended on when nothing is validated."""
    X, y = three(150, 5)
    if kind == "binary":
        y = Targets("binary", (y.y > 0).astype(np.int64), ["negative", "positive"])
    head = heads.create("umbe", **{**SMALL, "epochs": 30, "stages": 1, "lr": 1e-2, "dropout": 0.3},
                        stop_train_acc=bar)
    head.fit(X, y)
    acc = head.history_["train_acc"]
    assert 2 <= head.history_["epochs_run"] == len(acc) < 30  # not at the first epoch: a real crossing
    assert all(a <= bar for a in acc[:-1]) and acc[-1] > bar
    assert acc[-1] == pytest.approx(float((head.predict(X) == y.y).mean()), abs=1e-4)
    assert "train_acc" not in heads.create("umbe", **{**SMALL, "stages": 1}).fit(X, y).history_


def test_bad_parameters_are_refused_naming_the_value():
    for bad, match in [({"top_k": 9, "pool_size": 8}, "top_k=9"), ({"stages": 3}, "stages=3"),
                       ({"hidden": 10, "heads": 4}, "hidden=10"), ({"lr_factor": 1.5}, "lr_factor=1.5"),
                       ({"sff": "conv"}, "conv"), ({"prompt_length": 1}, "prompt_length=1"),
                       ({"ema": 1.0}, "ema=1.0"), ({"stop_train_acc": 1.5}, "stop_train_acc=1.5"),
                       ({"stop_train_acc": 1.0}, "stop_train_acc=1.0"), ({"scale": float("nan")}, "scale=nan"),
                       ({"min_lr": float("nan")}, "min_lr=nan"), ({"lr": float("inf")}, "lr=inf"),
                       ({"l1": float("inf")}, "l1=inf"), ({"shift": "nan"}, "shift='nan'")]:
        with pytest.raises(ConfigError, match=match):
            heads.create("umbe", **bad)
    X, _ = three(10, 0)
    with pytest.raises(ConfigError, match="supports"):
        heads.create("umbe").fit(X, Targets("multi", np.eye(3, dtype=np.float32)[np.arange(10) % 3], CLASSES))


# ---- through the jobs: train-head, eval, sweep --------------------------------------------
@pytest.fixture(scope="module")
def demo_store(tmp_path_factory):
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.store import open_store
    from featurestore.jobs.extract import ExtractConfig, run

    store = open_store(tmp_path_factory.mktemp("umbestore"), create=True)
    add_dataset(store, "demo", build_demo(), root=None, source="builtin demo")
    run(ExtractConfig(dataset="demo", modality="text", backbone="minilm", limit=240), store)
    return store


def test_train_head_saves_the_index_and_eval_selects_with_it(demo_store):
    from featurestore.jobs.train_head import TrainHeadConfig, evaluate, run

    params = {k: str(v) for k, v in {**SMALL, "epochs": 2, "stages": 1}.items()}
    res = run(TrainHeadConfig(method="umbe", dataset="demo", features={"text": "minilm"}, target="label",
                              params=params, run_id="umbe-demo"), demo_store)
    assert {"war", "uar"} <= set(res.metrics) and res.metrics["war"] == res.metrics["accuracy"]
    assert (res.folder / U.INDEX_FILE).is_file()
    again = evaluate("umbe-demo", "demo", demo_store)
    assert again["metrics"]["uar"] == pytest.approx(res.metrics["uar"], abs=1e-12)
    assert again["metrics"]["war"] == pytest.approx(res.metrics["war"], abs=1e-12)


def test_sweep_trains_umbe_one_configuration_after_another(demo_store):
    from featurestore.jobs import sweep as sweep_job

    res = sweep_job.run(sweep_job.SweepConfig(method="umbe", dataset="demo", features={"text": "minilm"},
                                              target="label", grid={"lr": ["1e-3", "3e-3"]},
                                              params={k: str(v) for k, v in {**SMALL, "epochs": 1,
                                                                                "stages": 1}.items()}),
                        demo_store)
    assert res.table.height == 2 and set(res.table["stack"]) == {1}
    assert {"val_uar", "val_war"} <= set(res.table.columns)
    assert sorted(res.table["lr"]) == [1e-3, 3e-3]


# ---- prompt_encoder=clip: the authors' frozen CLIP text tower ---------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, byte_alphabet):
    """A CLIP text tower with projection from a tiny config (random weights) and a byte-level tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    chars = byte_alphabet
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=32, projection_dim=12,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"])
    path = tmp_path_factory.mktemp("clip-text")
    CLIPTextModelWithProjection(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_clip_prompts_are_the_authors_token_sequence_through_clip(tiny_clip):
    """With the prompt tokens mapped exactly onto real token embeddings, the class feature of class c
    is CLIP's own text embedding of `[BOS] tokens name_c [EOS]` (transformers' forward, input ids)."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tower = CLIPTextModelWithProjection.from_pretrained(tiny_clip).eval()
    tok = CLIPTokenizer.from_pretrained(tiny_clip)
    tower2, tok2, ref, digest = U.load_clip_text(str(tiny_clip))
    enc = U.ClipPromptEncoder(tower2, tok2, CLASSES, hidden=16, n_prompt=4)
    assert enc.joint_dim == 12 and not any(p.requires_grad for p in tower2.parameters())
    assert not any(k.startswith("tower") for k in enc.state_dict())  # CLIP's weights are not saved with the run
    with torch.no_grad():
        enc.to_tokens.weight.copy_(torch.eye(16))
        enc.to_tokens.bias.zero_()
        words = tok("ab de", add_special_tokens=False)["input_ids"]  # 4 tokens: a, b</w>, d, e</w>
        assert len(words) == 4
        memory = tower.text_model.embeddings.token_embedding(torch.tensor([words]))  # [1, 4, 16]
        got = enc(memory)[0].numpy()  # [C, 12]
        for c, name in enumerate(CLASSES):
            ids = tok(f"ab de {name}", return_tensors="pt")["input_ids"]  # BOS ... name EOS
            want = tower(input_ids=ids).text_embeds[0].numpy()
            assert got[c] == pytest.approx(want / np.linalg.norm(want), abs=1e-5)


def test_clip_prompt_encoder_trains_saves_and_loads_without_its_weights(tiny_clip, tmp_path):
    X, y = three(64, 11)
    Xv, yv = three(40, 12)
    params = {**SMALL, "epochs": 1, "stages": 1, "prompt_encoder": "clip", "clip_text": str(tiny_clip)}
    head = heads.create("umbe", **params).fit(X, y, eval_set=(Xv, yv))
    before = {k: v.clone() for k, v in head.net_.clip.tower.state_dict().items()}
    assert head.meta_["clip"]["model"] == str(tiny_clip) and head.meta_["clip"]["weights_hash"]
    proba = head.predict_proba(Xv)
    assert proba.shape == (40, 3) and np.allclose(proba.sum(1), 1)
    head.save(tmp_path / "run")
    from safetensors.numpy import load_file

    assert not any("tower" in k for k in load_file(str(tmp_path / "run" / "model.safetensors")))
    again = Head.load(tmp_path / "run")
    assert np.allclose(again.predict_proba(Xv), proba, atol=1e-6)
    fresh = U.load_clip_text(str(tiny_clip))[0].state_dict()
    assert all(torch.equal(before[k], fresh[k]) for k in fresh)  # frozen: training left CLIP untouched


def test_shift_auto_picks_the_best_validation_mean_and_shifts_the_probabilities():
    """`shift=auto`: among tau in -1..1 (steps of 0.25) the one whose decisions argmax(p x prior^-tau) have
    the best mean of validation UAR and WAR (scikit-learn's balanced accuracy and accuracy; ties: the
    smaller |tau|), and predict_proba returns p x prior^-tau renormalised; a number fixes tau."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    X, y = three(150, 21)
    keep = np.r_[np.flatnonzero(y.y == 0), np.flatnonzero(y.y != 0)[:40]]  # imbalanced: class 0 dominates
    X, y = X.take(keep), y.take(keep)
    Xv, yv = three(60, 22)
    params = {**SMALL, "epochs": 2, "stages": 1, "class_weight": "balanced"}
    head = heads.create("umbe", **params, shift="auto").fit(X, y, eval_set=(Xv, yv))
    prior = np.bincount(y.y, minlength=3) / len(y)
    assert head.meta_["prior"] == pytest.approx(prior.tolist())
    tau = head.meta_["shift"]
    head.meta_["shift"] = 0.0
    raw = head.predict_proba(Xv)
    best = max(np.arange(-1, 1.001, 0.25), key=lambda t: (
        (balanced_accuracy_score(yv.y, np.argmax(raw * prior ** -t, 1)) + accuracy_score(yv.y, np.argmax(raw * prior ** -t, 1))) / 2,
        -abs(t)))
    assert tau == pytest.approx(best)
    assert set(head.history_["shift_curve"]) == {f"{t:g}" for t in np.arange(-1, 1.001, 0.25)}
    for t in np.arange(-1, 1.001, 0.25):  # the recorded curve: each tau's decisions, scored by scikit-learn
        d = np.argmax(raw * prior ** -t, 1)
        assert head.history_["shift_curve"][f"{t:g}"] == pytest.approx(
            (balanced_accuracy_score(yv.y, d), accuracy_score(yv.y, d)), abs=1e-4)
    fixed = heads.create("umbe", **{**params, "shift": "0.5"}).fit(X, y, eval_set=(Xv, yv))
    assert fixed.meta_["shift"] == 0.5 and "shift_curve" not in fixed.history_
    shifted = fixed.predict_proba(Xv)
    fixed.meta_["shift"] = 0.0
    want = fixed.predict_proba(Xv) * prior ** -0.5  # from float32 probabilities; the head shifts float64 logits
    np.testing.assert_allclose(shifted, want / want.sum(1, keepdims=True), rtol=1e-5)
    with pytest.raises(ConfigError, match="shift='x'"):
        heads.create("umbe", shift="x")


def test_shift_curve_and_its_choice_match_scikit_learn_where_the_best_shift_is_not_zero():
    """Scores proportional to likelihoods (what balanced weighting learns) on an imbalanced split: the curve
    of (UAR, WAR) per tau is scikit-learn's on argmax(p x prior^-tau), and the chosen tau, the best mean
    (ties to the smaller |tau|), moves towards the prior."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    rng = np.random.default_rng(0)
    prior = np.array([0.7, 0.2, 0.1])
    y = rng.choice(3, size=600, p=prior)
    z = 1.2 * np.eye(3)[y] + rng.normal(0, 1, (600, 3))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    targets = Targets("single", y, CLASSES)
    curve = U.shift_curve(p, targets, prior)
    want = {}
    for t in U.SHIFTS:
        d = np.argmax(p * prior ** -t, 1)
        want[t] = (balanced_accuracy_score(y, d), accuracy_score(y, d))
        assert curve[t] == pytest.approx(want[t], abs=1e-9)
    best = max(sorted(want, key=abs), key=lambda t: sum(want[t]) / 2)
    assert best < 0 and U.choose_shift(curve) == best
    assert U.choose_shift({-0.5: (0.6, 0.7), 0.0: (0.6, 0.6), 0.5: (0.7, 0.6)}) == -0.5
    assert U.choose_shift({-0.5: (0.6, 0.7), 0.5: (0.7, 0.6), 0.25: (0.65, 0.65)}) == 0.25  # a tie: smaller |tau|


def test_shift_undo_reverses_the_class_weighting_and_scores_epochs_on_the_shifted_decisions():
    """`shift=undo` (the default): tau is minus the class weighting's exponent (balanced -1, sqrt -0.5,
    none 0), so the decisions are argmax(p x prior) for balanced training, the Bayes rule of the unweighted
    problem when the weighted model's p is proportional to posterior / prior; the kept epoch is the one
    whose shifted decisions have the best validation UAR (recomputed with scikit-learn)."""
    from sklearn.metrics import balanced_accuracy_score

    X, y = three(150, 31)
    keep = np.r_[np.flatnonzero(y.y == 0), np.flatnonzero(y.y != 0)[:40]]  # imbalanced: class 0 dominates
    X, y = X.take(keep), y.take(keep)
    Xv, yv = three(60, 32)
    params = {**SMALL, "epochs": 8, "patience": 0, "stages": 1, "lr": 3e-3}
    prior = np.bincount(y.y, minlength=3) / len(y)
    for weighting, tau in (("balanced", -1.0), ("sqrt", -0.5), ("none", 0.0)):
        head = heads.create("umbe", **params, class_weight=weighting).fit(X, y, eval_set=(Xv, yv))
        assert head.meta_["shift"] == tau
        proba = head.predict_proba(Xv)
        head.meta_["shift"] = 0.0
        raw = head.predict_proba(Xv)
        want = raw * prior ** -tau
        np.testing.assert_allclose(proba, want / want.sum(1, keepdims=True), rtol=1e-5)
        scores = head.history_["val_score"]
        assert len(scores) == 8 and max(scores) == pytest.approx(
            balanced_accuracy_score(yv.y, proba.argmax(1)), abs=1e-9)
        if weighting == "balanced":  # a model that learnt, and a shift that changes decisions
            assert max(scores) > 0.5 and (proba.argmax(1) != raw.argmax(1)).any()
    with pytest.raises(ConfigError, match="shift='x'.*undo"):
        heads.create("umbe", shift="x")


def test_a_run_saved_before_shift_existed_predicts_and_reports_no_shift(fitted, tmp_path):
    """A config.json from before `shift` (no `shift` param, no `shift` in meta) loads with shift "0":
    its predictions are the plain softmax of its logits, and its params say so rather than the new default."""
    import json

    head, X = fitted
    folder = head.save(tmp_path / "old")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["params"]["shift"], cfg["meta"]["shift"]
    (folder / "config.json").write_text(json.dumps(cfg))
    old = Head.load(folder)
    assert old.shift == "0" and old.get_params()["shift"] == "0"
    z = old.logits(X).astype(np.float64)
    want = np.exp(z - z.max(1, keepdims=True))
    np.testing.assert_allclose(old.predict_proba(X), want / want.sum(1, keepdims=True), rtol=1e-5)


def test_two_fits_with_the_same_seed_give_the_same_model_on_two_threads():
    """The prompt rows are gathered by a one-hot matmul: indexing's backward accumulates in no fixed order
    across threads on the CPU, and two fits of one seed came out different (by ~5e-5 in the logits here)."""
    X, y = three(400, 5)
    Xv, _ = three(100, 6)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fits = [heads.create("umbe", epochs=2, patience=0, stages=1, seed=0, hidden=64, batch_size=16).fit(X, y)
                for _ in range(2)]
    finally:
        torch.set_num_threads(before)
    np.testing.assert_array_equal(fits[0].logits(Xv), fits[1].logits(Xv))
    assert all(torch.equal(a, b) for a, b in zip(fits[0].net_.state_dict().values(), fits[1].net_.state_dict().values()))


def test_umbe_defaults_are_the_documented_ones():
    """docs/heads.md ("umbe"): pool 32, prompt_length 64, top_k 5, l1 0.01, sff mlp, scale 100, balanced
    weights undone by shift=undo, Adam at 2e-3, plateau 0.6 / 3 / 1e-7, 40 epochs, patience 8, drop_prob 0.3,
    two stages."""
    c = U.UMBEConfig()
    assert (c.pool_size, c.prompt_length, c.top_k, c.l1, c.sff, c.scale) == (32, 64, 5, 0.01, "mlp", 100.0)
    assert (c.class_weight, c.shift, c.select) == ("balanced", "undo", "primary")
    assert (c.lr, c.weight_decay, c.lr_factor, c.lr_patience, c.min_lr) == (2e-3, 0.0, 0.6, 3, 1e-7)
    assert (c.epochs, c.patience, c.drop_prob, c.stages, c.ema, c.stop_train_acc) == (40, 8, 0.3, 2, 0.0, 0.0)


def test_shifted_softmax_is_p_times_prior_to_minus_tau_renormalised_by_loops():
    """docs/heads.md: `p x prior^-tau` renormalised, on the logits, in float64."""
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5, 3)) * 4
    prior = np.array([0.6, 0.3, 0.1])
    for tau in (-1.0, -0.5, 0.75):
        for i in range(5):
            e = [np.exp(z[i, c]) * prior[c] ** (-tau) for c in range(3)]
            np.testing.assert_allclose(U.shifted_softmax(z, prior, tau)[i], [v / sum(e) for v in e], rtol=1e-12)


def test_logits_are_scale_times_the_cosine_of_the_query_with_each_class_feature_eq5():
    """Eq. 5/14 (docs: logits = `scale` (100) x cosine(F_fusion, class feature))."""
    head, net, batch = bare_net(12, 3, 2, scale=37.0)
    net.eval()
    with torch.no_grad():
        logits, q, idx = net(batch)
        feats = net.class_features(idx).double().numpy()
    q = q.double().numpy()
    for b in range(len(q)):
        for c in range(len(CLASSES)):
            cos = q[b] @ feats[b, c] / (np.linalg.norm(q[b]) * np.linalg.norm(feats[b, c]))
            assert float(logits[b, c]) == pytest.approx(37.0 * cos, rel=1e-4, abs=1e-4)
