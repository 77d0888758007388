"""CREMA-D: `AudioWAV/AAAA_SSS_EEE_LL.wav` (and `VideoFlash/*.flv` or mp4): actor, sentence, emotion, level."""
from __future__ import annotations

import re

from .base import Layout

EMOTIONS = {"ANG": "anger", "DIS": "disgust", "FEA": "fear", "HAP": "happy", "NEU": "neutral", "SAD": "sad"}
LEVELS = {"LO": "low", "MD": "medium", "HI": "high", "XX": "unspecified"}
SENTENCES = {
    "IEO": "It's eleven o'clock", "TIE": "That is exactly what happened", "IOM": "I'm on my way to the meeting",
    "IWW": "I wonder what this is about", "TAI": "The airplane is almost full",
    "MTI": "Maybe tomorrow it will be cold", "IWL": "I would like a new alarm clock",
    "ITH": "I think I have a doctor's appointment", "DFA": "Don't forget a jacket",
    "ITS": "I think I've seen this before", "TSI": "The surface is slick",
    "WSI": "We'll stop in a couple of minutes",
}
_NAME = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_([A-Z]{2})$")
_AUDIO, _VIDEO = (".wav", ".mp3"), (".flv", ".mp4")


class CremaD(Layout):
    name = "crema-d"
    description = "CREMA-D: AudioWAV/1001_DFA_ANG_XX.wav (+ VideoFlash/*.flv|mp4); actor as group, level kept"
    modalities = ("audio", "video")
    options = {}

    def rows(self):
        items: dict[str, dict] = {}
        for stem, paths in sorted(self.index_files(_AUDIO + _VIDEO).items()):
            for path in paths:
                m = _NAME.match(path.stem)
                if not m:
                    self.problem(self.rel(path), "name is not ACTOR_SENTENCE_EMOTION_LEVEL (e.g. 1001_DFA_ANG_XX)")
                    continue
                actor, sentence, emo, level = m.groups()
                if emo not in EMOTIONS or level not in LEVELS or sentence not in SENTENCES:
                    self.problem(self.rel(path), f"unknown emotion {emo}, level {level} or sentence {sentence}")
                    continue
                item = items.setdefault(path.stem, {
                    "item_id": path.stem, "label": EMOTIONS[emo], "group": f"actor{actor}",
                    "intensity": LEVELS[level], "sentence": sentence, "transcript": SENTENCES[sentence],
                    "audio": None, "video": None})
                ext = path.suffix.lower()
                if ext in _AUDIO and (item["audio"] is None or ext == ".wav"):
                    item["audio"] = self.rel(path)
                elif ext in _VIDEO and (item["video"] is None or ext == ".mp4"):
                    item["video"] = self.rel(path)
        yield from items.values()
