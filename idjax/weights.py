"""Optimal sample weights on the probability simplex, docs/method.md section 3.

The problem
-----------
With per-sample scores p (N,) and a symmetric curvature operator Q (N x N, known only through
products w -> Q w), the weights that most reduce the second-order model of the target loss after
one optimizer step (divided by the learning rate eta) solve

    min_{w >= 0, sum w = 1}  f(w) = -p^T w + (eta/2) w^T Q w + (lam/2) ||w||^2.

lam > 0 is a ridge: it keeps the minimiser unique and spreads the weight over more samples.

First order (Q dropped): the minimiser is w_i = max(0, (p_i - tau)/lam) with tau fixed by
sum w = 1, i.e. the Euclidean projection of p/lam onto the simplex. Its support is the top of p,
and `lam_for_budget(p, k)` gives the lam whose support is the top-k: that is how a budget of k
samples becomes a lam.

Second order: FISTA (accelerated projected gradient, Beck & Teboulle 2009) with adaptive
restart (O'Donoghue & Candes 2015), inside one jitted `lax.while_loop`:
  * one Q-product per iteration: Q y at the extrapolated point is a linear combination of the
    products at the last two iterates, which are kept;
  * the projection onto the simplex sorts, O(N log N), with nothing N x N, so N = 1e6 is fine;
  * the step is 1/L with L = lam + L_SAFETY * eta * lambda_max, lambda_max from a Lanczos
    estimate; the momentum restarts whenever the step turns against it;
  * it stops when the Frank-Wolfe duality gap g^T w - min_i g_i (g = grad f(w)) is at most
    tol times the magnitude of f's largest term, or reaches the float32 floor eps * L * max(w)
    (below it a step moves the largest weight by less than one ulp, and the gap stops falling:
    badly conditioned problems hit this first), and returns the iterate with the smallest gap.
    For convex f the gap bounds f(w) - f*, so it is a certificate however the loop ended.

Curvature only matters along directions that stay on the simplex, the sum-zero subspace
{d : sum d = 0}. `lanczos_spectrum` therefore runs Lanczos on P Q P (P = I - 11^T/N): f is
convex on the simplex iff lam + eta * lambda_min(PQP) >= 0 (a weaker and exact version of
"eta*Q + lam*I is PSD"), and lambda_max(PQP) is the Lipschitz constant FISTA needs. With an
exact Hessian Q may be indefinite; `solve_weights` then refuses a lam that leaves the problem
non-convex, and `default_lam` gives one that does not.

Pass Q as `low_rank_matvec(C, Q_L)` (Q w = C (Q_L (C^T w)), docs/method.md section 4) or as any
jax.tree_util.Partial: its arrays are then traced arguments of the compiled solver rather than
constants baked into it, and the compiled solver is reused across calls. A plain function works
too (its closed-over arrays become constants, and a new function means a new compilation).

Two layers. The core is pure and jittable (keys instead of seeds, diagnostics as arrays, usable
inside a caller's jit / vmap): `project_simplex`, `first_order_weights`, `lam_for_budget`,
`convexity_lam`, `second_order_lam`, `fista_weights`, `second_order_weights`. The host shell
checks values, raises on a non-convex problem, logs, and returns floats: `default_lam`,
`solve_weights` (the same compiled core, so the same numbers). The operator Q and its spectrum
(`low_rank_matvec`, `dense_matvec`, `lanczos_spectrum`, `estimate_spectrum`) are in
idjax/curvature.py; the scores p in idjax/scores.py.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from idjax.curvature import (LANCZOS_STEPS, Matvec, apply_operator, as_operator, estimate_spectrum,
                             lanczos_spectrum, seed_key)

logger = logging.getLogger(__name__)


# Lanczos Ritz values lie inside the spectrum, so lambda_max is under-estimated, slightly after
# 32 steps; 10% more keeps the 1/L step safe at the cost of 10% more iterations at worst.
L_SAFETY = 1.1
# default_lam asks for 10% more ridge than the estimated convexity threshold -eta*lambda_min.
CONVEX_MARGIN = 0.1
# lam + eta*lambda_min counts as >= 0 when above -CONVEX_RTOL * (curvature scale): float32
# products of a PSD (e.g. low-rank Gauss-Newton) Q give lambda_min ~ -1e-7 * lambda_max.
CONVEX_RTOL = 1e-4
_HIGHEST = lax.Precision.HIGHEST


@dataclass(frozen=True)
class WeightSolution:
    """Result of `solve_weights`.

    weights: float32 (N,) on the simplex. objective: f(weights). iterations: FISTA iterations (0
    for the closed form). converged: the stopping test of `solve_weights` was met (False: stopped
    at max_iter). gap: Frank-Wolfe duality gap at weights, >= f(weights) - f* when f is convex
    (0 for the exact first-order closed form). lam: the ridge that was used.
    """

    weights: np.ndarray
    objective: float
    iterations: int
    converged: bool
    gap: float
    lam: float


# ---------------------------------------------------------------------------------------------
# Projection onto the simplex and the first-order closed form


def _threshold(u: jax.Array, z: jax.Array) -> jax.Array:
    """tau with sum(max(u - tau, 0)) = z (z > 0): sort, then one Newton step.

    Sorted descending, entry j (1-based) is in the support iff s_j > (cumsum_j - z) / j, which
    holds for a prefix of s; tau = (cumsum_m - z) / m for the last such m. A float32 cumsum of
    1e5..1e6 terms is off by ~1e-6 relative, which moves tau and the support's edge; one Newton
    step on the piecewise-linear sum(max(u - tau, 0)) - z (exact once the support is right)
    brings the weights back to ~1e-7 of a float64 reference.
    """
    n = u.shape[0]
    s = jnp.sort(u)[::-1]
    css = jnp.cumsum(s)
    j = jnp.arange(1, n + 1, dtype=u.dtype)
    last = jnp.max(jnp.where(s * j > css - z, jnp.arange(n), 0))  # j = 1 always qualifies
    tau = (css[last] - z) / (last + 1).astype(u.dtype)
    active = u > tau
    excess = jnp.sum(jnp.where(active, u - tau, 0.0)) - z
    return tau + excess / jnp.maximum(jnp.sum(active), 1).astype(u.dtype)


def _project(v: jax.Array, z: jax.Array) -> jax.Array:
    """Projection of v onto {w >= 0, sum w = z}, rescaled to sum exactly 1 (i.e. divided by z).

    Shifting by max(v) first (the projection commutes with adding a constant) keeps the sorted
    cumsum small and well conditioned; the final division fixes the last float32 ulp of the sum.
    """
    u = v - jnp.max(v)
    w = jnp.maximum(u - _threshold(u, z), 0.0)
    return w / jnp.sum(w)


def _check_vector(name: str, v) -> jax.Array:
    v = jnp.asarray(v, jnp.float32)
    if v.ndim != 1 or v.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {v.shape}")
    return v


@jax.jit
def project_simplex(v: jax.Array) -> jax.Array:
    """Euclidean projection of a 1-D vector onto the probability simplex, float32, O(N log N)."""
    v = _check_vector("v", v)
    return _project(v, jnp.float32(1.0))


@jax.jit
def _first_order(p: jax.Array, lam: jax.Array) -> jax.Array:
    # max(0, (p - tau)/lam) summing to 1 is proj(p, radius lam) / lam: no division of p by a
    # possibly tiny lam, so no overflow.
    return _project(p, lam)


def _concrete(x) -> float | None:
    """float(x), or None when x is a tracer (inside jit the caller's checks cannot run)."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_lam(lam) -> None:
    value = _concrete(lam)
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"lam must be finite and > 0, got {value}")


