"""Tests for idjax.landmarks: dense scipy references for C, exactness on landmarks, propagation
quality, k-means++ coverage and determinism, memmap / generic row-sliceable inputs, spearman."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats

from idjax.landmarks import choose_landmarks, spearman
from idjax.propagator import Propagator
from conftest import reference_propagation

N, L, E = 200, 20, 8
CHUNK = 64  # < N and does not divide it: 4 chunks, the last one padded


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((N, E)).astype(np.float32)
    lm = np.sort(rng.choice(N, size=L, replace=False))
    return emb, lm


class RowsOnly:
    """Only len(), .shape and x[a:b]: what a user's on-disk store may offer (no fancy indexing)."""

    def __init__(self, x):
        self._x = x
        self.shape = x.shape

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, s):
        if not isinstance(s, slice):
            raise TypeError("RowsOnly supports row slices only")
        return self._x[s]


# --- propagation against a dense reference ----------------------------------------------------

@pytest.mark.parametrize("kind", ["krr", "ridge"])
@pytest.mark.parametrize("cache_bytes", [0, 1 << 30], ids=["streamed", "cached"])
def test_c_matches_dense_reference(data, kind, cache_bytes):
    emb, lm = data
    ref, s = reference_propagation(emb, lm, kind)
    prop = Propagator.fit(emb, lm, kind, chunk_rows=CHUNK, cache_bytes=cache_bytes)
    assert prop.kind == kind and prop.num_rows == N and prop.num_landmarks == L
    np.testing.assert_array_equal(prop.landmarks, lm)
    if kind == "krr":
        np.testing.assert_allclose(prop.bandwidth, s, rtol=1e-5)
    else:
        assert prop.bandwidth is None
    tol = 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(prop.dense(), ref, atol=tol)
    np.testing.assert_array_equal(prop.dense()[lm], np.eye(L, dtype=np.float32))
    assert prop.cached == bool(cache_bytes)

    rng = np.random.default_rng(1)
    v1, v3 = rng.standard_normal(L), rng.standard_normal((L, 3))
    w1, w3 = rng.standard_normal(N), rng.standard_normal((N, 3))
    for v in (v1, v3):
        out = prop.apply(v)
        assert out.shape == (N,) + v.shape[1:] and out.dtype == np.float32
        np.testing.assert_allclose(out, ref @ v, atol=tol * np.abs(v).sum(0).max())
        np.testing.assert_array_equal(out[lm], v.astype(np.float32))  # exact on landmarks
    for w in (w1, w3):
        out = prop.apply_transpose(w)
        assert out.shape == (L,) + w.shape[1:]
        np.testing.assert_allclose(out, ref.T @ w, atol=tol * np.abs(w).sum(0).max())

    # <C x, y> = <x, C^T y> for the C that apply and apply_transpose use
    cv, ctw = prop.apply(v1), prop.apply_transpose(w1)
    scale = np.linalg.norm(cv) * np.linalg.norm(w1) + np.linalg.norm(v1) * np.linalg.norm(ctw)
    assert abs(cv @ w1 - v1 @ ctw) < 1e-5 * scale

    q = rng.standard_normal((L, L))
    mv = prop.low_rank_matvec(q)  # C's product, or E streamed through the kernel: jittable either way
    out = jax.jit(lambda m, w: m(w))(mv, jnp.asarray(w1, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), ref @ (q @ (ref.T @ w1)),
                               atol=1e-3 * np.abs(ref @ (q @ (ref.T @ w1))).max())


def test_landmark_order_is_column_order(data):
    """Unsorted landmarks: column j of C belongs to landmarks[j]."""
    emb, lm = data
    perm = np.random.default_rng(2).permutation(L)
    a = Propagator.fit(emb, lm, "krr", chunk_rows=CHUNK, cache_bytes=0)
    b = Propagator.fit(emb, lm[perm], "krr", chunk_rows=CHUNK, cache_bytes=0)
    v = np.arange(L, dtype=np.float32)
    ref = a.apply(v)
    np.testing.assert_allclose(b.apply(v[perm]), ref, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["krr", "ridge"])
def test_all_landmarks_reproduce_values(kind):
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((50, 4)).astype(np.float32)
    vals = rng.standard_normal((50, 2)).astype(np.float32)
    lm = np.arange(50)
    for cache in (0, 1 << 30):
        prop = Propagator.fit(emb, lm, kind, chunk_rows=16, cache_bytes=cache)
        np.testing.assert_array_equal(prop.apply(vals), vals)
        np.testing.assert_array_equal(prop.apply_transpose(vals), vals)


def test_krr_propagates_a_smooth_function():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((400, E)).astype(np.float32)
    a = rng.standard_normal(E)
    truth = np.sin(emb @ (a / np.linalg.norm(a)))
    lm = choose_landmarks(emb, 100, seed=1)  # 25%
    prop = Propagator.fit(emb, lm, "krr", chunk_rows=96, cache_bytes=0)
    rest = np.setdiff1d(np.arange(400), lm)
    assert spearman(prop.apply(truth[lm])[rest], truth[rest]) > 0.9


def test_ridge_recovers_a_linear_function():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((400, E)).astype(np.float32)
    truth = emb.astype(np.float64) @ rng.standard_normal(E)
    lm = choose_landmarks(emb, 50, seed=1)
    out = Propagator.fit(emb, lm, "ridge", chunk_rows=96, cache_bytes=0).apply(truth[lm])
    # shrinkage delta*mean|e_l|^2 / eig(E_L^T E_L) ~ 1e-2 * 8 / 50: relative error well below 1%
    assert np.abs(out - truth).max() < 1e-2 * np.abs(truth).max()


