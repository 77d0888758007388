"""The one training loop every torch head reuses, and a base class for heads on a flat input.

Seeded and deterministic on CPU (training runs under `torch.random.fork_rng`, so it neither
reads nor changes the caller's global RNG); AdamW; early stopping on a validation score
with the best weights restored; CUDA with bfloat16 autocast when torch sees a GPU.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from featurestore.config import field
from featurestore.errors import ConfigError

from .base import Features, Head, Targets
from ._data import TensorSet, align

__all__ = ["TorchParams", "Plateau", "pick_device", "seeded", "autocast", "train_loop", "TorchHead", "task_loss",
           "scores_from_outputs"]


@dataclasses.dataclass(frozen=True)
class TorchParams:
    """Fields every torch head shares (subclass configs inherit them)."""

    epochs: int = field(50, "maximum passes over the training split")
    batch_size: int = field(256, "items per mini-batch")
    lr: float = field(1e-3, "AdamW learning rate")
    weight_decay: float = field(1e-4, "AdamW weight decay")
    patience: int = field(5, "stop after this many epochs without a better validation score (0: never)")
    seed: int = field(0, "seed of initialisation, shuffling and dropout")
    device: str = field("auto", "auto | cpu | cuda[:N]")

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.patience < 0:
            raise ConfigError(f"lr={self.lr} must be > 0, weight_decay and patience >= 0")


@dataclasses.dataclass(frozen=True)
class Plateau:
    """ReduceLROnPlateau on a loss (lower is better), and stop once every learning rate is below `min_lr`."""

    factor: float = 0.6
    patience: int = 3
    min_lr: float = 1e-7


def pick_device(pref: str = "auto"):
    import torch

    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(pref)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {pref!r} asked for, but torch sees no GPU; use device=auto or cpu")
    return dev


@contextlib.contextmanager
def seeded(seed: int, device: Any = None) -> Iterator[None]:
    """Run a block with torch's RNG seeded, restoring the caller's RNG state afterwards."""
    import torch

    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def autocast(device: Any):
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_loop(model, loss_fn: Callable[[Any, dict], Any], train: TensorSet, *, params: TorchParams, device,
               val_score: Callable[[Any], float] | None = None, log: Callable[[str], None] | None = None,
               plateau: Plateau | None = None, val_loss: Callable[[Any], float] | None = None) -> dict:
    """Train `model` with AdamW on mini-batch slices of `train`; early-stop on `val_score` (higher is better).

    `loss_fn(model, batch) -> scalar tensor`. Returns the history; the model ends with its best weights.
    With `plateau`, the learning rate follows torch's ReduceLROnPlateau on `val_loss(model)` (the
    epoch's training loss when there is none) and training stops once it falls below `plateau.min_lr`.
    """
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.lr,
                            weight_decay=params.weight_decay)
    sched = None if plateau is None else torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=plateau.factor, patience=plateau.patience)
    gen = torch.Generator().manual_seed(params.seed)
    data = train.to(device)
    best, best_state, since, history = -math.inf, None, 0, {"train_loss": [], "val_score": []}
    for epoch in range(params.epochs):
        model.train()
        total, count = 0.0, 0
        for batch in data.batches(params.batch_size, shuffle=True, generator=gen):
            with autocast(device):
                loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(next(iter(batch.values())))
            count += len(next(iter(batch.values())))
        history["train_loss"].append(total / max(count, 1))
        lr_spent = sched is not None and _plateau_step(sched, model, val_loss, history, plateau.min_lr)
        if val_score is None:
            if lr_spent:
                break
            continue
        model.eval()
        with torch.no_grad():
            score = float(val_score(model))
        history["val_score"].append(score)
        if log:
            log(f"epoch {epoch + 1}: train loss {history['train_loss'][-1]:.4f}, val {score:.4f}")
        if score > best or best_state is None:
            best, best_state, since = score, copy.deepcopy(model.state_dict()), 0
            history["best_epoch"] = epoch + 1
        else:
            since += 1
            if params.patience and since >= params.patience:
                break
        if lr_spent:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    history["epochs_run"] = len(history["train_loss"])
    model.eval()
    return history


def _plateau_step(sched, model, val_loss, history: dict, min_lr: float) -> bool:
    """One ReduceLROnPlateau step on the validation (else training) loss; True once every lr < min_lr."""
    import torch

    if val_loss is not None:
        model.eval()
        with torch.no_grad():
            loss = float(val_loss(model))
        history.setdefault("val_loss", []).append(loss)
    else:
        loss = history["train_loss"][-1]
    sched.step(loss)
    lrs = [g["lr"] for g in sched.optimizer.param_groups]
    history.setdefault("lr", []).append(max(lrs))
    return max(lrs) < min_lr


def task_loss(out, y, kind: str):
    """Cross-entropy (single/binary), BCE (multi), or MSE over known VA values."""
    import torch.nn.functional as F

    out = out.float()
    if kind in ("single", "binary"):
        return F.cross_entropy(out, y)
    if kind == "multi":
        return F.binary_cross_entropy_with_logits(out, y)
    known = ~y.isnan()
    err = (out - y.nan_to_num()) ** 2 * known
    return err.sum() / known.sum().clamp(min=1)


def scores_from_outputs(out, kind: str) -> np.ndarray:
    import torch

    out = out.float()
    if kind in ("single", "binary"):
        out = torch.softmax(out, -1)
    elif kind == "multi":
        out = torch.sigmoid(out)
    return out.cpu().numpy().astype(np.float64)


def validation_scorer(head: Head, yv: Targets, kind: str, threshold: float | None = None
                      ) -> Callable[[np.ndarray], float]:
    """Scores -> the validation metric that early stopping maximises (a NaN metric ranks last)."""
    from . import metrics

    def score(proba: np.ndarray) -> float:
        s = metrics.primary(yv, head.decide(proba, kind, threshold), proba)
        return -1e9 if math.isnan(s) else s
    return score


def _target_tensor(y: Targets):
    import torch

    if y.kind in ("single", "binary"):
        return torch.as_tensor(y.y, dtype=torch.long)
    return torch.as_tensor(np.asarray(y.y, np.float32))


class TorchHead(Head):
    """A head whose network reads one flat vector: standardised modalities (zeros where absent) + masks."""

    supports = frozenset({"single", "multi", "binary", "va"})
    stacked: bool = False  # trains through heads._stacked (a stack of one), so sweeps of it are vectorised

    def _network(self, in_dim: int, out_dim: int):
        raise NotImplementedError

    # ---- inputs --------------------------------------------------------------------
    def _flat(self, X: Features) -> np.ndarray:
        parts, masks = [], []
        for mod, (arr, mask) in align(X, self.meta_["dims"]).items():
            mean, std = self.norm_[f"{mod}.mean"], self.norm_[f"{mod}.std"]
            parts.append(np.where(mask[:, None], (arr - mean) / std, 0).astype(np.float32))
            masks.append(mask.astype(np.float32)[:, None])
        return np.concatenate(parts + masks, 1)

    def _fit_norm(self, X: Features) -> None:
        self.norm_ = {}
        for mod, (arr, mask) in align(X, X.dims()).items():
            rows = arr[mask] if mask.any() else arr[:1] * 0
            self.norm_[f"{mod}.mean"] = rows.mean(0).astype(np.float32)
            self.norm_[f"{mod}.std"] = (rows.std(0) + 1e-6).astype(np.float32)

    def _tensors(self, X: Features, y: Targets | None = None) -> TensorSet:
        import torch

        t = {"x": torch.from_numpy(self._flat(X))}
        if y is not None:
            t["y"] = _target_tensor(y)
        return TensorSet(t, len(X))

    # ---- contract ------------------------------------------------------------------
    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "TorchHead":
        if self.stacked:
            from ._stacked import fit_heads

            fit_heads([self], X, y, eval_set=eval_set)
            return self
        _check_kind(self, y)
        if not len(y):
            raise ConfigError(f"head {self.name!r}: no training items")
        self._set_meta(X, y)
        self._fit_norm(X)
        device = pick_device(self.device)
        n_out = y.n_outputs
        train = self._tensors(X, y)
        val_score = self._val_scorer(eval_set, y.kind, device)

        with seeded(self.seed, device):
            self.net_ = self._network(train.tensors["x"].shape[1], n_out).to(device)
            self.history_ = train_loop(self.net_, lambda m, b: task_loss(m(b["x"]), b["y"], y.kind), train,
                                       params=self._loop_params(), device=device, val_score=val_score)
        self.net_ = self.net_.cpu()
        return self

    def _val_scorer(self, eval_set: tuple[Features, Targets] | None, kind: str, device):
        """model -> validation score on the flat inputs of `eval_set`; None without one."""
        if eval_set is None:
            return None
        Xv, yv = eval_set
        self._check_features(Xv)
        vx = self._tensors(Xv).tensors["x"].to(device)
        score = validation_scorer(self, yv, kind)
        return lambda model: score(scores_from_outputs(model(vx), kind))

    def _loop_params(self) -> TorchParams:
        return TorchParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TorchParams)})

    def predict_proba(self, X: Features) -> np.ndarray:
        import torch

        self._check_features(X)
        x = torch.from_numpy(self._flat(X))
        self.net_.eval()
        with torch.no_grad():
            out = torch.cat([self.net_(x[i:i + 4096]) for i in range(0, len(x), 4096)]) if len(x) else \
                self.net_(x)
        return scores_from_outputs(out, self.meta_["kind"])

    def _state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}
        return {**state, **{f"norm.{k}": v for k, v in self.norm_.items()}}

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        import torch

        self.norm_ = {k[5:]: v for k, v in state.items() if k.startswith("norm.")}
        in_dim = sum(meta["dims"].values()) + len(meta["dims"])
        n_out = 2 if meta["kind"] == "va" else len(meta["classes"])
        self.net_ = self._network(in_dim, n_out)
        self.net_.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                   if k.startswith("net.")})
        self.net_.eval()


def _check_kind(head: Head, y: Targets) -> None:
    if y.kind not in head.supports:
        raise ConfigError(f"head {head.name!r} does not train {y.kind!r} targets; it supports "
                          f"{sorted(head.supports)}")
