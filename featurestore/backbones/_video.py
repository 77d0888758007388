"""Video decoding with PyAV: sampled RGB frames of a clip, and the audio track of a container.

Frame sampling, recorded in the fingerprint of every video feature set (`policy()`):

- `frames=F` (the default, 16): F frames spread uniformly over the clip's N decoded frames,
  frame k being index floor((k + 1/2) * N / F), the centre of the k-th of F equal stretches.
  A clip shorter than F frames repeats frames, so every clip gives exactly F rows. Indices
  count decoded frames in presentation order, so a variable frame rate changes nothing.
- `fps=R`: one frame every 1/R seconds of presentation time, at t = 0, 1/R, 2/R, ... from the
  first frame's timestamp, each the frame on screen at t (the last with timestamp <= t), up to
  `max_frames`. Timestamps are read per frame, so a variable frame rate is sampled by time.

N is the container's frame count when it states one, else the count of video packets; if
decoding finds another count (a header that lies), the clip is decoded again with the count
found. Every failure is a `BadItemError` with a reason: not a container, no video stream,
zero frames, a decoder error part-way, no timestamps in `fps` mode, no audio track.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Iterator

import numpy as np

from ..errors import BadItemError

__all__ = ["Sampling", "decode_frames", "uniform_indices", "decode_audio_track", "DECODER"]

#: how frames become pixels, as recorded in the fingerprint
DECODER = "pyav(ffmpeg)->rgb24"


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Which frames of a clip are kept: `frames` uniformly, or `fps` per second (then capped at `max_frames`)."""

    frames: int = 16
    fps: float = 0.0
    max_frames: int = 256

    def __post_init__(self):
        if self.fps < 0 or (self.fps == 0 and self.frames < 1) or self.max_frames < 1:
            raise ValueError(f"video sampling frames={self.frames}, fps={self.fps}, max_frames={self.max_frames}: "
                             "give frames >= 1 (uniform) or fps > 0 (by time), and max_frames >= 1")

    def policy(self) -> dict:
        if self.fps > 0:
            return {"mode": "fps", "fps": self.fps, "max_frames": self.max_frames, "pick": "last frame with pts <= t"}
        return {"mode": "uniform", "frames": self.frames, "index": "floor((k+0.5)*N/F)"}


def uniform_indices(n: int, frames: int) -> np.ndarray:
    """Indices of `frames` frames spread uniformly over `n`: floor((k + 0.5) * n / frames)."""
    return ((2 * np.arange(frames, dtype=np.int64) + 1) * n) // (2 * frames)


def _open(raw: bytes):
    import av

    if not raw:
        raise BadItemError("video file is empty (0 bytes)")
    try:
        return av.open(io.BytesIO(raw), mode="r")
    except av.FFmpegError as exc:
        raise BadItemError(f"not a readable video container ({type(exc).__name__}: {exc})") from None


