"""Optimal weights on the simplex (idjax.weights) against independent float64 references.

References: tau by bisection (not the sorted formula the module uses), scipy SLSQP on the
simplex from several starts, numpy eigenvalues of P Q P on the sum-zero subspace.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from idjax import curvature as Op
from idjax import weights as W


# ---------------------------------------------------------------------------------------------
# references


def simplex_by_bisection(v, z=1.0):
    """Projection onto {w >= 0, sum w = z} / z, tau found by float64 bisection."""
    v = np.asarray(v, np.float64)
    lo, hi = v.min() - z, v.max()  # sum(max(v - lo, 0)) >= z >= sum(max(v - hi, 0)) = 0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.maximum(v - mid, 0).sum() > z:
            lo = mid
        else:
            hi = mid
    return np.maximum(v - 0.5 * (lo + hi), 0) / z


def objective(p, Q, eta, lam, w):
    w = np.asarray(w, np.float64)
    quad = 0.0 if Q is None else w @ Q @ w
    return -p @ w + 0.5 * eta * quad + 0.5 * lam * w @ w


def slsqp(p, Q, eta, lam, rng, starts=2):
    """Best of several SLSQP runs of f over the simplex, float64."""
    n = len(p)
    Qm = np.zeros((n, n)) if Q is None else Q

    def fun(w):
        return -p @ w + 0.5 * eta * w @ Qm @ w + 0.5 * lam * w @ w

    def jac(w):
        return -p + eta * Qm @ w + lam * w

    cons = [{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(n)}]
    best = None
    for s in range(starts):
        x0 = np.full(n, 1.0 / n) if s == 0 else rng.dirichlet(np.ones(n))
        r = minimize(fun, x0, jac=jac, method="SLSQP", bounds=[(0.0, None)] * n, constraints=cons,
                     options={"ftol": 1e-15, "maxiter": 2000})
        if best is None or r.fun < best.fun:
            best = r
    return np.clip(best.x, 0, None), float(best.fun)


def tangent_eigs(Q):
    """Eigenvalues of Q restricted to {sum d = 0}, via an orthonormal basis of that subspace."""
    n = Q.shape[0]
    basis = np.linalg.qr(np.eye(n) - 1.0 / n)[0][:, : n - 1]
    return np.linalg.eigvalsh(basis.T @ Q @ basis)


def check_on_simplex(w, atol=1e-6):
    w = np.asarray(w)
    assert w.dtype == np.float32
    assert np.all(w >= 0)
    assert abs(float(w.astype(np.float64).sum()) - 1.0) < atol


# ---------------------------------------------------------------------------------------------
# projection


def _projection_cases():
    rng = np.random.default_rng(0)
    yield "single", np.array([-3.0])
    yield "pair", np.array([0.2, 0.1])
    yield "normal", rng.normal(size=50)
    yield "negative", rng.normal(size=30) - 100.0
    yield "ties", rng.integers(-3, 3, size=40).astype(np.float64)
    yield "all_equal", np.full(17, 2.5)
    yield "wide", rng.normal(size=60) * 10.0 ** rng.integers(-3, 3, size=60)
    yield "spread", np.linspace(0.0, 0.05, 25)  # support is a proper subset far from the max


@pytest.mark.parametrize("name,v", list(_projection_cases()), ids=[c[0] for c in _projection_cases()])
def test_project_simplex_matches_bisection(name, v):
    v32 = v.astype(np.float32)
    w = np.asarray(W.project_simplex(v32))
    check_on_simplex(w)
    np.testing.assert_allclose(w, simplex_by_bisection(v32), atol=2e-6)


def test_project_simplex_matches_slsqp_and_ranks():
    rng = np.random.default_rng(1)
    for _ in range(3):
        v = rng.normal(size=8)
        ref = minimize(lambda w: np.sum((w - v) ** 2), np.full(8, 1 / 8), jac=lambda w: 2 * (w - v),
                       method="SLSQP", bounds=[(0, None)] * 8,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                       options={"ftol": 1e-15, "maxiter": 500}).x
        w = np.asarray(W.project_simplex(v.astype(np.float32)))
        np.testing.assert_allclose(w, ref, atol=1e-5)
        # the projection preserves order: a larger entry never gets a smaller weight
        order = np.argsort(v)
        assert np.all(np.diff(w[order]) >= -1e-7)


def test_project_simplex_rejects_bad_shapes():
    with pytest.raises(ValueError, match="1-D"):
        W.project_simplex(np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="non-empty"):
        W.project_simplex(np.ones(0, np.float32))


# ---------------------------------------------------------------------------------------------
# first order


@pytest.mark.parametrize("n", [5, 13, 40])
def test_first_order_matches_slsqp(n):
    rng = np.random.default_rng(n)
    for _ in range(2):
        p = rng.normal(size=n)
        lam = float(rng.uniform(0.05, 3.0))
        ref_w, ref_f = slsqp(p, None, 0.0, lam, rng)
        w = np.asarray(W.first_order_weights(p.astype(np.float32), lam))
        check_on_simplex(w)
        np.testing.assert_allclose(w, ref_w, atol=1e-5)
        np.testing.assert_allclose(w, simplex_by_bisection(p / lam), atol=1e-6)
        sol = W.solve_weights(p.astype(np.float32), lam=lam)
        assert (sol.iterations, sol.converged, sol.gap, sol.lam) == (0, True, 0.0, lam)
        np.testing.assert_array_equal(sol.weights, w)
        assert abs(sol.objective - ref_f) <= 1e-6 * abs(ref_f) + 1e-6


def test_first_order_support_is_top_of_p():
    rng = np.random.default_rng(3)
    p = rng.normal(size=200).astype(np.float32)
    for lam in (0.05, 1.0, 20.0):
        w = np.asarray(W.first_order_weights(p, lam))
        m = int((w > 0).sum())
        assert 1 <= m < 200
        assert set(np.flatnonzero(w > 0)) == set(np.argsort(-p)[:m])


def test_first_order_rejects_bad_lam():
    for lam in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam"):
            W.first_order_weights(np.ones(3, np.float32), lam)


def test_lam_for_budget_gives_support_k():
    rng = np.random.default_rng(4)
    n = 50
    p = rng.normal(size=n).astype(np.float32)
    s = np.sort(p.astype(np.float64))[::-1]
    for k in (1, 2, 7, 30, 49):
        lam = float(W.lam_for_budget(p, k))
        np.testing.assert_allclose(lam, np.sum(s[:k] - s[k]), rtol=1e-5)
        w = np.asarray(W.first_order_weights(p, lam))
        assert set(np.flatnonzero(w > 1e-6)) == set(np.argsort(-p)[:k])
        # it is the largest such lam: a little more ridge lets the (k+1)-th sample in
        wider = np.asarray(W.first_order_weights(p, lam * 1.01))
        assert int((wider > 1e-6).sum()) == k + 1


def test_lam_for_budget_degenerate_cases():
    # all scores equal: a positive lam, uniform weights
    for c in (0.0, 2.0, -3.0):
        p = np.full(6, c, np.float32)
        lam = float(W.lam_for_budget(p, 2))
        assert lam > 0 and np.isfinite(lam)
        np.testing.assert_allclose(np.asarray(W.first_order_weights(p, lam)), np.full(6, 1 / 6), rtol=1e-6)
    # a tie at the boundary: the whole tie joins the support, tied samples weigh the same
    p = np.array([3.0, 1.0, 1.0, 0.0], np.float32)
    w = np.asarray(W.first_order_weights(p, W.lam_for_budget(p, 2)))
    assert list(w > 1e-6) == [True, True, True, False]
    assert w[1] == w[2]
    # nothing below the k-th score, and k = N: everything is in, the lowest at half the mean
    for p, k in ((np.array([3.0, 1.0, 1.0, 1.0], np.float32), 2),
                 (np.random.default_rng(5).normal(size=9).astype(np.float32), 9)):
        w = np.asarray(W.first_order_weights(p, W.lam_for_budget(p, k)))
        assert np.all(w > 0)
        np.testing.assert_allclose(w.min(), 1 / (2 * len(p)), rtol=1e-5)


def test_lam_for_budget_rejects_bad_k():
    p = np.arange(5, dtype=np.float32)
    for k in (0, -1, 6, 2.5, True, "3", None):
        with pytest.raises(ValueError, match="k"):
            W.lam_for_budget(p, k)
    assert float(W.lam_for_budget(p, np.int64(5))) > 0


def test_first_order_jit_large_n():
    n, k = 100_000, 100
    p = np.random.default_rng(6).normal(size=n).astype(np.float32)
    fn = jax.jit(lambda p: W.first_order_weights(p, W.lam_for_budget(p, k)))
    jax.block_until_ready(fn(p))  # compile
    start = time.perf_counter()
    w = np.asarray(jax.block_until_ready(fn(p)))
    assert time.perf_counter() - start < 5.0
    check_on_simplex(w, atol=1e-5)
    assert set(np.flatnonzero(w > 1e-7)) == set(np.argsort(-p)[:k])
    lam = float(W.lam_for_budget(p, k))
    np.testing.assert_allclose(w, simplex_by_bisection(p, lam), atol=1e-6)
    # scores close together on a large offset, wide support: float32 round-off in the sorted
    # cumsum must not reach the weights (a float64 reference agrees to ~1e-7 of the largest)
    p = (5.0 + 1e-3 * np.random.default_rng(2).normal(size=n)).astype(np.float32)
    for k in (10_000, 30_000):
        lam = float(W.lam_for_budget(p, k))
        w = np.asarray(W.first_order_weights(p, lam))
        ref = simplex_by_bisection(p, lam)
        assert np.abs(w - ref).max() < 2e-7 * ref.max()


# ---------------------------------------------------------------------------------------------
# spectrum


def test_estimate_spectrum_matches_numpy():
    rng = np.random.default_rng(7)
    n = 30
    A = rng.normal(size=(n, n))
    Q = (A + A.T) / 2 + np.ones((n, n))  # the ones block is invisible on the simplex
    lmin, lmax = Op.estimate_spectrum(Op.dense_matvec(Q), n)
    eig = tangent_eigs(Q)
    np.testing.assert_allclose([lmin, lmax], [eig[0], eig[-1]], rtol=1e-4, atol=1e-4)
    # a rank-3 PSD operator exhausts its Krylov space after a few steps: no spurious values
    C = rng.normal(size=(n, 3))
    B = rng.normal(size=(3, 3))
    QL = B @ B.T
    lmin, lmax = Op.estimate_spectrum(Op.low_rank_matvec(C, QL), n)
    eig = tangent_eigs(C @ QL @ C.T)
    assert abs(lmin) < 1e-4 * eig[-1]
    np.testing.assert_allclose(lmax, eig[-1], rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# second order


def check_against_scipy(sol, p, Q, eta, lam, rng):
    ref_w, ref_f = slsqp(p, Q, eta, lam, rng)
    f = objective(p, Q, eta, lam, sol.weights)
    check_on_simplex(sol.weights)
    assert sol.converged
    assert 0.0 <= sol.gap < 1e-5
    assert abs(f - ref_f) <= 1e-6 * abs(ref_f) + 1e-7
    assert abs(sol.objective - f) <= 1e-6 * abs(f) + 1e-7
    assert f - ref_f <= sol.gap + 1e-7  # the gap bounds the suboptimality
    np.testing.assert_allclose(sol.weights, ref_w, atol=1e-4)


def random_psd(rng, n, scale=1.0):
    A = rng.normal(size=(n, n))
    return scale * A @ A.T / n


@pytest.mark.parametrize("n", [12, 25])
def test_second_order_psd_matches_scipy(n):
    rng = np.random.default_rng(10 + n)
    for _ in range(3):
        p = rng.normal(size=n)
        Q = random_psd(rng, n, scale=rng.uniform(0.5, 5.0))
        eta, lam = float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.05, 1.0))
        sol = W.solve_weights(p.astype(np.float32), Op.dense_matvec(Q), eta=eta, lam=lam)
        check_against_scipy(sol, p, Q, eta, lam, rng)
        assert sol.lam == lam and sol.iterations > 0
        # the curvature changes the answer: it is not the first-order weights
        assert np.abs(sol.weights - np.asarray(W.first_order_weights(p.astype(np.float32), lam))).max() > 1e-3


def test_second_order_indefinite_with_large_lam_matches_scipy():
    rng = np.random.default_rng(20)
    n = 12
    for _ in range(2):
        A = rng.normal(size=(n, n))
        Q = (A + A.T) / 2
        eig = tangent_eigs(Q)
        assert eig[0] < 0 < eig[-1]
        p, eta = rng.normal(size=n), 0.8
        lam = -1.5 * eta * eig[0] + 0.05
        sol = W.solve_weights(p.astype(np.float32), Op.dense_matvec(Q), eta=eta, lam=lam)
        check_against_scipy(sol, p, Q, eta, lam, rng)


def test_plain_function_matvec():
    rng = np.random.default_rng(21)
    n = 12
    p, Q = rng.normal(size=n), random_psd(rng, n, 3.0)
    Qj = jnp.asarray(Q, jnp.float32)
    sol = W.solve_weights(p.astype(np.float32), lambda w: Qj @ w, eta=1.0, lam=0.2)
    check_against_scipy(sol, p, Q, 1.0, 0.2, rng)


def test_low_rank_matvec_matches_dense():
    rng = np.random.default_rng(22)
    n, l = 25, 4
    p = rng.normal(size=n)
    C = rng.normal(size=(n, l))
    B = rng.normal(size=(l, l))
    QL = B @ B.T
    Q = C @ QL @ C.T
    eta, lam = 0.5, 0.3
    low = W.solve_weights(p.astype(np.float32), Op.low_rank_matvec(C, QL), eta=eta, lam=lam)
    check_against_scipy(low, p, Q, eta, lam, rng)
    dense = W.solve_weights(p.astype(np.float32), Op.dense_matvec(Q), eta=eta, lam=lam)
    np.testing.assert_allclose(low.weights, dense.weights, atol=1e-5)


def test_nonconvex_raises_and_default_lam_fixes_it():
    rng = np.random.default_rng(23)
    n, k, eta = 12, 3, 1.0
    A = rng.normal(size=(n, n))
    Q = (A + A.T) / 2
    lmin_true = tangent_eigs(Q)[0]
    p = rng.normal(size=n).astype(np.float32)
    mv = Op.dense_matvec(Q)
    lam_k = float(W.lam_for_budget(p, k))
    assert lam_k + eta * lmin_true < 0  # the budget lam alone is non-convex here
    with pytest.raises(ValueError, match=r"non-convex.*lam >= .*Gauss-Newton"):
        W.solve_weights(p, mv, eta=eta, lam=lam_k)
    lam = W.default_lam(p, mv, eta, k)
    assert lam >= lam_k
    assert lam + eta * lmin_true > 0.05 * eta * -lmin_true  # convex, with margin
    sol = W.solve_weights(p, mv, eta=eta, lam=lam)
    check_against_scipy(sol, p.astype(np.float64), Q, eta, lam, rng)
    # a PSD Q needs no extra ridge
    assert W.default_lam(p, Op.dense_matvec(random_psd(rng, n)), eta, k) == pytest.approx(lam_k)
    assert W.default_lam(p, None, eta, k) == pytest.approx(lam_k)


def test_warm_start_and_iteration_limit():
    rng = np.random.default_rng(24)
    n = 25
    p, Q = rng.normal(size=n), random_psd(rng, n, 20.0)
    eta, lam = 1.0, 0.05
    mv = Op.dense_matvec(Q)
    p32 = p.astype(np.float32)
    # stopped early: not converged, but the gap still bounds the suboptimality
    early = W.solve_weights(p32, mv, eta=eta, lam=lam, max_iter=2)
    _, ref_f = slsqp(p, Q, eta, lam, rng)
    assert not early.converged and early.iterations == 2
    assert early.gap > 1e-5
    assert objective(p, Q, eta, lam, early.weights) - ref_f <= early.gap + 1e-7
    full = W.solve_weights(p32, mv, eta=eta, lam=lam)
    assert full.converged and full.gap < early.gap
    # started at the answer, there is nothing to do
    again = W.solve_weights(p32, mv, eta=eta, lam=lam, w0=full.weights)
    assert again.iterations == 0 and again.converged
    # a w0 off the simplex is projected first and reaches the same answer
    other = W.solve_weights(p32, mv, eta=eta, lam=lam, w0=rng.normal(size=n).astype(np.float32))
    np.testing.assert_allclose(other.weights, full.weights, atol=1e-4)


def test_solve_weights_validates_inputs():
    p = np.ones(4, np.float32)
    mv = Op.dense_matvec(np.eye(4))
    for lam in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            W.solve_weights(p, mv, lam=lam)
    with pytest.raises(ValueError, match="eta"):
        W.solve_weights(p, mv, eta=-1.0, lam=1.0)
    with pytest.raises(ValueError, match="w0"):
        W.solve_weights(p, mv, lam=1.0, w0=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        W.solve_weights(np.array([1.0, np.nan], np.float32), lam=1.0)
    with pytest.raises(ValueError, match="matvec must map"):
        W.solve_weights(p, lambda w: jnp.ones(3), lam=1.0)
    one = W.solve_weights(np.array([0.5], np.float32), Op.dense_matvec(np.array([[2.0]])), lam=1.0)
    assert one.weights.tolist() == [1.0] and one.objective == pytest.approx(-0.5 + 1.0 + 0.5)


def test_solution_is_frozen_host_data():
    sol = W.solve_weights(np.arange(4, dtype=np.float32), lam=1.0)
    assert isinstance(sol.weights, np.ndarray)
    assert all(isinstance(x, t) for x, t in ((sol.objective, float), (sol.iterations, int),
                                            (sol.converged, bool), (sol.gap, float), (sol.lam, float)))
    with pytest.raises(AttributeError):
        sol.lam = 2.0


def test_badly_conditioned_problem_stops_at_float32_resolution():
    # L / lam ~ 1.5e5: float32 iterates cannot reach tol * |f|; the solver must stop by itself at
    # the float32 floor, say so, and still return a certified (gap-bounded) answer
    rng = np.random.default_rng(25)
    n, l = 60, 6
    p = rng.normal(size=n)
    C = rng.normal(size=(n, l))
    B = rng.normal(size=(l, l))
    QL = B @ B.T / l
    Q = C @ QL @ C.T
    eta, lam = 30.0, 0.05
    sol = W.solve_weights(p.astype(np.float32), Op.low_rank_matvec(C, QL), eta=eta, lam=lam,
                          max_iter=20_000)
    ref_w, ref_f = slsqp(p, Q, eta, lam, rng, starts=1)
    f = objective(p, Q, eta, lam, sol.weights)
    assert sol.converged and sol.iterations < 20_000
    assert sol.gap > 1e-6 * abs(ref_f)  # tol was not reachable ...
    assert -1e-6 <= f - ref_f <= sol.gap  # ... but the gap certifies the answer (SLSQP ~1e-7)
    assert sol.gap < 1e-3 * abs(ref_f)
