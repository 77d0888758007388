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

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["StackSpec", "group_key", "train_stack", "fit_heads"]

BETAS = (0.9, 0.999)
EPS = 1e-8


class StackSpec:
    """Per-configuration hyperparameters of one stack (lists of length C)."""

    def __init__(self, lr: Sequence[float], weight_decay: Sequence[float], dropout: Sequence[float],
                 epochs: Sequence[int], patience: Sequence[int]):
        self.lr, self.weight_decay, self.dropout = list(lr), list(weight_decay), list(dropout)
        self.epochs, self.patience = list(epochs), list(patience)
        self.n = len(self.lr)


def _stacked_task_loss(out, y, kind: str):
    """Per-configuration loss `[C]` of outputs `[C, B, K]` against shared targets (as `task_loss`)."""
    import torch.nn.functional as F

    out = out.float()
    C, B, K = out.shape
    if kind in ("single", "binary"):
        ce = F.cross_entropy(out.reshape(C * B, K), y.repeat(C), reduction="none")
        return ce.view(C, B).mean(1)
    if kind == "multi":
        return F.binary_cross_entropy_with_logits(out, y.expand(C, B, K), reduction="none").mean((1, 2))
    known = ~y.isnan()
    err = (out - y.nan_to_num()) ** 2 * known
    return err.sum((1, 2)) / known.sum().clamp(min=1)


class _Stack:
    """Stacked parameters, their AdamW state, and the forward pass."""

    def __init__(self, layers: list[tuple[Any, Any]], C: int, device):
        import torch

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
        import torch
        import torch.nn.functional as F

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
        import torch

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
                device, val_score: Callable[[Any], list[float]] | None = None, amp: Callable[[], Any] | None = None
                ) -> tuple[list[list[tuple[Any, Any]]], list[dict]]:
    """Train C = spec.n configurations from the same initial `layers` on shared data.

    `layers`: [(weight [out, in], bias [out])] of the initial network (as nn.Linear keeps them).
    `x` `[N, D]`, `y` the targets as tensors; `val_score(outputs [C', Nv, K]) -> C' scores` for the
    configurations still in the stack. Returns, per configuration, its best layers and its history.
    """
    import contextlib

    import torch

    from ._data import TensorSet

    C = spec.n
    amp = amp or contextlib.nullcontext
    stack = _Stack(layers, C, device)
    data = TensorSet({"x": x, "y": y}, len(x)).to(device)
    gen = torch.Generator().manual_seed(seed)

    def draws(shape):
        return torch.rand(shape, generator=gen).to(device)

    stop = StackStopping(spec.epochs, spec.patience)
    as_t = lambda vals: torch.tensor([vals[c] for c in stop.active], dtype=torch.float32, device=device)  # noqa: E731
    lr, wd, keep = as_t(spec.lr), as_t(spec.weight_decay), as_t([1 - d for d in spec.dropout])
    has_dropout = len(layers) > 1
    for epoch in range(max(spec.epochs)):
        total = torch.zeros(len(stop.active), dtype=torch.float64, device=device)
        count = 0
        for batch in data.batches(batch_size, shuffle=True, generator=gen):
            with amp():
                out = stack.forward(batch["x"], keep if has_dropout else None, draws if has_dropout else None)
                losses = _stacked_task_loss(out, batch["y"], kind)
            losses.sum().backward()
            stack.adamw(lr, wd)
            nb = len(batch["x"])
            total += losses.detach().double() * nb
            count += nb
        losses_now = (total / max(count, 1)).tolist()
        scores = None
        if val_score is not None:
            with torch.no_grad(), amp():
                scores = [float(s) for s in val_score(lambda v: stack.forward(v))]
        done = stop.end_epoch(epoch, losses_now, scores, stack.config_layers)
        if done:
            stay = stop.retire(done)
            if not stay:
                break
            idx = torch.tensor(stay, dtype=torch.long, device=device)
            stack.keep(idx)
            lr, wd, keep = lr[idx], wd[idx], keep[idx]
    return stop.finish()


def adamw_update(p, g, m, v, lr, wd, bc1: float, bc2_sqrt: float) -> None:
    """torch.optim.AdamW's update (amsgrad off) of one stacked tensor in place, with `lr` and `wd`
    shaped to broadcast one value per configuration. Shared by both stacked engines."""
    b1, b2 = BETAS
    p.mul_(1 - lr * wd)
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = v.sqrt().div_(bc2_sqrt).add_(EPS).mul_(bc1 / lr)  # step size lr / bc1 folded in
    p.addcdiv_(m, denom, value=-1.0)


class StackStopping:
    """Per-configuration histories, best snapshots and early stopping for a stack of configurations.

    `active` maps stack positions to configuration indices; a configuration that stops leaves the
    stack (`retire`), so the others train on unchanged. Shared by both stacked engines.
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
            if self.best_state[self.active[pos]] is None:  # no validation: the last weights
                self.best_state[self.active[pos]] = snapshot(pos)
        return done

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
    import torch

    if hs and hasattr(type(hs[0]), "fit_stack"):
        return type(hs[0]).fit_stack(list(hs), X, y, eval_set=eval_set, log=log)

    from ._torch import _check_kind, _target_tensor, autocast, pick_device, scores_from_outputs, seeded, \
        validation_scorer
    from featurestore.errors import ConfigError

    if not hs:
        return []
    first = hs[0]
    for h in hs:
        _check_kind(h, y)
    if not len(y):
        raise ConfigError(f"head {first.name!r}: no training items")
    first._set_meta(X, y)
    first._fit_norm(X)
    for h in hs[1:]:
        h._set_meta(X, y)
        h.norm_ = first.norm_
    x_np = first._flat(X)
    y_t = _target_tensor(y)
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
            score = validation_scorer(first, yv, y.kind)

            def val_score(forward, vx=vx):
                out = torch.cat([forward(vx[i:i + 8192]) for i in range(0, len(vx), 8192)], 1) if len(vx) \
                    else forward(vx)
                return [score(scores_from_outputs(out[c], y.kind)) for c in range(out.shape[0])]

        if log:
            log(f"training a stack of {len(members)} {lead.name} configuration(s) {key[1:]}")
        best, hist = train_stack(layers, spec, x, y_t, y.kind, batch_size=lead.batch_size, seed=lead.seed,
                                 device=device, val_score=val_score, amp=lambda d=device: autocast(d))
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
    return list(hs)
