"""`scl`: the supramodal concept learning encoder (paper 000, section 3.1).

Per modality m, pooled backbone features `f_m` are projected to a common width, then

- the shared emotion encoder `E_emo` (two FC layers to `width`, each with batch norm, a ReLU
  between them) gives the modality-independent emotion feature `f_m^emo` (eq. 1), taken before
  the paper's final ReLU so it is never identically zero (`final_relu=true` adds it back);
- a non-emotion encoder `E_m^non` of the same shape gives `f_m^non`;
- an emotion classifier (one FC) reads `f^emo`.

Training has two stages:

1. multimodal joint learning (eq. 4): every step takes a mini-batch from each modality, labels
   harmonised to a coarse space (`coarse_map`), `L_task + beta1 L_contrast + beta2 L_orth`, where
   `L_contrast` is the cross-modal triplet loss of eq. 3 and `L_orth` the orthogonality loss of eq. 2
   (by default its mean over the D x D entries: the printed sum outweighs the task loss);
2. sequential cross-modal learning (eq. 5): one modality at a time for a cycle of batches or
   epochs, original labels, `L_task_m + gamma L_orth_m`; with an eval_set, the state of least
   validation log-loss is kept.

Modalities need not be paired: each training row contributes one sample per modality it has,
so an image dataset and a text dataset simply stack (masks say which modality a row has). The
classifier spans the union of all labels; for a sample of modality m, only the labels seen in
m's training data compete in its softmax (the paper trains 7 image/audio classes and 3 text ones).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import warnings
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featurestore.config import field
from featurestore.errors import ConfigError

from ._engine import notify_epoch
from .base import Features, Head, Targets

__all__ = ["SCL", "SCLConfig", "DEFAULT_COARSE_MAP", "orthogonality_loss", "triplet_loss", "coarse_labels",
           "parse_cycle"]

DEFAULT_COARSE_MAP = {
    "anger": "negative", "angry": "negative", "disgust": "negative", "disgusted": "negative",
    "fear": "negative", "fearful": "negative", "sad": "negative", "sadness": "negative",
    "happy": "positive", "happiness": "positive", "joy": "positive",
    "neutral": "neutral", "positive": "positive", "negative": "negative",
    "surprise": None, "surprised": None,
}
_MODALITY_ORDER = ("image", "text", "audio")
_FAR = -1e9  # masked logits stay finite


@dataclasses.dataclass(frozen=True)
class SCLConfig:
    width: int = field(256, "width of the emotion and non-emotion features")
    proj_width: int = field(512, "common width every modality is first projected to")
    alpha: float = field(0.2, "margin of the cross-modal triplet loss (eq. 3)")
    beta1: float = field(0.05, "weight of the triplet loss in the joint stage (eq. 4)")
    beta2: float = field(0.1, "weight of the orthogonality loss in the joint stage (eq. 4)")
    gamma: float = field(0.1, "weight of the orthogonality loss in the sequential stage (eq. 5)")
    joint_epochs: int = field(10, "epochs of multimodal joint learning (0: skip the stage)")
    seq_epochs: int = field(100, "epochs of sequential cross-modal learning, counted over all modalities")
    cycle: str = field("1e", "how long each modality stays in the sequential stage: Ne epochs or Nb batches")
    order: tuple[str, ...] = field(_MODALITY_ORDER, "order in which modalities take turns")
    coarse_map: dict = field(DEFAULT_COARSE_MAP,
                             "label -> coarse label for the joint stage (JSON); null or unlisted: excluded")
    orth_normalize: bool = field(True, "L2-normalise rows before the orthogonality loss (scale-free)")
    orth_reduction: str = field("mean", "orthogonality loss over the D x D entries of F_emo^T F_non: mean | sum "
                                        "(sum: eq. 2 as printed; it outweighs the task loss, docs/concepts.md)")
    final_relu: bool = field(False, "ReLU after the encoders' last batch norm, as printed in the paper; off: "
                                    "f_emo is the pre-activation, never identically zero (docs/concepts.md)")
    batch_size: int = field(64, "items per modality per mini-batch")
    lr: float = field(1e-4, "AdamW learning rate")
    weight_decay: float = field(1e-5, "AdamW weight decay")
    cosine_period: int = field(5, "period of the cosine learning-rate schedule, in epochs")
    seed: int = field(0, "seed of initialisation and shuffling")
    device: str = field("auto", "auto | cpu | cuda[:N]")

    def __post_init__(self):
        from featurestore.devices import check_device

        check_device(self.device, "device")
        if min(self.width, self.proj_width, self.batch_size, self.cosine_period) < 1:
            raise ConfigError("width, proj_width, batch_size and cosine_period must be at least 1")
        if self.joint_epochs < 0 or self.seq_epochs < 0 or self.joint_epochs + self.seq_epochs == 0:
            raise ConfigError(f"joint_epochs={self.joint_epochs}, seq_epochs={self.seq_epochs}: both >= 0, "
                              "and at least one positive")
        if min(self.alpha, self.beta1, self.beta2, self.gamma, self.weight_decay) < 0 or self.lr <= 0:
            raise ConfigError("alpha, beta1, beta2, gamma, weight_decay must be >= 0 and lr > 0")
        parse_cycle(self.cycle)
        if self.orth_reduction not in ("mean", "sum"):
            raise ConfigError(f"orth_reduction={self.orth_reduction!r} must be mean or sum")


def parse_cycle(cycle: str) -> tuple[int, str]:
    """`"1e"` -> (1, "epochs"), `"100b"` -> (100, "batches")."""
    m = re.fullmatch(r"\s*(\d+)\s*([eb])\s*", str(cycle).lower())
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"cycle={cycle!r} should be N epochs or N batches, e.g. 1e or 100b")
    return int(m.group(1)), "epochs" if m.group(2) == "e" else "batches"


# ---- losses ------------------------------------------------------------------------------
def orthogonality_loss(emo, non, *, normalize: bool = True, reduction: str = "sum"):
    """Eq. 2: `|| F_emo^T F_non ||_F^2` over the rows of one modality (rows L2-normalised if asked);
    `reduction="mean"` divides by the number of entries of `F_emo^T F_non` (D_emo * D_non)."""

    if normalize:
        emo, non = F.normalize(emo, dim=1), F.normalize(non, dim=1)
    gram = (emo.t() @ non).pow(2)
    return gram.mean() if reduction == "mean" else gram.sum()


def triplet_loss(emo, modality, label, alpha: float):
    """Eq. 3: mean over S = {(i, j, k): m_i != m_j, m_i = m_k, c_i = c_j, c_i != c_k} of
    `max(0, alpha - cos(f_i, f_j) + cos(f_i, f_k))`; 0 when S is empty.

    Anchors sharing a (modality, class) share their positive and negative sets, so each such
    group is one [anchors, positives, negatives] tensor: the work is |S|, not N^3."""

    f = F.normalize(emo, dim=1)
    cos = f @ f.t()
    total, count = cos.new_zeros(()), 0
    groups = torch.unique(torch.stack([modality, label], 1), dim=0)
    for m, c in groups.tolist():
        anchors = torch.nonzero((modality == m) & (label == c)).squeeze(1)
        pos = torch.nonzero((modality != m) & (label == c)).squeeze(1)
        neg = torch.nonzero((modality == m) & (label != c)).squeeze(1)
        if not len(pos) or not len(neg):
            continue
        block = cos[anchors]
        hinge = torch.relu(alpha - block[:, pos, None] + block[:, None, neg])
        total = total + hinge.sum()
        count += len(anchors) * len(pos) * len(neg)
    return total / count if count else cos.sum() * 0.0


def coarse_labels(classes: list[str], mapping: Mapping[str, str | None]) -> tuple[list[str], np.ndarray]:
    """Coarse label set and, per fine class, its coarse index (-1: excluded from the joint stage)."""
    lower = {str(k).lower(): v for k, v in mapping.items()}
    targets = [lower.get(c.lower()) for c in classes]
    coarse = sorted({t for t in targets if t})
    return coarse, np.array([coarse.index(t) if t else -1 for t in targets], np.int64)


# ---- the network -------------------------------------------------------------------------
def _encoder(nn, d_in: int, width: int, final_relu: bool):
    last = [nn.ReLU()] if final_relu else []
    return nn.Sequential(nn.Linear(d_in, width), nn.BatchNorm1d(width), nn.ReLU(),
                         nn.Linear(width, width), nn.BatchNorm1d(width), *last)


def _network(dims: Mapping[str, int], proj_width: int, width: int, n_fine: int, n_coarse: int,
             final_relu: bool = False):

    class SCLNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.ModuleDict({m: nn.Linear(d, proj_width) for m, d in dims.items()})
            self.emo = _encoder(nn, proj_width, width, final_relu)
            self.non = nn.ModuleDict({m: _encoder(nn, proj_width, width, final_relu) for m in dims})
            self.fine = nn.Linear(width, n_fine)
            self.coarse = nn.Linear(width, max(1, n_coarse))

    return SCLNet()


@contextlib.contextmanager
def _small_model_threads(device):
    """One intra-op thread on CPU while training: these layers are too small to gain from more, and
    on a shared machine OpenMP's spinning threads made each step 50-100x slower in our runs."""

    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Stream:
    """An endless, seeded, reshuffled stream of index batches over n rows."""

    def __init__(self, n: int, batch: int, rng: np.random.Generator):
        self.n, self.batch, self.rng = n, batch, rng
        self.order, self.pos = rng.permutation(n), 0

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n / self.batch)

    def next(self) -> np.ndarray:
        if self.pos >= self.n:
            self.order, self.pos = self.rng.permutation(self.n), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        if len(idx) < 2 and self.n >= 2:  # batch norm needs two rows
            idx = np.concatenate([idx, self.rng.choice(self.n, 1)])
        return idx


