"""`fs refresh RECIPE`: the periodic LoRA refresh, meant for cron (or any scheduler), every hour.

A recipe (JSON or TOML, docs/lora.md) names a backbone, LoRA settings, the dataset to fine-tune
on, the datasets to re-extract, the saved head runs to retrain, the memories to rebuild, a
trigger and a promotion rule. One refresh:

1. `trigger`  : runs only when at least `trigger.min_new_labelled` labelled items were added
                since the last refresh (or `force`); otherwise "nothing to do", no model loaded;
2. `finetune` : `fs lora train` on the fine-tune dataset (itself resumable per epoch);
3. `extract`  : re-extracts the listed datasets with the new adapter (a new fingerprint);
4. `heads`    : retrains each listed run from its saved config on the new features, one at a time;
5. `decide`   : each run before and after, on validation (decides) and test (reported only); the
                new adapter is promoted only if the validation metric improves per `promote.rule`;
6. `memories` : if promoted, rebuilds each listed memory (its scl run retrained on the new features);
                if not, the candidate runs and features are removed and the reason recorded;
7. `report`   : `report.parquet` and `report.png` under `refresh/<recipe>/<id>/`, and `state.json`.

Each finished step is recorded in `refresh/<recipe>/pending.json` (atomically) with what it
made, so a killed refresh started again resumes at the step it stopped in. An exclusive lock
(`refresh/<recipe>/.lock`, released by the kernel if the holder dies) keeps two refreshes of
one recipe from running at once. Superseded fingerprints stay until `fs gc --keep-fingerprints N`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from featurestore._io import file_lock, read_json
from featurestore.errors import ConfigError, DatasetError, NotFoundError
from featurestore.sealed import read_sealed_json, seal_rows, write_sealed_json
from featurestore.store import Store, check_name, now_iso

__all__ = ["Recipe", "load_recipe", "check_recipe", "trigger_state", "run", "status", "RefreshResult",
           "gc_fingerprints", "RULES"]

RULES = ("mean", "all", "any")
STEPS = ("finetune", "extract", "heads", "decide", "memories", "report")


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    backbone: str
    dataset: str  # fine-tune dataset
    target: str
    model: str = ""
    backbone_params: dict = dataclasses.field(default_factory=dict)
    lora: dict = dataclasses.field(default_factory=dict)  # LoraSettings as strings or values
    extract: tuple = ()
    heads: tuple = ()
    memories: tuple = ()
    min_new_labelled: int = 1
    metric: str = "primary"
    rule: str = "mean"
    min_delta: float = 0.0
    device: str = "auto"
    batch_size: int = 64  # extraction batch size
    threads: int = 0  # CPU threads of fine-tuning and extraction (0: every core)

    @property
    def params(self) -> dict:
        return {**self.backbone_params, **({"model": self.model} if self.model else {})}


def load_recipe(path: str | os.PathLike) -> Recipe:
    """A recipe from a .json or .toml file; unknown keys and missing fields are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"recipe {str(path)!r} does not exist; write one (docs/lora.md, "
                            "'`fs refresh RECIPE`: the periodic job')")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib
            doc = tomllib.loads(path.read_text())
        else:
            doc = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"recipe {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}") from None
    return _recipe_from(doc, default_name=path.stem, where=str(path))


