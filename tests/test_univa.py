"""UniVA (paper 002 sec. 3): losses against direct loop-based formulas, ablations, and the CLI end to end.

The end-to-end tests build a real store once per session: the built-in demo dataset with
MiniLM text features for its first rows (real HDF5 segments, real backbone).
"""
from __future__ import annotations

import dataclasses

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from click.testing import CliRunner

import featurestore.heads as heads
from featurestore.cli import cli
from featurestore.errors import ConfigError
from featurestore.heads import Features, Head, Targets, losses

ROWS = 400  # manifest rows extracted for the end-to-end store


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


# ---- eq. 3-5 against a direct loop ---------------------------------------------------
def loop_contrastive(H, va, present, delta, tau, views=2):
    """Eq. 3-5 written out pair by pair; averaged over the anchors that have a positive."""
    B = len(H)
    X = [(b, v) for v in range(views) for b in range(B)]

    def dist(i, j):  # eq. 3 over the dimensions known for both; None when none is
        dims = [d for d in range(2) if not math.isnan(va[i][d]) and not math.isnan(va[j][d])]
        return math.sqrt(sum((va[i][d] - va[j][d]) ** 2 for d in dims)) if dims else None

    per_anchor = []
    for i, (si, _) in enumerate(X):
        if not present[si] or dist(si, si) is None:
            continue
        A = [j for j, (sj, _) in enumerate(X) if j != i and present[sj] and dist(si, sj) is not None]
        P = [j for j in A if dist(si, X[j][0]) < delta]
        if not P:
            continue
        denom = sum(math.exp(float(H[si] @ H[X[a][0]]) / tau) for a in A)
        total = sum(math.log(math.exp(float(H[si] @ H[X[p][0]]) / tau) / denom) for p in P)
        per_anchor.append(-total / len(P))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def vectorised(H, va, present, delta, tau, views=2):
    pos, ok = losses.va_pairs(torch.tensor(va, dtype=torch.float64), delta)
    z = torch.tensor(H, dtype=torch.float64)
    return float(losses.contrastive_loss(torch.stack([z] * views), pos, ok, torch.tensor(present), tau))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("views", [1, 2])
def test_va_contrastive_loss_matches_loop(seed, views):
    rng = np.random.default_rng(seed)
    B = 9
    H = rng.normal(size=(B, 5))
    H /= np.linalg.norm(H, axis=1, keepdims=True)
    va = rng.uniform(-0.3, 0.3, (B, 2))
    va[1] = np.nan  # a modality whose VA is unknown: drops out
    va[2, 1] = np.nan  # only valence known: compared on valence
    present = rng.random(B) > 0.15
    want = loop_contrastive(H, va, present, 0.25, 0.6, views)
    assert vectorised(H, va, present, 0.25, 0.6, views) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_batch_without_positive_pairs_gives_zero_and_finite_gradients():
    va = np.array([[-0.9, -0.9], [0.0, 0.0], [0.9, 0.9], [0.9, -0.9]])  # all pairwise distances > delta
    H = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    pos, ok = losses.va_pairs(torch.tensor(va), 0.1)
    loss = losses.contrastive_loss(H[None], pos, ok, torch.ones(4, dtype=torch.bool), 0.6)  # one view
    assert float(loss.detach()) == 0.0 == loop_contrastive(H.detach().numpy(), va, [True] * 4, 0.1, 0.6, views=1)
    loss.backward()
    assert torch.isfinite(H.grad).all()
    # all VA unknown, two views: nothing is comparable, still 0 and not NaN
    nan_va = torch.full((4, 2), float("nan"), dtype=torch.float64)
    pos, ok = losses.va_pairs(nan_va, 0.1)
    loss = losses.contrastive_loss(torch.stack([H, H]), pos, ok, torch.ones(4, dtype=torch.bool), 0.6)
    assert float(loss.detach()) == 0


def test_contrastive_loss_is_vectorised_not_quadratic_python():
    B = 512  # a pair loop would take seconds; this is one matmul
    z = torch.nn.functional.normalize(torch.randn(2, B, 32), dim=-1)
    pos, ok = losses.va_pairs(torch.rand(B, 2) * 2 - 1, 0.1)
    assert torch.isfinite(losses.contrastive_loss(z, pos, ok, torch.ones(B, dtype=torch.bool), 0.6))


