"""CLAP audio encoder (HTS-AT with projection): pooled rows are the projected audio embeddings.

CLAP's feature extractor picks random crops of clips longer than its window (10 s for the
LAION models), which would make rows irreproducible. So each clip is first cut, here, to
the window's length (its start, by default), and the extractor never has to choose.
Sequences are the final time frames (averaged over frequency) sent through the audio
projection, so their rows have the width `dim` of a pooled row.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..config import field
from ..errors import BadItemError
from . import _hf, _media
from .base import Backbone, BackboneConfig, Encoded

__all__ = ["CLAPAudio", "ClapConfig"]


@dataclasses.dataclass(frozen=True)
class ClapConfig(BackboneConfig):
    normalize: bool = field(False, "L2-normalise pooled vectors (as CLAP does before cosine similarity)")
    crop: str = field("start", "which window of a clip longer than the model's window to keep: start | center")

    def __post_init__(self):
        super().__post_init__()
        if self.crop not in ("start", "center"):
            raise ValueError(f"crop={self.crop!r} must be 'start' or 'center'")


class CLAPAudio(Backbone):
    """LAION CLAP audio tower: ClapAudioModelWithProjection + ClapFeatureExtractor."""

    name = "clap-audio"
    modality = "audio"
    description = "CLAP audio encoder (projected embeddings), default laion/clap-htsat-unfused"
    Config = ClapConfig
    default_model = "laion/clap-htsat-unfused"

    def _load(self) -> None:
        from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor

        self.extractor, self.model = _hf.load_backbone(self, ClapFeatureExtractor,
                                                       ClapAudioModelWithProjection)
        self.sampling_rate = int(self.extractor.sampling_rate)
        self.window = int(self.extractor.nb_max_samples)
        # fused checkpoints take the 4-channel "fusion" input; unfused ones the single mel
        self.fusion = bool(getattr(self.model.config, "enable_fusion", False))

    def weights_hash(self) -> str:
        return self._weights

    @property
    def dim(self) -> int:
        self.load()
        return int(self.model.config.projection_dim)

    def preprocessing(self) -> dict:
        fe = self.extractor
        return {"decode": "soundfile-mono-mean", "resampler": _media.RESAMPLER,
                "sampling_rate": self.sampling_rate, "window_samples": self.window, "crop": self.config.crop,
                "truncation": "fusion" if self.fusion else "rand_trunc(never triggered)",
                "padding": fe.padding, "feature_size": int(fe.feature_size), "hop_length": int(fe.hop_length),
                "fft_window_size": int(fe.fft_window_size), "frequency_min": fe.frequency_min,
                "frequency_max": fe.frequency_max, "pooled": "audio_embeds",
                "sequences": "time frames (freq-mean)->audio_projection"}

    def prepare(self, raw: bytes | str) -> np.ndarray:
        if isinstance(raw, str):
            raise BadItemError("expected audio bytes, got text")
        # a start crop needs only the first window: decode no more than that
        wav = _media.decode_audio(raw, self.sampling_rate, max_samples=self.window if self.config.crop == "start" else 0)
        if len(wav) > self.window:
            start = 0 if self.config.crop == "start" else (len(wav) - self.window) // 2
            wav = wav[start:start + self.window]
        return wav

    def _inputs(self, items):
        import torch

        feats = self.extractor([np.asarray(w, dtype=np.float32) for w in items], sampling_rate=self.sampling_rate,
                               truncation="fusion" if self.fusion else "rand_trunc", return_tensors="pt")
        is_longer = torch.zeros((len(items), 1), dtype=torch.bool)
        return {"input_features": feats["input_features"].to(self.device), "is_longer": is_longer.to(self.device)}

    def forward_pooled(self, items: Sequence[np.ndarray]):
        import torch

        with _hf.autocast(self.device):
            pooled = self.model(**self._inputs(items)).audio_embeds.float()
        return torch.nn.functional.normalize(pooled, dim=-1) if self.config.normalize else pooled

    def encode(self, items: Sequence[np.ndarray]) -> Encoded:
        import torch

        feats = self.extractor([np.asarray(w, dtype=np.float32) for w in items], sampling_rate=self.sampling_rate,
                               truncation="fusion" if self.fusion else "rand_trunc", return_tensors="pt")
        # every clip fits the window, so none is "longer"; the extractor would flag one at random
        is_longer = torch.zeros((len(items), 1), dtype=torch.bool)
        with torch.inference_mode(), _hf.autocast(self.device):
            out = self.model(input_features=feats["input_features"].to(self.device),
                             is_longer=is_longer.to(self.device))
            pooled = out.audio_embeds.float()
            seqs = None
            if self.config.seq_cap > 0:
                frames = out.last_hidden_state.float().mean(2).transpose(1, 2)  # [B, T, C], time in order
                frames = self.model.audio_projection(frames).float()
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        if self.config.seq_cap > 0:
            seqs = []
            for wav, f in zip(items, _hf.to_numpy(frames)):
                # the window is filled by repeating short clips: keep the frames of the clip itself
                keep = max(1, int(np.ceil(len(f) * min(1.0, len(wav) / self.window))))
                seqs.append(np.ascontiguousarray(_hf.downsample(f[:keep], self.config.seq_cap)))
        return Encoded(_hf.to_numpy(pooled), seqs)
