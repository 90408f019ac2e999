"""Per-example gradients and HVPs against independent references (loops, dense Hessians, FD)."""

import contextlib
import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idjax import data, memory
from idjax.grads import (
    GradientConfig, PerExampleGradients, mean_response_loss, per_example_gradients, response_loss_sums,
    sample_losses, split_params,
)
from idjax.hessian import (
    ProjectedCurvature, gauss_newton_vp, hessian_products, hvp, landmark_curvature, target_arrays, target_direction,
    target_gradient, mean_target_loss,
)
from idjax.models import CausalLM, ModelConfig
from idjax.sketch import Projector

CFG = ModelConfig(
    model_type="llama", vocab_size=61, hidden_size=16, intermediate_size=24, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=True,
)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, rngs=nnx.Rngs(3))


def examples(n, rng, lengths=(5, 13, 20), no_response=()):
    out = []
    for i in range(n):
        length = int(rng.choice(lengths))  # few distinct lengths: the loop reference compiles per length
        ids = rng.integers(1, CFG.vocab_size, length).astype(np.int32)
        labels = ids.copy()
        labels[: length // 2] = -100  # the "prompt" half is masked
        if i in no_response:
            labels[:] = -100
        out.append(data.Example(i, f"s{i}", None, ids, labels, False))
    return out


def loop_grad(model, ex, pattern, precondition=None):
    """Reference: jax.grad on one unpadded sample, flattened."""
    graphdef, sel, rest = split_params(model, pattern)
    g = _single_grad(graphdef, sel, rest, jnp.asarray(ex.input_ids)[None], jnp.asarray(ex.labels)[None])
    if precondition is not None:
        g = jax.tree.map(lambda a, x: a * x, precondition, g)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])


@functools.partial(jax.jit, static_argnums=0)
def _single_grad(graphdef, sel, rest, ids, labels):
    def loss(s):
        return sample_losses(nnx.merge(graphdef, s, rest), ids, None, labels)[0]

    return jax.grad(loss)(sel)


@pytest.mark.parametrize("pattern", [None, "mlp.down_proj"])
def test_per_example_gradients_equal_a_loop(model, pattern):
    rng = np.random.default_rng(0)
    exs = examples(11, rng, no_response={4})
    batches = data.make_batches(exs, 4, (8, 16, 32), pad_id=0)
    assert len({b.bucket for b in batches}) >= 2  # several buckets, padded rows and padded tokens
    pg = PerExampleGradients(model, Projector("none", 0), GradientConfig(params=pattern, normalize=False))
    got = pg.run(batches)
    for ex in exs:
        ref = loop_grad(model, ex, pattern)
        np.testing.assert_allclose(got[ex.index], ref, atol=2e-6, rtol=1e-4)
    assert not np.any(np.isnan(got)) and np.all(got[4] == 0)  # no response: zero, never NaN


def test_microbatched_preconditioned_normalized_projection(model):
    rng = np.random.default_rng(1)
    exs = examples(8, rng, lengths=(6, 15))
    (batch,) = data.make_batches(exs, 8, (16,), pad_id=0)
    _, sel, _ = split_params(model, "layers")
    a = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32), sel)
    proj = Projector("rademacher", 64, seed=5)
    pg = PerExampleGradients(model, proj, GradientConfig(params="layers", microbatch=2), precondition=a)
    got, valid = pg(batch)
    assert valid.all()
    for ex in exs:
        g = loop_grad(model, ex, "layers", a)
        g = g / np.linalg.norm(g)
        # Same projector applied to the reference flat vector (unflattened the same way).
        leaves, treedef = jax.tree.flatten(sel)
        parts, o = [], 0
        for leaf in leaves:
            parts.append(g[o:o + leaf.size].reshape(leaf.shape))
            o += leaf.size
        ref = proj.project(jax.tree.unflatten(treedef, parts))
        np.testing.assert_allclose(got[ex.index], ref, atol=1e-5)


def test_coordinate_mask_keeps_a_fixed_subset(model):
    rng = np.random.default_rng(2)
    exs = examples(3, rng)
    batches = data.make_batches(exs, 3, (32,), pad_id=0)
    cfg = GradientConfig(params="mlp", keep=300, normalize=False, seed=7)
    masked = PerExampleGradients(model, Projector("none", 0), cfg).run(batches)
    again = PerExampleGradients(model, Projector("none", 0), cfg).run(batches)
    np.testing.assert_array_equal(masked, again)
    full = PerExampleGradients(model, Projector("none", 0), GradientConfig(params="mlp", normalize=False))
    full = full.run(batches)
    assert abs(masked.shape[1] - 300) <= 3
    # Every kept coordinate is a coordinate of the full gradient, at the mask's indices.
    pg = PerExampleGradients(model, Projector("none", 0), cfg)
    sizes = [x.size for x in jax.tree.leaves(pg.selected)]
    flat_idx = np.concatenate([idx + off for idx, off in zip(pg.mask.indices, np.cumsum([0] + sizes[:-1]))])
    np.testing.assert_allclose(masked, full[:, flat_idx], atol=1e-7)


