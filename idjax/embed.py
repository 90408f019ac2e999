"""JVP embeddings (docs/method.md 5): cheap per-sample features that landmarks propagate along.

jvp_embeddings is the pure core (arrays in, arrays out, usable in a caller's jit); JVPEmbedder is its
shell over host batches and a device mesh.

The model is truncated to its first B decoder blocks plus the final norm; f(x; theta) is the
hidden vector at the last non-pad token (EmbedConfig.pooling="last", the default; "mean" averages
the hidden states over the non-pad tokens, "response" over the positions that predict a response
token). For K fixed Gaussian tangents v_k over the truncated
model's parameters, j_k(x) = d/de f(x; theta + e v_k) at e = 0 by forward-mode AD (jax.jvp),
batched over samples and tangents in one compiled call; [j_1..j_K] is projected to e dims.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax import data as D
from idjax import memory
from idjax import sharding as shd
from idjax.grads import split_params
from idjax.models import CausalLM
from idjax.configs import POOLINGS, EmbedConfig  # noqa: F401 (re-exported)


def truncate(model: CausalLM, num_blocks: int) -> CausalLM:
    """The first `num_blocks` decoder blocks + final norm, sharing no state with `model`."""
    if not 1 <= num_blocks <= model.config.num_layers:
        raise ValueError(f"num_blocks={num_blocks} must be in [1, {model.config.num_layers}]")
    config = dataclasses.replace(model.config, num_layers=num_blocks, tie_word_embeddings=True)
    state = nnx.state(model, nnx.Param)
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=model.dtype, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    for path, var in nnx.to_flat_state(target):
        value = flat[path].get_value()
        var.set_value(value[:num_blocks] if path[0] == "layers" else value)
    return nnx.merge(graphdef, target)


def last_token_features(model: CausalLM, input_ids, attention_mask):
    """f(x): the final-normed hidden state at each row's last non-pad token, float32 [B, D]. The last block
    runs its queries and MLP at that token only (CausalLM.hidden_states(queries=)): with the default 4
    blocks that is about a fifth of the embedding's FLOPs not spent."""
    last = jnp.maximum(jnp.sum(attention_mask, axis=-1) - 1, 0)
    hidden, _ = model.hidden_states(input_ids, attention_mask, queries=last[:, None])
    return hidden[:, 0].astype(jnp.float32)


def pooled_features(model: CausalLM, input_ids, attention_mask, labels=None, pooling: str = "last"):
    """f(x) [B, D] float32 from the final-normed hidden states h [B, L, D] of `model`.

    last:     h at each row's last non-pad token (last_token_features).
    mean:     the mean of h over the non-pad tokens.
    response: the mean of h over the positions t whose next token is a response token
              (labels[t + 1] != -100): the hidden states the response loss is computed from.
              A row without one (padding) gets 0.
    """
    if pooling == "last":
        return last_token_features(model, input_ids, attention_mask)
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    if pooling == "mean":
        w = attention_mask.astype(jnp.float32)
    elif pooling == "response":
        if labels is None:
            raise ValueError("pooling='response' needs the labels")
        nxt = labels[:, 1:] != -100
        w = jnp.concatenate([nxt, jnp.zeros_like(nxt[:, :1])], axis=1).astype(jnp.float32)
    else:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    total = jnp.einsum("bld,bl->bd", hidden.astype(jnp.float32), w)
    return total / jnp.maximum(jnp.sum(w, axis=-1), 1.0)[:, None]


def random_tangents(params, num: int, seed: int):
    """K standard-normal tangents shaped like `params`, leaf i drawn from fold_in(key(seed), i)."""
    leaves, treedef = jax.tree.flatten(params)
    key = jax.random.key(seed)
    out = [
        jax.random.normal(jax.random.fold_in(key, i), (num, *leaf.shape), jnp.float32).astype(leaf.dtype)
        for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, out)


def jvp_embeddings(model, input_ids, attention_mask, labels=None, *, tangents, params=None, projection=None,
                   pooling: str = "last"):
    """JVP embeddings float32 [B, e] (docs/method.md 5): [j_1(x) .. j_K(x)] @ projection, where

        j_k(x) = d/de f(x; theta + e v_k) at e = 0      (forward mode, jax.jvp)

    and f = pooled_features(model, ..., pooling). model: the (truncated) nnx model, or a (graphdef, state,
    ...) tuple; params: which parameters the tangents move (grads.split_params; None: every Param).
    tangents: a pytree like those params with a leading axis of K (random_tangents). projection:
    [K * D, e] or None (e = K * D). The primal pass runs once for all K tangents (vmap over tangents of
    one jvp). Pure: jit / vmap / shard_map it.
    """
    graphdef, selected, rest = split_params(model, params)

    def f(p):
        return pooled_features(nnx.merge(graphdef, p, rest), input_ids, attention_mask, labels, pooling)

    jv = jax.vmap(lambda v: jax.jvp(f, (selected,), (v,))[1])(tangents)  # [K, B, D]
    out = jnp.moveaxis(jv, 0, 1).reshape(input_ids.shape[0], -1)          # [B, K*D]
    return out if projection is None else out @ projection