def first_order_weights(p: jax.Array, lam) -> jax.Array:
    """Minimiser of -p^T w + (lam/2)||w||^2 on the simplex: w = max(0, (p - tau)/lam), sum 1.

    Equal to project_simplex(p / lam). Jittable (lam may be traced; it is validated when not).
    """
    p = _check_vector("p", p)
    _check_lam(lam)
    return _first_order(p, jnp.asarray(lam, jnp.float32))


def _check_k(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"k must be an integer number of samples, got {k!r}")
    if not 1 <= int(k) <= n:
        raise ValueError(f"k must satisfy 1 <= k <= N = {n}, got {int(k)}")
    return int(k)


def lam_for_budget(p: jax.Array, k: int) -> jax.Array:
    """The ridge lam whose first-order optimum is supported on the top-k of p (float32 scalar).

    Rule: tau = the largest score strictly below p_(k) (the k-th largest), and
    lam = sum_i max(p_i - tau, 0). Without ties this is docs/method.md's tau = p_(k+1),
    lam = sum_{i<=k} (p_(i) - p_(k+1)): the largest lam with support exactly the top-k (the
    (k+1)-th sample sits at weight 0). The degenerate cases:
      * p_(k) tied with p_(k+1): no lam separates tied samples, so the whole tie joins the
        support (more than k samples, tied ones with equal weight; selecting top-k by weight
        then picks among equals, never below them);
      * no score below p_(k) (k = N, or p_(k) = min p): every sample is in the support; tau is
        taken as min(p) - (mean(p) - min(p)), i.e. lam = 2 * sum(p - min p), which gives the
        lowest-scored sample half the average weight, 1/(2N);
      * all scores equal: any lam gives uniform weights; lam = max|p| (1 when p = 0).
    k must be an int with 1 <= k <= N (ValueError otherwise). Jittable with k static.
    """
    p = _check_vector("p", p)
    k = _check_k(k, p.shape[0])
    pk = lax.top_k(p, k)[0][k - 1]
    below = p < pk
    tau = jnp.where(jnp.any(below), jnp.max(jnp.where(below, p, -jnp.inf)), 2 * jnp.min(p) - jnp.mean(p))
    lam = jnp.sum(jnp.maximum(p - tau, 0.0))
    scale = jnp.max(jnp.abs(p))
    return jnp.where(lam > 0, lam, jnp.where(scale > 0, scale, 1.0))


