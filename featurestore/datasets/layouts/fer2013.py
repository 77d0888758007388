"""FER2013: one CSV of 48x48 grey pixel strings, materialised as PNGs into the store's dataset folder.

Each image is written once under `<store>/datasets/<name>/images/<sha256 of its pixels>.png`
(temporary file, atomic rename), so a reader never sees half a PNG and a killed run leaves only
`.tmp` files that `fs gc` removes. Durability comes from one `sync` after the last image, before
the manifest that names them is published, rather than an fsync per file (8 ms each on a busy
disk: 35,887 of them would take minutes). A re-run re-encodes each image and rewrites only files
whose bytes differ, so a PNG cut short by a power loss before that sync is repaired. The PNGs are
content-keyed at registration like any image.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from ..._io import TMP_SUFFIX, cleaned_on_failure, raise_if_disk_full, tmp_path
from ...errors import ConfigError
from .base import Layout

CLASSES = ["anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral"]
USAGE = {"training": "train", "publictest": "val", "privatetest": "test"}
SIDE = 48


class Fer2013(Layout):
    name = "fer2013"
    description = "FER2013: fer2013.csv (emotion 0-6, 48x48 pixel string, Usage) -> PNGs in the store"
    modalities = ("image",)
    options = {"csv": ("fer2013.csv", "the CSV under root (fer2013/fer2013.csv is also looked for)")}

    def paths_root(self) -> Path:
        if self.workdir is None:
            raise ConfigError("layout fer2013 materialises images and needs the store's dataset folder (workdir)")
        return self.workdir / "images"

    def rows(self):
        name = self.opt["csv"]
        path = self.need(name, f"fer2013/{name}", what="pixel CSV")
        out = self.paths_root()
        out.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        written = 0
        for lineno, row in self.progress(self.csv_rows(path, required=("emotion", "pixels")),
                                         desc="fer2013 images", unit="img"):
            where = f"{path.name}:{lineno}"
            try:
                code = int(row["emotion"])
                if not 0 <= code < len(CLASSES):
                    raise ValueError
                label = CLASSES[code]
            except (TypeError, ValueError):
                self.problem(where, f"emotion {row.get('emotion')!r} is not a code 0-6")
                continue
            try:
                pixels = np.array((row["pixels"] or "").split(), dtype=np.int64)
            except ValueError:
                self.problem(where, "pixels hold a value that is not an integer")
                continue
            if pixels.size != SIDE * SIDE or pixels.min() < 0 or pixels.max() > 255:
                self.problem(where, f"pixels: {pixels.size} values, expected {SIDE * SIDE} integers in 0-255")
                continue
            raw = pixels.astype(np.uint8)
            digest = hashlib.sha256(raw.tobytes()).hexdigest()[:32]
            target = out / f"{digest}.png"
            buf = io.BytesIO()
            Image.fromarray(raw.reshape(SIDE, SIDE), mode="L").save(buf, format="PNG")
            if not _same(target, buf.getvalue()):
                _write(target, buf.getvalue())
                written += 1
            usage = (row.get("Usage") or "").strip().lower()
            split = USAGE.get(usage)
            if split is None:
                self.problem(where, f"Usage {row.get('Usage')!r} is not Training, PublicTest or PrivateTest; "
                                    "put in train")
                split = "train"
            yield {"item_id": f"fer{lineno - 2:05d}", "split": split, "label": label, "image": target.name}
        if written:
            os.sync()  # every image on disk before the manifest naming them is published
            _fsync_dir(out)


def _same(target: Path, data: bytes) -> bool:
    try:
        return target.stat().st_size == len(data) and target.read_bytes() == data
    except OSError:
        return False


def _write(target: Path, data: bytes) -> None:
    """Temporary file, atomic rename (made durable by one sync at the end)."""
    tmp = tmp_path(target)
    assert tmp.name.endswith(TMP_SUFFIX)
    with cleaned_on_failure(tmp, target):
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as exc:
        raise_if_disk_full(exc, folder)
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
