"""Where a model reference comes from, decided before transformers is asked to load it.

A local folder loads as is. A hub id loads from the local hub cache when it is there (no network
needed: `local_files_only`), else from the hub when the hub answers a quick probe. When it answers
nothing (no network, a firewall), one clear error comes at once, instead of minutes of retries.
What ships inside an installed package is "packaged"; only that is called so.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import BackboneError

__all__ = ["load_kwargs", "hub_reachable", "in_cache", "offline", "default_source", "PROBE_TIMEOUT_S"]

PROBE_TIMEOUT_S = 3.0  # FS_HUB_PROBE_TIMEOUT overrides it
_probed: dict[str, bool] = {}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `roberta-base`, `org/name`


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the hub answers an HTTP request within `timeout` seconds (any HTTP status counts; name
    lookup, connection and reply included: the request runs in a thread that is abandoned when the
    time is up). Asked once per process."""
    import urllib.error
    import urllib.request

    url = _endpoint()
    if url in _probed:
        return _probed[url]
    if timeout is None:
        timeout = float(os.environ.get("FS_HUB_PROBE_TIMEOUT", PROBE_TIMEOUT_S))
    result = {"ok": False}

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            result["ok"] = True
        except urllib.error.HTTPError:  # the hub answered, with an error status: it is there
            result["ok"] = True
        except Exception:  # noqa: BLE001 - no name, no route, refused, timed out, TLS: not reachable
            pass

    worker = threading.Thread(target=probe, daemon=True, name="fs-hub-probe")
    worker.start()
    worker.join(timeout)
    _probed[url] = result["ok"]
    return result["ok"]


def in_cache(ref: str) -> bool:
    """Whether hub id `ref` has a config.json in the local hub cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return False


def load_kwargs(ref: str, *, what: str, option: str) -> dict[str, Any]:
    """Extra `from_pretrained` arguments for `ref`, or one BackboneError when it cannot be had."""
    if not ref or Path(ref).expanduser().exists() or not _HUB_ID.match(ref):
        return {}
    if in_cache(ref):
        return {"local_files_only": True}
    host = urlparse(_endpoint()).hostname or _endpoint()
    if offline():
        raise BackboneError(f"{what}: {ref!r} is not in the local hub cache and HF_HUB_OFFLINE is set; download it "
                            f"on a machine with network (it lands in the hub cache) or pass a local folder with "
                            f"{option}")
    if not hub_reachable():
        raise BackboneError(f"{what}: {ref!r} is not in the local hub cache and the hub ({host}) cannot be reached "
                            f"from this machine; pass a local folder with {option}, or copy the model into the hub "
                            "cache (huggingface-cli download on a machine with network)")
    return {}


def default_source(cls) -> tuple[str, bool]:
    """(default model, whether it ships inside an installed package) of a backbone class.

    A class whose default is computed (a property) finds it in a package's files; a class with a
    hub id as default needs the hub or the hub cache."""
    for klass in cls.__mro__:
        if "default_model" in klass.__dict__:
            value = klass.__dict__["default_model"]
            if isinstance(value, str):
                return value, False
            return "(packaged)", True
    return "", False
