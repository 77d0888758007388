"""The backbone registry: the names users type after `--backbone`.

Entries are dotted paths, so a backbone's heavy imports happen only when it is used.
Adding a backbone is one module in this folder plus one line in `_BUILTIN`.
"""
from __future__ import annotations

from typing import Mapping

from ..config import from_strings
from ..registry import Registry
from .base import MODALITIES, Backbone, BackboneConfig, Encoded, fingerprint_of

__all__ = ["Backbone", "BackboneConfig", "Encoded", "fingerprint_of", "register", "get", "create",
           "names", "REGISTRY", "MODALITIES"]

_BUILTIN: dict[str, str] = {
    "minilm": "featurestore.backbones.text:MiniLM",
    "hf-text": "featurestore.backbones.text:HFText",
    "clip-image": "featurestore.backbones.clip:CLIPImage",
    "clip-text": "featurestore.backbones.clip:CLIPText",
    "clap-audio": "featurestore.backbones.clap:CLAPAudio",
    "wav2vec2": "featurestore.backbones.wav2vec2:Wav2Vec2",
    "hubert": "featurestore.backbones.wav2vec2:Hubert",
    "wavlm": "featurestore.backbones.wav2vec2:WavLM",
    "fer": "featurestore.backbones.fer:FER",
    "resemblyzer": "featurestore.backbones.resemblyzer:Resemblyzer",
}
REGISTRY: Registry[type[Backbone]] = Registry("backbone", _BUILTIN, list_hint="fs backbones list")
register, get, names = REGISTRY.register, REGISTRY.get, REGISTRY.names


def create(name: str, params: Mapping[str, str] | None = None, *, device: str = "auto",
           modality: str | None = None) -> Backbone:
    """Instantiate backbone `name` from string parameters (`--param key=value`).

    `modality="video"` with an image backbone gives that backbone over sampled video frames
    (`featurestore.backbones.video`), which also takes the video options (frames, fps, ...)."""
    cls = get(name)
    if modality == "video" and cls.modality == "image":
        from .video import VideoFrames, video_config_class

        config = from_strings(video_config_class(cls.Config), dict(params or {}), what=f"backbone {name!r} (video)")
        return VideoFrames(cls, config, device=device)
    config = from_strings(cls.Config, dict(params or {}), what=f"backbone {name!r}")
    return cls(config, device=device)
