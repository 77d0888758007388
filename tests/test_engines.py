"""The training engines against `torch.optim.AdamW`, the UniVA losses against loops written from the
printed equations and from the authors' code, the ablation switches, and the multi-label decision.

The engines write AdamW out by hand (vectorised over configurations), so a solo fit being "a stack
of one" proves nothing about the optimiser: here each stacked configuration is replayed by a plain
loop with `torch.optim.AdamW` on the same batches in the same order, and must end on the same weights.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import featurestore.heads as heads
from featurestore.heads import Features, Targets, losses
from featurestore.heads._data import TensorSet
from featurestore.heads._engine import task_loss
from featurestore.heads._stacked import StackSpec, train_stack
from featurestore.heads._vmapped import VmapSpec, train_vmapped


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def _batches(n: int, batch: int, seed: int, epochs: int):
    """The order `TensorSet.batches(shuffle=True)` draws from a generator seeded with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        yield from (order[i:i + batch] for i in range(0, n, batch))


def _reference(net: torch.nn.Module, x, y, kind, *, lr, wd, batch, seed, epochs):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    for idx in _batches(len(x), batch, seed, epochs):
        loss = task_loss(net(x[idx]), y[idx], kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


@pytest.mark.parametrize("kind", ["single", "multi", "va"])
def test_stacked_engine_matches_torch_adamw(kind):
    torch.manual_seed(0)
    n, d, k = 70, 6, 3
    x = torch.randn(n, d)
    y = {"single": torch.randint(0, k, (n,)), "multi": (torch.rand(n, k) > 0.5).float(),
         "va": torch.randn(n, k)}[kind]
    net = torch.nn.Sequential(torch.nn.Linear(d, 5), torch.nn.GELU(), torch.nn.Linear(5, k))
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    lrs, wds = [1e-2, 3e-3], [0.0, 0.05]
    # one epoch: the dropout draws (keep = 1) come after the epoch's shuffle, so the order is the reference's
    spec = StackSpec(lrs, wds, [0.0, 0.0], [1, 1], [0, 0])
    best, hist = train_stack([(m.weight, m.bias) for m in linears], spec, x, y, kind, batch_size=16, seed=3,
                             device=torch.device("cpu"))
    for c, (lr, wd) in enumerate(zip(lrs, wds)):
        ref = _reference(_clone(net), x, y, kind, lr=lr, wd=wd, batch=16, seed=3, epochs=1)
        for (w, b), m in zip(best[c], [m for m in ref if isinstance(m, torch.nn.Linear)]):
            torch.testing.assert_close(w, m.weight.detach(), atol=2e-6, rtol=1e-5)
            torch.testing.assert_close(b, m.bias.detach(), atol=2e-6, rtol=1e-5)
        assert hist[c]["epochs_run"] == 1


def test_stacked_linear_matches_torch_adamw_over_epochs():
    torch.manual_seed(1)
    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    net = torch.nn.Linear(4, 2)
    spec = StackSpec([5e-3, 2e-2], [1e-4, 0.0], [0.0, 0.0], [4, 4], [0, 0])
    best, _ = train_stack([(net.weight, net.bias)], spec, x, y, "single", batch_size=8, seed=5,
                          device=torch.device("cpu"))
    for c, (lr, wd) in enumerate([(5e-3, 1e-4), (2e-2, 0.0)]):
        ref = _reference(_clone(net), x, y, "single", lr=lr, wd=wd, batch=8, seed=5, epochs=4)
        torch.testing.assert_close(best[c][0][0], ref.weight.detach(), atol=2e-6, rtol=1e-5)


def test_vmapped_engine_matches_torch_adamw():
    torch.manual_seed(2)
    x, y = torch.randn(40, 5), torch.randn(40, 2)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    start = _clone(net)
    lrs, wds = [1e-2, 4e-3], [0.01, 0.0]

    def losses_fn(forward, batch, active):
        return ((forward(batch["x"]) - batch["y"]) ** 2).mean((1, 2))

    states, hist = train_vmapped(net, VmapSpec(lrs, wds, [3, 3], [0, 0]), TensorSet({"x": x, "y": y}, 40),
                                 batch_size=16, seed=7, device=torch.device("cpu"), losses_fn=losses_fn,
                                 args_of=lambda b: (b,))
    for c, (lr, wd) in enumerate(zip(lrs, wds)):
        ref = _reference(_clone(start), x, y, "va", lr=lr, wd=wd, batch=16, seed=7, epochs=3)
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(states[c][k], v, atol=2e-6, rtol=1e-5)
        assert hist[c]["epochs_run"] == 3


def _clone(net):
    import copy

    return copy.deepcopy(net)


# ---- UniVA's losses against loops ----------------------------------------------------
def test_correlation_prior_code_form_against_a_loop():
    """The authors' code: sum_jl M_jl * ||log p[:, j] - log p[:, l]||_2 (over the batch) / B."""
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(6, 4, generator=g), -1)
    M = torch.randn(4, 4, generator=g)
    want = 0.0
    for j, l in itertools.product(range(4), repeat=2):
        want += float(M[j, l]) * math.sqrt(sum(float(log_p[i, j] - log_p[i, l]) ** 2 for i in range(6)))
    assert float(losses.correlation_prior_code(log_p, M)) == pytest.approx(want / 6, rel=1e-5)
    stacked = losses.correlation_prior_code(torch.stack([log_p, log_p * 2]), torch.stack([M, -M]))
    assert float(stacked[1]) == pytest.approx(-2 * want / 6, rel=1e-5)


