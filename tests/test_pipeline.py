"""The selection pipeline against independent references: a PyTorch per-sample loop, dense Hessians, scipy."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
import torch
from flax import nnx
from jax.flatten_util import ravel_pytree

import idjax.models as M
from idjax import data
from idjax.embed import EmbedConfig
from idjax.grads import sample_losses, split_params
from idjax.optim import OptimizerSpec, update_model
from idjax.pipeline import SelectConfig, select_samples
from idjax.propagator import Propagator
from conftest import random_examples, tiny_llama

VOCAB = 89


def _examples(n, seed, prefix):
    return random_examples(n, seed, prefix, vocab=VOCAB)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", vocab=VOCAB, seed=0)


def _torch_grad(hf, examples):
    """Gradient of the mean over `examples` of their mean response-token loss, one sample at a time."""
    hf.zero_grad()
    for ex in examples:
        logits = hf(input_ids=torch.tensor(ex.input_ids[None], dtype=torch.long)).logits[0, :-1]
        target = torch.tensor(ex.labels[1:], dtype=torch.long)
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="mean")
        (loss / len(examples)).backward()
    return torch.cat([p.grad.reshape(-1) for p in hf.parameters()]).double().numpy()


def test_exact_first_order_scores_equal_torch_cosines(tiny_hf, tmp_path):
    hf, path = tiny_hf
    model, _ = M.load(path, tokenizer=False)
    pool, targets = _examples(10, 1, "p"), _examples(3, 2, "t")
    g_t = _torch_grad(hf, targets)
    ref = np.array([g @ g_t / np.linalg.norm(g) / np.linalg.norm(g_t) for g in (_torch_grad(hf, [x]) for x in pool)])
    cfg = SelectConfig(k=4, exact=True, proj_dim=0, batch_size=4, microbatch=2)
    sel = select_samples(model, pool, targets, cfg, store_dir=tmp_path / "store")
    np.testing.assert_allclose(sel.scores, ref, atol=1e-4)
    np.testing.assert_array_equal(sel.rows, np.argsort(-ref, kind="stable")[:4])
    # first-order weights: the support is the top k of the scores and they sum to 1
    assert set(np.flatnonzero(sel.weights > 0)) <= set(sel.rows.tolist())
    assert abs(sel.weights.sum() - 1) < 1e-5
    # a re-run reuses the gradient store and gives the same answer
    again = select_samples(model, pool, targets, cfg, store_dir=tmp_path / "store")
    np.testing.assert_array_equal(again.scores, sel.scores)
    # recomputed activations (--remat): the torch cosines again, and the caller's model is left as it was
    lean = select_samples(model, pool, targets, dataclasses.replace(cfg, remat=True), store_dir=tmp_path / "remat")
    np.testing.assert_allclose(lean.scores, ref, atol=1e-4)
    assert not getattr(model, "remat", False)
    # sketched, the gradients layer by layer (--layerwise): the whole gradients' sketched scores and rows
    sketched = dataclasses.replace(cfg, proj_dim=64)
    whole = select_samples(model, pool, targets, sketched, store_dir=tmp_path / "sketched")
    layered = select_samples(model, pool, targets, dataclasses.replace(sketched, layerwise=True),
                             store_dir=tmp_path / "layerwise")
    np.testing.assert_allclose(layered.scores, whole.scores, atol=1e-5)
    np.testing.assert_array_equal(layered.rows, whole.rows)
    with pytest.raises(ValueError, match="layerwise needs a sketch"):
        dataclasses.replace(cfg, layerwise=True)


@pytest.mark.parametrize("damage", ["nan", "flip"])
def test_a_damaged_store_chunk_is_recomputed(damage, tiny_hf, tmp_path, caplog):
    """A gradient chunk overwritten with NaN, or with one flipped bit, is reported by file and recomputed:
    the selection equals the clean run's."""
    model, _ = M.load(tiny_hf[1], tokenizer=False)
    pool, targets = _examples(8, 5, "p"), _examples(3, 6, "t")
    cfg = SelectConfig(k=3, exact=True, proj_dim=16, batch_size=4, chunk_rows=4)
    first = select_samples(model, pool, targets, cfg, store_dir=tmp_path)
    (grads,) = tmp_path.glob("gradients-*")
    chunk = grads / "chunk-000001.npy"
    raw = bytearray(chunk.read_bytes())
    start = len(raw) - 24 - 4 * 16 * 4  # the array's bytes sit between the .npy header and the trailer
    if damage == "nan":
        raw[start:start + 64] = np.full(16, np.nan, np.float32).tobytes()
    else:
        raw[start + 5] ^= 0x04
    chunk.write_bytes(bytes(raw))
    with caplog.at_level("WARNING", logger="idjax.store"):
        again = select_samples(model, pool, targets, cfg, store_dir=tmp_path)
    assert f"store {grads}: chunk 1 file chunk-000001.npy is unusable (checksum mismatch" in caplog.text
    np.testing.assert_array_equal(again.rows, first.rows)
    np.testing.assert_allclose(again.scores, first.scores, rtol=1e-6)


