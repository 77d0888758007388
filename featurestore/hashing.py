"""Content keys, spec fingerprints and file digests.

A content key identifies the raw input of one modality (the bytes of a file, or the
normalised text), so the same input under the same backbone is computed once, across
datasets and runs.  A fingerprint identifies everything that changes the numbers a
backbone produces.
"""
from __future__ import annotations

import hashlib
import json
import os
import unicodedata
from pathlib import Path
from typing import Any

__all__ = [
    "KEY_BYTES", "content_key", "normalise_text", "canonical_json", "spec_digest",
    "file_digest", "tree_digest",
]

KEY_BYTES = 32  # hex characters of a content key (128 bits)
_CHUNK = 1 << 20


def normalise_text(text: str) -> str:
    """NFC-normalise and collapse whitespace: texts that differ only so share a key."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def content_key(modality: str, data: bytes | str) -> str:
    """The content key of one raw input: a hex digest of the modality and the payload."""
    if isinstance(data, str):
        data = normalise_text(data).encode("utf-8")
    h = hashlib.blake2b(digest_size=KEY_BYTES // 2)
    h.update(modality.encode("ascii") + b"\0")
    h.update(data)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Sorted, compact JSON: the same spec always serialises to the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def spec_digest(spec: dict, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:length]


def file_digest(path: str | os.PathLike, length: int = 32) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()[:length]


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".hdf5", ".json", ".model", ".txt")


def tree_digest(folder: str | os.PathLike, length: int = 32) -> str:
    """Digest of the weight and config files of a model folder, by relative path and content."""
    root = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode() + b"\0" + file_digest(path, 64).encode())
    return h.hexdigest()[:length]
