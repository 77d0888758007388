"""Fault injection shared by the tests: what a failing disk or mount does to reads."""
from __future__ import annotations

import os
import pathlib


def failing_reads(monkeypatch, errors: dict) -> None:
    """Path.read_bytes raises OSError(errno) for the chosen file names, as a failing disk or mount would."""
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name in errors:
            code = errors[self.name]
            raise OSError(code, os.strerror(code), str(self))
        return real(self)
    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
