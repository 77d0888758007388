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

from featurestore.config import field
from featurestore.errors import ConfigError

from ._torch import TorchHead, TorchParams, _check_kind, pick_device, seeded, train_loop
from .base import Features, Targets
from .concepts import MODES, ConceptBank
from .scl import _small_model_threads

__all__ = ["ConceptHead", "ConceptConfig"]


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
        if self.lam < 0 or self.k < 1 or self.hidden < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"lam={self.lam} >= 0, k={self.k} >= 1, hidden={self.hidden} >= 1, "
                              f"dropout={self.dropout} in [0, 1) are required")


def _build(dims: dict[str, int], hidden: int, width: int, n_out: int, dropout: float):
    import torch
    import torch.nn as nn

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

        def forward(self, x):
            return self.cls(self.features(x))

    return ConceptNet()


class ConceptHead(TorchHead):
    name = "concept"
    Config = ConceptConfig
    supports = frozenset({"single", "binary"})
    description = "concept-guided head (paper 000): CE + lambda * MSE to supramodal concepts (memory=FOLDER)"

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
            raise ConfigError("head 'concept' needs memory=FOLDER, a replay memory (fs memory list; "
                              "build one with fs memory build NAME --from SCL_RUN)")
        mem = Memory.load(Path(self.memory), device="cpu")
        bank = ConceptBank.from_memory(mem, classes, selective=self.mode != "no_selectivity")
        info = {"memory": str(self.memory), "memory_name": mem.spec.get("name"), "scl_run": mem.spec.get("run"),
                "concept_dim": mem.dim, "concept_fallbacks": bank.fallbacks,
                "concept_counts": {m: bank.counts[i].tolist() for i, m in enumerate(bank.modalities)}}
        return bank, info

    def fit(self, X: Features, y: Targets, *, eval_set: tuple[Features, Targets] | None = None) -> "ConceptHead":
        import torch
        import torch.nn.functional as F

        _check_kind(self, y)
        if not len(y):
            raise ConfigError("head 'concept': no training items")
        bank, info = self._bank(list(y.classes))
        self._set_meta(X, y, **info)
        self._fit_norm(X)
        device = pick_device(self.device)
        train = self._tensors(X, y)
        rng = np.random.default_rng(self.seed)

        def loss_fn(model, batch):
            f = model.features(batch["x"])
            ce = F.cross_entropy(model.cls(f).float(), batch["y"])
            concept, valid = bank.sample(batch["y"].cpu().numpy(), rng, k=self.k, mode=self.mode)
            if not valid.any():
                return ce
            c = torch.from_numpy(concept[valid]).to(f.device)
            sim = (f.float()[torch.from_numpy(valid).to(f.device)] - c).pow(2).sum(1).mean()
            return ce + self.lam * sim

        val_score = self._val_scorer(eval_set, y.kind, device)

        with seeded(self.seed, device), _small_model_threads(device):
            self.net_ = self._network(0, y.n_outputs).to(device)
            self.history_ = train_loop(self.net_, loss_fn, train, params=self._loop_params(), device=device,
                                       val_score=val_score)
        self.net_ = self.net_.cpu().eval()
        return self

    def concept_features(self, X: Features) -> np.ndarray:
        """The concept-guided features `f^down` `[N, width]` (what eq. 7 pulls towards the concepts)."""
        import torch

        self._check_features(X)
        with torch.no_grad():
            return self.net_.features(torch.from_numpy(self._flat(X))).numpy()
