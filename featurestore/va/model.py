"""`model`: VA from any transformers model with a regression head.

Loads a hub id or a local folder with AutoModelForAudioClassification,
AutoModelForSequenceClassification (text) or AutoModelForImageClassification; which one
follows from the model type in its config.json (`modality=auto`), so the modality is
known, and a wrong one refused, before any weights are read.

The output columns are found by name in `config.id2label` (`valence`/`arousal`, also
`v`/`a`, `pleasure`/`activation`; case-insensitive): an MSP-Podcast wav2vec2 whose head
says {0: arousal, 1: dominance, 2: valence} gives valence from column 2. A model whose
labels are generic (`LABEL_0`, ...) needs `labels=arousal,dominance,valence`. A model
with a valence column only gives arousal NaN (unknown), and vice versa.

Outputs are mapped linearly from `range=LOW..HIGH` (default 0..1, the range of the
MSP-Podcast dimension models) to [-1, 1] and clipped there; a NaN or infinite output is
passed on unclipped, so the job records the item as an error instead of storing it.
A checkpoint that lacks its head's weights (a custom head class that the Auto classes
cannot load) is refused rather than scored with a randomly initialised head, with one
exception built in: the audeering dimensional wav2vec2 checkpoints
(`Wav2Vec2ForSpeechClassification`: mean-pooled hidden states, dense-tanh-projection head;
see `_speech_regression.py`), loaded with their own architecture.

An image model also scores `video`: each clip's frames are sampled as for video features
(`frames=16` uniformly, or `fps=R`), scored one by one, and the clip's VA is the mean of
its frames' outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..backbones import _hf, _media
from ..config import field
from ..errors import BackboneError, BadItemError, ConfigError
from ..hashing import normalise_text
from .base import ScorerConfig, VAScorer, parse_range, to_unit_range

__all__ = ["ModelScorer", "ModelConfig", "detect_modalities", "head_columns"]

_MAPPINGS = {  # modality -> (transformers Auto class, name of its model-type mapping)
    "audio": ("AutoModelForAudioClassification", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
    "text": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "image": ("AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"),
}
_PROCESSORS = {"audio": "AutoFeatureExtractor", "text": "AutoTokenizer", "image": "AutoImageProcessor"}
_VIDEO_FIELDS = ("frames", "fps", "max_frames")  # in the source digest of video sources only
_FRAME_BATCH = 64  # video frames per forward pass
_NAMES = {"valence": ("valence", "v", "pleasure", "pleasantness"), "arousal": ("arousal", "a", "activation")}


@dataclasses.dataclass(frozen=True)
class ModelConfig(ScorerConfig):
    model: str = field("", "hub id or local folder of a transformers model with a regression head")
    modality: str = field("auto", "auto (from the model type) | text | image | audio")
    range: str = field("0..1", "the model's output range as LOW..HIGH, mapped linearly to [-1, 1] "
                                "(0..1 for the MSP-Podcast dimension models, -1..1 for none)")
    labels: str = field("", "output names in order, e.g. arousal,dominance,valence, when the config's "
                            "id2label does not name them")
    max_seconds: float = field(30.0, "audio: score only the first this many seconds (0: all)")
    max_length: int = field(512, "text: maximum tokens after truncation")
    frames: int = field(16, "video: frames sampled uniformly per clip, each scored by the image model")
    fps: float = field(0.0, "video: sample this many frames per second instead (0: off)")
    max_frames: int = field(256, "video: at most this many frames per clip with fps sampling")

    def __post_init__(self):
        if self.modality not in ("auto", *_MAPPINGS):
            raise ConfigError(f"modality={self.modality!r} must be auto, text, image or audio (the model's input; "
                              "an image model also scores video frames)")
        parse_range(self.range, "range")
        if self.max_seconds < 0 or self.max_length < 1:
            raise ConfigError("max_seconds must be 0 or more and max_length at least 1")
        try:
            self.sampling()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def sampling(self):
        from ..backbones._video import Sampling

        return Sampling(frames=self.frames, fps=self.fps, max_frames=self.max_frames)


def detect_modalities(config: Any) -> tuple[str, ...]:
    """Modalities whose Auto*Classification class knows this config's model type."""
    from transformers.models.auto import modeling_auto

    kind = getattr(config, "model_type", "")
    return tuple(m for m, (_, table) in _MAPPINGS.items() if kind in getattr(modeling_auto, table))