def test_second_instance_reuses_the_compilation(model):
    """A second selection in one process must not recompile: instances of one model structure,
    projector and config share the compiled function, and the weights stay arguments."""
    exs = examples(4, np.random.default_rng(3), lengths=(6, 9))
    (batch,) = data.make_batches(exs, 4, (16,), pad_id=0)
    cfg = GradientConfig(params="mlp", normalize=False, seed=11)
    first = PerExampleGradients(model, Projector("rademacher", 32, seed=2), cfg)
    a = np.asarray(first(batch)[0])
    with count_compilations() as names:
        other = PerExampleGradients(CausalLM(CFG, rngs=nnx.Rngs(8)), Projector("rademacher", 32, seed=2), cfg)
        b = np.asarray(other(batch)[0])
        again = PerExampleGradients(model, Projector("rademacher", 32, seed=2), cfg)
        np.testing.assert_array_equal(np.asarray(again(batch)[0]), a)
    assert not [n for n in names if "_gradients" in n], names
    assert not np.allclose(a, b, atol=1e-4)
    with count_compilations() as names:  # another sketch is another program
        PerExampleGradients(model, Projector("rademacher", 32, seed=3), cfg)(batch)
    assert [n for n in names if "_gradients" in n], names


def test_planned_microbatch_fits_the_budget_and_changes_nothing(model):
    """microbatch=None: the largest microbatch whose compiled program fits the device memory, checked
    against the compiler's memory analysis of the whole-batch program; the gradients are unchanged."""
    exs = examples(8, np.random.default_rng(4), lengths=(13, 20))
    (batch,) = data.make_batches(exs, 8, (32,), pad_id=0)
    proj = Projector("rademacher", 32, seed=5)
    ids, mask, labels = (jnp.asarray(x) for x in (batch.input_ids, batch.attention_mask, batch.labels))
    whole = jax.jit(lambda m: per_example_gradients(m, ids, mask, labels, params=None, projector=proj,
                                                    normalize=False)).lower(model).compile()
    need = memory.compiled_bytes(whole)
    roomy = PerExampleGradients(model, proj, GradientConfig(params=None, normalize=False), device_memory=1 << 40)
    tight = PerExampleGradients(model, proj, GradientConfig(params=None, normalize=False), device_memory=need)
    a, b = np.asarray(roomy(batch)[0]), np.asarray(tight(batch)[0])
    (setting, _), = roomy.plans.values()
    assert setting == (8, False, False)
    (setting, compiled), = tight.plans.values()
    assert setting != (8, False, False) and memory.compiled_bytes(compiled) <= memory.HEADROOM * need
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, np.asarray(whole(model)), rtol=1e-5, atol=1e-6)


def test_bad_param_pattern(model):
    with pytest.raises(ValueError, match="matches no parameter"):
        split_params(model, "no_such_weight")


# ----------------------------------------------------------------------------- HVP


@pytest.fixture(scope="module")
def target(model):
    rng = np.random.default_rng(3)
    exs = examples(5, rng, lengths=(6, 12))
    batches = data.make_batches(exs, 2, (16,), pad_id=0)
    graphdef, sel, rest = split_params(model, "layers.mlp.down_proj")
    return graphdef, sel, rest, batches


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _unflat(vec, like):
    leaves, treedef = jax.tree.flatten(like)
    out, o = [], 0
    for leaf in leaves:
        out.append(vec[o:o + leaf.size].reshape(leaf.shape))
        o += leaf.size
    return jax.tree.unflatten(treedef, out)


def test_hvp_equals_dense_hessian_and_finite_differences(target):
    graphdef, sel, rest, batches = target
    targets = target_arrays(batches)
    loss = lambda p: mean_target_loss((graphdef, rest), targets, params=p)  # noqa: E731
    flat0 = _flat(sel)
    assert flat0.size == 2 * 24 * 16
    dense = jax.jit(jax.hessian(lambda v: loss(_unflat(v, sel))))(flat0)
    rng = np.random.default_rng(4)
    vecs = jnp.asarray(rng.standard_normal((3, flat0.size)), jnp.float32)
    got = jax.jit(lambda vs: hvp(loss, sel, vs))(jax.vmap(lambda v: _unflat(v, sel))(vecs))
    got = jax.vmap(_flat)(got)
    ref = vecs @ dense.T
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(jnp.abs(ref).max()), rtol=1e-4)
    # Central finite differences of the gradient (float32: eps trades truncation for round-off).
    grad = jax.jit(lambda v: _flat(jax.grad(loss)(_unflat(v, sel))))
    eps = 1e-2
    for v, h in zip(vecs, got):
        fd = (grad(flat0 + eps * v) - grad(flat0 - eps * v)) / (2 * eps)
        assert float(jnp.linalg.norm(fd - h) / jnp.linalg.norm(h)) < 1e-2


