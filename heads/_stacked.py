"""A stacked trainer: C configurations of one network shape trained at once, as one batched model.

The `mlp` and `linear` heads train through this engine even alone (C=1), so a configuration in a
sweep and the same configuration trained by itself are the same computation up to the order of
float summation inside the matrix products:

- Weights are stacked per configuration. The first layer's weight is kept as `[D, C, H]`, so the
  shared input batch `[B, D]` meets all C configurations in one GEMM (`[B, D] x [D, C*H]`); later
  layers are `[C, H, H']`, one batched GEMM each.
- Each configuration's network is initialised by the head's own `_network` under
  `torch.manual_seed(seed)`, exactly as a solo head is, and configurations are grouped by
  (seed, batch size, shape, device): a group shares one shuffle generator, so one shuffle order.
- Dropout draws one uniform tensor `U` `[B, H]` per layer per step from the group's generator;
  configuration c keeps `U < keep_c` and scales by `1/keep_c`. A solo run draws the same `U`.
- AdamW is written out here, vectorised over C with per-configuration learning rate and weight
  decay, following `torch.optim.AdamW`'s update (decoupled decay, bias-corrected moments).
- Early stopping on the head's validation score (`metrics.primary`) is per configuration, with
  its best weights restored; a configuration that stops (patience or its own `epochs`) leaves the
  stack, and the others go on unchanged (the shared draws do not depend on who is still in it).

The loss summed over configurations has, per configuration, exactly that configuration's
gradient, so one backward pass serves all of them.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F


from ._data import TensorSet
from ._engine import (BETAS, StackStopping, adamw_update, autocast, check_kind, pick_device, run_epochs,
                      scores_from_outputs, seeded, target_tensor, task_loss, validation_scorer)

__all__ = ["StackSpec", "group_key", "train_stack", "fit_heads"]


class StackSpec:
    """Per-configuration hyperparameters of one stack (lists of length C)."""

    def __init__(self, lr: Sequence[float], weight_decay: Sequence[float], dropout: Sequence[float],
                 epochs: Sequence[int], patience: Sequence[int]):
        self.lr, self.weight_decay, self.dropout = list(lr), list(weight_decay), list(dropout)
        self.epochs, self.patience = list(epochs), list(patience)
        self.n = len(self.lr)


class _Stack:
    """Stacked parameters, their AdamW state, and the forward pass."""

    def __init__(self, layers: list[tuple[Any, Any]], C: int, device):
        self.params = []  # [(weight, bias)], weight 0: [D, C, H], others: [C, in, out]; bias: [C, out]
        for i, (w, b) in enumerate(layers):  # w: [out, in] as nn.Linear keeps it
            wt = w.detach().t().to(device)
            if i == 0:
                W = wt.unsqueeze(1).repeat(1, C, 1).contiguous()
            else:
                W = wt.unsqueeze(0).repeat(C, 1, 1).contiguous()
            B = b.detach().to(device).unsqueeze(0).repeat(C, 1).contiguous()
            self.params.append((W.requires_grad_(), B.requires_grad_()))
        self.exp_avg = [torch.zeros_like(p) for pair in self.params for p in pair]
        self.exp_avg_sq = [torch.zeros_like(p) for pair in self.params for p in pair]
        self.step = 0

    @property
    def flat(self) -> list:
        return [p for pair in self.params for p in pair]

    @staticmethod
    def _axis(index: int) -> int:
        return 1 if index == 0 else 0  # the first weight keeps configurations on axis 1

    def keep(self, idx) -> None:
        """Keep only the configurations at positions `idx` (a LongTensor)."""
        def sel(t, axis):
            return t.detach().index_select(axis, idx).contiguous()

        new = []
        for i, (W, B) in enumerate(self.params):
            new.append((sel(W, self._axis(2 * i)).requires_grad_(), sel(B, 0).requires_grad_()))
        self.params = new
        self.exp_avg = [sel(t, self._axis(j)) for j, t in enumerate(self.exp_avg)]
        self.exp_avg_sq = [sel(t, self._axis(j)) for j, t in enumerate(self.exp_avg_sq)]

    def config_layers(self, c: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Configuration c's layers as nn.Linear keeps them: (weight [out, in], bias [out])."""
        out = []
        for i, (W, B) in enumerate(self.params):
            w = W[:, c] if i == 0 else W[c]
            out.append((w.detach().t().cpu().clone(), B[c].detach().cpu().clone()))
        return out

    def forward(self, x, keep=None, draws: Callable[[tuple], Any] | None = None):
        """x `[B, D]` shared -> outputs `[C, B, K]`; `keep` `[C]` and `draws` enable dropout."""
        Bn = x.shape[0]
        n = len(self.params)
        W0, b0 = self.params[0]
        D, C, H = W0.shape
        h = (x @ W0.view(D, C * H)).view(Bn, C, H) + b0  # one GEMM for all configurations
        if n == 1:
            return h.transpose(0, 1)
        h = F.gelu(h)
        if draws is not None:
            U = draws((Bn, H))
            k = keep.view(1, C, 1)
            h = h * torch.where(U.unsqueeze(1) < k, 1 / k, 0.0)
        h = h.transpose(0, 1)  # [C, B, H]
        for i in range(1, n):
            W, b = self.params[i]
            h = torch.baddbmm(b.unsqueeze(1), h, W)
            if i == n - 1:
                return h
            h = F.gelu(h)
            if draws is not None:
                U = draws((Bn, h.shape[-1]))
                k = keep.view(C, 1, 1)
                h = h * torch.where(U.unsqueeze(0) < k, 1 / k, 0.0)
        return h

    def adamw(self, lr, wd) -> None:
        """One AdamW step (torch.optim.AdamW's math, amsgrad off), per-configuration lr and weight decay `[C]`."""
        self.step += 1
        b1, b2 = BETAS
        bc1 = 1 - b1 ** self.step
        bc2_sqrt = math.sqrt(1 - b2 ** self.step)
        with torch.no_grad():
            for j, p in enumerate(self.flat):
                g = p.grad
                shape = [1] * p.dim()
                shape[self._axis(j)] = -1
                adamw_update(p, g, self.exp_avg[j], self.exp_avg_sq[j], lr.view(shape), wd.view(shape),
                             bc1, bc2_sqrt)
                p.grad = None