# ---------------------------------------------------------------------------------------------
# The ridge


def convexity_lam(lambda_min, eta):
    """(1 + CONVEX_MARGIN) * max(0, -eta * lambda_min): the smallest ridge keeping f convex on the
    simplex (lam + eta*lambda_min >= 0), with a 10% margin. 0 for a PSD Q (Gauss-Newton)."""
    return (1.0 + CONVEX_MARGIN) * jnp.maximum(0.0, -jnp.asarray(eta, jnp.float32) * lambda_min)


def second_order_lam(p: jax.Array, matvec: Matvec, *, eta, k: int, key: jax.Array,
                     lanczos_steps: int = LANCZOS_STEPS) -> jax.Array:
    """max(lam_for_budget(p, k), convexity_lam(lambda_min(Q), eta)), jittable (k, steps static).

    The budget term makes the first-order optimum pick the top-k; the convexity term uses the
    Lanczos estimate `second_order_weights` uses with the same key, so it passes its check.
    """
    lmin, _ = lanczos_spectrum(matvec, size=jnp.shape(p)[0], key=key, steps=lanczos_steps)
    return jnp.maximum(lam_for_budget(p, k), convexity_lam(lmin, eta))


_second_order_lam = jax.jit(second_order_lam, static_argnames=("k", "lanczos_steps"))


def default_lam(p: jax.Array, matvec: Matvec | None, eta: float, k: int, *,
                lanczos_steps: int = LANCZOS_STEPS, seed: int = 0) -> float:
    """The ridge used when a user asks for k samples, as a host float: `lam_for_budget` without
    curvature (matvec None or eta 0), else `second_order_lam` with the key of `seed`."""
    if matvec is None or eta == 0:
        return float(lam_for_budget(p, k))
    p = _check_vector("p", p)
    _check_k(k, p.shape[0])
    return float(_second_order_lam(p, as_operator(matvec), eta=jnp.float32(eta), k=int(k),
                                   key=seed_key(seed), lanczos_steps=int(lanczos_steps)))


# ---------------------------------------------------------------------------------------------
# The second-order solver


class SolverResult(NamedTuple):
    """Arrays from `fista_weights` / `second_order_weights`: weights (N,) on the simplex, objective
    f(weights), gap (Frank-Wolfe duality gap at weights, >= f - f* when f is convex), converged
    (the stopping test was met), iterations."""

    weights: jax.Array
    objective: jax.Array
    gap: jax.Array
    converged: jax.Array
    iterations: jax.Array