def test_the_target_loss_at_its_loss_positions_has_the_dense_hessian_of_every_position(model):
    """Target batches that carry loss positions (length-sorted): L_T, its gradient and exact HVPs equal the
    dense Hessian of L_T over the same rows batched without them (the lm-head at every position)."""
    exs = examples(5, np.random.default_rng(8), lengths=(40, 64))
    at = target_arrays(data.sorted_batches(exs, 2, pad_id=0))
    assert all(arrays[4] is not None for arrays in at.arrays)
    every = target_arrays(data.make_batches(exs, 2, (64,), pad_id=0))
    graphdef, sel, rest = split_params(model, "layers.mlp.down_proj")
    flat0 = _flat(sel)
    loss = {name: jax.jit(lambda v, t=t: mean_target_loss((graphdef, rest), t, params=_unflat(v, sel)))
            for name, t in (("at", at), ("every", every))}
    assert float(loss["at"](flat0)) == pytest.approx(float(loss["every"](flat0)), rel=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss["at"]))(flat0), jax.jit(jax.grad(loss["every"]))(flat0),
                               rtol=1e-5, atol=1e-7)
    dense = jax.jit(jax.hessian(loss["every"]))(flat0)
    vecs = jnp.asarray(np.random.default_rng(9).standard_normal((2, flat0.size)), jnp.float32)
    got = jax.vmap(_flat)(jax.jit(lambda vs: hessian_products((graphdef, rest), at, vs, params=sel))(
        jax.vmap(lambda v: _unflat(v, sel))(vecs)))
    ref = vecs @ dense.T
    np.testing.assert_allclose(got, ref, atol=1e-5 * float(jnp.abs(ref).max()), rtol=1e-4)


@pytest.mark.parametrize("tied,pattern,chunk_bytes,positions", [
    (True, "layers.mlp.down_proj", None, False), (True, "down_proj|embed_tokens", 4 * 2 * 61 * 4, False),
    (False, "layers.mlp.down_proj", 4 * 2 * 61 * 4, False), (False, "down_proj|lm_head", 4 * 2 * 61 * 4, False),
    (True, "down_proj|embed_tokens", None, True), (False, "down_proj|lm_head", 4 * 2 * 61 * 4, True)],
    ids=["whole", "tied-head-in-chunks", "untied-head-fixed", "untied-head-in-chunks", "tied-head-at-positions",
         "untied-head-at-positions-in-chunks"])
