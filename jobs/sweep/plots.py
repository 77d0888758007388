"""The pictures of a sweep: the ranking metric against each swept hyperparameter."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from featurestore._io import publish, tmp_path

__all__ = ["plot_sweep"]


def plot_sweep(folder: Path, table, definition: dict) -> list[Path]:
    """metric_vs_<param>.png per swept hyperparameter (matplotlib Agg, no pyplot)."""
    from matplotlib.figure import Figure

    metric = definition["metric"]
    col = f"val_{metric}"
    out = []
    if col not in table.columns:
        return out
    y = np.array([np.nan if v is None else v for v in table[col].to_list()], float)
    for name in definition.get("swept", []):
        if name not in table.columns:
            continue
        vals = table[name].to_list()
        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
        if numeric:
            x = np.array(vals, float)
            ax.scatter(x, y, s=14)
            if (x > 0).all() and x.max() / max(x.min(), 1e-300) >= 20:
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v in vals})
            ax.scatter([labels.index(str(v)) for v in vals], y, s=14)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(name)
        ax.set_ylabel(f"val {metric}")
        ax.set_title(f"{definition['method']} on {definition['dataset']}")
        fig.tight_layout()
        path = folder / f"metric_vs_{name}.png"
        tmp = tmp_path(path).with_suffix(".png")
        fig.savefig(tmp, dpi=90, format="png")
        publish(tmp, path)
        out.append(path)
    return out
