"""`fs sweep`: many configurations of one head trained from the cache, features loaded once.

```
sweeps/<id>/sweep.json              the definition (method, dataset, fingerprints, space, fixed params, seed)
sweeps/<id>/parts/part-<cfg>.parquet one row per finished configuration, published by atomic rename
sweeps/<id>/results.parquet         all parts in one table (rewritten at the end of each invocation)
sweeps/<id>/metric_vs_<param>.png   the ranking metric against each swept hyperparameter
sweeps/<id>/optuna.journal          the Optuna study (--optuna, default file storage)
```
The id is a hash of the definition, so rerunning the same command continues the same sweep; a
configuration whose part exists is never trained again. `mlp` and `linear` configurations train
together as stacks (`heads._stacked`), `univa` and `concept` as vectorised stacks (`heads._vmapped`,
through the head's `fit_stack`), every other head one configuration after another.
"""
from __future__ import annotations

from .plots import plot_sweep
from .results import (LOWER_IS_BETTER, best_test, config_id, export_best, leaderboard, list_sweeps, read_results,
                      show, sweep_folder)
from .run import CHUNK, OPTUNA_BATCH, SweepConfig, SweepResult, run
from .space import check_space, expand_grid, load_space, parse_grid, sample_random

_check_space = check_space  # the name tests and older callers use

__all__ = ["SweepConfig", "SweepResult", "parse_grid", "load_space", "expand_grid", "sample_random", "run",
           "read_results", "list_sweeps", "show", "export_best", "best_test", "sweep_folder", "LOWER_IS_BETTER",
           "leaderboard", "plot_sweep", "config_id", "check_space", "CHUNK", "OPTUNA_BATCH"]
