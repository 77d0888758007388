"""Progress of training, for the jobs: a bar per training that the heads' loops feed through
`featurestore.heads._engine.on_epoch` (heads never print), and a bar over sweep configurations.

`progress` is the CLI's factory (a tqdm that shows only on a terminal) or None: no bar at all, as
under `--json` or in tests.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from featurestore.heads._engine import EpochEnd, on_epoch

__all__ = ["epoch_progress", "Counter"]

Progress = Callable[..., Any]


@contextlib.contextmanager
def epoch_progress(progress: Progress | None, desc: str, *, position: int = 0) -> Iterator[None]:
    """Within the block, each epoch of any training loop moves a bar: epoch i/N, configurations still
    training, training loss, best validation score. Nothing happens when `progress` is None."""
    if progress is None:
        yield
        return
    state: dict[str, Any] = {"bar": None, "key": None, "t0": time.time()}

    def listener(e: EpochEnd) -> None:
        key = (e.stage, e.epochs)
        if state["bar"] is None or state["key"] != key:  # a new training (a new stack, or a head's next stage)
            if state["bar"] is not None:
                state["bar"].close()
            label = f"{desc} {e.stage}".strip()
            state["bar"] = progress(total=e.epochs, desc=label, unit="epoch", leave=False, position=position)
            if hasattr(state["bar"], "start_t"):  # made at the first epoch's end: its clock starts with the epoch
                state["bar"].start_t = state["t0"]
            state["key"] = key
        state["t0"] = time.time()  # where the next training's first epoch begins, if one follows
        bar = state["bar"]
        bar.n = e.epoch
        post = {"loss": f"{e.loss:.4f}"}
        if e.configs > 1:
            post = {"configs": e.configs, **post}
        if e.val is not None:
            post["val"] = f"{e.val:.4f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()

    try:
        with on_epoch(listener):
            yield
    finally:
        if state["bar"] is not None:
            state["bar"].close()


class Counter:
    """A bar over configurations (done / total, best validation score so far); a no-op without `progress`."""

    def __init__(self, progress: Progress | None, total: int, desc: str, metric: str, lower_is_better: bool):
        self.bar = progress(total=total, desc=desc, unit="config") if progress is not None and total else None
        self.metric, self.lower, self.best = metric, lower_is_better, None

    def done(self, n: int, val: float | None) -> None:
        if self.bar is None:
            return
        if val is not None and val == val and (self.best is None or (val < self.best if self.lower
                                                                       else val > self.best)):
            self.best = val
        if self.best is not None:
            self.bar.set_postfix({f"best val {self.metric}": f"{self.best:.4f}"}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
