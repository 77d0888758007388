"""Contract tests run over every registered head (`heads.names()`), so heads added later are covered.

`HeadContract` is the base class: a head whose inputs differ from the generic synthetic data can
subclass it and override `make_data`. Everything here is real (torch, xgboost, safetensors).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import featurestore.heads as heads
from featurestore.errors import ConfigError, FeatureStoreError
from featurestore.heads import Features, Head, Targets

CLASSES = ["happy", "sad", "anger"]  # names the label VA table knows
DIMS = {"text": 12, "audio": 6}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared CPU


def fast_params(cls: type[Head]) -> dict:
    names = set(cls.param_names())
    quick = {"epochs": 4, "n_estimators": 8, "patience": 2, "hidden": 16, "batch_size": 32}
    out = {k: v for k, v in quick.items() if k in names}
    if "heads" in names and "hidden" in out:
        out["heads"] = 2
    return out


def synthetic(kind: str, n: int = 96, seed: int = 0) -> tuple[Features, Targets]:
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    pooled = {m: rng.normal(size=(n, d)).astype(np.float32) for m, d in DIMS.items()}
    pooled["text"][:, 0] += 2 * cls
    masks = {"text": np.ones(n, bool), "audio": rng.random(n) > 0.25}
    va = {m: np.c_[cls / 2 - 0.5, rng.uniform(-1, 1, n)].astype(np.float32) for m in DIMS}
    X = Features(pooled, masks, va=va)
    if kind == "single":
        return X, Targets("single", cls, CLASSES)
    if kind == "binary":
        return X, Targets("binary", (cls > 0).astype(np.int64), ["negative", "positive"],
                          label_va=np.array([[-0.8, 0.2], [0.8, 0.3]]))
    if kind == "multi":
        y = np.eye(3, dtype=np.float32)[cls]
        y[:, 2] = np.maximum(y[:, 2], rng.random(n) < 0.3)
        return X, Targets("multi", y, CLASSES)
    return X, Targets("va", np.c_[cls / 2 - 0.5, np.full(n, np.nan)].astype(np.float32))


class HeadContract:
    """What every head promises. Subclasses set `name` (or are parametrised by the `name` fixture)."""

    def make_data(self, kind: str, seed: int = 0) -> tuple[Features, Targets]:
        return synthetic(kind, seed=seed)

    def kind(self, cls) -> str:
        return next(k for k in ("single", "multi", "binary", "va") if k in cls.supports)

    def params(self, cls) -> dict:
        return {**fast_params(cls), **cls.example_params(self.workdir)}

    def fitted(self, name: str, kind: str | None = None) -> tuple[Head, Features, Targets]:
        cls = heads.get(name)
        kind = kind or self.kind(cls)
        X, y = self.make_data(kind)
        Xv, yv = self.make_data(kind, seed=1)
        head = heads.create(name, **self.params(cls))
        fitted = head.fit(X, y, eval_set=(Xv, yv))  # a head that needs setup gives `example_params`; none skip
        assert fitted is head
        return head, Xv, yv

    @pytest.fixture(autouse=True)
    def _workdir(self, tmp_path_factory):
        self.workdir = tmp_path_factory.mktemp("head-example")

    def test_init_stores_params_only(self, name):
        cls = heads.get(name)
        head = cls()
        assert head.get_params() == dataclasses.asdict(cls.Config())
        assert not [k for k in vars(head) if k.endswith("_") and not k.startswith("_")]
        with pytest.raises(FeatureStoreError):
            head.predict_proba(self.make_data(self.kind(cls))[0])

    def test_get_set_params_round_trip(self, name):
        cls = heads.get(name)
        head = heads.create(name, **self.params(cls))
        params = head.get_params()
        clone = cls().set_params(**params)
        assert clone.get_params() == params
        with pytest.raises(ConfigError, match="known"):
            head.set_params(no_such_param=1)
        with pytest.raises(ConfigError, match="known"):
            cls(no_such_param="1")

    def test_fit_predict_shapes_for_every_supported_kind(self, name):
        for kind in sorted(heads.get(name).supports):
            head, X, y = self.fitted(name, kind)
            proba, pred = head.predict_proba(X), head.predict(X)
            assert proba.shape == (len(X), y.n_outputs)
            assert np.isfinite(proba).all()
            if kind in ("single", "binary"):
                np.testing.assert_allclose(proba.sum(1), 1, atol=1e-5)
                assert pred.shape == (len(X),) and set(pred) <= set(range(len(y.classes)))
            elif kind == "multi":
                assert pred.shape == proba.shape and set(np.unique(pred)) <= {0, 1}
                t = head.meta_["threshold"]  # chosen on validation (auto) or configured: recorded either way
                np.testing.assert_array_equal(pred, (proba > t).astype(int))  # strictly above, none forced
                forced = head.decide(proba, "multi", 0.999, force_top=True)
                assert (forced.sum(1) >= 1).all() and (forced[np.arange(len(X)), proba.argmax(1)] == 1).all()
            assert np.isfinite(head.score(X, y))

    def test_beats_a_constant_predictor_on_held_out_data(self, name):
        """A learnable task (the class moves a text feature by 2 sd): every head must learn it."""
        cls = heads.get(name)
        for kind in sorted(cls.supports):
            X, y = synthetic(kind, n=300)
            Xv, yv = synthetic(kind, n=120, seed=1)
            Xt, yt = synthetic(kind, n=300, seed=2)
            budget = {k: v for k, v in (("epochs", 60), ("patience", 0), ("seq_epochs", 40)) if k in cls.param_names()}
            head = heads.create(name, **{**self.params(cls), **budget}).fit(X, y, eval_set=(Xv, yv))
            pred = head.predict(Xt)
            if kind in ("single", "binary"):
                majority = np.bincount(yt.y).max() / len(yt.y)
                assert (pred == yt.y).mean() > majority + 0.1, (kind, (pred == yt.y).mean(), majority)
            elif kind == "multi":  # micro-F1 against predicting every label for every item (its best constant)
                from sklearn.metrics import f1_score

                constant = f1_score(yt.y, np.ones_like(yt.y), average="micro")
                assert f1_score(yt.y, pred, average="micro") > constant + 0.03, kind
            else:
                r = np.corrcoef(pred[:, 0], yt.y[:, 0])[0, 1]
                assert r > 0.5, (kind, r)

    def test_save_load_gives_identical_predictions(self, name, tmp_path):
        head, X, _ = self.fitted(name)
        head.save(tmp_path / "run")
        assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "config.json").is_file()
        loaded = Head.load(tmp_path / "run")
        assert type(loaded) is type(head) and loaded.get_params() == head.get_params()
        np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))
        np.testing.assert_array_equal(loaded.predict(X), head.predict(X))

    def test_same_seed_same_predictions(self, name):
        a, X, _ = self.fitted(name)
        b, _, _ = self.fitted(name)
        np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-6)

    def test_missing_modalities(self, name):
        head, X, _ = self.fitted(name)
        only_text = Features({"text": X.pooled["text"]}, {"text": X.masks["text"]})
        none_audio = Features(dict(X.pooled), {"text": X.masks["text"], "audio": np.zeros(len(X), bool)},
                              va=dict(X.va))
        for Xm in (only_text, none_audio):
            proba = head.predict_proba(Xm)
            assert proba.shape[0] == len(X) and np.isfinite(proba).all()
        # absent modality == present-but-masked modality
        np.testing.assert_allclose(head.predict_proba(only_text), head.predict_proba(none_audio), atol=1e-5)

    def test_refuses_wrong_dims_and_unknown_modalities(self, name):
        head, X, _ = self.fitted(name)
        wrong = Features({"text": np.zeros((4, DIMS["text"] + 1), np.float32)}, {})
        with pytest.raises(ConfigError, match="12-d"):
            head.predict_proba(wrong)
        extra = Features({**{m: a[:4] for m, a in X.pooled.items()}, "image": np.zeros((4, 3), np.float32)}, {})
        with pytest.raises(ConfigError, match="image"):
            head.predict_proba(extra)


@pytest.fixture(params=heads.names())
def name(request):
    return request.param


class TestEveryRegisteredHead(HeadContract):
    pass


def test_builtin_heads_are_registered():
    assert {"linear", "mlp", "xgboost", "univa"} <= set(heads.names())


def test_nan_features_are_refused_before_training():
    X, _ = synthetic("single")
    X.pooled["text"][3, 2] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        Features(X.pooled, X.masks)


def test_head_refuses_target_kinds_it_does_not_support():
    X, y = synthetic("va")
    with pytest.raises(ConfigError, match="supports"):
        heads.create("univa").fit(X, y)


def test_carve_validation_is_seeded_and_group_aware():
    from featurestore.heads._data import carve_validation

    groups = np.array([f"spk{i % 10}" for i in range(100)], object)
    tr1, va1, rec = carve_validation(100, fraction=0.2, seed=3, groups=groups)
    tr2, va2, _ = carve_validation(100, fraction=0.2, seed=3, groups=groups)
    np.testing.assert_array_equal(va1, va2)
    assert rec["by"] == "group" and rec["n_val"] == 20 and rec["seed"] == 3
    assert not set(groups[tr1]) & set(groups[va1])
    _, va3, rec3 = carve_validation(100, fraction=0.2, seed=3, groups=np.full(100, None, object))
    assert rec3["by"] == "item" and len(va3) == 20


def test_tensor_batches_are_slices_of_one_tensor():
    import torch

    from featurestore.heads._data import TensorSet

    t = torch.arange(10.0)[:, None]
    ts = TensorSet({"x": t}, 10)
    first = next(ts.batches(4))["x"]
    assert first.data_ptr() == t.data_ptr()  # a view, not a copy
    seen = torch.cat([b["x"] for b in ts.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert sorted(seen.flatten().tolist()) == list(range(10))


def test_xgboost_auto_device_needs_a_cuda_build_of_xgboost(monkeypatch):
    """On a GPU machine with the CPU-only xgboost wheel (seen on an H100: `xgboost-cpu`), `auto` must pick
    the CPU, and an explicit `cuda` must say what to install instead of failing in the first round."""
    import torch
    import xgboost

    from featurestore.errors import ConfigError
    from featurestore.heads import xgb as X

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU is what cannot exist here
    monkeypatch.setattr(xgboost, "build_info", lambda: {"USE_CUDA": False})
    assert X._device("auto") == "cpu" and X._device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="built without CUDA"):
        X._device("cuda")
    monkeypatch.setattr(xgboost, "build_info", lambda: {"USE_CUDA": True})
    assert X._device("auto") == "cuda" and X._device("cuda:1") == "cuda:1"


XGB_PARAMS = {"n_estimators": 80, "max_depth": 3, "learning_rate": 0.25, "subsample": 0.7, "colsample_bytree": 0.6,
              "min_child_weight": 2.0, "reg_lambda": 5.0, "early_stopping_rounds": 3, "seed": 11, "nthread": 1,
              "device": "cpu"}


@pytest.mark.parametrize("kind", ["single", "binary", "multi", "va"])
def test_xgboost_is_xgboost_train_with_the_documented_mapping(kind):
    """`xgboost` against `xgboost.train` called by hand: every parameter under xgboost's own name
    (eta, lambda, ...), the objective of the target kind, absent modalities as NaN (missing), early
    stopping on the validation split, and predictions from the best round's trees."""
    import xgboost as xgb

    X, y = synthetic(kind, n=200)
    Xv, yv = synthetic(kind, n=80, seed=1)
    Xt, _ = synthetic(kind, n=60, seed=2)
    if kind == "va":  # arousal known on about half the items (NaN elsewhere), so each dimension has its rows
        for t, s in ((y, 3), (yv, 4)):
            r = np.random.default_rng(s)
            t.y[:, 1] = np.where(r.random(len(t)) < 0.5, t.y[:, 0] * 0.5 + r.normal(0, 0.3, len(t)), np.nan)
    extra = {"multi_strategy": "multi_output_tree"} if kind == "multi" else {}
    head = heads.create("xgboost", **XGB_PARAMS, **extra).fit(X, y, eval_set=(Xv, yv))

    def matrix(F):  # modalities in sorted order, NaN where absent
        return np.concatenate([np.where(F.masks[m][:, None], F.pooled[m], np.nan) for m in sorted(F.pooled)], 1)

    params = {"max_depth": 3, "eta": 0.25, "subsample": 0.7, "colsample_bytree": 0.6, "min_child_weight": 2.0,
              "lambda": 5.0, "seed": 11, "nthread": 1, "tree_method": "hist", "device": "cpu",
              **{"single": {"objective": "multi:softprob", "num_class": 3},
                 "binary": {"objective": "binary:logistic"},
                 "multi": {"objective": "binary:logistic", "multi_strategy": "multi_output_tree"},
                 "va": {"objective": "reg:squarederror"}}[kind]}
    labels = [(y.y[:, d], yv.y[:, d]) for d in range(2)] if kind == "va" else [(y.y, yv.y)]
    outs, stopped = [], []
    dt = xgb.DMatrix(matrix(Xt), missing=np.nan)
    for lab, lab_v in labels:
        rows = np.isfinite(lab) if lab.ndim == 1 else np.ones(len(lab), bool)
        vrows = np.isfinite(lab_v) if lab_v.ndim == 1 else np.ones(len(lab_v), bool)
        ref = xgb.train(params, xgb.DMatrix(matrix(X)[rows], label=lab[rows].astype(np.float32), missing=np.nan),
                        num_boost_round=80, early_stopping_rounds=3, verbose_eval=False,
                        evals=[(xgb.DMatrix(matrix(Xv)[vrows], label=lab_v[vrows].astype(np.float32), missing=np.nan),
                                "val")])
        rounds = ref.best_iteration + 1
        stopped.append(rounds < 80)
        outs.append(ref.predict(dt, iteration_range=(0, rounds)))
        assert not np.allclose(outs[-1], ref.predict(dt)), "the rounds after the best one must change predictions"
    assert any(stopped)  # early stopping fired, so the rounds kept matter
    want = {"single": lambda: outs[0], "binary": lambda: np.c_[1 - outs[0], outs[0]],
            "multi": lambda: outs[0], "va": lambda: np.stack(outs, 1)}[kind]()
    np.testing.assert_allclose(head.predict_proba(Xt), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["mlp", "linear"])
