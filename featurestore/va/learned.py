"""`learned`: a VA regressor fitted on cached embeddings, scoring any dataset of the same fingerprint.

Two kinds, both on standardised features and fitted per dimension on the items that have
a label for it (a dimension with no labels at all is not fitted and scores NaN):

- `ridge`: closed form through one eigendecomposition of the Gram matrix per dimension;
  with `alpha=none` the penalty is chosen from a log grid by the exact leave-one-out
  error of ridge regression.
- `mlp`: one hidden layer (GELU, dropout) and a tanh output, trained with Adam on the
  mean squared error over the labelled dimensions only.

A fitted model lives in `store/va_models/<name>/`: `model.safetensors` (the tensors),
`config.json` (kind, fingerprint, modality, hyperparameters, the data it was fitted on)
and `metrics.json` (held-out Pearson r and CCC per dimension). Scoring reads the cached
embeddings of the recorded fingerprint; it never reruns the backbone.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .._io import read_json, require_intact
from ..config import field
from ..errors import ConfigError, NotFoundError
from ..hashing import file_digest
from .base import DIMENSIONS, ScorerConfig, VAScorer

__all__ = ["LearnedScorer", "LearnedConfig", "FitParams", "Ridge", "MLP", "REGRESSORS", "models_root",
           "list_models", "model_folder", "pearson", "ccc", "evaluate"]

WEIGHTS, CONFIG, METRICS = "model.safetensors", "config.json", "metrics.json"
_ALPHAS = np.logspace(-2, 5, 15)


def models_root(store) -> Path:
    return Path(store.root) / "va_models"


def list_models(store) -> list[str]:
    root = models_root(store)
    return sorted(p.name for p in root.iterdir()  # hidden names: a model being saved, or the one it replaced
                  if not p.name.startswith(".") and (p / CONFIG).is_file()) if root.is_dir() else []


def model_folder(store, ref: str) -> Path:
    """A fitted model by name (in the store) or by folder."""
    if store is not None and (models_root(store) / ref / CONFIG).is_file():
        return models_root(store) / ref
    if ref and (Path(ref) / CONFIG).is_file():
        return Path(ref)
    known = ", ".join(list_models(store)) if store is not None else ""
    raise NotFoundError(f"no fitted VA model {ref!r}; known: {known or 'none'} (fit one with `fs va fit`)")


# ---- regressors ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FitParams:
    kind: str = field("ridge", "ridge | mlp")
    alpha: Optional[float] = field(None, "ridge penalty on standardised features (none: leave-one-out choice)")
    hidden: int = field(128, "mlp: hidden units")
    epochs: int = field(100, "mlp: passes over the training items")
    lr: float = field(1e-3, "mlp: Adam learning rate")
    weight_decay: float = field(1e-4, "mlp: AdamW weight decay")
    dropout: float = field(0.1, "mlp: dropout on the hidden layer")
    batch_size: int = field(128, "mlp: items per step")
    seed: int = field(0, "mlp: seed of the initial weights and the shuffling")

    def __post_init__(self):
        if self.kind not in REGRESSORS:
            raise ConfigError(f"kind={self.kind!r} must be one of {sorted(REGRESSORS)}")
        if self.alpha is not None and self.alpha < 0:
            raise ConfigError(f"alpha={self.alpha} must be 0 or more (or none)")
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("hidden, epochs, batch_size and lr must be positive, dropout on [0, 1)")


def _one_blas_thread():
    """Matrices this small factorise fastest on one BLAS thread; a busy machine makes
    multi-threaded OpenBLAS spin for seconds. A no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _standardiser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0)
    return mean, np.where(scale > 1e-8, scale, 1.0)