def fista_weights(p: jax.Array, matvec: Matvec, *, eta, lam, lambda_max, w0: jax.Array | None = None,
                  tol=1e-6, max_iter=10_000) -> SolverResult:
    """Minimise f(w) = -p^T w + (eta/2) w^T Q w + (lam/2)||w||^2 on the simplex by FISTA.

    Step 1/L with L = lam + L_SAFETY * eta * max(lambda_max, 0); gradient restart; one Q-product
    per iteration; starts from w0 projected onto the simplex (default: the first-order optimum).
    Stops when the duality gap is <= tol * (largest term of f), or at the float32 floor
    eps * L * max(w), or after max_iter iterations; returns the iterate with the smallest gap.
    Everything may be traced (one lax.while_loop): jittable and vmappable.
    """
    p = _check_vector("p", p)
    eta, lam, tol = (jnp.asarray(x, jnp.float32) for x in (eta, lam, tol))
    step = 1.0 / (lam + L_SAFETY * eta * jnp.maximum(jnp.asarray(lambda_max, jnp.float32), 0.0))
    w0 = _first_order(p, lam) if w0 is None else _project(_check_vector("w0", w0), jnp.float32(1.0))
    n = p.shape[0]
    ulp_gap = jnp.finfo(jnp.float32).eps / step  # eps * L: gap worth one ulp of a unit weight

    def product(x):
        return apply_operator(matvec, x, n)

    def measure(x, qx):
        """f(x), its duality gap, and the float32 floor of that gap."""
        lin = jnp.dot(p, x)
        quad = 0.5 * eta * jnp.dot(x, qx)
        ridge = 0.5 * lam * jnp.dot(x, x)
        f = -lin + quad + ridge
        g = -p + eta * qx + lam * x
        gap = jnp.dot(x, g - jnp.min(g))  # a sum of non-negative terms: >= 0 in floating point too
        scale = jnp.maximum(jnp.maximum(jnp.abs(lin), jnp.abs(quad)), jnp.maximum(ridge, jnp.abs(f)))
        return f, gap, tol * scale, ulp_gap * jnp.max(x)

    def done(gap, target, floor):
        return gap <= jnp.maximum(target, floor)

    qx0 = product(w0)
    f0, gap0, target0, floor0 = measure(w0, qx0)
    one = jnp.float32(1.0)
    # (k, x, Qx, x_prev, Qx_prev, t, beta, best_x, best_f, best_gap, best_floor, best_target)
    init = (jnp.int32(0), w0, qx0, w0, qx0, one, jnp.float32(0.0), w0, f0, gap0, floor0, target0)

    def cond(s):
        k, *_, best_gap, best_floor, target = s
        return (k < max_iter) & ~done(best_gap, target, best_floor)

    def body(s):
        k, x, qx, x_prev, qx_prev, t, beta, best_x, best_f, best_gap, best_floor, target = s
        y = x + beta * (x - x_prev)
        qy = qx + beta * (qx - qx_prev)  # Q is linear: no extra product
        x_new = _project(y - step * (-p + eta * qy + lam * y), one)
        qx_new = product(x_new)
        # Gradient restart (O'Donoghue & Candes): drop the momentum when the step opposes it.
        # (The function-value test is not used: near the optimum f changes below float32
        # resolution and its noise would restart every iteration.)
        restart = jnp.dot(y - x_new, x_new - x) > 0
        t_cur = jnp.where(restart, one, t)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t_cur * t_cur))
        f_new, gap_new, target_new, floor_new = measure(x_new, qx_new)
        keep = gap_new < best_gap  # the gap is not monotone under momentum: keep the best iterate
        return (k + 1, x_new, qx_new, x, qx, t_new, (t_cur - 1.0) / t_new,
                jnp.where(keep, x_new, best_x), jnp.where(keep, f_new, best_f),
                jnp.where(keep, gap_new, best_gap), jnp.where(keep, floor_new, best_floor),
                jnp.where(keep, target_new, target))

    k, *_, best_x, best_f, best_gap, best_floor, target = lax.while_loop(cond, body, init)
    return SolverResult(best_x, best_f, best_gap, done(best_gap, target, best_floor), k)


def second_order_weights(p: jax.Array, matvec: Matvec, *, eta, lam, key: jax.Array,
                         w0: jax.Array | None = None, tol=1e-6, max_iter=10_000,
                         lanczos_steps: int = LANCZOS_STEPS) -> SolverResult:
    """`fista_weights` with lambda_max from `lanczos_spectrum` (key seeds its start vector).

    Jittable (lanczos_steps static). No convexity check happens here: give lam >=
    `second_order_lam` (or a PSD Q), or use the host `solve_weights`, which refuses a non-convex f.
    """
    _, lmax = lanczos_spectrum(matvec, size=jnp.shape(p)[0], key=key, steps=lanczos_steps)
    return fista_weights(p, matvec, eta=eta, lam=lam, lambda_max=lmax, w0=w0, tol=tol, max_iter=max_iter)