def test_mlp_and_linear_predict_with_the_documented_network_and_their_best_validation_epoch(name):
    """The saved network, applied by hand as docs/heads.md describes it: each modality standardised
    with the mean and std of the training rows where it is present (zeros where absent), the presence
    flags after them, then `layers` blocks of Linear(hidden)-GELU (dropout is off at prediction) and a
    linear output; softmax. And the epoch kept is the one whose recorded validation score is the best,
    which is the score the returned head gets on that split."""
    import torch
    from scipy.special import softmax
    from scipy.stats import norm

    X, y = synthetic("single", n=240)
    Xv, yv = synthetic("single", n=90, seed=1)
    Xt, _ = synthetic("single", n=50, seed=2)
    X.pooled["audio"] = X.pooled["audio"] * 3 + 5  # the absent rows' zeros would move these statistics
    Xv.pooled["audio"], Xt.pooled["audio"] = Xv.pooled["audio"] * 3 + 5, Xt.pooled["audio"] * 3 + 5
    params = {"epochs": 15, "patience": 0, "hidden": 16, "layers": 3, "dropout": 0.3} if name == "mlp" else \
        {"epochs": 15, "patience": 0}
    head = heads.create(name, **params).fit(X, y, eval_set=(Xv, yv))
    parts, flags = [], []
    for m in sorted(X.pooled):
        present = X.pooled[m][X.masks[m]]
        z = (Xt.pooled[m] - present.mean(0)) / present.std(0)
        parts.append(np.where(Xt.masks[m][:, None], z, 0))
        flags.append(Xt.masks[m][:, None].astype(float))
    h = np.concatenate(parts + flags, 1)
    layers = [(m.weight.detach().numpy().astype(np.float64), m.bias.detach().numpy().astype(np.float64))
              for m in head.net_.modules() if isinstance(m, torch.nn.Linear)]
    hidden = params.get("layers", 0)
    assert [W.shape for W, _ in layers] == ([(16, h.shape[1])] + [(16, 16)] * (hidden - 1) + [(3, 16)] if hidden
                                            else [(3, h.shape[1])])
    for W, b in layers[:-1]:
        a = h @ W.T + b
        h = a * norm.cdf(a)  # GELU (exact)
    W, b = layers[-1]
    np.testing.assert_allclose(head.predict_proba(Xt), softmax(h @ W.T + b, 1), rtol=1e-4, atol=1e-5)
    scores = head.history_["val_score"]
    assert head.history_["best_epoch"] == int(np.argmax(scores)) + 1 and len(set(scores)) > 1
    assert head.score(Xv, yv) == pytest.approx(max(scores), abs=1e-9)
