"""`drkf`: Decoupled Representations with Knowledge Fusion (paper 003, sections 3.3-3.4), from cached features.

Two modalities A and B (the feature set's, sorted: `audio` before `text`, as the paper puts speech
first), each a padded sequence `[N, L, d]` (a modality with pooled features only is a length-1
sequence). Per modality:

- f_AE, a residual autoencoder applied per step (`ae_blocks` blocks of
  d -> w -> w/2 -> w/4 -> w/2 -> w -> d, LeakyReLU encoder, ReLU decoder, the residual accumulating
  across blocks, then a transition MLP d -> d -> d): the augmented sequence, its mean the augmented CLS (eq. 8-9);
- g, a projection MLP d -> P -> P of the raw and the augmented CLS (eq. 13);
- an auxiliary classifier on the augmented CLS, for the KL term (eq. 11).

The fusion encoder (a transformer, `heads` heads, width `hidden`) reads
`[CLS; A seq; SEP; B seq; SEP]` with learnt CLS/SEP vectors and a learnt segment embedding, padding
and absent modalities masked out; its CLS output feeds the emotion classifier EC and the emotion
discriminator ED. Training minimises eq. 21:

    L = alpha * L_MSE + L_KLD + beta * L_c + gamma * L_f + delta * L_b

- L_MSE (eq. 10): reconstruction of each present sequence by f_AE (`mse_scale`);
- L_KLD (eq. 11): KL from the labels to the auxiliary prediction, summed over modalities;
- L_c (eq. 14-17): contrastive mutual-information estimation with temperature sigmoid(p), p learnt from 1
  (`cmie=paper`: the printed cross-modal form; `cmie=code`: the authors' same-modality NT-Xent);
- L_f (eq. 20): EC's cross-entropy on the matched pairs (each item with itself);
- L_b (eq. 19): ED's binary cross-entropy on all M(M-1) shuffled pairs (A of item i, B of item j, i != j),
  label 1 when the two items share their emotion; all pairs go through the fusion encoder in one pass.

Unlike the authors' code the fusion encoder reads f_AE(sequence) (`fuse=augmented`), so with frozen
cached features the ORL losses still shape what is predicted; `fuse=raw` is the code's path.
docs/heads.md lists every deviation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featurestore.config import field
from featurestore.errors import ConfigError

from .base import Features, Head, Targets
from ._data import TensorSet, align
from ._engine import check_kind, pick_device, scores_from_outputs, seeded, validation_scorer
from ._torch import TorchParams, train_loop

__all__ = ["DRKF", "DRKFConfig", "recon_loss", "kl_to_labels", "cmie_paper", "nt_xent", "shuffle_pairs"]


@dataclasses.dataclass(frozen=True)
class DRKFConfig(TorchParams):
    epochs: int = field(30, "maximum passes over the training split (the paper: 100)")
    batch_size: int = field(32, "items per mini-batch M; ED sees M(M-1) shuffled pairs (the paper: 4)")
    lr: float = field(3e-4, "AdamW learning rate (the paper fine-tunes its encoders at 1e-5)")
    hidden: int = field(128, "width of the fusion encoder (the paper: 1024)")
    heads: int = field(8, "attention heads of the fusion encoder (the paper: 8)")
    layers: int = field(1, "transformer layers of the fusion encoder")
    proj: int = field(128, "output width of the projection g (the paper: 1024)")
    ae_width: int = field(256, "first encoder width w of each autoencoder block (w, w/2, w/4; the paper: 256)")
    ae_blocks: int = field(5, "residual autoencoder blocks (the paper: 5)")
    dropout: float = field(0.3, "dropout in the autoencoder, the fusion encoder and the EC/ED MLPs (0.3: chosen on "
                                     "the demo's validation split with an emotion-free second modality)")
    alpha: float = field(0.2, "weight of the reconstruction loss L_MSE (eq. 12)")
    beta: float = field(0.2, "weight of the contrastive loss L_c (eq. 21)")
    gamma: float = field(1.0, "weight of the classification loss L_f (eq. 21)")
    delta: float = field(0.2, "weight of the discrimination loss L_b (eq. 21)")
    fuse: Literal["augmented", "raw"] = field(
        "augmented", "what the fusion encoder reads: f_AE(sequence) (so the ORL losses shape the prediction) | "
                     "the raw sequence (the authors' code)")
    cmie: Literal["paper", "code"] = field(
        "paper", "contrastive loss: eq. 14-16 (cross-modal augmented negatives, the positive also in the "
                 "denominator) | the authors' code (NT-Xent per modality, raw vs augmented, + eq. 16)")
    mse_scale: Literal["element", "item"] = field(
        "element", "eq. 10's squared error per item: averaged over its steps and dimensions (the code's MSELoss) "
                   "| summed (the printed squared norm)")
    ed_pairs: int = field(256, "shuffled pairs per batch for ED, drawn at random (0: all M(M-1), as the authors' "
                               "code; eq. 19 prints M^2)")
    standardize: bool = field(True, "z-score each input dimension with training statistics")
    sequences: bool = field(True, "use stored sequences when the store has them (else pooled features)")
    max_len: int = field(0, "keep at most this many sequence steps per item (0: all)")

    def __post_init__(self):
        super().__post_init__()
        for name in ("hidden", "heads", "layers", "proj", "ae_width", "ae_blocks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.hidden % self.heads:
            raise ConfigError(f"hidden={self.hidden} must be a multiple of heads={self.heads}; change one of them")
        if self.ae_width < 4:
            raise ConfigError(f"ae_width={self.ae_width} must be at least 4 (the blocks narrow to ae_width/4)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("alpha", "beta", "gamma", "delta"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name}={getattr(self, name)} must be a finite number >= 0 (a loss weight)")
        if self.ed_pairs < 0 or self.max_len < 0:
            raise ConfigError(f"ed_pairs={self.ed_pairs} and max_len={self.max_len} must be >= 0 (0: all)")


# ---- the losses, each as printed -----------------------------------------------------
def recon_loss(x, x_aug, steps, n_mods: int, scale: str = "element"):
    """Eq. 10: sum over modalities and present items of the squared error over valid steps, / (n_mods * M).

    `x`, `x_aug`: per modality `[M, L, d]`; `steps`: `[M, L]` bool. `scale=element` divides each
    item's squared error by its number of valid elements (the code's MSELoss)."""
    total = 0.0
    for m in x:
        err = ((x[m] - x_aug[m]).float() ** 2 * steps[m].unsqueeze(-1)).sum((1, 2))
        if scale == "element":
            err = err / (steps[m].sum(1) * x[m].shape[-1]).clamp(min=1)
        total = total + err.sum()
    M = len(next(iter(x.values())))
    return total / (n_mods * M)


def kl_to_labels(log_q, y, present):
    """Eq. 11: (1/M) sum_i sum_c y_ic log(y_ic / q_ic) over present items; `y` a distribution per item."""
    kl = (torch.xlogy(y, y) - y * log_q.float()).sum(-1)
    return (kl * present).sum() / len(y)


def _cos(a, b):
    """Cosine similarities `[n_a, n_b]` in float32, also under CUDA's bfloat16 autocast (which would round
    the matmul however its inputs were cast)."""
    with torch.autocast(a.device.type, enabled=False):
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def cmie_paper(zA, zA_aug, zB, zB_aug, tau):
    """Eq. 14-17 over the items where both modalities are present (rows of the inputs `[n, P]`).

    L_A,i = -log exp(sim(zA_i, zA~_i)/tau) / [exp(sim(zA_i, zA~_i)/tau) + sum_{k != i} exp(sim(zA_i, zB~_k)/tau)],
    L_B alike, and L_AB,i = -log exp(sim(zA_i, zB_i)/tau) / sum_k exp(sim(zA_i, zB_k)/tau); L_c the mean over i
    of their sum. The positive is in eq. 14-15's denominator, as in every InfoNCE bound (the printed sum
    leaves it out, which makes the loss unbounded below as the learnt tau shrinks)."""
    n = len(zA)
    if n < 2:
        return zA.sum() * 0
    off = ~torch.eye(n, dtype=torch.bool, device=zA.device)

    def cross(z, z_aug_same, z_aug_other):
        with torch.autocast(z.device.type, enabled=False):
            pos = (F.normalize(z.float(), dim=-1) * F.normalize(z_aug_same.float(), dim=-1)).sum(-1) / tau
        neg = (_cos(z, z_aug_other) / tau).masked_fill(~off, float("-inf"))
        return torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos

    joint = _cos(zA, zB) / tau
    l_ab = torch.logsumexp(joint, 1) - joint.diagonal()
    return (cross(zA, zA_aug, zB_aug) + cross(zB, zB_aug, zA_aug) + l_ab).mean()


def nt_xent(a, b, tau):
    """NT-Xent of paired views a_i, b_i `[n, P]`: 2n anchors, the other view positive, all 2n - 2 others negative."""
    n = len(a)
    if n < 2:
        return a.sum() * 0
    z = torch.cat([a, b])
    sim = (_cos(z, z) / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=a.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
    return F.cross_entropy(sim, target)


def cross_modal_nce(a, b, tau):
    """Eq. 16 (and the authors' `modal_nt_xent_loss`): each a_i against every b_k, b_i the positive."""
    return F.cross_entropy(_cos(a, b) / tau, torch.arange(len(a), device=a.device))


def shuffle_pairs(y, present_a, present_b):
    """Emotionality shuffling: every pair (i, j), i != j, of a batch (A from item i, B from item j) where
    both are present, and its label (1: the two items share their emotion). Returns (i, j, label)."""
    M = len(y)
    i, j = torch.meshgrid(torch.arange(M, device=y.device), torch.arange(M, device=y.device), indexing="ij")
    keep = (i != j) & present_a[i] & present_b[j]
    i, j = i[keep], j[keep]
    return i, j, (y[i] == y[j]).float()


# ---- the network ------------------------------------------------------------------
class ResidualAE(nn.Module):
    """f_AE: residual blocks d -> w -> w/2 -> w/4 -> w/2 -> w -> d (the residual accumulates), then d -> d -> d."""

    def __init__(self, dim: int, width: int, blocks: int, dropout: float):
        super().__init__()
        sizes = [dim, width, width // 2, width // 4]

        def mlp(widths, act):
            layers = []
            for k, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                layers.append(nn.Linear(a, b))
                if k < len(widths) - 2:
                    layers += [act(), nn.Dropout(dropout)]
            return nn.Sequential(*layers)

        self.encoders = nn.ModuleList([mlp(sizes, nn.LeakyReLU) for _ in range(blocks)])
        self.decoders = nn.ModuleList([mlp(sizes[::-1], nn.ReLU) for _ in range(blocks)])
        self.transition = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x):
        x_in, out = x, torch.zeros_like(x)
        for enc, dec in zip(self.encoders, self.decoders):
            x_in = x_in + out
            out = dec(enc(x_in))
        return self.transition(x_in + out)


class DRKFNet(nn.Module):
    def __init__(self, dims: Mapping[str, int], n_classes: int, cfg: DRKFConfig):
        super().__init__()
        self.mods = sorted(dims)
        H = cfg.hidden
        self.ae = nn.ModuleDict({m: ResidualAE(d, cfg.ae_width, cfg.ae_blocks, cfg.dropout) for m, d in dims.items()})
        self.g = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, cfg.proj), nn.ReLU(), nn.Linear(cfg.proj, cfg.proj))
                                for m, d in dims.items()})
        self.aux = nn.ModuleDict({m: nn.Linear(d, n_classes) for m, d in dims.items()})
        self.inp = nn.ModuleDict({m: nn.Linear(d, H) for m, d in dims.items()})
        self.segment = nn.Parameter(torch.randn(len(self.mods) + 1, H) * 0.02)  # per modality, then CLS/SEP
        self.cls = nn.Parameter(torch.randn(H) * 0.02)
        self.sep = nn.Parameter(torch.randn(H) * 0.02)
        layer = nn.TransformerEncoderLayer(H, cfg.heads, 2 * H, cfg.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.ec = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(H, n_classes))
        self.ed = nn.Sequential(nn.Linear(H, H), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(H, 1))
        self.p = nn.Parameter(torch.tensor(1.0))  # temperature sigmoid(p)
        self.fuse_augmented = cfg.fuse == "augmented"

    def tokens(self, x, aug):
        """What the fusion encoder reads of each modality: `[N, L, hidden]`."""
        src = aug if self.fuse_augmented else x
        return {m: self.inp[m](src[m]) + self.segment[k] for k, m in enumerate(self.mods)}

    def fuse(self, toks, steps, index=None):
        """CLS outputs of `[CLS; A; SEP; B; SEP]`; `index[m]` picks which item's tokens fill modality m's slot."""
        if index is not None:
            toks = {m: toks[m].index_select(0, index[m]) for m in self.mods}
            steps = {m: steps[m].index_select(0, index[m]) for m in self.mods}
        P = len(next(iter(toks.values())))
        special = lambda v: (v + self.segment[-1]).expand(P, 1, -1)  # noqa: E731
        ones = torch.ones(P, 1, dtype=torch.bool, device=self.cls.device)
        parts, valid = [special(self.cls)], [ones]
        for m in self.mods:
            parts += [toks[m], special(self.sep)]
            valid += [steps[m], ones]
        h = self.encoder(torch.cat(parts, 1), src_key_padding_mask=~torch.cat(valid, 1))
        return h[:, 0]

    def augment(self, batch):
        x = {m: batch[f"x.{m}"] for m in self.mods}
        steps = {m: batch[f"s.{m}"] for m in self.mods}
        aug = {m: self.ae[m](x[m]) * steps[m].unsqueeze(-1) for m in self.mods}
        return x, steps, aug

    def forward(self, batch):
        """EC logits of each item with itself `[N, C]`."""
        x, steps, aug = self.augment(batch)
        return self.ec(self.fuse(self.tokens(x, aug), steps))


