"""Shared fixtures: real stores on tmp disk, the packaged MiniLM loaded once per session."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def store(tmp_path):
    from featurestore.store import open_store

    return open_store(tmp_path / "store", create=True)


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2, loaded once (a real model, offline)."""
    from featurestore import backbones

    return backbones.create("minilm").load()


@pytest.fixture(scope="session")
def demo_df():
    from featurestore.datasets import build_demo

    return build_demo()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: one intra-op thread avoids oversubscription stalls (restored after)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode stand-ins (every byte a printable character), for tiny CLIP tokenizers."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]
