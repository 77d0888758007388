"""Resemblyzer's VoiceEncoder (GE2E speaker embedding, 256-d), ported to plain torch + numpy.

The weights ship in the `resemblyzer` wheel as `resemblyzer/pretrained.pt`; importing the
package would pull in librosa and webrtcvad, so the file is found without importing it and
the few pieces of the pipeline are re-implemented here:

- audio at 16 kHz, volume raised to -30 dBFS if quieter (`normalize_volume`, increase only);
- a power mel spectrogram as librosa 0.6-0.9 computed it for Resemblyzer: n_fft 400
  (25 ms), hop 160 (10 ms), periodic Hann window, centred frames with reflect padding,
  40 Slaney-scale mel bands with Slaney area normalisation (librosa's defaults), no log;
- partial utterances of 160 frames at 1.3 per second (the last kept if 75% covered), each
  embedded by the 3-layer LSTM -> linear -> ReLU -> L2 norm, then averaged and L2-normed.

Documented simplification: Resemblyzer's webrtcvad trimming of long silences is skipped
(no VAD dependency), so clips with long pauses embed slightly differently.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import field
from ..errors import BackboneError, BadItemError
from ..hashing import file_digest
from . import _hf, _media
from .base import Backbone, BackboneConfig, Encoded

__all__ = ["Resemblyzer", "ResemblyzerConfig", "slaney_mel_filterbank", "mel_spectrogram", "partial_slices",
           "packaged_weights"]

SAMPLING_RATE = 16000
N_FFT, HOP, N_MELS = 400, 160, 40
PARTIAL_FRAMES = 160
HIDDEN, LAYERS = 256, 3
_INT16_MAX = 2 ** 15 - 1


def packaged_weights() -> Path:
    """Path of `pretrained.pt` in the installed wheel, found without importing `resemblyzer`."""
    import importlib.util

    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.origin:
        raise BackboneError("backbone resemblyzer: the 'resemblyzer' package is not installed; "
                            "pip install --no-deps resemblyzer, or pass --param model=PATH/pretrained.pt")
    return Path(spec.origin).parent / "pretrained.pt"


@dataclasses.dataclass(frozen=True)
class ResemblyzerConfig(BackboneConfig):
    rate: float = field(1.3, "partial utterances per second (Resemblyzer's default 1.3)")
    min_coverage: float = field(0.75, "keep the last partial if at least this fraction of it is audio")
    max_seconds: float = field(60.0, "keep only the first this many seconds of a clip (0: all of it)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.min_coverage <= 1:
            raise ValueError(f"min_coverage={self.min_coverage} must be in (0, 1]")
        if not SAMPLING_RATE / (HOP * PARTIAL_FRAMES) <= self.rate <= SAMPLING_RATE / HOP:
            raise ValueError(f"rate={self.rate} must be between 0.625 and 100 partials per second")
        if self.max_seconds < 0:
            raise ValueError(f"max_seconds={self.max_seconds} must be 0 (no limit) or positive")


# ---- mel spectrogram (librosa-compatible, Slaney) -------------------------------------
def _hz_to_mel(f):
    """Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def slaney_mel_filterbank(sr: int = SAMPLING_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """`[n_mels, 1 + n_fft // 2]` triangles on the Slaney mel scale, each of unit area in Hz
    (librosa.filters.mel(sr, n_fft, n_mels) with fmin=0, fmax=sr/2, norm='slaney')."""
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
    return weights


_MEL = slaney_mel_filterbank().astype(np.float32)
_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT))  # periodic Hann


