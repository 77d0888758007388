"""MELD (MELD.Raw): the split CSVs with utterances and speakers, and the `dia{D}_utt{U}.mp4` clips.

`train_sent_emo.csv`, `dev_sent_emo.csv`, `test_sent_emo.csv` (columns Utterance, Speaker,
Emotion, Sentiment, Dialogue_ID, Utterance_ID, ...), clips in `train_splits/`,
`dev_splits_complete/` and `output_repeated_splits_test/` (the folders of the release's
tarballs). Each item has text (the utterance), video (the clip) and audio (the clip's track).
"""
from __future__ import annotations

from .base import Layout

SPLITS = {"train": ("train_sent_emo.csv", ("train_splits", "train")),
          "val": ("dev_sent_emo.csv", ("dev_splits_complete", "dev_splits", "dev")),
          "test": ("test_sent_emo.csv", ("output_repeated_splits_test", "test_splits", "test"))}
EMOTIONS = {"neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust"}
SENTIMENTS = {"neutral", "positive", "negative"}


class Meld(Layout):
    name = "meld"
    description = "MELD: {train,dev,test}_sent_emo.csv + dia{D}_utt{U}.mp4 clips; text, video and audio"
    modalities = ("text", "video", "audio")
    options = {"label": ("emotion", "emotion (7 classes) or sentiment (3); the other is kept as a column")}

    def rows(self):
        target = self.choice("label", ("emotion", "sentiment"))
        self.need(SPLITS["train"][0], what="label CSV")
        for split, (csv_name, folders) in SPLITS.items():
            path = self.root / csv_name
            if not path.is_file():
                self.problem(csv_name, f"label CSV missing: split {split} left out")
                continue
            clips = next((self.root / f for f in folders if (self.root / f).is_dir()), self.root / folders[0])
            for lineno, row in self.csv_rows(path, required=("Utterance", "Speaker", "Emotion", "Dialogue_ID",
                                                            "Utterance_ID")):
                where = f"{csv_name}:{lineno}"
                try:
                    dia, utt = int(row["Dialogue_ID"]), int(row["Utterance_ID"])
                except (TypeError, ValueError):
                    self.problem(where, f"Dialogue_ID {row.get('Dialogue_ID')!r} / Utterance_ID "
                                        f"{row.get('Utterance_ID')!r} are not integers")
                    continue
                emotion = (row.get("Emotion") or "").lower()
                sentiment = (row.get("Sentiment") or "").lower()
                if emotion not in EMOTIONS:
                    self.problem(where, f"emotion {row.get('Emotion')!r} is not one of {sorted(EMOTIONS)}")
                    continue
                clip = self.rel(clips / f"dia{dia}_utt{utt}.mp4")
                yield {"item_id": f"{split}/dia{dia}_utt{utt}", "split": split,
                       "label": emotion if target == "emotion" else (sentiment if sentiment in SENTIMENTS else None),
                       "emotion_raw": emotion, "sentiment": sentiment or None, "group": row["Speaker"] or None,
                       "dialogue": f"{split}/dia{dia}", "text": row["Utterance"] or None,
                       "video": clip, "audio": clip}
