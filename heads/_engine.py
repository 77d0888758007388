"""The one training skeleton every torch head runs on, and the pieces the engines share.

`run_epochs` is the loop: epochs of seeded mini-batches, a `step` that trains the C
configurations still in play on one batch, a validation score per configuration after each
epoch, early stopping with best-weights snapshots (`StackStopping`), and configurations leaving
the stack when they stop. Three engines plug into it:

- `heads._torch.train_loop`: one `nn.Module` with `torch.optim.AdamW` (C = 1);
- `heads._stacked.train_stack`: mlp/linear layers stacked by hand (C configurations, one GEMM);
- `heads._vmapped.train_vmapped`: any module under `torch.func.vmap` (univa, concept).

Both stacked engines write AdamW out (`adamw_update`), vectorised over configurations; a test
checks it step by step against `torch.optim.AdamW`.

Also here: device choice, seeding that leaves the caller's RNG as it was, autocast, the task
losses and the validation scorer that early stopping maximises.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from featurestore.errors import ConfigError

from .base import Head, Targets, best_threshold

__all__ = ["BETAS", "EPS", "pick_device", "seeded", "autocast", "task_loss", "scores_from_outputs",
           "validation_scorer", "check_kind", "target_tensor", "adamw_update", "StackStopping", "run_epochs",
           "EpochEnd", "on_epoch", "notify_epoch"]

BETAS = (0.9, 0.999)
EPS = 1e-8


def pick_device(pref: str = "auto") -> torch.device:
    from featurestore.devices import check_device

    pref = check_device(pref, "device")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(pref)
    except RuntimeError:
        raise ConfigError(f"device {pref!r} is not a device; use auto, cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {pref!r} is not supported; use auto, cpu or cuda[:N]")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {pref!r} asked for, but torch sees no GPU; use device=auto or cpu")
    return dev


@contextlib.contextmanager
def seeded(seed: int, device: Any = None) -> Iterator[None]:
    """Run a block with torch's RNG seeded, restoring the caller's RNG state afterwards."""
    devices = [device.index or 0] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def autocast(device: Any):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def task_loss(out, y, kind: str):
    """Cross-entropy (single/binary), BCE (multi), or MSE over known VA values.

    `out` `[B, K]` gives a scalar; `[C, B, K]` (C configurations, shared `y`) gives `[C]`."""
    out = out.float()
    lead = out.shape[:-2]
    if kind in ("single", "binary"):
        ce = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.repeat(int(np.prod(lead or (1,)))),
                             reduction="none")
        return ce.view(*lead, -1).mean(-1)
    if kind == "multi":
        return F.binary_cross_entropy_with_logits(out, y.expand_as(out), reduction="none").mean((-2, -1))
    known = ~y.isnan()
    err = (out - y.nan_to_num()) ** 2 * known
    return err.sum((-2, -1)) / known.sum().clamp(min=1)


def scores_from_outputs(out, kind: str) -> np.ndarray:
    out = out.float()
    if kind in ("single", "binary"):
        out = torch.softmax(out, -1)
    elif kind == "multi":
        out = torch.sigmoid(out)
    return out.cpu().numpy().astype(np.float64)


def validation_scorer(head: Head, yv: Targets, kind: str) -> Callable[[np.ndarray], float]:
    """Scores -> the validation metric that early stopping maximises (a NaN metric ranks last).

    Multi-label: at the head's configured threshold, or, with `auto`, at the best threshold of
    the grid, so early stopping judges each epoch as the final decision will be made."""
    from . import metrics

    threshold = head.configured_threshold() if kind == "multi" else None
    force_top = bool(getattr(head, "force_top", False))

    def score(proba: np.ndarray) -> float:
        if kind == "multi" and threshold is None:
            s = best_threshold(proba, yv, force_top)[1]
        else:
            s = metrics.primary(yv, head.decide(proba, kind, threshold or 0.5, force_top), proba)
        return -1e9 if math.isnan(s) else s
    return score


def check_kind(head: Head, y: Targets) -> None:
    if y.kind not in head.supports:
        raise ConfigError(f"head {head.name!r} does not train {y.kind!r} targets; it supports "
                          f"{sorted(head.supports)}")
    if not len(y):
        raise ConfigError(f"head {head.name!r}: no training items")


def target_tensor(y: Targets):
    if y.kind in ("single", "binary"):
        return torch.as_tensor(y.y, dtype=torch.long)
    return torch.as_tensor(np.asarray(y.y, np.float32))


def adamw_update(p, g, m, v, lr, wd, bc1: float, bc2_sqrt: float) -> None:
    """torch.optim.AdamW's update (amsgrad off) of one stacked tensor in place, with `lr` and `wd`
    shaped to broadcast one value per configuration."""
    b1, b2 = BETAS
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().div_(bc2_sqrt).add_(EPS).mul_(bc1 / lr)  # step size lr / bc1 folded in
    p.addcdiv_(m, denom, value=-1.0)


class StackStopping:
    """Per-configuration histories, best snapshots and early stopping for a stack of configurations.

    `active` maps stack positions to configuration indices; a configuration that stops leaves the
    stack (`retire`), so the others train on unchanged.
    """

    def __init__(self, epochs: Sequence[int], patience: Sequence[int]):
        n = len(epochs)
        self.epochs, self.patience = list(epochs), list(patience)
        self.active = list(range(n))
        self.histories: list[dict] = [{"train_loss": [], "val_score": []} for _ in range(n)]
        self.best = [-math.inf] * n
        self.best_state: list[Any] = [None] * n
        self.since = [0] * n

    def end_epoch(self, epoch: int, losses: Sequence[float], scores: Sequence[float] | None,
                  snapshot: Callable[[int], Any]) -> list[int]:
        """Record an epoch; return the stack positions whose configuration is done."""
        done = []
        for pos, c in enumerate(self.active):
            h = self.histories[c]
            h["train_loss"].append(losses[pos])
            if scores is not None:
                h["val_score"].append(scores[pos])
                if scores[pos] > self.best[c] or self.best_state[c] is None:
                    self.best[c], self.best_state[c], self.since[c] = scores[pos], snapshot(pos), 0
                    h["best_epoch"] = epoch + 1
                else:
                    self.since[c] += 1
                    if self.patience[c] and self.since[c] >= self.patience[c]:
                        done.append(pos)
                        continue
            if epoch + 1 >= self.epochs[c]:
                done.append(pos)
        for pos in done:
            if scores is None:  # no validation: the last weights
                self.best_state[self.active[pos]] = snapshot(pos)
        return done

    def end_epoch_all_done(self, snapshot: Callable[[int], Any], no_validation: bool) -> None:
        """Every configuration stops now (a schedule ran out): without validation, keep the last weights."""
        if no_validation:
            for pos, c in enumerate(self.active):
                self.best_state[c] = snapshot(pos)

    def retire(self, done: Sequence[int]) -> list[int]:
        """Drop finished positions; return the positions that stay (empty: all done)."""
        gone = set(done)
        stay = [p for p in range(len(self.active)) if p not in gone]
        self.active = [self.active[p] for p in stay]
        return stay

    def finish(self) -> tuple[list, list[dict]]:
        for h in self.histories:
            h["epochs_run"] = len(h["train_loss"])
        return self.best_state, self.histories


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """What a finished epoch reports to an `on_epoch` listener (a job's progress bar)."""

    epoch: int  # 1-based
    epochs: int  # the most epochs this training may run
    configs: int  # configurations still training
    loss: float  # the lowest mean training loss over them
    val: float | None = None  # the best validation score (higher is better), when there is one
    stage: str = ""  # a head with stages names the one running


_EPOCH_LISTENER: contextvars.ContextVar = contextvars.ContextVar("featurestore_epoch_listener", default=None)


@contextlib.contextmanager
def on_epoch(listener: Callable[[EpochEnd], None] | None):
    """Within the block, every training loop calls `listener(EpochEnd)` after each epoch.

    Heads never print: a job that wants progress passes its callback down this way."""
    token = _EPOCH_LISTENER.set(listener)
    try:
        yield
    finally:
        _EPOCH_LISTENER.reset(token)


def notify_epoch(epoch: int, epochs: int, configs: int, loss: float, val: float | None = None, stage: str = "") -> None:
    listener = _EPOCH_LISTENER.get()
    if listener is not None:
        listener(EpochEnd(epoch, epochs, configs, loss, val, stage))


def run_epochs(data, *, batch_size: int, generator, stop: StackStopping,
               step: Callable[[dict], Any], snapshot: Callable[[int], Any],
               validate: Callable[[list[int]], Sequence[float]] | None = None,
               shrink: Callable[[Any], None] | None = None, after_epoch: Callable[[], bool] | None = None,
               log: Callable[[str], None] | None = None) -> tuple[list, list[dict]]:
    """The training skeleton: epochs of shuffled mini-batches of the TensorSet `data`.

    `step(batch) -> [C']` trains the configurations still in the stack on one batch (forward,
    backward, optimiser) and returns their losses; `validate(active) -> C'` scores after each
    epoch (higher is better); `snapshot(pos)` copies position pos's weights; `shrink(idx)` keeps
    only the stack positions `idx` (a LongTensor) when others stop; `after_epoch() -> True` stops
    every configuration (a learning-rate schedule that has run out). Returns, per configuration,
    its best snapshot and its history.
    """
    for epoch in range(max(stop.epochs)):
        total, count = None, 0
        for batch in data.batches(batch_size, shuffle=True, generator=generator):
            losses = step(batch).detach().double().reshape(-1)
            nb = len(next(iter(batch.values())))
            total = losses * nb if total is None else total + losses * nb
            count += nb
        losses_now = (total / max(count, 1)).tolist() if total is not None else [math.nan] * len(stop.active)
        scores = None
        if validate is not None:
            with torch.no_grad():
                scores = [float(s) for s in validate(list(stop.active))]
        notify_epoch(epoch + 1, max(stop.epochs), len(stop.active), min(losses_now),
                     max(scores) if scores else None)
        if log:
            best = f", best val {max(scores):.4f}" if scores else ""
            log(f"epoch {epoch + 1}/{max(stop.epochs)}: {len(stop.active)} configuration(s), "
                f"train loss {min(losses_now):.4f}{best}")
        done = stop.end_epoch(epoch, losses_now, scores, snapshot)
        if after_epoch is not None and after_epoch():
            done = list(range(len(stop.active)))
            stop.end_epoch_all_done(snapshot, scores is None)
        if done:
            stay = stop.retire(done)
            if not stay:
                break
            if shrink is not None:
                shrink(torch.tensor(stay, dtype=torch.long))
    return stop.finish()