def _recipe_from(doc: dict, *, default_name: str, where: str) -> Recipe:
    if not isinstance(doc, dict):
        raise ConfigError(f"recipe {where} holds a {type(doc).__name__}, not one table (JSON object) of settings; "
                          "see docs/lora.md for the keys a recipe has")
    known = {"name", "backbone", "model", "backbone_params", "device", "finetune", "lora", "extract", "heads",
             "memories", "trigger", "promote", "batch_size", "threads"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ConfigError(f"recipe {where}: unknown key(s) {unknown}; known: {sorted(known)}")
    ft, trig, prom = (_table(doc, t, where) for t in ("finetune", "trigger", "promote"))
    for table, keys in (("finetune", {"dataset", "target"}), ("trigger", {"min_new_labelled"}),
                        ("promote", {"metric", "rule", "min_delta"})):
        extra = sorted(set(doc.get(table) or {}) - keys)
        if extra:
            raise ConfigError(f"recipe {where}: unknown key(s) {extra} in [{table}]; known: {sorted(keys)}")
    if not doc.get("backbone") or not ft.get("dataset"):
        raise ConfigError(f"recipe {where} needs `backbone` and `finetune.dataset`")
    text = lambda key, value: _typed(value, str, key, where)  # noqa: E731
    number = lambda key, value, kind: _typed(value, kind, key, where)  # noqa: E731
    dataset = text("finetune.dataset", ft["dataset"])
    r = Recipe(name=check_name(str(doc.get("name") or default_name), "recipe"), backbone=text("backbone", doc["backbone"]),
               dataset=dataset, target=text("finetune.target", ft.get("target", "label")),
               model=text("model", doc.get("model", "")), backbone_params=_table(doc, "backbone_params", where),
               lora=_table(doc, "lora", where), extract=_names(doc, "extract", where) or (dataset,),
               heads=_names(doc, "heads", where), memories=_names(doc, "memories", where),
               min_new_labelled=number("trigger.min_new_labelled", trig.get("min_new_labelled", 1), int),
               metric=text("promote.metric", prom.get("metric", "primary")),
               rule=text("promote.rule", prom.get("rule", "mean")),
               min_delta=number("promote.min_delta", prom.get("min_delta", 0.0), float),
               device=text("device", doc.get("device", "auto")),
               batch_size=number("batch_size", doc.get("batch_size", 64), int),
               threads=number("threads", doc.get("threads", 0), int))
    if r.target not in ("label", "labels", "va"):
        raise ConfigError(f"recipe {where}: finetune.target {r.target!r} is not one of label, labels, va")
    if r.rule not in RULES:
        raise ConfigError(f"recipe {where}: promote.rule {r.rule!r} is not one of {list(RULES)}")
    if not r.heads:
        raise ConfigError(f"recipe {where} lists no heads; promotion is decided on the validation metric of "
                          "retrained heads, so list at least one saved run (fs runs)")
    if r.min_new_labelled < 0:
        raise ConfigError(f"recipe {where}: trigger.min_new_labelled must be 0 or more")
    return r


def _table(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"recipe {where}: [{key}] must be a table (JSON object) of settings, got {value!r}")
    return dict(value)


def _names(doc: dict, key: str, where: str) -> tuple[str, ...]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"recipe {where}: {key} must be a list of names, e.g. {key} = [\"a\", \"b\"], got {value!r}")
    return tuple(value)


def _typed(value, kind: type, key: str, where: str):
    """A recipe value of the type its key takes: text, a whole number or a finite number (not a bool)."""
    ok = isinstance(value, str) if kind is str else (
        isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        and math.isfinite(value))
    if not ok:
        what = {str: "text", int: "a whole number", float: "a finite number"}[kind]
        raise ConfigError(f"recipe {where}: {key} must be {what}, got {value!r}")
    return float(value) if kind is float else value


# ---- state -------------------------------------------------------------------------------
def _dir(store: Store, name: str) -> Path:
    return store.root / "refresh" / check_name(name, "recipe")


_RECORD_FIX = ("restore it from a backup (`fs verify` lists every damaged file); a refresh acts on it, so none of "
               "this recipe runs until then")


def _state(store: Store, name: str) -> dict:
    path = _dir(store, name) / "state.json"
    if path.is_file():
        return read_sealed_json(path, _RECORD_FIX)
    return {"recipe": name, "current": {"adapter": None, "fingerprint": None, "heads": {}}, "labelled_at_last": None,
            "last": None, "history": [], "retired_runs": []}