def test_duplicate_and_zero_embeddings_do_not_crash():
    emb = np.zeros((30, 4), np.float32)
    emb[10:] = 1.0  # two distinct points, many duplicates
    lm = choose_landmarks(emb, 6, "kmeans++", seed=0)
    assert lm.size == 6 and np.unique(lm).size == 6
    prop = Propagator.fit(emb, lm, "krr", chunk_rows=8, cache_bytes=0)
    assert prop.bandwidth > 0 and np.isfinite(prop.apply(np.ones(6))).all()


# --- choosing landmarks ------------------------------------------------------------------------

def _blobs(seed=0, k=8, per=40, dim=6):
    rng = np.random.default_rng(seed)
    centers = 20.0 * rng.standard_normal((k, dim))
    labels = np.repeat(np.arange(k), per)
    x = centers[labels] + 0.1 * rng.standard_normal((k * per, dim))
    return x.astype(np.float32), labels


@pytest.mark.parametrize("method", ["kmeans++", "farthest"])
@pytest.mark.parametrize("resident_bytes", [0, 1 << 30], ids=["streamed", "resident"])
def test_kmeanspp_covers_clusters(method, resident_bytes):
    x, labels = _blobs()
    for seed in range(3):
        lm = choose_landmarks(x, 8, method, seed=seed, chunk_rows=100, resident_bytes=resident_bytes)
        assert lm.dtype == np.int64 and np.all(np.diff(lm) > 0)
        assert set(labels[lm]) == set(range(8)), (seed, labels[lm])


def test_kmeanspp_with_candidates_and_rows_only_input():
    x, labels = _blobs()
    lm = choose_landmarks(RowsOnly(x), 8, "kmeans++", seed=0, candidates=160, chunk_rows=50)
    assert lm.size == 8 and set(labels[lm]) == set(range(8))
    # candidates >= N means all rows: same as without
    np.testing.assert_array_equal(choose_landmarks(x, 8, "kmeans++", seed=4, candidates=10**6),
                                  choose_landmarks(x, 8, "kmeans++", seed=4))


@pytest.mark.parametrize("method", ["random", "kmeans++"])
def test_landmarks_are_deterministic(method):
    x, _ = _blobs(per=10)
    a = choose_landmarks(x, 12, method, seed=7)
    np.testing.assert_array_equal(a, choose_landmarks(x, 12, method, seed=7))
    assert not np.array_equal(a, choose_landmarks(x, 12, method, seed=8))
    assert a.size == 12 and np.unique(a).size == 12 and a.min() >= 0 and a.max() < len(x)


def test_streamed_and_resident_kmeanspp_agree():
    x, _ = _blobs(per=10)
    np.testing.assert_array_equal(
        choose_landmarks(x, 10, "kmeans++", seed=3, chunk_rows=32, resident_bytes=0),
        choose_landmarks(x, 10, "kmeans++", seed=3, chunk_rows=32))


def test_random_is_uniform_without_replacement():
    lm = choose_landmarks(np.zeros((100, 2)), 30, "random", seed=5)
    np.testing.assert_array_equal(lm, np.sort(np.random.default_rng(5).choice(100, 30, replace=False)))
    np.testing.assert_array_equal(choose_landmarks(np.zeros((100, 2)), 100), np.arange(100))


def test_bad_arguments_raise():
    x = np.zeros((10, 3), np.float32)
    for num in (0, -1, 11, 2.5):
        with pytest.raises(ValueError, match="num"):
            choose_landmarks(x, num)
    with pytest.raises(ValueError, match="method"):
        choose_landmarks(x, 2, "kmeans")
    with pytest.raises(ValueError, match="candidates"):
        choose_landmarks(x, 5, "kmeans++", candidates=3)
    with pytest.raises(ValueError, match="kind"):
        Propagator.fit(x, [0, 1], "rbf")
    with pytest.raises(ValueError, match="distinct"):
        Propagator.fit(x, [1, 1])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        Propagator.fit(x, [0, 10])
    prop = Propagator.fit(x, [0, 1])
    with pytest.raises(ValueError, match="apply"):
        prop.apply(np.zeros(3))


# --- on-disk inputs ----------------------------------------------------------------------------

def test_memmap_inputs(tmp_path, data):
    emb, lm = data
    mm = np.memmap(tmp_path / "emb.f32", dtype=np.float32, mode="w+", shape=emb.shape)
    mm[:] = emb
    mm.flush()
    mm = np.memmap(tmp_path / "emb.f32", dtype=np.float32, mode="r", shape=emb.shape)
    np.testing.assert_array_equal(choose_landmarks(mm, 10, "kmeans++", seed=1, chunk_rows=CHUNK),
                                  choose_landmarks(emb, 10, "kmeans++", seed=1, chunk_rows=CHUNK))
    v = np.random.default_rng(0).standard_normal(L)
    for src in (mm, RowsOnly(mm)):
        prop = Propagator.fit(src, lm, "krr", chunk_rows=CHUNK, cache_bytes=0)
        ref = Propagator.fit(emb, lm, "krr", chunk_rows=CHUNK, cache_bytes=0)
        np.testing.assert_array_equal(prop.apply(v), ref.apply(v))


# --- spearman ----------------------------------------------------------------------------------

def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(50)
    b = a + rng.standard_normal(50)
    ties_a, ties_b = rng.integers(0, 5, 60), rng.integers(0, 3, 60) + rng.integers(0, 2, 60)
    for x, y in ((a, b), (a, -a), (ties_a, ties_b), (ties_a, ties_a.astype(float) ** 2)):
        assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5)))
    with pytest.raises(ValueError):
        spearman(np.arange(3), np.arange(4))
