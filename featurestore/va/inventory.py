"""What the store holds of VA: cached sources, fitted models, and the facts about one of them
(`fs va sources|models|info`, and the VA sections of `fs ls` and `fs info`)."""
from __future__ import annotations

__all__ = ["source_rows", "model_rows", "va_info", "va_facts"]


_FIX = "refit it with `fs va fit ... --replace` (`fs verify` lists every damaged file)"


def source_rows(store) -> list[dict]:
    from .cache import list_va_sets

    keep = ("source", "scorer", "modality", "rows", "valence", "arousal", "errors", "segments")
    return [{k: s[k] for k in keep} for s in (v.stats() for v in list_va_sets(store))]


def model_rows(store) -> list[dict]:
    from .._io import read_checked_json
    from .learned import CONFIG, METRICS, list_models, models_root

    rows = []
    for name in list_models(store):
        info, metrics = (read_checked_json(models_root(store) / name / f, _FIX) for f in (CONFIG, METRICS))
        test = metrics.get("test", {})
        rows.append({"model": name, "kind": info["params"]["kind"], "modality": info["modality"],
                     "fingerprint": info["fingerprint"], "dataset": info["fitted_on"]["dataset"],
                     **{f"{d}_r": (test.get(d) or {}).get("pearson") for d in ("valence", "arousal")},
                     **{f"{d}_ccc": (test.get(d) or {}).get("ccc") for d in ("valence", "arousal")}})
    return rows


def va_info(store, name: str) -> dict:
    """Facts about a VA source or a fitted VA model; {} when `name` is neither."""
    from .._io import read_checked_json
    from .cache import VASet
    from .learned import CONFIG, METRICS, list_models, models_root

    vs = VASet(store, name)
    if vs.exists():
        return {"spec": vs.spec, "stats": vs.stats(), "errors_sample": [e.__dict__ for e in vs.errors()[:20]]}
    if name in list_models(store):
        folder = models_root(store) / name
        return {"model": read_checked_json(folder / CONFIG, _FIX), "metrics": read_checked_json(folder / METRICS, _FIX)}
    return {}


def va_facts(store, name: str | None) -> dict:
    """The VA part of `fs info [NAME]`: counts for the store, coverage for a dataset, or `va_info`."""
    from ..datasets import get_dataset, list_datasets
    from .cache import list_va_sets, va_coverage
    from .learned import list_models

    if name is None:
        return {"va_sources": len(list_va_sets(store)), "va_models": len(list_models(store))}
    if name in list_datasets(store):
        return {"va": va_coverage(store, get_dataset(store, name))}
    return va_info(store, name)
