"""Tests for idjax.optim: the affine update model against optax's real update."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idjax.optim import OptimizerSpec, UpdateModel, update_model

WARM_STEPS = 6
SPECS = {
    "sgd": OptimizerSpec("sgd", 0.1),
    "sgd-momentum-wd": OptimizerSpec("sgd", 0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov-wd": OptimizerSpec("sgd", 0.1, momentum=0.9, nesterov=True, weight_decay=0.01,
                                     schedule="linear", warmup_steps=2, total_steps=20),
    "adam": OptimizerSpec("adam", 1e-3, schedule="cosine", warmup_steps=3, total_steps=20),
    "adamw": OptimizerSpec("adamw", 1e-3, schedule="cosine", warmup_steps=3, total_steps=20,
                           weight_decay=0.05, clip_norm=100.0),
    "nadamw": OptimizerSpec("adamw", 1e-3, b2=0.99, nesterov=True, weight_decay=0.05),
}


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {"dense": {"w": jax.random.normal(k1, (4, 3)), "b": jax.random.normal(k2, (3,))},
            "scale": jax.random.normal(k3, (5,))}


def _like(params, seed, scale):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return tdef.unflatten([scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def _warm(spec, steps=WARM_STEPS):
    """Train a few steps on random unit-scale gradients; return (tx, state, params)."""
    params, tx = _params(), spec.build()
    state = tx.init(params)
    for s in range(steps):
        updates, state = tx.update(_like(params, 100 + s, 1.0), state, params)
        params = optax.apply_updates(params, updates)
    return tx, state, params


def _leaves(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", list(SPECS))
def test_model_matches_optax_update(name):
    spec = SPECS[name]
    tx, state, params = _warm(spec)
    model = update_model(spec, state, params)
    zero = jax.tree.map(jnp.zeros_like, params)
    actual = lambda g: _leaves(tx.update(g, state, params)[0])
    pred = lambda g: _leaves(model.step(g))

    # b: at g = 0 the dropped (1-b2) g^2 term vanishes, so -eta*b is optax's update; the model
    # follows optax's order of operations (bias corrections included), so only a few float32
    # roundings (~1e-7 each) may differ: rtol 1e-6. atol covers exact zeros (plain SGD).
    np.testing.assert_allclose(pred(zero), actual(zero), rtol=1e-6, atol=1e-12)

    # a: the derivative of optax's update at g = 0 is exactly -eta * a (d/dg of g^2 is 0 there);
    # a jvp computes it without the cancellation a finite difference would suffer.
    h = _like(params, 7, 1.0)
    _, d_actual = jax.jvp(lambda g: tx.update(g, state, params)[0], (zero,), (h,))
    d_pred = jax.tree.map(lambda x: -model.eta * x, model.precondition(h))
    np.testing.assert_allclose(_leaves(d_pred), _leaves(d_actual), rtol=2e-6, atol=1e-12)

    # A small gradient, 1e-4 of the warm-up gradients' scale: the residual of the model is the
    # dropped (1-b2) g^2 term, relative size (1-b2) g^2 / (2 b2 v) ~ 1e-9 here (v ~ 5e-3),
    # below float32 resolution, so the full update agrees to float32 rounding of a handful of
    # operations (measured <= 5e-7): rtol 2e-6.
    g = _like(params, 8, 1e-4)
    np.testing.assert_allclose(pred(g), actual(g), rtol=2e-6, atol=1e-12)

    # The model is linear in g: differences of predictions are -eta * a * (g1 - g2).
    g1, g2 = _like(params, 9, 1.0), _like(params, 10, 1.0)
    diff = jax.tree.map(lambda u, v: u - v, g1, g2)
    np.testing.assert_allclose(pred(g1) - pred(g2), _leaves(model.step(diff)) - pred(zero),
                               rtol=1e-4, atol=1e-6 * np.abs(pred(g1)).max())


@pytest.mark.parametrize("name", ["adam", "nadamw"])
def test_adam_residual_is_the_dropped_second_moment_term(name):
    """For g as large as sqrt(v), the model is off only by the (1-b2) g^2 term in v.

    That term raises Adam's denominator by a factor sqrt(1 + delta) <= 1 + delta/2 with
    delta = (1-b2) g^2 / (b2 v), so elementwise |model - optax| <= (delta/2) |Adam part of the
    model's step| (the decoupled decay eta*wd*theta is exact). Slack: 1.05x plus float32
    rounding (1e-6 relative).
    """
    spec = SPECS[name]
    tx, state, params = _warm(spec)
    model = update_model(spec, state, params)
    adam = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]
    g = jax.tree.map(lambda v, z: jnp.sqrt(v) * z, adam.nu, _like(params, 11, 1.0))
    actual = _leaves(tx.update(g, state, params)[0])
    pred = _leaves(model.step(g))
    adam_part = pred + model.eta * spec.weight_decay * _leaves(params)
    half_delta = (1 - spec.b2) * _leaves(g) ** 2 / (2 * spec.b2 * _leaves(adam.nu))
    assert half_delta.max() > 1e-4                  # the residual is well above rounding
    err = np.abs(pred - actual)
    assert np.all(err <= (1.05 * half_delta + 1e-6) * np.abs(adam_part) + 1e-12)
    assert err.max() > 0.2 * (half_delta * np.abs(adam_part)).max()   # and the bound is tight


def test_eta_follows_the_schedule():
    lr, warm, total = 1e-3, 3, 20
    closed_form = {
        "constant": lambda c: lr * min(c / warm, 1.0),
        "linear": lambda c: lr * (c / warm if c < warm else max(0.0, 1 - (c - warm) / (total - warm))),
        "cosine": lambda c: lr * (c / warm if c < warm else
                                  0.5 * (1 + math.cos(math.pi * min(c - warm, total - warm) / (total - warm)))),
    }
    for sched, f in closed_form.items():
        spec = OptimizerSpec("adamw", lr, schedule=sched, warmup_steps=warm, total_steps=total)
        for c in (0, 1, warm, 7, total - 1, total, total + 5):
            assert float(spec.lr_schedule()(c)) == pytest.approx(f(c), rel=1e-5, abs=1e-12), (sched, c)
        for steps in (1, 5):
            _, state, params = _warm(spec, steps)
            assert update_model(spec, state, params).eta == pytest.approx(f(steps), rel=1e-5)
    assert OptimizerSpec("sgd", 0.5).lr_schedule()(1000) == pytest.approx(0.5)


def test_gd_and_fresh_state():
    gd = update_model(None)
    g = _like(_params(), 1, 1.0)
    assert gd.eta == 1.0 and gd.a is None and gd.b is None
    np.testing.assert_allclose(_leaves(gd.step(g)), -_leaves(g))
    # No state: the first step of plain SGD with weight decay, b = wd * theta.
    spec, params = OptimizerSpec("sgd", 0.1, weight_decay=0.01), _params()
    model = update_model(spec, params=params)
    actual = spec.build().update(g, spec.build().init(params), params)[0]
    np.testing.assert_allclose(_leaves(model.step(g)), _leaves(actual), rtol=1e-6)


def test_update_model_is_a_pytree():
    spec = SPECS["adamw"]
    _, state, params = _warm(spec)
    model = update_model(spec, state, params)
    g = _like(params, 3, 1e-3)
    jitted = jax.jit(lambda m, g: m.step(g))(model, g)
    np.testing.assert_allclose(_leaves(jitted), _leaves(model.step(g)), rtol=1e-6)
    assert isinstance(jax.tree.map(lambda x: x, model), UpdateModel)


def test_spec_round_trips_through_json():
    for spec in SPECS.values():
        d = json.loads(json.dumps(spec.to_dict()))
        assert OptimizerSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown fields"):
        OptimizerSpec.from_dict({"name": "sgd", "learning_rate": 0.1, "lr": 1})


def test_adam_with_l2_decay_is_rejected():
    spec = OptimizerSpec("adam", 1e-3, weight_decay=0.01)
    _, state, params = _warm(spec, 2)              # build() can still train with it
    with pytest.raises(ValueError, match="adamw"):
        update_model(spec, state, params)


def test_mismatched_state_is_rejected():
    _, sgd_state, params = _warm(SPECS["sgd-momentum-wd"], 2)
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        update_model(SPECS["adam"], sgd_state, params)
    _, adam_state, _ = _warm(SPECS["adam"], 2)
    with pytest.raises(ValueError, match="ScaleByAdamState"):
        update_model(SPECS["sgd"], adam_state, params)
    with pytest.raises(ValueError, match="does not match params"):
        update_model(SPECS["adam"], adam_state, {"w": jnp.zeros((3,))})
    wrong_shape = jax.tree.map(lambda p: p, params)
    wrong_shape["scale"] = jnp.zeros((6,))
    with pytest.raises(ValueError, match="shape"):
        update_model(SPECS["adam"], adam_state, wrong_shape)
    with pytest.raises(ValueError, match="needs params"):
        update_model(SPECS["sgd-momentum-wd"], sgd_state)


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="rmsprop", learning_rate=1.0), "name"),
    (dict(name="sgd", learning_rate=1.0, schedule="cosine", total_steps=0), "total_steps"),
    (dict(name="adam", learning_rate=1.0, momentum=0.9), "b1"),
    (dict(name="sgd", learning_rate=1.0, nesterov=True), "nesterov"),
])
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSpec(**kwargs)
