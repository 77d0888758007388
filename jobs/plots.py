"""The pictures a run and a sweep leave in their folders, made to be shared as they are: each titled
with the run (or sweep), the dataset, the split and the metric; colour bars; numbers readable on every
cell; a value on every bar; log axes for log-scale parameters.

matplotlib's Agg canvas through `Figure` (no pyplot: no global backend state, safe in threads).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from featurestore._io import publish, tmp_path

__all__ = ["plot_run", "run_figure", "plot_sweep_param", "sweep_figure", "short_number", "LOG_PARAMS", "text_colour", "save"]

# parameters searched on a log scale whatever the sweep's values: a linear axis squeezes them into a corner
LOG_PARAMS = {"lr", "weight_decay", "min_lr", "learning_rate", "reg_lambda", "reg_alpha", "eps", "tau",
              "kl_weight", "lam", "alpha", "gamma", "beta1", "beta2"}

_METRIC_NAMES = {"uar": "UAR", "war": "WAR", "acc": "accuracy", "acc2": "Acc-2", "ccc": "CCC",
                 "macro_f1": "macro F1", "micro_f1": "micro F1", "weighted_f1": "weighted F1",
                 "accuracy": "accuracy", "hamming_loss": "Hamming loss", "pearson": "Pearson r"}


def metric_name(key: str) -> str:
    return _METRIC_NAMES.get(key, key.replace("_", " "))


def text_colour(rgba: Sequence[float]) -> str:
    """White on a dark cell, black on a light one (relative luminance of the cell's colour)."""
    r, g, b = (float(c) for c in rgba[:3])
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "white" if lum < 0.5 else "black"


def save(fig, path: Path, dpi: int = 110) -> Path:
    """Write the PNG under a temporary name and rename it into place."""
    tmp = tmp_path(path).with_suffix(".png")
    fig.savefig(tmp, dpi=dpi, format="png")
    publish(tmp, path)
    return path


def _title(run: str, dataset: str, split: str, metrics: dict, keys: Sequence[str]) -> str:
    scores = ", ".join(f"{metric_name(k)} {metrics[k]:.3f}" for k in keys
                       if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k]))
    return f"run {run}\n{dataset}, {split} split" + (f": {scores}" if scores else "")


# ---- a run -------------------------------------------------------------------------------------
def plot_run(folder: Path, kind: str, classes: list[str], targets, pred: np.ndarray, proba: np.ndarray, *,
             run: str = "", dataset: str = "", split: str = "test", metrics: dict | None = None) -> Path:
    """confusion.png (single/binary), per_class_f1.png (multi) or va.png (regression)."""
    fig, name = run_figure(kind, classes, targets, pred, run=run, dataset=dataset, split=split, metrics=metrics)
    return save(fig, Path(folder) / name)


