"""The curvature operator Q of the weight problem (docs/method.md 3, 4.3): applied without forming
N x N, and its spectrum on the simplex's sum-zero subspace estimated by Lanczos.

Q is passed around as a function w -> Q w, ideally a jax.tree_util.Partial (`low_rank_matvec`,
`dense_matvec`, `as_operator`), whose arrays are then traced arguments of a compiled solver.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from idjax.propagation import low_rank_product

Matvec = Callable[[jax.Array], jax.Array]
LANCZOS_STEPS = 32
_HIGHEST = lax.Precision.HIGHEST


def low_rank_matvec(c: jax.Array, q_l: jax.Array) -> jax.tree_util.Partial:
    """w -> C (Q_L (C^T w)) in O(N l) (`propagation.low_rank_product`): C (N, l), Q_L (l, l)."""
    c = jnp.asarray(c, jnp.float32)
    q_l = jnp.asarray(q_l, jnp.float32)
    if c.ndim != 2 or q_l.shape != (c.shape[1], c.shape[1]):
        raise ValueError(f"need C (N, l) and Q_L (l, l), got {c.shape} and {q_l.shape}")
    return jax.tree_util.Partial(low_rank_product, c, q_l)


def _dense_product(q: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(q, w, precision=_HIGHEST)


def dense_matvec(q: jax.Array) -> jax.tree_util.Partial:
    """w -> Q w for an explicit (small) symmetric Q, as a Partial the compiled solver reuses."""
    q = jnp.asarray(q, jnp.float32)
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"Q must be square, got shape {q.shape}")
    return jax.tree_util.Partial(_dense_product, q)


def as_operator(matvec: Matvec) -> jax.tree_util.Partial:
    """A matvec as a Partial: its arrays become traced arguments, so a compiled solver is reused."""
    return matvec if isinstance(matvec, jax.tree_util.Partial) else jax.tree_util.Partial(matvec)


def apply_operator(matvec: Matvec, x: jax.Array, n: int) -> jax.Array:
    """Q x as float32 (n,), its shape checked (a wrong matvec fails at trace time, with its shapes)."""
    y = jnp.asarray(matvec(x), jnp.float32)
    if y.shape != (n,):
        raise ValueError(f"matvec must map shape ({n},) to ({n},), got {y.shape}")
    return y


def lanczos_spectrum(matvec: Matvec, *, size: int, key: jax.Array,
                     steps: int = LANCZOS_STEPS) -> tuple[jax.Array, jax.Array]:
    """(lambda_min, lambda_max) of Q on the sum-zero subspace: Lanczos on P Q P, P = I - 11^T/N.

    Inner estimates (lambda_min from above, lambda_max from below) from min(steps, size - 1)
    steps with full reorthogonalisation: the basis stays orthonormal, so the Ritz values (the
    eigenvalues of the tridiagonal T = V^T PQP V) lie inside the spectrum whatever the round-off.
    When the Krylov space is exhausted (beta ~ 0) the remaining steps give zeros, which can only
    move the estimates towards 0. size and steps are static; key seeds the start vector. Size 1:
    the subspace is {0}, (0, 0).
    """
    n = int(size)
    if n < 2:
        return jnp.float32(0.0), jnp.float32(0.0)
    steps = min(int(steps), n - 1)

    def op(x):
        y = apply_operator(matvec, x, n)
        return y - jnp.mean(y)

    def orthogonalise(w, basis):
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            w = w - jnp.matmul(basis.T, jnp.matmul(basis, w, precision=_HIGHEST), precision=_HIGHEST)
        return w

    v = jax.random.normal(key, (n,), jnp.float32)
    v = v - jnp.mean(v)
    v = v / jnp.linalg.norm(v)

    def body(j, carry):
        basis, v, alphas, betas, scale = carry
        basis = basis.at[j].set(v)
        w = op(v)
        a = jnp.dot(w, v)
        w = orthogonalise(w, basis)
        b = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(a), b))
        exhausted = b <= 1e-6 * scale
        b = jnp.where(exhausted, 0.0, b)
        v_next = jnp.where(exhausted, 0.0, w / jnp.where(exhausted, 1.0, b))
        return basis, v_next, alphas.at[j].set(a), betas.at[j].set(b), scale

    init = (jnp.zeros((steps, n), jnp.float32), v, jnp.zeros(steps, jnp.float32),
            jnp.zeros(steps, jnp.float32), jnp.float32(0.0))
    _, _, alphas, betas, _ = lax.fori_loop(0, steps, body, init)
    t = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz = jnp.linalg.eigvalsh(t)
    return ritz[0], ritz[-1]


_spectrum = jax.jit(lanczos_spectrum, static_argnames=("size", "steps"))


def seed_key(seed: int) -> jax.Array:
    """The PRNG key of an int seed (threefry, whatever the default implementation)."""
    return jax.random.key(int(seed), impl="threefry2x32")


def estimate_spectrum(matvec: Matvec, n: int, *, steps: int = LANCZOS_STEPS, seed: int = 0) -> tuple[float, float]:
    """`lanczos_spectrum` as host floats, from the key jax.random.key(seed) (threefry).

    Costs `steps` products with Q and steps * N floats of memory; fast at both spectrum ends.
    """
    lmin, lmax = _spectrum(as_operator(matvec), size=int(n), key=seed_key(seed), steps=int(steps))
    return float(lmin), float(lmax)
