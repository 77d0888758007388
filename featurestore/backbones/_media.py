"""Decoding of raw image and audio bytes, shared by the image and audio backbones.

Audio comes from any file soundfile reads (WAV, FLAC, OGG, MP3...) or, failing that, from
the first audio track of a video container (MP4, MKV/WebM, AVI, ...) read with PyAV: so
`--modality audio` on a video path extracts its soundtrack, and a video with no audio
track is a bad item with that reason.

Every failure becomes a `BadItemError` with a reason, so extraction records the item and
goes on. Resampling is done here, in numpy, with one fixed windowed-sinc method: the
numbers must not depend on which optional audio library happens to be installed.
"""
from __future__ import annotations

import io
import math

import numpy as np

from ..errors import BadItemError

__all__ = ["decode_image", "decode_audio", "resample", "RESAMPLER"]

#: the resampling method, as recorded in the backbones' preprocessing()
RESAMPLER = "sinc-hann(zeros=6,rolloff=0.99)"
_ZEROS, _ROLLOFF = 6, 0.99


def decode_image(raw: bytes):
    """Bytes -> RGB `PIL.Image`, fully loaded (so a truncated file fails here, not later)."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise BadItemError("image file is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
        img = _to_8bit(img).convert("RGB")
    except UnidentifiedImageError:
        raise BadItemError("not a recognised image format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadItemError(f"image cannot be decoded ({type(exc).__name__}: {exc})") from None
    if img.width < 1 or img.height < 1:
        raise BadItemError(f"image has no pixels ({img.width}x{img.height})")
    return img


def _to_8bit(img):
    """16- and 32-bit grayscale ("I;16", "I") scaled to 8 bits: PIL's convert would clip them at 255."""
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        return img
    from PIL import Image

    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) <= 65535 else float(a.max())
    return Image.fromarray(np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8))


def _input_frames(max_samples: int, sr_in: int, sr_out: int) -> int:
    """Input frames whose resampling gives the first `max_samples` outputs exactly (kernel reach included)."""
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    width = math.ceil(_ZEROS * sr_in / (min(sr_in, sr_out) * _ROLLOFF))
    return ((max_samples - 1) * down) // up + width + 2


def decode_audio(raw: bytes, target_sr: int, *, max_samples: int = 0) -> np.ndarray:
    """Bytes -> mono float32 `[T]` at `target_sr` (channels averaged, then resampled).

    With `max_samples`, only the first that many output samples are kept, and only the input
    they depend on is decoded and resampled (a 10-minute file capped at 30 s reads ~30 s)."""
    import soundfile as sf

    if not raw:
        raise BadItemError("audio file is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(raw)) as f:
            sr = f.samplerate
            frames = _input_frames(max_samples, sr, target_sr) if max_samples > 0 and sr > 0 else -1
            data = f.read(frames, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError (a RuntimeError), TypeError, ...
        if not _is_container(raw):
            raise BadItemError(f"audio cannot be decoded ({type(exc).__name__}: {exc})") from None
        data, sr = _container_audio(raw, max_samples, target_sr)
    if sr <= 0:
        raise BadItemError(f"audio has an invalid sample rate ({sr})")
    if data.shape[0] == 0 or data.shape[1] == 0:
        raise BadItemError("audio has no samples")
    if not np.isfinite(data).all():
        raise BadItemError("audio contains NaN or infinite samples")
    wav = data.mean(axis=1, dtype=np.float64)
    out = resample(wav, int(sr), int(target_sr)).astype(np.float32)
    if max_samples > 0:
        out = out[:max_samples]
    if out.size == 0:
        raise BadItemError(f"audio is too short to resample ({data.shape[0]} samples at {sr} Hz)")
    return out


#: leading bytes of the containers whose audio track is read with PyAV (video files, m4a)
_CONTAINER_MAGIC = ((4, b"ftyp"), (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"),  # MP4 / QuickTime
                    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
                    (0, b"FLV"), (8, b"AVI "), (0, b"\x30\x26\xb2\x75"))  # FLV, AVI (RIFF), ASF / WMV


def _is_container(raw: bytes) -> bool:
    return any(raw[at:at + len(magic)] == magic for at, magic in _CONTAINER_MAGIC) or \
        (len(raw) > 188 and raw[0] == 0x47 and raw[188] == 0x47)  # MPEG-TS


def _container_audio(raw: bytes, max_samples: int, target_sr: int) -> tuple[np.ndarray, int]:
    """The audio track of a video container (PyAV) as float32 `[T, channels]` and its rate."""
    from ._video import decode_audio_track

    limit = 0
    if max_samples > 0:  # the rate is known only once the stream is open: decode a generous bound
        limit = _input_frames(max_samples, 192000, target_sr)
    track, sr = decode_audio_track(raw, max_input=limit)
    if max_samples > 0:
        track = track[:, :_input_frames(max_samples, sr, target_sr)]
    return track.T.astype(np.float32), sr


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited polyphase resampling by windowed-sinc interpolation, in float64.

    The kernel is torchaudio's `sinc_interp_hann` (6 zero crossings, cutoff at 0.99 of the
    lower Nyquist rate, zeros beyond the edges), evaluated at each output's exact position;
    outputs of one phase share a kernel, so each phase is one strided matrix-vector product.
    Output length is ceil(len * sr_out / sr_in), as torchaudio's.
    """
    x = np.asarray(x, dtype=np.float64)
    if sr_in == sr_out:
        return x.copy()
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    n_out = -(-len(x) * up // down)  # ceil, as torchaudio
    base = min(sr_in, sr_out) * _ROLLOFF  # cutoff frequency in Hz (x2)
    width = math.ceil(_ZEROS * sr_in / base)  # half-width of the kernel, in input samples
    taps = np.arange(-width, width + 2)  # input offsets from floor(position)
    padded = np.pad(x, (width + 1, width + 2 + down))
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(taps))  # windows[i] = x[i-width-1 ...]
    out = np.empty(n_out, dtype=np.float64)
    # output n sits at input position n*down/up; outputs of one phase (n mod up) share a kernel
    for phase in range(min(up, n_out)):
        first = (phase * down) // up  # floor of the position of output `phase`
        frac = ((phase * down) % up) / up
        t = np.clip((taps - frac) * (base / sr_in), -_ZEROS, _ZEROS)  # distance in cutoff periods
        kernel = np.sinc(t) * np.cos(t * math.pi / _ZEROS / 2) ** 2 * (base / sr_in)
        count = len(range(phase, n_out, up))
        rows = windows[first + 1: first + 1 + count * down: down]  # output phase+m*up reads x[m*down+first+taps]
        out[phase::up] = rows @ kernel
    return out