def test_correlation_prior_eq9_against_a_loop():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(5, 3, generator=g), -1)
    M = torch.randn(3, 3, generator=g)
    want = np.mean([sum(float(M[j, l]) * float(p[i, j] - p[i, l]) ** 2 for j in range(3) for l in range(3))
                    for i in range(5)])
    assert float(losses.correlation_prior(p, M)) == pytest.approx(want, rel=1e-5)
    assert float(losses.correlation_prior(p[None], M[None])[0]) == pytest.approx(want, rel=1e-5)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@pytest.mark.parametrize("target", ["normalized", "softmax"])
def test_kl_forms_against_a_loop(target):
    g = torch.Generator().manual_seed(2)
    log_p = torch.log_softmax(torch.randn(4, 5, generator=g), -1)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    per_item = []
    for i in range(4):
        if target == "softmax":  # the code: F.softmax(groundTruth_labels)
            e = [math.exp(float(v)) for v in y[i]]
            q = [v / sum(e) for v in e]
        else:  # eq. 10 with y normalised to a distribution
            q = [float(v) / float(y[i].sum()) for v in y[i]]
        per_item.append(sum(qc * (math.log(qc) - float(log_p[i, c])) for c, qc in enumerate(q) if qc > 0))
    got = losses.kl_multilabel(log_p, y, target=target)
    assert float(got) == pytest.approx(np.mean(per_item), rel=1e-5)
    # KLDivLoss(reduction='mean') as the code calls it: averaged over items and classes
    code = torch.nn.KLDivLoss(reduction="mean")(log_p, torch.softmax(y, -1)) if target == "softmax" else None
    mean = losses.kl_multilabel(log_p, y, target=target, reduction="mean")
    assert float(mean) == pytest.approx(np.mean(per_item) / 5, rel=1e-5)
    if code is not None:
        assert float(mean) == pytest.approx(float(code), rel=1e-5)