def train_stack(layers: list[tuple[Any, Any]], spec: StackSpec, x, y, kind: str, *, batch_size: int, seed: int,
                device, val_score: Callable[[Any], list[float]] | None = None, amp: Callable[[], Any] | None = None,
                log: Callable[[str], None] | None = None) -> tuple[list[list[tuple[Any, Any]]], list[dict]]:
    """Train C = spec.n configurations from the same initial `layers` on shared data (`run_epochs`).

    `layers`: [(weight [out, in], bias [out])] of the initial network (as nn.Linear keeps them).
    `x` `[N, D]`, `y` the targets as tensors; `val_score(forward, active) -> C' scores` for the
    configurations still in the stack (`active`: their indices), where `forward(x)` gives their
    outputs `[C', N, K]`.
    Returns, per configuration, its best layers and its history.
    """
    amp = amp or contextlib.nullcontext
    stack = _Stack(layers, spec.n, device)
    gen = torch.Generator().manual_seed(seed)
    stop = StackStopping(spec.epochs, spec.patience)
    hyper = {"lr": torch.tensor(spec.lr, dtype=torch.float32, device=device),
             "wd": torch.tensor(spec.weight_decay, dtype=torch.float32, device=device),
             "keep": torch.tensor([1 - d for d in spec.dropout], dtype=torch.float32, device=device)}
    dropout = len(layers) > 1

    def draws(shape):
        return torch.rand(shape, generator=gen).to(device)

    def step(batch):
        with amp():
            out = stack.forward(batch["x"], hyper["keep"] if dropout else None, draws if dropout else None)
            losses = task_loss(out, batch["y"], kind)
        losses.sum().backward()
        stack.adamw(hyper["lr"], hyper["wd"])
        return losses

    def validate(active):
        with amp():
            return val_score(lambda v: stack.forward(v), active)

    def shrink(idx):
        idx = idx.to(device)
        stack.keep(idx)
        for k in hyper:
            hyper[k] = hyper[k][idx]

    return run_epochs(TensorSet({"x": x, "y": y}, len(x)).to(device), batch_size=batch_size, generator=gen,
                      stop=stop, step=step, snapshot=stack.config_layers,
                      validate=validate if val_score is not None else None, shrink=shrink, log=log)