class Ridge:
    """Per-dimension ridge regression on standardised features."""

    def __init__(self, params: FitParams):
        self.params = params

    def fit(self, x: np.ndarray, y: np.ndarray) -> "Ridge":
        with _one_blas_thread():
            return self._fit(np.asarray(x, np.float64), y)

    def _fit(self, x: np.ndarray, y: np.ndarray) -> "Ridge":
        self.mean_, self.scale_ = _standardiser(x)
        xs = (x - self.mean_) / self.scale_
        d = x.shape[1]
        self.coef_, self.intercept_ = np.zeros((d, 2)), np.full(2, np.nan)
        self.alpha_ = np.full(2, np.nan)
        for j in range(2):
            rows = np.isfinite(y[:, j])
            if rows.sum() < 2:
                continue
            self.coef_[:, j], self.intercept_[j], self.alpha_[j] = self._fit_one(xs[rows], y[rows, j])
        return self

    def _fit_one(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, float]:
        xm, ym = x.mean(0), y.mean()
        xc, yc = x - xm, y - ym
        # Eigen-decomposition of the D x D Gram matrix: X'X = V diag(s2) V' (cheaper than an SVD of X).
        s2, v = np.linalg.eigh(xc.T @ xc)
        s2 = np.clip(s2, 0.0, None)
        xv = xc @ v  # = U diag(s)
        xty = xv.T @ yc
        alpha = self.params.alpha if self.params.alpha is not None else self._loo_alpha(xv, s2, xty, yc)
        coef = v @ (xty / (s2 + alpha))
        return coef, float(ym - xm @ coef), float(alpha)

    @staticmethod
    def _loo_alpha(xv: np.ndarray, s2: np.ndarray, xty: np.ndarray, y: np.ndarray) -> float:
        """The grid alpha with the least leave-one-out error: e_i = r_i / (1 - h_ii), where the hat matrix
        of ridge with an unpenalised intercept is 11'/n + Xc (Xc'Xc + alpha I)^-1 Xc' (so h_ii carries
        the intercept's 1/n: without it, with no more items than dimensions every e_i was near 0 and
        the smallest alpha always won)."""
        best, best_err = _ALPHAS[0], np.inf
        xv2 = xv ** 2
        n = len(y)
        for alpha in _ALPHAS:
            inv = 1.0 / (s2 + alpha)
            resid = y - xv @ (inv * xty)
            lev = np.minimum(1.0 / n + xv2 @ inv, 1 - 1e-9)
            err = np.mean((resid / (1 - lev)) ** 2)
            if err < best_err:
                best, best_err = alpha, err
        return float(best)

    def predict(self, x: np.ndarray) -> np.ndarray:
        xs = (np.asarray(x, np.float64) - self.mean_) / self.scale_
        return xs @ self.coef_ + self.intercept_  # NaN intercept: dimension not fitted

    def tensors(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_,
                "alpha": self.alpha_}

    def load_tensors(self, t: dict[str, np.ndarray]) -> "Ridge":
        self.mean_, self.scale_, self.coef_, self.intercept_ = t["mean"], t["scale"], t["coef"], t["intercept"]
        self.alpha_ = t["alpha"]
        return self

    def fit_info(self) -> dict:
        return {"alpha": [None if np.isnan(a) else float(a) for a in self.alpha_]}


