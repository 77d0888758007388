"""CMU-MOSI and CMU-MOSEI in the layout MMSA uses: `label.csv` and `Raw/<video_id>/<clip_id>.mp4` (or .wav).

`label.csv` columns: video_id, clip_id, text, label (sentiment on [-3, 3]), label_T/A/V, annotation
(Positive / Neutral / Negative), mode (train / valid / test). MOSEI's six emotions (happy, sad,
anger, surprise, disgust, fear: intensities on [0, 3]) are read from columns of those names when
the CSV has them and become the multi-labels (intensity > 0).
"""
from __future__ import annotations

from .base import Layout

EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")
_VIDEO, _AUDIO = (".mp4", ".avi", ".mkv"), (".wav", ".flac")


class _MMSA(Layout):
    modalities = ("text", "video", "audio")
    options = {"label": ("polarity2", "polarity2 (negative < 0 <= non-negative), polarity3 (negative / neutral / "
                                      "positive by the sign), or annotation (the CSV's annotation column)"),
               "raw": ("Raw", "folder under root holding <video_id>/<clip_id>.mp4 or .wav")}
    emotions = False

    def rows(self):
        mode = self.choice("label", ("polarity2", "polarity3", "annotation"))
        path = self.need("label.csv", what="label CSV")
        raw = self.root / self.opt["raw"].strip("/")
        for lineno, row in self.csv_rows(path, required=("video_id", "clip_id", "label", "mode")):
            where = f"{path.name}:{lineno}"
            vid, clip = row["video_id"], row["clip_id"]
            try:
                score = float(row["label"])
                if not -3.0 <= score <= 3.0:
                    raise ValueError
            except (TypeError, ValueError):
                self.problem(where, f"label {row.get('label')!r} is not a sentiment score on [-3, 3]")
                continue
            if not vid or not clip:
                self.problem(where, "empty video_id or clip_id")
                continue
            split = (row.get("mode") or "").lower()
            if mode == "polarity2":
                label = "negative" if score < 0 else "non-negative"
            elif mode == "polarity3":
                label = "negative" if score < 0 else "positive" if score > 0 else "neutral"
            else:
                label = (row.get("annotation") or "").lower() or None
            item = {"item_id": f"{vid}/{clip}", "split": split, "label": label, "sentiment": score,
                    "valence": score / 3.0, "group": vid, "text": row.get("text") or None,
                    "video": None, "audio": None}
            folder = raw / vid
            video = next((folder / f"{clip}{e}" for e in _VIDEO if (folder / f"{clip}{e}").is_file()), None)
            audio = next((folder / f"{clip}{e}" for e in _AUDIO if (folder / f"{clip}{e}").is_file()), None)
            if video is None and audio is None:
                self.problem(f"{vid}/{clip}", f"no {vid}/{clip}.mp4 or .wav under {self.rel(raw)}: text only")
            item["video"] = self.rel(video) if video else None
            item["audio"] = self.rel(audio or video) if (audio or video) else None
            if self.emotions and all(e in row for e in EMOTIONS):
                try:
                    levels = {e: float(row[e]) for e in EMOTIONS}
                    item["labels"] = [e for e in EMOTIONS if levels[e] > 0]
                    item.update({f"{e}_intensity": levels[e] for e in EMOTIONS})
                except (TypeError, ValueError):
                    self.problem(where, "an emotion intensity is not a number: no multi-labels")
            yield item