# ---- heads -------------------------------------------------------------------------
def group_key(head) -> tuple:
    """Configurations that can share a stack: same seed, batch size, network shape and device.

    A head with its own `stack_key` (`univa`, trained by `heads._vmapped`) says itself.
    """
    if hasattr(head, "stack_key"):
        return head.stack_key()
    shape = tuple(getattr(head, k, None) for k in ("hidden", "layers"))
    return (type(head).__name__, int(head.seed), int(head.batch_size), shape, str(head.device))


def fit_heads(hs: Sequence[Any], X, y, *, eval_set=None, log: Callable[[str], None] | None = None) -> list[Any]:
    """Fit stackable torch heads (`mlp`, `linear`) on the same data, one stack per `group_key`.

    Every head ends fitted as if `head.fit(X, y, eval_set=eval_set)` had run alone: same `norm_`,
    `net_`, `history_` and `meta_`. Returns the heads. Heads with their own stacked fit
    (`fit_stack`: `univa`) go through it.
    """
    if hs and hasattr(type(hs[0]), "fit_stack"):
        return type(hs[0]).fit_stack(list(hs), X, y, eval_set=eval_set, log=log)
    if not hs:
        return []
    first = hs[0]
    for h in hs:
        check_kind(h, y)
    first._set_meta(X, y)
    first._fit_norm(X)
    for h in hs[1:]:
        h._set_meta(X, y)
        h.norm_ = first.norm_
    x_np = first._flat(X)
    y_t = target_tensor(y)
    vx_np = None
    if eval_set is not None:
        Xv, yv = eval_set
        first._check_features(Xv)
        vx_np = first._flat(Xv)
    groups: dict[tuple, list[int]] = {}
    for i, h in enumerate(hs):
        groups.setdefault(group_key(h), []).append(i)
    for key, members in groups.items():
        lead = hs[members[0]]
        device = pick_device(lead.device)
        x = torch.from_numpy(x_np)
        with seeded(lead.seed, device):
            net = lead._network(x.shape[1], y.n_outputs)
        linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
        layers = [(m.weight, m.bias) for m in linears]
        members_h = [hs[i] for i in members]
        spec = StackSpec([h.lr for h in members_h], [h.weight_decay for h in members_h],
                         [getattr(h, "dropout", 0.0) for h in members_h], [h.epochs for h in members_h],
                         [h.patience for h in members_h])
        val_score = None
        if vx_np is not None:
            vx = torch.from_numpy(vx_np).to(device)
            scorers = [validation_scorer(h, yv, y.kind) for h in members_h]

            def val_score(forward, active, vx=vx, scorers=scorers):
                out = torch.cat([forward(vx[i:i + 8192]) for i in range(0, len(vx), 8192)], 1) if len(vx) \
                    else forward(vx)
                return [scorers[c](scores_from_outputs(out[pos], y.kind))
                        for pos, c in enumerate(active)]

        if log:
            log(f"training a stack of {len(members)} {lead.name} configuration(s) (seed {lead.seed}, batch size {lead.batch_size})")
        best, hist = train_stack(layers, spec, x, y_t, y.kind, batch_size=lead.batch_size, seed=lead.seed,
                                 device=device, val_score=val_score, amp=lambda d=device: autocast(d), log=log)
        for h, layers_c, h_hist in zip(members_h, best, hist):
            with seeded(h.seed):  # the caller's global RNG is left as it was
                net_c = h._network(x.shape[1], y.n_outputs)
            with torch.no_grad():
                for mod, (w, b) in zip([m for m in net_c.modules() if isinstance(m, torch.nn.Linear)], layers_c):
                    mod.weight.copy_(w)
                    mod.bias.copy_(b)
            net_c.eval()
            h.net_ = net_c
            h.history_ = h_hist
            h.settle_decision(eval_set)
    return list(hs)