class SCL(Head):
    name = "scl"
    Config = SCLConfig
    supports = frozenset({"single", "binary"})
    description = "supramodal concept encoder (paper 000): shared emotion encoder, joint + sequential stages"

    @classmethod
    def example_params(cls, workdir) -> dict:
        return {"joint_epochs": 2, "seq_epochs": 3, "width": 16, "proj_width": 16, "lr": 3e-3, "device": "cpu"}

    # ---- data ------------------------------------------------------------------------
    def _samples(self, X: Features, y: Targets) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for m in self._modalities(X.pooled):
            rows = np.flatnonzero(np.asarray(X.masks[m], bool) & (y.y >= 0))
            if len(rows):
                out[m] = (np.asarray(X.pooled[m][rows], np.float32), y.y[rows].astype(np.int64))
        if not out:
            raise ConfigError("scl: no labelled rows in any modality")
        return out

    def _modalities(self, names) -> list[str]:
        ordered = [m for m in self.order if m in names]
        return ordered + sorted(set(names) - set(ordered))

    # ---- training --------------------------------------------------------------------
    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "SCL":

        from ._torch import pick_device, seeded

        if y.kind not in self.supports:
            raise ConfigError(f"head 'scl' trains single-label targets, not {y.kind!r}")
        data = self._samples(X, y)
        coarse, to_coarse = coarse_labels(list(y.classes), self.coarse_map)
        class_mask = {m: np.isin(np.arange(len(y.classes)), np.unique(lab)) for m, (_, lab) in data.items()}
        self._set_meta(X, y, modalities=list(data), coarse_classes=coarse, to_coarse=to_coarse.tolist(),
                       class_mask={m: v.tolist() for m, v in class_mask.items()},
                       counts={m: int(len(lab)) for m, (_, lab) in data.items()}, final_relu=self.final_relu)
        device = pick_device(self.device)
        rng = np.random.default_rng(self.seed)
        tensors = {m: (torch.from_numpy(x).to(device), torch.from_numpy(lab).to(device)) for m, (x, lab) in data.items()}
        history: dict[str, Any] = {}
        with seeded(self.seed, device), _small_model_threads(device):
            self.net_ = _network({m: X.dims()[m] for m in data}, self.proj_width, self.width,
                                 len(y.classes), len(coarse), self.final_relu).to(device)
            masks = {m: torch.as_tensor(v, device=device) for m, v in class_mask.items()}
            if self.joint_epochs:
                history["joint"] = self._joint(tensors, torch.as_tensor(to_coarse, device=device), rng)
            if self.seq_epochs:
                score = self._val_scorer(eval_set) if eval_set is not None else None
                history["sequential"] = self._sequential(tensors, masks, rng, score)
        self.net_ = self.net_.cpu().eval()
        self.meta_["history"] = history
        self.meta_["encoder_hash"] = self.encoder_hash()
        return self

    def _optimizer(self, steps_per_epoch: int, total: int):

        opt = torch.optim.AdamW(self.net_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cosine_period * steps_per_epoch))
        return opt, sched

    def _step(self, opt, sched, loss) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return float(loss.detach())

    def _joint(self, tensors, to_coarse, rng) -> dict:
        """Eq. 4 on coarse labels; rows whose label has no coarse class are left out."""

        keep = {}
        for m, (x, lab) in tensors.items():
            rows = torch.nonzero(to_coarse[lab] >= 0).squeeze(1)
            if len(rows) >= 2:
                keep[m] = (x[rows], to_coarse[lab[rows]])
        if not keep:
            warnings.warn("scl: no label maps to a coarse class (coarse_map); joint stage skipped", stacklevel=3)
            return {"skipped": True}
        streams = {m: _Stream(len(lab), self.batch_size, rng) for m, (_, lab) in keep.items()}
        per_epoch = max(s.per_epoch for s in streams.values())
        opt, sched = self._optimizer(per_epoch, per_epoch * self.joint_epochs)
        net, losses = self.net_.train(), []
        for _ in range(self.joint_epochs):
            total = 0.0
            for _ in range(per_epoch):
                idx = {m: torch.as_tensor(s.next(), device=to_coarse.device) for m, s in streams.items()}
                proj = torch.cat([net.proj[m](keep[m][0][i]) for m, i in idx.items()])
                emo = net.emo(proj)
                labels = torch.cat([keep[m][1][i] for m, i in idx.items()])
                mods = torch.cat([torch.full((len(i),), j, device=emo.device) for j, i in enumerate(idx.values())])
                task = F.cross_entropy(net.coarse(emo), labels, reduction="none")
                task = sum(task[mods == j].mean() for j in range(len(idx)))  # the sum over modalities of eq. 4
                orth, start = 0.0, 0
                for m, i in idx.items():
                    orth = orth + self._orth(emo[start:start + len(i)], net.non[m](proj[start:start + len(i)]))
                    start += len(i)
                contrast = triplet_loss(emo, mods, labels, self.alpha)
                total += self._step(opt, sched, task + self.beta1 * contrast + self.beta2 * orth)
            losses.append(total / per_epoch)
            notify_epoch(len(losses), self.joint_epochs, 1, losses[-1], stage="joint")
        return {"loss": [round(v, 5) for v in losses], "steps_per_epoch": per_epoch}

    def _schedule(self, streams) -> list[tuple[str, int]]:
        """(modality, steps) turns until seq_epochs passes over every modality's data are done."""
        n, unit = parse_cycle(self.cycle)
        total = self.seq_epochs * sum(s.per_epoch for s in streams.values())
        turns, done = [], 0
        while done < total:
            for m, s in streams.items():
                steps = min(n * s.per_epoch if unit == "epochs" else n, total - done)
                if steps <= 0:
                    break
                turns.append((m, steps))
                done += steps
        return turns

    def _sequential(self, tensors, masks, rng, score=None) -> dict:
        """Eq. 5: one modality per cycle, original labels, `L_task_m + gamma L_orth_m`.

        With `score` (a validation scorer), the state after each round over the modalities is scored
        and the best one is kept (ties: the earlier)."""

        streams = {m: _Stream(len(lab), self.batch_size, rng) for m, (_, lab) in tensors.items()}
        turns = self._schedule(streams)
        per_epoch = sum(s.per_epoch for s in streams.values())
        opt, sched = self._optimizer(per_epoch, sum(t for _, t in turns))
        net, per_turn = self.net_.train(), []
        best, best_state, best_turn, scores = -math.inf, None, 0, []
        for n, (m, steps) in enumerate(turns, 1):
            x_all, y_all = tensors[m]
            total = 0.0
            for _ in range(steps):
                i = torch.as_tensor(streams[m].next(), device=x_all.device)
                proj = net.proj[m](x_all[i])
                emo, non = net.emo(proj), net.non[m](proj)
                logits = net.fine(emo).masked_fill(~masks[m], _FAR)
                loss = F.cross_entropy(logits, y_all[i]) + self.gamma * self._orth(emo, non)
                total += self._step(opt, sched, loss)
            per_turn.append((m, steps, round(total / steps, 5)))
            if score is not None and (n % len(streams) == 0 or n == len(turns)):
                scores.append(round(score(), 5))
                if scores[-1] > best:
                    best, best_turn = scores[-1], n
                    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                net.train()
            notify_epoch(n, len(turns), 1, per_turn[-1][2], max(scores) if scores else None, stage=f"sequential {m}")
        out = {"turns": len(turns), "last_losses": {m: v for m, _, v in per_turn[-len(streams):]}}
        if best_state is not None:
            net.load_state_dict(best_state)
            out.update(val_scores=scores, best_turn=best_turn, best_val=best)
        return out

    def _orth(self, emo, non):
        return orthogonality_loss(emo, non, normalize=self.orth_normalize, reduction=self.orth_reduction)

    def _val_scorer(self, eval_set):
        """Minus the validation log-loss of the encoder's own classifier (its probabilities averaged over
        an item's modalities). Log-loss rather than accuracy: on small validation sets it is the less
        noisy signal, and it turns as the features over-fit (collapse), which accuracy barely shows."""
        Xv, yv = eval_set
        keep = np.flatnonzero(yv.y >= 0)
        Xv, y = Xv.take(keep), yv.y[keep]

        def score() -> float:
            p = self.predict_proba(Xv)[np.arange(len(y)), y]
            return float(np.log(np.maximum(p, 1e-12)).mean())

        return score

    # ---- inference -------------------------------------------------------------------
    def encode_modality(self, modality: str, arr: np.ndarray, *, batch: int = 8192) -> np.ndarray:
        """Emotion features `f^emo` `[N, width]` of one modality's pooled backbone features."""

        self._check_fitted()
        if modality not in self.meta_["modalities"]:
            raise ConfigError(f"scl was trained on {self.meta_['modalities']}, not {modality!r}")
        want = self.meta_["dims"][modality]
        arr = np.asarray(arr, np.float32)
        if arr.ndim != 2 or arr.shape[1] != want:
            raise ConfigError(f"scl {modality} input is {arr.shape}; it was trained on {want}-d features")
        self.net_.eval()
        dev = next(self.net_.parameters()).device  # the training device while fit scores validation
        out = []
        with torch.no_grad():
            for s in range(0, len(arr), batch):
                x = torch.from_numpy(arr[s:s + batch]).to(dev)
                out.append(self.net_.emo(self.net_.proj[modality](x)).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.width), np.float32)

    def encode(self, X: Features) -> dict[str, np.ndarray]:
        """Per trained modality present in X: emotion features `[N, width]`, zeros where absent."""
        out = {}
        for m in self._modalities(set(X.pooled) & set(self.meta_["modalities"])):
            mask = np.asarray(X.masks[m], bool)
            feats = np.zeros((len(X), self.width), np.float32)
            feats[mask] = self.encode_modality(m, X.pooled[m][mask])
            out[m] = feats
        return out

    def proba_of(self, modality: str, emo: np.ndarray) -> np.ndarray:
        """Class probabilities `[N, C]` from one modality's emotion features (its own label subset)."""

        dev = next(self.net_.parameters()).device
        mask = torch.as_tensor(self.meta_["class_mask"][modality], device=dev)
        with torch.no_grad():
            logits = self.net_.fine(torch.from_numpy(np.asarray(emo, np.float32)).to(dev)).masked_fill(~mask, _FAR)
            return torch.softmax(logits, -1).cpu().numpy().astype(np.float64)

    def predict_proba(self, X: Features) -> np.ndarray:
        """Mean over the item's present modalities; uniform for an item with none."""
        self._check_features(X)
        n_cls = len(self.meta_["classes"])
        total, count = np.zeros((len(X), n_cls)), np.zeros(len(X))
        for m, emo in self.encode(X).items():
            mask = np.asarray(X.masks[m], bool)
            if mask.any():
                total[mask] += self.proba_of(m, emo[mask])
                count += mask
        none = count == 0
        total[none] = 1.0 / n_cls
        count[none] = 1
        return total / count[:, None]

    # ---- persistence -----------------------------------------------------------------
    def _state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in self.net_.state_dict().items()}

    def _restore(self, state: Mapping[str, np.ndarray], meta: dict) -> None:

        dims = {m: meta["dims"][m] for m in meta["modalities"]}
        self.final_relu = bool(meta.get("final_relu", True))  # runs saved before the option had the ReLU
        self.net_ = _network(dims, self.proj_width, self.width, len(meta["classes"]), len(meta["coarse_classes"]),
                             self.final_relu)
        self.net_.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        self.net_.eval()

    def encoder_hash(self) -> str:
        """A digest of every learned tensor: the derived features' fingerprint includes it."""
        h = hashlib.sha256()
        for name, arr in sorted(self._state().items()):
            h.update(name.encode() + b"\0" + str(arr.dtype).encode() + str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]
