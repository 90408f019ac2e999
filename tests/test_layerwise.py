"""Per-example gradients sketched layer by layer (per_example_gradients(layerwise=True)) against the loop of
jax.grad over unpadded samples, sketched whole by the projector; their sketch in parts against the whole
sketch; and their memory by the compiler's own analysis."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idjax import data, sketch
from idjax.grads import GradientConfig, PerExampleGradients, gradient_settings, per_example_gradients, split_params
from idjax.models import CausalLM
from idjax.sketch import Projector
from test_grads import CFG, examples, loop_grad


def flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def unflat(vec, like):
    leaves, treedef = jax.tree.flatten(like)
    sizes = np.cumsum([0] + [x.size for x in leaves])
    return jax.tree.unflatten(treedef, [vec[a:b].reshape(x.shape) for a, b, x in zip(sizes, sizes[1:], leaves)])


@pytest.mark.parametrize("kind", ["srht", "rademacher", "gaussian"])
@pytest.mark.parametrize("block_size, dim, step_blocks", [(16, 8, None), (32, 300, 2), (64, 40, 2), (16, 40, 1)])
def test_a_sketch_in_parts_adds_up_to_the_whole_sketch(kind, block_size, dim, step_blocks, monkeypatch):
    """Layer slices of stacked leaves (sizes that straddle blocks, fill them exactly, or are shorter than
    one) plus the whole leaves, sketched apart (layer as a traced int; a slice's blocks transformed all at
    once or 2 at a time), sum to Projector.project."""
    if step_blocks:
        monkeypatch.setattr(sketch, "LAYER_STEP_COORDS", step_blocks * block_size)
    rng = np.random.default_rng(0)
    tree = {"a": rng.standard_normal((3, 5, 7)), "b": rng.standard_normal((11,)), "c": rng.standard_normal((3, 64)),
            "d": rng.standard_normal((4, 40, 3)), "e": rng.standard_normal((2, 3))}
    tree = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    stacked = {0: 3, 2: 3, 3: 4}  # leaf index (jax.tree.leaves order) -> layers
    proj = Projector(kind, dim, seed=3, block_size=block_size)
    leaves = jax.tree.leaves(tree)
    total = proj.project_leaves({i: x for i, x in enumerate(leaves) if i not in stacked})
    for i, layers in stacked.items():
        part = jax.jit(lambda x, layer, i=i, layers=layers: proj.project_layer(x, layer, index=i, layers=layers))
        for layer in range(layers):
            total = total + part(leaves[i][layer], layer)
    np.testing.assert_allclose(total, proj.project(tree), rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="kind rademacher, gaussian or srht"):
        Projector("none", 0).project_leaves({1: leaves[1]})


def _tree_like(rng, sel, low, high):
    return jax.tree.map(lambda x: jnp.asarray(rng.uniform(low, high, x.shape), jnp.float32), sel)


@pytest.mark.parametrize("tied, pattern, first_layer, kind", [
    (True, None, 0, "srht"),                    # every parameter: the tied embedding gets both of its shares
    (False, "layers.mlp|^norm", 1, "srht"),     # a first layer: the backward stops above it
    (False, "embed|lm_head", 0, "gaussian"),    # no layer selected: the backward still runs through them
    (True, "lm_head|^norm", 0, "rademacher"),   # nothing below the head: no backward through the layers
])
def test_layerwise_gradients_equal_the_sketch_of_the_loop(tied, pattern, first_layer, kind):
    """u_i = a * (g_i - offset), normalised, sketched: layer by layer equals the whole gradient's sketch,
    over length-sorted batches (loss positions), microbatches, an empty row and a first layer."""
    config = dataclasses.replace(CFG, num_layers=3, tie_word_embeddings=tied)
    model = CausalLM(config, rngs=nnx.Rngs(5))
    if pattern == "lm_head|^norm" and tied:
        pattern = "^norm"
    exs = examples(7, np.random.default_rng(51), lengths=(9, 20, 33), no_response={3})
    _, sel, _ = split_params(model, pattern)
    rng = np.random.default_rng(52)
    a, off = _tree_like(rng, sel, 0.5, 2.0), _tree_like(rng, sel, -1e-2, 1e-2)
    proj = Projector(kind, 48, seed=2, block_size=32)
    config = GradientConfig(params=pattern, normalize=True, microbatch=2, first_layer=first_layer, layerwise=True)
    got = PerExampleGradients(model, proj, config, precondition=a, offset=off).run(
        data.sorted_batches(exs, 4, pad_id=0))
    below = np.concatenate([np.ravel(np.broadcast_to(
        (np.arange(x.shape[0]) < first_layer).reshape((-1,) + (1,) * (x.ndim - 1))
        if "layers" in jax.tree_util.keystr(p) else np.zeros((1,) * x.ndim, bool), x.shape))
        for p, x in jax.tree_util.tree_leaves_with_path(sel)])
    for ex in exs:
        u = np.asarray(flat(a)) * (loop_grad(model, ex, pattern) - np.asarray(flat(off)))
        u[below] = 0.0
        want = np.zeros(48, np.float32) if ex.index == 3 else proj.project(unflat(jnp.asarray(u), sel),
                                                                             normalize=True)
        np.testing.assert_allclose(got[ex.index], want, rtol=1e-4, atol=3e-6)
    assert np.abs(got).max() > 0


def test_layerwise_needs_a_sketch_and_no_mask():
    model = CausalLM(CFG, rngs=nnx.Rngs(1))
    ids = jnp.ones((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="layerwise gradients need a sketch"):
        per_example_gradients(model, ids, ids, ids, projector=Projector("none", 0), layerwise=True)


def test_the_planner_falls_back_to_layerwise_settings():
    assert [s for _, s in gradient_settings(2)] == [(2, False, False), (1, False, False), (1, True, False)]
    assert [s for _, s in gradient_settings(2, layerwise=True)] == [
        (2, False, False), (1, False, False), (2, False, True), (1, False, True)]


def test_layerwise_memory_does_not_grow_with_depth_by_the_compilers_memory_analysis():
    """A model whose gradient dwarfs its activations, at 8 and at 16 layers: the whole-gradient program's
    temporaries grow by at least the 8 added layers' float32 gradient; layer by layer they grow by less
    than one layer's (only the layers' saved inputs are per layer), and hold less than a whole gradient."""
    def temp_bytes(num_layers, layerwise):
        config = dataclasses.replace(CFG, hidden_size=64, intermediate_size=256, num_layers=num_layers,
                                     head_dim=16, vocab_size=128)
        graphdef, state = nnx.split(CausalLM(config, rngs=nnx.Rngs(0)))
        ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
        proj = Projector("srht", 64, block_size=1024)
        fn = jax.jit(lambda st, i, m, l: per_example_gradients((graphdef, st), i, m, l, projector=proj,
                                                               microbatch=1, layerwise=layerwise))
        compiled = fn.lower(state, ids, ids, ids).compile()
        layer = 4 * sum(x[0].size for x in jax.tree.leaves(state["layers"]))
        return compiled.memory_analysis().temp_size_in_bytes, layer, 4 * sum(x.size for x in jax.tree.leaves(state))

    (whole8, layer, gradient8), (whole16, _, _) = temp_bytes(8, False), temp_bytes(16, False)
    (lw8, _, _), (lw16, _, _) = temp_bytes(8, True), temp_bytes(16, True)
    assert whole16 - whole8 >= 8 * layer, (whole8, whole16, layer)
    assert lw16 - lw8 < layer and lw8 < gradient8, (lw8, lw16, layer, gradient8)