def test_gauss_newton_equals_dense_jacobian_product(model, target, tied, pattern, chunk_bytes, positions):
    """Against explicit per-token Jacobians, jitted with the parameters and data as arguments (as
    target_direction calls it): with the lm-head among the parameters or not, tied or not, the logits
    formed 4 positions at a time (chunk_bytes), where the head's own tangent and cotangent count, and at
    the loss positions of length-sorted batches only."""
    *_, batches = target
    exs = examples(5, np.random.default_rng(3), lengths=(6, 12))  # the fixture's samples
    if positions:
        exs = examples(5, np.random.default_rng(6), lengths=(30, 40))
        batches = data.sorted_batches(exs, 2, pad_id=0)
        assert all(b.loss_positions is not None and b.loss_positions.shape[1] < b.bucket - 1 for b in batches)
    if not tied:
        model = CausalLM(dataclasses.replace(CFG, tie_word_embeddings=False), rngs=nnx.Rngs(3))
    graphdef, sel, rest = split_params(model, pattern)
    rng = np.random.default_rng(5)
    flat0 = _flat(sel)
    vecs = jnp.asarray(rng.standard_normal((2, flat0.size)), jnp.float32)
    targets = target_arrays(batches)
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    gv = jax.jit(lambda s, r, t, vs: gauss_newton_vp((graphdef, r), t, vs, params=s, **kw))
    got = jax.vmap(_flat)(gv(sel, rest, targets, jax.vmap(lambda v: _unflat(v, sel))(vecs)))
    # Reference: explicit J (per trained token), explicit softmax Hessian, weights of the mean loss.
    total = sum(int(b.sample_mask.sum()) for b in batches)
    ref = np.zeros_like(np.asarray(vecs))
    for b in batches:
        def logits(v):
            return nnx.merge(graphdef, _unflat(v, sel), rest)(jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask))[:, :-1]

        jac = np.asarray(jax.jit(jax.jacfwd(logits))(flat0))  # [B, L-1, V, d]
        p = np.asarray(jax.nn.softmax(jax.jit(logits)(flat0), -1))
        for i in range(b.input_ids.shape[0]):
            if not b.sample_mask[i]:
                continue
            toks = np.flatnonzero(b.labels[i, 1:] != -100)
            for t in toks:
                h = np.diag(p[i, t]) - np.outer(p[i, t], p[i, t])
                j = jac[i, t]
                ref += (np.asarray(vecs) @ j.T @ h @ j) / len(toks) / total
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=1e-3)
    # PSD: v^T G v >= 0
    assert np.all(np.sum(np.asarray(got) * np.asarray(vecs), axis=1) >= -1e-7)
    # gradient_minus=eta: g_T - eta G v from the same linearisation; g_T the mean of a loop's jax.grad
    eta = 0.3
    direction = jax.jit(lambda s, r, t, vs, e: gauss_newton_vp((graphdef, r), t, vs, params=s, gradient_minus=e, **kw))
    got = jax.vmap(_flat)(direction(sel, rest, targets, jax.vmap(lambda v: _unflat(v, sel))(vecs), eta))
    g_mean = np.mean([loop_grad(model, ex, pattern) for ex in exs], axis=0)
    np.testing.assert_allclose(got, g_mean[None] - eta * ref, atol=1e-6, rtol=1e-3)


@functools.partial(jax.jit, static_argnums=0)
def _jit_target_gradient(graphdef, sel, rest, targets):
    return target_gradient((graphdef, rest), targets, params=sel)


@contextlib.contextmanager
def count_compilations():
    """The names of the XLA compilations made inside the block (jax.log_compiles records)."""
    names = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Compiling "):
                names.append(record.getMessage().split(" with ")[0])

    handler = Collect(level=logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


def test_target_direction_is_the_mean_gradient_and_compiles_once_per_shape(model, target):
    """v + offset = the mean of the per-sample gradients (a loop of jax.grad); offset = eta * H_T b
    (central finite differences of that gradient); a second target set of the same shapes reuses
    the compilations."""
    graphdef, sel, rest, batches = target
    exs = examples(5, np.random.default_rng(3), lengths=(6, 12))  # the fixture's samples
    pattern = "layers.mlp.down_proj"
    rng = np.random.default_rng(6)
    shift = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), sel)
    eta = 0.5
    v, offset = target_direction(model, batches, pattern, shift=shift, eta=eta, hessian="exact")
    g_mean = np.mean([loop_grad(model, ex, pattern) for ex in exs], axis=0)
    np.testing.assert_allclose(_flat(v) + _flat(offset), g_mean, rtol=1e-4, atol=1e-6)
    arrays = target_arrays(batches)
    eps = 1e-2

    def grad_at(sign):
        return _flat(_jit_target_gradient(graphdef, jax.tree.map(lambda x, b: x + sign * eps * b, sel, shift), rest,
                                          arrays))

    fd = (grad_at(1.0) - grad_at(-1.0)) / (2 * eps)
    assert float(jnp.linalg.norm(_flat(offset) - eta * fd) / jnp.linalg.norm(eta * fd)) < 1e-2
    # Gauss-Newton: with the offset (a gradient and a product) and without it (one linearisation), one v
    v_gn, offset_gn = target_direction(model, batches, pattern, shift=shift, eta=eta, hessian="gauss-newton")
    np.testing.assert_allclose(_flat(v_gn) + _flat(offset_gn), g_mean, rtol=1e-4, atol=1e-6)
    v_alone, none = target_direction(model, batches, pattern, shift=shift, eta=eta, hessian="gauss-newton",
                                     offset=False)
    assert none is None
    np.testing.assert_allclose(_flat(v_alone), _flat(v_gn), rtol=1e-4, atol=1e-6)
    # Another target set with the same batch shapes: new values, no new compilation.
    other = data.make_batches(examples(5, np.random.default_rng(9), lengths=(6, 12)), 2, (16,), pad_id=0)
    assert [b.input_ids.shape for b in other] == [b.input_ids.shape for b in batches]
    with count_compilations() as compiled:
        v2, _ = target_direction(model, other, pattern, shift=shift, eta=eta, hessian="exact")
    assert compiled == [], compiled
    assert not np.allclose(_flat(v2), _flat(v))


