"""The `video` modality: sampled frames of each clip through any registered image backbone.

`fs extract --modality video --backbone clip-image` (or `fer`, or any image backbone) wraps
the image backbone in `VideoFrames`: each clip is decoded with PyAV and sampled (see
`_video.py`: `frames=16` uniformly by default, or `fps=R`), every frame goes through the
image backbone's own preprocessing (`prepare_image`), and the frames of a batch of clips
are encoded together, `frame_batch` at a time. A clip's row is the mean of its frames'
pooled vectors; its sequence is the per-frame rows `[frames, D]` (`sequence=false`: pooled
only). The fingerprint holds the image backbone's whole spec plus the decoder and the
sampling policy, so clips sampled another way are cached apart. Decoding, sampling and
the image preprocessing run in `prepare`, which the extraction job runs on
`decode_workers` threads ahead of the model; on CPU the model then runs on the cores the
decoders leave (cpu count - decode_workers, at least 1) rather than oversubscribing them.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

from ..config import field
from ..errors import BackboneError, BadItemError, ConfigError
from . import _video
from .base import Backbone, Encoded

__all__ = ["VideoFrames", "VIDEO_FIELDS", "video_config_class"]

#: the options a video extraction adds to the image backbone's own
VIDEO_FIELDS = ("frames", "fps", "max_frames", "frame_batch", "decode_workers", "sequence")
#: options that change nothing in the numbers: not in the fingerprint
_VOLATILE = ("frame_batch", "decode_workers")


def _video_fields() -> list[tuple[str, type, Any]]:
    workers = max(1, min(4, os.cpu_count() or 1))
    return [
        ("frames", int, field(16, "video: frames sampled uniformly per clip (ignored when fps is set)")),
        ("fps", float, field(0.0, "video: sample this many frames per second of the clip instead (0: off)")),
        ("max_frames", int, field(256, "video: at most this many frames per clip with fps sampling")),
        ("frame_batch", int, field(64, "video: frames per forward pass of the image backbone")),
        ("decode_workers", int, field(workers, "video: clips decoded at once on threads, ahead of the model")),
        ("sequence", bool, field(True, "video: keep the per-frame rows [frames, D] beside the pooled mean")),
    ]


def _check(self) -> None:
    try:
        self.sampling()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if self.frame_batch < 1 or self.decode_workers < 1:
        raise ConfigError(f"frame_batch={self.frame_batch} and decode_workers={self.decode_workers} must be >= 1")
    if self.seq_cap:
        raise ConfigError(f"seq_cap={self.seq_cap}: a video's sequence is its per-frame rows (sequence=true); "
                          "patch or token states of frames are not kept, so leave seq_cap at 0")


_CLASSES: dict[type, type] = {}


def video_config_class(image_config: type) -> type:
    """The image backbone's config class plus the video options (one class per image config)."""
    if image_config not in _CLASSES:
        def post_init(self):
            image_config.__post_init__(self)
            _check(self)

        def sampling(self):
            return _video.Sampling(frames=self.frames, fps=self.fps, max_frames=self.max_frames)

        _CLASSES[image_config] = dataclasses.make_dataclass(
            f"Video{image_config.__name__}", _video_fields(), bases=(image_config,), frozen=True,
            namespace={"__post_init__": post_init, "sampling": sampling, "__module__": __name__})
    return _CLASSES[image_config]


class VideoFrames(Backbone):
    """An image backbone applied to sampled frames; named after it, with modality `video`."""

    modality = "video"

    def __init__(self, image_cls: type[Backbone], config: Any = None, *, device: str = "auto"):
        if image_cls.modality != "image":
            raise ConfigError(f"backbone {image_cls.name!r} encodes {image_cls.modality}; video frames need an "
                              "image backbone (fs backbones list)")
        self.Config = video_config_class(image_cls.Config)
        config = config if config is not None else self.Config()
        super().__init__(config, device=device)
        self.name = image_cls.name
        self.description = f"video frames through {image_cls.name}"
        inner = {f.name: getattr(config, f.name) for f in dataclasses.fields(image_cls.Config)}
        self.image = image_cls(image_cls.Config(**inner), device=device)
        self.prepare_workers = config.decode_workers

    @property
    def model_ref(self) -> str:
        return self.image.model_ref

    def _load(self) -> None:
        self.image.load()
        self.device = self.image.device
        # On CPU, decoding threads and the model share the cores: the model gets what the
        # decoders leave (oversubscribed torch threads stall on a busy machine).
        self.cpu_threads = max(1, (os.cpu_count() or 1) - self.config.decode_workers)

    def weights_hash(self) -> str:
        return self.image.weights_hash()

    @property
    def dim(self) -> int:
        return self.image.dim

    def preprocessing(self) -> dict:
        return {"frame": self.image.preprocessing(), "decoder": _video.DECODER,
                "sampling": self.config.sampling().policy(), "pooled": "mean of frame rows",
                "sequence": "frame rows" if self.config.sequence else None}

    def spec(self) -> dict:
        spec = super().spec()
        for key in _VOLATILE:
            spec["config"].pop(key, None)
        return spec

    def prepare(self, raw: bytes | str) -> list:
        if isinstance(raw, str):
            raise BadItemError("expected video bytes, got text")
        frames = _video.decode_frames(raw, self.config.sampling())
        return [self.image.prepare_image(img) for img in frames]

    def encode(self, items: Sequence[list]) -> Encoded:
        if self.device == "cpu":
            import torch

            if torch.get_num_threads() != self.cpu_threads:
                torch.set_num_threads(self.cpu_threads)
        flat = [frame for clip in items for frame in clip]
        step = self.config.frame_batch
        rows = np.concatenate([self.image.encode(flat[i:i + step]).pooled for i in range(0, len(flat), step)])
        if len(rows) != len(flat):
            raise BackboneError(f"backbone {self.name} gave {len(rows)} rows for {len(flat)} frames")
        edges = np.cumsum([0] + [len(clip) for clip in items])
        seqs = [np.ascontiguousarray(rows[a:b], dtype=np.float32) for a, b in zip(edges[:-1], edges[1:])]
        pooled = np.stack([s.mean(axis=0, dtype=np.float64) for s in seqs]).astype(np.float32)
        return Encoded(pooled, seqs if self.config.sequence else None)