def mel_spectrogram(wav: np.ndarray) -> np.ndarray:
    """`[1 + len // 160, 40]` float32 power mel spectrogram (not log), frames centred."""
    pad = N_FFT // 2
    y = np.pad(np.asarray(wav, dtype=np.float64), pad, mode="reflect")
    n_frames = 1 + (len(y) - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(y, N_FFT)[::HOP][:n_frames]
    power = np.abs(np.fft.rfft(frames * _WINDOW, n=N_FFT, axis=1)) ** 2
    return (power.astype(np.float32) @ _MEL.T).astype(np.float32)


def partial_slices(n_samples: int, rate: float, min_coverage: float) -> list[slice]:
    """Mel-frame slices of the partial utterances, exactly as Resemblyzer computes them."""
    samples_per_frame = HOP
    n_frames = int(np.ceil((n_samples + 1) / samples_per_frame))
    frame_step = max(1, int(np.round((SAMPLING_RATE / rate) / samples_per_frame)))
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    last = slices[-1]
    coverage = (n_samples - last.start * samples_per_frame) / (PARTIAL_FRAMES * samples_per_frame)
    if coverage < min_coverage and len(slices) > 1:
        slices = slices[:-1]
    return slices


def normalize_volume(wav: np.ndarray, target_dbfs: float = -30.0) -> np.ndarray:
    """Raise (never lower) the volume to `target_dbfs`, as Resemblyzer's preprocess_wav."""
    rms = np.sqrt(np.mean((wav.astype(np.float64) * _INT16_MAX) ** 2))
    change = target_dbfs - 20 * np.log10(rms / _INT16_MAX)
    if change < 0:
        return wav
    return (wav * (10 ** (change / 20))).astype(np.float32)


# ---- the backbone -----------------------------------------------------------------------
class Resemblyzer(Backbone):
    """Resemblyzer VoiceEncoder: 256-d speaker (voice) embedding, L2-normalised."""

    name = "resemblyzer"
    modality = "audio"
    description = "Resemblyzer GE2E voice encoder (offline, packaged weights), 256-d speaker embedding"
    Config = ResemblyzerConfig

    @property
    def default_model(self) -> str:  # type: ignore[override]
        return str(packaged_weights())

    def _load(self) -> None:
        import torch

        path = Path(self.model_ref).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone resemblyzer: weights file {str(path)!r} not found; "
                                "pip install --no-deps resemblyzer, or pass --param model=PATH/pretrained.pt")
        if self.config.adapter:
            raise BackboneError("backbone resemblyzer: adapters are not supported (it is not a transformers model)")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            state = checkpoint.get("model_state", checkpoint)
            self.lstm = torch.nn.LSTM(N_MELS, HIDDEN, LAYERS, batch_first=True)
            self.linear = torch.nn.Linear(HIDDEN, HIDDEN)
            self.lstm.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("lstm.")})
            self.linear.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("linear.")})
        except Exception as exc:
            raise BackboneError(f"backbone resemblyzer: cannot load {str(path)!r} "
                                f"({type(exc).__name__}: {exc})") from None
        self.lstm.to(self.device).eval()
        self.linear.to(self.device).eval()
        self._weights = file_digest(path)

    def weights_hash(self) -> str:
        return self._weights

    @property
    def dim(self) -> int:
        return HIDDEN

    def preprocessing(self) -> dict:
        return {"decode": "soundfile-mono-mean", "resampler": _media.RESAMPLER, "sampling_rate": SAMPLING_RATE,
                "volume": "raise-to-30dBFS", "vad_trim": None, "max_seconds": self.config.max_seconds,
                "mel": {"n_fft": N_FFT, "hop": HOP, "window": "hann-periodic", "center": "reflect",
                        "n_mels": N_MELS, "scale": "slaney", "norm": "slaney", "power": 2, "log": False},
                "partials": {"frames": PARTIAL_FRAMES, "rate": self.config.rate,
                             "min_coverage": self.config.min_coverage},
                "pooling": "mean of L2-normed partials, L2-normed"}

    def prepare(self, raw: bytes | str) -> np.ndarray:
        """Audio bytes -> `[P, 160, 40]` mel partial utterances."""
        if isinstance(raw, str):
            raise BadItemError("expected audio bytes, got text")
        cap = int(round(self.config.max_seconds * SAMPLING_RATE)) if self.config.max_seconds > 0 else 0
        wav = _media.decode_audio(raw, SAMPLING_RATE, max_samples=cap)
        if not np.any(wav):
            raise BadItemError("audio is silent (all samples zero): no voice to embed")
        wav = normalize_volume(wav)
        slices = partial_slices(len(wav), self.config.rate, self.config.min_coverage)
        needed = slices[-1].stop * HOP
        if needed >= len(wav):
            wav = np.pad(wav, (0, needed - len(wav)))
        mel = mel_spectrogram(wav)
        return np.stack([mel[s] for s in slices])

    def encode(self, items: Sequence[np.ndarray]) -> Encoded:
        import torch
        import torch.nn.functional as F

        pooled, seqs = [], []
        for mels in items:  # one clip per forward: rows do not depend on the batch
            x = torch.from_numpy(np.ascontiguousarray(mels, dtype=np.float32)).to(self.device)
            with torch.inference_mode():
                _, (hidden, _) = self.lstm(x)
                partials = F.normalize(torch.relu(self.linear(hidden[-1])), dim=1, eps=1e-12)
                pooled.append(_hf.to_numpy(F.normalize(partials.mean(0), dim=0, eps=1e-12)))
            if self.config.seq_cap > 0:
                seqs.append(np.ascontiguousarray(_hf.downsample(_hf.to_numpy(partials), self.config.seq_cap)))
        return Encoded(np.stack(pooled).astype(np.float32), seqs if self.config.seq_cap > 0 else None)