def test_projected_curvature_against_finite_differences_and_shared_compilation(model, target):
    """ProjectedCurvature gives u = g / |g| and h = H_T u (central differences of the target gradient);
    another target set of the same shapes reuses the compiled function and gives other products."""
    graphdef, sel, rest, batches = target
    pattern = "layers.mlp.down_proj"
    sources = examples(2, np.random.default_rng(7), lengths=(9,))
    (batch,) = data.make_batches(sources, 2, (16,), pad_id=0)
    cfg = GradientConfig(params=pattern, normalize=True)
    curv = ProjectedCurvature(model, Projector("none", 0), batches, cfg, hessian="exact")
    u, h = (np.asarray(x) for x in curv(batch))
    compiled = curv._fn._cache_size()
    arrays = target_arrays(batches)
    eps = 1e-2
    for i, ex in enumerate(sources):
        g = loop_grad(model, ex, pattern)
        np.testing.assert_allclose(u[i], g / np.linalg.norm(g), rtol=1e-4, atol=1e-6)
        step = _unflat(jnp.asarray(u[i]), sel)

        def grad_at(sign):
            return _flat(_jit_target_gradient(graphdef, jax.tree.map(lambda x, d: x + sign * eps * d, sel, step),
                                              rest, arrays))

        fd = np.asarray((grad_at(1.0) - grad_at(-1.0)) / (2 * eps))
        assert np.linalg.norm(h[i] - fd) / np.linalg.norm(fd) < 1e-2
    other_targets = data.make_batches(examples(5, np.random.default_rng(9), lengths=(6, 12)), 2, (16,), pad_id=0)
    other = ProjectedCurvature(model, Projector("none", 0), other_targets, cfg, hessian="exact")
    _, h2 = other(batch)
    assert other._fn is curv._fn and curv._fn._cache_size() == compiled
    assert not np.allclose(np.asarray(h2), h)


# ----------------------------------------------------------------------------- the public functional core


def test_mean_response_loss_equals_a_numpy_loop():
    rng = np.random.default_rng(10)
    logits = rng.standard_normal((3, 7, 11)).astype(np.float32)
    labels = rng.integers(0, 11, (3, 7))
    labels[0, :4] = -100
    labels[2, :] = -100  # no response token: loss 0, never NaN
    got = np.asarray(mean_response_loss(jnp.asarray(logits), jnp.asarray(labels)))
    sums, counts = (np.asarray(x) for x in response_loss_sums(jnp.asarray(logits), jnp.asarray(labels)))
    for b in range(3):
        terms = []
        for t in range(6):
            if labels[b, t + 1] != -100:
                z = logits[b, t].astype(np.float64)
                terms.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[labels[b, t + 1]])
        ref = np.mean(terms) if terms else 0.0
        np.testing.assert_allclose(got[b], ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sums[b], np.sum(terms), rtol=1e-5, atol=1e-6)
        assert counts[b] == len(terms)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_loss_equals_a_numpy_loop_and_never_holds_the_logits(tied):
    """sample_losses with the logits cut into position chunks: the values and gradients of the whole-logits
    loss (a numpy loop over tokens for the values), and by the compiler's memory analysis its gradient
    program's temporaries stay under one [B, L, V] float32 block (the whole-logits program's do not)."""
    cfg = ModelConfig(model_type="llama", vocab_size=4096, hidden_size=16, intermediate_size=24, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=tied)
    m = CausalLM(cfg, rngs=nnx.Rngs(5))
    rng = np.random.default_rng(2)
    ids = rng.integers(1, cfg.vocab_size, (4, 96)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 70:] = 0
    labels = np.where(rng.random(ids.shape) < 0.6, ids, -100).astype(np.int32)
    labels[1, 70:] = -100
    labels[3] = -100  # no response token: 0, never NaN
    logits_bytes = 4 * 4 * 96 * cfg.vocab_size
    graphdef, params = nnx.split(m)

    def loss(p, chunk_bytes):
        return jnp.sum(sample_losses(nnx.merge(graphdef, p), ids, mask, labels, chunk_bytes=chunk_bytes))

    chunked = logits_bytes // 12  # 8 positions per chunk: 95 positions in 12 chunks, the last one padded
    values = np.asarray(sample_losses(m, ids, mask, labels, chunk_bytes=chunked))
    logits = np.asarray(m(ids, mask), np.float64)
    for b in range(4):
        terms = [np.log(np.exp(logits[b, t] - logits[b, t].max()).sum()) + logits[b, t].max()
                 - logits[b, t, labels[b, t + 1]] for t in range(95) if labels[b, t + 1] != -100]
        np.testing.assert_allclose(values[b], np.mean(terms) if terms else 0.0, rtol=1e-5)
    # At the loss positions only (-1 padded, as data.Batch.loss_positions): the same values, whole and chunked,
    # and the compiled program does less work (the lm-head is outside the layer scan, so the count sees it).
    where = [np.flatnonzero(labels[b, 1:] != -100) for b in range(4)]
    positions = np.full((4, max(map(len, where)) + 3), -1, np.int32)
    for b, w in enumerate(where):
        positions[b, :len(w)] = w
    assert positions.shape[1] < 95
    for c in (logits_bytes, chunked):
        at = np.asarray(sample_losses(m, ids, mask, labels, chunk_bytes=c, positions=positions))
        np.testing.assert_allclose(at, values, rtol=1e-5, atol=1e-7)
    missing = positions.copy()
    missing[0, 0] = -1  # a row's positions that leave out one of its loss tokens: NaN, never a smaller loss
    at = np.asarray(sample_losses(m, ids, mask, labels, positions=missing))
    assert np.isnan(at[0]) and np.allclose(at[1:], values[1:], rtol=1e-5, atol=1e-7)

    def flops(p):
        fn = jax.jit(lambda q: jnp.sum(sample_losses(nnx.merge(graphdef, q), ids, mask, labels, positions=p)))
        cost = fn.lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    assert flops(positions) < 0.8 * flops(None)
    grad = {c: jax.jit(jax.grad(loss), static_argnums=1).lower(params, c).compile() for c in (logits_bytes, chunked)}
    for x, y in zip(jax.tree.leaves(grad[logits_bytes](params)), jax.tree.leaves(grad[chunked](params)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-7)
    temp = {c: compiled.memory_analysis().temp_size_in_bytes for c, compiled in grad.items()}
    assert temp[chunked] < logits_bytes < temp[logits_bytes]


def _arrays(batch):
    return jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels)


