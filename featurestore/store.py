"""The store root: its format version and the folders every other module writes into.

```
<root>/store.json                     format version, creation info
<root>/datasets/<name>/               dataset.json + the manifest.<hash>.parquet it names
<root>/features/<fingerprint>/        spec.json + immutable seg-*.h5 segments
<root>/heads/<run>/  memory/<name>/  adapters/<hash>/  sweeps/<id>/
```
"""
from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from . import __version__
from ._io import read_json, write_json_atomic
from .errors import ConfigError, IntegrityError, NotFoundError, StoreVersionError

__all__ = ["FORMAT_VERSION", "ROW_FORMAT", "DEFAULT_ROOT", "Store", "open_store", "default_root", "check_name"]

FORMAT_VERSION = 2  # 2: catalogues are sealed with their SHA-256 (older releases would keep a stale seal)
UPGRADES_FROM = (1,)  # versions opened by upgrading store.json in place (their data reads as it is)
ROW_FORMAT = 1  # what the cached numbers are; part of every fingerprint, so it changes only with the rows
DEFAULT_ROOT = "store"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def default_root() -> Path:
    return Path(os.environ.get("FS_STORE") or DEFAULT_ROOT)


def check_name(name: str, what: str) -> str:
    """Names become folder names: refuse anything that is not a plain identifier."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{what} name {name!r} is not valid; use letters, digits, '_', '-', '.' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


def now_iso(precise: bool = False) -> str:
    """UTC now in ISO 8601; `precise`: with microseconds, for stamps that order things (a feature set's
    creation): jobs a second apart would otherwise tie. Both forms sort correctly against each other."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds" if precise else "seconds")


class Store:
    """A store root on local disk. Cheap to construct; `open_store` checks the version."""

    # the folders of the store's sections (datasets/ ... refresh/): each must be a folder where it exists
    SECTIONS = ("datasets", "features", "heads", "memory", "adapters", "sweeps", "cache", "va", "va_models", "refresh")

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- folders -------------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "store.json"

    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def dataset_dir(self, name: str) -> Path:
        return self.datasets_dir() / check_name(name, "dataset")

    def features_dir(self) -> Path:
        return self.root / "features"

    def feature_dir(self, fingerprint: str) -> Path:
        return self.features_dir() / check_name(fingerprint, "fingerprint")

    def heads_dir(self) -> Path:
        return self.root / "heads"

    def memory_dir(self) -> Path:
        return self.root / "memory"

    def adapters_dir(self) -> Path:
        return self.root / "adapters"

    def sweeps_dir(self) -> Path:
        return self.root / "sweeps"

    def cache_dir(self) -> Path:
        return self.root / "cache"

    # ---- life cycle ----------------------------------------------------------------
    def exists(self) -> bool:
        return self.meta_path.is_file()

    def init(self) -> bool:
        """Create the store if it does not exist; return True if it was created."""
        if self.exists():
            self.check_version()
            return False
        if self.meta_path.exists():  # a folder (or a socket...) where store.json belongs
            raise IntegrityError(f"{self.meta_path} is not a file; move it away (or pick another --store) and run "
                                 "`fs init` again")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # the root, or a folder above it, is a file
            raise ConfigError(f"store root {str(self.root)!r} cannot be created: it or a folder above it is a "
                              "file; pass --store a folder path") from None
        write_json_atomic(self.meta_path, {
            "format": "featurestore",
            "format_version": FORMAT_VERSION,
            "created_at": now_iso(),
            "created_by": f"featurestore {__version__}",
        })
        return True

    def meta(self) -> dict:
        if not self.exists():
            raise NotFoundError(f"no store at {self.root}; create one with `fs --store {self.root} init`")
        meta = read_json(self.meta_path)
        if not isinstance(meta, dict):
            raise IntegrityError(f"{self.meta_path} is damaged (a JSON {type(meta).__name__}, not an object); restore "
                                 "it from a backup")
        return meta

    def check_version(self) -> None:
        meta = self.meta()
        version = meta.get("format_version")
        if meta.get("format") == "featurestore" and version in UPGRADES_FROM:
            # version 1 differs only in that its catalogues are not sealed; from now on they will be,
            # and a release that reads version 1 only must refuse the store rather than keep stale seals
            write_json_atomic(self.meta_path, {**meta, "format_version": FORMAT_VERSION,
                                               "upgraded_from": version, "upgraded_at": now_iso(),
                                               "upgraded_by": f"featurestore {__version__}"})
            return
        if meta.get("format") != "featurestore" or version != FORMAT_VERSION:
            raise StoreVersionError(
                f"store {self.root} has format version {version!r}; this featurestore "
                f"{__version__} reads version {FORMAT_VERSION} only. Use a matching featurestore "
                "release, or extract into a new store"
            )
        not_folders = [str(self.root / s) for s in self.SECTIONS if (self.root / s).exists()
                       and not (self.root / s).is_dir()]
        if not_folders:  # every listing would read as empty and every save fail half-way
            raise IntegrityError(f"{', '.join(not_folders)} {'is a file' if len(not_folders) == 1 else 'are files'} "
                                 "where the store keeps a folder; move it away and restore the folder from a backup "
                                 "(or remove the file to start that section empty)")

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


def open_store(root: str | os.PathLike | None = None, *, create: bool = False) -> Store:
    """Open the store at `root` (default: $FS_STORE or ./store), creating it if asked."""
    store = Store(root if root is not None else default_root())
    if create:
        store.init()
    else:
        store.check_version()
    return store
