"""Issue 11 (item 8, with tests/test_layers.py): the CLI parses and calls; the logic lives below it.

- no module of cli/ keeps a list that another module fills at import (hook lists);
- every noun is registered by name in cli/__init__.py, and `register` only adds commands;
- the store-wide checks (verify, gc, coverage, VA facts) are library functions, usable without click;
- jobs/sweep is a package split by concern that still answers `from featurestore.jobs.sweep import ...`.
"""
from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_no_cli_module_mutates_another_at_import_or_registration():
    offenders = []
    for path in sorted((ROOT / "cli").glob("*.py")):
        tree = _tree(path)
        for node in tree.body:  # module-level mutable lists/dicts other modules could fill
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, (ast.List, ast.Dict)):
                if not (isinstance(node.value, ast.List) and node.value.elts):
                    offenders.append(f"{path.name}:{node.lineno} module-level empty container")
        for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "register"):
            for call in (n for n in ast.walk(fn) if isinstance(n, ast.Call)):
                f = call.func
                if isinstance(f, ast.Attribute) and f.attr not in ("add_command",):
                    offenders.append(f"{path.name}:{call.lineno} register calls .{f.attr}()")
    assert not offenders, offenders


def test_every_noun_is_registered_by_name():
    tree = _tree(ROOT / "cli" / "__init__.py")
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_register")
    imported = {a.name for n in ast.walk(fn) if isinstance(n, ast.ImportFrom) for a in n.names}
    on_disk = {p.stem for p in (ROOT / "cli").glob("*_cmd.py")}
    assert imported == on_disk
    assert not any(isinstance(n, ast.Try) for n in ast.walk(fn))  # no optional, silently skipped nouns
    from featurestore.cli import cli

    assert {"init", "ls", "info", "verify", "gc", "datasets", "extract", "backbones", "va", "train-head", "runs",
            "eval", "heads", "scl", "memory", "query", "sweep"} <= set(cli.commands)


def test_store_checks_live_in_the_library():
    """No CLI module defines the store's business logic any more."""
    moved = {"verify_store", "stray_temp_files", "unverified", "coverage", "va_info", "source_rows", "model_rows",
             "_verify_features", "_missing_rows"}
    for path in sorted((ROOT / "cli").glob("*.py")):
        names = {n.name for n in _tree(path).body if isinstance(n, ast.FunctionDef)}
        assert not names & moved, (path.name, names & moved)
    from featurestore import inventory, verify
    from featurestore.va import inventory as va_inventory

    assert callable(verify.verify_store) and callable(verify.gc_store) and callable(inventory.coverage)
    assert callable(va_inventory.va_info)


def test_verify_and_gc_without_click(store):
    """A stray temp file is a finding of verify_store; gc_store keeps a young one and removes an old one."""
    from featurestore.datasets import add_dataset
    from featurestore.datasets.manifest import normalise
    from featurestore.inventory import coverage
    from featurestore.verify import TEMP_GRACE_S, gc_store, verify_store
    import polars as pl

    df = normalise(pl.DataFrame({"item_id": ["a", "b"], "text": ["what a day", "so sad"], "label": ["happy", "sad"]}),
                   source="test")
    ds = add_dataset(store, "few", df, root=None, source="test")
    assert verify_store(store) == []
    assert coverage(store, ds) == []  # nothing extracted yet
    stray = store.dataset_dir("few") / ".manifest.parquet.0badc0de.tmp"
    stray.write_bytes(b"half")
    found = verify_store(store)
    assert [p["path"] for p in found] == [str(stray)] and "fs gc" in found[0]["message"]
    report = gc_store(store)
    assert report["kept_recent_temp_files"] == [str(stray)] and stray.exists()
    old = time.time() - TEMP_GRACE_S - 5
    os.utime(stray, (old, old))
    assert gc_store(store, dry_run=True)["removed_temp_files"] == [str(stray)] and stray.exists()
    assert gc_store(store)["removed_temp_files"] == [str(stray)] and not stray.exists()
    assert verify_store(store) == []


def test_sweep_is_a_package_split_by_concern():
    folder = ROOT / "jobs" / "sweep"
    modules = {p.stem: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert {"__init__", "space", "run", "results", "plots"} <= set(modules)
    assert max(modules.values()) < 400, modules
    from featurestore.jobs import sweep

    for name in ("SweepConfig", "SweepResult", "run", "parse_grid", "load_space", "expand_grid", "sample_random",
                 "read_results", "list_sweeps", "show", "export_best", "best_test", "sweep_folder", "leaderboard",
                 "LOWER_IS_BETTER", "plot_sweep"):
        assert hasattr(sweep, name), name
    assert sweep.expand_grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    draws = sweep.sample_random({"lr": {"low": 1e-4, "high": 1e-1, "log": True}}, 200, 0)
    lr = np.log10([d["lr"] for d in draws])
    assert -4 <= lr.min() and lr.max() <= -1 and abs(np.median(lr) + 2.5) < 0.3  # uniform in log space