def test_target_direction_is_cached_per_targets(tiny_hf, tmp_path, monkeypatch, caplog):
    import idjax.pipeline as P

    model, _ = M.load(tiny_hf[1], tokenizer=False)
    pool, targets, others = _examples(8, 5, "p"), _examples(3, 6, "t"), _examples(3, 7, "u")
    update = update_model(OptimizerSpec("adamw", 1e-3, weight_decay=0.1), None, nnx.state(model, nnx.Param))
    cfg = SelectConfig(k=3, exact=True, proj_dim=16, batch_size=4)
    first = select_samples(model, pool, targets, cfg, update=update, store_dir=tmp_path)
    path = Path(first.info["stores"]["targets"])
    assert path.exists()
    calls = []
    real = P.target_direction
    monkeypatch.setattr(P, "target_direction", lambda *a, **k: calls.append(1) or real(*a, **k))
    # another k reads the file: no target gradient or HVP, the same scores
    again = select_samples(model, pool, targets, dataclasses.replace(cfg, k=5), update=update, store_dir=tmp_path)
    assert calls == [] and len(again.rows) == 5
    np.testing.assert_array_equal(again.scores, first.scores)
    # other targets, or another update model, compute their own
    select_samples(model, pool, others, cfg, update=update, store_dir=tmp_path)
    select_samples(model, pool, targets, cfg, update=None, store_dir=tmp_path)
    assert len(calls) == 2
    # a damaged file (garbage, cut short, one flipped byte) is recomputed with a warning naming it, to the
    # same values
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[good.index(b"v_proj") + 200] ^= 0x01  # inside the stored array: only the zip's CRC-32 sees it
    for n, damaged in enumerate([b"not an npz", good[: len(good) // 2], bytes(flipped)], start=3):
        path.write_bytes(damaged)
        caplog.clear()
        with caplog.at_level("WARNING", logger="idjax.pipeline"):
            healed = select_samples(model, pool, targets, cfg, update=update, store_dir=tmp_path)
        assert len(calls) == n and f"recomputing the target direction: {path} is unreadable" in caplog.text
        np.testing.assert_allclose(healed.scores, first.scores, rtol=1e-6)
        assert path.read_bytes() != damaged


def test_landmarks_keep_exact_values(tiny_hf, tmp_path):
    model, _ = M.load(tiny_hf[1], tokenizer=False)
    pool, targets = _examples(16, 3, "p"), _examples(2, 4, "t")
    base = SelectConfig(k=3, proj_dim=0, batch_size=4, embed=EmbedConfig(num_blocks=1, dim=16), chunk_rows=5)
    exact = select_samples(model, pool, targets, dataclasses.replace(base, exact=True), store_dir=tmp_path)
    every = select_samples(model, pool, targets, dataclasses.replace(base, landmarks=16), store_dir=tmp_path)
    np.testing.assert_allclose(every.scores, exact.scores, atol=1e-6)
    for kind in ("krr", "ridge"):
        half = select_samples(model, pool, targets, dataclasses.replace(base, landmarks=0.5, propagation=kind),
                              store_dir=tmp_path)
        assert len(half.landmarks) == 8
        np.testing.assert_allclose(half.scores[half.landmarks], exact.scores[half.landmarks], atol=1e-5)
        assert np.isfinite(half.scores).all() and half.info["stores"]["embeddings"]


def test_second_order_with_c_streamed_equals_c_cached(tiny_hf, tmp_path, monkeypatch, caplog):
    """Order 2 with landmarks: when C [N, l] is over the device budget, every product Q_hat w streams E
    through the kernel instead of refusing, and the weights and rows equal those of the cached C."""
    model, _ = M.load(tiny_hf[1], tokenizer=False)
    pool, targets = _examples(16, 3, "p"), _examples(2, 4, "t")
    cfg = SelectConfig(k=3, landmarks=0.5, order=2, proj_dim=0, batch_size=4, learning_rate=0.5, params="down_proj",
                       embed=EmbedConfig(num_blocks=1, dim=16), chunk_rows=5)
    cached = select_samples(model, pool, targets, cfg, store_dir=tmp_path)
    fit = Propagator.fit.__func__
    monkeypatch.setattr(Propagator, "fit", classmethod(lambda cls, *a, **k: fit(cls, *a, **{**k, "cache_bytes": 0})))
    with caplog.at_level("INFO", logger="idjax.propagation"):
        streamed = select_samples(model, pool, targets, cfg, store_dir=tmp_path)
    assert "second-order products stream E" in caplog.text
    assert cached.info["solver"]["support"] > 0 and streamed.info["solver"]["converged"]
    np.testing.assert_allclose(streamed.weights, cached.weights, atol=1e-5)
    np.testing.assert_array_equal(streamed.rows, cached.rows)


def _simplex_qp(p, q, eta, lam):
    n = len(p)
    f = lambda w: -p @ w + 0.5 * eta * w @ q @ w + 0.5 * lam * w @ w  # noqa: E731
    jac = lambda w: -p + eta * q @ w + lam * w  # noqa: E731
    best = None
    for start in [np.full(n, 1 / n), *np.eye(n)[:3]]:
        r = scipy.optimize.minimize(f, start, jac=jac, method="SLSQP", bounds=[(0, None)] * n,
                                    constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1, "jac": lambda w: np.ones(n)}],
                                    options={"ftol": 1e-14, "maxiter": 1000})
        if best is None or r.fun < best.fun:
            best = r
    return best.x


@pytest.mark.parametrize("hessian, first_layer", [("exact", 0), ("gauss-newton", 0), ("exact", 1)])
def test_second_order_adamw_weights_match_dense_reference(hessian, first_layer, tmp_path):
    """p = U (g_T - eta H b), Q = U H U^T with U the normalised rows a * g_i (docs/method.md 3), H a dense Hessian.
    first_layer=1: the same over the coordinates of layer 1 alone (H its block, g and b their parts)."""
    cfg = M.ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=12, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    model = M.CausalLM(cfg, rngs=nnx.Rngs(5))
    params = nnx.state(model, nnx.Param)
    spec = OptimizerSpec("adamw", 1e-2, weight_decay=0.1)
    tx, state = spec.build(), spec.build().init(params)
    for s in range(3):  # a few steps on random gradients: non-trivial m, v, count
        g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(s), x.shape), params)
        _, state = tx.update(g, state, params)
    update = update_model(spec, state, params)  # AdamW's a and b do not depend on the learning rate
    pool, targets = _examples(7, 6, "p"), _examples(3, 7, "t")

    graphdef, selected, rest = split_params(model, "down_proj")
    flat0, unravel = ravel_pytree(selected)
    restrict = lambda tree: ravel_pytree(  # noqa: E731
        nnx.from_flat_state([(k, dict(nnx.to_flat_state(tree))[k]) for k, _ in nnx.to_flat_state(selected)]))[0]
    a, b = np.asarray(restrict(update.a), np.float64), np.asarray(restrict(update.b), np.float64)

    def loss_of(examples):
        def f(flat):
            m = nnx.merge(graphdef, unravel(flat), rest)
            return jnp.mean(jnp.stack([sample_losses(m, jnp.asarray(e.input_ids[None]), jnp.ones((1, len(e.input_ids)),
                                       jnp.int32), jnp.asarray(e.labels[None]))[0] for e in examples]))
        return f

    target = loss_of(targets)
    if hessian == "exact":
        h = np.asarray(jax.jit(jax.hessian(target))(flat0), np.float64)
    else:  # J^T H_out J of the logits, per target sample, averaged
        h = np.zeros((flat0.size, flat0.size))
        for e in targets:
            ids = jnp.asarray(e.input_ids[None])
            logits_fn = lambda fl: nnx.merge(graphdef, unravel(fl), rest)(ids)[0, :-1]  # noqa: E731
            jac = np.asarray(jax.jit(jax.jacobian(logits_fn))(flat0), np.float64)  # [T, V, d]
            prob = np.asarray(jax.nn.softmax(logits_fn(flat0)), np.float64)   # [T, V]
            tok = e.labels[1:] != data.IGNORE_INDEX
            for t in np.flatnonzero(tok):
                hout = np.diag(prob[t]) - np.outer(prob[t], prob[t])
                h += jac[t].T @ hout @ jac[t] / tok.sum() / len(targets)
    g_t = np.asarray(jax.jit(jax.grad(target))(flat0), np.float64)
    u = np.stack([a * np.asarray(jax.jit(jax.grad(loss_of([e])))(flat0), np.float64) for e in pool])
    if first_layer:  # the parameters of layer 1 alone: the second half of the stacked down_proj
        upper = np.arange(flat0.size) >= flat0.size // 2
        h, g_t, u, b = h[np.ix_(upper, upper)], g_t[upper], u[:, upper], b[upper]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    q = u @ h @ u.T
    # Pick eta so that the curvature term is as large as the budget's ridge: order 2 must matter.
    budget_lam = lambda p: np.sum(np.sort(p)[::-1][:3] - np.sort(p)[::-1][3])  # noqa: E731
    eta = 0.5 * budget_lam(u @ g_t) / np.linalg.norm(q, 2)
    update = dataclasses.replace(update, eta=float(eta))
    v = g_t - eta * h @ b
    p = u @ v
    lam = float(budget_lam(p))
    sc = SelectConfig(k=3, exact=True, proj_dim=0, order=2, hessian=hessian, params="down_proj", lam=lam,
                      batch_size=4, first_layer=first_layer)
    sel = select_samples(model, pool, targets, sc, update=update, store_dir=tmp_path)
    np.testing.assert_allclose(sel.scores, p / np.linalg.norm(v), atol=2e-4)
    w = _simplex_qp(p, q, eta, lam)
    np.testing.assert_allclose(sel.weights, w, atol=2e-4)
    assert np.abs(w - _simplex_qp(p, 0 * q, eta, lam)).max() > 1e-2  # the Hessian term changed the weights
    assert sel.info["solver"]["converged"]
