"""`concept`: the concept-guided head (paper 000, section 3.2, eq. 7-8).

Each modality's standardised pooled features go through a small encoder to the concept width
(the memory's width, 256 for SCL). One modality: that is the concept-guided feature `f_uni`.
Several: the per-modality features are concatenated and passed through an FC layer: `f_multi`
(an absent modality contributes zeros). A linear classifier reads the feature, and training
minimises

    L_down = L_CE + lambda * L_S,   L_S = 1/N sum_i || f_i^ec - f_i^down ||^2

where `f^ec` is the supramodal concept of the item's class, sampled from the replay memory given
by `memory=<folder>` for every batch (heads/concepts.py). The memory is read at fit time only;
a saved head predicts without it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featurestore.config import field
from featurestore.errors import ConfigError

from ._torch import TorchHead, TorchParams, _check_kind, pick_device, seeded
from .base import Features, Targets
from .concepts import MODES, ConceptBank
from .scl import _small_model_threads

__all__ = ["ConceptHead", "ConceptConfig", "concept_loss"]


@dataclasses.dataclass(frozen=True)
class ConceptConfig(TorchParams):
    memory: str = field("", "folder of the replay memory (store/memory/NAME) the concepts come from")
    lam: float = field(0.5, "lambda: weight of the concept similarity loss (eq. 8)")
    k: int = field(8, "features drawn per modality for each concept (eq. 6)")
    mode: str = field("replay", "concepts: replay | no_selectivity | no_generalisation (ablations)")
    hidden: int = field(256, "hidden width of each modality's encoder")
    dropout: float = field(0.1, "dropout in each modality's encoder")
    epochs: int = field(40, "maximum passes over the training split")
    batch_size: int = field(64, "items per mini-batch")

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {list(MODES)}")
        bad = [msg for ok, msg in ((self.lam >= 0, f"lam={self.lam} must be >= 0"),
                                   (self.k >= 1, f"k={self.k} must be at least 1"),
                                   (self.hidden >= 1, f"hidden={self.hidden} must be at least 1"),
                                   (0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")) if not ok]
        if bad:
            raise ConfigError("; ".join(bad))


def _build(dims: dict[str, int], hidden: int, width: int, n_out: int, dropout: float):

    class ConceptNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = sorted(dims)
            self.enc = nn.ModuleDict({m: nn.Sequential(nn.Linear(dims[m], hidden), nn.ReLU(), nn.Dropout(dropout),
                                                       nn.Linear(hidden, width)) for m in self.mods})
            self.fuse = nn.Linear(width * len(self.mods), width) if len(self.mods) > 1 else nn.Identity()
            self.cls = nn.Linear(width, n_out)

        def features(self, x):
            parts, start = [], 0
            masks = x[:, sum(dims.values()):]
            for i, m in enumerate(self.mods):
                parts.append(self.enc[m](x[:, start:start + dims[m]]) * masks[:, i:i + 1])
                start += dims[m]
            return self.fuse(torch.cat(parts, 1))

        def forward(self, x, with_features: bool = False):
            f = self.features(x)
            return (self.cls(f), f) if with_features else self.cls(f)

    return ConceptNet()


class ConceptHead(TorchHead):
    name = "concept"
    Config = ConceptConfig
    supports = frozenset({"single", "binary"})
    requires = ("memory",)
    description = "concept-guided head (paper 000): CE + lambda * MSE to supramodal concepts (--memory NAME)"

    @classmethod
    def example_params(cls, workdir: Path) -> dict:
        """A tiny random replay memory (16-d, common emotion and polarity labels) in `workdir`."""
        from featurestore.memory import Memory

        labels = ["anger", "happy", "sad", "neutral", "negative", "positive"]
        rng = np.random.default_rng(0)
        n = 8 * len(labels) * 2
        mem = Memory(16, spec={"name": "example", "coarse_map": {}})
        mem.add(np.arange(n), rng.normal(size=(n, 16)),
                {"modality": ["text", "audio"] * (n // 2), "class": [labels[i // 16] for i in range(n)],
                 "confidence": rng.random(n), "correct": np.ones(n, bool), "pool": rng.random(n) < 0.5})
        folder = mem.save(Path(workdir) / "example-memory")
        return {"memory": str(folder), "epochs": 3, "device": "cpu"}

    def _network(self, in_dim: int, out_dim: int):
        return _build(self.meta_["dims"], self.hidden, int(self.meta_["concept_dim"]), out_dim, self.dropout)

    def _bank(self, classes: list[str]) -> tuple[ConceptBank, dict]:
        from featurestore.memory import Memory

        if not self.memory:
            raise ConfigError("head 'concept' needs a replay memory: pass --memory NAME (fs memory list; "
                              "build one with fs memory build NAME --from SCL_RUN)")
        mem = Memory.load(Path(self.memory), device="cpu")
        bank = ConceptBank.from_memory(mem, classes, selective=self.mode != "no_selectivity")
        info = {"memory": str(self.memory), "memory_name": mem.spec.get("name"), "scl_run": mem.spec.get("run"),
                "concept_dim": mem.dim, "concept_fallbacks": bank.fallbacks,
                "concept_counts": {m: bank.counts[i].tolist() for i, m in enumerate(bank.modalities)}}
        return bank, info

    stacked = True  # trains through heads._vmapped (a stack of one alone), so sweeps of it are vectorised

    def stack_key(self) -> tuple:
        """Configurations that can train as one vectorised stack: same network, seed, concept draws, dropout."""
        return ("ConceptHead", int(self.seed), int(self.batch_size), int(self.hidden), float(self.dropout),
                int(self.k), self.mode, str(self.memory), str(self.device))

    @staticmethod
    def fit_stack(hs, X: Features, y: Targets, *, eval_set=None, log=None) -> list:
        """Fit many concept heads on the same data as vectorised stacks (see `fit_concept`)."""
        return fit_concept(hs, X, y, eval_set=eval_set, log=log)

    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "ConceptHead":
        fit_concept([self], X, y, eval_set=eval_set)
        return self

    def concept_features(self, X: Features) -> np.ndarray:
        """The concept-guided features `f^down` `[N, width]` (what eq. 7 pulls towards the concepts)."""

        self._check_features(X)
        with torch.no_grad():
            return self.net_.features(torch.from_numpy(self._flat(X))).numpy()


def concept_loss(logits, f, y, concept, valid, lam):
    """Eq. 8 for a stack of C configurations: `L_CE + lam * L_S`, with eq. 7's
    `L_S = 1/N sum_i ||f_ec_i - f_down_i||^2` over the N items of the batch that have a concept.

    logits `[C, B, K]`, concept-guided features f `[C, B, W]`, labels y `[B]`, concepts `[B, W]`,
    valid `[B]` (bool), lam `[C]`; returns `[C]`."""

    C, B, K = logits.shape
    ce = F.cross_entropy(logits.float().reshape(C * B, K), y.repeat(C), reduction="none").view(C, B).mean(1)
    if not bool(valid.any()):
        return ce
    sim = (f.float()[:, valid] - concept[valid].float()).pow(2).sum(2).mean(1)
    return ce + lam * sim


def fit_concept(hs, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None,
                log=None) -> list:
    """Fit `concept` heads on the same data, one vectorised stack per `stack_key` (heads._vmapped).

    Each head ends as if trained alone (a head's own `fit` is this with one head). In a stack the
    configurations share the network shape, seed, dropout and the concept draws (memory, k, mode:
    one draw per batch from a generator seeded with the seed, as a solo run draws); they may differ
    in lr, weight_decay, lam, epochs and patience.
    """

    from ._torch import autocast, scores_from_outputs, validation_scorer
    from ._vmapped import VmapSpec, train_vmapped

    if not hs:
        return []
    for h in hs:
        _check_kind(h, y)
    if not len(y):
        raise ConfigError("head 'concept': no training items")
    groups: dict[tuple, list] = {}
    for h in hs:
        groups.setdefault(h.stack_key(), []).append(h)
    for key, members in groups.items():
        lead = members[0]
        bank, info = lead._bank(list(y.classes))
        for h in members:
            h._set_meta(X, y, **info)
        lead._fit_norm(X)
        for h in members[1:]:
            h.norm_ = lead.norm_
        device = pick_device(lead.device)
        train = lead._tensors(X, y)
        rng = np.random.default_rng(lead.seed)
        lam = torch.tensor([h.lam for h in members], dtype=torch.float32, device=device)

        def losses_fn(forward, batch, active, lam=lam, bank=bank, rng=rng, lead=lead):
            logits, f = forward(batch)  # [C, B, K], [C, B, W]
            concept, valid = bank.sample(batch["y"].cpu().numpy(), rng, k=lead.k, mode=lead.mode)
            idx = torch.tensor(active, dtype=torch.long, device=device)
            return concept_loss(logits, f, batch["y"], torch.from_numpy(concept).to(f.device),
                                torch.from_numpy(valid).to(f.device), lam[idx])

        val_score = None
        if eval_set is not None:
            Xv, yv = eval_set
            lead._check_features(Xv)
            vx = lead._tensors(Xv).tensors["x"].to(device)
            scorers = [validation_scorer(h, yv, y.kind) for h in members]

            def val_score(model_of, active, scorers=scorers, vx=vx):
                return [scorers[c](scores_from_outputs(model_of(pos)(vx), y.kind)) for pos, c in enumerate(active)]

        if log:
            log(f"training a stack of {len(members)} concept configuration(s) (seed {lead.seed}, batch size {lead.batch_size})")
        spec = VmapSpec([h.lr for h in members], [h.weight_decay for h in members],
                        [h.epochs for h in members], [h.patience for h in members])
        with seeded(lead.seed, device), _small_model_threads(device):
            net = lead._network(0, y.n_outputs).to(device)
            states, hists = train_vmapped(net, spec, train, batch_size=lead.batch_size, seed=lead.seed,
                                          device=device, losses_fn=losses_fn, val_score=val_score,
                                          amp=lambda d=device: autocast(d), args_of=lambda b: (b["x"], True),
                                          log=log)
        for h, state, hist in zip(members, states, hists):
            with seeded(h.seed):  # the caller's global RNG is left as it was
                h.net_ = h._network(0, y.n_outputs)
            h.net_.load_state_dict(state)
            h.net_.eval()
            h.history_ = {**hist, "stack_size": len(members)}  # trained alongside this many
            h.settle_decision(eval_set)
    return list(hs)
