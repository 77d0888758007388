"""The results table: every registered head on the demo's real words, so a user can choose one.

    .venv/bin/python bench/results.py [--seeds 3] [--store DIR] [--out docs/results.md] [--only univa,mlp]

The demo dataset (the NRC emotion lexicon's words with their emotions, VADER's human valence
ratings) is extracted once with the packaged all-MiniLM-L6-v2 into a store of its own
(`bench/out/results-store`, a cache hit when run again). Then, per task and per seed, every
registered head trains with its defaults on train, makes every decision (early stopping, the
multi-label threshold) on validation, and is evaluated on test once. Rows: the heads, the
ablations of the papers (UniVA's table 3; the supramodal concepts'), and, where a helper module
provides them, the concept-query comparison and the two-modality comparison (text + an
emotion-free noise modality: `drkf` against `mlp` and `linear`, bench/_two_modalities.py).
Writes `docs/results.md` and `docs/results.png`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    target: str
    metrics: tuple[str, ...]  # the paper metrics of the task, in the order shown
    key: str  # the column the picture shows


TASKS = (
    Task("emotions (multi-label, 8 NRC emotions)", "labels", ("acc", "hamming_loss", "micro_f1", "macro_f1"),
         "micro_f1"),
    Task("polarity (single-label, 3 classes)", "label", ("war", "uar", "macro_f1", "weighted_f1"), "uar"),
    Task("valence (regression, VADER ratings)", "va", ("valence_r", "valence_ccc"), "valence_ccc"),
)
LOWER_IS_BETTER = {"hamming_loss"}

# Ablation rows: (head, label, params). The paper's own rows beside each head's defaults.
ABLATIONS: tuple[tuple[str, str, dict], ...] = (
    ("univa", "univa w/o VA-CL", {"contrast": "none"}),
    ("univa", "univa w/o prior", {"prior": "false"}),
    ("univa", "univa w/o VA-CL, w/o prior", {"contrast": "none", "prior": "false"}),
    ("univa", "univa, eq. 11 as printed", {"kl_weight": "1", "kl_target": "normalized", "prior_form": "paper",
                                           "learn_m": "false", "zeta": "0.18"}),
    ("univa", "univa, zeta 0.18 (the paper's)", {"zeta": "0.18"}),
    ("umbe", "umbe, one stage (the paper's ablation)", {"stages": "1"}),
    ("umbe", "umbe, stop at 80% training accuracy (the paper's)", {"stop_train_acc": "0.8"}),
)


def build_store(folder: Path):
    """The demo dataset extracted with the packaged MiniLM, and per-word valence from a ridge regressor
    fitted on the train split's VADER ratings (UniVA's per-modality VA, for every word); cache hits
    when they already are."""
    from featurestore.datasets import add_dataset, build_demo, list_datasets
    from featurestore.store import open_store
    from featurestore.jobs import va
    from featurestore.jobs.extract import ExtractConfig, run

    store = open_store(folder, create=True)
    if "demo" not in list_datasets(store):
        add_dataset(store, "demo", build_demo(), root=None, source="builtin demo")
    run(ExtractConfig(dataset="demo", modality="text", backbone="minilm", batch_size=128), store)
    if not (store.root / "va_models" / "demo-valence").is_dir():
        va.fit(va.FitConfig(dataset="demo", features="minilm", out="demo-valence"), store)
    va.run(va.VAConfig(dataset="demo", modality="text", scorer="demo-valence"), store)
    return store


def rows_for(kind: str, only: set[str] | None) -> list[tuple[str, str, dict]]:
    """(head, label, params) of every registered head that trains `kind` from features alone, and the ablations."""
    import featurestore.heads as heads

    out = []
    for name in heads.names():
        cls = heads.get(name)
        if kind not in cls.supports or cls.requires or (only and name not in only):
            continue
        out.append((name, name, {}))
    for name, label, params in ABLATIONS:
        if any(r[0] == name for r in out):
            out.append((name, label, params))
    return out


def fit_eval(name: str, params: dict, seed: int, data) -> dict:
    import featurestore.heads as heads
    from featurestore.heads import metrics

    (Xtr, ytr), (Xv, yv), (Xte, yte) = data.splits["train"], data.splits["val"], data.splits["test"]
    cls = heads.get(name)
    p = dict(params)
    if "seed" in cls.param_names():
        p["seed"] = seed
    start = time.perf_counter()
    head = cls(**p).fit(Xtr, ytr, eval_set=(Xv, yv))
    out = {k: float(v) for k, v in metrics.evaluate(yte, head.predict(Xte), head.predict_proba(Xte)).items()
           if isinstance(v, (int, float, np.number))}
    out["val_primary"] = metrics.primary(yv, head.predict(Xv), head.predict_proba(Xv))
    out["seconds"] = time.perf_counter() - start
    if "threshold" in head.meta_:
        out["threshold"] = head.meta_["threshold"]
    return out


class RowCache:
    """Finished (task, row, seed) results in a JSON file, so a rerun computes only what changed.

    An entry is reused while the source of the head's own module and of the shared training code
    (heads/base.py, _engine.py, _torch.py, _stacked.py, _vmapped.py, losses.py) is unchanged; delete
    the file (or pass --fresh) to recompute every row."""

    SHARED = ("base.py", "_engine.py", "_torch.py", "_stacked.py", "_vmapped.py", "losses.py")

    def __init__(self, path: Path, fresh: bool):
        self.path = path
        self.rows = {} if fresh or not path.is_file() else json.loads(path.read_text())

    @staticmethod
    def key(target: str, name: str, label: str, params: dict, seed: int) -> str:
        import hashlib

        import featurestore.heads as heads

        module = importlib.import_module(heads.get(name).__module__)
        files = [Path(module.__file__)] + [ROOT / "heads" / f for f in RowCache.SHARED]
        code = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        return json.dumps([target, label, sorted(params.items()), seed, code])

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, value: dict) -> None:
        self.rows[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, indent=1, default=float))
        os.replace(tmp, self.path)


def summarise(runs: list[dict], names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
    out = {}
    for m in names + ("val_primary", "seconds"):
        vals = [r[m] for r in runs if m in r and not (isinstance(r[m], float) and math.isnan(r[m]))]
        out[m] = (float(np.mean(vals)), float(np.std(vals))) if vals else (math.nan, math.nan)
    return out


def optional_section(module: str, name: str = "concept_section") -> Callable | None:
    """A section a helper module provides (bench/_concepts.py: the concept query and concept head;
    bench/_two_modalities.py: text + an emotion-free modality)."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def row_table(rows: list[dict]) -> str:
    """Rows {"task", "row", "seed", metric: value, ...} -> a markdown table of mean ± std per (task, row)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["row"]), []).append(r)
    names = sorted({k for r in rows for k, v in r.items() if k not in ("task", "row", "seed")
                    and isinstance(v, (int, float)) and not isinstance(v, bool)})
    lines = ["| task | row | " + " | ".join(names) + " |", "| --- | --- | " + " | ".join("---:" for _ in names) + " |"]
    for (task, row), rs in groups.items():
        cells = []
        for m in names:
            vals = [float(r[m]) for r in rs if m in r and not math.isnan(float(r[m]))]
            cells.append(f"{np.mean(vals):.4f} ± {np.std(vals):.4f}" if vals else "-")
        lines.append(f"| {task} | {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict, extra: dict, seeds: int, seconds: float) -> str:
    lines = ["# Results on the demo's real words", "",
             f"Generated by `.venv/bin/python bench/results.py --seeds {seeds}` in {seconds:.0f} s on this "
             "repository's CPU machine (a row whose code had not changed is read from "
             "`bench/out/results-cache.json`; `s/fit` is the time its fits took when computed). Every head trains with its defaults on the train split of the "
             "built-in `demo` dataset (the NRC emotion lexicon's words, encoded with the packaged "
             "all-MiniLM-L6-v2), makes every decision (early stopping, the multi-label threshold) on the "
             f"validation split, and is evaluated on test once; mean ± std over {seeds} seeds. "
             "`val` is the validation primary metric (what the head chose by). Lower is better for "
             "`hamming_loss`; higher for every other column.", ""]
    for task, rows in results.items():
        t = next(t for t in TASKS if t.name == task)
        lines += [f"## {task}", "", "| row | " + " | ".join(t.metrics) + " | val | s/fit |",
                  "| --- | " + " | ".join("---:" for _ in t.metrics) + " | ---: | ---: |"]
        best = {m: (min if m in LOWER_IS_BETTER else max)(r[m][0] for r in rows.values()) for m in t.metrics}
        for label, s in rows.items():
            cells = []
            for m in t.metrics:
                mean, std = s[m]
                cell = f"{mean:.4f} ± {std:.4f}"
                cells.append(f"**{cell}**" if mean == best[m] else cell)
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {s['val_primary'][0]:.4f} | "
                         f"{s['seconds'][0]:.1f} |")
        lines.append("")
    for title, table in extra.items():
        lines += [f"## {title}", "", table, ""]
    return "\n".join(lines)


def picture(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(results), 0.42 * max(len(r) for r in results.values()) + 1.8))
    for i, (task, rows) in enumerate(results.items()):
        t = next(t for t in TASKS if t.name == task)
        ax = fig.add_subplot(1, len(results), i + 1)
        labels = list(rows)[::-1]
        means = [rows[r][t.key][0] for r in labels]
        stds = [rows[r][t.key][1] for r in labels]
        colours = ["#4c72b0" if r in ("mlp", "linear") else "#dd8452" if " " not in r else "#c0c0c0"
                   for r in labels]
        ax.barh(range(len(labels)), means, xerr=stds, color=colours, capsize=3)
        for y, (m, s) in enumerate(zip(means, stds)):
            ax.text(m + s + 0.005, y, f"{m:.3f}", va="center", fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        lo = min(means) - 0.1
        ax.set_xlim(max(0.0, lo), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.08))
        ax.set_xlabel(f"test {t.key} (mean ± std)")
        ax.set_title(task, fontsize=10)
    fig.suptitle("Heads on the demo's real words (MiniLM features; decisions on validation)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def read_tables(path: Path) -> dict:
    """The head tables of a results.md back into `picture`'s input: {task: {row: {metric: (mean, std)}}}."""
    results, task = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            task = next((t for t in TASKS if t.name == line[3:]), None)
            if task is not None:
                results[task.name] = {}
        elif task is not None and line.startswith("| ") and "±" in line:
            label, *cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            results[task.name][label] = {m: tuple(float(x) for x in c.split("±"))
                                         for m, c in zip(task.metrics, cells)}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--store", default=str(ROOT / "bench" / "out" / "results-store"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--only", default="", help="comma-separated head names (default: every registered head)")
    ap.add_argument("--tasks", default="", help="comma-separated targets: labels,label,va (default: all)")
    ap.add_argument("--fresh", action="store_true", help="recompute every row (default: reuse rows whose code "
                                                          "is unchanged, from bench/out/results-cache.json)")
    ap.add_argument("--redraw", action="store_true", help="only redraw the picture from the tables of --out "
                                                           "(after a row was regenerated alone and merged by hand)")
    args = ap.parse_args(argv)
    if args.redraw:
        out = Path(args.out)
        picture(read_tables(out), out.with_suffix(".png"))
        print(f"redrew {out.with_suffix('.png')} from {out}")
        return 0

    import torch

    from featurestore.heads._data import prepare

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    start = time.perf_counter()
    store = build_store(Path(args.store))
    cache = RowCache(ROOT / "bench" / "out" / "results-cache.json", args.fresh)
    only = set(filter(None, args.only.split(","))) or None
    targets = set(filter(None, args.tasks.split(","))) or None
    results: dict[str, dict] = {}
    for task in TASKS:
        if targets and task.target not in targets:
            continue
        data = prepare(store, "demo", {"text": "minilm"}, target=task.target, seed=0, va=True)
        results[task.name] = {}
        for name, label, params in rows_for(data.kind, only):
            runs = []
            for seed in range(args.seeds):
                key = cache.key(task.target, name, label, params, seed)
                run = cache.get(key)
                if run is None:
                    run = fit_eval(name, params, seed, data)
                    cache.put(key, run)
                runs.append(run)
            results[task.name][label] = summarise(runs, task.metrics)
            s = results[task.name][label][task.key]
            print(f"{task.target:7s} {label:40s} test {task.key} {s[0]:.4f} ± {s[1]:.4f}", flush=True)
    extra = {}
    section = optional_section("bench._concepts")
    if section is not None and not only:
        out = section(store, dataset="demo", features={"text": "minilm"}, seeds=tuple(range(args.seeds)),
                      workdir=Path(args.store) / "concepts")
        extra["Supramodal concepts: nearest-concept queries on held-out words"] = row_table(out["query_rows"])
        extra["Supramodal concepts: the concept head and its ablations"] = row_table(out["head_rows"])
    section = optional_section("bench._two_modalities", "noise_section")
    if section is not None and (not only or "drkf" in only) and (not targets or "label" in targets):
        extra["Two modalities: text + an emotion-free noise modality (polarity)"] = (
            "The polarity task's split with a second modality that carries no emotion: a 384-d "
            "standard-normal vector per word, seeded by a hash of its text embedding (it identifies the "
            "word, so a fusion head can memorise training labels through it). `mlp`/`linear` on two "
            "modalities concatenate them; the text-alone rows are the reference. Decisions on validation "
            "(`val_uar`), test once; `s_per_fit` in seconds. `bench/_two_modalities.py`.\n\n"
            + row_table(section(store, seeds=tuple(range(args.seeds)), cache=cache)))
    section = optional_section("bench._lora_section", "lora_section")
    if section is not None and (not only or "mlp" in only) and (not targets or "labels" in targets):
        extra["LoRA refresh: MiniLM fine-tuned on the demo, an mlp head before and after (emotions)"] = (
            "One forced `fs refresh` with the default LoRA settings (r=6, alpha=36, dropout=0.2, query and "
            "value, 4 epochs) fine-tunes MiniLM on the train split, re-extracts the demo and retrains each "
            "seed's `mlp` run from its saved config; micro-F1 of the multi-label target before (frozen "
            "features) and after, on validation and test. docs/lora.md explains why validation does not "
            "rise where test does. `bench/_lora_section.py`.\n\n"
            + row_table(section(lambda: build_store(Path(args.store + "-lora")), seeds=tuple(range(args.seeds)),
                                cache=cache)))
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.write_text(markdown(results, extra, args.seeds, seconds) + "\n")
    picture(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
