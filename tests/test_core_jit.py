"""The jittable core after the gradients (scores, propagation, weights, selection rules).

Each core function against an independent reference (numpy argsort, a Python round-robin loop,
scipy for the KRR solve and the weight QP), and the must-show test: select_samples' own stores fed
to the WHOLE post-gradient selection inside one jax.jit, vmapped over 4 seeds, equal to
select_samples with those seeds, compiled once.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
from flax import nnx
from scipy.optimize import minimize

import idjax.models as M
from idjax import curvature as Op
from idjax import propagation as PR
from idjax.propagator import Propagator
from idjax import scores as SC
from idjax import select as S
from idjax import weights as W
from idjax.embed import EmbedConfig
from idjax.pipeline import SelectConfig, select_samples
from idjax.store import ArrayStore
from conftest import random_examples, reference_propagation

VOCAB = 89


# ----------------------------------------------------------------------------- references


def _argsort_top_k(scores, k, candidates=None, secondary=None):
    """numpy: stable sort of -score (then -secondary), candidates only."""
    s = np.asarray(scores, np.float64)
    order = np.lexsort((np.arange(len(s)), -np.asarray(secondary, np.float64), -s)) if secondary is not None \
        else np.argsort(-s, kind="stable")
    if candidates is not None:
        order = order[np.asarray(candidates)[order]]
    return order[:k]


def _loop_round_robin(cols, k, key, allowed):
    """The definition: round r visits the targets in permutation(fold_in(key, r), t); each takes its
    best free row by a full sort."""
    taken, out, owner = ~allowed.copy(), [], []
    orders = [sorted(range(len(cols)), key=lambda r: (-cols[r, j], r)) for j in range(cols.shape[1])]
    r = 0
    while len(out) < k:
        for j in np.asarray(jax.random.permutation(jax.random.fold_in(key, r), cols.shape[1])):
            row = next(i for i in orders[j] if not taken[i])
            taken[row] = True
            out.append(row)
            owner.append(int(j))
            if len(out) == k:
                break
        r += 1
    return np.asarray(out), np.asarray(owner)


def _slsqp(p, q, eta, lam):
    n = len(p)
    r = minimize(lambda w: -p @ w + 0.5 * eta * w @ q @ w + 0.5 * lam * w @ w, np.full(n, 1 / n),
                 jac=lambda w: -p + eta * q @ w + lam * w, method="SLSQP", bounds=[(0, None)] * n,
                 constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(n)}],
                 options={"ftol": 1e-15, "maxiter": 2000})
    return np.clip(r.x, 0, None), float(r.fun)


# ----------------------------------------------------------------------------- selection rules


def test_top_k_indices_matches_argsort_and_host():
    rng = np.random.default_rng(0)
    s = rng.integers(-3, 3, (4, 60)).astype(np.float32)  # many ties
    s[:, :5] = -0.0                                       # -0.0 ties with 0.0, as in numpy
    sec = rng.normal(size=(4, 60)).astype(np.float32)
    cand = rng.random((4, 60)) > 0.3
    fn = jax.jit(jax.vmap(lambda s, c, b: (S.top_k_indices(s, 9, candidates=c),
                                           S.top_k_indices(s, 9, secondary=b, candidates=c))))
    plain, lex = fn(s, cand, sec)
    for i in range(4):
        np.testing.assert_array_equal(plain[i], _argsort_top_k(s[i], 9, cand[i]))
        np.testing.assert_array_equal(plain[i], S.top_k(s[i], 9, candidates=cand[i]))
        np.testing.assert_array_equal(lex[i], _argsort_top_k(s[i], 9, cand[i], secondary=sec[i]))
        np.testing.assert_array_equal(lex[i], S.top_k_lexicographic(s[i], sec[i], 9, candidates=cand[i]))
    with pytest.raises(ValueError, match="k"):
        S.top_k_indices(s[0], 61)


@pytest.mark.parametrize("n,t,k", [(30, 4, 12), (40, 1, 40), (25, 7, 5), (60, 3, 59)])
def test_round_robin_indices_matches_loop_and_host(n, t, k):
    rng = np.random.default_rng(n + t + k)
    cols = rng.normal(size=(n, t)).round(1).astype(np.float32)  # ties across and within columns
    allowed = np.ones(n, bool)
    if k < n - 3:
        allowed[rng.choice(n, 3, replace=False)] = False
    keys = jax.random.split(jax.random.key(7), 3)
    fn = jax.jit(jax.vmap(lambda key: S.round_robin_indices(jnp.asarray(cols), k, key=key,
                                                            candidates=jnp.asarray(allowed))))
    rows, owners = fn(keys)
    for i in range(3):
        ref_rows, ref_owner = _loop_round_robin(cols, k, keys[i], allowed)
        np.testing.assert_array_equal(rows[i], ref_rows)
        np.testing.assert_array_equal(owners[i], ref_owner)
    # the host function with seed s uses the key jax.random.key(s)
    host_rows, host_owner = S.round_robin(cols, k, seed=11, candidates=allowed, return_owner=True)
    jit_rows, jit_owner = S.round_robin_indices(cols, k, key=jax.random.key(11), candidates=allowed)
    np.testing.assert_array_equal(host_rows, jit_rows)
    np.testing.assert_array_equal(host_owner, jit_owner)


@pytest.mark.parametrize("aggregate", ["mean", "round-robin"])
def test_per_task_indices_matches_host(aggregate):
    rng = np.random.default_rng(3)
    cols = rng.normal(size=(50, 5)).astype(np.float32)
    tasks = ["y", "x", "y", "z", "x"]
    cand = rng.random(50) > 0.2
    groups, budgets, names = S.task_groups(tasks, 11)
    assert names == ["x", "y", "z"] and budgets == (4, 4, 3) and groups == ((1, 4), (0, 2), (3,))
    fn = jax.jit(lambda c, key: S.per_task_indices(c, groups=groups, budgets=budgets, aggregate=aggregate,
                                                   key=key, candidates=jnp.asarray(cand)))
    rows, owner = fn(cols, jax.random.key(5))
    host_rows, host_owner = S.per_task(cols, tasks, 11, aggregate=aggregate, seed=5, candidates=cand)
    np.testing.assert_array_equal(rows, host_rows)
    assert [names[i] for i in np.asarray(owner)] == host_owner
    # task x's rows by its own rule; y's among what x left
    x_cols = cols[:, [1, 4]]
    if aggregate == "mean":
        np.testing.assert_array_equal(rows[:4], _argsort_top_k(x_cols.mean(1), 4, cand))
    else:
        key0 = jax.random.fold_in(jax.random.key(5), 0)
        np.testing.assert_array_equal(rows[:4], _loop_round_robin(x_cols, 4, key0, cand)[0])


# ----------------------------------------------------------------------------- propagation


@pytest.mark.parametrize("kind", ["krr", "ridge"])
def test_propagation_core_matches_scipy(kind):
    rng = np.random.default_rng(1)
    n, l, e = 120, 15, 6
    emb = rng.standard_normal((n, e)).astype(np.float32)
    lm = np.sort(rng.choice(n, l, replace=False))
    ref, _ = reference_propagation(emb, lm, kind)
    fit = PR.krr_fit if kind == "krr" else PR.ridge_fit
    v, w, q = rng.standard_normal((l, 3)), rng.standard_normal(n), rng.standard_normal((l, l))

    @jax.jit
    def run(emb, lm, v, w, q):
        state = fit(emb, lm, delta=1e-2)
        c = PR.coefficient_matrix(state, emb)
        return (c, PR.propagate(state, emb, v), PR.propagate(state, emb, v[:, 0]),
                PR.propagate_transpose(state, emb, w), PR.low_rank_product(c, q, w), state)

    c, pv, pv1, ptw, lr, state = run(emb, lm, v.astype(np.float32), w.astype(np.float32), q.astype(np.float32))
    tol = 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(c, ref, atol=tol)
    np.testing.assert_allclose(pv, ref @ v, atol=tol * np.abs(v).sum(0).max())
    np.testing.assert_allclose(pv1, (ref @ v)[:, 0], atol=tol * np.abs(v).sum(0).max())
    np.testing.assert_array_equal(np.asarray(pv)[lm], v.astype(np.float32))  # exact on landmarks
    np.testing.assert_allclose(ptw, ref.T @ w, atol=tol * np.abs(w).sum())
    dense = ref @ (q @ (ref.T @ w))
    np.testing.assert_allclose(lr, dense, atol=1e-3 * np.abs(dense).max())
    if kind == "krr":
        np.testing.assert_allclose(state.bandwidth, np.median(scipy.spatial.distance.pdist(emb[lm].astype(float))),
                                   rtol=1e-5)
    # the Propagator shell gives the same numbers
    prop = Propagator.fit(emb, lm, kind, chunk_rows=32, cache_bytes=0)
    np.testing.assert_allclose(prop.apply(v), pv, atol=tol * np.abs(v).sum(0).max())


# ----------------------------------------------------------------------------- weights


def test_scores_and_curvature_match_numpy():
    rng = np.random.default_rng(2)
    g, h, v, cols = rng.normal(size=(7, 5)), rng.normal(size=(7, 5)), rng.normal(size=5), rng.normal(size=(3, 5))
    p, pc = jax.jit(lambda *a: SC.influence_scores(a[0], a[1], target_columns=a[2]))(g, v, cols)
    np.testing.assert_allclose(p, g @ v, rtol=1e-5)
    np.testing.assert_allclose(pc, g @ cols.T, rtol=1e-5)
    np.testing.assert_allclose(jax.jit(SC.curvature_matrix)(h, g), (h @ g.T + g @ h.T) / 2, rtol=1e-5, atol=1e-6)
    host = SC.influence_scores(g, v)  # numpy stays numpy and float64
    assert host.p.dtype == np.float64 and host.columns is None
    np.testing.assert_allclose(SC.cosine_scores(host.p, 2.0), g @ v / 2)


def test_second_order_core_vmapped_matches_scipy_and_host():
    rng = np.random.default_rng(4)
    n, l, eta, k = 20, 4, 1.0, 3
    cs = rng.normal(size=(3, n, l)).astype(np.float32)
    qls = np.stack([(lambda b: b @ b.T / l)(rng.normal(size=(l, l))) for _ in range(3)]).astype(np.float32)
    ps = rng.normal(size=(3, n)).astype(np.float32)
    key = jax.random.key(0)
    traces = []

    @jax.jit
    @jax.vmap
    def solve(p, c, q_l):
        traces.append(1)
        mv = Op.low_rank_matvec(c, q_l)
        lam = W.second_order_lam(p, mv, eta=eta, k=k, key=key)
        return lam, W.second_order_weights(p, mv, eta=eta, lam=lam, key=key), Op.lanczos_spectrum(mv, size=n, key=key)

    lams, res, (lmin, lmax) = solve(ps, cs, qls)
    solve(ps[::-1], cs[::-1], qls[::-1])
    assert len(traces) == 1
    for i in range(3):
        q = cs[i].astype(np.float64) @ qls[i] @ cs[i].T.astype(np.float64)
        basis = np.linalg.qr(np.eye(n) - 1.0 / n)[0][:, : n - 1]
        eig = np.linalg.eigvalsh(basis.T @ q @ basis)
        np.testing.assert_allclose(lmax[i], eig[-1], rtol=1e-4)
        assert abs(lmin[i]) < 1e-4 * eig[-1]                      # rank l: the rest of the spectrum is 0
        ref_w, ref_f = _slsqp(ps[i].astype(np.float64), q, eta, float(lams[i]))
        f = -ps[i] @ res.weights[i] + 0.5 * eta * res.weights[i] @ q @ res.weights[i] \
            + 0.5 * lams[i] * res.weights[i] @ res.weights[i]
        assert bool(res.converged[i]) and int(res.iterations[i]) > 0 and 0 <= float(res.gap[i]) < 1e-5
        assert abs(f - ref_f) <= 1e-6 * abs(ref_f) + 1e-6 and abs(float(res.objective[i]) - f) < 1e-5
        np.testing.assert_allclose(res.weights[i], ref_w, atol=1e-4)
        # the host shell runs the same compiled core: the same lam and weights
        mv = Op.low_rank_matvec(cs[i], qls[i])
        assert W.default_lam(ps[i], mv, eta, k) == pytest.approx(float(lams[i]), rel=1e-6)
        host = W.solve_weights(ps[i], mv, eta=eta, lam=float(lams[i]))
        np.testing.assert_allclose(host.weights, res.weights[i], atol=1e-6)
        assert host.iterations == int(res.iterations[i])


# ----------------------------------------------------------------------------- the must-show test


def _examples(n, seed, prefix):
    return random_examples(n, seed, prefix, vocab=VOCAB)


SEEDS = (0, 1, 2)
CONFIGS = [(order, aggregate) for order in (1, 2) for aggregate in ("mean", "round-robin")]


@pytest.fixture(scope="module")
def selections(tmp_path_factory):
    """select_samples once per configuration and seed (one store directory per seed, shared)."""
    cfg = M.ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=False)
    model = M.CausalLM(cfg, rngs=nnx.Rngs(3))
    pool, targets = _examples(20, 1, "p"), _examples(3, 2, "t")
    base = SelectConfig(k=5, landmarks=0.5, proj_dim=32, batch_size=4, learning_rate=0.5, chunk_rows=8,
                        embed=EmbedConfig(num_blocks=1, dim=16))
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for order, aggregate in CONFIGS:
        for seed in SEEDS:
            sc = dataclasses.replace(base, order=order, aggregate=aggregate, seed=seed)
            out[order, aggregate, seed] = select_samples(model, pool, targets, sc, store_dir=root / f"seed{seed}")
    return out, targets, base


def _inputs(sel):
    """The stores select_samples wrote, as arrays: everything the post-gradient selection reads."""
    stores = sel.info["stores"]
    read = lambda name: ArrayStore.open(stores[name], create=False).to_array()  # noqa: E731
    with np.load(stores["targets"]) as z:
        columns = z["columns"] if "columns" in z else None
        target = (z["v_proj"].astype(np.float32), np.float32(z["v_norm"]), columns)
    curvature = read("curvature") if "curvature" in stores else None
    return (read("embeddings"), sel.landmarks.astype(np.int32), read("gradients"), curvature) + target


@pytest.mark.parametrize("order,aggregate", CONFIGS)
def test_whole_selection_in_one_jit_vmapped_over_seeds(selections, order, aggregate):
    sels, targets, base = selections
    runs = [sels[order, aggregate, s] for s in SEEDS]
    assert all(0 < len(r.landmarks) < 20 for r in runs)                 # KRR propagation is on the path
    k, eta, delta = base.k, base.learning_rate, base.delta
    lanczos_key = jax.random.key(0)                                    # solve_weights' default seed
    traces = []

    def post_gradient(key, emb, landmarks, g_l, h_l, v_proj, v_norm, columns):
        traces.append(1)
        p_l, cols_l = SC.influence_scores(g_l, v_proj, target_columns=columns)
        state = PR.krr_fit(emb, landmarks, delta=delta)
        p = PR.propagate(state, emb, p_l)
        scores = SC.cosine_scores(p, v_norm)
        if order == 1:
            weights = W.first_order_weights(p, W.lam_for_budget(p, k))
        else:
            mv = Op.low_rank_matvec(PR.coefficient_matrix(state, emb), SC.curvature_matrix(h_l, g_l))
            lam = W.second_order_lam(p, mv, eta=eta, k=k, key=lanczos_key)
            weights = W.second_order_weights(p, mv, eta=eta, lam=lam, key=lanczos_key).weights
        if aggregate == "round-robin":
            rows, owners = S.round_robin_indices(PR.propagate(state, emb, cols_l), k, key=key)
        else:
            rows = S.top_k_indices(scores, k) if order == 1 else S.top_k_indices(weights, k, secondary=scores)
            owners = rows
        return rows, owners, scores, weights

    fn = jax.jit(jax.vmap(post_gradient))
    stacked = [np.stack(x) if x[0] is not None else None for x in zip(*(_inputs(r) for r in runs))]
    keys = jnp.stack([jax.random.key(s) for s in SEEDS])
    rows, owners, scores, weights = fn(keys, *stacked)
    for i, sel in enumerate(runs):
        np.testing.assert_array_equal(rows[i], sel.rows)
        np.testing.assert_allclose(scores[i], sel.scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights[i], sel.weights, atol=1e-5)
        if aggregate == "round-robin":
            assert [targets[int(j)].id for j in owners[i]] == sel.owners
    if order == 2:  # the curvature term mattered: not the first-order weights
        p = np.asarray(scores[0]) * float(stacked[5][0])
        first = np.asarray(W.first_order_weights(p, runs[0].info["solver"]["lam"]))
        assert np.abs(first - np.asarray(weights[0])).max() > 1e-3
        assert all(r.info["solver"]["converged"] and r.info["solver"]["iterations"] > 0 for r in runs)
    # another batch of the same shapes (seeds in reverse) reuses the compiled function
    again = fn(keys[::-1], *[None if x is None else x[::-1] for x in stacked])
    np.testing.assert_array_equal(again[0], np.asarray(rows)[::-1])
    assert len(traces) == 1
