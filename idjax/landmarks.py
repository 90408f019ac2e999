"""Landmarks: choose a few samples, do the exact work on them, propagate to all (docs/method.md 4).

Exact influence quantities (projected gradients, p, Q) are computed for l landmark samples
only. Every source sample has a cheap embedding (a row of E, [N, e]); a coefficient matrix
C [N, l], which does not depend on the target, carries landmark values to all samples:

    p_hat = C p_L,   P_hat = C P_L (all target columns at once),   Q_hat w = C (Q_L (C^T w)).

Two propagators (`Propagator.fit(..., kind=...)`):

- "krr", RBF kernel ridge regression (the official one):
      C = K(E, E_L) (K(E_L, E_L) + delta * mean(diag K_LL) I)^-1,
      K(x, y) = exp(-||x - y||^2 / (2 s^2)),  s = median distance between distinct landmarks.
- "ridge", linear ridge regression:
      C = E E_L^T (E_L E_L^T + delta * mean(diag(E_L E_L^T)) I)^-1.
  The paper writes delta * I (docs/method.md 4.4). Scaling delta by the mean diagonal is a deliberate reading: it
  makes delta scale-free (multiplying E by 10 leaves C unchanged), and for KRR the mean
  diagonal is 1, so there both readings agree. Ridge has no intercept: append a constant
  column to E if the values have an offset.

Whatever the kind, a landmark keeps its exact value: C's row for landmark j is the unit vector
e_j (the regression formula gives only approximately e_j there because of delta). apply() and
apply_transpose() use this same C, so they are exact transposes of each other.

Scale. With N = 1e6 samples, l = 4096 landmarks and e = 4096 dims, E is 16 GB and C is 16 GB,
so neither is held: E is any row-sliceable array (numpy memmap included) read in fixed-size
row chunks (the last one zero padded, so each compiled function compiles once), and C is
never materialised. Fit gathers E_L and factorises the l x l system once (Cholesky);
apply(V) streams chunks, computing kernel chunk [c, l] @ (A^-1 V). Each product is one pass
over E: N*l*e multiply-adds plus reading E. When N*l*4 bytes is below `cache_bytes`, C is
built once on the device at first use and products become plain matmuls.

Choosing landmarks (`choose_landmarks`): uniform random (the official choice), k-means++
seeding (D^2 sampling, better coverage of the embedding space) or farthest-point traversal.
k-means++ keeps a running min squared distance to the chosen set (N floats, on the device) and
updates it after every pick: num passes over the data, O(num * N * e) work. That is fine when
the data fits on the device (it is then kept there and each pick is one compiled call) but is
num full reads of E otherwise; `candidates=m` runs the D^2 sampling on a uniform subsample of
m rows (e.g. 20 * num) held in memory, bounding the cost to O(num * m * e).

Everything is float32 with HIGHEST matmul precision (TPU/GPU defaults would round to bf16 or
TF32, which destroys kernel distances). Kernel distances are computed on data centred at the
landmark mean, which reduces cancellation in ||x||^2 + ||y||^2 - 2 x.y.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from idjax import distributed as dist

logger = logging.getLogger(__name__)

METHODS = ("random", "kmeans++", "farthest")
KINDS = ("krr", "ridge")
DEFAULT_CHUNK_ROWS = 16384
DEFAULT_CACHE_BYTES = 1 << 30     # Propagator: keep C [N, l] on the device below this
DEFAULT_RESIDENT_BYTES = 4 << 30  # k-means++: keep the (candidate) rows on the device below this
_HI = lax.Precision.HIGHEST


# --- reading rows -------------------------------------------------------------------------

def _shape(embeddings: Any) -> tuple[int, int]:
    """(N, e) of a 2-D row-sliceable array, with a clear error for anything else."""
    shape = getattr(embeddings, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"embeddings must be a 2-D [N, e] array, got shape {shape}")
    n, e = int(shape[0]), int(shape[1])
    if len(embeddings) != n:
        raise ValueError(f"embeddings: len() = {len(embeddings)} but shape[0] = {n}")
    if n < 1 or e < 1:
        raise ValueError(f"embeddings must be non-empty, got shape {tuple(shape)}")
    return n, e


def _check_chunk_rows(chunk_rows: int) -> int:
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return int(chunk_rows)


def _load_chunk(x: Any, a: int, b: int, rows: int) -> np.ndarray:
    """Rows [a, b) of x as float32, zero padded to `rows` rows (static shape for jit).

    A fresh array every time: on the CPU backend jax may alias host memory, so a reused
    buffer could change under a computation still in flight.
    """
    blk = np.asarray(x[a:b], dtype=np.float32)
    if blk.shape[0] == rows:
        return np.ascontiguousarray(blk)
    out = np.zeros((rows, blk.shape[1]), np.float32)
    out[: blk.shape[0]] = blk
    return out


def _take_rows(x: Any, idx: np.ndarray) -> np.ndarray:
    """x[idx] as float32 for ndarray/memmap (fancy indexing), else one row slice at a time."""
    idx = np.asarray(idx, np.int64)
    if isinstance(x, np.ndarray):
        order = np.argsort(idx, kind="stable")  # sorted reads are sequential on a memmap
        out = np.empty((idx.size, x.shape[1]), np.float32)
        out[order] = np.asarray(x[idx[order]], dtype=np.float32)
        return out
    return np.stack([np.asarray(x[int(i):int(i) + 1], dtype=np.float32)[0] for i in idx]) \
        if idx.size else np.zeros((0, x.shape[1]), np.float32)


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


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


@functools.partial(jax.jit, static_argnames=("greedy",), donate_argnums=(1,))
def _kpp_resident_step(x3, d, prev, u, greedy):
    """Data on device [chunks, rows, e]: fold in the last pick, draw the next one."""
    y = x3.reshape(-1, x3.shape[-1])[prev]
    d = jnp.minimum(d, _sqdist_to(x3, y))
    idx, total = _draw(d, u, greedy)
    return d, idx, total


@functools.partial(jax.jit, donate_argnums=(0,))
def _kpp_update_chunk(d, k, xk, y):
    """Streaming: fold the last pick into chunk k of the running min distances."""
    new = jnp.minimum(lax.dynamic_index_in_dim(d, k, keepdims=False), _sqdist_to(xk, y))
    return lax.dynamic_update_index_in_dim(d, new, k, axis=0)


_draw_jit = jax.jit(_draw, static_argnames=("greedy",))


def _nth_unchosen(r: int, chosen: list[int]) -> int:
    """The r-th (0-based) index not in `chosen`."""
    for c in sorted(chosen):
        if c <= r:
            r += 1
        else:
            break
    return r


def _d2_sampling(x: Any, n: int, e: int, num: int, rng: np.random.Generator, greedy: bool,
                 chunk_rows: int, resident_bytes: int) -> list[int]:
    """k-means++ seeding (greedy=False) or farthest-point traversal (greedy=True).

    First pick uniform; each next pick drawn with probability proportional to the squared
    distance to the nearest pick (or the farthest row if greedy). When every unchosen row
    sits on a chosen one (all distances 0: duplicates), picks fall back to uniform among the
    unchosen rows, so the result always has `num` distinct indices.
    """
    rows = min(chunk_rows, n)
    spans = _chunks(n, rows)
    valid = (np.arange(len(spans) * rows) < n).reshape(len(spans), rows)
    d = jnp.asarray(np.where(valid, np.inf, 0.0).astype(np.float32))
    resident = len(spans) * rows * e * 4 <= resident_bytes
    if resident:
        x3 = jnp.asarray(np.stack([_load_chunk(x, a, b, rows) for a, b in spans]))
    chosen = [int(rng.integers(n))]
    what = "farthest-point" if greedy else "k-means++"
    logger.info("%s: %d landmarks from %d rows (%s)", what, num, n,
                "data on device" if resident else f"streaming {len(spans)} chunks per pick")
    for _ in tqdm(range(num - 1), desc=what, unit="landmark", disable=None):
        u = np.float32(min(rng.random(), 1.0 - 2.0**-24))
        if resident:
            d, idx, total = _kpp_resident_step(x3, d, jnp.int32(chosen[-1]), u, greedy)
        else:
            y = jnp.asarray(np.asarray(x[chosen[-1]:chosen[-1] + 1], dtype=np.float32)[0])
            for k, (a, b) in enumerate(spans):
                d = _kpp_update_chunk(d, jnp.int32(k), _load_chunk(x, a, b, rows), y)
            idx, total = _draw_jit(d, u, greedy)
        total = float(total)
        if not math.isfinite(total):
            raise ValueError(f"{what}: embeddings contain non-finite values (NaN or inf)")
        if total > 0:
            chosen.append(int(idx))
        else:
            chosen.append(_nth_unchosen(int(rng.integers(n - len(chosen))), chosen))
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
    n, e = _shape(embeddings)
    chunk_rows = _check_chunk_rows(chunk_rows)
    data, pool = embeddings, None
    if candidates is not None:
        if candidates < num:
            raise ValueError(f"choose_landmarks: candidates={candidates} must be >= num={num}")
        if candidates < n:
            pool = np.sort(rng.choice(n, size=int(candidates), replace=False))
            data = _take_rows(embeddings, pool)
            n = pool.size
    picked = _d2_sampling(data, n, e, num, rng, method == "farthest", chunk_rows, resident_bytes)
    picked = np.asarray(picked, np.int64)
    if pool is not None:
        picked = pool[picked]
    out = np.sort(picked)
    if np.unique(out).size != num:  # cannot happen: a chosen row has distance exactly 0
        raise RuntimeError(f"choose_landmarks: {method} picked a row twice")
    return out


# --- propagation --------------------------------------------------------------------------

def _features(x, el, el_sq, mu, inv_2s2, kind):
    """Kernel rows K(x, E_L) [c, l]: RBF on centred data, or the linear kernel."""
    if kind == "ridge":
        return jnp.dot(x, el.T, precision=_HI)
    x = x - mu
    d2 = jnp.sum(x * x, axis=1)[:, None] + el_sq[None, :] - 2.0 * jnp.dot(x, el.T, precision=_HI)
    return jnp.exp(-jnp.maximum(d2, 0.0) * inv_2s2)


@functools.partial(jax.jit, static_argnames=("kind",))
def _chunk_apply(x, el, el_sq, mu, inv_2s2, alpha, kind):
    return jnp.dot(_features(x, el, el_sq, mu, inv_2s2, kind), alpha, precision=_HI)


@functools.partial(jax.jit, static_argnames=("kind",), donate_argnums=(0,))
def _chunk_apply_t(acc, x, w, el, el_sq, mu, inv_2s2, kind):
    return acc + jnp.dot(_features(x, el, el_sq, mu, inv_2s2, kind).T, w, precision=_HI)


@functools.partial(jax.jit, static_argnames=("kind",))
def _chunk_coeffs(x, el, el_sq, mu, inv_2s2, chol, kind):
    k = _features(x, el, el_sq, mu, inv_2s2, kind)
    return jax.scipy.linalg.cho_solve((chol, True), k.T).T


@jax.jit
def _solve(chol, b):
    return jax.scipy.linalg.cho_solve((chol, True), b)


@jax.jit
def _cached_apply(c, v):
    return jnp.dot(c, v, precision=_HI)


@jax.jit
def _cached_apply_t(c, w):
    return jnp.dot(c.T, w, precision=_HI)


@jax.jit
def _cached_low_rank(c, q, w):
    return jnp.dot(c, jnp.dot(q, jnp.dot(c.T, w, precision=_HI), precision=_HI), precision=_HI)


@jax.jit
def _gram(el, el_sq):
    """Squared distances between centred landmarks [l, l], diagonal exactly 0."""
    d2 = el_sq[:, None] + el_sq[None, :] - 2.0 * jnp.dot(el, el.T, precision=_HI)
    d2 = jnp.maximum(d2, 0.0)
    return jnp.where(jnp.eye(el.shape[0], dtype=bool), 0.0, d2)


def _median_bandwidth(d2: np.ndarray) -> float:
    """Median distance over landmark pairs i < j; if 0 (duplicates), median of the positive ones."""
    dist = np.sqrt(d2[np.triu_indices(d2.shape[0], k=1)].astype(np.float64))
    s = float(np.median(dist)) if dist.size else 0.0
    if s > 0:
        return s
    pos = dist[dist > 0]
    if pos.size:
        logger.warning("krr: median landmark distance is 0 (duplicate embeddings); "
                       "using the median of the %d positive distances", pos.size)
        return float(np.median(pos))
    logger.warning("krr: all landmark embeddings coincide; bandwidth set to 1")
    return 1.0


class Propagator:
    """C [N, l]: landmark values -> all rows (docs/method.md 4.4). Build with `Propagator.fit`.

    Attributes: kind, landmarks (int64 [l], column order of C), bandwidth (s, KRR only; None
    for ridge), delta, num_rows (N), num_landmarks (l), chunk_rows, cached (C is on device).
    """

    def __init__(self, embeddings, landmarks, kind, delta, bandwidth, el, el_sq, mu, chol,
                 chunk_rows, cache_bytes, mesh=None):
        self._x = embeddings
        self.num_rows, self.dim = _shape(embeddings)
        self.landmarks = landmarks
        self.num_landmarks = landmarks.size
        self.kind = kind
        self.delta = delta
        self.bandwidth = bandwidth
        # With a device mesh, each row chunk is split over the devices (docs/method.md 4.5: C's rows and E
        # are row-sharded, everything landmark-sized is replicated).
        self.mesh = mesh if dist.active(mesh) else None
        self.chunk_rows = dist.round_up(min(chunk_rows, self.num_rows), self.mesh)
        self._el, self._el_sq, self._mu = el, el_sq, mu
        self._inv_2s2 = jnp.float32(0.0 if bandwidth is None else 1.0 / (2.0 * bandwidth**2))
        self._chol = chol
        if self.mesh is not None:
            self._el, self._el_sq, self._mu, self._inv_2s2, self._chol = dist.put_replicated(
                (el, el_sq, mu, self._inv_2s2, chol), self.mesh)
        self._cache_ok = self.num_rows * self.num_landmarks * 4 <= cache_bytes
        self._c = None
        self._padded_rows = dist.round_up(self.num_rows, self.mesh)  # rows of the cached C

    @classmethod
    def fit(cls, embeddings: Any, landmarks: Any, kind: str = "krr", delta: float = 1e-2, *,
            bandwidth: float | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
            cache_bytes: int = DEFAULT_CACHE_BYTES, mesh=None) -> Propagator:
        """Gather E_L, set the bandwidth, factorise A = K_LL + delta*mean(diag K_LL)*I once.

        embeddings: [N, e] row-sliceable (memmap ok); kept by reference and re-read, in
            `chunk_rows` chunks, by every product that is not served from the cache.
        landmarks: distinct row indices; their order is the column order of C.
        bandwidth: KRR only; overrides the median heuristic.
        cache_bytes: C (N*l*4 bytes) is built on the device at first use when it fits.
        mesh: a device mesh (default distributed.get_mesh(): every local device); the N rows of each
            chunk (and of the cached C) are split over its devices.
        """
        if kind not in KINDS:
            raise ValueError(f"Propagator.fit: kind must be one of {KINDS}, got {kind!r}")
        n, _ = _shape(embeddings)
        chunk_rows = _check_chunk_rows(chunk_rows)
        lm = np.asarray(landmarks)
        if lm.ndim != 1 or lm.size < 1 or not np.issubdtype(lm.dtype, np.integer):
            raise ValueError(f"Propagator.fit: landmarks must be a non-empty 1-D integer array, "
                             f"got dtype {lm.dtype} shape {lm.shape}")
        lm = lm.astype(np.int64)
        if lm.min() < 0 or lm.max() >= n:
            raise ValueError(f"Propagator.fit: landmark indices must be in [0, {n}), "
                             f"got range [{lm.min()}, {lm.max()}]")
        if np.unique(lm).size != lm.size:
            raise ValueError("Propagator.fit: landmark indices must be distinct")
        if not delta >= 0:
            raise ValueError(f"Propagator.fit: delta must be >= 0, got {delta}")
        el_host = _take_rows(embeddings, lm)
        if not np.isfinite(el_host).all():
            raise ValueError("Propagator.fit: landmark embeddings contain NaN or inf")
        el = jnp.asarray(el_host)
        if kind == "krr":
            mu = jnp.mean(el, axis=0)
            el = el - mu
            el_sq = jnp.sum(el * el, axis=1)
            d2 = _gram(el, el_sq)
            if bandwidth is None:
                bandwidth = _median_bandwidth(np.asarray(d2))
            elif not bandwidth > 0:
                raise ValueError(f"Propagator.fit: bandwidth must be > 0, got {bandwidth}")
            bandwidth = float(bandwidth)
            a = jnp.exp(-d2 / (2.0 * bandwidth**2))
        else:
            mu = jnp.zeros((el.shape[1],), jnp.float32)
            el_sq = jnp.sum(el * el, axis=1)
            bandwidth = None
            a = jnp.dot(el, el.T, precision=_HI)
        lam = delta * jnp.mean(jnp.diagonal(a))
        a = a + lam * jnp.eye(a.shape[0], dtype=jnp.float32)
        chol, _ = jax.scipy.linalg.cho_factor(a, lower=True)
        if not bool(jnp.all(jnp.isfinite(chol))):
            raise ValueError(f"Propagator.fit: the {lm.size}x{lm.size} landmark system is not "
                             f"positive definite in float32 (delta={delta}); increase delta")
        logger.info("Propagator: %s, N=%d, l=%d, delta=%g, bandwidth=%s, lambda=%g", kind, n,
                    lm.size, delta, bandwidth, float(lam))
        return cls(embeddings, lm, kind, float(delta), bandwidth, el, el_sq, mu, chol,
                   chunk_rows, cache_bytes, dist.get_mesh() if mesh is None else mesh)

    # -- internals --

    @property
    def cached(self) -> bool:
        return self._c is not None

    def _args(self):
        return self._el, self._el_sq, self._mu, self._inv_2s2

    def _spans(self):
        return _chunks(self.num_rows, self.chunk_rows)

    def _bar(self, it, desc, progress):
        return tqdm(it, desc=desc, unit="chunk", disable=None if progress else True)

    def _load(self, x: Any, a: int, b: int, rows: int | None = None):
        """Rows [a, b) of x zero padded to `rows` (default chunk_rows), split over the mesh if any."""
        chunk = _load_chunk(x, a, b, self.chunk_rows if rows is None else rows)
        return chunk if self.mesh is None else dist.put_rows(chunk, self.mesh)

    def _pad(self, w: np.ndarray) -> np.ndarray:
        """[N, t] -> [padded rows, t] with zero rows (the cached C of a mesh has padded rows)."""
        extra = self._padded_rows - w.shape[0]
        return w if extra == 0 else np.concatenate([w, np.zeros((extra, w.shape[1]), w.dtype)])

    def _matrix(self) -> jax.Array | None:
        """The cached C on device (built at first use when allowed), else None.

        With a mesh, C's rows (zero padded to a multiple of the mesh size) are split over the devices.
        """
        if self._c is None and self._cache_ok:
            parts = [_chunk_coeffs(self._load(self._x, a, b), *self._args(), self._chol, self.kind)[: b - a]
                     for a, b in self._bar(self._spans(), "propagator: build C", True)]
            if self.mesh is None:
                c = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
                lm = jnp.asarray(self.landmarks)
                self._c = c.at[lm].set(jnp.eye(self.num_landmarks, dtype=jnp.float32))
            else:
                c = np.zeros((self._padded_rows, self.num_landmarks), np.float32)
                c[: self.num_rows] = np.concatenate([np.asarray(x) for x in parts])
                c[self.landmarks] = np.eye(self.num_landmarks, dtype=np.float32)
                self._c = dist.put_rows(c, self.mesh)
            logger.info("Propagator: cached C [%d, %d] on device", *self._c.shape)
        return self._c

    def _columns(self, v, rows: int, name: str) -> tuple[np.ndarray, bool]:
        v = np.asarray(v, dtype=np.float32)
        if v.ndim not in (1, 2) or v.shape[0] != rows:
            raise ValueError(f"Propagator.{name}: expected shape [{rows}] or [{rows}, t], "
                             f"got {v.shape}")
        return (v[:, None], True) if v.ndim == 1 else (v, False)

    # -- products --

    def apply(self, values: Any, *, progress: bool = True) -> np.ndarray:
        """C @ values: values [l] or [l, t] (landmark order) -> [N] or [N, t] float32.

        Landmark rows get their values exactly; all t columns share one pass over E.
        """
        v, vec = self._columns(values, self.num_landmarks, "apply")
        c = self._matrix()
        if c is not None:
            out = np.asarray(_cached_apply(c, self._rep(v)))[: self.num_rows]
        else:
            alpha = self._rep(_solve(self._chol, v))
            out = np.empty((self.num_rows, v.shape[1]), np.float32)
            pending = None
            for a, b in self._bar(self._spans(), "propagate", progress):
                res = _chunk_apply(self._load(self._x, a, b), *self._args(), alpha, self.kind)
                if pending is not None:  # copy the previous chunk while this one computes
                    pa, pb, pres = pending
                    out[pa:pb] = np.asarray(pres)[: pb - pa]
                pending = (a, b, res)
            pa, pb, pres = pending
            out[pa:pb] = np.asarray(pres)[: pb - pa]
            out[self.landmarks] = v
        return out[:, 0] if vec else out

    def apply_rows(self, values: Any, start: int, stop: int, *, rows: int | None = None) -> np.ndarray:
        """Rows [start, stop) of C @ values, computed from those rows of E only (the part of the N axis
        one process of a multi-process run owns). The same arithmetic as apply() for those rows.

        rows: pad each piece to this many rows (default: the span, at most chunk_rows), so pieces of
        one size compile once.
        """
        v, vec = self._columns(values, self.num_landmarks, "apply_rows")
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"Propagator.apply_rows: rows [{start}, {stop}) not in [0, {self.num_rows})")
        size = dist.round_up(min(self.chunk_rows, rows or max(1, stop - start)), self.mesh)
        rhs = self._rep(v if self._cache_ok else _solve(self._chol, v))
        out = np.empty((stop - start, v.shape[1]), np.float32)
        for a in range(start, stop, size):
            b = min(a + size, stop)
            x = self._load(self._x, a, b, size)
            if self._cache_ok:  # apply() multiplies the cached C: rows of C first, then the product
                res = _cached_apply(_chunk_coeffs(x, *self._args(), self._chol, self.kind), rhs)
            else:
                res = _chunk_apply(x, *self._args(), rhs, self.kind)
            out[a - start:b - start] = np.asarray(res)[: b - a]
        inside = (self.landmarks >= start) & (self.landmarks < stop)
        out[self.landmarks[inside] - start] = v[inside]
        return out[:, 0] if vec else out

    def _rep(self, x):
        """A landmark-sized array replicated over the mesh (as is without one)."""
        return x if self.mesh is None else dist.put_replicated(x, self.mesh)

    def apply_transpose(self, w: Any, *, progress: bool = True) -> np.ndarray:
        """C^T @ w: w [N] or [N, t] -> [l] or [l, t] float32 (landmark order).

        Accumulates K(E_chunk, E_L)^T w_chunk over non-landmark rows, solves once, and adds
        the landmark rows' own weights (their rows of C are unit vectors).
        """
        w, vec = self._columns(w, self.num_rows, "apply_transpose")
        c = self._matrix()
        if c is not None:
            w = self._pad(w)
            out = np.asarray(_cached_apply_t(c, w if self.mesh is None else dist.put_rows(w, self.mesh)))
        else:
            own = w[self.landmarks]
            w = w.copy()
            w[self.landmarks] = 0.0
            acc = self._rep(jnp.zeros((self.num_landmarks, w.shape[1]), jnp.float32))
            for a, b in self._bar(self._spans(), "propagate^T", progress):
                acc = _chunk_apply_t(acc, self._load(self._x, a, b), self._load(w, a, b), *self._args(),
                                     self.kind)
            out = np.asarray(_solve(self._chol, acc)) + own
        return out[:, 0] if vec else out

    def dense(self) -> np.ndarray:
        """C itself, [N, l] float32 (N*l*4 bytes on the host: small problems and tests)."""
        c = self._matrix()
        if c is not None:
            return np.asarray(c)[: self.num_rows]
        out = np.empty((self.num_rows, self.num_landmarks), np.float32)
        for a, b in self._bar(self._spans(), "propagator: C", True):
            out[a:b] = np.asarray(_chunk_coeffs(self._load(self._x, a, b), *self._args(), self._chol,
                                                self.kind))[: b - a]
        out[self.landmarks] = np.eye(self.num_landmarks, dtype=np.float32)
        return out

    def low_rank_matvec(self, q_l: Any) -> Callable[[Any], Any]:
        """w -> C (Q_L (C^T w)): the propagated second-order product Q_hat w (docs/method.md 4.4).

        With C cached, the function is pure JAX (jittable; it closes over the device C and
        returns a jax.Array). Otherwise it is a host function that makes two streaming passes
        over E per call (returns np.ndarray; no progress bar, a solver calls it many times).
        The attribute `.jittable` says which.
        """
        q = np.asarray(q_l, dtype=np.float32)
        l = self.num_landmarks
        if q.shape != (l, l):
            raise ValueError(f"Propagator.low_rank_matvec: Q_L must be [{l}, {l}], got {q.shape}")
        c = self._matrix()
        if c is not None:
            qd = jnp.asarray(q) if self.mesh is None else self._rep(q)
            n, extra = self.num_rows, self._padded_rows - self.num_rows

            def matvec(w):
                w = jnp.asarray(w, jnp.float32)
                if extra:  # the mesh's C has zero padding rows
                    return _cached_low_rank(c, qd, jnp.pad(w, (0, extra)))[:n]
                return _cached_low_rank(c, qd, w)

            matvec.jittable = True
        else:
            def matvec(w):
                return self.apply(q @ self.apply_transpose(w, progress=False), progress=False)

            matvec.jittable = False
        return matvec

    def __repr__(self) -> str:
        s = "" if self.bandwidth is None else f", bandwidth={self.bandwidth:.4g}"
        return (f"Propagator(kind={self.kind!r}, N={self.num_rows}, l={self.num_landmarks}, "
                f"delta={self.delta:g}{s}, cached={self.cached})")


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
