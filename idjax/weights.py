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
{d : sum d = 0}. `estimate_spectrum` therefore runs Lanczos on P Q P (P = I - 11^T/N): f is
convex on the simplex iff lam + eta * lambda_min(PQP) >= 0 (a weaker and exact version of
"eta*Q + lam*I is PSD"), and lambda_max(PQP) is the Lipschitz constant FISTA needs. With an
exact Hessian Q may be indefinite; `solve_weights` then refuses a lam that leaves the problem
non-convex, and `default_lam` gives one that does not.

Pass Q as `low_rank_matvec(C, Q_L)` (Q w = C (Q_L (C^T w)), docs/method.md section 4) or as any
jax.tree_util.Partial: its arrays are then traced arguments of the compiled solver rather than
constants baked into it, and the compiled solver is reused across calls. A plain function works
too (its closed-over arrays become constants, and a new function means a new compilation).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

logger = logging.getLogger(__name__)

Matvec = Callable[[jax.Array], jax.Array]

# Lanczos Ritz values lie inside the spectrum, so lambda_max is under-estimated, slightly after
# 32 steps; 10% more keeps the 1/L step safe at the cost of 10% more iterations at worst.
L_SAFETY = 1.1
# default_lam asks for 10% more ridge than the estimated convexity threshold -eta*lambda_min.
CONVEX_MARGIN = 0.1
# lam + eta*lambda_min counts as >= 0 when above -CONVEX_RTOL * (curvature scale): float32
# products of a PSD (e.g. low-rank Gauss-Newton) Q give lambda_min ~ -1e-7 * lambda_max.
CONVEX_RTOL = 1e-4
LANCZOS_STEPS = 32
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
# The curvature operator


def _low_rank_product(c: jax.Array, q_l: jax.Array, w: jax.Array) -> jax.Array:
    t = jnp.matmul(c.T, w, precision=_HIGHEST)
    return jnp.matmul(c, jnp.matmul(q_l, t, precision=_HIGHEST), precision=_HIGHEST)


def low_rank_matvec(c: jax.Array, q_l: jax.Array) -> jax.tree_util.Partial:
    """w -> C (Q_L (C^T w)) in O(N l) (docs/method.md 4): C (N, l) propagation, Q_L (l, l) landmarks."""
    c = jnp.asarray(c, jnp.float32)
    q_l = jnp.asarray(q_l, jnp.float32)
    if c.ndim != 2 or q_l.shape != (c.shape[1], c.shape[1]):
        raise ValueError(f"need C (N, l) and Q_L (l, l), got {c.shape} and {q_l.shape}")
    return jax.tree_util.Partial(_low_rank_product, c, q_l)


