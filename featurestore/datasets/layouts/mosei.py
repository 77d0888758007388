"""CMU-MOSEI in the MMSA layout (see mmsa.py), with the six emotions as multi-labels where given."""
from __future__ import annotations

from .mmsa import _MMSA


class Mosei(_MMSA):
    name = "mosei"
    description = ("CMU-MOSEI (MMSA): label.csv (+ happy, sad, anger, surprise, disgust, fear columns) + "
                   "Raw/<video_id>/<clip_id>.mp4|.wav; sentiment and six emotions as multi-labels")
    emotions = True
