"""RAF-DB, the basic release: `EmoLabel/list_patition_label.txt` and the aligned (or original) images."""
from __future__ import annotations

from .base import Layout

CLASSES = {1: "surprise", 2: "fear", 3: "disgust", 4: "happiness", 5: "sadness", 6: "anger", 7: "neutral"}


class RafDB(Layout):
    name = "raf-db"
    description = "RAF-DB basic: list_patition_label.txt (name, class 1-7) and Image/aligned/*_aligned.jpg"
    modalities = ("image",)
    options = {"images": ("aligned", "aligned (Image/aligned/<name>_aligned.jpg) or original (Image/original/<name>)")}

    def rows(self):
        images = self.choice("images", ("aligned", "original"))
        base = "basic/" if (self.root / "basic" / "EmoLabel").is_dir() else ""  # the release folder or its basic/
        labels = self.need(f"{base}EmoLabel/list_patition_label.txt", f"{base}EmoLabel/list_partition_label.txt")
        for lineno, line in enumerate(self.read_text(labels).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            where = f"{labels.name}:{lineno}"
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) not in CLASSES:
                self.problem(where, f"expected '<image name> <class 1-7>', got {line.strip()!r}")
                continue
            name, cls = parts[0], int(parts[1])
            stem = name.rsplit(".", 1)[0]
            split = "train" if name.startswith("train") else "test" if name.startswith("test") else None
            if split is None:
                self.problem(where, f"image name {name!r} starts with neither 'train' nor 'test'")
                continue
            path = (f"{base}Image/aligned/{stem}_aligned.jpg" if images == "aligned" else f"{base}Image/original/{name}")
            yield {"item_id": stem, "split": split, "label": CLASSES[cls], "image": path}