def run_figure(kind: str, classes: list[str], targets, pred: np.ndarray, *, run: str = "", dataset: str = "",
               split: str = "test", metrics: dict | None = None):
    """(Figure, file name) of a run's picture."""
    from matplotlib.figure import Figure

    from featurestore.heads import metrics as m

    metrics = metrics or {}
    n = len(classes)
    if kind in ("single", "binary"):
        cm = m.confusion_matrix(targets.y, pred, n)
        fig = Figure(figsize=(max(5.0, 0.75 * n + 3), max(4.2, 0.65 * n + 2.4)))
        ax = fig.add_subplot()
        im = ax.imshow(cm, cmap="Blues", vmin=0)
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label("items")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        rows = cm.sum(1, keepdims=True)
        for (i, j), v in np.ndenumerate(cm):
            share = f"\n{v / rows[i, 0]:.0%}" if rows[i, 0] and n <= 12 else ""
            ax.text(j, i, f"{v}{share}", ha="center", va="center", fontsize=8 if n <= 12 else 6,
                    color=text_colour(im.cmap(im.norm(v))))
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class (row % of the true class)")
        keys = ("uar", "war", "acc2", "macro_f1") if kind == "single" else ("acc2", "uar", "macro_f1")
        ax.set_title(_title(run, dataset, split, metrics, keys), fontsize=9)
        name = "confusion.png"
    elif kind == "multi":
        f1 = np.asarray(m.per_class_f1(targets.y, pred), float)
        fig = Figure(figsize=(6.4, max(3.2, 0.4 * n + 1.8)))
        ax = fig.add_subplot()
        bars = ax.barh(range(n), f1, color="#4C72B0")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in f1], padding=3, fontsize=8)
        ax.set_yticks(range(n), classes)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        ax.set_xlabel("F1 per class (the number is the value; 0.00 is a class never predicted right)")
        ax.set_title(_title(run, dataset, split, metrics, ("acc", "micro_f1", "macro_f1")), fontsize=9)
        name = "per_class_f1.png"
    else:
        fig = Figure(figsize=(8.8, 4.4))
        y, p = np.asarray(targets.y, float), np.asarray(pred, float)
        for d, label in enumerate(("valence", "arousal")):
            ax = fig.add_subplot(1, 2, d + 1)
            ok = np.isfinite(y[:, d]) & np.isfinite(p[:, d])
            ax.scatter(y[ok, d], p[ok, d], s=6, alpha=0.6, color="#4C72B0")
            ax.plot([-1, 1], [-1, 1], color="grey", lw=1, ls="--", label="perfect")
            ax.set_xlim(-1.05, 1.05)
            ax.set_ylim(-1.05, 1.05)
            ax.set_aspect("equal")
            ax.set_xlabel(f"true {label}")
            ax.set_ylabel(f"predicted {label}")
            if ok.sum() > 1:
                ax.set_title(f"{label}: CCC {m.ccc(y[ok, d], p[ok, d]):.3f} ({int(ok.sum())} items)", fontsize=9)
            else:
                ax.set_title(f"{label}: no labelled items", fontsize=9)
                ax.text(0, 0, f"no item of this split\nhas a {label} label", ha="center", va="center",
                        fontsize=9, color="grey")
            ax.legend(loc="upper left", fontsize=7)
        fig.suptitle(_title(run, dataset, split, metrics, ("ccc",)), fontsize=9)
        name = "va.png"
    fig.tight_layout()
    return fig, name


# ---- a sweep -----------------------------------------------------------------------------------
def _numeric(vals: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals if v is not None)


def is_log_param(name: str, values: Sequence[float], spec: Any = None) -> bool:
    """A log axis for a parameter searched on a log scale, a known scale parameter, or positive values
    spanning more than a factor of 20."""
    vals = np.asarray([v for v in values if v is not None], float)
    if not len(vals) or (vals <= 0).any():
        return False
    if isinstance(spec, dict) and spec.get("log"):
        return True
    return name in LOG_PARAMS or vals.max() / vals.min() >= 20