def head_columns(id2label: dict, num_labels: int, labels: str = "") -> dict[str, int]:
    """{"valence": column, "arousal": column} from the output names (missing: not provided)."""
    names = [s.strip().lower() for s in labels.split(",")] if labels else \
        [str(id2label.get(i, id2label.get(str(i), ""))).strip().lower() for i in range(num_labels)]
    if labels and len(names) != num_labels:
        raise ConfigError(f"labels={labels!r} names {len(names)} outputs; the model has {num_labels}")
    cols = {dim: next(names.index(n) for n in aliases if n in names)
            for dim, aliases in _NAMES.items() if any(n in names for n in aliases)}
    if not cols:
        raise ConfigError(f"the model's outputs are named {names}: none is valence or arousal; name them in "
                          "order with --param labels=..., e.g. labels=arousal,dominance,valence")
    return cols


class ModelScorer(VAScorer):
    """A transformers regression model; columns picked by name from config.id2label."""

    name = "model"
    description = ("text/image/audio/video: any transformers model with a valence/arousal regression head "
                   "(image models score video frames), --param model=HUB_ID_OR_FOLDER")
    modality_hint = "text, image (and video) or audio (from the model type)"
    Config = ModelConfig
    volatile = ("model",)

    def _hf_config(self):
        if getattr(self, "_cfg", None) is None:
            from transformers import AutoConfig

            self._cfg = _hf.from_pretrained(AutoConfig, self.config.model, what="VA scorer model",
                                            option="--param model=PATH")
        return self._cfg

    def modalities(self) -> tuple[str, ...]:
        found = detect_modalities(self._hf_config())
        kind = getattr(self._hf_config(), "model_type", "?")
        if not found:
            raise ConfigError(f"VA scorer model: model type {kind!r} of {self.config.model!r} has no text, image "
                              "or audio classification head in transformers, so it cannot give VA scores")
        if self.config.modality != "auto":
            if self.config.modality not in found:
                raise ConfigError(f"VA scorer model: {self.config.model!r} ({kind}) is a {'/'.join(found)} model, "
                                  f"not {self.config.modality}")
            found = (self.config.modality,)
        return found + (("video",) if found == ("image",) else ())

    def full_spec(self, modality: str) -> dict:
        spec = super().full_spec(modality)
        if modality != "video":  # sources of other modalities keep the digest they had before video existed
            for key in _VIDEO_FIELDS:
                spec["config"].pop(key, None)
        return spec

    def _load(self) -> None:
        import transformers

        what = "VA scorer model"
        cfg = self._hf_config()
        found = tuple(m for m in self.modalities() if m != "video")
        if len(found) > 1:
            raise ConfigError(f"{what}: {self.config.model!r} could be any of {list(found)}; "
                              "pick one with --param modality=...")
        self.modality = found[0]
        if getattr(cfg, "problem_type", None) in ("single_label_classification", "multi_label_classification"):
            raise ConfigError(f"{what}: {self.config.model!r} is a classifier (problem_type={cfg.problem_type}), "
                              "not a regression model; VA needs continuous outputs")
        self.columns = head_columns(cfg.id2label or {}, int(cfg.num_labels), self.config.labels)
        auto, _ = _MAPPINGS[self.modality]
        model, info = self._load_model(getattr(transformers, auto), cfg)
        if info.get("missing_keys"):
            raise BackboneError(f"{what}: {self.config.model!r} has no weights for {sorted(info['missing_keys'])}; "
                                f"its head is not the one {auto} builds (often a custom class in the model's own "
                                "code), so its outputs would be random. Convert the head, or use `learned`")
        self.processor = _hf.from_pretrained(getattr(transformers, _PROCESSORS[self.modality]), self.config.model,
                                             what=what, option="--param model=PATH")
        self._weights = _hf.weights_digest(self.config.model, model)
        self.model = model.to(self.device).eval()
        self.sampling_rate = int(getattr(self.processor, "sampling_rate", 0) or 0)
        kernels, strides = getattr(cfg, "conv_kernel", None), getattr(cfg, "conv_stride", None)
        if kernels and strides:
            from ..backbones.wav2vec2 import _receptive_field
            self.min_samples = _receptive_field(kernels, strides)
        else:
            self.min_samples = 1

    def _load_model(self, auto, cfg):
        """(model, loading info): the Auto class, or the audeering regression architecture when
        the config names it or the checkpoint holds its head (`classifier.dense`, `classifier.out_proj`)."""
        from . import _speech_regression as sr

        kwargs = dict(what="VA scorer model", option="--param model=PATH", output_loading_info=True)
        if self.modality == "audio" and sr.is_speech_regression(cfg):
            return _hf.from_pretrained(sr.Wav2Vec2RegressionModel, self.config.model, **kwargs)
        model, info = _hf.from_pretrained(auto, self.config.model, **kwargs)
        if getattr(cfg, "model_type", "") == "wav2vec2" and info.get("missing_keys") and \
                set(sr.HEAD_KEYS) <= set(info.get("unexpected_keys") or ()):
            return _hf.from_pretrained(sr.Wav2Vec2RegressionModel, self.config.model, **kwargs)
        return model, info

    def provides(self) -> tuple[bool, bool]:
        self.load()
        return "valence" in self.columns, "arousal" in self.columns

    def spec(self) -> dict:
        self.load()
        prep: dict = {"processor": type(self.processor).__name__}
        if self.modality == "audio":
            prep |= {"decode": "soundfile-mono-mean", "resampler": _media.RESAMPLER,
                     "sampling_rate": self.sampling_rate, "pad_short_to": self.min_samples,
                     "batching": "one clip per forward"}
        if self.modality == "image":  # video clips: frames decoded and sampled, outputs averaged
            from ..backbones._video import DECODER
            prep |= {"video": {"decoder": DECODER, "sampling": self.config.sampling().policy(),
                               "clip": "mean of frame outputs"}}
        return {"weights_hash": self._weights, "architecture": type(self.model).__name__,
                "columns": self.columns, "num_labels": int(self.model.config.num_labels),
                "preprocessing": prep, "origin": {"model": self.config.model}}

    def prepare(self, raw: bytes | str, modality: str) -> Any:
        self.load()
        if modality == "text":
            text = normalise_text(raw.decode("utf-8", errors="strict") if isinstance(raw, bytes) else raw)
            if not text:
                raise BadItemError("empty text")
            return text
        if isinstance(raw, str):
            raise BadItemError(f"expected {modality} bytes, got text")
        if modality == "image":
            return _media.decode_image(raw)
        if modality == "video":
            from ..backbones._video import decode_frames

            return decode_frames(raw, self.config.sampling())
        wav = _media.decode_audio(raw, self.sampling_rate)
        if self.config.max_seconds > 0:
            wav = wav[: int(round(self.config.max_seconds * self.sampling_rate))]
        if len(wav) < self.min_samples:
            wav = np.pad(wav, (0, self.min_samples - len(wav)))
        return wav

    def score(self, batch: Sequence[Any], modality: str) -> np.ndarray:
        self.load()
        if modality == "audio":
            outputs = self._audio(batch)
        elif modality == "video":
            outputs = self._video(batch)
        else:
            outputs = self._batched(batch, modality)
        lo, hi = parse_range(self.config.range, "range")
        out = np.full((len(batch), 2), np.nan)
        for j, dim in enumerate(("valence", "arousal")):
            if dim in self.columns:
                out[:, j] = to_unit_range(outputs[:, self.columns[dim]], lo, hi)
        return np.where(np.isfinite(out), np.clip(out, -1.0, 1.0), out)

    def _forward(self, inputs) -> np.ndarray:
        import torch

        with torch.inference_mode(), _hf.autocast(self.device):
            logits = self.model(**inputs.to(self.device)).logits
        return _hf.to_numpy(logits).astype(np.float64)

    def _audio(self, batch: Sequence[np.ndarray]) -> np.ndarray:
        # One clip per forward pass: padding changes the numbers of group-norm encoders.
        rows = [self._forward(self.processor(w, sampling_rate=self.sampling_rate, return_tensors="pt"))[0]
                for w in batch]
        return np.stack(rows)

    def _video(self, clips: Sequence[list]) -> np.ndarray:
        """Each clip's frames scored by the image model, averaged per clip."""
        frames = [img for clip in clips for img in clip]
        rows = np.concatenate([self._batched(frames[i:i + _FRAME_BATCH], "image")
                               for i in range(0, len(frames), _FRAME_BATCH)])
        edges = np.cumsum([0] + [len(clip) for clip in clips])
        return np.stack([rows[a:b].mean(axis=0) for a, b in zip(edges[:-1], edges[1:])])

    def _batched(self, batch: Sequence[Any], modality: str) -> np.ndarray:
        if modality == "text":
            inputs = self.processor(list(batch), padding=True, truncation=True,
                                    max_length=self.config.max_length, return_tensors="pt")
        else:
            inputs = self.processor(images=list(batch), return_tensors="pt")
        return self._forward(inputs)
