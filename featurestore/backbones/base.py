"""The backbone contract.

A backbone turns raw inputs of one modality into pooled embeddings `[B, D]` and,
optionally, per-token or per-frame sequences. Its `spec()` lists everything that changes
the numbers (model id, weights hash, adapter hash, preprocessing, pooling, storage dtype,
store format); the spec's digest is the *fingerprint* under which rows are cached.

Extraction calls, in order: `load()` once, `spec()`, then per batch `prepare(raw)` on each
item (decode + preprocess; raises `BadItemError` with a reason for a bad item, which is
recorded and skipped) and `encode(prepared_items)` on the good ones.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, ClassVar, Sequence

import numpy as np

from ..config import field, to_dict
from ..hashing import spec_digest

__all__ = ["Backbone", "BackboneConfig", "Encoded", "fingerprint_of", "resolve_device", "MODALITIES"]

MODALITIES = ("text", "image", "audio", "video")  # video: a clip path (decoding: the video backbones)
STORAGE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Options every backbone takes; a backbone may subclass to add its own."""

    model: str = field("", "hub id or local folder of the model (default: the backbone's own)")
    adapter: str = field("", "folder of a peft (LoRA) adapter to apply, or empty")
    pooling: str = field("mean", "how token/frame states become one vector: mean | cls")
    max_length: int = field(128, "text: maximum tokens after truncation")
    seq_cap: int = field(0, "keep up to this many token/frame vectors per item (0: pooled only)")
    dtype: str = field("float16", "storage dtype of the cached rows: float16 | float32")

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling={self.pooling!r} must be 'mean' or 'cls'")
        if self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} must be at least 1")
        if self.seq_cap < 0:
            raise ValueError(f"seq_cap={self.seq_cap} must be 0 (off) or positive")
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {STORAGE_DTYPES}")


@dataclasses.dataclass
class Encoded:
    """The output of `encode`: pooled `[B, D]` float32, and sequences `[T_i, D]` if asked."""

    pooled: np.ndarray
    sequences: list[np.ndarray] | None = None


def resolve_device(device: str = "auto") -> str:
    import torch

    from ..devices import check_device

    device = check_device(device or "auto")
    if device in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import ConfigError
        raise ConfigError(f"device {device!r} was asked for but torch sees no CUDA device; use --device cpu")
    return device


def fingerprint_of(name: str, spec: dict) -> str:
    """`<backbone>-<16 hex>`: readable, and unique to everything in the spec.

    `spec["source"]` (where the weights were loaded from) is informative only: the same
    weights loaded from another folder give the same fingerprint.
    """
    return f"{name}-{spec_digest({k: v for k, v in spec.items() if k != 'source'})}"


class Backbone(abc.ABC):
    """Base class of every registered backbone. Construct cheaply; `load()` does the work."""

    name: ClassVar[str]
    modality: ClassVar[str]
    description: ClassVar[str] = ""
    Config: ClassVar[type] = BackboneConfig
    default_model: ClassVar[str] = ""

    def __init__(self, config: BackboneConfig | None = None, *, device: str = "auto"):
        self.config = config if config is not None else self.Config()
        self.device_request = device
        self.device = "cpu"
        self._loaded = False

    # ---- to implement ------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None:
        """Load weights (from `self.model_ref`) onto `self.device`."""

    @abc.abstractmethod
    def weights_hash(self) -> str:
        """A digest of the exact weights in use (not counting the adapter)."""

    @abc.abstractmethod
    def preprocessing(self) -> dict:
        """Every preprocessing parameter that changes the numbers."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Width of a pooled row."""

    @abc.abstractmethod
    def prepare(self, raw: bytes | str) -> Any:
        """Decode and preprocess one raw item; raise BadItemError(reason) if it is unusable."""

    @abc.abstractmethod
    def encode(self, items: Sequence[Any]) -> Encoded:
        """Run the model on prepared items."""

    # ---- optional ----------------------------------------------------------------
    #: items `prepare` may work on at once, on threads (video decoding); 1: one after another
    prepare_workers: int = 1

    def prepare_image(self, img: Any) -> Any:
        """Image backbones: preprocess one decoded RGB `PIL.Image` (how video frames arrive).

        The default encodes it losslessly (PNG) and calls `prepare`; a backbone overrides it
        to skip that round trip (the numbers must be the same either way)."""
        import io

        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return self.prepare(buf.getvalue())

    def forward_pooled(self, items: Sequence[Any]):
        """Pooled `[B, D]` torch tensor of prepared items, with autograd on (LoRA fine-tuning).

        `encode` computes the same function under inference mode. Backbones that cannot be
        fine-tuned leave this as it is."""
        from ..errors import BackboneError
        raise BackboneError(f"backbone {self.name!r} cannot be fine-tuned with LoRA; fine-tunable: minilm, hf-text, "
                            "clip-text, clip-image, clap-audio, wav2vec2, hubert, wavlm")

    # ---- shared ------------------------------------------------------------------
    @property
    def model_ref(self) -> str:
        return self.config.model or self.default_model

    def load(self) -> "Backbone":
        if not self._loaded:
            from .hub import load_kwargs

            load_kwargs(self.model_ref, what=f"backbone {self.name}", option="--model PATH")  # fails fast offline
            self.device = resolve_device(self.device_request)
            if self.device == "cpu":
                import torch
                torch.set_num_threads(max(1, os.cpu_count() or 1))
            self._load()
            self._loaded = True
        return self

    def adapter_hash(self) -> str:
        if not self.config.adapter:
            return ""
        from ..hashing import tree_digest
        return tree_digest(self.config.adapter)

    def spec(self) -> dict:
        """All that identifies the numbers; its digest is the fingerprint."""
        from ..store import ROW_FORMAT

        self.load()
        cfg = to_dict(self.config)
        for volatile in ("_version", "model", "adapter"):
            cfg.pop(volatile, None)
        return {
            "backbone": self.name,
            "modality": self.modality,
            "source": {"model": self.model_ref, "adapter": self.config.adapter},
            "weights_hash": self.weights_hash(),
            "adapter_hash": self.adapter_hash(),
            "config": cfg,
            "preprocessing": self.preprocessing(),
            "dim": self.dim,
            "store_format": ROW_FORMAT,
        }

    def fingerprint(self) -> str:
        return fingerprint_of(self.name, self.spec())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model_ref!r}, adapter={self.config.adapter!r})"
