"""The one-way house: featurestore (core) <- heads <- jobs <- cli, one import root, no generic names.

Every module's imports are read from its syntax tree (function-level imports included), so a lazy
import of an upper layer inside a function is caught as well as a top-level one."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> (its package, the packages it must never import)
LAYERS = {
    "featurestore": ("featurestore", ("featurestore.heads", "featurestore.jobs", "featurestore.cli")),
    "heads": ("featurestore.heads", ("featurestore.jobs", "featurestore.cli")),
    "jobs": ("featurestore.jobs", ("featurestore.cli",)),
    "cli": ("featurestore.cli", ()),
}


def _imports(path: Path, package: str, root: Path = ROOT) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    folder = path.relative_to(root).parts[0]
    # the package this module sits in: featurestore.heads for heads/x.py, featurestore.cli for cli/__init__.py
    parts = [*package.split("."), *path.parent.relative_to(root / folder).parts]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `.` is this package, `..` its parent
                base = parts[: len(parts) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def _modules(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_imports_run_one_way(folder):
    package, forbidden = LAYERS[folder]
    bad = []
    for path in _modules(folder):
        for line, name in _imports(path, package):
            top = name.split(".")[0]
            if top in ("heads", "jobs", "cli"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the bare name {name!r}")
            elif any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (an upper layer)")
    assert not bad, "\n".join(bad)


def test_tests_and_benches_import_through_the_one_root():
    bad = [f"{path.relative_to(ROOT)}:{line} {name}"
           for folder in ("tests", "bench") for path in _modules(folder)
           for line, name in _imports(path, folder) if name.split(".")[0] in ("heads", "jobs", "cli")]
    assert not bad, "\n".join(bad)


def test_install_adds_only_the_featurestore_root():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert all(p == "featurestore" or p.startswith("featurestore.") for p in config["packages"])
    mapping = config["package-dir"]
    assert mapping["featurestore.heads"] == "heads" and mapping["featurestore.jobs"] == "jobs"
    assert mapping["featurestore.cli"] == "cli"
    # every sub-package folder on disk is listed, so a wheel ships it
    for folder, (package, _) in LAYERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            sub = ".".join([package, *init.parent.relative_to(ROOT / folder).parts])
            assert sub in config["packages"], f"{init.relative_to(ROOT)} is not in pyproject's packages"


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: a core module importing a job, and a bare `import heads`, are reported."""
    probe = tmp_path / "featurestore" / "va" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from featurestore.jobs import extract\n    import heads\n    from ..cli import x\n")
    found = _imports(probe, "featurestore", root=tmp_path)
    assert found == [(2, "featurestore.jobs"), (3, "heads"), (4, "featurestore.cli")]
    rel = ROOT / "cli" / "_common.py"
    assert any(name.startswith("featurestore.") for _, name in _imports(rel, "featurestore.cli"))