def test_per_example_gradients_in_a_users_jit_vmap_and_shard_map(model):
    """The public function with keyword arguments: in a caller's jit (model as a module or as a
    (graphdef, state) pair; params as a regex or an already-split State), vmapped over two models,
    and under shard_map, always equal to a loop of jax.grad."""
    exs = examples(6, np.random.default_rng(11), lengths=(7, 12))
    (batch,) = data.make_batches(exs, 6, (16,), pad_id=0)
    ids, mask, labels = _arrays(batch)
    pattern = "mlp.down_proj"
    ref = np.stack([loop_grad(model, ex, pattern) for ex in exs])
    jitted = jax.jit(functools.partial(per_example_gradients, params=pattern, microbatch=2))
    np.testing.assert_allclose(jitted(model, ids, mask, labels), ref, atol=2e-6, rtol=1e-4)
    graphdef, state = nnx.split(model)
    np.testing.assert_allclose(jitted((graphdef, state), ids, mask, labels), ref, atol=2e-6, rtol=1e-4)
    _, sel, rest = split_params(model, pattern)

    @jax.jit
    def with_selection(sel, rest):
        return per_example_gradients((graphdef, rest), ids, mask, labels, params=sel, microbatch=3)

    np.testing.assert_allclose(with_selection(sel, rest), ref, atol=2e-6, rtol=1e-4)
    # vmap over a stack of two selections (the model's and a scaled one).
    other = jax.tree.map(lambda x: 1.5 * x, sel)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), sel, other)
    both = jax.vmap(with_selection, in_axes=(0, None))(stacked, rest)
    scaled = nnx.merge(graphdef, other, rest)
    np.testing.assert_allclose(both[0], ref, atol=2e-6, rtol=1e-4)
    ref_scaled = np.stack([loop_grad(scaled, ex, pattern) for ex in exs])
    np.testing.assert_allclose(both[1], ref_scaled, atol=2e-6, rtol=1e-4)
    # shard_map: rows split over the local devices, parameters replicated.
    from jax.sharding import Mesh, PartitionSpec as P

    n = jax.local_device_count() if 6 % jax.local_device_count() == 0 else 1
    mesh = Mesh(np.array(jax.local_devices()[:n]), ("data",))
    body = functools.partial(per_example_gradients, (graphdef, state), params=pattern)
    sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data")))
    np.testing.assert_allclose(sharded(ids, mask, labels), ref, atol=2e-6, rtol=1e-4)


