"""Which parameters a gradient is taken of: name patterns, a layer range, a coordinate subset.

`split_params` cuts a model into the differentiated parameters and the rest (pure pytree work, so it
runs inside a caller's jit); `restrict` cuts a full-model tree (an update model's a or b) to them;
`layer_mask` and `check_first_layer` give the layer range of `first_layer` (grads.per_example_gradients);
`CoordinateMask` keeps a fixed random subset of coordinates. Parameter paths look like
"layers.mlp.down_proj.kernel": the decoder layers are stacked on a leading axis.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def param_filter(pattern: str | None):
    """An NNX filter selecting Params whose dotted path matches `pattern` (re.search).

    Paths look like "layers.mlp.down_proj.kernel" (layers are stacked, so one path covers all
    layers) or "embed_tokens.embedding". LoRA adapters, when present, are matched the same way.
    """
    if not pattern:
        return nnx.Param
    rx = re.compile(pattern)

    def selected(path, value):
        return isinstance(value, nnx.Param) and bool(rx.search(".".join(map(str, path))))

    return selected


def split_params(model, params=None):
    """(graphdef, selected, rest): the differentiated parameters and everything else.

    model:  an nnx module, or a (graphdef, state, ...) tuple as nnx.split returns it.
    params: None (every nnx.Param), a regex over dotted parameter paths (param_filter), any other
            nnx filter, or an nnx.State already split off the model: then `selected` is that State
            and `rest` is the model's state without its paths (the model may hold them or not).
    Pure pytree work, so it runs at trace time inside a caller's jit; nnx.merge(graphdef, selected,
    rest) rebuilds the model.
    """
    if isinstance(model, tuple):
        graphdef, *states = model
        state = states[0] if len(states) == 1 else nnx.merge_state(*states)
    else:
        graphdef, state = nnx.split(model)
    if isinstance(params, nnx.State):
        taken = {path for path, _ in nnx.to_flat_state(params)}
        rest = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(state) if p not in taken])
        return graphdef, params, rest
    chosen = param_filter(params) if params is None or isinstance(params, str) else params
    selected, rest = nnx.split_state(state, chosen, ...)
    if not jax.tree.leaves(selected):
        names = [".".join(map(str, p)) for p, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)]
        raise ValueError(f"--params {params!r} matches no parameter; names look like {names[:4]}")
    return graphdef, selected, rest


def restrict(tree, selected):
    """The part of a full-model State (e.g. the update model's a or b) matching `selected`'s paths."""
    if tree is None:
        return None
    flat = dict(nnx.to_flat_state(tree))
    try:
        return nnx.from_flat_state([(path, flat[path]) for path, _ in nnx.to_flat_state(selected)])
    except KeyError as e:
        raise ValueError(f"the tree has no entry for parameter {'.'.join(map(str, e.args[0]))}") from None


def in_layer_stack(path) -> bool:
    """Whether a State path is a stacked layer leaf (its first axis is the layer)."""
    return getattr(path[0], "key", path[0]) == "layers"


def zero_prefixes(tree, first_layer: int) -> tuple[int, ...]:
    """Per leaf of `tree` (jax.tree.leaves order): how many leading coordinates layer_mask(tree, first_layer)
    zeroes, the layers below first_layer of a stacked layer leaf (Projector.project's zeros)."""
    return tuple(first_layer * math.prod(x.shape[1:]) if first_layer and in_layer_stack(path) else 0
                 for path, x in jax.tree_util.tree_flatten_with_path(tree)[0])


def layer_mask(tree, first_layer: int):
    """`tree` (a State like the parameters, e.g. a gradient, the update model's a or b) with its
    stacked layer leaves zero below layer `first_layer`: the restriction to layers first_layer..
    that per_example_gradients(first_layer=...) computes. None stays None."""
    if tree is None or not first_layer:
        return tree

    def cut(path, x):
        if not in_layer_stack(path):
            return x
        keep = (jnp.arange(x.shape[0]) >= first_layer).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x, jnp.zeros_like(x))

    return jax.tree_util.tree_map_with_path(cut, tree)


def check_first_layer(selected, first_layer: int, num_layers: int) -> None:
    """ValueError unless layers first_layer.. are a proper part of the stack and every selected
    parameter lies in or above them (the token embedding is below every layer)."""
    if not 0 <= first_layer < num_layers:
        raise ValueError(f"first_layer must be in [0, {num_layers}) for this {num_layers}-layer model, "
                         f"got {first_layer}")
    if first_layer:
        below = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(selected) if str(p[0]) == "embed_tokens"]
        if below:
            raise ValueError(f"first_layer={first_layer}: the selected parameters include {below[0]}, which "
                             "the layers below feed; restrict --params to layer (or lm-head) parameters")


@dataclasses.dataclass(frozen=True, eq=False)
class CoordinateMask:
    """A fixed random subset of gradient coordinates (about `keep` of them), per leaf.

    Bounds the cost on large models before projecting. Indices are drawn once with numpy from
    the seed and the leaf shapes, so every process and every run picks the same coordinates.
    """

    indices: tuple  # one int32/int64 numpy array per leaf, in jax.tree.leaves order

    @classmethod
    def create(cls, tree, keep: int, seed: int = 0) -> "CoordinateMask":
        sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)]
        total = sum(sizes)
        if keep <= 0 or keep >= total:
            raise ValueError(f"keep={keep} must be in [1, {total - 1}] (the selected parameters have {total})")
        out = []
        for i, n in enumerate(sizes):
            k = max(1, round(keep * n / total))
            rng = np.random.default_rng([seed, i])
            out.append(np.sort(rng.choice(n, size=min(k, n), replace=False)))
        return cls(tuple(out))

    def apply(self, tree):
        leaves, treedef = jax.tree.flatten(tree)
        return jax.tree.unflatten(
            treedef, [jnp.ravel(x)[jnp.asarray(idx)] for x, idx in zip(leaves, self.indices)]
        )


__all__ = ["param_filter", "split_params", "restrict", "in_layer_stack", "layer_mask", "zero_prefixes",
           "check_first_layer", "CoordinateMask"]
