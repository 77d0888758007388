"""A vectorised trainer for heads whose network is any `nn.Module` (`univa`): C configurations at once.

Where `heads._stacked` writes the stacked layers out by hand (mlp, linear), this engine stacks an
arbitrary module's parameters along a leading configuration axis and runs the module's own
forward under `torch.func.vmap` (`functional_call` with the stacked parameters, the batch shared):

- One initialisation: the network is built once under `torch.manual_seed(seed)` (as a solo head
  does) and its parameters are repeated C times, so every configuration starts from the same weights.
- One shuffle: a generator seeded with the seed draws every epoch's order for the whole group.
- Dropout with `randomness="same"`: each dropout layer draws one mask per step from the global
  RNG (seeded by the seed), shared by all configurations, so a group must share its dropout rate
  (it is part of the head's stack key). The draws do not depend on C, so a stack of one draws
  exactly what a stack of C does.
- Losses per configuration (`losses_fn` returns `[C]`); their sum is backpropagated once, which
  gives each configuration exactly its own gradient.
- AdamW written out (torch.optim.AdamW's math: decoupled decay, bias-corrected moments, eps 1e-8,
  betas 0.9/0.999), vectorised with per-configuration learning rate and weight decay.
- Early stopping per configuration with its best weights kept; a configuration that stops leaves
  the stack (its slices are dropped), the others go on unchanged.

A head's solo `fit` goes through this engine with C=1, so a sweep's configuration and the same
configuration trained alone are the same computation up to float summation order.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Sequence

import torch
from torch.func import functional_call, vmap

from ._engine import BETAS, StackStopping, adamw_update, run_epochs

__all__ = ["VmapSpec", "train_vmapped"]


class VmapSpec:
    """Per-configuration optimiser and stopping settings (lists of length C)."""

    def __init__(self, lr: Sequence[float], weight_decay: Sequence[float], epochs: Sequence[int],
                 patience: Sequence[int]):
        self.lr, self.weight_decay = list(lr), list(weight_decay)
        self.epochs, self.patience = list(epochs), list(patience)
        self.n = len(self.lr)


def _math_attention(device) -> contextlib.AbstractContextManager:
    """CUDA's fused attention kernels (flash, memory-efficient, cuDNN) draw their dropout inside the
    kernel, which `vmap(randomness="same")` cannot batch ("Vmap does not currently support same
    randomness with a batched tensor input", seen on an H100). The math kernel draws it with
    `torch.dropout`, which vmap batches, as on the CPU, where the math kernel is what runs."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _adamw(params: dict, m: dict, v: dict, step: int, lr, wd) -> None:
    b1, b2 = BETAS
    bc1 = 1 - b1 ** step
    bc2_sqrt = math.sqrt(1 - b2 ** step)
    with torch.no_grad():
        for k, p in params.items():
            g = p.grad
            if g is None:
                continue
            shape = [-1] + [1] * (p.dim() - 1)
            adamw_update(p, g, m[k], v[k], lr.view(shape), wd.view(shape), bc1, bc2_sqrt)
            p.grad = None


def train_vmapped(net, spec: VmapSpec, train, *, batch_size: int, seed: int, device,
                  losses_fn: Callable[[Any, dict, list[int]], Any],
                  val_score: Callable[[Callable[[int], Any], list[int]], list[float]] | None = None,
                  amp: Callable[[], Any] | None = None, args_of: Callable[[dict], tuple] | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """Train C = spec.n configurations of `net` (already built and on `device`) on the TensorSet `train`.

    `losses_fn(forward, batch, active) -> [C']` per-configuration losses, where `forward(batch)` runs
    the network for the C' configurations still in the stack (outputs with a leading axis C') and
    `active` lists their configuration indices; `args_of(batch)` gives the network's forward
    arguments (default: the batch itself). `val_score(model_of, active) -> C' scores`, where
    `model_of(pos)` loads position pos's weights into `net` (eval mode) and returns it. Must run
    with the global RNG seeded (dropout draws from it). Returns per configuration its best
    state dict and its history (the loop is `heads._engine.run_epochs`).
    """
    amp = amp or contextlib.nullcontext
    args_of = args_of or (lambda batch: (batch,))
    names = [k for k, _ in net.named_parameters()]
    st = {"params": {k: p.detach().unsqueeze(0).repeat(spec.n, *[1] * p.dim()).contiguous().requires_grad_()
                     for k, p in net.named_parameters()},
          "buffers": {k: b.detach().unsqueeze(0).repeat(spec.n, *[1] * b.dim()).contiguous()
                      for k, b in net.named_buffers()}}
    st["m"] = {k: torch.zeros_like(p) for k, p in st["params"].items()}
    st["v"] = {k: torch.zeros_like(p) for k, p in st["params"].items()}
    st["lr"] = torch.tensor(spec.lr, dtype=torch.float32, device=device)
    st["wd"] = torch.tensor(spec.weight_decay, dtype=torch.float32, device=device)
    count = [0]
    batched = vmap(lambda p, b, args: functional_call(net, (p, b), args), in_dims=(0, 0, None), randomness="same")
    stop = StackStopping(spec.epochs, spec.patience)

    def forward(batch):
        net.train()
        with _math_attention(device):
            return batched(st["params"], st["buffers"], args_of(batch))

    def step(batch):
        with amp():
            losses = losses_fn(forward, batch, stop.active)
        losses.sum().backward()
        count[0] += 1
        _adamw(st["params"], st["m"], st["v"], count[0], st["lr"], st["wd"])
        return losses

    def model_of(pos: int):
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(st["params"][k][pos])
            for k, b in net.named_buffers():
                b.copy_(st["buffers"][k][pos])
        net.eval()
        return net

    def snapshot(pos: int) -> dict:
        state = {k: st["params"][k][pos].detach().cpu().clone() for k in names}
        state.update({k: b[pos].detach().cpu().clone() for k, b in st["buffers"].items()})
        return state

    def shrink(idx):
        idx = idx.to(device)
        with torch.no_grad():
            st["params"] = {k: p.detach().index_select(0, idx).contiguous().requires_grad_()
                            for k, p in st["params"].items()}
            for key in ("buffers", "m", "v"):
                st[key] = {k: t.index_select(0, idx).contiguous() for k, t in st[key].items()}
        st["lr"], st["wd"] = st["lr"][idx], st["wd"][idx]

    out = run_epochs(train.to(device), batch_size=batch_size, generator=torch.Generator().manual_seed(seed),
                     stop=stop, step=step, snapshot=snapshot, shrink=shrink, log=log,
                     validate=(lambda active: val_score(model_of, active)) if val_score is not None else None)
    net.eval()
    return out