def test_per_example_gradients_with_offset_precondition_and_sketch(model):
    """u_i = a * (g_i - offset), normalised, then sketched: against the loop reference and the projector."""
    exs = examples(4, np.random.default_rng(12), lengths=(9,))
    (batch,) = data.make_batches(exs, 4, (16,), pad_id=0)
    _, sel, _ = split_params(model, "layers.mlp")
    rng = np.random.default_rng(13)
    a = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32), sel)
    off = jax.tree.map(lambda x: jnp.asarray(1e-2 * rng.standard_normal(x.shape), jnp.float32), sel)
    proj = Projector("srht", 32, seed=4)
    got = per_example_gradients(model, *_arrays(batch), params="layers.mlp", projector=proj, precondition=a,
                                offset=off, normalize=True)
    for i, ex in enumerate(exs):
        u = np.asarray(_flat(a)) * (loop_grad(model, ex, "layers.mlp") - np.asarray(_flat(off)))
        ref = proj.project(_unflat(jnp.asarray(u / np.linalg.norm(u)), sel))
        np.testing.assert_allclose(got[i], ref, atol=1e-5)


@pytest.mark.parametrize("pattern", ["layers", "down_proj|^norm"])
def test_gradients_from_a_first_layer_equal_the_loop_with_the_layers_below_zeroed(pattern):
    """first_layer=2 of 3: the backward pass stops at layer 2, the layers below run forward only. Against
    the full loop gradient with layers 0-1 zeroed (numpy), through the shell's buckets, padded rows and
    microbatches, with a preconditioner and a shift; the final norm (above every layer) is kept whole."""
    model = CausalLM(dataclasses.replace(CFG, num_layers=3), rngs=nnx.Rngs(7))
    exs = examples(7, np.random.default_rng(21), no_response={3})
    batches = data.make_batches(exs, 4, (8, 16, 32), pad_id=0)
    _, sel, _ = split_params(model, pattern)
    rng = np.random.default_rng(22)
    a = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 2.0, x.shape), jnp.float32), sel)
    off = jax.tree.map(lambda x: jnp.asarray(1e-2 * rng.standard_normal(x.shape), jnp.float32), sel)
    pg = PerExampleGradients(model, Projector("none", 0),
                             GradientConfig(params=pattern, normalize=False, microbatch=2, first_layer=2),
                             precondition=a, offset=off)
    got = pg.run(batches)
    below = np.concatenate([np.ravel(np.broadcast_to(
        (np.arange(x.shape[0]) < 2).reshape((-1,) + (1,) * (x.ndim - 1)) if "layers" in jax.tree_util.keystr(p)
        else np.zeros((1,) * x.ndim, bool), x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(sel)])
    assert 0 < below.sum() < below.size
    for ex in exs:
        ref = np.asarray(_flat(a)) * (loop_grad(model, ex, pattern) - np.asarray(_flat(off)))
        ref[below] = 0.0
        if ex.index == 3:
            ref[:] = 0.0  # no response token: no gradient
        np.testing.assert_allclose(got[ex.index], ref, atol=2e-6, rtol=1e-4)
    assert np.abs(got[:, below]).max() == 0 and np.abs(got[:, ~below]).max() > 0


@pytest.mark.parametrize("pattern, first_layer, microbatch", [(None, 0, None), ("layers", 1, 2)])
def test_gradients_with_the_lm_head_at_the_loss_positions_equal_a_loop(model, pattern, first_layer, microbatch):
    """Length-sorted batches carry loss_positions (shorter than their length): the per-example gradients
    and the landmark curvature's u = g / |g| still equal the loop over unpadded samples (all positions), with
    microbatches and a first layer (the loop's gradient zeroed below it)."""
    exs = examples(9, np.random.default_rng(31), lengths=(40, 64, 90), no_response={2})
    batches = data.sorted_batches(exs, 4, pad_id=0)
    assert all(b.loss_positions is not None and b.loss_positions.shape[1] < b.bucket - 1 for b in batches)
    pg = PerExampleGradients(model, Projector("none", 0), GradientConfig(params=pattern, normalize=False,
                                                                       microbatch=microbatch, first_layer=first_layer))
    got = pg.run(batches)
    _, sel, _ = split_params(model, pattern)
    below = np.concatenate([np.ravel(np.broadcast_to(
        (np.arange(x.shape[0]) < first_layer).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape))
        for x in jax.tree.leaves(sel)])
    for ex in exs:
        ref = np.where(below, 0.0, loop_grad(model, ex, pattern))
        np.testing.assert_allclose(got[ex.index], ref, atol=2e-6, rtol=1e-4)
    assert np.all(got[2] == 0)
    if first_layer == 0:  # the curvature's u at the loss positions
        curv = ProjectedCurvature(model, Projector("none", 0), batches[:1], GradientConfig(params=pattern))
        u, _ = curv(batches[1])
        for r, i in enumerate(batches[1].indices):
            g = loop_grad(model, exs[i], pattern)
            np.testing.assert_allclose(np.asarray(u[r]), g / np.linalg.norm(g), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["srht", "rademacher"])
def test_a_first_layer_sketch_skips_the_layers_below_and_keeps_the_rows(model, kind):
    """With first_layer the sketch leaves out the blocks of the layers below (zero in every gradient): the
    rows still equal the sketch of the loop's gradient with those layers zeroed, normalised."""
    exs = examples(5, np.random.default_rng(41), lengths=(9, 20))
    proj = Projector(kind, 48, seed=1, block_size=16)
    pg = PerExampleGradients(model, proj, GradientConfig(params="layers", normalize=True, first_layer=1))
    got = pg.run(data.sorted_batches(exs, 2, pad_id=0))
    _, sel, _ = split_params(model, "layers")
    below = np.concatenate([np.ravel(np.broadcast_to(
        (np.arange(x.shape[0]) < 1).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)) for x in jax.tree.leaves(sel)])
    for ex in exs:
        ref = np.where(below, 0.0, loop_grad(model, ex, "layers")).astype(np.float32)
        want = np.asarray(proj.project(_unflat(jnp.asarray(ref), sel), normalize=True))
        np.testing.assert_allclose(got[ex.index], want, rtol=1e-4, atol=2e-6)


def test_a_first_layer_needs_parameters_at_or_above_it(model):
    with pytest.raises(ValueError, match="embed_tokens.embedding, which the layers below feed"):
        PerExampleGradients(model, Projector("none", 0), GradientConfig(params="embed|down_proj", first_layer=1))
    with pytest.raises(ValueError, match=r"first_layer must be in \[0, 2\) for this 2-layer model, got 2"):
        PerExampleGradients(model, Projector("none", 0), GradientConfig(params="down_proj", first_layer=2))


def test_landmark_curvature_and_hessian_products_on_arrays(model, target):
    """landmark_curvature on one target batch of arrays in a user's jit equals the shell, and h is the
    exact Hessian product (hessian_products) of u."""
    graphdef, sel, rest, batches = target
    pattern = "layers.mlp.down_proj"
    sources = examples(2, np.random.default_rng(14), lengths=(9,))
    (batch,) = data.make_batches(sources, 2, (16,), pad_id=0)
    (tb,) = data.make_batches(examples(3, np.random.default_rng(15), lengths=(6, 12)), 3, (16,), pad_id=0)
    one_batch = (*_arrays(tb), jnp.asarray(tb.sample_mask))
    fn = jax.jit(lambda ids, m, l, t: landmark_curvature(model, ids, m, l, targets=t, params=pattern,
                                                         normalize=True, hessian="gauss-newton"))
    u, h = fn(*_arrays(batch), one_batch)
    shell = ProjectedCurvature(model, Projector("none", 0), [tb], GradientConfig(params=pattern, normalize=True),
                               hessian="gauss-newton")
    su, sh = shell(batch)
    np.testing.assert_allclose(u, su, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(h, sh, rtol=1e-4, atol=1e-7)
    vecs = jax.vmap(lambda x: _unflat(x, sel))(u)
    ref = jax.vmap(_flat)(hessian_products(model, one_batch, vecs, params=pattern, kind="gauss-newton"))
    np.testing.assert_allclose(h, ref, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="hessian"):
        landmark_curvature(model, *_arrays(batch), targets=one_batch, hessian="fisher")


@pytest.mark.parametrize("kind", ["exact", "gauss-newton"])
def test_a_bfloat16_model_takes_float32_directions(model, target, kind):
    """Order 2 on a bfloat16 model: the update model's b and a * g arrive in float32, and forward mode
    wants tangents of the parameters' dtype. The products run and agree with the float32 model's to
    bfloat16 precision."""
    _, sel, _, batches = target
    tb = batches[0]
    one = (*_arrays(tb), jnp.asarray(tb.sample_mask))
    pattern = "layers.mlp.down_proj"
    low = CausalLM(CFG, dtype=jnp.bfloat16, rngs=nnx.Rngs(3))
    nnx.update(low, jax.tree.map(lambda x: x.astype(jnp.bfloat16), nnx.state(model, nnx.Param)))
    vecs = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), (2, *x.shape), jnp.float32), sel)
    ref = jax.vmap(_flat)(hessian_products(model, one, vecs, params=pattern, kind=kind))
    got = jax.vmap(_flat)(hessian_products(low, one, vecs, params=pattern, kind=kind)).astype(jnp.float32)
    assert jax.tree.leaves(split_params(low, pattern)[1])[0].dtype == jnp.bfloat16
    assert float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref)) < 0.05
