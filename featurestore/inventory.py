"""What the store holds, as rows: feature coverage of a dataset, memories (`fs info`, `fs memory list`)."""
from __future__ import annotations

from .features import list_feature_sets

__all__ = ["coverage", "memory_rows"]


def coverage(store, dataset) -> list[dict]:
    """For each feature set of a dataset's modality: how many of its items have a row."""
    rows = []
    for fs in list_feature_sets(store):
        col = f"{fs.modality}_key"
        keys = dataset.manifest[col].drop_nulls().unique()
        if not len(keys):
            continue
        have = int(fs.has(keys.to_numpy().astype("S32")).sum())
        failed = len({e.item_id for e in fs.standing_errors(dataset)})
        if have or failed:
            rows.append({"fingerprint": fs.fingerprint, "modality": fs.modality, "inputs": len(keys),
                         "cached": have, "failed": failed})
    return rows


def memory_rows(store) -> list[dict]:
    """One row per replay memory: name, scl run, size, index kind, modalities, creation time."""
    from ._io import read_checked_json
    from .memory import list_memories, memory_path

    rows = []
    for name in list_memories(store):
        spec = read_checked_json(memory_path(store, name) / "spec.json",
                                 "rebuild the memory with `fs memory build ... --replace`")
        rows.append({"name": name, "run": spec.get("run"), "n": spec["index"]["n"], "kind": spec["index"]["kind"],
                     "modalities": sorted(spec.get("fingerprints", {})), "created_at": spec.get("created_at")})
    return rows