def _embed(graphdef, pooling, params, rest, tangents, projection, ids, mask, labels):
    """The compiled body of JVPEmbedder: jvp_embeddings with the embedder's settings."""
    return jvp_embeddings((graphdef, rest), ids, mask, labels, tangents=tangents, params=params,
                          projection=projection, pooling=pooling)


def _embed_jit(graphdef, pooling: str, out_sharding):
    """One jitted _embed per (model structure, pooling, output sharding), shared by every JVPEmbedder:
    a second embedder of the same model (another call of select_samples, another target set) reuses
    the compilations of the first instead of compiling every length bucket again."""
    return shd.jit_once(("embed", graphdef, pooling, out_sharding), functools.partial(_embed, graphdef, pooling),
                         out_shardings=out_sharding)


class JVPEmbedder:
    """Compute JVP embeddings of data.Batch-es: one compilation per length bucket.

    mesh: a ("data", "fsdp") device mesh (sharding.make_mesh; default sharding.get_mesh(), all
    local devices): each batch is split over the devices (its size must be a multiple of the mesh
    size), parameters and tangents are replicated or FSDP-sharded (sharding.RULES). On such a mesh each
    batch shape's program is planned against device_memory bytes per device (default: what the device
    says): the partitioner's activation layout if it fits, else the activations split by rows.
    """

    def __init__(self, model: CausalLM, config: EmbedConfig = EmbedConfig(), *, mesh=None,
                 device_memory: int | None = None):
        self.config = config
        self.mesh = shd.get_mesh() if mesh is None else mesh
        small = truncate(model, min(config.num_blocks, model.config.num_layers))
        self.graphdef, self.params, self.rest = nnx.split(small, nnx.Param, ...)
        self.tangents = random_tangents(self.params, config.num_tangents, config.seed)
        raw = config.num_tangents * model.config.hidden_size
        self.dim = min(config.dim, raw)
        self.projection = None
        if self.dim < raw:  # Gaussian JL map, N(0, 1/e): preserves distances in expectation
            key = jax.random.fold_in(jax.random.key(config.seed), 1 << 20)
            self.projection = jax.random.normal(key, (raw, self.dim), jnp.float32) / math.sqrt(self.dim)
        if shd.active(self.mesh):
            self.params = shd.shard_params(self.params, self.mesh)
            self.rest = shd.shard_params(self.rest, self.mesh)
            self.tangents = shd.shard_params(self.tangents, self.mesh, lead=1)
            self.projection = shd.put_replicated(self.projection, self.mesh)
            self._fn = _embed_jit(self.graphdef, config.pooling, shd.row_sharding(self.mesh, 2))
            # the budget each batch shape's layout is planned against (device_memory overrides the device's)
            self.device_memory = memory.device_memory(device_memory, agree=shd.spans_processes(self.mesh))
        else:
            self._fn = _embed_jit(self.graphdef, config.pooling, None)

    def __call__(self, batch) -> jax.Array:
        """Embeddings [B, dim] float32 of one batch (padding rows are garbage: mask them)."""
        if not shd.active(self.mesh):
            return self._fn(self.params, self.rest, self.tangents, self.projection,
                            jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask),
                            jnp.asarray(batch.labels))
        rows = len(batch.input_ids)  # padded to a multiple of the mesh size, the padding cut off again
        put = lambda x: shd.put_rows(shd.pad_rows(x, self.mesh), self.mesh)  # noqa: E731
        args = (self.params, self.rest, self.tangents, self.projection, put(batch.input_ids),
                put(batch.attention_mask), put(batch.labels))
        # The partitioner's activation layout if it fits the device, else the rows split (shd.ROW_LAYOUTS),
        # chosen by the compiler's memory analysis once per batch shape and kept compiled.
        key = ("embed", self.graphdef, self.config.pooling, self.mesh, memory.input_key(args))
        _, compiled = memory.planned(key, shd.ROW_LAYOUTS,
                                     lambda split: shd.lower_in_layout(self._fn, args, self.mesh, split),
                                     self.device_memory,
                                     what=f"JVP embeddings of {args[4].shape[0]} rows of {args[4].shape[1]} tokens")
        out = compiled(*args)
        return out if out.shape[0] == rows else out[:rows]

    def run(self, batches, *, desc: str = "embeddings", progress: bool = True) -> np.ndarray:
        """Embeddings [n, dim] of all the batches of one make_batches call, rows in the order of its examples."""
        return D.collect_rows(batches, self, desc=desc, progress=progress)