def _pending(store: Store, name: str) -> dict | None:
    path = _dir(store, name) / "pending.json"
    return read_sealed_json(path, _RECORD_FIX) if path.is_file() else None


def _save_pending(store: Store, name: str, pending: dict) -> None:
    write_sealed_json(_dir(store, name) / "pending.json", pending)


# ---- checks before any work ----------------------------------------------------------------
def check_recipe(store: Store, r: Recipe) -> None:
    """Everything a recipe names exists and fits: refused before any model is loaded."""
    from featurestore import backbones
    from featurestore.datasets import get_dataset
    from featurestore.memory import list_memories

    backbones.get(r.backbone)  # NotFoundError listing the registered ones
    from featurestore.config import from_strings

    from .lora import LoraSettings
    from_strings(LoraSettings, r.lora, what=f"recipe {r.name} [lora]")
    for ds in {r.dataset, *r.extract}:
        get_dataset(store, ds)
    _labelled(store, r)  # a fine-tune dataset without labels for the target
    runs = store.heads_dir()
    current = _state(store, r.name)["current"]["heads"]
    for slot in r.heads:
        run = current.get(slot, slot)
        if not (runs / check_name(run, "run") / "lineage.json").is_file():
            raise NotFoundError(f"recipe {r.name}: head run {run!r} is not in {runs} (fs runs)")
    have = set(list_memories(store))
    for mem in r.memories:
        if mem not in have:
            raise NotFoundError(f"recipe {r.name}: memory {mem!r} is not in the store; have: "
                                f"{', '.join(sorted(have)) or 'none'} (fs memory list)")


def _labelled(store: Store, r: Recipe) -> int:
    """Items of the fine-tune dataset with a target (any split): what the trigger counts."""
    from featurestore.datasets import get_dataset

    ds = get_dataset(store, r.dataset)
    df = ds.manifest
    if r.target == "labels":
        n = int((df["labels"].list.len().fill_null(0) > 0).sum())
    elif r.target == "label":
        n = int(df["label"].is_not_null().sum())
    else:
        n = int((df["valence"].is_not_null() | df["arousal"].is_not_null()).sum())
    if n == 0:
        raise DatasetError(f"recipe {r.name}: dataset {r.dataset!r} has no items with a {r.target!r} target; "
                           "choose another finetune.target (label, labels, va) or add labels")
    return n


def trigger_state(store: Store, r: Recipe) -> dict:
    state = _state(store, r.name)
    now = _labelled(store, r)
    last = state.get("labelled_at_last")
    added = now if last is None else now - last
    return {"labelled_now": now, "labelled_at_last_refresh": last, "added": added,
            "min_new_labelled": r.min_new_labelled, "fires": added >= r.min_new_labelled and added > 0}


