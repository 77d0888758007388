"""RAVDESS: labels, intensity and actor from the 7-part file names; the actor is the group.

`MM-VV-EE-II-SS-RR-AA.ext`: modality (01 full AV, 02 video only, 03 audio only), vocal channel
(01 speech, 02 song), emotion, intensity (01 normal, 02 strong), statement, repetition, actor.
The audio-only wav and the video of one recording become one item (audio from the wav, else
from the full-AV clip's track; video from the full-AV clip, else the video-only one).
"""
from __future__ import annotations

import re

from .base import Layout

EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
            "07": "disgust", "08": "surprised"}
STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
_NAME = re.compile(r"^(0[1-3])-(0[12])-(\d\d)-(0[12])-(0[12])-(0[12])-(\d\d)$")
_EXT = (".wav", ".mp4")


class Ravdess(Layout):
    name = "ravdess"
    description = "RAVDESS: Actor_XX/MM-VV-EE-II-SS-RR-AA.wav|.mp4; actor as group, intensity kept"
    modalities = ("audio", "video")
    options = {"channel": ("all", "speech, song or all")}

    def rows(self):
        channel = self.choice("channel", ("all", "speech", "song"))
        items: dict[str, dict] = {}
        files = self.index_files(_EXT)
        for stem, paths in sorted(files.items()):
            for path in paths:
                m = _NAME.match(path.stem)
                if not m:
                    self.problem(self.rel(path), "name is not the 7-part RAVDESS identifier MM-VV-EE-II-SS-RR-AA")
                    continue
                mod, vocal, emo, intensity, statement, rep, actor = m.groups()
                if emo not in EMOTIONS or not 1 <= int(actor) <= 24:
                    self.problem(self.rel(path), f"emotion code {emo} or actor {actor} is out of range")
                    continue
                if channel != "all" and (vocal == "01") != (channel == "speech"):
                    continue
                key = "-".join((vocal, emo, intensity, statement, rep, actor))
                item = items.setdefault(key, {
                    "item_id": key, "label": EMOTIONS[emo], "group": f"actor{actor}",
                    "intensity": "strong" if intensity == "02" else "normal",
                    "vocal_channel": "song" if vocal == "02" else "speech", "statement": STATEMENTS[statement],
                    "repetition": int(rep), "gender": "male" if int(actor) % 2 else "female",
                    "audio": None, "video": None})
                rel = self.rel(path)
                if mod == "03" and path.suffix.lower() == ".wav":
                    item["audio"] = rel
                elif mod == "01" and path.suffix.lower() == ".mp4":
                    item["video"] = rel
                    item["_av"] = rel
                elif mod == "02" and path.suffix.lower() == ".mp4":
                    item.setdefault("_vo", rel)
                else:
                    self.problem(rel, f"modality code {mod} does not match the extension {path.suffix}")
        for item in items.values():
            av, vo = item.pop("_av", None), item.pop("_vo", None)
            item["video"] = av or vo
            item["audio"] = item["audio"] or av  # the full-AV clip's audio track
            yield item
