"""Uniform random subsets of range(n) without replacement, the coordinate sample of an SRHT sketch.

The same subset from a concrete key (post-processed in numpy, nothing compiled but the PRNG) and from a
traced one (the same algorithm in the graph), in every process.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@functools.partial(jax.jit, static_argnums=1)
def _words(key: jax.Array, m: int) -> jax.Array:
    """m random uint32 words (1-D: several times faster to compile than 2-D threefry)."""
    with jax.threefry_partitionable(True):
        return jax.random.bits(key, (m,), jnp.uint32)


def _first_k_of_permutation(words, n: int, k: int, xp):
    """Sort range(n) by random 64-bit keys (hi, lo words), index as tie-break; first k, sorted."""
    hi, lo, iota = words[:n], words[n:], xp.arange(n, dtype=np.int32)
    if xp is np:
        order = np.lexsort((iota, lo, hi))
    else:
        order = lax.sort((hi, lo, iota), num_keys=3)[-1]
    return xp.sort(order[:k])


def _first_k_distinct(words, n: int, k: int, xp):
    """First k distinct values, in draw order, of the draws words & mask that are < n.

    Masking to the next power of two and rejecting values >= n keeps every draw exactly
    uniform on range(n). Returns (sorted sample, whether k distinct values were found).
    """
    mask = (1 << max(n - 1, 1).bit_length()) - 1
    r = (words & np.uint32(mask)).astype(np.int32)
    if xp is np:
        valid = np.flatnonzero(r < n)
        _, first = np.unique(r[valid], return_index=True)
        first = np.sort(first)[:k]
        return np.sort(r[valid][first]), len(first) >= k
    m = r.shape[0]
    iota = jnp.arange(m, dtype=jnp.int32)
    keyed = jnp.where(r < n, r, n)                 # rejected draws sort last, never "first"
    srt, order = lax.sort((keyed, iota), num_keys=2)
    head = jnp.concatenate([jnp.ones((1,), bool), srt[1:] != srt[:-1]]) & (srt < n)
    is_first = jnp.zeros((m,), bool).at[order].set(head)
    rank = jnp.cumsum(is_first) - 1
    slot = jnp.where(is_first & (rank < k), rank, k)
    out = jnp.zeros((k,), jnp.int32).at[slot].set(r, mode="drop")
    return jnp.sort(out), jnp.sum(is_first) >= k


def _maybe_numpy(x) -> np.ndarray | None:
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None


def _permutation_sample(key: jax.Array, n: int, k: int) -> jax.Array:
    words = _words(key, 2 * n)
    w = _maybe_numpy(words)
    if w is not None:
        return jnp.asarray(_first_k_of_permutation(w, n, k, np))
    return _first_k_of_permutation(words, n, k, jnp)


def sample_without_replacement(key: jax.Array, n: int, k: int) -> jax.Array:
    """k distinct ints of range(n), a uniformly random subset, sorted (int32).

    n <= 8k: the first k of a random permutation. Otherwise O(k log k), not O(n log n): the
    distinct values of i.i.d. uniform draws, in order of first appearance, are a uniform sample
    without replacement, and 4k + 128 draws (each accepted with probability > 1/2) hold k
    distinct ones except with negligible probability (then a permutation is used). With a
    concrete key the post-processing runs in numpy, so sampling compiles nothing but the PRNG;
    a traced key runs the same algorithm in the graph, with the same result.
    """
    if n <= 8 * k:
        return _permutation_sample(key, n, k)
    words = _words(key, 4 * k + 128)
    w = _maybe_numpy(words)
    fallback = functools.partial(_permutation_sample, jax.random.fold_in(key, 1), n, k)
    if w is not None:
        sample, ok = _first_k_distinct(w, n, k, np)
        return jnp.asarray(sample) if ok else fallback()
    sample, ok = _first_k_distinct(words, n, k, jnp)
    return lax.cond(ok, lambda: sample, fallback)