# ---- the job ----------------------------------------------------------------------------------
@dataclasses.dataclass
class RefreshResult:
    recipe: str
    ran: bool
    message: str
    id: str = ""
    promoted: bool | None = None
    reason: str = ""
    adapter: str = ""
    fingerprint: str = ""
    heads: dict = dataclasses.field(default_factory=dict)
    report: str = ""
    step_seconds: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run(recipe: Recipe, store: Store, *, force: bool = False, progress: Callable[..., Any] | None = None,
        log: Callable[[str], None] = lambda s: None, stop_after: str = "") -> RefreshResult:
    """Run (or resume) one refresh of `recipe`. `stop_after` (tests, benchmarks) stops after that step."""
    t0 = time.perf_counter()
    check_recipe(store, recipe)
    folder = _dir(store, recipe.name)
    with file_lock(folder / ".lock", f"refresh {recipe.name}"):
        pending = _pending(store, recipe.name)
        state = _state(store, recipe.name)
        if pending and state.get("last") and state["last"].get("id") == pending["id"]:
            (folder / "pending.json").unlink()  # killed after state.json was written: it had finished
            pending = None
        resumed = pending is not None
        if pending is None:
            trig = trigger_state(store, recipe)
            if not (force or trig["fires"]):
                return RefreshResult(recipe.name, False, f"nothing to do: {trig['added']} labelled item(s) added since "
                                     f"the last refresh, the trigger needs {recipe.min_new_labelled}",
                                     seconds=round(time.perf_counter() - t0, 3))
            pending = {"id": time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:4],
                       "started_at": now_iso(), "labelled": trig["labelled_now"], "forced": force, "done": {},
                       "seconds": {}}
            _save_pending(store, recipe.name, pending)
        else:
            log(f"resuming refresh {pending['id']} after step {_last_done(pending) or '(none)'}")
        job = _Refresh(recipe, store, state, pending, progress, log)
        for step in STEPS:
            if step not in pending["done"]:
                t = time.perf_counter()
                pending["done"][step] = getattr(job, step)()
                pending["seconds"][step] = round(pending["seconds"].get(step, 0) + time.perf_counter() - t, 3)
                _save_pending(store, recipe.name, pending)
            if step == stop_after:
                return RefreshResult(recipe.name, True, f"stopped after step {step}", pending["id"],
                                     resumed=resumed, seconds=round(time.perf_counter() - t0, 3))
        job.finish()
    d = pending["done"]["decide"]
    return RefreshResult(recipe.name, True, "promoted" if d["promoted"] else "kept the current adapter",
                         pending["id"], d["promoted"], d["reason"], pending["done"]["finetune"]["hash"],
                         pending["done"]["extract"]["fingerprint"], pending["done"]["heads"],
                         pending["done"]["report"]["folder"], dict(pending["seconds"]),
                         round(time.perf_counter() - t0, 3), resumed)


def _last_done(pending: dict) -> str:
    return next((s for s in reversed(STEPS) if s in pending["done"]), "")


