"""A Flax NNX causal decoder covering Llama, Qwen2 and Qwen3.

Layers are stacked (one parameter array with a leading layer axis per weight) and applied with
`jax.lax.scan`, so compile time does not grow with depth: vmap-of-grad and jvp-of-grad over a
30-layer model compile once per length bucket in seconds, on CPU as on accelerators.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax.models.config import ModelConfig, rope_inverse_frequencies
from idjax.sharding import constrain_rows

_NEG_INF = -1e30


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back before the scale (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * y.astype(x.dtype)


class LayerCache(NamedTuple):
    """Keys and values of one layer for every slot of the cache: [B, S, KVH, Dh]."""

    k: jax.Array
    v: jax.Array


class KVCache(NamedTuple):
    """Decoding state: per-layer keys/values stacked on a leading layer axis.

    `valid[b, s]` marks filled, non-padding slots; `index` is the next slot to write (shared by the
    batch: prompts are left-padded so every row writes the same slot).
    """

    layers: LayerCache
    valid: jax.Array
    index: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
        return cls(
            LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)),
            jnp.zeros((batch, length), bool),
            jnp.zeros((), jnp.int32),
        )


def apply_rope(x, positions, inv_freq):
    """Rotate-half rotary embedding (HF layout), computed in float32. x: [B, L, H, Dh]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, L, Dh/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], -1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        lin = lambda i, o, bias: nnx.Linear(  # noqa: E731
            i, o, use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02),
        )
        self.q_proj = lin(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias)
        self.k_proj = lin(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.v_proj = lin(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias)
        self.o_proj = lin(c.num_heads * c.head_dim, c.hidden_size, c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, param_dtype=param_dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qk_norm = c.qk_norm

    def __call__(self, x, positions, inv_freq, key_mask, cache: LayerCache | None, index, queries=None):
        """Attention output [B, L, D] and the updated cache. queries [B, P] (indices into L): the queries, and
        so the output [B, P, D], at those positions only; the keys and values still at every one."""
        b, l, _ = x.shape
        positions = jnp.broadcast_to(positions, (b, l))
        xq, query_positions, query_slots = x, positions, index + jnp.arange(l)[None]
        if queries is not None:
            xq = jnp.take_along_axis(x, queries[..., None], axis=1)
            query_positions = jnp.take_along_axis(positions, queries, axis=1)
            query_slots = index + queries
        p = xq.shape[1]
        q = self.q_proj(xq).reshape(b, p, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, l, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, query_positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, index, 0, 0))
            cache = LayerCache(k, v)
        # Grouped-query attention: queries grouped per key/value head, scores in float32.
        groups = self.num_heads // self.num_kv_heads
        qg = q.reshape(b, p, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(self.head_dim).astype(np.float32)
        causal = jnp.arange(k.shape[1]) <= query_slots[..., None]  # [B or 1, P, S]
        mask = causal[:, None, None] & key_mask[:, None, None, None, :]
        scores = jnp.where(mask, scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, p, -1)
        return self.o_proj(out), cache


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        c = config
        lin = lambda i, o: nnx.Linear(  # noqa: E731
            i, o, use_bias=c.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            kernel_init=nnx.initializers.normal(0.02),
        )
        self.gate_proj = lin(c.hidden_size, c.intermediate_size)
        self.up_proj = lin(c.hidden_size, c.intermediate_size)
        self.down_proj = lin(c.intermediate_size, c.hidden_size)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(config, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(config, **kw)

    def __call__(self, x, positions, inv_freq, key_mask, cache, index, queries=None):
        """x after this layer [B, L, D], or [B, P, D] at the positions `queries` [B, P] (Attention)."""
        h, cache = self.self_attn(self.input_layernorm(x), positions, inv_freq, key_mask, cache, index, queries)
        if queries is not None:
            x = jnp.take_along_axis(x, queries[..., None], axis=1)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def token_positions(attention_mask):
    """Each token's position among its row's real tokens, cumsum(mask) - 1 (0 on left padding), so left and
    right padding give the same positions to real tokens."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


class CausalLM(nnx.Module):
    """Decoder-only LM. `model(input_ids, attention_mask)` returns float32 logits [B, L, V].

    dtype is the compute dtype and param_dtype the storage dtype (bfloat16 or float32).
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=None, rngs: nnx.Rngs | None = None):
        param_dtype = param_dtype or dtype
        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
            embedding_init=nnx.initializers.normal(0.02),
        )

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(r):
            return DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r)

        self.layers = make_layers(rngs.split(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(
                config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                param_dtype=param_dtype, rngs=rngs, kernel_init=nnx.initializers.normal(0.02),
            )
        self.remat = False  # recompute each layer in the backward pass (saves activation memory)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None, num_blocks=None,
                      cache: KVCache | None = None, residual=None, final_norm: bool = True, queries=None):
        """Final-normed hidden states after the first `num_blocks` layers (all by default).

        Positions default to cumsum(attention_mask) - 1, so left and right padding give the same
        values on real tokens. Returns (hidden [B, L, D], new cache or None).

        residual: start from this residual stream [B, L, D] instead of the token embeddings; the
        model's layers continue it (a model holding only the upper layers' state finishes what
        final_norm=False, num_blocks=s computed: grads.per_example_gradients with first_layer=s).
        final_norm=False: the raw residual stream, without the final norm.
        queries: [B, P] indices into L: hidden states [B, P, D] at those positions only. The last layer
        computes its queries, attention output and MLP there (its keys and values everywhere), so a caller
        that reads one position per row (the last token's features) pays a fraction of that layer.
        """
        if queries is not None and cache is not None:
            raise ValueError("queries= computes the last layer at a few positions; it does not fill a cache")
        b, l = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, l), jnp.int32)
        attention_mask = attention_mask.astype(bool)
        if positions is None:
            positions = token_positions(attention_mask)
            if cache is not None:
                positions = positions + jnp.sum(cache.valid, axis=-1, keepdims=True)
        if cache is None:
            key_mask, index = attention_mask, jnp.zeros((), jnp.int32)
        else:
            index = cache.index
            key_mask = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
        # under an ambient mesh (jax.set_mesh) the residual stream is split by rows: sharding.constrain_rows
        x = constrain_rows(self.embed_tokens(input_ids) if residual is None else residual)
        inv_freq = self.rope_frequencies()

        graphdef, layer_state = nnx.split(self.layers)
        if num_blocks is not None:
            layer_state = jax.tree.map(lambda a: a[:num_blocks], layer_state)

        def body(h, xs):
            state, layer_cache = xs
            layer = nnx.merge(graphdef, state)
            h, layer_cache = layer(h, positions, inv_freq, key_mask, layer_cache, index)
            return constrain_rows(h), layer_cache

        def last(h, state):  # the last layer at the query positions only
            return nnx.merge(graphdef, state)(h, positions, inv_freq, key_mask, None, index, queries)[0]

        if self.remat:
            body, last = jax.checkpoint(body), jax.checkpoint(last)
        layer_caches = None if cache is None else cache.layers
        if queries is None:
            x, new_layers = jax.lax.scan(body, x, (layer_state, layer_caches))
        else:
            below = jax.tree.map(lambda a: a[:-1], layer_state)
            if jax.tree.leaves(below)[0].shape[0]:
                x, _ = jax.lax.scan(body, x, (below, None))
            x = last(x, jax.tree.map(lambda a: a[-1], layer_state))
        new_cache = None
        if cache is not None:
            new_cache = KVCache(new_layers, key_mask, index + l)
        return (self.norm(x) if final_norm else x), new_cache

    def layer_step(self, attention_mask):
        """step(x, *states) -> x [B, L, D] after one decoder layer, for rows with this attention mask [B, L]
        (no cache). states: slices at one layer of the stacked layers' State (paths within `layers`), merged
        as nnx.merge does. The body of hidden_states' scan, for a caller that runs the layers one at a time
        (grads.per_example_gradients(layerwise=True): a backward pass layer by layer)."""
        graphdef = nnx.split(self.layers)[0]
        mask = attention_mask.astype(bool)
        positions, inv_freq = token_positions(mask), self.rope_frequencies()

        def step(x, *states):
            return nnx.merge(graphdef, *states)(x, positions, inv_freq, mask, None, jnp.zeros((), jnp.int32))[0]

        return step

    def rope_frequencies(self):
        """The rotary embedding's inverse frequencies [head_dim / 2], float32 (hidden_states, layer_step)."""
        return jnp.asarray(rope_inverse_frequencies(self.config.head_dim, self.config.rope), jnp.float32)

    def head(self):
        """(matrix, tied) of the lm-head in the compute dtype: the embedding [V, D] when tied, else the
        kernel [D, V]. What head_logits takes, so a caller's loop over positions reads it once."""
        if self.config.tie_word_embeddings:
            return self.embed_tokens.embedding[...].astype(self.dtype), True
        return self.lm_head.kernel[...].astype(self.dtype), False

    def logits(self, hidden):
        """Project hidden states to float32 vocabulary logits."""
        return head_logits(hidden, *self.head())

    def __call__(self, input_ids, attention_mask=None, *, positions=None, cache: KVCache | None = None):
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions=positions, cache=cache)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)


def head_logits(hidden, matrix, tied: bool):
    """float32 logits [..., L, V] of hidden states [..., L, D] through an lm-head (CausalLM.head)."""
    spec = "...ld,vd->...lv" if tied else "...ld,dv->...lv"
    return jnp.einsum(spec, hidden, matrix, preferred_element_type=jnp.float32)


def abstract_model(config: ModelConfig, *, dtype=jnp.float32, param_dtype=None) -> CausalLM:
    """Shapes only, no memory: the skeleton checkpoint loaders fill."""
    return nnx.eval_shape(lambda: CausalLM(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))