def _video_stream(container):
    if not container.streams.video:
        raise BadItemError("the file has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # the codec's own frame/slice threads (outside the GIL)
    return stream


def _frames(raw: bytes) -> Iterator:
    """Decoded video frames in presentation order; a decoder error becomes a BadItemError."""
    import av

    with _open(raw) as container:
        stream = _video_stream(container)
        try:
            yield from container.decode(stream)
        except av.FFmpegError as exc:
            raise BadItemError(f"video cannot be decoded ({type(exc).__name__}: {exc})") from None


def _count(raw: bytes) -> int:
    """Frames the container says it has, or else its video packets (no decoding)."""
    import av

    with _open(raw) as container:
        stream = _video_stream(container)
        if stream.frames and stream.frames > 0:
            return int(stream.frames)
        try:
            return sum(1 for p in container.demux(stream) if p.size)
        except av.FFmpegError as exc:
            raise BadItemError(f"video cannot be read ({type(exc).__name__}: {exc})") from None


def _rgb(frame):
    from PIL import Image

    return Image.fromarray(frame.to_ndarray(format="rgb24"))


def decode_frames(raw: bytes, sampling: Sampling) -> list:
    """Bytes of a video file -> the sampled frames as RGB `PIL.Image`s (at least one)."""
    out = _by_time(raw, sampling) if sampling.fps > 0 else _uniform(raw, sampling.frames)
    if not out:
        raise BadItemError("video has zero frames")
    return out


def _uniform(raw: bytes, frames: int) -> list:
    n = _count(raw)
    for _ in range(2):  # the second pass only when the stated count was wrong
        if n == 0:
            return []
        wanted = uniform_indices(n, frames)
        picked, seen = {}, 0
        for i, frame in enumerate(_frames(raw)):
            seen = i + 1
            if i in picked or not (wanted == i).any():
                continue
            picked[i] = _rgb(frame)
        if seen == n:
            return [picked[int(i)] for i in wanted]
        n = seen
    raise BadItemError(f"video frame count is unstable ({n} frames on two decodes)")


def _by_time(raw: bytes, sampling: Sampling) -> list:
    """Targets t_k = k / fps after the first frame; each takes the last frame with time <= t_k."""
    step, eps = 1.0 / sampling.fps, 1e-9
    out: list = []
    prev, prev_img, start, k = None, None, None, 0

    def emit_until(limit: float, inclusive: bool) -> None:
        nonlocal prev_img, k
        while len(out) < sampling.max_frames and (k * step <= limit + eps if inclusive else k * step < limit - eps):
            if prev_img is None:
                prev_img = _rgb(prev)
            out.append(prev_img)
            k += 1

    for frame in _frames(raw):
        if frame.time is None:
            raise BadItemError("video frames have no timestamps, so fps sampling cannot place them; "
                               "use uniform sampling (--param frames=N)")
        start = frame.time if start is None else start
        if prev is not None:
            emit_until(frame.time - start, inclusive=False)  # targets before this frame: the previous one
        if len(out) >= sampling.max_frames:
            return out
        prev, prev_img = frame, None
    if prev is not None:
        emit_until(prev.time - start, inclusive=True)  # the last frame shows at its own time
    return out


# ---- audio tracks -------------------------------------------------------------------------
_SCALE = {"u8": (128.0, 128.0), "s16": (0.0, 32768.0), "s32": (0.0, 2147483648.0), "s64": (0.0, 2.0 ** 63),
          "flt": (0.0, 1.0), "dbl": (0.0, 1.0)}


def _audio_array(frame) -> np.ndarray:
    """One decoded audio frame -> float64 `[channels, samples]` on [-1, 1]."""
    fmt = frame.format
    name = fmt.name.rstrip("p")
    channels = len(frame.layout.channels)
    a = frame.to_ndarray()
    if not fmt.is_planar:  # interleaved: [1, samples * channels]
        a = a.reshape(-1, channels).T
    offset, scale = _SCALE.get(name, (0.0, 1.0))
    return (a.astype(np.float64) - offset) / scale


def decode_audio_track(raw: bytes, *, max_input: int = 0) -> tuple[np.ndarray, int]:
    """The first audio stream of a container -> (float64 `[channels, samples]`, sample rate).

    With `max_input`, decoding stops once that many samples per channel are in hand."""
    import av

    with _open(raw) as container:
        if not container.streams.audio:
            kind = "video" if container.streams.video else "file"
            raise BadItemError(f"the {kind} has no audio track")
        stream = container.streams.audio[0]
        chunks, have, rate = [], 0, int(stream.rate or 0)
        try:
            for frame in container.decode(stream):
                rate = rate or int(frame.sample_rate)
                chunks.append(_audio_array(frame))
                have += chunks[-1].shape[1]
                if max_input and have >= max_input:
                    break
        except av.FFmpegError as exc:
            raise BadItemError(f"audio track cannot be decoded ({type(exc).__name__}: {exc})") from None
    if not chunks or have == 0:
        raise BadItemError("the audio track has no samples")
    if rate <= 0:
        raise BadItemError(f"the audio track has an invalid sample rate ({rate})")
    width = {c.shape[0] for c in chunks}
    if len(width) != 1:
        raise BadItemError(f"the audio track changes its channel count mid-stream ({sorted(width)})")
    return np.concatenate(chunks, axis=1), rate