class _Refresh:
    """The steps of one refresh; each returns what it made (JSON), recorded in pending.json."""

    def __init__(self, recipe: Recipe, store: Store, state: dict, pending: dict, progress, log):
        self.r, self.store, self.state, self.pending, self.progress, self.log = recipe, store, state, pending, progress, log

    @property
    def id(self) -> str:
        return self.pending["id"]

    def current_run(self, slot: str) -> str:
        return self.state["current"]["heads"].get(slot, slot)

    # 2
    def finetune(self) -> dict:
        from .lora import LoraTrainConfig, run as train

        config = LoraTrainConfig.build(backbone=self.r.backbone, params=self.r.params, dataset=self.r.dataset,
                                       target=self.r.target, name=f"{self.r.name}-{self.id}", settings=self.r.lora,
                                       device=self.r.device, threads=self.r.threads)
        res = train(config, self.store, progress=self.progress, log=self.log)
        return {"hash": res.hash, "folder": res.folder, "metrics": {k: v for k, v in res.metrics.items()
                                                                    if k != "history"}}

    # 3
    def extract(self) -> dict:
        from .extract import ExtractConfig, run as extract
        from featurestore import backbones

        modality = backbones.get(self.r.backbone).modality
        params = {**self.r.params, "adapter": self.pending["done"]["finetune"]["folder"]}
        from featurestore.features import list_feature_sets

        before = {f.fingerprint for f in list_feature_sets(self.store)}
        fps, failed = set(), {}
        bb = backbones.create(self.r.backbone, params, device=self.r.device)
        for ds in self.r.extract:
            res = extract(ExtractConfig(dataset=ds, modality=modality, backbone=self.r.backbone, params=params,
                                        batch_size=self.r.batch_size, device=self.r.device), self.store,
                          backbone=_threaded(bb, self.r.threads), progress=self.progress, log=self.log)
            fps.add(res.fingerprint)
            failed[ds] = res.failed_total
        fp = fps.pop()
        return {"fingerprint": fp, "modality": modality, "failed": failed, "existed": fp in before}

    # 4
    def heads(self) -> dict:
        done = dict(self.pending.get("heads_partial", {}))
        for slot in self.r.heads:
            if slot in done:
                continue
            done[slot] = self._retrain(slot, self.current_run(slot))
            self.pending["heads_partial"] = done  # a kill between heads resumes at the next one
            _save_pending(self.store, self.r.name, self.pending)
        return done

    def _retrain(self, slot: str, run: str) -> str:
        from .train_head import TrainHeadConfig, run as train

        folder = self.store.heads_dir() / run
        cfg, lineage = read_json(folder / "config.json"), read_json(folder / "lineage.json")
        new_id = f"{slot[:100]}.r{self.id}"
        if (self.store.heads_dir() / new_id / "config.json").is_file():
            return new_id  # trained before a kill, not yet recorded
        features = self._swap(lineage["fingerprints"])
        params = {k: v for k, v in cfg["params"].items() if not k.startswith("_")}
        validation = lineage.get("validation") or {}
        config = TrainHeadConfig(method=cfg["head"], dataset=lineage["dataset"], features=features, params=params,
                                 target=lineage["target"], seed=lineage.get("seed", 0),
                                 val_fraction=validation.get("fraction", 0.1),
                                 eval_split=lineage.get("eval_split", "test"), run_id=new_id)
        self.log(f"retraining {run} as {new_id} on {features}")
        return train(config, self.store).run_id

    def _swap(self, fingerprints: dict) -> dict:
        """The run's fingerprints with this recipe's backbone/modality replaced by the new one."""
        from featurestore.features import FeatureSet

        new = self.pending["done"]["extract"]
        out = {}
        for mod, fp in fingerprints.items():
            fs = FeatureSet(self.store, fp)
            same = mod == new["modality"] and (not fs.exists() or fs.backbone == self.r.backbone)
            out[mod] = new["fingerprint"] if same else fp
        return out

    # 5
    def decide(self) -> dict:
        rows, deltas = [], []
        for slot, after in self.pending["done"]["heads"].items():
            before = self.current_run(slot)
            b, a = _scores(self.store, before), _scores(self.store, after)
            metric = b["primary"] if self.r.metric == "primary" else self.r.metric
            for split in ("val", "test"):
                if metric not in b[split] or metric not in a[split]:
                    raise ConfigError(f"recipe {self.r.name}: metric {metric!r} is not reported for run {before} "
                                      f"on {split}; it has {sorted(b[split])}")
            deltas.append(a["val"][metric] - b["val"][metric])
            for split in ("val", "test"):
                for name in sorted(set(b[split]) & set(a[split])):
                    rows.append({"head": slot, "run_before": before, "run_after": after, "method": b["method"],
                                 "split": split, "metric": name, "decides": split == "val" and name == metric,
                                 "before": b[split][name], "after": a[split][name],
                                 "delta": a[split][name] - b[split][name]})
        promoted, reason = _rule(self.r, deltas)
        self.log(("promoting: " if promoted else "keeping the current adapter: ") + reason)
        return {"promoted": promoted, "reason": reason, "rows": rows}

    # 6
    def memories(self) -> dict:
        d = self.pending["done"]
        if not d["decide"]["promoted"]:
            self._discard()
            return {"rebuilt": [], "discarded": list(d["heads"].values()) + [d["extract"]["fingerprint"]]}
        rebuilt = []
        for name in self.r.memories:
            rebuilt.append(self._rebuild_memory(name))
        return {"rebuilt": rebuilt, "discarded": []}

    def _discard(self) -> None:
        """A rejected candidate: its runs and feature set go (nothing else uses them); the adapter stays listed."""
        from featurestore.features import FeatureSet

        d = self.pending["done"]
        for run in d["heads"].values():
            shutil.rmtree(self.store.heads_dir() / run, ignore_errors=True)
        fp = d["extract"]["fingerprint"]
        if not d["extract"].get("existed") and fp != self.state["current"].get("fingerprint"):
            fs = FeatureSet(self.store, fp)
            if fs.folder.is_dir():
                with fs.lock():
                    _remove_folder(fs.folder)

    def _rebuild_memory(self, name: str) -> dict:
        from featurestore.memory import memory_folder

        from .build_memory import BuildMemoryConfig, run as build
        from .train_scl import TrainSCLConfig, parse_data, run as train_scl

        spec = read_json(memory_folder(self.store, name) / "spec.json")
        scl_folder = self.store.heads_dir() / spec["run"]
        old = read_json(scl_folder / "lineage.json")["config"]
        data = []
        for ds, refs in parse_data(old["data"]):
            fps = {m: self._scl_ref(ds, m, ref) for m, ref in refs.items()}
            data.append(f"{ds}:" + ",".join(f"{m}={fp}" for m, fp in fps.items()))
        run_name = f"scl-{name[:96]}.r{self.id}"
        if not (self.store.heads_dir() / run_name / "lineage.json").is_file():
            train_scl(TrainSCLConfig(data=tuple(data), run=run_name, params=old.get("params", {}),
                                     split=old.get("split", "train"), val_split=old.get("val_split", "val")),
                      self.store, log=self.log)
        build_cfg = {k: v for k, v in (spec.get("build") or {}).items() if not k.startswith("_")}
        build_cfg.update({"name": name, "run": run_name, "replace": True})
        res = build(BuildMemoryConfig(**build_cfg), self.store, log=self.log)
        return {"memory": name, "scl_run": run_name, "n": res.n}

    def _scl_ref(self, dataset: str, modality: str, ref: str) -> str:
        from featurestore.features import resolve_features

        fp = resolve_features(self.store, ref, modality=modality).fingerprint
        return self._swap({modality: fp})[modality]

    # 7
    def report(self) -> dict:
        import polars as pl

        folder = _dir(self.store, self.r.name) / self.id
        folder.mkdir(parents=True, exist_ok=True)
        d = self.pending["done"]
        rows = [{**row, "refresh": self.id, "promoted": d["decide"]["promoted"]} for row in d["decide"]["rows"]]
        df = pl.DataFrame(seal_rows(rows))
        from featurestore._io import cleaned_on_failure, publish, tmp_path, write_parquet

        tmp = tmp_path(folder / "report.parquet")
        with cleaned_on_failure(tmp, folder / "report.parquet"):
            write_parquet(df, tmp)
        publish(tmp, folder / "report.parquet")
        deciding = next((row["metric"] for row in rows if row["decides"]), None)
        _plot(df.filter(pl.col("metric") == deciding), folder,
              f"refresh {self.id}: {'promoted' if d['decide']['promoted'] else 'kept'}")
        summary = {"id": self.id, "recipe": self.r.name, "started_at": self.pending["started_at"],
                   "finished_at": now_iso(), "promoted": d["decide"]["promoted"], "reason": d["decide"]["reason"],
                   "adapter": d["finetune"]["hash"], "adapter_metrics": d["finetune"]["metrics"],
                   "fingerprint": d["extract"]["fingerprint"], "heads": d["heads"], "memories": d["memories"],
                   "forced": self.pending.get("forced", False), "seconds": self.pending["seconds"]}
        write_sealed_json(folder / "summary.json", summary)
        return {"folder": str(folder), "summary": summary}

    def finish(self) -> None:
        """state.json records the outcome (atomically), then pending.json goes."""
        d, state = self.pending["done"], self.state
        summary = d["report"]["summary"]
        if d["decide"]["promoted"]:
            state["retired_runs"] = sorted(set(state.get("retired_runs", [])) |
                                           {self.current_run(s) for s in d["heads"]})
            state["current"] = {"adapter": d["finetune"]["hash"], "fingerprint": d["extract"]["fingerprint"],
                                "heads": {**state["current"]["heads"], **d["heads"]},
                                "memories": {m["memory"]: m["scl_run"] for m in d["memories"]["rebuilt"]}}
        state["labelled_at_last"] = self.pending["labelled"]
        state["last"] = {k: summary[k] for k in ("id", "finished_at", "promoted", "reason", "adapter", "fingerprint")}
        state["history"] = (state.get("history") or []) + [state["last"]]
        folder = _dir(self.store, self.r.name)
        write_sealed_json(folder / "state.json", state)
        (folder / "pending.json").unlink(missing_ok=True)


