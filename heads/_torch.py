"""Torch heads: the fields they share, the one-module training loop, and heads on a flat input.

Seeded and deterministic on CPU (training runs under `torch.random.fork_rng`, so it neither
reads nor changes the caller's global RNG); AdamW; early stopping on a validation score
with the best weights restored; CUDA with bfloat16 autocast when torch sees a GPU. The loop
itself is `heads._engine.run_epochs`, shared by every engine.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np
import torch

from featurestore.config import field
from featurestore.errors import ConfigError

from .base import Features, Head, Targets
from ._data import TensorSet, align
from ._engine import (StackStopping, autocast, check_kind, pick_device, run_epochs, scores_from_outputs, seeded,
                      target_tensor, task_loss, validation_scorer)
from ._stacked import fit_heads

__all__ = ["TorchParams", "Plateau", "pick_device", "seeded", "autocast", "train_loop", "TorchHead", "task_loss",
           "scores_from_outputs", "validation_scorer"]

_check_kind = check_kind  # the name heads used before the engines shared one module
_target_tensor = target_tensor


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
        bad = [msg for ok, msg in ((0 < self.lr < math.inf, f"lr={self.lr} must be a finite number > 0"),
                                   (0 <= self.weight_decay < math.inf,
                                    f"weight_decay={self.weight_decay} must be a finite number >= 0"),
                                   (self.patience >= 0, f"patience={self.patience} must be >= 0")) if not ok]
        if bad:
            raise ConfigError("; ".join(bad))
        from featurestore.devices import check_device

        check_device(self.device, "device")  # a bad -p device= fails before any data is read
        getattr(super(), "__post_init__", lambda: None)()  # a config that also takes DecisionParams


@dataclasses.dataclass(frozen=True)
class Plateau:
    """ReduceLROnPlateau on a loss (lower is better), and stop once every learning rate is below `min_lr`."""

    factor: float = 0.6
    patience: int = 3
    min_lr: float = 1e-7


def train_loop(model, loss_fn: Callable[[Any, dict], Any], train: TensorSet, *, params: TorchParams, device,
               val_score: Callable[[Any], float] | None = None, log: Callable[[str], None] | None = None,
               plateau: Plateau | None = None, val_loss: Callable[[Any], float] | None = None,
               ema: float = 0.0, stop_when: Callable[[Any], bool] | None = None) -> dict:
    """Train one `model` with `torch.optim.AdamW` on mini-batch slices of `train` (`run_epochs`, C = 1);
    early-stop on `val_score(model)` (higher is better). `loss_fn(model, batch) -> scalar tensor`.
    With `plateau`, the learning rate follows torch's ReduceLROnPlateau on `val_loss(model)` (the
    epoch's training loss when there is none) and training stops once it falls below `plateau.min_lr`.
    With `ema` > 0, an exponential moving average of the trained parameters (decay min(ema, (1 + t) /
    (10 + t)) at step t) is what is validated, snapshotted and returned; the optimiser trains the live ones.
    `stop_when(model) -> bool`, called after each epoch (eval mode, the averaged weights), ends training
    when true, as a spent learning rate does.
    Returns the history; the model ends with its best weights, in eval mode."""
    live = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(live, lr=params.lr, weight_decay=params.weight_decay)
    sched = None if plateau is None else torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=plateau.factor, patience=plateau.patience, eps=0.0)  # eps 0: torch's default 1e-8
    # skips reductions smaller than it, so the lr stalled above a small min_lr (or a factor near 1) forever
    shadow = [p.detach().clone() for p in live] if ema > 0 else None
    updates = [0]

    def step(batch):
        model.train()
        with autocast(device):
            loss = loss_fn(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if shadow is not None:
            with torch.no_grad():
                decay = min(ema, (1 + updates[0]) / (10 + updates[0]))
                torch._foreach_lerp_(shadow, [p.detach() for p in live], 1.0 - decay)
            updates[0] += 1
        return loss.detach()

    @contextlib.contextmanager
    def averaged():
        """The averaged parameters in the model for the duration (nothing to do without `ema`)."""
        if shadow is None:
            yield
            return
        saved = [p.detach().clone() for p in live]
        with torch.no_grad():
            torch._foreach_copy_(live, shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(live, saved)

    def validate(active):
        model.eval()
        with averaged():
            return [val_score(model)]

    def snapshot(pos):
        with averaged():
            return copy.deepcopy(model.state_dict())

    stop = StackStopping([params.epochs], [params.patience])

    def lr_spent() -> bool:
        """One ReduceLROnPlateau step on the validation (else training) loss; True once every lr < min_lr."""
        history = stop.histories[0]
        if val_loss is not None:
            model.eval()
            with torch.no_grad(), averaged():
                loss = float(val_loss(model))
            history.setdefault("val_loss", []).append(loss)
        else:
            loss = history["train_loss"][-1]
        sched.step(loss)
        lrs = [g["lr"] for g in opt.param_groups]
        history.setdefault("lr", []).append(max(lrs))
        return max(lrs) < plateau.min_lr

    def after_epoch() -> bool:
        spent = lr_spent() if sched is not None else False
        if stop_when is None:
            return spent
        model.eval()
        with torch.no_grad(), averaged():
            return bool(stop_when(model)) or spent

    best, hist = run_epochs(train.to(device), batch_size=params.batch_size,
                            generator=torch.Generator().manual_seed(params.seed), stop=stop, step=step,
                            snapshot=snapshot,
                            validate=validate if val_score is not None else None,
                            after_epoch=after_epoch if sched is not None or stop_when is not None else None, log=log)
    if best[0] is not None:  # every epoch-end snapshot is of the averaged weights when there are any
        model.load_state_dict(best[0])
    model.eval()
    return hist[0]


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
        t = {"x": torch.from_numpy(self._flat(X))}
        if y is not None:
            t["y"] = target_tensor(y)
        return TensorSet(t, len(X))

    # ---- contract ------------------------------------------------------------------
    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "TorchHead":
        if self.stacked:
            fit_heads([self], X, y, eval_set=eval_set)
            return self
        check_kind(self, y)
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
        self.settle_decision(eval_set)
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
        self.norm_ = {k[5:]: v for k, v in state.items() if k.startswith("norm.")}
        in_dim = sum(meta["dims"].values()) + len(meta["dims"])
        n_out = 2 if meta["kind"] == "va" else len(meta["classes"])
        self.net_ = self._network(in_dim, n_out)
        self.net_.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                   if k.startswith("net.")})
        self.net_.eval()
