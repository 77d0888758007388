"""`linear`: softmax regression (single-label), one-vs-rest logistic (multi-label), or least squares (VA)."""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from .base import DecisionParams
from ._torch import TorchHead, TorchParams

__all__ = ["Linear", "LinearConfig"]


@dataclasses.dataclass(frozen=True)
class LinearConfig(TorchParams, DecisionParams):
    pass


class Linear(TorchHead):
    name = "linear"
    Config = LinearConfig
    stacked = True
    description = "one linear layer over the standardised, concatenated modalities (+ presence flags)"

    def _network(self, in_dim: int, out_dim: int):
        return nn.Linear(in_dim, out_dim)