def _mean_steps(x, steps):
    return (x * steps.unsqueeze(-1)).sum(1) / steps.sum(1, keepdim=True).clamp(min=1)


def drkf_loss(net: DRKFNet, batch: dict, cfg: DRKFConfig, n_classes: int) -> torch.Tensor:
    """Eq. 21 on one batch."""
    x, steps, aug = net.augment(batch)
    y = batch["y"]
    M = len(y)
    present = {m: steps[m].any(1) for m in net.mods}
    y_dist = F.one_hot(y, n_classes).float()
    loss = cfg.alpha * recon_loss(x, aug, steps, len(net.mods), cfg.mse_scale)
    cls_aug = {m: _mean_steps(aug[m], steps[m]) for m in net.mods}
    for m in net.mods:
        loss = loss + kl_to_labels(torch.log_softmax(net.aux[m](cls_aug[m]).float(), -1), y_dist, present[m])
    toks = net.tokens(x, aug)
    if len(net.mods) == 2:
        a, b = net.mods
        both = present[a] & present[b]
        tau = torch.sigmoid(net.p)
        z = {m: net.g[m](_mean_steps(x[m], steps[m])[both]) for m in net.mods}
        z_aug = {m: net.g[m](cls_aug[m][both]) for m in net.mods}
        if cfg.cmie == "paper":
            l_c = cmie_paper(z[a], z_aug[a], z[b], z_aug[b], tau)
        else:
            l_c = nt_xent(z[a], z_aug[a], tau) + nt_xent(z[b], z_aug[b], tau) + cross_modal_nce(z[a], z[b], tau) \
                if len(z[a]) >= 2 else z[a].sum() * 0
        i, j, same = shuffle_pairs(y, present[a], present[b])
        if cfg.ed_pairs and len(i) > cfg.ed_pairs:
            pick = torch.randperm(len(i), device=i.device)[:cfg.ed_pairs]
            i, j, same = i[pick], j[pick], same[pick]
        diag = torch.arange(M, device=y.device)
        h = net.fuse(toks, steps, {a: torch.cat([diag, i]), b: torch.cat([diag, j])})  # one pass: matched + shuffled
        logits, h_pairs = net.ec(h[:M]), h[M:]
        l_b = F.binary_cross_entropy_with_logits(net.ed(h_pairs).squeeze(-1).float(), same) if len(i) else 0.0
        loss = loss + cfg.beta * l_c + cfg.delta * l_b
    else:
        logits = net.ec(net.fuse(toks, steps))
    return loss + cfg.gamma * F.cross_entropy(logits.float(), y)


