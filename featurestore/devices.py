"""Device names the user types (`--device`, `-p device=`), checked before any work starts."""
from __future__ import annotations

import re

from .errors import ConfigError

__all__ = ["VALID_DEVICES", "check_device"]

VALID_DEVICES = "auto, cpu, cuda or cuda:N"
_FORM = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_HINTS = {"gpu": "cuda", "cuda0": "cuda:0", "nvidia": "cuda", "cuda:": "cuda"}


def check_device(device: str, what: str = "--device") -> str:
    """`device` itself when it is one of auto, cpu, cuda, cuda:N; else one ConfigError naming it."""
    text = str(device).strip().lower()
    if _FORM.match(text):
        return text
    hint = _HINTS.get(text)
    suggest = f" (did you mean {hint}?)" if hint else ""
    raise ConfigError(f"{what} {device!r} is not a device this tool runs on{suggest}; valid devices: {VALID_DEVICES}")
