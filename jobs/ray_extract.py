"""`fs extract --engine ray`: the pending items of a dataset encoded by a pool of Ray actors.

The driver does what a local job does before and after the model work (jobs/extract.py: the plan,
the pending items, unreadable items recorded, the dataset recorded in the catalogue, all under the
fingerprint's shared writer lock); only the encoding moves to Ray:

- the items still to compute are cut, in manifest order, into shards of whole batches (the same
  `--batch-size` batches a one-process job forms, so rows are bit-identical on CPU, and a resumed
  run forms the same batches again);
- the shards become a Ray dataset, one row each; `map_batches` hands them to an actor pool
  (`ActorPoolStrategy`), each actor loading the model once (with `num_gpus` where the cluster has
  GPUs) and checking it gives the driver's fingerprint;
- each actor publishes its own segments straight into the shared store with the local job's
  machinery (claims, segment writer, atomic rename, catalogue): several writers into one
  fingerprint, as docs/store.md describes. Bad items are recorded by the actor that met them.

A killed driver takes its actors with it; what they published stays, and a rerun computes only the
rest. See docs/ray.md for clusters (the store must be on a filesystem every node mounts).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
import time
import warnings
from typing import Any, Callable

import numpy as np

from featurestore import backbones, spec_cache
from featurestore.backbones.base import Backbone, fingerprint_of
from featurestore.claims import Claims
from featurestore.datasets import get_dataset
from featurestore.errors import BackboneError, ConfigError
from featurestore.features import POOLED, SEQ, FeatureSet
from featurestore.store import Store, open_store
from featurestore.jobs._ray import RayOptions, session, unwrap
from featurestore.jobs.extract import (ExtractConfig, ExtractResult, _extract, _Item, _Job, _Output, plan, stop_error,
                                       transient)

__all__ = ["run", "FingerprintMismatch"]


class FingerprintMismatch(BackboneError):
    """A worker's model gives another fingerprint than the driver's spec."""


def run(config: ExtractConfig, store: Store, options: RayOptions = RayOptions(), *,
        progress: Callable[..., Any] | None = None, log: Callable[[str], None] = lambda s: None) -> ExtractResult:
    """Extract like `jobs.extract.run`, with the model work on a Ray actor pool."""
    t0 = time.perf_counter()
    # the driver's copy names the spec only
    bb = backbones.create(config.backbone, config.params, device="cpu", modality=config.modality)
    if bb.modality != config.modality:
        need = "an image" if config.modality == "video" else \
            f"{'an' if config.modality[0] in 'aeiou' else 'a'} {config.modality}"
        raise ConfigError(f"backbone {bb.name!r} encodes {bb.modality}, not {config.modality}; "
                          f"pick {need} backbone (fs backbones list)")
    job = _RayJob(config, store, bb, *plan(store, config), t0, progress, log, options=options)
    spec = spec_cache.lookup(store, bb)  # a remembered spec spares the driver a model load ...
    if spec is not None and not FeatureSet(store, fingerprint_of(bb.name, spec)).exists():
        spec = None  # ... but a new feature set is only ever named by a spec read from the weights
    for attempt in (0, 1):
        if spec is None:
            spec = bb.load().spec()
            spec_cache.remember(store, bb, spec)
        fs = FeatureSet(store, fingerprint_of(bb.name, spec))
        try:
            with fs.lock(shared=True, wait=config.wait, wait_option=True):
                result = job.extract(fs, spec)
            break
        except FingerprintMismatch:
            if attempt or bb._loaded:  # the workers' weights differ from the driver's: nothing to retry
                raise
            spec_cache.forget(store, bb)  # a stale remembered spec: compute the true one and go on
            spec = None
    if job.span:
        result.extract_seconds = job.span
    result.seconds = time.perf_counter() - t0
    result.ray = job.stats  # type: ignore[attr-defined]
    return result


def shards(todo: list, batch_size: int, segment_rows: int, workers: int) -> list[list]:
    """`todo` cut into runs of whole batches: several per worker (so the pool stays balanced to the
    end), none longer than a segment."""
    n_batches = math.ceil(len(todo) / batch_size)
    per = max(1, min(max(1, segment_rows // batch_size), math.ceil(n_batches / (4 * workers))))
    size = per * batch_size
    return [todo[i:i + size] for i in range(0, len(todo), size)]


@dataclasses.dataclass
class _RayJob(_Job):
    options: RayOptions = RayOptions()
    span: float = 0.0  # first shard started .. last shard ended (actor start-up and model loads left out)
    stats: dict = dataclasses.field(default_factory=dict)

    def compute(self, fs: FeatureSet, todo: list, writer, result: ExtractResult) -> None:
        config, opts = self.config, self.options
        with session(opts) as ray:
            gpus = opts.gpus(ray)
            parts = shards(todo, config.batch_size, config.segment_rows, opts.width(ray))
            workers = min(opts.width(ray), len(parts))
            device = "cuda" if gpus > 0 else ("cpu" if config.device == "auto" else config.device)
            self.log(f"Ray: {workers} actor(s) ({opts.cpus_per_worker:g} CPU, {gpus:g} GPU each) "
                     f"over {len(parts)} shard(s)")
            rows = [{"shard": i, "keys": [it.key for it in p], "item_ids": [it.item_id for it in p],
                     "sources": [it.source for it in p]} for i, p in enumerate(parts)]
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            with warnings.catch_warnings():
                # max_restarts goes through **ray_remote_args, which Ray 2.60 warns is deprecated (to be
                # removed in 2.64) but offers no named parameter for; the `ray` extra pins 2.60.0.
                warnings.simplefilter("ignore", DeprecationWarning)
                out = self._map(ray, ds, fs, opts, workers, gpus, device)
            bar = self.progress(total=len(todo), desc=f"extract {config.dataset}/{config.modality} (ray)",
                                unit="item") if self.progress else None
            per_worker: dict[str, dict] = {}
            start, end = math.inf, -math.inf
            try:
                for row in out.iter_rows():
                    result.computed += int(row["computed"])
                    result.failed_new += int(row["failed"])
                    result.segments += int(row["segments"])
                    result.model_seconds += float(row["model_seconds"])
                    start, end = min(start, float(row["start"])), max(end, float(row["end"]))
                    w = per_worker.setdefault(str(row["worker"]), {"items": 0, "seconds": 0.0, "shards": 0})
                    w["items"] += int(row["items"])
                    w["seconds"] += float(row["end"]) - float(row["start"])
                    w["shards"] += 1
                    if bar is not None:
                        bar.update(int(row["items"]))
                        bar.set_postfix(failed=result.failed_new, refresh=False)
            except Exception as exc:
                err = unwrap(exc)
                if isinstance(err, FingerprintMismatch):
                    writer._reset()  # the driver's records of unreadable items belong to the true fingerprint
                raise err from None
            finally:
                if bar is not None:
                    bar.close()
            self.span = max(0.0, end - start) if per_worker else 0.0
            self.stats = {"workers": workers, "shards": len(parts), "gpus_per_worker": gpus,
                          "per_worker": {k: {**v, "items_per_s": round(v["items"] / v["seconds"], 2)
                                             if v["seconds"] > 0 else 0.0} for k, v in per_worker.items()}}

    def _map(self, ray, ds, fs: FeatureSet, opts: RayOptions, workers: int, gpus: float, device: str):
        """The shards through a pool of `workers` actors, each loading the model once."""
        return ds.map_batches(
            _Encoder, batch_size=1, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            num_cpus=opts.cpus_per_worker, num_gpus=gpus or None,
            max_restarts=0,  # a dead actor stops the run, as a crash stops a local job: rerun resumes
            fn_constructor_kwargs={"root": str(self.store.root.resolve()), "fingerprint": fs.fingerprint,
                                   "config": self.config, "device": device,
                                   "threads": max(1, int(opts.cpus_per_worker)),
                                   "accounted": sorted(self.accounted)})


class _Encoder:
    """One Ray actor: loads the model once, then encodes and publishes shard after shard."""

    def __init__(self, root: str, fingerprint: str, config: ExtractConfig, device: str, threads: int,
                 accounted: list | None = None):
        self.config = config
        # the segments the driver's plan accounted for: any other one (another job's, published since)
        # is read before this actor claims its keys, and each only once over all its shards
        self.accounted, self.done = set(accounted or ()), set()
        self.bb: Backbone = backbones.create(config.backbone, config.params, device=device,
                                             modality=config.modality).load()
        if self.bb.device == "cpu":
            import torch

            torch.set_num_threads(threads)  # the actor's CPU share, not the whole node's count
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        got = fingerprint_of(self.bb.name, self.bb.spec())
        if got != fingerprint:
            raise FingerprintMismatch(
                f"the model on {self.worker} ({self.bb.model_ref}) gives fingerprint {got}, the driver expects "
                f"{fingerprint}: every node must hold the same weights and adapter at the same path")
        store = open_store(root)
        self.fs = FeatureSet(store, fingerprint)
        # the dataset root, so that a file missing because the whole root is gone stops the job (not recorded)
        self.data_root = get_dataset(store, config.dataset).info.get("root") if config.modality != "text" else None

    def __call__(self, batch: dict) -> dict:
        cols: dict[str, list] = {k: [] for k in ("shard", "items", "computed", "failed", "segments",
                                                 "model_seconds", "start", "end", "worker")}
        for shard, keys, ids, sources in zip(batch["shard"], batch["keys"], batch["item_ids"], batch["sources"]):
            items = [_Item(str(k), str(i), str(s), self.data_root) for k, i, s in zip(keys, ids, sources)]
            res = ExtractResult(self.fs.fingerprint, self.config.dataset, self.config.modality)
            start = time.time()
            self._encode(items, res)
            for k, v in (("shard", int(shard)), ("items", len(items)), ("computed", res.computed),
                         ("failed", res.failed_new), ("segments", res.segments),
                         ("model_seconds", res.model_seconds), ("start", start), ("end", time.time()),
                         ("worker", self.worker)):
                cols[k].append(v)
        return {k: np.asarray(v) for k, v in cols.items()}

    def _encode(self, items: list[_Item], res: ExtractResult) -> None:
        """What a local job does with its items (jobs.extract._extract), publishing into the shared store."""
        fs, config = self.fs, self.config
        writer = fs.segments.writer(dtypes={POOLED: fs.dtype, SEQ: fs.dtype}, shapes={POOLED: (fs.dim,)},
                                    attrs={"fingerprint": fs.fingerprint, "backbone": self.bb.name})
        try:
            with Claims(fs.folder) as claims:
                out = _Output(fs, writer, claims, res, self.accounted, self.done)
                _extract(self.bb, config, items, out, None)
                out.maybe_flush(config, force=True)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # publish what was computed before the error
                writer.flush()
            if isinstance(exc, Exception) and transient(exc):
                raise stop_error(exc, f"extracting {config.dataset}") from None
            raise
