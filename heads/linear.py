"""`linear`: softmax regression (single-label), one-vs-rest logistic (multi-label), or least squares (VA)."""
from __future__ import annotations

import dataclasses

from ._torch import TorchHead, TorchParams

__all__ = ["Linear", "LinearConfig"]


@dataclasses.dataclass(frozen=True)
class LinearConfig(TorchParams):
    pass


class Linear(TorchHead):
    name = "linear"
    Config = LinearConfig
    stacked = True
    description = "one linear layer over the standardised, concatenated modalities (+ presence flags)"

    def _network(self, in_dim: int, out_dim: int):
        import torch.nn as nn

        return nn.Linear(in_dim, out_dim)
