"""Tests for idjax.sketch: JL property, unbiasedness, exact references, determinism, memory."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from idjax.sketch import (Projector, block_matrix, fwht, project_tree, sample_without_replacement,
                          srht_blocks, srht_plan, srht_signs)

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["rademacher", "gaussian", "srht"]


def _tree(rng, d_a, d_b):
    """A two-leaf pytree with d_a + d_b coordinates, leaves of different ranks."""
    return {"w": rng.standard_normal((d_a // 8, 8)).astype(np.float32),
            "b": rng.standard_normal((d_b,)).astype(np.float32)}


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)]).astype(np.float64)


def _basis_matrix(proj, shapes):
    """The d x k matrix of a linear projection (traceable): row i is proj(e_i) as a pytree."""
    d = sum(math.prod(s) for s in shapes)

    def basis(i):
        e = jnp.zeros((d,), jnp.float32).at[i].set(1.0)
        parts, o = [], 0
        for s in shapes:
            parts.append(e[o:o + math.prod(s)].reshape(s))
            o += math.prod(s)
        return proj(parts)

    return jax.vmap(basis)(jnp.arange(d))


def _matrix(proj, shapes):
    return np.asarray(jax.jit(lambda: _basis_matrix(proj, shapes))(), np.float64)


# --- fwht / SRHT against explicit Hadamard matrices --------------------------------------------

def test_fwht_matches_scipy_hadamard():
    for n in (1, 2, 8, 64, 2048):  # 2048 = 16 x 16 x 8: Kronecker factors of unequal sizes
        x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
        ref = x.astype(np.float64) @ scipy.linalg.hadamard(n) / math.sqrt(n)
        np.testing.assert_allclose(np.asarray(jax.jit(fwht)(x)), ref, rtol=1e-5, atol=1e-5)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(jnp.ones((6,)))


def test_srht_equals_explicit_matrix():
    # block 4, k = 6: leaves of 6 and 5 coordinates (n_pad 8) subsample 6 of 8 coordinates;
    # the 3-coordinate leaf (n_pad 4 < k) is scattered whole into 4 of the 6 outputs.
    shapes, bs, k = [(2, 3), (5,), (3,)], 4, 6
    proj = Projector("srht", k, seed=7, block_size=bs)
    got = _matrix(proj.project, shapes)
    # Reference: scale * S . blockdiag(H) . D built with scipy, one leaf at a time.
    ref, o = np.zeros_like(got), 0
    h = scipy.linalg.hadamard(bs) / math.sqrt(bs)
    for i, s in enumerate(shapes):
        n = math.prod(s)
        keys, src, dst, scale = srht_plan(jax.random.fold_in(proj.key(), i), n, k, bs)
        blocks = srht_blocks(n, bs)
        signs = np.asarray(srht_signs(keys, bs)).reshape(-1)
        assert set(np.unique(signs).tolist()) <= {-1.0, 1.0}
        hd = scipy.linalg.block_diag(*[h] * blocks) * signs[None, :]   # H D, n_pad x n_pad
        p = np.zeros((k, n))
        p[np.asarray(dst)] = scale * hd[np.asarray(src), :n]            # sample rows, drop padding
        assert len(set(np.asarray(src).tolist())) == len(src) and len(set(np.asarray(dst).tolist())) == len(dst)
        assert scale == (math.sqrt(blocks * bs / k) if blocks * bs >= k else 1.0)
        ref[o:o + n] = p.T
        o += n
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n,k", [(10, 4), (1000, 5)])  # permutation path; distinct-draws path
def test_sample_without_replacement_is_uniform_and_distinct(n, k):
    keys = jax.random.split(jax.random.key(0), 400)
    # lax.map, not vmap: a vmapped lax.cond would evaluate the (never needed) fallback too.
    s = np.asarray(jax.jit(lambda ks: jax.lax.map(lambda kk: sample_without_replacement(kk, n, k), ks))(keys))
    if n > 8 * k:  # the concrete-key path (trace-time sample) agrees with the traced one
        np.testing.assert_array_equal(sample_without_replacement(keys[0], n, k), s[0])
    assert s.shape == (400, k) and np.all(np.diff(s, axis=1) > 0) and s.min() >= 0 and s.max() < n
    # Every element is included with probability k/n: 5-sigma binomial check on each count.
    counts, p = np.bincount(s.ravel(), minlength=n), k / n
    assert np.all(np.abs(counts - 400 * p) <= 5 * math.sqrt(400 * p * (1 - p)))


def test_srht_single_power_of_two_leaf_is_orthogonal():
    """k = n = block: SRHT is sign flips + an orthonormal Hadamard, so it is an isometry."""
    n = 64
    x = np.random.default_rng(0).standard_normal((n,)).astype(np.float32)
    px = np.asarray(Projector("srht", n, seed=3, block_size=n).project(jnp.asarray(x)))
    np.testing.assert_allclose(np.sum(px.astype(np.float64) ** 2), np.sum(x.astype(np.float64) ** 2),
                               rtol=1e-5)


# --- dense sketches against a materialized reference -------------------------------------------

@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_blockwise_equals_dense_reference(kind):
    k, bs, seed = 12, 5, 11
    rng = np.random.default_rng(1)
    tree = {"a": rng.standard_normal((3, 4)).astype(np.float32),   # 12 = 2 blocks + tail 2
            "b": rng.standard_normal((3,)).astype(np.float32),     # shorter than a block
            "c": rng.standard_normal((2, 5)).astype(np.float32),   # exactly 2 blocks
            "e": np.zeros((0, 3), np.float32)}                     # empty: no block
    proj = Projector(kind, k, seed=seed, block_size=bs)
    root = jax.random.key(seed, impl="threefry2x32")
    blocks = []
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if not leaf.size:
            continue                                                # keeps its index i
        lk = jax.random.fold_in(root, i)
        full = [np.asarray(block_matrix(jax.random.fold_in(lk, j), bs, k, kind))
                for j in range(-(-leaf.size // bs))]
        blocks.append(np.concatenate(full)[:leaf.size])             # last block: leading rows
    dense = np.concatenate(blocks, axis=0) / math.sqrt(k)           # d x k, materialized
    assert dense.shape == (25, k)
    np.testing.assert_allclose(np.asarray(proj.project(tree)), _flat(tree) @ dense, rtol=1e-5, atol=1e-5)


def test_block_entries_have_the_right_distribution():
    key = jax.random.key(0)
    r = np.asarray(block_matrix(key, 256, 100, "rademacher"))      # 100: not a multiple of 32
    assert set(np.unique(r).tolist()) == {-1.0, 1.0}
    assert abs(r.mean()) < 5 / math.sqrt(r.size)                  # 5 sigma of a fair coin
    assert abs(r[:, :32].mean() - r[:, 68:].mean()) < 10 / math.sqrt(256 * 32)  # no bit-position bias
    g = np.asarray(block_matrix(key, 256, 100, "gaussian"))
    assert abs(g.mean()) < 5 / math.sqrt(g.size) and abs(g.var() - 1) < 5 * math.sqrt(2 / g.size)


# --- JL property and unbiasedness --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_jl_inner_products_and_norms(kind):
    """One fixed seed, d = 20000 (two leaves), k = 1024: errors within 5 standard deviations.

    Gaussian: Var<Px,Py> = (|x|^2|y|^2 + <x,y>^2)/k exactly; Rademacher has the same minus
    2 sum x_i^2 y_i^2 / k, so the Gaussian value bounds it. SRHT: after the random Hadamard
    rotation the coordinates behave like Gaussians, and sampling k of n_pad coordinates without
    replacement gives the same variance times the finite-population factor (1 - k/n_pad) <= 1;
    zero padding to n_pad concentrates the energy on fewer coordinates and inflates the variance
    by at most n_pad/d, so we use the Gaussian std times sqrt(n_pad/d) (padding per leaf).
    """
    k = 1024
    rng = np.random.default_rng(42)
    x = _tree(rng, 16384, 3616)
    z = _tree(rng, 16384, 3616)
    y = jax.tree.map(lambda a, b: 0.6 * a + 0.8 * b, x, z)
    proj = Projector(kind, k, seed=5, block_size=4096)
    px, py = np.asarray(proj.project_batch(jax.tree.map(lambda a, b: np.stack([a, b]), x, y)), np.float64)
    fx, fy = _flat(x), _flat(y)
    xy, xx, yy = fx @ fy, fx @ fx, fy @ fy
    inflate = 1.0
    if kind == "srht":
        n_pad = sum(srht_blocks(l.size, proj.block_size) * proj.block_size for l in jax.tree.leaves(x))
        inflate = math.sqrt(n_pad / fx.size)
    std_xy = inflate * math.sqrt((xx * yy + xy**2) / k)
    std_xx = inflate * math.sqrt(2 * xx**2 / k)
    assert abs(px @ py - xy) < 5 * std_xy, (px @ py, xy, std_xy)
    assert abs(px @ px - xx) < 5 * std_xx, (px @ px, xx, std_xx)
    assert abs(py @ py - yy) < 5 * inflate * math.sqrt(2 * yy**2 / k)


@pytest.mark.parametrize("kind", KINDS)
def test_unbiased_over_seeds(kind):
    """E[P^T P] = I, so E<Px,Py> = <x,y> for all x, y: average P^T P over 2000 seeds.

    Each entry of the mean is tested against 5 empirical standard errors (CLT over seeds), plus
    a float32 slack for entries that never vary (e.g. SRHT pairs in different Hadamard blocks).
    """
    shapes, seeds, k = [(2, 3), (5,), (3,)], 2000, 6   # srht: both leaf paths, see above

    def gram(seed):
        key = jax.random.key(seed, impl="threefry2x32")
        m = _basis_matrix(lambda t: project_tree(t, key, kind, k, block_size=4), shapes)
        return m @ m.T

    grams = np.asarray(jax.jit(jax.vmap(gram))(jnp.arange(seeds)), np.float64)
    mean, se = grams.mean(0), grams.std(0) / math.sqrt(seeds)
    err = np.abs(mean - np.eye(mean.shape[0]))
    assert np.all(err <= 5 * se + 1e-5), (err.max(), (err - 5 * se).max())


# --- batching, determinism, normalize ----------------------------------------------------------

def _batch():
    """Five samples of a two-leaf tree; shared by tests so that compiled projections are reused."""
    rng = np.random.default_rng(4)
    return {"w": rng.standard_normal((5, 4, 8)).astype(np.float32),
            "b": rng.standard_normal((5, 7)).astype(np.float32)}


@pytest.mark.parametrize("kind", KINDS + ["none"])
def test_vmap_equals_loop(kind):
    batch = _batch()
    proj = Projector(kind, 32, seed=2, block_size=16)
    got = np.asarray(jax.jit(proj.project_batch)(batch))
    loop = np.stack([np.asarray(proj.project(jax.tree.map(lambda a: a[i], batch))) for i in range(5)])
    assert got.shape == ((5, 32) if kind != "none" else (5, 39))
    np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-5)
    if kind == "none":
        np.testing.assert_array_equal(got[0], _flat(jax.tree.map(lambda a: a[0], batch)).astype(np.float32))


def test_same_seed_same_output_in_another_process(tmp_path):
    code = (
        "import numpy as np, jax\n"
        "from idjax.sketch import Projector\n"
        "rng = np.random.default_rng(0)\n"
        "t = {'w': rng.standard_normal((40, 8)).astype(np.float32), 'b': rng.standard_normal((13,)).astype(np.float32)}\n"
        "out = [np.asarray(Projector(k, 64, seed=123, block_size=128).project(t)) for k in ('rademacher', 'gaussian', 'srht')]\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.stack(out))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=120)
    rng = np.random.default_rng(0)
    t = {"w": rng.standard_normal((40, 8)).astype(np.float32), "b": rng.standard_normal((13,)).astype(np.float32)}
    here = np.stack([np.asarray(Projector(k, 64, seed=123, block_size=128).project(t))
                     for k in ("rademacher", "gaussian", "srht")])
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), here)


@pytest.mark.parametrize("kind", KINDS + ["none"])
def test_normalize(kind):
    tree = jax.tree.map(lambda a: a[1], _batch())
    proj = Projector(kind, 32, seed=2, block_size=16)
    scaled = jax.tree.map(lambda a: 3.0 * a, tree)
    np.testing.assert_allclose(np.asarray(proj.project(scaled, normalize=True)),
                               np.asarray(proj.project(tree)) / np.linalg.norm(_flat(tree)), rtol=1e-5)
    zero = jax.tree.map(jnp.zeros_like, tree)
    out = proj.project(zero, normalize=True)
    assert np.all(np.isfinite(out)) and not np.any(out)
    if kind == "rademacher":  # the guard keeps the gradient finite too
        grad = jax.grad(lambda t: jnp.sum(proj.project(t, normalize=True)))(zero)
        assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="kind"):
        Projector("fourier", 8)
    with pytest.raises(ValueError, match="power-of-two"):
        Projector("srht", 8, block_size=100)


# --- memory bound ------------------------------------------------------------------------------

def _max_jaxpr_size(jaxpr) -> int:
    """Largest array (in elements) produced anywhere in a jaxpr, sub-jaxprs included."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            best = max(best, math.prod(getattr(v.aval, "shape", ())))
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else [p]):
                sub = getattr(sub, "jaxpr", sub)                 # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    best = max(best, _max_jaxpr_size(sub))
    return best


