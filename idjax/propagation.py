"""Propagation: landmark values carried to every row by a matrix C [N, l] (docs/method.md 4.4-4.5).

Exact influence quantities exist for l landmark rows only; C, built from cheap embeddings E [N, e]
and independent of the target, carries them to all rows: p_hat = C p_L, P_hat = C P_L,
Q_hat w = C (Q_L (C^T w)).

- KRR (`krr_fit`, the official one): C = K(E, E_L) (K_LL + delta * mean(diag K_LL) I)^-1 with
  K(x, y) = exp(-||x - y||^2 / (2 s^2)), s the median distance between distinct landmarks.
- Ridge (`ridge_fit`): C = E E_L^T (E_L E_L^T + delta * mean(diag(E_L E_L^T)) I)^-1, no intercept.
  The paper writes delta * I; the mean diagonal makes delta scale-free (for KRR it is 1).
A landmark keeps its exact value: its row of C is the unit vector e_j, so `propagate` and
`propagate_transpose` are exact transposes.

The core is pure (NamedTuple states, functions of arrays, usable inside a caller's jit / vmap).
`idjax.propagator.Propagator` is its shell for pools that do not fit: E streamed in row chunks from
any store, a device mesh, C cached on the devices when it fits, progress bars. float32 with HIGHEST matmul
precision (bf16 / TF32 destroy kernel distances), distances centred at the landmark mean.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("krr", "ridge")
_HI = lax.Precision.HIGHEST

# --- the pure core -------------------------------------------------------------------------------

class KRRState(NamedTuple):
    """A fitted RBF kernel ridge regression. landmarks [l] (the column order of C); centred
    E_L - mu [l, e]; sq_norms ||E_L - mu||^2 [l]; mean mu [e]; bandwidth s; chol: lower Cholesky
    factor of K_LL + delta * mean(diag K_LL) I."""

    landmarks: jax.Array
    centred: jax.Array
    sq_norms: jax.Array
    mean: jax.Array
    bandwidth: jax.Array
    chol: jax.Array

    def kernel(self, x: jax.Array) -> jax.Array:
        """K(x, E_L) [c, l] = exp(-||x - e_j||^2 / (2 s^2)), distances on centred data."""
        x = jnp.asarray(x, jnp.float32) - self.mean
        d2 = (jnp.sum(x * x, axis=1)[:, None] + self.sq_norms[None, :]
              - 2.0 * jnp.dot(x, self.centred.T, precision=_HI))
        return jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * self.bandwidth**2))


class RidgeState(NamedTuple):
    """A fitted linear ridge regression: landmarks [l], rows E_L [l, e], chol: lower Cholesky
    factor of E_L E_L^T + delta * mean(diag) I."""

    landmarks: jax.Array
    rows: jax.Array
    chol: jax.Array

    def kernel(self, x: jax.Array) -> jax.Array:
        """K(x, E_L) [c, l] = x E_L^T."""
        return jnp.dot(jnp.asarray(x, jnp.float32), self.rows.T, precision=_HI)


State = KRRState | RidgeState


def _squared_distances(centred: jax.Array, sq_norms: jax.Array) -> jax.Array:
    """||e_i - e_j||^2 between landmarks [l, l], diagonal exactly 0."""
    d2 = sq_norms[:, None] + sq_norms[None, :] - 2.0 * jnp.dot(centred, centred.T, precision=_HI)
    return jnp.where(jnp.eye(centred.shape[0], dtype=bool), 0.0, jnp.maximum(d2, 0.0))


#: The bandwidth's median is taken over the pairs of at most this many landmarks (a fixed subset):
#: l = 16384 would otherwise sort 134M distances and index them with host arrays of that size.
MEDIAN_LANDMARKS = 2048


def median_bandwidth(d2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(s, fallback): s = median distance over landmark pairs i < j; if 0 (duplicates), the median of
    the positive distances (fallback 1); if all landmarks coincide, s = 1 (fallback 2). Over more than
    MEDIAN_LANDMARKS landmarks, the pairs of a fixed random subset of that many (an estimate of the
    median from 2M distances)."""
    l = d2.shape[0]
    if l > MEDIAN_LANDMARKS:
        subset = np.sort(np.random.default_rng(0).choice(l, MEDIAN_LANDMARKS, replace=False))
        d2 = d2[subset][:, subset]
        l = MEDIAN_LANDMARKS
    dist_ = jnp.sqrt(d2[jnp.triu_indices(l, k=1)]) if l > 1 else jnp.zeros((0,), jnp.float32)
    if dist_.size == 0:
        return jnp.float32(1.0), jnp.int32(2)
    s = jnp.median(dist_)
    positive = jnp.nanmedian(jnp.where(dist_ > 0, dist_, jnp.nan))
    any_positive = jnp.any(dist_ > 0)
    fallback = jnp.where(s > 0, 0, jnp.where(any_positive, 1, 2)).astype(jnp.int32)
    return jnp.where(s > 0, s, jnp.where(any_positive, positive, 1.0)), fallback


def _cholesky(a: jax.Array, delta) -> jax.Array:
    """Lower Cholesky factor of a + delta * mean(diag a) I (NaN when not positive definite)."""
    a = a + delta * jnp.mean(jnp.diagonal(a)) * jnp.eye(a.shape[0], dtype=jnp.float32)
    return jnp.linalg.cholesky(a)


