"""The regression head of the audeering dimensional speech-emotion checkpoints.

`audeering/wav2vec2-large-robust-12-ft-emotion-msp-dim` (and checkpoints trained with the
same recipe) declare `architectures: ["Wav2Vec2ForSpeechClassification"]`, a class that is
not in transformers: a wav2vec 2.0 encoder (`wav2vec2.*`), its last hidden states averaged
over all frames, then `classifier.dense` -> tanh -> `classifier.out_proj` (dropout around
the dense layer, inactive at inference). The outputs are in `config.id2label` order
(arousal, dominance, valence for the MSP-Podcast models), roughly on 0..1.

`Wav2Vec2RegressionModel` is that architecture as a transformers `PreTrainedModel`, so the
checkpoint loads with `from_pretrained` (hub id or folder, safetensors or bin) and every
weight is checked to be present.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2Model, Wav2Vec2PreTrainedModel

__all__ = ["Wav2Vec2RegressionModel", "RegressionHead", "is_speech_regression"]

#: `architectures` names of checkpoints with this head
ARCHITECTURES = ("Wav2Vec2ForSpeechClassification",)
#: weights that identify the head in a checkpoint's state dict
HEAD_KEYS = ("classifier.dense.weight", "classifier.out_proj.weight")


def is_speech_regression(config) -> bool:
    """A wav2vec2 config that names the regression-head architecture."""
    return getattr(config, "model_type", "") == "wav2vec2" and \
        any(a in ARCHITECTURES for a in (getattr(config, "architectures", None) or ()))


class RegressionHead(nn.Module):
    """dropout -> dense -> tanh -> dropout -> out_proj, on the pooled hidden state."""

    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(getattr(config, "final_dropout", 0.0))
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.dense(self.dropout(pooled)))
        return self.out_proj(self.dropout(x))


class Wav2Vec2RegressionModel(Wav2Vec2PreTrainedModel):
    """wav2vec 2.0 -> mean over frames -> RegressionHead; `.logits` `[B, num_labels]`."""

    def __init__(self, config):
        super().__init__(config)
        self.wav2vec2 = Wav2Vec2Model(config)
        self.classifier = RegressionHead(config)
        self.post_init()

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutput:
        # As the checkpoint's own code: no attention mask, every frame averaged (one clip per
        # forward here, so nothing is padded).
        states = self.wav2vec2(input_values).last_hidden_state
        return SequenceClassifierOutput(logits=self.classifier(states.mean(dim=1)))
