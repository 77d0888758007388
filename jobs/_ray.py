"""What the Ray engine of `fs extract` and `fs sweep` shares: the optional import, the session, errors.

Ray is an optional extra (`pip install 'featurestore[ray]'`). Nothing here imports it at module
level, so the rest of the project works without it; `--engine ray` without it fails with one line
saying what to install.

A run either joins a cluster (`--address ADDR`, or a session already started in this process) or
starts a local Ray with an explicit CPU count and no dashboard, and shuts it down afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import re
from typing import Any, Iterator

from featurestore.errors import BackboneError, ConfigError, FeatureStoreError

__all__ = ["RayOptions", "require_ray", "session", "unwrap", "ENGINES", "INSTALL_HINT"]

ENGINES = ("local", "ray")
INSTALL_HINT = "pip install 'featurestore[ray]'  (ray[data,tune]==2.60.0)"


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """Where and how wide a Ray run is."""

    address: str = ""  # a cluster to join ("auto", "ray://host:10001", "host:6379"); "" starts a local Ray
    workers: int = 0  # actors (extraction) or concurrent tasks (sweeps); 0: as many as the resources allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = -1.0  # -1: 1 where the cluster has GPUs, else 0

    def __post_init__(self):
        if self.workers < 0:
            raise ConfigError(f"--workers {self.workers} must be 0 (as many as fit) or positive")
        if not self.cpus_per_worker > 0:
            raise ConfigError(f"--cpus-per-worker {self.cpus_per_worker} must be positive")
        if self.gpus_per_worker < 0 and self.gpus_per_worker != -1:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker} must be 0 or more (or -1: automatic)")

    def gpus(self, ray) -> float:
        """GPUs per worker: as asked, else 1 where the cluster has any."""
        if self.gpus_per_worker >= 0:
            return float(self.gpus_per_worker)
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    def width(self, ray) -> int:
        """How many workers run at once: as asked, else as many as the cluster's CPUs (or GPUs) hold."""
        if self.workers:
            return self.workers
        res = ray.cluster_resources()
        gpus = self.gpus(ray)
        if gpus > 0:
            return max(1, int(res.get("GPU", 0) // gpus))
        return max(1, int(res.get("CPU", 1) // self.cpus_per_worker))

    def local_cpus(self) -> int:
        """CPUs of a local Ray: what the workers need, at least this machine's count."""
        need = int(self.workers * self.cpus_per_worker + 0.999) if self.workers else 0
        return max(need, os.cpu_count() or 1)


def require_ray():
    """`import ray`, or one line saying what to install."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _quiet(ray) -> None:
    """No Ray progress bars or INFO logs on the user's terminal (our own bar and messages only)."""
    for name in ("ray", "ray.data", "ray.tune", "ray.train"):  # a failure reaches the user as our one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.max_consecutive_actor_init_deaths = 1  # an actor that cannot start (wrong weights) stops the run
    with contextlib.suppress(AttributeError):
        ctx.enable_operator_progress_bars = False


@contextlib.contextmanager
def session(options: RayOptions) -> Iterator[Any]:
    """The `ray` module with a connected session: joined, or started locally and shut down after."""
    ray = require_ray()
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if options.address:
                ray.init(address=options.address, **kwargs)
            else:
                ray.init(num_cpus=options.local_cpus(), include_dashboard=False, **kwargs)
        except ConnectionError as exc:
            raise ConfigError(f"cannot reach the Ray cluster at --address {options.address!r} ({exc}); "
                              "start one with `ray start --head` or drop --address for a local run") from None
        started = True
    _quiet(ray)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def unwrap(exc: BaseException) -> BaseException:
    """The project error inside a Ray task failure (with its own message), else a BackboneError line."""
    seen, todo, wrapped = set(), [exc], None
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, FeatureStoreError):
            if type(e).__module__.startswith("featurestore"):
                return e
            wrapped = wrapped or e  # Ray's subclass of both the error and RayTaskError
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    text = str(wrapped or exc).strip().splitlines()
    last = text[-1] if text else type(exc).__name__
    if wrapped is not None:
        cls = next(c for c in type(wrapped).__mro__ if c.__module__.startswith("featurestore"))
        return cls(last)
    named = _named_error(str(exc))  # an actor that died in __init__ comes back as text only
    if named is not None:
        return named
    return BackboneError(f"a Ray worker failed ({last[:300]}); what it published is kept, re-run to go on")


_NAMED = re.compile(r"^(featurestore(?:\.\w+)*)\.(\w+): (.+)$", re.M)


def _named_error(text: str) -> FeatureStoreError | None:
    """The last `featurestore.<module>.<Error>: message` line of a remote traceback, as that error."""
    found = _NAMED.findall(text)
    if not found:
        return None
    module, name, message = found[-1]
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    if isinstance(cls, type) and issubclass(cls, FeatureStoreError):
        return cls(message.strip())
    return None
