"""Issue 11 (item 5): the pictures a run or a sweep writes, checked on the drawn figure itself."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from featurestore.heads.base import Targets  # noqa: E402
from featurestore.jobs import plots  # noqa: E402

CLASSES = ["anger", "happy", "neutral", "sad"]


def drawn(fig):
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def luminance(c) -> float:
    r, g, b, _ = to_rgba(c)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_text_colour_follows_the_cell():
    assert plots.text_colour((0.03, 0.19, 0.42, 1.0)) == "white"  # Blues' darkest
    assert plots.text_colour((0.97, 0.98, 1.0, 1.0)) == "black"  # Blues' lightest


def test_confusion_matrix_is_titled_has_a_colour_bar_and_readable_cells():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    pred = np.where(rng.random(300) < 0.7, y, rng.integers(0, 4, 300))
    fig, name = plots.run_figure("single", CLASSES, Targets("single", y, CLASSES), pred, run="mlp-raf-1",
                                 dataset="raf", split="test", metrics={"uar": 0.712, "war": 0.7})
    drawn(fig)
    assert name == "confusion.png"
    main, bar = fig.axes  # the matrix and its colour bar
    title = main.get_title()
    assert "mlp-raf-1" in title and "raf" in title and "test split" in title and "UAR 0.712" in title
    assert bar.get_ylabel() == "items"
    image = main.get_images()[0]
    cm = np.zeros((4, 4), int)
    np.add.at(cm, (y, pred), 1)
    texts = main.texts
    assert len(texts) == 16
    for t in texts:
        j, i = (round(v) for v in t.get_position())
        assert t.get_text().split("\n")[0] == str(cm[i, j])
        cell = image.cmap(image.norm(cm[i, j]))
        # readable: the text is the opposite end of the luminance scale from its cell
        assert (luminance(t.get_color()) > 0.5) == (luminance(cell) < 0.5), (t.get_text(), cell, t.get_color())
    assert any(t.get_color() == "white" for t in texts) and any(t.get_color() == "black" for t in texts)


def test_per_class_f1_bars_carry_their_values_even_zero():
    y = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]] * 5, np.float32)
    pred = y.copy()
    pred[:, 2] = 0  # class 'neutral' never predicted: F1 0
    fig, name = plots.run_figure("multi", CLASSES, Targets("multi", y, CLASSES), pred, run="r", dataset="d",
                                 split="val", metrics={"acc": 0.5, "macro_f1": 0.5})
    drawn(fig)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert name == "per_class_f1.png" and labels == ["1.00", "1.00", "0.00", "0.00"]
    assert "val split" in ax.get_title() and "macro F1 0.500" in ax.get_title()


def test_va_scatter_names_each_dimension_and_an_empty_one():
    y = np.stack([np.linspace(-1, 1, 20), np.full(20, np.nan)], 1).astype(np.float32)
    fig, name = plots.run_figure("va", [], Targets("va", y), y * 0.5, run="r", dataset="d", split="test",
                                 metrics={"ccc": 0.6})
    drawn(fig)
    assert name == "va.png"
    valence, arousal = fig.axes
    assert valence.get_title().startswith("valence: CCC") and arousal.get_title() == "arousal: no labelled items"
    assert "run r" in fig._suptitle.get_text()


def _sweep_table(n_lr: int):
    lrs = np.geomspace(1e-5, 1e-1, n_lr)
    rows = []
    for i, lr in enumerate(lrs):
        for dropout in (0.1, 0.3):
            rows.append({"trial": len(rows), "lr": float(lr), "dropout": dropout,
                         "val_uar": float(0.5 + 0.05 * np.log10(lr) / 5 + dropout / 10)})
    return pl.DataFrame(rows)


def test_sweep_plot_puts_lr_on_a_log_axis_with_labels_that_do_not_overlap():
    table = _sweep_table(25)
    definition = {"id": "mlp-raf-abc", "method": "mlp", "dataset": "raf", "metric": "uar", "swept": ["lr", "dropout"],
                  "space": {"lr": {"low": 1e-5, "high": 1e-1, "log": True}}}
    fig = plots.sweep_figure(table, definition, "lr")
    renderer = drawn(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
    lo, hi = ax.get_xlim()
    labels = [t for t in labels if lo <= t.get_position()[0] <= hi]
    assert 3 <= len(labels) <= 7
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
    assert ax.get_xticks(minor=True).size == 0 or not any(t.get_text() for t in ax.get_xticklabels(minor=True))
    title = ax.get_title()
    assert "mlp-raf-abc" in title and "raf" in title and "validation split" in title and "UAR" in title
    legend = ax.get_legend()  # the other parameter, dropout, told apart by colour
    assert legend is not None and sorted(t.get_text() for t in legend.get_texts()) == ["dropout=0.1", "dropout=0.3"]


def test_sweep_plot_of_a_known_log_parameter_with_few_values():
    table = pl.DataFrame({"trial": [0, 1, 2], "weight_decay": [1e-5, 1e-4, 1e-3], "val_uar": [0.5, 0.6, 0.55]})
    definition = {"id": "s", "method": "mlp", "dataset": "d", "metric": "uar", "swept": ["weight_decay"], "space": {}}
    fig = plots.sweep_figure(table, definition, "weight_decay")
    drawn(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-5", "1e-4", "1e-3"]


def test_sweep_plot_colours_many_combinations_with_a_colour_bar():
    rng = np.random.default_rng(1)
    n = 40
    table = pl.DataFrame({"trial": range(n), "lr": np.exp(rng.uniform(np.log(1e-5), np.log(1e-1), n)),
                          "weight_decay": np.exp(rng.uniform(np.log(1e-6), np.log(1e-2), n)),
                          "hidden": rng.choice([64, 128, 256], n), "val_uar": rng.random(n)})
    definition = {"id": "s", "method": "mlp", "dataset": "d", "metric": "uar",
                  "swept": ["lr", "weight_decay", "hidden"], "space": {}}
    fig = plots.sweep_figure(table, definition, "lr")
    drawn(fig)
    legend = fig.axes[0].get_legend()
    assert legend is not None and "hidden" in legend.get_title().get_text()
    assert "weight_decay" in legend.get_title().get_text()
    fig = plots.sweep_figure(table, definition, "hidden")
    drawn(fig)
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel().startswith(("lr", "weight_decay"))


def test_train_head_and_sweep_write_the_pictures(tmp_path):
    """The jobs write them: a run's confusion.png and a sweep's metric_vs_<param>.png are real PNGs."""
    from featurestore.jobs.sweep import plot_sweep

    definition = {"id": "s", "method": "mlp", "dataset": "d", "metric": "uar", "swept": ["lr", "dropout"], "space": {}}
    paths = plot_sweep(tmp_path, _sweep_table(4), definition)
    assert sorted(p.name for p in paths) == ["metric_vs_dropout.png", "metric_vs_lr.png"]
    y = np.array([0, 1, 2, 3] * 3)
    out = plots.plot_run(tmp_path, "single", CLASSES, Targets("single", y, CLASSES), y, None, run="r", dataset="d")
    for p in [*paths, out]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_results_redraw_reads_back_the_tables_it_wrote(tmp_path, monkeypatch):
    """bench/results.py --redraw: the picture's numbers come back from the markdown tables, bold best
    cells included, to the 4 decimals written; the ablation rows keep their labels with spaces."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_results", Path(__file__).parents[1] / "bench" / "results.py")
    results = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_results", results)  # its dataclasses look their module up
    spec.loader.exec_module(results)
    rng = np.random.default_rng(0)
    table = {t.name: {label: {**{m: (float(rng.uniform(0, 1)), float(rng.uniform(0, .05))) for m in t.metrics},
                              "val_primary": (0.5, 0.0), "seconds": (1.0, 0.0)}
                      for label in ("linear", "mlp", "univa w/o VA-CL, w/o prior")}
             for t in results.TASKS}
    md = tmp_path / "results.md"
    md.write_text(results.markdown(table, {"An extra section": "| a | b |\n| --- | --- |\n| 1 ± 2 | 3 |"}, 3, 1.0))
    back = results.read_tables(md)
    assert list(back) == list(table)
    for task, rows in table.items():
        assert list(back[task]) == list(rows)
        for label, cells in rows.items():
            for m, (mean, std) in cells.items():
                if m not in ("val_primary", "seconds"):
                    assert back[task][label][m] == pytest.approx((mean, std), abs=5e-5)
    assert results.main(["--redraw", "--out", str(md)]) == 0 and (tmp_path / "results.png").stat().st_size > 0
