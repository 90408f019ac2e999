"""Landmarks: choose the few samples that get exact influence quantities (docs/method.md 4.2).

Everything exact (projected gradients, p, Q) is computed for l landmark samples only and carried
to the other rows by `idjax.propagation` (KRR / ridge). This module chooses the landmarks:
uniform random (the official choice), k-means++ seeding (D^2 sampling, better coverage of the
embedding space) or farthest-point traversal.

k-means++ keeps a running min squared distance to the chosen set (N floats, on the device) and
updates it after every pick: num passes over the data, O(num * N * e) work. That is fine when the
data fits on the devices (it is then kept there, its rows split over the local devices, and every
pick runs in one compiled loop) but is num full reads of E otherwise; `candidates=m` runs the D^2
sampling on a uniform subsample of m rows (e.g. 20 * num) held in memory, bounding the cost to
O(num * m * e). `spearman` measures how well
propagated values rank (experiments/landmark_study.py).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from idjax import sharding as shd
from idjax.rows import check_chunk_rows, read_rows, row_spans, rows_shape, take_rows

logger = logging.getLogger(__name__)

METHODS = ("random", "kmeans++", "farthest")
DEFAULT_CHUNK_ROWS = 16384
DEFAULT_RESIDENT_BYTES = 4 << 30  # k-means++: keep the (candidate) rows on the device below this


# --- choosing landmarks -------------------------------------------------------------------

def _sqdist_to(x: jax.Array, y: jax.Array) -> jax.Array:
    """||x_i - y||^2 over the last axis, by differences: exact 0 for duplicate rows."""
    return jnp.sum(jnp.square(x - y), axis=-1)


def _draw(d: jax.Array, u: jax.Array, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """Flat index drawn with probability d / sum(d) (or argmax d if greedy), and sum(d).

    d is [chunks, rows]. Two-level inverse-CDF (chunk totals, then rows of one chunk) keeps
    float32 cumulative sums short. Rounding can land on a d = 0 entry; argmax replaces it.
    """
    if greedy:
        return jnp.argmax(d.ravel()), jnp.max(d)
    ccum = jnp.cumsum(jnp.sum(d, axis=1))
    total = ccum[-1]
    t = u * total
    k = jnp.clip(jnp.searchsorted(ccum, t, side="right"), 0, d.shape[0] - 1)
    before = jnp.where(k > 0, ccum[jnp.maximum(k - 1, 0)], 0.0)
    row = d[k]
    j = jnp.clip(jnp.searchsorted(jnp.cumsum(row), t - before, side="right"), 0, d.shape[1] - 1)
    idx = k * d.shape[1] + j
    return jnp.where(row[j] > 0, idx, jnp.argmax(d.ravel())), total


def _taken(free, idx):
    """The free-row mask [chunks, rows] with flat row `idx` chosen."""
    return free.reshape(-1).at[idx].set(False).reshape(free.shape)


def _pick(d, free, u, u_free, greedy: bool):
    """The next landmark from the running min distances d [chunks, rows]: a D^2 draw (or the argmax if
    greedy), or, when every distance is 0 (all unchosen rows duplicate chosen ones), a uniform draw
    among the free rows (unchosen, not padding). Returns (index, total of d, free without the index)."""
    idx, total = _draw(d, u, greedy)
    uniform, _ = _draw(free.astype(jnp.float32), u_free, False)
    idx = jnp.where(total > 0, idx, uniform)
    return idx, total, _taken(free, idx)


@functools.partial(jax.jit, static_argnames=("num", "greedy"))
def _kpp_resident(x3, valid, first, us, us_free, num: int, greedy: bool):
    """Data on the device [chunks, rows, e] (rows may be split over a mesh): every pick in one compiled
    loop, no host round trip. Returns (picks [num] int32, whether any total was non-finite)."""
    flat = x3.reshape(-1, x3.shape[-1])

    def body(i, carry):
        d, picks, free, bad = carry
        d = jnp.minimum(d, _sqdist_to(x3, flat[picks[i - 1]]))
        idx, total, free = _pick(d, free, us[i - 1], us_free[i - 1], greedy)
        return d, picks.at[i].set(idx.astype(jnp.int32)), free, bad | ~jnp.isfinite(total)

    d = jnp.where(valid, jnp.inf, 0.0).astype(jnp.float32)
    free = _taken(valid, first)
    picks = jnp.zeros((num,), jnp.int32).at[0].set(first)
    _, picks, _, bad = lax.fori_loop(1, num, body, (d, picks, free, jnp.bool_(False)))
    return picks, bad


@functools.partial(jax.jit, donate_argnums=(0,))
def _kpp_update_chunk(d, k, xk, y):
    """Streaming: fold the last pick into chunk k of the running min distances."""
    new = jnp.minimum(lax.dynamic_index_in_dim(d, k, keepdims=False), _sqdist_to(xk, y))
    return lax.dynamic_update_index_in_dim(d, new, k, axis=0)


_kpp_stream_pick = jax.jit(_pick, static_argnames=("greedy",), donate_argnums=(1,))


def _d2_sampling(x: Any, n: int, e: int, num: int, rng: np.random.Generator, greedy: bool,
                 chunk_rows: int, resident_bytes: int) -> list[int]:
    """k-means++ seeding (greedy=False) or farthest-point traversal (greedy=True).

    First pick uniform; each next pick drawn with probability proportional to the squared
    distance to the nearest pick (or the farthest row if greedy). When every unchosen row
    sits on a chosen one (all distances 0: duplicates), picks fall back to uniform among the
    unchosen rows, so the result always has `num` distinct indices. The uniform numbers are drawn
    up front, so the data on the device (one compiled loop, rows split over the local devices) and
    the data streamed from the host (one pass per pick) give the same picks.
    """
    mesh = shd.get_mesh()
    mesh = mesh if shd.active(mesh) and not shd.spans_processes(mesh) else None
    rows = shd.round_up(min(chunk_rows, n), mesh)
    spans = row_spans(n, rows)
    valid = (np.arange(len(spans) * rows) < n).reshape(len(spans), rows)
    first = int(rng.integers(n))
    us = np.minimum(rng.random(max(num - 1, 1)), 1.0 - 2.0**-24).astype(np.float32)
    us_free = np.minimum(rng.random(max(num - 1, 1)), 1.0 - 2.0**-24).astype(np.float32)
    resident = len(spans) * rows * e * 4 <= resident_bytes * (1 if mesh is None else mesh.size)
    what = "farthest-point" if greedy else "k-means++"
    logger.info("%s: %d landmarks from %d rows (%s)", what, num, n,
                "data on device" if resident else f"streaming {len(spans)} chunks per pick")
    if resident:
        x3 = np.stack([read_rows(x, a, b, rows) for a, b in spans])
        put = (lambda a: shd.put_rows(a, mesh, axis=1)) if mesh is not None else jnp.asarray
        picks, bad = _kpp_resident(put(x3), put(valid), jnp.int32(first), jnp.asarray(us), jnp.asarray(us_free),
                                   num=num, greedy=greedy)
        if bool(bad):
            raise ValueError(f"{what}: embeddings contain non-finite values (NaN or inf)")
        return [int(i) for i in np.asarray(picks)]
    d = jnp.asarray(np.where(valid, np.inf, 0.0).astype(np.float32))
    free = _taken(jnp.asarray(valid), first)
    chosen = [first]
    for i in tqdm(range(num - 1), desc=what, unit="landmark", disable=None):
        y = jnp.asarray(np.asarray(x[chosen[-1]:chosen[-1] + 1], dtype=np.float32)[0])
        for k, (a, b) in enumerate(spans):
            d = _kpp_update_chunk(d, jnp.int32(k), read_rows(x, a, b, rows), y)
        idx, total, free = _kpp_stream_pick(d, free, us[i], us_free[i], greedy)
        if not math.isfinite(float(total)):
            raise ValueError(f"{what}: embeddings contain non-finite values (NaN or inf)")
        chosen.append(int(idx))
    return chosen


def choose_landmarks(embeddings: Any, num: int, method: str = "random", seed: int = 0, *,
                     candidates: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                     resident_bytes: int = DEFAULT_RESIDENT_BYTES) -> np.ndarray:
    """`num` distinct row indices of `embeddings` (sorted int64) to use as landmarks.

    embeddings: [N, e], anything with len(), .shape and row slicing x[a:b] (a memmap works;
        it is read in `chunk_rows` row chunks). "random" only needs its length.
    method: "random" (uniform without replacement, numpy default_rng(seed), the official
        choice); "kmeans++" (D^2 sampling: better coverage, num passes over the data);
        "farthest" (greedy farthest-point traversal from a random first row).
    candidates: for kmeans++/farthest, run on a uniform random subsample of this many rows
        (loaded into memory: candidates * e * 4 bytes) instead of all N; e.g. 20 * num.
    resident_bytes: keep the (candidate) data on the device when it is at most this big,
        instead of re-reading it from the host for every pick.
    Deterministic for a given seed (and, for the distance-based methods, chunk_rows and backend).
    """
    if method not in METHODS:
        raise ValueError(f"choose_landmarks: method must be one of {METHODS}, got {method!r}")
    n = len(embeddings)
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or not 1 <= num <= n:
        raise ValueError(f"choose_landmarks: num must be an integer in [1, N={n}], got {num!r}")
    num = int(num)
    rng = np.random.default_rng(seed)
    if method == "random":
        return np.sort(rng.choice(n, size=num, replace=False)).astype(np.int64)
    n, e = rows_shape(embeddings)
    chunk_rows = check_chunk_rows(chunk_rows)
    data, pool = embeddings, None
    if candidates is not None:
        if candidates < num:
            raise ValueError(f"choose_landmarks: candidates={candidates} must be >= num={num}")
        if candidates < n:
            pool = np.sort(rng.choice(n, size=int(candidates), replace=False))
            data = take_rows(embeddings, pool)
            n = pool.size
    picked = _d2_sampling(data, n, e, num, rng, method == "farthest", chunk_rows, resident_bytes)
    picked = np.asarray(picked, np.int64)
    if pool is not None:
        picked = pool[picked]
    out = np.sort(picked)
    if np.unique(out).size != num:  # cannot happen: a chosen row has distance exactly 0
        raise RuntimeError(f"choose_landmarks: {method} picked a row twice")
    return out


# --- evaluation helper --------------------------------------------------------------------

def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size, np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two 1-D arrays (average ranks for ties; numpy only).

    NaN if either input has a NaN or is constant (as scipy.stats.spearmanr).
    """
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if a.size != b.size or a.size < 2:
        raise ValueError(f"spearman: need two arrays of equal length >= 2, got {a.size}, {b.size}")
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / den) if den > 0 else float("nan")
