"""Self-supervised speech encoders (wav2vec 2.0, HuBERT, WavLM): mean-pooled frame states.

Each clip is encoded on its own, without padding: batching clips of different lengths
would pad them, and padding changes the numbers of models whose feature encoder uses
group norm (wav2vec2-base, HuBERT) or has no attention mask. One clip at a time is exact
and gives the same row whatever the batch, at a modest cost in speed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..config import field
from ..errors import BadItemError
from . import _hf, _media
from .base import Backbone, BackboneConfig, Encoded

__all__ = ["Wav2Vec2", "Hubert", "WavLM", "SpeechConfig"]


@dataclasses.dataclass(frozen=True)
class SpeechConfig(BackboneConfig):
    layer: int = field(-1, "hidden layer to pool: -1 the last, 0 the transformer's input, k the k-th layer's output")
    max_seconds: float = field(30.0, "keep only the first this many seconds of a clip (0: all of it)")

    def __post_init__(self):
        super().__post_init__()
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds={self.max_seconds} must be 0 (no limit) or positive")


class Wav2Vec2(Backbone):
    """Any transformers speech encoder loaded with AutoModel + AutoFeatureExtractor."""

    name = "wav2vec2"
    modality = "audio"
    description = "wav2vec 2.0 speech encoder, frames mean-pooled; default facebook/wav2vec2-base"
    Config = SpeechConfig
    default_model = "facebook/wav2vec2-base"

    def _load(self) -> None:
        from transformers import AutoFeatureExtractor, AutoModel

        self.extractor, self.model = _hf.load_backbone(self, AutoFeatureExtractor, AutoModel)
        n_layers = int(self.model.config.num_hidden_layers)
        if not -1 <= self.config.layer <= n_layers:
            from ..errors import ConfigError
            raise ConfigError(f"backbone {self.name}: layer={self.config.layer} must be -1 or 0..{n_layers}")
        self.sampling_rate = int(self.extractor.sampling_rate)
        self.min_samples = _receptive_field(self.model.config.conv_kernel, self.model.config.conv_stride)

    def weights_hash(self) -> str:
        return self._weights

    @property
    def dim(self) -> int:
        self.load()
        return int(self.model.config.hidden_size)

    def preprocessing(self) -> dict:
        fe = self.extractor
        return {"decode": "soundfile-mono-mean", "resampler": _media.RESAMPLER,
                "sampling_rate": self.sampling_rate, "do_normalize": bool(getattr(fe, "do_normalize", False)),
                "max_seconds": self.config.max_seconds, "pad_short_to": self.min_samples,
                "layer": self.config.layer, "batching": "one clip per forward"}

    def prepare(self, raw: bytes | str) -> np.ndarray:
        if isinstance(raw, str):
            raise BadItemError("expected audio bytes, got text")
        cap = int(round(self.config.max_seconds * self.sampling_rate)) if self.config.max_seconds > 0 else 0
        wav = _media.decode_audio(raw, self.sampling_rate, max_samples=cap)
        if len(wav) < self.min_samples:  # shorter than one output frame: pad with silence
            wav = np.pad(wav, (0, self.min_samples - len(wav)))
        return wav

    def forward_pooled(self, items: Sequence[np.ndarray]):
        """One clip per forward, as `encode` does (no padding), stacked."""
        import torch

        rows = []
        for wav in items:
            values = self.extractor(wav, sampling_rate=self.sampling_rate, return_tensors="pt")["input_values"]
            with _hf.autocast(self.device):
                out = self.model(values.to(self.device), output_hidden_states=self.config.layer != -1)
            states = (out.last_hidden_state if self.config.layer == -1 else out.hidden_states[self.config.layer]).float()
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
            rows.append(_hf.pool(states, mask, self.config.pooling))
        return torch.cat(rows)

    def encode(self, items: Sequence[np.ndarray]) -> Encoded:
        import torch

        pooled, seqs = [], []
        for wav in items:
            inputs = self.extractor(wav, sampling_rate=self.sampling_rate, return_tensors="pt")
            values = inputs["input_values"].to(self.device)
            with torch.inference_mode(), _hf.autocast(self.device):
                out = self.model(values, output_hidden_states=self.config.layer != -1)
            states = out.last_hidden_state if self.config.layer == -1 else out.hidden_states[self.config.layer]
            states = states.float()
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
            pooled.append(_hf.to_numpy(_hf.pool(states, mask, self.config.pooling))[0])
            if self.config.seq_cap > 0:
                seqs.append(np.ascontiguousarray(_hf.downsample(_hf.to_numpy(states[0]), self.config.seq_cap)))
        return Encoded(np.stack(pooled).astype(np.float32), seqs if self.config.seq_cap > 0 else None)


def _receptive_field(kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Fewest samples for which the convolutional feature encoder yields one frame."""
    need = 1
    for k, s in reversed(list(zip(kernels, strides))):
        need = (need - 1) * s + k
    return need


class Hubert(Wav2Vec2):
    name = "hubert"
    description = "HuBERT speech encoder, frames mean-pooled; default facebook/hubert-base-ls960"
    default_model = "facebook/hubert-base-ls960"


class WavLM(Wav2Vec2):
    name = "wavlm"
    description = "WavLM speech encoder, frames mean-pooled; default microsoft/wavlm-base-plus"
    default_model = "microsoft/wavlm-base-plus"
