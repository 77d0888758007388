"""Shared by the five-fold video layouts (DFEW, MAFW): folds from per-fold train/test label files."""
from __future__ import annotations

from .base import Layout


def assign_folds(layout: Layout, tests: dict[int, list[tuple[str, str, str]]], trains: dict[int, set[str]],
                 split_fold: int) -> dict[str, tuple[str, int]]:
    """clip -> (label, fold it is tested in), from each fold's test list [(clip, label, where)];
    checks that the folds partition the clips and that each fold's train list is the rest."""
    out: dict[str, tuple[str, int]] = {}
    for fold in sorted(tests):
        for clip, label, where in tests[fold]:
            if clip in out:
                layout.problem(where, f"clip {clip} is in the test lists of folds {out[clip][1]} and {fold}: "
                                      "kept in the first")
                continue
            out[clip] = (label, fold)
    for fold, train in sorted(trains.items()):
        wrong = sorted(c for c in train if c in out and out[c][1] == fold)
        if wrong:
            layout.problem(f"fold {fold}", f"{len(wrong)} clips are in both the train and test list of the "
                                           f"fold, e.g. {wrong[:3]}")
        extra = sorted(c for c in train if c not in out)
        if extra:
            layout.problem(f"fold {fold}", f"{len(extra)} training clips are in no fold's test list, e.g. "
                                           f"{extra[:3]}: left out")
    if split_fold not in tests:
        layout.problem(f"fold {split_fold}", f"no test list for the fold of the split (option split_fold); "
                                             f"folds found: {sorted(tests)}")
    return out


def read_fold_lists(layout: Layout, path_of, parse) -> tuple[dict, dict]:
    """The official five folds' lists: `path_of(kind, fold)` -> the file of the `test` or `train` list
    of fold 1-5, `parse(path)` -> its rows [(clip, label, where)]. Returns (tests: fold -> rows,
    trains: fold -> clips) for `assign_folds`; a missing test list is a recorded problem."""
    tests, trains = {}, {}
    for fold in range(1, 6):
        for kind in ("test", "train"):
            path = path_of(kind, fold)
            if not path.is_file():
                if kind == "test":
                    layout.problem(layout.rel(path), "fold's test list missing")
                continue
            rows = parse(path)
            if kind == "test":
                tests[fold] = rows
            else:
                trains[fold] = {c for c, _, _ in rows}
    return tests, trains

