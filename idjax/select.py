"""Turning scores into a selection (docs/method.md 7): top-k, round-robin over targets, per-task budgets.

Every rule returns pool row positions in selection order (best first) and never picks a row twice.
`candidates` (a boolean mask over the pool) removes rows that must not be chosen. Ties are broken
by the lower row position (and 0.0 ties with -0.0), so the same scores give the same selection.

Two layers with the same results:
- the jittable core, `top_k_indices`, `round_robin_indices`, `round_robin_order`,
  `per_task_indices`: arrays in, arrays out, k and budgets static, randomness from a PRNG key, usable
  inside a caller's jit / vmap. They cannot raise on values: NaN scores, or fewer candidates than k,
  give an unspecified (but deterministic) order.
- the host functions, `top_k`, `top_k_lexicographic`, `round_robin`, `per_task`: value checks and
  errors, an int seed (the key jax.random.key(seed)), float64 comparisons, and `mesh` (a
  sharding.make_mesh device mesh), which splits the N axis over devices: each device ranks its own
  rows, the candidates are gathered and merged (sharding.top_k_rows), exactly the one-device result.

Round-robin randomness: round r visits the t targets in the order
jax.random.permutation(jax.random.fold_in(key, r), t); task i of `per_task` uses fold_in(key, i).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the jittable core


def _descending(x: jax.Array) -> jax.Array:
    """-x as a sort key, with -0.0 made 0.0 first (a total-order sort would split them)."""
    x = jnp.asarray(x)
    return -jnp.where(x == 0, jnp.zeros_like(x), x)


def _static_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= N = {n}, got {k!r}")
    return int(k)


def top_k_indices(scores: jax.Array, k: int, *, secondary: jax.Array | None = None,
                  candidates: jax.Array | None = None) -> jax.Array:
    """The k best rows (int32, best first): candidates before other rows, then scores descending,
    then `secondary` descending (e.g. scores breaking the ties of many zero weights), then the lower
    row. One stable multi-key sort, O(N log N). k static."""
    n = jnp.shape(scores)[0]
    k = _static_k(k, n)
    keys = [] if candidates is None else [jnp.logical_not(candidates).astype(jnp.int32)]
    keys.append(_descending(scores))
    if secondary is not None:
        keys.append(_descending(secondary))
    keys.append(lax.iota(jnp.int32, n))
    return lax.sort(tuple(keys), num_keys=len(keys))[-1][:k]


def round_robin_order(key: jax.Array, *, k: int, num_targets: int) -> jax.Array:
    """The target column that takes each of the k turns of round-robin (int32 [k]).

    Round r visits the targets in the order jax.random.permutation(fold_in(key, r), num_targets).
    """
    rounds = -(-int(k) // int(num_targets))
    perms = jax.vmap(lambda r: jax.random.permutation(jax.random.fold_in(key, r), num_targets))(
        jnp.arange(rounds, dtype=jnp.uint32))
    return perms.reshape(-1)[: int(k)].astype(jnp.int32)


def round_robin_indices(columns: jax.Array, k: int, *, key: jax.Array,
                        candidates: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Round-robin over target columns [N, t]: every round visits the targets in a fresh random
    order (`round_robin_order`) and gives each its best row not yet taken, until k rows are taken.

    Returns (rows [k], the column that took each row [k]), int32. A column loses at most k - 1 of
    its favourites to other columns, so only its top min(N, k) rows are ranked: O(t N log N) to
    rank, O(k + t k) for the turns. k static.
    """
    n, t = jnp.shape(columns)
    k = _static_k(k, n)
    depth = min(n, k)
    ranked = jax.vmap(lambda c: top_k_indices(c, depth, candidates=candidates), in_axes=1)(columns)
    turns = round_robin_order(key, k=k, num_targets=t)
    taken = jnp.zeros(n, bool) if candidates is None else jnp.logical_not(candidates)

    def turn(s, carry):
        cursor, taken, rows = carry
        j = turns[s]

        def busy(c):
            return (c < depth - 1) & taken[ranked[j, c]]

        c = lax.while_loop(busy, lambda c: c + 1, cursor[j])
        row = ranked[j, c]
        return cursor.at[j].set(c), taken.at[row].set(True), rows.at[s].set(row)

    init = (jnp.zeros(t, jnp.int32), taken, jnp.zeros(k, jnp.int32))
    _, _, rows = lax.fori_loop(0, k, turn, init)
    return rows, turns