def _log_axis(ax, values: np.ndarray) -> None:
    """A log x axis whose labels never overlap: one label per decade (or per value when few)."""
    from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullFormatter, NullLocator

    ax.set_xscale("log")
    lo, hi = float(values.min()), float(values.max())
    ax.set_xlim(lo / 1.6, hi * 1.6)
    uniq = np.unique(values)
    if len(uniq) <= 6:
        ax.xaxis.set_major_locator(FixedLocator(uniq))
        ax.xaxis.set_major_formatter(_ValueFormatter())
    else:
        decades = np.arange(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        step = max(1, math.ceil(len(decades) / 6))
        ax.xaxis.set_major_locator(FixedLocator(10.0 ** decades[::step]))
        ax.xaxis.set_major_formatter(LogFormatterSciNotation())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


class _ValueFormatter:
    """Short numbers for tick labels: 0.001 -> 1e-3, 0.03 -> 0.03."""

    def __new__(cls):
        from matplotlib.ticker import FuncFormatter

        return FuncFormatter(lambda v, _pos: short_number(v))


def short_number(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-2 or abs(v) >= 1e4:
        mant, exp = f"{v:.1e}".split("e")
        mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    return f"{v:.3g}"


def plot_sweep_param(path: Path, table, definition: dict, name: str) -> Path | None:
    """metric_vs_<name>.png (`sweep_figure`)."""
    fig = sweep_figure(table, definition, name)
    return None if fig is None else save(fig, path)


def sweep_figure(table, definition: dict, name: str):
    """The validation metric against one swept parameter; the other swept parameters are told apart
    by colour (lines per combination when they take few, else a legend or a colour bar for the one
    with fewest values). None when the table lacks the column."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    metric = definition["metric"]
    col = f"val_{metric}"
    if name not in table.columns or col not in table.columns:
        return None
    y = np.array([np.nan if v is None else v for v in table[col].to_list()], float)
    vals = table[name].to_list()
    others = [p for p in definition.get("swept", []) if p != name and p in table.columns]
    fig = Figure(figsize=(6.8, 4.4))
    ax = fig.add_subplot()
    spec = (definition.get("space") or {}).get(name)
    if _numeric(vals):
        x = np.array([np.nan if v is None else v for v in vals], float)
        log = is_log_param(name, x[np.isfinite(x)], spec)
    else:
        labels = sorted({str(v) for v in vals})
        x = np.array([labels.index(str(v)) for v in vals], float)
        log = False
    combos = [tuple(table[p][i] for p in others) for i in range(table.height)]
    distinct = sorted(set(combos), key=lambda c: tuple(str(v) for v in c))
    if others and len(distinct) <= 10:
        cmap = colormaps["tab10"]
        for k, combo in enumerate(distinct):
            idx = [i for i, c in enumerate(combos) if c == combo]
            order = sorted(idx, key=lambda i: x[i])
            label = ", ".join(f"{p}={short_number(v) if isinstance(v, float) else v}" for p, v in zip(others, combo))
            ax.plot(x[order], y[order], marker="o", ms=5, lw=1, color=cmap(k % 10), label=label)
        ax.legend(fontsize=7, title=" / ".join(others), title_fontsize=7, loc="best")
    elif others:
        by = min(others, key=lambda p: len({str(v) for v in table[p].to_list()}))
        rest = [p for p in others if p != by]
        also = f" (also swept: {', '.join(rest)})" if rest else ""
        cvals = table[by].to_list()
        levels = sorted({v for v in cvals}, key=lambda v: (str(type(v)), v if v is not None else 0))
        if len(levels) <= 8 or not _numeric(cvals):
            cmap = colormaps["tab10"]
            for k, level in enumerate(levels):
                idx = [i for i, v in enumerate(cvals) if v == level]
                ax.scatter(x[idx], y[idx], s=24, color=cmap(k % 10), edgecolors="black", linewidths=0.3,
                           label=short_number(level) if isinstance(level, float) else str(level))
            ax.legend(fontsize=7, title=by + also, title_fontsize=7, loc="best")
        else:
            from matplotlib.colors import LogNorm, Normalize

            c = np.array([np.nan if v is None else v for v in cvals], float)
            norm = LogNorm(np.nanmin(c), np.nanmax(c)) if is_log_param(by, c[np.isfinite(c)], 
                                                                       (definition.get("space") or {}).get(by)) \
                else Normalize(np.nanmin(c), np.nanmax(c))
            sc = ax.scatter(x, y, c=c, cmap="viridis", norm=norm, s=24, edgecolors="black", linewidths=0.3)
            bar = fig.colorbar(sc, ax=ax)
            bar.set_label(by + also)
    else:
        ax.scatter(x, y, s=22, color="#4C72B0", edgecolors="black", linewidths=0.3)
    if log:
        _log_axis(ax, x[np.isfinite(x)])
    elif not _numeric(vals):
        ax.set_xticks(range(len(labels)), labels, rotation=30 if max(map(len, labels)) > 6 else 0, ha="right")
    elif len(np.unique(x[np.isfinite(x)])) <= 8:  # a few values (a grid, a list of choices): a tick on each
        uniq = np.unique(x[np.isfinite(x)])
        ax.set_xticks(uniq, [short_number(float(v)) for v in uniq])
    best = np.nanargmax(y) if metric not in ("hamming_loss",) else np.nanargmin(y)
    if np.isfinite(y).any():
        ax.scatter([x[best]], [y[best]], s=140, marker="*", color="gold", edgecolors="black", linewidths=0.6,
                   zorder=5)
        left = x[best] <= np.nanmedian(x)
        ax.annotate(f"best {y[best]:.3f}", (x[best], y[best]), textcoords="offset points",
                    xytext=(10, -4) if left else (-10, -4), ha="left" if left else "right", fontsize=8, zorder=6)
    ax.margins(y=0.12)
    ax.set_xlabel(name + (" (log scale)" if log else ""))
    ax.set_ylabel(f"validation {metric_name(metric)}")
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep {definition.get('id', '')}: {definition['method']} on {definition['dataset']}\n"
                 f"validation split, {metric_name(metric)} against {name} ({table.height} configurations)", fontsize=9)
    fig.tight_layout()
    return fig