def _threaded(bb, threads: int):
    """The backbone, loaded, with torch held to `threads` CPU threads (0: as loading set them)."""
    if threads:
        import torch

        bb.load()
        torch.set_num_threads(threads)
    return bb


def _scores(store: Store, run: str) -> dict:
    """A run's metrics on its validation split and its evaluation split, on the current manifest."""
    from .train_head import evaluate

    folder = store.heads_dir() / run
    lineage, doc = read_json(folder / "lineage.json"), read_json(folder / "metrics.json")
    validation = lineage.get("validation") or {}
    primary = doc.get("primary")
    if validation.get("carved"):  # carved from train at training time: only the recorded primary is known
        val = {primary: doc.get("val_primary")}
    else:
        val = evaluate(run, lineage["dataset"], store, split=validation.get("split", "val"))["metrics"]
    test = evaluate(run, lineage["dataset"], store, split=lineage.get("eval_split", "test"))["metrics"]
    flat = lambda m: {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and v is not None}  # noqa: E731
    return {"method": doc.get("method"), "primary": primary, "val": flat(val), "test": flat(test)}


def _rule(r: Recipe, deltas: list[float]) -> tuple[bool, str]:
    shown = ", ".join(f"{x:+.4f}" for x in deltas)
    metric = "the primary metric" if r.metric == "primary" else r.metric
    if r.rule == "mean":
        mean = sum(deltas) / len(deltas)
        ok = mean > r.min_delta
        return ok, f"mean validation change of {metric} {mean:+.4f} ({shown}) {'>' if ok else '<='} min_delta {r.min_delta}"
    if r.rule == "all":
        ok = all(x > r.min_delta for x in deltas)
        return ok, f"validation change of {metric} per head ({shown}): {'every' if ok else 'not every'} head above min_delta {r.min_delta}"
    ok = any(x > r.min_delta for x in deltas)
    return ok, f"validation change of {metric} per head ({shown}): {'some' if ok else 'no'} head above min_delta {r.min_delta}"