# ---- eq. 8-10 ------------------------------------------------------------------------
def test_prior_matches_eq_8_and_9():
    from featurestore.va.labels import label_va_table

    classes = ["happy", "sad", "anger", "surprise", "neutral"]
    table = label_va_table(classes)
    M = losses.prior_matrix(table).double().numpy()
    for j in range(5):
        for l in range(5):
            vj, aj = table[j]
            vl, al = table[l]
            den = math.hypot(vj, aj) * math.hypot(vl, al)
            assert M[j, l] == pytest.approx((vj * vl + aj * al) / den if den else 0.0, abs=1e-6)
    p = torch.softmax(torch.randn(7, 5, dtype=torch.float64), -1)
    eta = sum(M[j, l] * (p[i, j] - p[i, l]) ** 2 for i in range(7) for j in range(5) for l in range(5)) / 7
    assert float(losses.correlation_prior(p, torch.tensor(M))) == pytest.approx(float(eta), rel=1e-6)


def test_kl_matches_eq_10():
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(3, 3, dtype=torch.float64), -1)
    want = []
    for i in range(2):  # the unlabelled third item drops out
        t = y[i] / y[i].sum()
        want.append(sum(float(t[c] * math.log(t[c] / log_p[i, c].exp())) for c in range(3) if t[c] > 0))
    assert float(losses.kl_multilabel(log_p, y)) == pytest.approx(sum(want) / 2, rel=1e-9)


# ---- the head ------------------------------------------------------------------------
def _synthetic(n=120, seed=0, sequences=True):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    y = np.eye(3, dtype=np.float32)[cls]
    text = rng.normal(size=(n, 10)).astype(np.float32)
    text[:, 0] += 2 * cls
    audio_mask = rng.random(n) > 0.2
    audio = rng.normal(size=(n, 6)).astype(np.float32)
    X = Features({"text": text, "audio": audio}, {"audio": audio_mask},
                 va={"text": np.c_[cls / 2 - 0.5, np.zeros(n)].astype(np.float32),
                     "audio": np.full((n, 2), np.nan, np.float32)})
    if sequences:
        X.sequences = {
            "text": [np.repeat(text[i:i + 1], 1 + i % 4, 0) for i in range(n)],
            "audio": [rng.normal(size=(1 + i % 5, 6)).astype(np.float32) if audio_mask[i] else None
                      for i in range(n)]}
    return X, Targets("multi", y, ["happy", "sad", "anger"])


QUICK = dict(epochs=3, hidden=16, heads=2, batch_size=32)


@pytest.mark.parametrize("switch", [{}, {"contrast": "none"}, {"prior": False}, {"contrast": "label"},
                                    {"contrast": "self"}])
def test_ablation_switches_train(switch):
    X, y = _synthetic(sequences=False)
    head = heads.create("univa", **QUICK, **switch).fit(X, y, eval_set=_synthetic(60, 1, False))
    assert np.isfinite(head.history_["train_loss"]).all()
    assert head.predict(X).shape == y.y.shape


def test_sequence_encoders_and_save_load(tmp_path):
    X, y = _synthetic()
    head = heads.create("univa", **QUICK, zeta=0.18).fit(X, y)
    assert head.meta_["seq_dims"] == {"audio": 6, "text": 10}
    enc = head.net_.encoders
    assert enc["audio"].sat is not None and enc["text"].sat is None  # SAT + AddAtt vs FC + AddAtt
    head.save(tmp_path / "u")
    loaded = Head.load(tmp_path / "u")
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
    p = head.predict_proba(X)
    np.testing.assert_array_equal(head.predict(X), (p > 0.18).astype(int))  # strictly above zeta, none forced
    with pytest.raises(ConfigError, match="sequences"):
        head.predict_proba(Features(dict(X.pooled), dict(X.masks)))


def test_prior_needs_label_va():
    X, y = _synthetic(sequences=False)
    y = Targets("multi", y.y, ["alpha", "beta", "gamma"])
    with pytest.raises(ConfigError, match="prior=false"):
        heads.create("univa", **QUICK).fit(X, y)
    heads.create("univa", **QUICK, prior=False).fit(X, y)


