"""`mlp`: a small multilayer perceptron over the concatenated modalities."""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from featurestore.config import field
from featurestore.errors import ConfigError

from .base import DecisionParams
from ._torch import TorchHead, TorchParams

__all__ = ["MLP", "MLPConfig"]


@dataclasses.dataclass(frozen=True)
class MLPConfig(TorchParams, DecisionParams):
    hidden: int = field(256, "width of each hidden layer")
    layers: int = field(2, "number of hidden layers")
    dropout: float = field(0.2, "dropout after each hidden layer")

    def __post_init__(self):
        super().__post_init__()
        bad = [f"{n}={getattr(self, n)} must be at least 1" for n in ("hidden", "layers") if getattr(self, n) < 1]
        if not 0 <= self.dropout < 1:
            bad.append(f"dropout={self.dropout} must be in [0, 1)")
        if bad:
            raise ConfigError("; ".join(bad))


class MLP(TorchHead):
    name = "mlp"
    Config = MLPConfig
    stacked = True
    description = "MLP (Linear-GELU-Dropout blocks) over the standardised, concatenated modalities"

    def _network(self, in_dim: int, out_dim: int):
        blocks, width = [], in_dim
        for _ in range(self.layers):
            blocks += [nn.Linear(width, self.hidden), nn.GELU(), nn.Dropout(self.dropout)]
            width = self.hidden
        return nn.Sequential(*blocks, nn.Linear(width, out_dim))