def _dense_product(q: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(q, w, precision=_HIGHEST)


def dense_matvec(q: jax.Array) -> jax.tree_util.Partial:
    """w -> Q w for an explicit (small) symmetric Q, as a Partial the compiled solver reuses."""
    q = jnp.asarray(q, jnp.float32)
    if q.ndim != 2 or q.shape[0] != q.shape[1]:
        raise ValueError(f"Q must be square, got shape {q.shape}")
    return jax.tree_util.Partial(_dense_product, q)


def _as_partial(matvec: Matvec) -> jax.tree_util.Partial:
    return matvec if isinstance(matvec, jax.tree_util.Partial) else jax.tree_util.Partial(matvec)


@functools.partial(jax.jit, static_argnames=("n", "steps"))
def _lanczos(matvec, key, n: int, steps: int):
    """Lanczos with full reorthogonalisation on P Q P restricted to the sum-zero subspace.

    Full reorthogonalisation keeps the basis V orthonormal, so the tridiagonal T is V^T (PQP) V
    and its eigenvalues (Ritz values) lie inside [lambda_min, lambda_max] whatever the round-off.
    When the Krylov space is exhausted (beta ~ 0: every distinct eigenvalue already found) the
    remaining steps produce zeros; the extra Ritz values 0 can only move the estimates towards 0,
    which neither raises a false non-convexity error nor lowers L below lam + eta*max(lmax, 0).
    """

    def op(x):
        y = jnp.asarray(matvec(x), jnp.float32)
        if y.shape != (n,):
            raise ValueError(f"matvec must map shape ({n},) to ({n},), got {y.shape}")
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
    return alphas, betas


def estimate_spectrum(matvec: Matvec, n: int, *, steps: int = LANCZOS_STEPS, seed: int = 0) -> tuple[float, float]:
    """(lambda_min, lambda_max) of Q on the sum-zero subspace, by `steps` Lanczos iterations.

    Both are inner estimates (lambda_min from above, lambda_max from below), converging fast at
    the two ends of the spectrum. Costs `steps` products with Q and steps * N floats of memory.
    Deterministic for a given seed. For N = 1 the subspace is {0}: returns (0, 0).
    """
    if n < 2:
        return 0.0, 0.0
    steps = min(int(steps), n - 1)
    alphas, betas = _lanczos(_as_partial(matvec), jax.random.key(seed, impl="threefry2x32"), n=n, steps=steps)
    alphas = np.asarray(alphas, np.float64)
    betas = np.asarray(betas, np.float64)
    t = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    ritz = np.linalg.eigvalsh(t)
    return float(ritz[0]), float(ritz[-1])


def _convex_lam(lmin: float, eta: float) -> float:
    """Smallest ridge, with CONVEX_MARGIN, for which lam + eta*lambda_min >= 0."""
    return (1.0 + CONVEX_MARGIN) * max(0.0, -eta * lmin)


def default_lam(p: jax.Array, matvec: Matvec | None, eta: float, k: int, *,
                lanczos_steps: int = LANCZOS_STEPS, seed: int = 0) -> float:
    """The ridge used when a user asks for k samples: max(lam_for_budget(p, k), convex lam).

    The budget term makes the first-order optimum pick the top-k; the convexity term,
    (1 + CONVEX_MARGIN) * max(0, -eta * lambda_min(Q)), is the smallest ridge that keeps f convex
    on the simplex with a 10% margin (0 for a PSD Q such as Gauss-Newton). It uses the same
    Lanczos estimate as `solve_weights`, so the returned lam always passes its convexity check.
    """
    lam = float(lam_for_budget(p, k))
    if matvec is None or eta == 0:
        return lam
    lmin, _ = estimate_spectrum(matvec, int(jnp.shape(p)[0]), steps=lanczos_steps, seed=seed)
    return max(lam, _convex_lam(lmin, eta))


# ---------------------------------------------------------------------------------------------
# The second-order solver


@functools.partial(jax.jit, static_argnames=("max_iter",))
def _fista(p, matvec, eta, lam, step, w0, tol, max_iter: int):
    """FISTA with gradient restart from w0; returns the best iterate seen.

    Returns (w, f(w), gap(w), converged, iterations).
    """
    n = p.shape[0]
    ulp_gap = jnp.finfo(jnp.float32).eps / step  # eps * L: gap worth one ulp of a unit weight

    def product(x):
        y = jnp.asarray(matvec(x), jnp.float32)
        if y.shape != (n,):
            raise ValueError(f"matvec must map shape ({n},) to ({n},), got {y.shape}")
        return y

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
    return best_x, best_f, best_gap, done(best_gap, target, best_floor), k


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

    matvec = _as_partial(matvec)
    lmin, lmax = estimate_spectrum(matvec, n, steps=lanczos_steps, seed=seed)
    curvature_scale = lam + eta * max(abs(lmin), abs(lmax))
    if lam + eta * lmin < -CONVEX_RTOL * curvature_scale:
        suggest = _convex_lam(lmin, eta)
        raise ValueError(
            f"the second-order weight problem is non-convex: lam + eta*lambda_min(Q) = {lam:.4g} + "
            f"{eta:.4g}*({lmin:.4g}) = {lam + eta * lmin:.4g} < 0 on the simplex (lambda_min by "
            f"Lanczos on the sum-zero subspace), so the solver has no global guarantee. Use "
            f"lam >= {suggest:.4g} (default_lam(p, matvec, eta, k) picks one that also fits the "
            f"budget k), or build Q from the Gauss-Newton Hessian, which is PSD.")
    step = 1.0 / (lam + L_SAFETY * eta * max(lmax, 0.0))

    if w0 is None:
        start = first_order_weights(p, lam)
    else:
        w0 = _check_vector("w0", w0)
        if w0.shape != p.shape:
            raise ValueError(f"w0 must have the shape of p, {p.shape}, got {w0.shape}")
        start = project_simplex(w0)

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    w, fx, gap, converged, iters = _fista(p, matvec, f32(eta), f32(lam), f32(step), start, f32(tol),
                                          max_iter=int(max_iter))
    gap, converged, iters = float(gap), bool(converged), int(iters)
    log = logger.info if converged else logger.warning
    log("second-order weights: N=%d, lambda(Q) in [%.4g, %.4g], %d iterations, gap %.3g, %s",
        n, lmin, lmax, iters, gap, "converged" if converged else "NOT converged")
    return WeightSolution(np.asarray(w), float(fx), iters, converged, gap, lam)
