"""The propagation shell: `Propagator`, the core of idjax.propagation for pools held anywhere.

E is read in row chunks from any store (a memmap, an ArrayStore view), each chunk split over the
device mesh; C [N, l] is cached on the devices when its bytes per device fit the budget, and every
product streams E otherwise (the second-order product included: `streamed_low_rank_product`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from idjax import memory
from idjax import sharding as shd
from idjax.propagation import (
    KINDS, coefficients, krr_fit_landmarks, landmark_solve, low_rank_product, ridge_fit_landmarks,
    streamed_low_rank_product,
)
from idjax.rows import check_chunk_rows, read_rows, row_spans, rows_shape, take_rows

logger = logging.getLogger("idjax.propagation")

DEFAULT_CHUNK_ROWS = 16384
DEFAULT_CACHE_BYTES = 1 << 30     # Propagator: C's bytes per device where the device's memory is unknown
STREAM_CHUNK_BYTES = 1 << 28      # the kernel block K(E_chunk, E_L) of a streamed product, at most
_HI = lax.Precision.HIGHEST


# --- jitted pieces of the shell ------------------------------------------------------------------

_fit_krr = jax.jit(krr_fit_landmarks)
_fit_ridge = jax.jit(ridge_fit_landmarks)
_solve = jax.jit(landmark_solve)
_coefficients = jax.jit(coefficients)
_low_rank = jax.jit(low_rank_product)


@jax.jit
def _kernel_apply(state, x, alpha):
    return jnp.dot(state.kernel(x), alpha, precision=_HI)


@functools.partial(jax.jit, donate_argnums=(0,))
def _kernel_apply_t(acc, state, x, w):
    return acc + jnp.dot(state.kernel(x).T, w, precision=_HI)


@jax.jit
def _matmul(a, b):
    return jnp.dot(a, b, precision=_HI)


# --- the shell -----------------------------------------------------------------------------------

class Propagator:
    """C [N, l] for a pool held anywhere (docs/method.md 4.4-4.5). Build with `Propagator.fit`.

    Attributes: kind, landmarks (int64 [l], column order of C), bandwidth (s, KRR only; None for
    ridge), delta, state (the core's KRRState / RidgeState), num_rows (N), num_landmarks (l),
    chunk_rows, cached (C is on device).
    """

    def __init__(self, embeddings, landmarks, kind, delta, state, chunk_rows, cache_bytes, mesh=None):
        self._x = embeddings
        self.num_rows, self.dim = rows_shape(embeddings)
        self.landmarks = landmarks
        self.num_landmarks = landmarks.size
        self.kind = kind
        self.delta = delta
        self.bandwidth = float(state.bandwidth) if kind == "krr" else None
        # With a mesh, each row chunk is split over the devices (E and C row-sharded, the landmark-
        # sized state replicated).
        self.mesh = mesh if shd.active(mesh) else None
        self.chunk_rows = shd.round_up(min(chunk_rows, self.num_rows), self.mesh)
        self.state = state if self.mesh is None else shd.put_replicated(state, self.mesh)
        self._padded_rows = shd.round_up(self.num_rows, self.mesh)  # rows of the cached C
        shards = 1 if self.mesh is None else self.mesh.size
        if cache_bytes is None:  # a quarter of the device: C is one of several arrays a selection holds
            device = memory.device_memory(agree=shd.spans_processes(self.mesh))
            cache_bytes = DEFAULT_CACHE_BYTES if device is None else device // 4
        self.cache_bytes = cache_bytes
        self._cache_ok = self._padded_rows * self.num_landmarks * 4 // shards <= cache_bytes
        self._c = None

    @classmethod
    def fit(cls, embeddings: Any, landmarks: Any, kind: str = "krr", delta: float = 1e-2, *,
            bandwidth: float | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
            cache_bytes: int | None = None, mesh=None) -> Propagator:
        """Gather E_L on the host and fit the core (`krr_fit` / `ridge_fit`) on it.

        embeddings: [N, e] row-sliceable (memmap ok); kept by reference and re-read, in
            `chunk_rows` chunks, by every product that is not served from the cache.
        landmarks: distinct row indices; their order is the column order of C.
        bandwidth: KRR only; overrides the median heuristic.
        cache_bytes: C (N*l*4 bytes, split over the mesh) is built on the devices at first use when its
            bytes per device are at most this (default: a quarter of memory.device_memory(), else
            DEFAULT_CACHE_BYTES). Otherwise every product streams E.
        mesh: a device mesh (default distributed.get_mesh()); the N rows of each chunk (and of the
            cached C) are split over its devices.
        """
        if kind not in KINDS:
            raise ValueError(f"Propagator.fit: kind must be one of {KINDS}, got {kind!r}")
        n, _ = rows_shape(embeddings)
        chunk_rows = check_chunk_rows(chunk_rows)
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
        el = take_rows(embeddings, lm)
        if not np.isfinite(el).all():
            raise ValueError("Propagator.fit: landmark embeddings contain NaN or inf")
        index = jnp.asarray(lm, jnp.int32)
        if kind == "krr":
            if bandwidth is not None and not bandwidth > 0:
                raise ValueError(f"Propagator.fit: bandwidth must be > 0, got {bandwidth}")
            state, fallback = _fit_krr(el, index, jnp.float32(delta),
                                       None if bandwidth is None else jnp.float32(bandwidth))
            if int(fallback) == 1:
                logger.warning("krr: median landmark distance is 0 (duplicate embeddings); "
                               "using the median of the positive distances")
            elif int(fallback) == 2:
                logger.warning("krr: all landmark embeddings coincide; bandwidth set to 1")
        else:
            state = _fit_ridge(el, index, jnp.float32(delta))
        if not bool(jnp.all(jnp.isfinite(state.chol))):
            raise ValueError(f"Propagator.fit: the {lm.size}x{lm.size} landmark system is not "
                             f"positive definite in float32 (delta={delta}); increase delta")
        prop = cls(embeddings, lm, kind, float(delta), state, chunk_rows, cache_bytes,
                   shd.get_mesh() if mesh is None else mesh)
        logger.info("Propagator: %s, N=%d, l=%d, delta=%g, bandwidth=%s", kind, n, lm.size, delta,
                    prop.bandwidth)
        return prop

    # -- internals --

    @property
    def cached(self) -> bool:
        return self._c is not None

    def _spans(self):
        return row_spans(self.num_rows, self.chunk_rows)

    def _bar(self, it, desc, progress):
        return tqdm(it, desc=desc, unit="chunk", disable=None if progress else True)

    def _load(self, x: Any, a: int, b: int, rows: int | None = None):
        """Rows [a, b) of x zero padded to `rows` (default chunk_rows), split over the mesh if any."""
        chunk = read_rows(x, a, b, self.chunk_rows if rows is None else rows)
        return chunk if self.mesh is None else shd.put_rows(chunk, self.mesh)

    def _pad(self, w: np.ndarray) -> np.ndarray:
        """[N, t] -> [padded rows, t] with zero rows (the cached C of a mesh has padded rows)."""
        extra = self._padded_rows - w.shape[0]
        return w if extra == 0 else np.concatenate([w, np.zeros((extra, w.shape[1]), w.dtype)])

    def _rep(self, x):
        """A landmark-sized array replicated over the mesh (as is without one)."""
        return jnp.asarray(x) if self.mesh is None else shd.put_replicated(x, self.mesh)

    def _matrix(self) -> jax.Array | None:
        """The cached C on device (built at first use when allowed), else None. With a mesh, C's
        rows (zero padded to a multiple of the mesh size) are split over the devices."""
        if self._c is None and self._cache_ok:
            parts = [_coefficients(self.state, self._load(self._x, a, b))[: b - a]
                     for a, b in self._bar(self._spans(), "propagator: build C", True)]
            c = np.zeros((self._padded_rows, self.num_landmarks), np.float32)
            c[: self.num_rows] = np.concatenate([np.asarray(x) for x in parts])
            c[self.landmarks] = np.eye(self.num_landmarks, dtype=np.float32)
            self._c = jnp.asarray(c) if self.mesh is None else shd.put_rows(c, self.mesh)
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
        """C @ values: values [l] or [l, t] (landmark order) -> [N] or [N, t] float32 (`propagate`).

        Landmark rows get their values exactly; all t columns share one pass over E.
        """
        v, vec = self._columns(values, self.num_landmarks, "apply")
        c = self._matrix()
        if c is not None:
            out = np.asarray(_matmul(c, self._rep(v)))[: self.num_rows]
        else:
            alpha = self._rep(_solve(self.state, v))
            out = np.empty((self.num_rows, v.shape[1]), np.float32)
            pending = None
            for a, b in self._bar(self._spans(), "propagate", progress):
                res = _kernel_apply(self.state, self._load(self._x, a, b), alpha)
                if pending is not None:  # copy the previous chunk while this one computes
                    pa, pb, pres = pending
                    out[pa:pb] = np.asarray(pres)[: pb - pa]
                pending = (a, b, res)
            pa, pb, pres = pending
            out[pa:pb] = np.asarray(pres)[: pb - pa]
            out[self.landmarks] = v
        return out[:, 0] if vec else out

    def apply_rows(self, values: Any, start: int, stop: int, *, rows: int | None = None) -> np.ndarray:
        """Rows [start, stop) of C @ values, from those rows of E only (the part of the N axis one
        process owns); the same arithmetic as apply() for those rows.

        rows: pad each piece to this many rows (default: the span, at most chunk_rows), so pieces of
        one size compile once.
        """
        v, vec = self._columns(values, self.num_landmarks, "apply_rows")
        if not 0 <= start <= stop <= self.num_rows:
            raise ValueError(f"Propagator.apply_rows: rows [{start}, {stop}) not in [0, {self.num_rows})")
        size = shd.round_up(min(self.chunk_rows, rows or max(1, stop - start)), self.mesh)
        rhs = self._rep(v if self._cache_ok else _solve(self.state, v))
        out = np.empty((stop - start, v.shape[1]), np.float32)
        for a in range(start, stop, size):
            b = min(a + size, stop)
            x = self._load(self._x, a, b, size)
            if self._cache_ok:  # apply() multiplies the cached C: rows of C first, then the product
                res = _matmul(_coefficients(self.state, x), rhs)
            else:
                res = _kernel_apply(self.state, x, rhs)
            out[a - start:b - start] = np.asarray(res)[: b - a]
        inside = (self.landmarks >= start) & (self.landmarks < stop)
        out[self.landmarks[inside] - start] = v[inside]
        return out[:, 0] if vec else out

    def apply_transpose(self, w: Any, *, progress: bool = True) -> np.ndarray:
        """C^T @ w: w [N] or [N, t] -> [l] or [l, t] float32 (`propagate_transpose`).

        Accumulates K(E_chunk, E_L)^T w_chunk over non-landmark rows, solves once, and adds the
        landmark rows' own weights (their rows of C are unit vectors).
        """
        w, vec = self._columns(w, self.num_rows, "apply_transpose")
        c = self._matrix()
        if c is not None:
            w = self._pad(w)
            out = np.asarray(_matmul(c.T, jnp.asarray(w) if self.mesh is None else shd.put_rows(w, self.mesh)))
        else:
            own = w[self.landmarks]
            w = w.copy()
            w[self.landmarks] = 0.0
            acc = self._rep(jnp.zeros((self.num_landmarks, w.shape[1]), jnp.float32))
            for a, b in self._bar(self._spans(), "propagate^T", progress):
                acc = _kernel_apply_t(acc, self.state, self._load(self._x, a, b), self._load(w, a, b))
            out = np.asarray(_solve(self.state, acc)) + own
        return out[:, 0] if vec else out

    def dense(self) -> np.ndarray:
        """C itself, [N, l] float32 (N*l*4 bytes on the host: small problems and tests)."""
        c = self._matrix()
        if c is not None:
            return np.asarray(c)[: self.num_rows]
        out = np.empty((self.num_rows, self.num_landmarks), np.float32)
        for a, b in self._bar(self._spans(), "propagator: C", True):
            out[a:b] = np.asarray(_coefficients(self.state, self._load(self._x, a, b)))[: b - a]
        out[self.landmarks] = np.eye(self.num_landmarks, dtype=np.float32)
        return out

    def low_rank_matvec(self, q_l: Any) -> Callable[[Any], Any]:
        """w -> C (Q_L (C^T w)) (`low_rank_product`): the propagated second-order product, jittable
        (a jax.tree_util.Partial over device arrays: the weight solver compiles once for it).

        With C cached, it multiplies C. Otherwise E goes to the devices in row chunks (split over the
        mesh) and every product recomputes C's rows chunk by chunk (`streamed_low_rank_product`):
        N*e floats held instead of N*l, at twice the kernel work of building C per product.
        """
        q = np.asarray(q_l, dtype=np.float32)
        l = self.num_landmarks
        if q.shape != (l, l):
            raise ValueError(f"Propagator.low_rank_matvec: Q_L must be [{l}, {l}], got {q.shape}")
        c = self._matrix()
        if c is not None:
            return jax.tree_util.Partial(_padded_low_rank, c, self._rep(q))
        logger.info("Propagator: C [%d, %d] is over %.2f GiB per device: second-order products stream E",
                    self.num_rows, l, self.cache_bytes / (1 << 30))
        return jax.tree_util.Partial(streamed_low_rank_product, self.state, self._chunks_on_device(), self._rep(q))

    def _chunks_on_device(self) -> jax.Array:
        """E as [steps, chunk, e] float32 on the devices, each chunk's rows split over the mesh (zero rows
        pad the end), read from the store block by block; chunk: a K(E_chunk, E_L) block of at most
        STREAM_CHUNK_BYTES."""
        per = max(1, STREAM_CHUNK_BYTES // (4 * self.num_landmarks))
        chunk = shd.round_up(min(self.chunk_rows, per), self.mesh)
        steps = -(-self.num_rows // chunk)
        shape = (steps, chunk, self.dim)
        n = self.num_rows

        def block(index) -> np.ndarray:
            s0, s1, _ = index[0].indices(steps)
            r0, r1, _ = index[1].indices(chunk)
            return np.stack([read_rows(self._x, min(i * chunk + r0, n), min(i * chunk + r1, n), r1 - r0)
                             for i in range(s0, s1)])

        sharding = (jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if self.mesh is None
                    else shd.row_sharding(self.mesh, 3, axis=1))
        return jax.make_array_from_callback(shape, sharding, block)

    def __repr__(self) -> str:
        s = "" if self.bandwidth is None else f", bandwidth={self.bandwidth:.4g}"
        return (f"Propagator(kind={self.kind!r}, N={self.num_rows}, l={self.num_landmarks}, "
                f"delta={self.delta:g}{s}, cached={self.cached})")


def _padded_low_rank(c, q_l, w):
    """low_rank_product for a C whose rows are zero padded (a mesh's row split): w padded, result cut."""
    w = jnp.asarray(w, jnp.float32)
    n, extra = w.shape[0], c.shape[0] - w.shape[0]
    return low_rank_product(c, q_l, jnp.pad(w, (0, extra)) if extra else w)[:n]