_fista = jax.jit(fista_weights)




def _positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be finite and {'>=' if allow_zero else '>'} 0, got {value}")
    return value


def solve_weights(p: jax.Array, matvec: Matvec | None = None, *, eta: float = 1.0, lam: float,
                  max_iter: int = 10_000, tol: float = 1e-6, w0: jax.Array | None = None,
                  lanczos_steps: int = LANCZOS_STEPS, seed: int = 0) -> WeightSolution:
    """Minimise f(w) = -p^T w + (eta/2) w^T Q w + (lam/2)||w||^2 over the simplex.

    matvec None (or eta 0): the first-order closed form, gap 0. Otherwise FISTA from w0 (default:
    the first-order optimum; a given w0 is projected onto the simplex) until the duality gap is
    <= tol * max(|f|, |p^T w|, eta/2 |w^T Q w|, lam/2 ||w||^2), the largest term of f (a
    scale-free test: scaling p, Q and lam together changes nothing), or has reached float32
    resolution (about eps * L * max(w), which badly conditioned problems hit first), or
    max_iter iterations. Raises ValueError when lam + eta * lambda_min(Q) < 0 on the simplex
    (non-convex; the message suggests a lam). `seed` only seeds the Lanczos start vector.
    """
    p = _check_vector("p", p)
    n = p.shape[0]
    if not bool(jnp.all(jnp.isfinite(p))):
        raise ValueError("p has non-finite entries")
    lam = _positive_float("lam", lam)
    eta = _positive_float("eta", eta, allow_zero=True)
    tol = _positive_float("tol", tol)
    if int(max_iter) < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")

    if matvec is None or eta == 0.0 or n == 1:
        w = first_order_weights(p, lam)
        if matvec is not None and n == 1:  # the simplex is one point; f still has the Q term
            fx = float(-p[0] + 0.5 * eta * jnp.asarray(matvec(w), jnp.float32)[0] + 0.5 * lam)
        else:
            fx = float(-jnp.dot(p, w) + 0.5 * lam * jnp.dot(w, w))
        return WeightSolution(np.asarray(w), fx, 0, True, 0.0, lam)

    matvec = as_operator(matvec)
    lmin, lmax = estimate_spectrum(matvec, n, steps=int(lanczos_steps), seed=seed)
    curvature_scale = lam + eta * max(abs(lmin), abs(lmax))
    if lam + eta * lmin < -CONVEX_RTOL * curvature_scale:
        suggest = float(convexity_lam(lmin, eta))
        raise ValueError(
            f"the second-order weight problem is non-convex: lam + eta*lambda_min(Q) = {lam:.4g} + "
            f"{eta:.4g}*({lmin:.4g}) = {lam + eta * lmin:.4g} < 0 on the simplex (lambda_min by "
            f"Lanczos on the sum-zero subspace), so the solver has no global guarantee. Use "
            f"lam >= {suggest:.4g} (default_lam(p, matvec, eta, k) picks one that also fits the "
            f"budget k), or build Q from the Gauss-Newton Hessian, which is PSD.")
    if w0 is not None:
        w0 = _check_vector("w0", w0)
        if w0.shape != p.shape:
            raise ValueError(f"w0 must have the shape of p, {p.shape}, got {w0.shape}")

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    res = _fista(p, matvec, eta=f32(eta), lam=f32(lam), lambda_max=f32(lmax), w0=w0, tol=f32(tol),
                 max_iter=jnp.int32(max_iter))
    gap, converged, iters = float(res.gap), bool(res.converged), int(res.iterations)
    log = logger.info if converged else logger.warning
    log("second-order weights: N=%d, lambda(Q) in [%.4g, %.4g], %d iterations, gap %.3g, %s",
        n, lmin, lmax, iters, gap, "converged" if converged else "NOT converged")
    return WeightSolution(np.asarray(res.weights), float(res.objective), iters, converged, gap, lam)
