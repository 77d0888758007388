"""`xgboost`: gradient-boosted trees from the xgboost library, on the GPU when torch sees one.

Absent modalities are NaN, which xgboost treats as missing values natively. Multi-label
targets train one booster with one binary-logistic output per label: by default one tree per label
per round (`multi_strategy=one_output_per_tree`), or vector-leaf trees shared by every label
(`multi_output_tree`). VA trains one regressor per dimension on the items where that dimension is known.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping

import numpy as np

from featurestore.config import field
from featurestore.errors import ConfigError

from .base import DecisionParams, Features, Head, Targets
from ._data import align
from ._engine import check_kind

__all__ = ["XGBoost", "XGBConfig"]


@dataclasses.dataclass(frozen=True)
class XGBConfig(DecisionParams):
    n_estimators: int = field(300, "maximum boosting rounds")
    max_depth: int = field(6, "maximum tree depth")
    learning_rate: float = field(0.1, "shrinkage per round (eta)")
    subsample: float = field(1.0, "row subsample per tree")
    colsample_bytree: float = field(1.0, "column subsample per tree")
    min_child_weight: float = field(1.0, "minimum hessian in a leaf")
    reg_lambda: float = field(1.0, "L2 regularisation of leaf weights")
    early_stopping_rounds: int = field(20, "stop after this many rounds without a better validation loss (0: never)")
    multi_strategy: Literal["one_output_per_tree", "multi_output_tree"] = field(
        "one_output_per_tree", "how multi-label outputs share trees")
    nthread: int = field(0, "CPU threads (0: all)")
    seed: int = field(0, "random seed")
    device: str = field("auto", "auto (cuda when torch sees a GPU) | cpu | cuda")

    def __post_init__(self):
        from featurestore.devices import check_device

        check_device(self.device, "device")
        checks = [(self.n_estimators >= 1, "n_estimators", "must be at least 1"),
                  (self.max_depth >= 1, "max_depth", "must be at least 1"),
                  (0 < self.learning_rate < math.inf, "learning_rate", "must be a finite number > 0"),
                  (0 < self.subsample <= 1, "subsample", "must be in (0, 1]"),
                  (0 < self.colsample_bytree <= 1, "colsample_bytree", "must be in (0, 1]"),
                  (0 <= self.min_child_weight < math.inf, "min_child_weight", "must be a finite number >= 0"),
                  (0 <= self.reg_lambda < math.inf, "reg_lambda", "must be a finite number >= 0"),
                  (self.early_stopping_rounds >= 0, "early_stopping_rounds", "must be 0 (never) or more"),
                  (self.nthread >= 0, "nthread", "must be 0 (all) or more")]
        bad = [f"{name}={getattr(self, name)} {rule}" for ok, name, rule in checks if not ok]
        if bad:  # before any reading: xgboost itself refuses some of them only at the first round
            raise ConfigError("; ".join(bad))
        super().__post_init__()


def _device(pref: str) -> str:
    """`auto`: CUDA only when torch sees a GPU *and* this xgboost was built with CUDA (the
    `xgboost-cpu` wheel, or a macOS build, is not: it would fail at the first boosting round)."""
    import xgboost as xgb

    cuda_build = bool(xgb.build_info().get("USE_CUDA"))
    if pref == "auto":
        try:
            import torch

            return "cuda" if cuda_build and torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    if pref.startswith("cuda") and not cuda_build:
        raise ConfigError(f"device {pref!r}: this xgboost ({xgb.__version__}) was built without CUDA; "
                          "install the CUDA build (pip install xgboost) or use -p device=cpu")
    return pref


class XGBoost(Head):
    name = "xgboost"
    Config = XGBConfig
    supports = frozenset({"single", "multi", "binary", "va"})
    description = "gradient-boosted trees (xgboost) over the concatenated modalities; NaN where absent"

    def _matrix(self, X: Features) -> np.ndarray:
        cols = []
        for arr, mask in align(X, self.meta_["dims"]).values():
            cols.append(np.where(mask[:, None], arr, np.nan).astype(np.float32))
        return np.concatenate(cols, 1)

    def _booster_params(self, kind: str, n_classes: int) -> dict:
        p = {"max_depth": self.max_depth, "eta": self.learning_rate, "subsample": self.subsample,
             "colsample_bytree": self.colsample_bytree, "min_child_weight": self.min_child_weight,
             "lambda": self.reg_lambda, "seed": self.seed, "tree_method": "hist", "device": _device(self.device)}
        if self.nthread:
            p["nthread"] = self.nthread
        if kind == "single":
            p.update(objective="multi:softprob", num_class=n_classes)
        elif kind == "binary":
            p.update(objective="binary:logistic")
        elif kind == "multi":
            p.update(objective="binary:logistic", multi_strategy=self.multi_strategy)
        else:
            p.update(objective="reg:squarederror")
        return p

    def _labels(self, y: Targets) -> list[np.ndarray]:
        if y.kind == "va":
            return [y.y[:, d] for d in range(2)]
        return [y.y.astype(np.float32)]

    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "XGBoost":
        import xgboost as xgb

        check_kind(self, y)
        self._set_meta(X, y)
        x = self._matrix(X)
        xv = yv = None
        if eval_set is not None:
            self._check_features(eval_set[0])
            xv, yv = self._matrix(eval_set[0]), self._labels(eval_set[1])
        params = self._booster_params(y.kind, len(y.classes))
        self.boosters_, best = [], []
        for d, label in enumerate(self._labels(y)):
            rows = np.isfinite(label) if label.ndim == 1 else np.ones(len(label), bool)
            if not rows.any():  # a VA dimension nobody labelled: no booster, predicts 0
                self.boosters_.append(None)
                best.append(0)
                continue
            dtrain = xgb.DMatrix(x[rows], label=label[rows], missing=np.nan)
            evals, stop = [], None
            if xv is not None:
                vrows = np.isfinite(yv[d]) if yv[d].ndim == 1 else np.ones(len(yv[d]), bool)
                if vrows.any():
                    evals = [(xgb.DMatrix(xv[vrows], label=yv[d][vrows], missing=np.nan), "val")]
                    stop = self.early_stopping_rounds or None
            booster = xgb.train(params, dtrain, num_boost_round=self.n_estimators, evals=evals,
                                early_stopping_rounds=stop, verbose_eval=False)
            self.boosters_.append(booster)
            best.append(int(getattr(booster, "best_iteration", self.n_estimators - 1)) + 1 if stop
                        else self.n_estimators)
        self.meta_["rounds"] = best
        self.settle_decision(eval_set)
        return self

    def predict_proba(self, X: Features) -> np.ndarray:
        import xgboost as xgb

        self._check_features(X)
        dm = xgb.DMatrix(self._matrix(X), missing=np.nan)
        outs = []
        for booster, rounds in zip(self.boosters_, self.meta_["rounds"]):
            if booster is None:
                outs.append(np.zeros(len(X)))  # a VA dimension nobody labelled: the neutral midpoint
                continue
            booster.set_param({"device": "cpu"})  # predicting small batches: no host/device copies
            outs.append(booster.predict(dm, iteration_range=(0, rounds)).astype(np.float64))
        kind = self.meta_["kind"]
        if kind == "va":
            return np.stack(outs, 1)
        p = outs[0]
        if kind == "binary":
            return np.stack([1 - p, p], 1)
        return p.reshape(len(X), -1)

    def _state(self) -> dict[str, np.ndarray]:
        out = {}
        for i, b in enumerate(self.boosters_):
            if b is not None:
                out[f"booster.{i}"] = np.frombuffer(bytes(b.save_raw(raw_format="ubj")), dtype=np.uint8).copy()
        return out

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        import xgboost as xgb

        self.boosters_ = []
        for i in range(len(meta["rounds"])):
            raw = state.get(f"booster.{i}")
            if raw is None:
                self.boosters_.append(None)
                continue
            booster = xgb.Booster()
            booster.load_model(bytearray(np.asarray(raw).tobytes()))
            self.boosters_.append(booster)