# ---- ablation switches change the loss ------------------------------------------------
def _multi_task(n=120, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[:, 0] += 2 * cls
    y = np.eye(3, dtype=np.float32)[cls]
    y[:, 2] = np.maximum(y[:, 2], rng.random(n) < 0.3)
    va = np.c_[cls / 2 - 0.5, rng.uniform(-1, 1, n)].astype(np.float32)
    return Features({"text": x}, {}, va={"text": va}), Targets("multi", y, ["happy", "sad", "anger"])


@pytest.mark.parametrize("switch", [{"contrast": "none"}, {"prior": False},
                                    {"contrast": "label"}, {"contrast": "self"}, {"kl_target": "normalized"},
                                    {"prior_form": "paper"}, {"kl_weight": 1.0}])
def test_each_univa_switch_changes_the_training_loss(switch):
    X, y = _multi_task()
    quick = dict(epochs=2, hidden=16, heads=2, batch_size=32, patience=0)
    base = heads.create("univa", **quick).fit(X, y)
    other = heads.create("univa", **quick, **switch).fit(X, y)
    a, b = base.history_["train_loss"], other.history_["train_loss"]
    assert np.isfinite(b).all()
    assert abs(a[0] - b[0]) > 1e-4 * max(1.0, abs(a[0])), (switch, a, b)


def test_learnable_m_moves_and_fixed_m_stays():
    X, y = _multi_task()
    quick = dict(epochs=2, hidden=16, heads=2, batch_size=32, patience=0)
    start = losses.prior_matrix(np.array([[0.8, 0.4], [-0.7, -0.3], [-0.5, 0.8]])).numpy()
    y.label_va = np.array([[0.8, 0.4], [-0.7, -0.3], [-0.5, 0.8]])
    learnt = heads.create("univa", **quick).fit(X, y)
    fixed = heads.create("univa", **quick, learn_m=False).fit(X, y)
    np.testing.assert_allclose(fixed.net_.M.numpy(), start, atol=1e-6)
    assert np.abs(learnt.net_.M.detach().numpy() - start).max() > 1e-4


# ---- the multi-label decision -----------------------------------------------------------
def test_threshold_auto_is_the_best_on_validation_and_strict():
    from featurestore.heads import metrics
    from featurestore.heads.base import THRESHOLD_GRID

    X, y = _multi_task(200)
    Xv, yv = _multi_task(100, seed=1)
    head = heads.create("mlp", epochs=5, hidden=16).fit(X, y, eval_set=(Xv, yv))
    assert head.meta_["threshold_chosen_on"] == "validation"
    p = head.predict_proba(Xv)
    # an independent search: IoU accuracy by a loop over items, for each grid threshold
    def iou(t):
        pred = p > t
        return np.mean([(pred[i] & (yv.y[i] > 0)).sum() / max((pred[i] | (yv.y[i] > 0)).sum(), 1)
                        if (pred[i] | (yv.y[i] > 0)).any() else 0.0 for i in range(len(p))])
    scores = [iou(t) for t in THRESHOLD_GRID]
    assert head.meta_["threshold"] == pytest.approx(THRESHOLD_GRID[int(np.argmax(scores))])
    assert metrics.multilabel_accuracy(yv.y, head.predict(Xv)) == pytest.approx(max(scores))
    fixed = heads.create("mlp", epochs=5, hidden=16, threshold=0.3).fit(X, y, eval_set=(Xv, yv))
    assert fixed.meta_["threshold"] == 0.3 and fixed.meta_["threshold_chosen_on"] == "configured"
    # strictly above: a score equal to the threshold is not predicted
    assert Head_decide(np.array([[0.3, 0.31]]), 0.3).tolist() == [[0, 1]]


def Head_decide(p, t):
    return heads.Head.decide(p, "multi", t)


def test_bad_thresholds_are_refused():
    from featurestore.errors import ConfigError

    for bad in ("1.5", "0", "often"):
        with pytest.raises(ConfigError, match="threshold"):
            heads.create("mlp", threshold=bad)
    with pytest.raises(ConfigError, match="zeta"):
        heads.create("univa", zeta="2")


def test_vmapped_training_runs_attention_with_the_math_kernel_on_cuda():
    """On an H100, univa's vmapped step failed: CUDA's fused attention kernels draw dropout inside the
    kernel, which vmap(randomness="same") cannot batch. The engine must select the math kernel on CUDA
    (the flags are process-wide and can be checked without a GPU), leave them alone on the CPU, and
    the math kernel must batch dropout under vmap as the engine uses it."""
    from torch.func import functional_call, vmap

    from featurestore.heads._vmapped import _math_attention

    before = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled())
    with _math_attention("cuda:0"):
        assert torch.backends.cuda.math_sdp_enabled()
        assert not torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.mem_efficient_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()) == before
    with _math_attention(torch.device("cpu")):
        assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()) == before

    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, 0.3, batch_first=True).train()
    params = {k: v.detach().unsqueeze(0).repeat(3, *[1] * v.dim()) for k, v in layer.named_parameters()}
    step = vmap(lambda p, x: functional_call(layer, p, (x,)), in_dims=(0, None), randomness="same")
    with _math_attention("cuda"):
        out = step(params, torch.randn(5, 7, 16))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # one dropout mask for every config