@pytest.mark.parametrize("kind", KINDS)
def test_never_materializes_d_by_k(kind):
    d, k = 2**22, 256
    proj = Projector(kind, k, seed=0)
    spec = jax.ShapeDtypeStruct((d,), jnp.float32)
    biggest = _max_jaxpr_size(jax.make_jaxpr(proj.project)(spec).jaxpr)
    assert biggest <= 4 * d, biggest                            # O(d), never O(d k)
    hlo = jax.jit(proj.project).lower(spec).as_text()
    sizes = [math.prod(int(n) for n in dims.split("x")[:-1])
             for dims in re.findall(r"tensor<((?:\d+x)+[a-z]+\d*)>", hlo)]
    assert sizes and max(sizes) < d * k and max(sizes) <= 4 * d
    if kind != "srht":
        assert proj.block_size * k in sizes                     # one [block, k] block at a time


@pytest.mark.parametrize("kind", KINDS)
def test_a_known_zero_prefix_gives_the_same_sketch_without_its_blocks(kind):
    """zeros (the gradients of the layers below a first layer): the sketch of the same tree, with a concrete
    and with a traced key; the prefix may end inside a block, cover a whole leaf, or be absent; for SRHT the
    compiled program skips the transform of those blocks (the compiler's FLOP count)."""
    rng = np.random.default_rng(11)
    tree = {"a": rng.standard_normal((6, 20)).astype(np.float32), "b": np.zeros((40,), np.float32),
            "c": rng.standard_normal((7,)).astype(np.float32), "d": np.zeros((32,), np.float32)}
    tree["a"][:3] = 0.0
    zeros = (60, 40, 0, 32)  # jax.tree.leaves order: a, b, c, d
    proj = Projector(kind, 24, seed=3, block_size=16)
    full = np.asarray(proj.project(tree))
    np.testing.assert_allclose(np.asarray(proj.project(tree, zeros=zeros)), full, rtol=1e-5, atol=1e-6)
    keys = jax.vmap(lambda s: jax.random.key(s, impl="threefry2x32"))(jnp.arange(3))
    traced = jax.jit(jax.vmap(lambda key, z: project_tree(tree, key, kind, 24, 16, zeros=z), (0, None)),
                     static_argnums=1)
    loop = np.stack([np.asarray(project_tree(tree, jax.random.key(s, impl="threefry2x32"), kind, 24, 16))
                     for s in range(3)])
    np.testing.assert_allclose(np.asarray(traced(keys, zeros)), loop, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="zeros has 2 entries for 4 leaves"):
        proj.project(tree, zeros=(0, 0))
    if kind == "srht":
        big = {"w": np.zeros((64, 256), np.float32)}

        def flops(z):
            cost = jax.jit(lambda t: project_tree(t, proj.key(), kind, 24, 16, zeros=z)).lower(big).compile()
            cost = cost.cost_analysis()
            return (cost[0] if isinstance(cost, list) else cost)["flops"]

        assert flops((48 * 256,)) < 0.5 * flops(None)