def krr_fit_landmarks(el, landmarks, delta, bandwidth):
    """krr_fit on the landmark rows E_L themselves; also returns median_bandwidth's fallback code."""
    el = jnp.asarray(el, jnp.float32)
    mu = jnp.mean(el, axis=0)
    centred = el - mu
    sq = jnp.sum(centred * centred, axis=1)
    d2 = _squared_distances(centred, sq)
    if bandwidth is None:
        s, fallback = median_bandwidth(d2)
    else:
        s, fallback = jnp.asarray(bandwidth, jnp.float32), jnp.int32(0)
    chol = _cholesky(jnp.exp(-d2 / (2.0 * s**2)), delta)
    return KRRState(jnp.asarray(landmarks), centred, sq, mu, s, chol), fallback


def ridge_fit_landmarks(el, landmarks, delta):
    """ridge_fit on the landmark rows E_L themselves."""
    el = jnp.asarray(el, jnp.float32)
    return RidgeState(jnp.asarray(landmarks), el, _cholesky(jnp.dot(el, el.T, precision=_HI), delta))


def krr_fit(embeddings: jax.Array, landmarks: jax.Array, *, delta=1e-2, bandwidth=None) -> KRRState:
    """Fit RBF kernel ridge regression on the landmark rows E_L = embeddings[landmarks].

    Factorises A = K_LL + delta * mean(diag K_LL) I once (Cholesky); bandwidth None takes the
    median landmark distance (`median_bandwidth`). A non-positive-definite A gives a NaN factor.
    """
    return krr_fit_landmarks(jnp.asarray(embeddings, jnp.float32)[landmarks], landmarks, delta, bandwidth)[0]


def ridge_fit(embeddings: jax.Array, landmarks: jax.Array, *, delta=1e-2) -> RidgeState:
    """Fit linear ridge regression on E_L = embeddings[landmarks]: A = E_L E_L^T + delta * mean(diag) I."""
    return ridge_fit_landmarks(jnp.asarray(embeddings, jnp.float32)[landmarks], landmarks, delta)


def landmark_solve(state: State, b: jax.Array) -> jax.Array:
    """A^-1 b with the fitted Cholesky factor."""
    return jax.scipy.linalg.cho_solve((state.chol, True), jnp.asarray(b, jnp.float32))


def coefficients(state: State, x: jax.Array) -> jax.Array:
    """The regression rows K(x, E_L) A^-1 [c, l] (without the exact landmark rows)."""
    return landmark_solve(state, state.kernel(x).T).T


def _column(values):
    values = jnp.asarray(values, jnp.float32)
    return (values[:, None], True) if values.ndim == 1 else (values, False)


def propagate(state: State, embeddings: jax.Array, values: jax.Array) -> jax.Array:
    """C values: landmark values [l] or [l, t] (landmark order) -> [N] or [N, t]; exact on landmarks."""
    v, vec = _column(values)
    out = jnp.dot(state.kernel(embeddings), landmark_solve(state, v), precision=_HI)
    out = out.at[state.landmarks].set(v)
    return out[:, 0] if vec else out


def propagate_transpose(state: State, embeddings: jax.Array, w: jax.Array) -> jax.Array:
    """C^T w: w [N] or [N, t] -> [l] or [l, t]; landmark rows contribute their own weight exactly."""
    w, vec = _column(w)
    own = w[state.landmarks]
    rest = w.at[state.landmarks].set(0.0)
    out = landmark_solve(state, jnp.dot(state.kernel(embeddings).T, rest, precision=_HI)) + own
    return out[:, 0] if vec else out


def coefficient_matrix(state: State, embeddings: jax.Array) -> jax.Array:
    """C [N, l] itself: the regression rows, with unit rows e_j at the landmarks."""
    c = coefficients(state, embeddings)
    return c.at[state.landmarks].set(jnp.eye(state.landmarks.shape[0], dtype=jnp.float32))


def low_rank_product(c: jax.Array, q_l: jax.Array, w: jax.Array) -> jax.Array:
    """C (Q_L (C^T w)): the propagated second-order product Q_hat w in O(N l) (docs/method.md 4.4)."""
    t = jnp.matmul(c.T, w, precision=_HI)
    return jnp.matmul(c, jnp.matmul(q_l, t, precision=_HI), precision=_HI)


def streamed_low_rank_product(state: State, embeddings: jax.Array, q_l: jax.Array, w: jax.Array, *,
                              chunk_rows: int = 4096) -> jax.Array:
    """low_rank_product without C: two passes over row chunks of E [N, e] (or [steps, chunk, e], already
    in chunks), each recomputing K(E_chunk, E_L). Memory O(chunk_rows * l) instead of C's N * l, for
    twice the kernel evaluations of building C; the same product (landmark rows exact). w: [N]."""
    x = jnp.asarray(embeddings, jnp.float32)
    if x.ndim == 2:
        n = x.shape[0]
        steps = -(-n // chunk_rows)
        x = jnp.pad(x, ((0, steps * chunk_rows - n), (0, 0))).reshape(steps, chunk_rows, x.shape[1])
    steps, size = x.shape[:2]
    w = jnp.asarray(w, jnp.float32)
    n = w.shape[0]
    own = w[state.landmarks]
    rest = jnp.pad(w.at[state.landmarks].set(0.0), (0, steps * size - n)).reshape(steps, size)

    def transpose_step(acc, xs):
        rows, wc = xs
        return acc + jnp.dot(state.kernel(rows).T, wc, precision=_HI), None

    acc, _ = lax.scan(transpose_step, jnp.zeros(state.landmarks.shape, jnp.float32), (x, rest))
    z = jnp.dot(q_l, landmark_solve(state, acc) + own, precision=_HI)
    alpha = landmark_solve(state, z)
    out = lax.map(lambda rows: jnp.dot(state.kernel(rows), alpha, precision=_HI), x).reshape(-1)[:n]
    return out.at[state.landmarks].set(z)
