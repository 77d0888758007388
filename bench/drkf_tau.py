"""How `drkf`'s learnt temperature and L_c move during training, with eq. 14-15 as implemented (the
positive in the denominator) or as printed (`--printed`: the positive left out, which has no lower
bound as tau shrinks). A small synthetic two-modality task; one CPU thread; about 20 s.

    .venv/bin/python bench/drkf_tau.py            # tau and L_c at five points of training
    .venv/bin/python bench/drkf_tau.py --printed  # the printed denominators
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import featurestore.heads as heads
import featurestore.heads.drkf as D
from featurestore.heads import Features, Targets


def printed_cmie(zA, zA_aug, zB, zB_aug, tau):
    """Eq. 14-17 exactly as printed: eq. 14-15's denominators over the cross-modal k != i only."""
    n = len(zA)
    if n < 2:
        return zA.sum() * 0
    off = ~torch.eye(n, dtype=torch.bool, device=zA.device)

    def one(z, same, other):
        pos = D._cos(z, same).diagonal() / tau
        return torch.logsumexp((D._cos(z, other) / tau).masked_fill(~off, float("-inf")), 1) - pos

    joint = D._cos(zA, zB) / tau
    return (one(zA, zA_aug, zB_aug) + one(zB, zB_aug, zA_aug) + torch.logsumexp(joint, 1) - joint.diagonal()).mean()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--printed", action="store_true", help="eq. 14-15 as printed (no positive in the denominator)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=90)
    ap.add_argument("--beta", type=float, default=0.2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 4, n)
    text = [rng.normal(size=(int(rng.integers(1, 6)), 16)).astype(np.float32) + y[i] * 0.5 for i in range(n)]
    audio = [rng.normal(size=(int(rng.integers(1, 6)), 8)).astype(np.float32) for _ in range(n)]
    X = Features({"text": np.stack([s.mean(0) for s in text]), "audio": np.stack([s.mean(0) for s in audio])}, {},
                 sequences={"text": text, "audio": audio})
    log: list[tuple[float, float]] = []
    loss = printed_cmie if args.printed else D.cmie_paper

    def recorded(*a):
        out = loss(*a)
        log.append((float(a[-1].detach()), float(out.detach())))
        return out

    D.cmie_paper = recorded
    heads.create("drkf", epochs=args.epochs, batch_size=32, lr=args.lr, hidden=32, heads=2, proj=16, ae_width=16,
                 ae_blocks=2, patience=0, dropout=0.1, beta=args.beta).fit(X, Targets("single", y, list("abcd")))
    for i in sorted({0, len(log) // 4, len(log) // 2, 3 * len(log) // 4, len(log) - 1}):
        print(f"step {i}: tau {log[i][0]:.4f}  L_c {log[i][1]:.3f}")


if __name__ == "__main__":
    main()