def _plot(df, folder: Path, title: str) -> None:
    """Before and after per head, validation and test, of the deciding metric."""
    import numpy as np
    from matplotlib.figure import Figure

    heads_ = list(dict.fromkeys(df["head"].to_list()))
    fig = Figure(figsize=(max(5, 1.8 * len(heads_) + 2), 3.8))
    ax = fig.add_subplot()
    width, x = 0.2, np.arange(len(heads_))
    for k, (split, when) in enumerate([("val", "before"), ("val", "after"), ("test", "before"), ("test", "after")]):
        vals = [df.filter((df["head"] == h) & (df["split"] == split))[when].to_list() for h in heads_]
        ax.bar(x + (k - 1.5) * width, [v[0] if v else np.nan for v in vals], width, label=f"{split} {when}")
    ax.set_xticks(x, [h[:24] for h in heads_], rotation=15, ha="right")
    ax.set_ylabel(df["metric"][0] if len(df) else "")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    from featurestore._io import publish, tmp_path

    tmp = tmp_path(folder / "report.png")
    fig.savefig(tmp, dpi=100, format="png")
    publish(tmp, folder / "report.png")


def _remove_folder(folder: Path) -> None:
    """Rename away first (atomic: readers see the folder whole or not at all), then delete."""
    gone = folder.with_name(f".{folder.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # fs gc removes a leftover
    os.replace(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


# ---- status -------------------------------------------------------------------------------------
def status(recipe: Recipe, store: Store) -> dict:
    state, pending = _state(store, recipe.name), _pending(store, recipe.name)
    from featurestore._io import try_lock

    fh = try_lock(_dir(store, recipe.name) / ".lock") if _dir(store, recipe.name).is_dir() else None
    running = _dir(store, recipe.name).is_dir() and fh is None
    if fh is not None:
        fh.close()
    return {"recipe": recipe.name, "trigger": trigger_state(store, recipe), "current": state["current"],
            "last": state.get("last"), "refreshes": len(state.get("history") or []), "running": running,
            "pending": {"id": pending["id"], "steps_done": [s for s in STEPS if s in pending["done"]]} if pending else None}


# ---- gc ---------------------------------------------------------------------------------------------
def in_use(store: Store) -> dict[str, list[str]]:
    """fingerprint -> what uses it: what `verify.fingerprint_users` finds (runs not retired by a refresh,
    memories, fitted VA models, each refresh's current fingerprint), and unfinished refreshes' new extractions."""
    from featurestore.verify import fingerprint_users

    users = fingerprint_users(store)[0]
    root = store.root / "refresh"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / "pending.json").is_file():
            fp = (_pending(store, folder.name)["done"].get("extract") or {}).get("fingerprint")
            if fp:
                users.setdefault(fp, []).append(f"refresh {folder.name} (in progress)")
    return users


def gc_fingerprints(store: Store, keep: int, *, dry_run: bool = False) -> dict:
    """Per backbone and modality, remove old feature sets, never one in use or the only copy of a dataset.

    The `keep` newest (by creation) of each backbone and modality always stay. An older one goes only
    if, for every dataset its catalogue records an extraction for, a newer extraction of the same
    backbone and modality for that dataset exists (`superseded_by`); that newer one is the newest for
    the dataset and so is kept. A feature set that is the newest for some dataset stays
    (`kept_newest`), as does one whose catalogue cannot be read (`kept_unreadable`). `by_dataset`
    lists, per dataset, what is (or with `dry_run` would be) removed and what supersedes it."""
    from featurestore.errors import LockedError
    from featurestore.features import list_feature_sets, superseded_by

    if keep < 1:
        raise ConfigError(f"--keep-fingerprints {keep} must be at least 1")
    users = in_use(store)
    groups: dict[tuple, list] = {}
    for fs in list_feature_sets(store):  # oldest first
        groups.setdefault((fs.backbone, fs.modality), []).append(fs)
    report = {"removed": [], "kept_in_use": {}, "kept_newest": {}, "kept_unreadable": [], "skipped_locked": [],
              "by_dataset": {}}
    for sets in groups.values():
        for fs in sets[:-keep]:
            if fs.fingerprint in users:
                report["kept_in_use"][fs.fingerprint] = users[fs.fingerprint]
                continue
            try:
                datasets = sorted(fs.segments.catalogue().get("datasets", {}))
            except Exception:  # a damaged catalogue: which datasets it holds is unknown, so it stays
                report["kept_unreadable"].append(fs.fingerprint)
                continue
            newer = {d: superseded_by(store, fs.fingerprint, d) for d in datasets}
            only = [d for d, fp in newer.items() if fp is None]
            if only:
                report["kept_newest"][fs.fingerprint] = only
                continue
            if not dry_run:
                try:
                    with fs.lock():
                        _remove_folder(fs.folder)
                except LockedError:
                    report["skipped_locked"].append(fs.fingerprint)
                    continue
            report["removed"].append(fs.fingerprint)
            for d, fp in newer.items():
                report["by_dataset"].setdefault(d, []).append({"fingerprint": fs.fingerprint, "superseded_by": fp})
    return report
