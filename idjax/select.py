"""Turning scores into a selection (docs/method.md 7): top-k, round-robin over targets, per-task budgets.

Every function returns pool row positions in selection order (best first) and never picks a
row twice. `candidates` (a boolean mask over the pool) removes rows that must not be chosen.
Ties are broken by the lower row position, so the same scores always give the same selection.

`mesh` (a distributed.make_mesh device mesh) splits the N axis over devices: each device ranks its
own rows, the candidates are gathered and merged (distributed.top_k_rows); the selection is exactly
the one-device selection.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)


def _check_k(k: int, available: int, what: str = "the pool") -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > available:
        raise ValueError(f"k={k} is larger than {what} ({available} selectable samples)")


def _order(scores: np.ndarray) -> np.ndarray:
    """Row positions by descending score, ties by position (a stable sort of -score)."""
    return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def _sharded(mesh) -> bool:
    if mesh is None:
        return False
    from idjax import distributed

    return distributed.active(mesh)


def top_k(scores, k: int, candidates=None, *, mesh=None) -> np.ndarray:
    """The k highest-scoring rows, best first. NaN scores are an error (they would sort arbitrarily)."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"top_k expects one score per row, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} scores are NaN")
    if _sharded(mesh):
        from idjax import distributed

        _check_k(k, len(scores) if candidates is None else int(np.asarray(candidates, bool).sum()))
        return distributed.top_k(scores, k, mesh, candidates)
    order = _order(scores)
    if candidates is not None:
        order = order[np.asarray(candidates, bool)[order]]
    _check_k(k, len(order))
    return order[:k]


def top_k_lexicographic(primary, secondary, k: int, candidates=None) -> np.ndarray:
    """Top-k by `primary` (e.g. optimal weight), ties (e.g. the many zero weights) by `secondary`."""
    primary, secondary = np.asarray(primary, np.float64), np.asarray(secondary, np.float64)
    order = np.lexsort((np.arange(len(primary)), -secondary, -primary))
    if candidates is not None:
        order = order[np.asarray(candidates, bool)[order]]
    _check_k(k, len(order))
    return order[:k]


def round_robin(columns, k: int, *, seed: int = 0, candidates=None, return_owner: bool = False,
                mesh=None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Round-robin over target columns: every round visits the targets in a fresh random order and
    gives each its best not-yet-taken row, until k rows are taken.

    columns: [N, t], one score column per target sample. Only each column's top min(k, N) rows can
    ever be reached, so that is all that is sorted: O(N t) memory-light work plus O(t k log k).
    return_owner also returns, per selected row, the column that took it.
    """
    cols = np.asarray(columns)
    if cols.ndim != 2 or cols.shape[1] < 1:
        raise ValueError(f"round_robin expects scores [N, t>=1], got shape {cols.shape}")
    if np.isnan(cols).any():
        raise ValueError(f"{int(np.isnan(cols).sum())} scores are NaN")
    n, t = cols.shape
    allowed = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool).copy()
    _check_k(k, int(allowed.sum()))
    # Excluded rows score -inf, and a column loses at most k - 1 of its favourites to other columns
    # before its last turn: its top k rows are all it can ever reach.
    depth = min(n, k)
    ranked = []
    if _sharded(mesh):  # the same rankings, restricted to the allowed rows (the loop skips the others)
        from idjax import distributed

        ranked = distributed.top_k_rows(cols, depth, mesh, allowed)
    for j in range(t if not ranked else 0):
        c = np.where(allowed, cols[:, j].astype(np.float64), -np.inf)
        if depth < n:
            part = np.argpartition(-c, depth - 1)[:depth]
            ranked.append(part[np.lexsort((part, -c[part]))])
        else:
            ranked.append(_order(c))
    rng = np.random.default_rng(seed)
    cursor = np.zeros(t, np.int64)
    taken = ~allowed
    out, owner = [], []
    while len(out) < k:
        for j in rng.permutation(t):
            r = ranked[j]
            while cursor[j] < len(r) and taken[r[cursor[j]]]:
                cursor[j] += 1
            if cursor[j] == len(r):
                continue
            row = int(r[cursor[j]])
            taken[row] = True
            out.append(row)
            owner.append(int(j))
            if len(out) == k:
                break
    sel = np.asarray(out, np.int64)
    return (sel, np.asarray(owner, np.int64)) if return_owner else sel


def task_budgets(tasks: Sequence[str], k: int) -> dict[str, int]:
    """Split k over the distinct target tasks as evenly as possible (remainders to tasks in sorted order).

    An even split, not one proportional to the number of target samples, so a task with few
    query samples is not drowned by one with many.
    """
    names = sorted(set(tasks))
    if not names:
        raise ValueError("no target tasks to split the budget over")
    if k < len(names):
        raise ValueError(f"k={k} is smaller than the number of target tasks ({len(names)}: {', '.join(names)})")
    base, extra = divmod(k, len(names))
    return {name: base + (i < extra) for i, name in enumerate(names)}


def per_task(columns, tasks: Sequence[str], k: int, *, aggregate: str = "mean", seed: int = 0,
             candidates=None, mesh=None) -> tuple[np.ndarray, list[str]]:
    """Per-task budgets: each task (in sorted order) takes its share of k from the rows not yet taken,
    by the mean of its target columns or round-robin over them.

    Returns (rows in selection order, the task that took each row).
    """
    cols = np.asarray(columns)
    if cols.shape[1] != len(tasks):
        raise ValueError(f"{cols.shape[1]} score columns but {len(tasks)} target task labels")
    allowed = np.ones(len(cols), bool) if candidates is None else np.asarray(candidates, bool).copy()
    _check_k(k, int(allowed.sum()))
    tasks = np.asarray(tasks, dtype=object)
    out, owner = [], []
    for i, (name, budget) in enumerate(task_budgets(list(tasks), k).items()):
        mine = cols[:, tasks == name]
        if aggregate == "mean":
            rows = top_k(mine.mean(axis=1), budget, candidates=allowed, mesh=mesh)
        elif aggregate == "round-robin":
            rows = round_robin(mine, budget, seed=seed + i, candidates=allowed, mesh=mesh)
        else:
            raise ValueError(f"aggregate must be 'mean' or 'round-robin', got {aggregate!r}")
        allowed[rows] = False
        out.append(rows)
        owner += [name] * len(rows)
        log.info("task %s: %d samples", name, len(rows))
    return np.concatenate(out), owner
