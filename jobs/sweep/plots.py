"""The pictures of a sweep: the ranking metric against each swept hyperparameter (jobs/plots.py draws them)."""
from __future__ import annotations

from pathlib import Path

from ..plots import plot_sweep_param

__all__ = ["plot_sweep"]


def plot_sweep(folder: Path, table, definition: dict) -> list[Path]:
    """metric_vs_<param>.png per swept hyperparameter."""
    out = []
    for name in definition.get("swept", []):
        path = plot_sweep_param(Path(folder) / f"metric_vs_{name}.png", table, definition, name)
        if path is not None:
            out.append(path)
    return out