class MLP:
    """A one-hidden-layer network with tanh outputs, trained on the labelled dimensions."""

    def __init__(self, params: FitParams):
        self.params = params

    def _net(self, dim: int):
        import torch

        p = self.params
        return torch.nn.Sequential(torch.nn.Linear(dim, p.hidden), torch.nn.GELU(), torch.nn.Dropout(p.dropout),
                                   torch.nn.Linear(p.hidden, 2), torch.nn.Tanh())

    def fit(self, x: np.ndarray, y: np.ndarray) -> "MLP":
        import torch

        self.mean_, self.scale_ = _standardiser(np.asarray(x, np.float64))
        self.fitted_ = np.isfinite(y).any(0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a net this small runs fastest on one thread
        try:
            with torch.random.fork_rng(devices=[]):  # seeded here; the caller's RNG is left as it was
                self.net_ = self._train(x, y)
        finally:
            torch.set_num_threads(threads)
        return self

    def _train(self, x: np.ndarray, y: np.ndarray):
        import torch

        p = self.params
        torch.manual_seed(p.seed)
        net = self._net(x.shape[1])
        xt = torch.as_tensor((x - self.mean_) / self.scale_, dtype=torch.float32)
        mask = torch.as_tensor(np.isfinite(y), dtype=torch.float32)
        yt = torch.as_tensor(np.nan_to_num(y, nan=0.0), dtype=torch.float32)
        opt = torch.optim.AdamW(net.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        gen = torch.Generator().manual_seed(p.seed)
        net.train()
        for _ in range(p.epochs):
            for idx in torch.randperm(len(xt), generator=gen).split(p.batch_size):
                m = mask[idx]
                loss = (((net(xt[idx]) - yt[idx]) ** 2) * m).sum() / m.sum().clamp_min(1.0)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return net.eval()

    def predict(self, x: np.ndarray) -> np.ndarray:
        import torch

        xt = torch.as_tensor((np.asarray(x, np.float64) - self.mean_) / self.scale_, dtype=torch.float32)
        with torch.inference_mode():
            out = self.net_(xt).double().numpy()
        out[:, ~self.fitted_] = np.nan
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}
        return {"mean": self.mean_, "scale": self.scale_, "fitted": self.fitted_.astype(np.uint8), **state}

    def load_tensors(self, t: dict[str, np.ndarray]) -> "MLP":
        import torch

        self.mean_, self.scale_, self.fitted_ = t["mean"], t["scale"], t["fitted"].astype(bool)
        self.net_ = self._net(len(self.mean_))
        self.net_.load_state_dict({k[4:]: torch.as_tensor(v) for k, v in t.items() if k.startswith("net.")})
        self.net_.eval()
        return self

    def fit_info(self) -> dict:
        return {}


REGRESSORS = {"ridge": Ridge, "mlp": MLP}


# ---- metrics ---------------------------------------------------------------------------
def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def ccc(a: np.ndarray, b: np.ndarray) -> float:
    """Lin's concordance correlation coefficient."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2:
        return float("nan")
    cov = np.mean((a - a.mean()) * (b - b.mean()))
    denom = a.var() + b.var() + (a.mean() - b.mean()) ** 2
    return float(2 * cov / denom) if denom > 0 else float("nan")


def evaluate(pred: np.ndarray, y: np.ndarray) -> dict[str, dict]:
    """Per dimension: n, Pearson r, CCC and RMSE over the items with a label and a prediction."""
    out = {}
    for j, dim in enumerate(DIMENSIONS):
        rows = np.isfinite(y[:, j]) & np.isfinite(pred[:, j])
        if not rows.any():
            out[dim] = {"n": 0, "pearson": None, "ccc": None, "rmse": None}
            continue
        p, t = pred[rows, j], y[rows, j]
        out[dim] = {"n": int(rows.sum()), "pearson": _num(pearson(p, t)), "ccc": _num(ccc(p, t)),
                    "rmse": float(np.sqrt(np.mean((p - t) ** 2)))}
    return out


def _num(v: float) -> float | None:
    return None if np.isnan(v) else v


# ---- the scorer ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LearnedConfig(ScorerConfig):
    model: str = field("", "a fitted VA model: its name in the store (fs va models) or its folder")
    frames_from: str = field("", "a model fitted on image features, scoring video: the video feature set whose "
                                 "frame rows are scored (default: the newest extracted with the same image backbone)")


class LearnedScorer(VAScorer):
    """Scores cached embeddings with a regressor fitted by `fs va fit`."""

    name = "learned"
    description = "any modality: a ridge/MLP regressor fitted on cached embeddings (fs va fit), --param model=NAME"
    modality_hint = "that of the features it was fitted on"
    Config = LearnedConfig
    inputs = "features"
    volatile = ("model", "frames_from")  # the video fingerprint read is in the spec instead

    @property
    def folder(self) -> Path:
        return model_folder(self.store, self.config.model)

    @property
    def info(self) -> dict:
        if getattr(self, "_info", None) is None:
            self._info = read_json(self.folder / CONFIG)
        return self._info

    @property
    def label(self) -> str:
        return f"learned.{self.info['name']}"

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def modalities(self) -> tuple[str, ...]:
        mod = self.info["modality"]
        return (mod, "video") if mod == "image" else (mod,)  # image features: also each frame of a clip

    def features_for(self, modality: str) -> tuple[str, bool]:
        """Fitted on image features and asked for video: the frame rows of a video feature set
        whose frames went through the same image backbone, scored one by one and averaged."""
        if modality != "video" or self.info["modality"] == "video":
            return self.fingerprint, False
        return self._frames_from(), True

    def _frames_from(self) -> str:
        from ..errors import NotFoundError
        from ..features import FeatureSet, list_feature_sets

        image = FeatureSet(self.store, self.fingerprint)
        if not image.exists():
            raise NotFoundError(f"VA model {self.info['name']!r} was fitted on features {self.fingerprint!r}, which "
                                f"are not in {self.store.root}")
        if self.config.frames_from:
            candidates = [FeatureSet(self.store, self.config.frames_from)]
            if not candidates[0].exists():
                raise NotFoundError(f"frames_from={self.config.frames_from!r}: no such feature set (fs ls)")
        else:
            candidates = [fs for fs in list_feature_sets(self.store) if fs.modality == "video"][::-1]
        for fs in candidates:
            if fs.modality == "video" and _frames_of(fs.spec, image.spec):
                return fs.fingerprint
        raise NotFoundError(
            f"VA model {self.info['name']!r} scores video frames from video features whose frames went through "
            f"{image.backbone} as in {self.fingerprint} (same weights and parameters), with their frame rows "
            f"kept; none is in {self.store.root}{' (' + self.config.frames_from + ' does not match)' if self.config.frames_from else ''}: "
            f"extract them with `fs extract --modality video --backbone {image.backbone}`")

    def full_spec(self, modality: str) -> dict:
        spec = super().full_spec(modality)
        fingerprint, frames = self.features_for(modality)
        if frames:  # the sampled frames change the numbers: the video features read are part of the source
            spec["frames_from"] = fingerprint
        return spec

    def provides(self) -> tuple[bool, bool]:
        return tuple(bool(v) for v in self.info["provides"])  # type: ignore[return-value]

    def _load(self) -> None:
        from safetensors.numpy import load_file

        from ..config import from_dict

        require_intact(self.folder, f"fit it again with `fs va fit ... --out {self.info['name']} --replace`")
        params = from_dict(FitParams, self.info["params"], what=f"VA model {self.info['name']}")
        self.regressor = REGRESSORS[params.kind](params).load_tensors(load_file(self.folder / WEIGHTS))

    def spec(self) -> dict:
        return {"name": self.info["name"], "kind": self.info["params"]["kind"], "fingerprint": self.fingerprint,
                "weights_digest": file_digest(self.folder / WEIGHTS), "fitted_on": self.info.get("fitted_on", {}),
                "origin": {"model": str(self.folder)}}

    def score(self, batch: np.ndarray | Sequence, modality: str) -> np.ndarray:
        self.load()
        if modality == "video" and self.info["modality"] == "image":  # per clip: its frame rows, averaged
            out = np.stack([self.regressor.predict(np.asarray(frames, np.float64)).mean(axis=0) for frames in batch])
        else:
            out = self.regressor.predict(np.asarray(batch, np.float64))
        return np.where(np.isfinite(out), np.clip(out, -1.0, 1.0), out)


def _frames_of(video: dict, image: dict) -> bool:
    """Whether a video feature set's frames went through exactly the image backbone of `image`."""
    vcfg = video.get("config", {})
    return (video.get("backbone") == image.get("backbone") and video.get("dim") == image.get("dim")
            and video.get("weights_hash") == image.get("weights_hash")
            and video.get("adapter_hash") == image.get("adapter_hash")
            and video.get("preprocessing", {}).get("frame") == image.get("preprocessing")
            and video.get("preprocessing", {}).get("sequence") is not None
            and all(vcfg.get(k) == v for k, v in image.get("config", {}).items() if k not in _STORAGE_ONLY))


_STORAGE_ONLY = ("seq_cap", "dtype", "_type")  # how rows are stored (and the config class), not how a frame is encoded
