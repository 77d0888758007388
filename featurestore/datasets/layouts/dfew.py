"""DFEW: the clips and `EmoLabel_DataSplit/{train,test}(single-labeled)/set_{1..5}.csv` (the official folds).

Each fold's test list is one fifth of the single-labelled clips: an item's `fold` is the fold it is
tested in, so `--cv fold` is the five-fold protocol, and `split` is test for the fold chosen by
option split_fold (1), train otherwise. Clips are video files named by their number
(`Clip/original/00001.mp4`, any folder under root; `1.mp4` and `00001.mp4` both match).
"""
from __future__ import annotations

from ...errors import DatasetError
from ..adapters import VIDEO_EXT
from ._folds import assign_folds, read_fold_lists
from .base import Layout

CLASSES = {1: "happy", 2: "sad", 3: "neutral", 4: "angry", 5: "surprise", 6: "disgust", 7: "fear"}
_SPLITS = "EmoLabel_DataSplit"


class Dfew(Layout):
    name = "dfew"
    description = ("DFEW: EmoLabel_DataSplit/{train,test}(single-labeled)/set_N.csv (video_name, label 1-7) + "
                   "clips named by number; official folds in `fold`")
    modalities = ("video", "audio")
    options = {"split_fold": ("1", "fold whose test list is the test split (the rest is train)")}

    def rows(self):
        split_fold = int(self.choice("split_fold", ("1", "2", "3", "4", "5")))
        base = self.need(_SPLITS, what="label folder")
        tests, trains = read_fold_lists(self, lambda kind, fold: base / f"{kind}(single-labeled)" / f"set_{fold}.csv",
                                        self._parse)
        if not tests:
            raise DatasetError(f"layout dfew: no test(single-labeled)/set_N.csv under {base}; see docs/datasets.md "
                               "(dfew) for the layout it expects")
        clips = {}
        for stem, paths in self.index_files(VIDEO_EXT).items():
            if stem.isdigit():
                clips.setdefault(f"{int(stem):05d}", paths[0])
        for clip, (label, fold) in sorted(assign_folds(self, tests, trains, split_fold).items()):
            path = clips.get(clip)
            rel = self.rel(path) if path else f"Clip/original/{clip}.mp4"
            yield {"item_id": clip, "split": "test" if fold == split_fold else "train", "fold": str(fold),
                   "label": label, "video": rel, "audio": rel}

    def _parse(self, path) -> list[tuple[str, str, str]]:
        rows = []
        for lineno, row in self.csv_rows(path, required=("video_name", "label")):
            where = f"{self.rel(path)}:{lineno}"
            try:
                clip, code = int(row["video_name"]), int(float(row["label"]))
                rows.append((f"{clip:05d}", CLASSES[code], where))
            except (TypeError, ValueError, KeyError):
                self.problem(where, f"expected video_name (a number) and label 1-7, got "
                                    f"{row.get('video_name')!r}, {row.get('label')!r}")
        return rows