def per_task_indices(columns: jax.Array, *, groups: Sequence[Sequence[int]], budgets: Sequence[int],
                     aggregate: str = "mean", key: jax.Array | None = None,
                     candidates: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-task budgets: task i (columns `groups[i]`) takes `budgets[i]` rows from those not yet
    taken, by the mean of its columns (`top_k_indices`) or round-robin over them with the key
    fold_in(key, i). Returns (rows [sum budgets], the task index of each row). groups, budgets static.
    """
    if aggregate not in ("mean", "round-robin"):
        raise ValueError(f"aggregate must be 'mean' or 'round-robin', got {aggregate!r}")
    if aggregate == "round-robin" and key is None:
        raise ValueError("round-robin needs a PRNG key")
    allowed = jnp.ones(jnp.shape(columns)[0], bool) if candidates is None else jnp.asarray(candidates, bool)
    out, owner = [], []
    for i, (group, budget) in enumerate(zip(groups, budgets)):
        mine = jnp.asarray(columns)[:, np.asarray(group, np.int32)]
        if aggregate == "mean":
            rows = top_k_indices(jnp.mean(mine, axis=1), budget, candidates=allowed)
        else:
            rows, _ = round_robin_indices(mine, budget, key=jax.random.fold_in(key, i), candidates=allowed)
        allowed = allowed.at[rows].set(False)
        out.append(rows)
        owner.append(jnp.full(len(rows), i, jnp.int32))
    return jnp.concatenate(out), jnp.concatenate(owner)


# ----------------------------------------------------------------------------- host functions


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
    from idjax import sharding

    return sharding.active(mesh)


def _seed_key(seed: int) -> jax.Array:
    return jax.random.key(int(seed), impl="threefry2x32")


_turns = jax.jit(round_robin_order, static_argnames=("k", "num_targets"))


def top_k(scores, k: int, candidates=None, *, mesh=None) -> np.ndarray:
    """The k highest-scoring rows, best first. NaN scores are an error (they would sort arbitrarily)."""
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"top_k expects one score per row, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"{int(np.isnan(scores).sum())} scores are NaN")
    if _sharded(mesh):
        from idjax import sharding

        _check_k(k, len(scores) if candidates is None else int(np.asarray(candidates, bool).sum()))
        return sharding.top_k(scores, k, mesh, candidates)
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


def token_budget_cap(tokens, budget: int) -> int:
    """The most rows any selection can hold within `budget` response tokens (the shortest rows first): a
    ranking of this many rows already holds every row that a longer ranking's budget prefix would."""
    t = np.sort(np.asarray(tokens, np.int64))
    cap = int(np.searchsorted(np.cumsum(t), budget, side="right"))
    if cap == 0:
        raise ValueError(f"budget_tokens={budget} is smaller than the shortest sample ({t[0]} response tokens)"
                         if t.size else "no samples to select from")
    return cap


def within_token_budget(rows, tokens, budget: int) -> np.ndarray:
    """The longest prefix of `rows` (in selection order) whose response tokens (`tokens`, per pool row) sum
    to at most `budget`: equal-token selections, since selections of equal k can differ severalfold in the
    tokens they train on."""
    rows = np.asarray(rows, np.int64)
    total = np.cumsum(np.asarray(tokens, np.int64)[rows])
    m = int(np.searchsorted(total, budget, side="right"))
    if m == 0:
        raise ValueError(f"budget_tokens={budget} is smaller than the first selected row "
                         f"({int(total[0]) if total.size else 0} response tokens)")
    return rows[:m]


def _round_robin(cols: np.ndarray, k: int, key: jax.Array, allowed: np.ndarray, mesh):
    """round_robin on checked inputs, its turns from `key`: (rows, owners)."""
    n, t = cols.shape
    # A column loses at most k - 1 of its favourites to other columns before its last turn: its
    # top min(N, k) allowed rows are all it can ever reach.
    depth = min(n, k)
    if _sharded(mesh):
        from idjax import sharding

        ranked = sharding.top_k_rows(cols, depth, mesh, allowed)
    else:
        rows = np.flatnonzero(allowed)
        ranked = []
        for j in range(t):
            c = cols[rows, j].astype(np.float64)
            # every row tied with the depth-th best joins before the cut, so ties go to lower rows
            part = np.flatnonzero(c >= np.partition(c, rows.size - depth)[rows.size - depth])
            ranked.append(rows[part[np.lexsort((part, -c[part]))][:depth]])
    turns = np.asarray(_turns(key, k=k, num_targets=t))
    cursor = np.zeros(t, np.int64)
    taken = ~allowed
    out = np.empty(k, np.int64)
    for s, j in enumerate(turns):
        r = ranked[j]
        while taken[r[cursor[j]]]:  # never runs off the end: r holds min(N, k) free-at-start rows
            cursor[j] += 1
        out[s] = r[cursor[j]]
        taken[out[s]] = True
    return out, turns.astype(np.int64)


def round_robin(columns, k: int, *, seed: int = 0, candidates=None, return_owner: bool = False,
                mesh=None) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Round-robin over target columns: every round visits the targets in a fresh random order and
    gives each its best not-yet-taken row, until k rows are taken (`round_robin_indices` with the key
    jax.random.key(seed), on the host in float64).

    columns: [N, t], one score column per target sample. Only each column's top min(k, N) rows can
    ever be reached, so that is all that is sorted. return_owner also returns, per selected row,
    the column that took it.
    """
    cols = np.asarray(columns)
    if cols.ndim != 2 or cols.shape[1] < 1:
        raise ValueError(f"round_robin expects scores [N, t>=1], got shape {cols.shape}")
    if np.isnan(cols).any():
        raise ValueError(f"{int(np.isnan(cols).sum())} scores are NaN")
    allowed = np.ones(len(cols), bool) if candidates is None else np.asarray(candidates, bool).copy()
    _check_k(k, int(allowed.sum()))
    sel, owner = _round_robin(cols, k, _seed_key(seed), allowed, mesh)
    return (sel, owner) if return_owner else sel


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
    by the mean of its target columns or round-robin over them (task i with fold_in(key(seed), i)).

    Returns (rows in selection order, the task that took each row).
    """
    cols = np.asarray(columns)
    if cols.shape[1] != len(tasks):
        raise ValueError(f"{cols.shape[1]} score columns but {len(tasks)} target task labels")
    if aggregate not in ("mean", "round-robin"):
        raise ValueError(f"aggregate must be 'mean' or 'round-robin', got {aggregate!r}")
    allowed = np.ones(len(cols), bool) if candidates is None else np.asarray(candidates, bool).copy()
    _check_k(k, int(allowed.sum()))
    tasks = np.asarray(tasks, dtype=object)
    key = _seed_key(seed)
    out, owner = [], []
    for i, (name, budget) in enumerate(task_budgets(list(tasks), k).items()):
        mine = cols[:, tasks == name]
        if aggregate == "mean":
            rows = top_k(mine.mean(axis=1), budget, candidates=allowed, mesh=mesh)
        else:
            if np.isnan(mine).any():
                raise ValueError(f"{int(np.isnan(mine).sum())} scores are NaN")
            _check_k(budget, int(allowed.sum()))
            rows, _ = _round_robin(mine, budget, jax.random.fold_in(key, i), allowed.copy(), mesh)
        allowed[rows] = False
        out.append(rows)
        owner += [name] * len(rows)
        log.info("task %s: %d samples", name, len(rows))
    return np.concatenate(out), owner


def task_groups(tasks: Sequence[str], k: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...], list[str]]:
    """(groups, budgets, names) for `per_task_indices`: the columns of each task in sorted order,
    its share of k (`task_budgets`), and the task names."""
    budgets = task_budgets(tasks, k)
    groups = tuple(tuple(j for j, t in enumerate(tasks) if t == name) for name in budgets)
    return groups, tuple(budgets.values()), list(budgets)
