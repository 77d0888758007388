"""CMU-MOSI in the MMSA layout (see mmsa.py)."""
from __future__ import annotations

from .mmsa import _MMSA


class Mosi(_MMSA):
    name = "mosi"
    description = "CMU-MOSI (MMSA): label.csv + Raw/<video_id>/<clip_id>.mp4|.wav; sentiment, valence = score/3"