def test_stacked_forward_equals_each_configurations_own_network_with_inverted_dropout():
    """`_Stack.forward` of an mlp with two hidden layers, C=2 different configurations, against the
    network written out per configuration with torch's modules: GELU after every hidden layer, and
    dropout as torch's inverted dropout (keep where U < keep, scale by 1/keep) with the same U."""
    from featurestore.heads._stacked import _Stack

    torch.manual_seed(0)
    D, H, K, B = 6, 5, 3, 4
    nets = [torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.GELU(), torch.nn.Linear(H, H), torch.nn.GELU(),
                                torch.nn.Linear(H, K)) for _ in range(2)]
    lins = [[m for m in net if isinstance(m, torch.nn.Linear)] for net in nets]
    stack = _Stack([(lin.weight, lin.bias) for lin in lins[0]], 2, "cpu")
    with torch.no_grad():  # configuration 1 gets the second network's weights
        for i, lin in enumerate(lins[1]):
            W, b = stack.params[i]
            (W[:, 1] if i == 0 else W[1]).copy_(lin.weight.t())
            b[1].copy_(lin.bias)
    x = torch.randn(B, D)
    with torch.no_grad():
        out = stack.forward(x)
        for c in range(2):
            torch.testing.assert_close(out[c], nets[c](x), rtol=1e-5, atol=1e-6)
        keep = torch.tensor([0.7, 0.9])
        us = [torch.rand(B, H), torch.rand(B, H)]
        queue = list(us)
        out = stack.forward(x, keep=keep, draws=lambda shape: queue.pop(0))
        for c in range(2):
            k = float(keep[c])
            h = torch.nn.functional.gelu(lins[c][0](x)) * (us[0] < k).float() / k
            h = torch.nn.functional.gelu(lins[c][1](h)) * (us[1] < k).float() / k
            torch.testing.assert_close(out[c], lins[c][2](h), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["single", "binary", "multi", "va"])
def test_task_loss_is_torchs_loss_per_configuration(kind):
    """task_loss against torch's own loss modules, each configuration of a `[C, B, K]` stack alone:
    CrossEntropyLoss, BCEWithLogitsLoss, and for VA the MSE over the known values only."""
    g = torch.Generator().manual_seed(0)
    C, B, K = 3, 7, (2 if kind in ("binary", "va") else 4)
    out = torch.randn(C, B, K, generator=g)
    if kind in ("single", "binary"):
        y = torch.randint(0, K, (B,), generator=g)
        ref = [torch.nn.CrossEntropyLoss()(out[c], y) for c in range(C)]
    elif kind == "multi":
        y = (torch.rand(B, K, generator=g) < 0.4).float()
        ref = [torch.nn.BCEWithLogitsLoss()(out[c], y) for c in range(C)]
    else:
        y = torch.rand(B, K, generator=g) * 2 - 1
        y[1, 0] = y[4, 1] = float("nan")
        known = ~y.isnan()
        ref = [torch.nn.MSELoss()(out[c][known], y[known]) for c in range(C)]
    got = task_loss(out, y, kind)
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(task_loss(out[1], y, kind), ref[1], rtol=1e-6, atol=1e-7)


def test_train_loop_early_stopping_and_best_weights_against_a_hand_written_loop():
    """`train_loop`'s selection on validation against a loop written by hand with torch.optim.AdamW on
    the same batches: `patience` counts epochs without a strictly better score (a tie is not better),
    the weights kept are the first best epoch's, `best_epoch` is 1-based, and validation sees the
    network in eval mode (dropout off, so it draws no random numbers the training would have used)."""
    import copy

    from featurestore.heads._torch import TorchParams, train_loop

    torch.manual_seed(0)
    x, y, xv = torch.randn(24, 4), torch.randn(24, 1), torch.randn(10, 4)
    start = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))
    loss = lambda m, b: (m(b["x"]) - b["y"]).pow(2).mean()  # noqa: E731
    script = [0.1, 0.5, 0.5, 0.3, 0.2, 0.9, 0.9]  # epoch 3 ties epoch 2, and epochs 3-4 are 2 without a better one
    seen = []

    def score(m):
        seen.append(m(xv).detach().clone())
        return script[len(seen) - 1]

    params = TorchParams(epochs=7, batch_size=8, lr=0.05, weight_decay=1e-3, patience=2, seed=3)
    model = copy.deepcopy(start)
    torch.manual_seed(5)  # the dropout draws
    hist = train_loop(model, loss, TensorSet({"x": x, "y": y}, 24), params=params, device=torch.device("cpu"),
                      val_score=score)

    ref = copy.deepcopy(start)
    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=1e-3)
    torch.manual_seed(5)
    outs, states = [], []
    batches = _batches(24, 8, 3, 4)
    for epoch in range(4):
        ref.train()
        for _ in range(3):
            idx = next(batches)
            opt.zero_grad()
            loss(ref, {"x": x[idx], "y": y[idx]}).backward()
            opt.step()
        ref.eval()
        with torch.no_grad():
            outs.append(ref(xv))
        states.append(copy.deepcopy(ref.state_dict()))
    assert hist["epochs_run"] == 4 and hist["best_epoch"] == 2 and hist["val_score"] == script[:4]
    for got, want in zip(seen, outs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, states[1][k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(states[1]["3.weight"], states[3]["3.weight"])  # the restore is visible
    assert not model.training