# ---- the head ---------------------------------------------------------------------
class DRKF(Head):
    name = "drkf"
    Config = DRKFConfig
    supports = frozenset({"single", "binary"})
    uses_sequences = True
    description = ("DRKF: residual-autoencoder augmentation, contrastive MI estimation, a fusion encoder with an "
                   "emotion discriminator trained on shuffled pairs")

    @classmethod
    def example_params(cls, workdir) -> dict:
        """Small widths and 64 shuffled pairs per batch: the contract tests' budget on a shared CPU."""
        return {"ae_width": 16, "proj": 16, "ed_pairs": 64}

    def _inputs(self, X: Features, fit_norm: bool = False) -> dict:
        t = {}
        if fit_norm:
            self.norm_ = {}
        for mod, (arr, mask) in align(X, self.meta_["dims"]).items():
            x, steps = self._padded(X, mod, arr, mask)
            t[f"x.{mod}"], t[f"s.{mod}"] = self._standardised(mod, x, steps, fit_norm), steps
        return t

    def _padded(self, X: Features, mod: str, pooled: np.ndarray, mask: np.ndarray):
        """`[N, L, d]` + step mask; a modality without sequences is a length-1 sequence of its pooled row."""
        dim = self.meta_["in_dims"][mod]
        if mod not in self.meta_["seq_dims"]:
            return torch.from_numpy(pooled[:, None, :].copy()), torch.from_numpy(mask[:, None].copy())
        seqs = X.sequences.get(mod)
        if seqs is None and mask.any():
            raise ConfigError(f"head 'drkf' was trained on {mod} sequences; pass them (Features.sequences)")
        seqs = seqs if seqs is not None else [None] * len(mask)
        cap = self.max_len or None
        rows = [s[:cap] if mask[i] and s is not None and len(s) else (pooled[i:i + 1] if mask[i] else None)
                for i, s in enumerate(seqs)]
        longest = max((len(r) for r in rows if r is not None), default=1)
        x = np.zeros((len(rows), longest, dim), np.float32)
        steps = np.zeros((len(rows), longest), bool)
        for i, r in enumerate(rows):
            if r is not None:
                if r.shape[1] != dim:
                    raise ConfigError(f"{mod} sequences are {r.shape[1]}-d but head 'drkf' was trained on {dim}-d")
                if not np.isfinite(r).all():
                    raise ConfigError(f"the {mod} sequence of item {i} holds NaN or inf; drop the item or "
                                      "re-extract its features")
                x[i, :len(r)], steps[i, :len(r)] = r, True
        return torch.from_numpy(x), torch.from_numpy(steps)

    def _standardised(self, mod: str, x, steps, fit: bool):
        if not self.standardize:
            return x
        if fit:
            rows = x[steps] if bool(steps.any()) else x.reshape(-1, x.shape[-1])[:1] * 0
            self.norm_[f"{mod}.mean"] = rows.mean(0).numpy()
            self.norm_[f"{mod}.std"] = (rows.std(0, unbiased=False) + 1e-6).numpy()
        mean, std = (torch.from_numpy(np.asarray(self.norm_[f"{mod}.{k}"], np.float32)) for k in ("mean", "std"))
        return torch.where(steps.unsqueeze(-1), (x - mean) / std, torch.zeros((), dtype=x.dtype))

    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "DRKF":
        check_kind(self, y)
        if not 1 <= len(X.pooled) <= 2:
            raise ConfigError(f"head 'drkf' fuses two modalities; got {X.modalities}: choose two with --features")
        empty = [m for m in X.pooled if not X.masks.get(m, np.ones(len(X), bool)).any()]
        if empty:
            raise ConfigError(f"head 'drkf': modality {', '.join(empty)} has no item in the training split, so "
                              "nothing would train its weights; leave it out of --features")
        if eval_set is not None and not len(eval_set[1]):
            eval_set = None  # an empty validation split: train as without one
        seq_dims = {m: int(next(s.shape[1] for s in X.sequences[m] if s is not None)) for m in X.pooled
                    if self.sequences and any(s is not None for s in X.sequences.get(m, []))}
        self._set_meta(X, y, seq_dims=seq_dims, in_dims={**X.dims(), **seq_dims})
        device = pick_device(self.device)
        n_classes = y.n_outputs
        train = TensorSet({**self._inputs(X, fit_norm=True), "y": torch.as_tensor(y.y, dtype=torch.long)}, len(y))
        val_score = None
        if eval_set is not None:
            self._check_features(eval_set[0])
            val = TensorSet(self._inputs(eval_set[0]), len(eval_set[1])).to(device)
            score = validation_scorer(self, eval_set[1], y.kind)
            val_score = lambda model: score(self._proba(model, val))  # noqa: E731
        cfg = self.config
        with seeded(self.seed, device):
            self.net_ = DRKFNet(self.meta_["in_dims"], n_classes, cfg).to(device)
            self.history_ = train_loop(self.net_, lambda m, b: drkf_loss(m, b, cfg, n_classes), train.to(device),
                                       params=cfg, device=device, val_score=val_score)
        self.net_ = self.net_.cpu()
        self.settle_decision(eval_set)
        return self

    @staticmethod
    def _proba(model, data: TensorSet) -> np.ndarray:
        model.eval()
        with torch.no_grad():
            outs = [model(b) for b in data.batches(1024)]
        return scores_from_outputs(torch.cat(outs), "single") if outs else np.zeros((0, model.ec[-1].out_features))

    def predict_proba(self, X: Features) -> np.ndarray:
        self._check_features(X)
        return self._proba(self.net_, TensorSet(self._inputs(X), len(X)))

    def _state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}
        return {**state, **{f"norm.{k}": np.asarray(v, np.float32) for k, v in self.norm_.items()}}

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:
        self.norm_ = {k[5:]: v for k, v in state.items() if k.startswith("norm.")}
        self.net_ = DRKFNet(meta["in_dims"], len(meta["classes"]), self.config)
        self.net_.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in state.items()
                                   if k.startswith("net.")})
        self.net_.eval()
