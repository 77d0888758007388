"""CLIP image and text encoders: pooled rows are the projected (joint-space) embeddings.

Both towers pool the way CLIP was trained (the vision CLS token, the text EOS token, each
through its projection), so `pooling` does not apply here. Sequences are the patch or
token states sent through the same final norm and projection, so every sequence row has
the width `dim` of a pooled row and lives in the same joint space.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from ..config import field
from ..errors import BadItemError
from . import _hf, _media
from .base import Backbone, BackboneConfig, Encoded
from .text import prepare_text

__all__ = ["CLIPImage", "CLIPText", "ClipConfig"]


@dataclasses.dataclass(frozen=True)
class ClipConfig(BackboneConfig):
    normalize: bool = field(False, "L2-normalise pooled vectors (as CLIP does before cosine similarity)")
    max_length: int = field(77, "text: maximum tokens after truncation (CLIP's context is 77)")


class _CLIPBase(Backbone):
    Config = ClipConfig
    default_model = "openai/clip-vit-base-patch32"

    def weights_hash(self) -> str:
        return self._weights

    @property
    def dim(self) -> int:
        self.load()
        return int(self.model.config.projection_dim)

    def _normalised(self, pooled):
        import torch

        return torch.nn.functional.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def _finish(self, pooled, states, lengths) -> Encoded:
        """Normalise pooled rows and cut each item's projected states to `seq_cap`."""
        pooled = self._normalised(pooled.float())
        seqs = None
        if self.config.seq_cap > 0:
            seqs = [_hf.to_numpy(s[: min(int(n), self.config.seq_cap)]) for s, n in zip(states, lengths)]
        return Encoded(_hf.to_numpy(pooled), seqs)


class CLIPImage(_CLIPBase):
    """CLIP vision tower with projection; images resized and centre-cropped by CLIP's processor."""

    name = "clip-image"
    modality = "image"
    description = "CLIP image encoder (projected embeddings), default openai/clip-vit-base-patch32"

    @property
    def prepare_workers(self) -> int:
        """On a GPU, a batch's images are decoded and resized on up to 8 threads at once (PIL releases
        the GIL): one thread fed an H100 ViT-B/32 at 1% utilisation (bench/gpu.py). No more threads than
        the process may use: its CPU affinity (taskset, a container's cpuset) and torch's thread count
        (a Ray actor's OMP_NUM_THREADS is its num_cpus). On the CPU the model needs the cores, and one
        thread keeps ahead of it."""
        if not self.device.startswith("cuda"):
            return 1
        import torch

        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, allowed, torch.get_num_threads()))

    def _load(self) -> None:
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        # the PIL backend everywhere: the torchvision one gives slightly different pixels
        self.processor, self.model = _hf.load_backbone(self, AutoImageProcessor, CLIPVisionModelWithProjection,
                                                       backend="pil")

    def preprocessing(self) -> dict:
        p = self.processor
        return {"decode": "pil-rgb", "processor": type(p).__name__,
                "size": dict(p.size) if p.size else None,
                "crop_size": dict(p.crop_size) if getattr(p, "crop_size", None) else None,
                "resample": int(p.resample) if p.resample is not None else None,
                "mean": list(p.image_mean), "std": list(p.image_std),
                "pooled": "image_embeds", "sequences": "patches->post_layernorm->visual_projection"}

    def prepare(self, raw: bytes | str):
        if isinstance(raw, str):
            raise BadItemError("expected image bytes, got text")
        return self.prepare_image(_media.decode_image(raw))

    def prepare_image(self, img):
        """Resize, crop and normalise here, on the decoding thread, off the model's critical path."""
        self.load()
        return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

    def forward_pooled(self, items: Sequence):
        """Prepared items are already processed pixel tensors (`prepare_image`), as `encode` takes them."""
        import torch

        pixels = torch.stack(list(items)).to(self.device)
        with _hf.autocast(self.device):
            pooled = self.model(pixel_values=pixels).image_embeds.float()
        return self._normalised(pooled)

    def encode(self, items: Sequence) -> Encoded:
        import torch

        pixels = torch.stack(list(items)).to(self.device)
        with torch.inference_mode(), _hf.autocast(self.device):
            out = self.model(pixel_values=pixels)
            states = None
            if self.config.seq_cap > 0:  # patch tokens (CLS dropped), into the joint space
                vision = self.model.vision_model
                states = self.model.visual_projection(vision.post_layernorm(out.last_hidden_state[:, 1:]))
        lengths = [states.shape[1]] * len(items) if states is not None else None
        return self._finish(out.image_embeds, states, lengths)


class CLIPText(_CLIPBase):
    """CLIP text tower with projection; pooled at the EOS token as CLIP was trained."""

    name = "clip-text"
    modality = "text"
    description = "CLIP text encoder (projected embeddings), default openai/clip-vit-base-patch32"

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        self.tokenizer, self.model = _hf.load_backbone(self, AutoTokenizer, CLIPTextModelWithProjection)
        limit = int(self.model.config.max_position_embeddings)
        self._max_length = min(self.config.max_length, limit)

    def preprocessing(self) -> dict:
        return {"tokenizer": type(self.tokenizer).__name__, "normalise_text": "nfc+whitespace",
                "truncation": True, "max_length": self._max_length,
                "pooled": "text_embeds", "sequences": "tokens->text_projection"}

    def prepare(self, raw: bytes | str) -> str:
        return prepare_text(raw)

    def forward_pooled(self, items: Sequence[str]):
        batch = self.tokenizer(list(items), padding=True, truncation=True,
                               max_length=self._max_length, return_tensors="pt").to(self.device)
        with _hf.autocast(self.device):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return self._normalised(out.text_embeds.float())

    def encode(self, items: Sequence[str]) -> Encoded:
        import torch

        batch = self.tokenizer(list(items), padding=True, truncation=True,
                               max_length=self._max_length, return_tensors="pt").to(self.device)
        with torch.inference_mode(), _hf.autocast(self.device):
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            states = self.model.text_projection(out.last_hidden_state) if self.config.seq_cap > 0 else None
        lengths = batch["attention_mask"].sum(1).tolist()
        return self._finish(out.text_embeds, states, lengths)
