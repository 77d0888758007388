"""MAFW: `data/clips/*.mp4` and `Train & Test Set/single/no_caption/set_{1..5}/{train,test}.txt` (official folds).

A split line is `<clip file> <emotion>` (e.g. `00019.mp4 anger`). As for DFEW, an item's `fold` is
the fold it is tested in and `split` is test for option split_fold. Option `set=compound` reads
`Train & Test Set/compound/set_N/...` instead: the label is the compound class and the
multi-labels its parts (split on `_`).
"""
from __future__ import annotations

from ...errors import DatasetError
from ..adapters import VIDEO_EXT
from ._folds import assign_folds, read_fold_lists
from .base import Layout

CLASSES = ("anger", "disgust", "fear", "happiness", "neutral", "sadness", "surprise", "contempt", "anxiety",
           "helplessness", "disappointment")
_SETS = {"single": ("Train & Test Set/single/no_caption", "Train_Test_Set/single/no_caption"),
         "compound": ("Train & Test Set/compound", "Train_Test_Set/compound")}


class Mafw(Layout):
    name = "mafw"
    description = ("MAFW: Train & Test Set/single/no_caption/set_N/{train,test}.txt ('<clip> <emotion>') + "
                   "data/clips/*.mp4; official folds in `fold`")
    modalities = ("video", "audio")
    options = {"split_fold": ("1", "fold whose test list is the test split (the rest is train)"),
               "set": ("single", "single (11 emotions) or compound (multi-labels from the compound classes)")}

    def rows(self):
        split_fold = int(self.choice("split_fold", ("1", "2", "3", "4", "5")))
        which = self.choice("set", ("single", "compound"))
        base = self.need(*_SETS[which], what="split folder")
        tests, trains = read_fold_lists(self, lambda kind, fold: base / f"set_{fold}" / f"{kind}.txt",
                                        lambda path: self._parse(path, which))
        if not tests:
            raise DatasetError(f"layout mafw: no set_N/test.txt under {base}; see docs/datasets.md (mafw) for the "
                               "layout it expects")
        clips = {stem: paths[0] for stem, paths in self.index_files(VIDEO_EXT).items()}
        for clip, (label, fold) in sorted(assign_folds(self, tests, trains, split_fold).items()):
            path = clips.get(clip.lower())
            rel = self.rel(path) if path else f"data/clips/{clip}.mp4"
            row = {"item_id": clip, "split": "test" if fold == split_fold else "train", "fold": str(fold),
                   "label": label, "video": rel, "audio": rel}
            if which == "compound":
                row["labels"] = sorted(label.split("_"))
            yield row

    def _parse(self, path, which: str) -> list[tuple[str, str, str]]:
        rows = []
        for lineno, line in enumerate(self.read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{self.rel(path)}:{lineno}"
            parts = line.split()
            if len(parts) != 2:
                self.problem(where, f"expected '<clip> <emotion>', got {line.strip()!r}")
                continue
            clip, label = parts[0].rsplit(".", 1)[0], parts[1].lower()
            parts_ok = all(p in CLASSES for p in label.split("_"))
            if (which == "single" and label not in CLASSES) or not parts_ok:
                self.problem(where, f"emotion {parts[1]!r} is not one of {list(CLASSES)}"
                                    + (" (or their '_' compounds)" if which == "compound" else ""))
                continue
            rows.append((clip, label, where))
        return rows