# ---- end to end through the CLI ------------------------------------------------------
@pytest.fixture(scope="session")
def demo_store(tmp_path_factory):
    from featurestore.datasets import add_dataset, build_demo
    from featurestore.store import open_store
    from featurestore.jobs.extract import ExtractConfig, run

    store = open_store(tmp_path_factory.mktemp("store"), create=True)
    df = build_demo()
    add_dataset(store, "demo", df, root=None, source="builtin demo")
    noval = df.filter(pl.col("split") != "val").head(ROWS)
    add_dataset(store, "noval", noval, root=None, source="demo without val")
    run(ExtractConfig(dataset="demo", modality="text", backbone="minilm", limit=ROWS), store)
    return store


def fs(store, *args):
    result = CliRunner().invoke(cli, ["--store", str(store.root), *args], catch_exceptions=False)
    return result


def test_train_head_univa_end_to_end(demo_store):
    r = fs(demo_store, "train-head", "--method", "univa", "--dataset", "demo", "--features", "text=minilm",
           "--target", "labels", "-p", "epochs=4", "-p", "hidden=32", "--seed", "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert set(out["metrics"]) == {"acc", "hamming_loss", "micro_f1", "macro_f1"}
    folder = demo_store.heads_dir() / out["run"]
    for name in ("model.safetensors", "config.json", "metrics.json", "lineage.json", "per_class_f1.png"):
        assert (folder / name).is_file(), name
    saved = json.loads((folder / "metrics.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert saved["decision"] == {"threshold": config["meta"]["threshold"], "chosen_on": "validation"}  # zeta=auto
    lineage = json.loads((folder / "lineage.json").read_text())
    assert lineage["fingerprints"]["text"].startswith("minilm-") and lineage["seed"] == 1
    assert lineage["manifest_hash"] and lineage["validation"] == {"carved": False, "split": "val",
                                                                   "n_val": lineage["validation"]["n_val"]}
    text = fs(demo_store, "train-head", "--method", "univa", "--dataset", "demo", "--features", "text=minilm",
              "--target", "label", "-p", "epochs=2", "-p", "hidden=32", "-p", "prior=false")
    assert text.exit_code == 0 and "uar" in text.output and "weighted_f1" in text.output
    ev = fs(demo_store, "eval", out["run"], "--dataset", "demo", "--json")
    assert ev.exit_code == 0
    assert json.loads(ev.output)["metrics"] == pytest.approx(out["metrics"])  # same split, same numbers
    for split in ("val", "train"):  # no held-out measure on what training chose by or fitted
        r = fs(demo_store, "train-head", "--method", "linear", "--dataset", "demo", "--features", "text=minilm",
               "--target", "label", "--eval-split", split)
        assert r.exit_code == 2 and f"'{split}'" in r.output and "held-out" in r.output


def test_carved_validation_and_runs_staleness(demo_store):
    r = fs(demo_store, "train-head", "--method", "linear", "--dataset", "noval", "--features", "text=minilm",
           "--target", "label", "--seed", "7", "-p", "epochs=2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["lineage"]["validation"]["carved"] and out["lineage"]["validation"]["seed"] == 7
    assert (demo_store.heads_dir() / out["run"] / "confusion.png").is_file()
    runs = json.loads(fs(demo_store, "runs", "--json").output)["runs"]
    assert not next(x for x in runs if x["run"] == out["run"])["stale"]
    from featurestore.jobs.extract import ExtractConfig, run

    newer = ExtractConfig(dataset="noval", modality="text", backbone="minilm", params={"max_length": 32}, limit=20)
    run(newer, demo_store)  # a try on 20 items of other parameters supersedes nothing
    runs = json.loads(fs(demo_store, "runs", "--json").output)["runs"]
    assert not next(x for x in runs if x["run"] == out["run"])["stale"]
    run(dataclasses.replace(newer, limit=0), demo_store)  # all of it: it supersedes the run's fingerprint
    runs = json.loads(fs(demo_store, "runs", "--json").output)["runs"]
    assert next(x for x in runs if x["run"] == out["run"])["stale"]
    assert "runs" in json.loads(fs(demo_store, "ls", "--json").output)


def test_bad_input_fails_before_training(demo_store, tmp_path):
    r = fs(demo_store, "train-head", "--method", "univa", "--dataset", "demo", "--features", "text=minilm",
           "-p", "nope=1")
    assert r.exit_code == 2 and "nope" in r.output and "zeta" in r.output  # lists the head's parameters
    r = fs(demo_store, "eval", "no-such-run", "--dataset", "demo")
    assert r.exit_code == 4
    # a run whose head was trained on 12-d text features, evaluated on the store's 384-d MiniLM rows
    X, _ = _synthetic(60, sequences=False)
    X = Features({"text": np.pad(X.pooled["text"], ((0, 0), (0, 2)))}, {})
    y = Targets("single", np.arange(60) % 3, ["negative", "neutral", "positive"])
    folder = heads.create("mlp", epochs=1).fit(X, y).save(demo_store.heads_dir() / "foreign")
    fp = json.loads(fs(demo_store, "ls", "--json").output)["features"][0]["fingerprint"]
    (folder / "lineage.json").write_text(json.dumps({"fingerprints": {"text": fp}, "target": "label"}))
    r = fs(demo_store, "eval", "foreign", "--dataset", "demo")
    assert r.exit_code == 2 and "384-d" in r.output and "12-d" in r.output
    r = fs(demo_store, "eval", "foreign", "--dataset", "demo", "--split", "nosuchsplit")
    assert r.exit_code == 5 and "no items" in r.output
    info = demo_store.dataset_dir("demo") / "dataset.json"
    saved = info.read_text()
    try:  # a manifest label outside the recorded label set
        from featurestore.datasets import info_digest

        doc = json.loads(saved)
        doc["label_set"] = ["negative", "positive"]
        info.write_text(json.dumps(doc))  # edited by hand: dataset.json no longer matches its own hash
        r = fs(demo_store, "train-head", "--method", "mlp", "--dataset", "demo", "--features", "text=minilm",
               "--target", "label")
        assert r.exit_code == 8 and "info_sha256" in r.output
        info.write_text(json.dumps({**doc, "info_sha256": info_digest(doc)}))  # resealed: the label check's turn
        r = fs(demo_store, "train-head", "--method", "mlp", "--dataset", "demo", "--features", "text=minilm",
               "--target", "label")
        assert r.exit_code == 5 and "outside" in r.output and "neutral" in r.output
    finally:
        info.write_text(saved)


# ---- the code's loss terms and the documented defaults, against loops ---------------------------
def test_kl_mean_reduction_with_softmax_target_is_klDivLoss_mean_by_loops():
    """docs/heads.md: the code's KL is `KLDivLoss(reduction='mean')` (mean over items *and* classes)
    with the softmax of the multi-hot labels as target; unlabelled items drop out."""
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    log_p = torch.log_softmax(torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)), -1)
    terms = []
    for i in (0, 1, 3):
        e = [math.exp(float(v)) for v in y[i]]
        t = [v / sum(e) for v in e]
        terms += [t[c] * (math.log(t[c]) - float(log_p[i, c])) for c in range(4)]
    want = sum(terms) / len(terms)  # mean over the 3 labelled items x 4 classes
    got = float(losses.kl_multilabel(log_p, y, target="softmax", reduction="mean"))
    assert got == pytest.approx(want, rel=1e-9)


def test_code_prior_is_the_l2_norm_over_the_batch_of_log_prob_differences_by_loops():
    """docs/heads.md: eta (code) = sum_jl M_jl ||log p_j - log p_l||_2 / B, the norm over the batch."""
    g = torch.Generator().manual_seed(5)
    B, K = 6, 4
    log_p = torch.log_softmax(torch.randn(B, K, dtype=torch.float64, generator=g) * 2, -1)
    M = torch.randn(K, K, dtype=torch.float64, generator=g)
    want = 0.0
    for j in range(K):
        for l in range(K):
            sq = sum((float(log_p[b, j]) - float(log_p[b, l])) ** 2 for b in range(B))
            want += float(M[j, l]) * math.sqrt(sq)
    assert float(losses.correlation_prior_code(log_p, M)) == pytest.approx(want / B, rel=1e-9)


def _member(**kw):
    import types

    base = dict(lam=0.3, kl_target="softmax", kl_weight=7.0, prior=True, prior_form="code", prior_weight=0.5,
                contrast="va", views=2, normalize=True, tau=0.6, delta=0.4, meta_={"dims": {"text": 5, "audio": 3}})
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize("kw", [{}, {"prior_form": "paper", "kl_target": "normalized", "lam": 0.8}, {"views": 1}])
def test_stack_loss_is_lam_cl_plus_one_minus_lam_times_kl_and_prior_by_loops(kw):
    """docs/heads.md: total = lam * sum_m L_CL_m + (1 - lam) * (kl_weight * KL + prior_weight * eta),
    L_CL_m on L2-normalised H_m rows (normalize=true)."""
    from featurestore.heads.univa import UniVA

    rng = np.random.default_rng(7)
    B, K = 7, 3
    h = _member(**kw)
    y = np.array([[1, 0, 0], [0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0], [0, 1, 0], [0, 0, 1]], np.float64)
    log_p = np.log(rng.dirichlet(np.ones(K), B))
    M = rng.normal(size=(K, K))
    H = {m: rng.normal(size=(B, d)) * 3 for m, d in (("text", 4), ("audio", 4))}
    va = {"text": rng.uniform(-0.5, 0.5, (B, 2)), "audio": rng.uniform(-0.5, 0.5, (B, 2))}
    present = {"text": np.ones(B, bool), "audio": rng.random(B) > 0.3}
    f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731 (float32, as training runs)
    log_p, M, H, va = (np.float32(log_p).astype(np.float64), np.float32(M).astype(np.float64),
                       {m: np.float32(v).astype(np.float64) for m, v in H.items()},
                       {m: np.float32(v).astype(np.float64) for m, v in va.items()})
    batch = {"y": f32(y)}
    for m in H:
        batch[f"m.{m}"] = f32(present[m])
        batch[f"va.{m}"] = f32(va[m])
    got = UniVA._stack_loss([h], [0], f32(log_p)[None], {m: f32(v)[None] for m, v in H.items()},
                            None, batch, f32(M)[None])
    # the reference, written out
    cl = 0.0
    for m in H:
        unit = H[m] / np.linalg.norm(H[m], axis=1, keepdims=True)
        cl += loop_contrastive(unit, va[m], present[m], h.delta, h.tau, h.views)
    p = np.exp(log_p)
    kl_terms = []
    for i in range(B):
        t = np.exp(y[i]) / np.exp(y[i]).sum() if h.kl_target == "softmax" else y[i] / y[i].sum()
        kl_terms += [t[c] * (math.log(t[c]) - log_p[i, c]) if t[c] > 0 else 0.0 for c in range(K)]
    kl = sum(kl_terms) / (B * K)
    if h.prior_form == "code":
        eta = sum(M[j, l] * math.sqrt(sum((log_p[b, j] - log_p[b, l]) ** 2 for b in range(B)))
                  for j in range(K) for l in range(K)) / B
    else:
        eta = sum(M[j, l] * (p[b, j] - p[b, l]) ** 2 for b in range(B) for j in range(K) for l in range(K)) / B
    want = h.lam * cl + (1 - h.lam) * (h.kl_weight * kl + h.prior_weight * eta)
    assert float(got[0]) == pytest.approx(want, rel=1e-4)


def test_univa_defaults_are_the_documented_ones():
    """docs/heads.md's table and list: kl_weight 1000, softmax target, code prior learnt, lam 0.2, tau 0.6,
    delta 0.1, 2 views, normalize on, zeta auto."""
    from featurestore.heads.univa import UniVAConfig

    c = UniVAConfig()
    assert (c.kl_weight, c.kl_target, c.prior, c.prior_form, c.learn_m, c.prior_weight) == \
        (1000.0, "softmax", True, "code", True, 1.0)
    assert (c.lam, c.tau, c.delta, c.views, c.normalize, c.zeta, c.contrast) == (0.2, 0.6, 0.1, 2, True, "auto", "va")
    assert (c.dropout, c.pooled_layers, c.hidden, c.batch_size, c.epochs) == (0.4, 2, 256, 64, 30)


def test_va_pairs_are_positive_strictly_below_delta_eq3():
    """Eq. 3 / docs: positives are pairs whose VA distance is *below* delta; exactly delta is not one."""
    va = torch.tensor([[0.0, 0.0], [0.0, 0.25], [0.5, 0.0], [0.0, 0.125]], dtype=torch.float64)
    pos, ok = losses.va_pairs(va, 0.25)
    want = [[math.dist(a, b) < 0.25 for b in va.tolist()] for a in va.tolist()]
    assert pos.tolist() == want and ok.all()
    assert not pos[0, 1] and pos[0, 3]  # 0.25 apart: not a pair; 0.125: a pair
