"""Dataset layouts: `fs datasets add NAME --layout L --root DIR` reads a dataset as its authors ship it.

One module per layout, a registry keyed by the name users type (an entry is a dotted
`"module:Class"` path, imported on first use). `docs/datasets.md` documents each layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import DatasetError
from ...registry import Registry
from ...store import Store, check_name
from .base import Layout, LayoutResult, parse_options

__all__ = ["REGISTRY", "Layout", "LayoutResult", "get", "names", "read_layout", "add_layout_dataset", "parse_options"]

_P = "featurestore.datasets.layouts"
_BUILTIN = {
    "raf-db": f"{_P}.rafdb:RafDB",
    "affectnet": f"{_P}.affectnet:AffectNet",
    "fer2013": f"{_P}.fer2013:Fer2013",
    "ravdess": f"{_P}.ravdess:Ravdess",
    "crema-d": f"{_P}.cremad:CremaD",
    "iemocap": f"{_P}.iemocap:Iemocap",
    "meld": f"{_P}.meld:Meld",
    "mosi": f"{_P}.mosi:Mosi",
    "mosei": f"{_P}.mosei:Mosei",
    "dfew": f"{_P}.dfew:Dfew",
    "mafw": f"{_P}.mafw:Mafw",
}

REGISTRY: Registry[type[Layout]] = Registry("layout", _BUILTIN, list_hint="fs datasets layouts")


def get(name: str) -> type[Layout]:
    return REGISTRY.get(name)


def names() -> list[str]:
    return REGISTRY.names()


def read_layout(layout: str, root: str | Path, *, options: dict | None = None,
                workdir: Path | None = None, progress: Callable | None = None) -> LayoutResult:
    """Read `root` with layout `layout`: the canonical manifest and a report of what was found."""
    return get(layout)(root, options=options, workdir=workdir, progress=progress).run()


def add_layout_dataset(store: Store, name: str, layout: str, root: str | Path, *, options: dict | None = None,
                       replace: bool = False, allow_outside_root: bool = False, progress: Callable | None = None):
    """Register dataset `name` from a layout; the report goes into `dataset.json` under `layout`."""
    from .. import add_dataset, is_registered

    folder = store.dataset_dir(check_name(name, "dataset"))
    if is_registered(folder) and not replace:  # before any file is materialised
        raise DatasetError(f"dataset {name!r} already exists in {store.root}; pass --replace to overwrite "
                           "its manifest (cached features are kept: they are keyed by content)")
    result = read_layout(layout, root, options=options, workdir=folder, progress=progress)
    return add_dataset(store, name, result.df, root=result.root, source=f"layout {layout} at {root}",
                       replace=replace, allow_outside_root=allow_outside_root, progress=progress,
                       extra_info=result.report)
