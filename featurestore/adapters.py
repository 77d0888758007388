"""Stored LoRA adapters: `adapters/<hash>/`, in peft's own format plus what made them.

```
adapters/<hash>/adapter_config.json        peft's config (r, alpha, dropout, target modules, peft_version)
adapters/<hash>/adapter_model.safetensors  peft's weights (the LoRA A/B matrices only)
adapters/<hash>/meta.json                  name, backbone, base model + its weights hash, dataset,
                                           manifest hash, target, seed, settings, metrics, peft version
adapters/<hash>/checksums.json             SHA-256 of the files above (fs verify)
```

`<hash>` is a digest of the two peft files, so the same weights are stored once. A folder is
written under a temporary name and renamed into place: a reader sees a whole adapter or none.
Nothing here imports torch or peft except `check_loadable`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ._io import publish_folder, read_checked_json, tmp_path, write_checksums, write_json_atomic
from .errors import BackboneError, ConfigError, NotFoundError
from .hashing import file_digest, spec_digest
from .store import Store

__all__ = ["PEFT_FILES", "META", "adapter_digest", "publish_adapter", "list_adapters", "find_adapter",
           "resolve_adapter", "adapter_meta", "adapter_config", "check_base", "check_loadable"]

PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
META = "meta.json"


def adapter_digest(folder: Path) -> str:
    """16 hex characters over the peft files' contents: the adapter's identity."""
    return spec_digest({name: file_digest(Path(folder) / name, 64) for name in PEFT_FILES})


def publish_adapter(store: Store, staged: Path, meta: dict) -> tuple[str, Path]:
    """Move a folder holding peft's files into `adapters/<hash>/` with `meta.json`; returns (hash, folder).

    An adapter with the same weights already stored is kept as it is (its meta first wins)."""
    staged = Path(staged)
    missing = [n for n in PEFT_FILES if not (staged / n).is_file()]
    if missing:
        raise ConfigError(f"{staged} lacks {missing}; it is not a peft adapter folder")
    _canonical_config(staged / PEFT_FILES[0])
    digest = adapter_digest(staged)
    final = store.adapters_dir() / digest
    if (final / META).is_file():
        shutil.rmtree(staged, ignore_errors=True)
        return digest, final
    tmp = tmp_path(final)  # names this process: gc and verify leave a running job's folder alone
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staged, tmp, ignore=shutil.ignore_patterns("*.tmp", "README.md"))
        write_json_atomic(tmp / META, {**meta, "hash": digest})
        write_checksums(tmp, [*PEFT_FILES, META])
        if final.exists():  # a half-removed leftover without meta.json
            shutil.rmtree(final)
        publish_folder(tmp, final, overwrite=False)  # fsyncs the tree, then adapters/
    except FileExistsError:  # the same weights, published meanwhile by another job: that copy is the adapter
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(staged, ignore_errors=True)
    return digest, final


def _canonical_config(path: Path) -> None:
    """Sort the module lists of peft's adapter_config.json: peft keeps them as Python sets and writes them in
    their iteration order, which changes with PYTHONHASHSEED from one process to the next, so the same
    weights would get another hash (and extraction another fingerprint) at random."""
    cfg = json.loads(path.read_text())
    changed = False
    for key in ("target_modules", "exclude_modules"):
        value = cfg.get(key)
        if isinstance(value, list) and all(isinstance(v, str) for v in value) and value != sorted(value):
            cfg[key] = sorted(value)
            changed = True
    if changed:
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))  # the layout peft writes


_FIX = "train it again with `fs lora train`, or delete its folder (`fs verify` lists every damaged file)"


def adapter_meta(folder: Path) -> dict:
    """An adapter's meta.json, checked against its checksums.json (a changed digit is refused)."""
    path = Path(folder) / META
    return read_checked_json(path, _FIX) if path.is_file() else {}


def adapter_config(folder: Path) -> dict:
    """peft's adapter_config.json of a stored adapter, checked against its checksums.json."""
    return read_checked_json(Path(folder) / "adapter_config.json", _FIX)


def list_adapters(store: Store) -> list[dict]:
    """meta.json of every stored adapter, oldest first."""
    root = store.adapters_dir()
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        if not p.name.startswith(".") and (p / META).is_file():
            out.append({**adapter_meta(p), "hash": p.name, "folder": str(p)})
    return sorted(out, key=lambda m: (m.get("created_at", ""), m["hash"]))


def find_adapter(store: Store, ref: str) -> dict:
    """A stored adapter by hash, hash prefix (8+ characters) or name (the newest of that name)."""
    adapters = list_adapters(store)
    by_hash = [a for a in adapters if a["hash"] == ref or (len(ref) >= 8 and a["hash"].startswith(ref))]
    if len(by_hash) == 1:
        return by_hash[0]
    named = [a for a in adapters if a.get("name") == ref]
    if named:
        return named[-1]
    known = ", ".join(sorted({f"{a.get('name')} ({a['hash']})" for a in adapters})) or "none"
    short = " (a hash prefix needs 8 or more characters)" if len(ref) < 8 and any(
        a["hash"].startswith(ref) for a in adapters) else ""
    raise NotFoundError(f"adapter {ref!r} is neither a folder nor a stored adapter{short}; stored: {known} "
                        "(fs lora list)")


def resolve_adapter(store: Store, ref: str) -> str:
    """`--adapter` as given: an existing folder stays a folder; otherwise a stored adapter's folder."""
    if not ref or Path(ref).expanduser().is_dir():
        return ref
    return find_adapter(store, ref)["folder"]


def check_base(adapter: str, backbone: str, weights_hash: str) -> None:
    """Refuse an adapter (with our meta.json) that was trained on other base weights than these."""
    meta = adapter_meta(Path(adapter)) if adapter else {}
    base = meta.get("base") or {}
    if not base.get("weights_hash"):
        return  # a foreign adapter: peft itself refuses one whose modules do not fit
    if base["weights_hash"] != weights_hash:
        raise BackboneError(
            f"adapter {meta.get('name', adapter)!r} was trained on base model {base.get('model')!r} "
            f"(backbone {base.get('backbone')}, weights {base['weights_hash'][:12]}), but backbone {backbone} "
            f"loads weights {weights_hash[:12]}; pass --model {base.get('model')} or an adapter made for this model")


def check_loadable(adapter: str, exc: BaseException) -> BackboneError:
    """The error for an adapter peft failed to load: names both peft versions when they differ."""
    import peft

    try:
        saved = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("peft_version", "")
    except (OSError, ValueError):
        saved = ""
    detail = " ".join(str(exc).split())[:300]
    if saved and str(saved).split("@")[0] != peft.__version__:
        return BackboneError(
            f"adapter {adapter!r} was saved by peft {saved} and cannot be loaded by the installed peft "
            f"{peft.__version__} ({type(exc).__name__}: {detail}); install peft=={saved} or retrain it with "
            "`fs lora train`")
    return BackboneError(f"could not apply adapter {adapter!r}: {type(exc).__name__}: {detail}")
