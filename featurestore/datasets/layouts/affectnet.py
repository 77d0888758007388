"""AffectNet (manually annotated): `Manually_Annotated_file_lists/{training,validation}.csv` and the images."""
from __future__ import annotations

from .base import Layout

CLASSES = ["neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt",
           "none", "uncertain", "no-face"]
_FILES = {"train": ("Manually_Annotated_file_lists/training.csv", "training.csv"),
          "test": ("Manually_Annotated_file_lists/validation.csv", "validation.csv")}


class AffectNet(Layout):
    name = "affectnet"
    description = ("AffectNet: training.csv / validation.csv (subDirectory_filePath, expression 0-10, valence, "
                   "arousal) and Manually_Annotated_Images/; validation is the test split")
    modalities = ("image",)
    options = {"classes": ("8", "8 (with contempt) or 7 (contempt unlabelled); none/uncertain/no-face are never "
                                "a class (the code stays in expression_raw)"),
               "images": ("Manually_Annotated_Images", "folder under root holding subDirectory_filePath")}

    def rows(self):
        n_classes = int(self.choice("classes", ("7", "8")))
        folder = self.opt["images"].strip("/")
        for split, names in _FILES.items():
            if split == "test" and not any((self.root / n).is_file() for n in names):
                continue  # a training-only copy is still a dataset
            path = self.need(*names)
            for lineno, row in self.csv_rows(path, required=("subDirectory_filePath", "expression")):
                where = f"{path.name}:{lineno}"
                rel = row["subDirectory_filePath"]
                try:
                    code = int(float(row["expression"]))
                    if not 0 <= code < len(CLASSES):
                        raise ValueError
                except (TypeError, ValueError):
                    self.problem(where, f"expression {row.get('expression')!r} is not a code 0-10")
                    continue
                va = {}
                for dim in ("valence", "arousal"):
                    try:
                        v = float(row.get(dim, ""))
                    except (TypeError, ValueError):
                        v = None
                    va[dim] = v if v is not None and -1 <= v <= 1 else None  # -2: not annotated
                label = CLASSES[code] if code < n_classes else None
                if not rel or ".." in rel.split("/"):
                    self.problem(where, f"image path {rel!r} is empty or leaves the image folder")
                    continue
                yield {"item_id": rel, "split": split, "label": label, "expression_raw": CLASSES[code],
                       **va, "image": f"{folder}/{rel}"}
