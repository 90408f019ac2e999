"""The per-sample loss and its pieces: token cross-entropy, response-token sums, the chunked lm-head.

docs/method.md 1: l(theta; x) is the token cross-entropy over the response tokens of x (labels != -100),
averaged over those tokens. A sample with no response token has no loss: it contributes 0 here and
is reported upstream (data.tokenize skips it), never a NaN. Pure functions: they run inside a caller's
jax.jit / jax.vmap / shard_map (grads re-exports them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from idjax.data import IGNORE_INDEX
from idjax.models.modeling import head_logits


def token_losses(logits, labels):
    """Per-token cross-entropy of next-token prediction; labels are aligned with the inputs.

    Returns (loss [B, L-1] float32, mask [B, L-1] bool): position t predicts labels[t + 1].
    """
    return _cross_entropy(logits[:, :-1], labels[:, 1:])


def _cross_entropy(logits, targets):
    """(loss, mask) per position of float32 logits [..., V] against next tokens [...] (-100: no loss)."""
    logits = logits.astype(jnp.float32)
    mask = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, logz - picked, 0.0), mask


def response_loss_sums(logits, labels):
    """(sum_t loss_t, n) per row: the summed response-token loss and the response-token count, float32 [B]."""
    loss, mask = token_losses(logits, labels)
    return loss.sum(axis=-1), mask.sum(axis=-1).astype(jnp.float32)


def mean_response_loss(logits, labels):
    """l(x) = (1/n) sum_t loss_t over the n response tokens of each row, float32 [B]; 0 when n = 0.

    The one definition of the per-sample loss (docs/method.md 1): the count is clamped to 1, so a
    row without response tokens (padding) gives 0, never 0/0.
    """
    total, count = response_loss_sums(logits, labels)
    return total / jnp.maximum(count, 1.0)


#: Bytes of float32 logits one piece of a chunked loss may hold ([B, positions, V]); above it the
#: lm-head and the cross-entropy run over position chunks (hidden_loss_sums).
LOSS_CHUNK_BYTES = 1 << 28


def at_positions(positions, targets, *arrays):
    """(targets [B, T] at the loss positions [B, R], -100 at their -1 padding; then each of `arrays`
    [B, T, ...] there): the rows the lm-head reads where batches carry loss positions (hidden_loss_sums,
    hessian.gauss_newton_vp)."""
    at = jnp.maximum(positions, 0)
    picked = jnp.where(positions >= 0, jnp.take_along_axis(targets, at, axis=1), IGNORE_INDEX)
    return (picked, *(jnp.take_along_axis(x, at.reshape(*at.shape, *(1,) * (x.ndim - 2)), axis=1) for x in arrays))


def hidden_loss_sums(model, hidden, labels, *, chunk_bytes: int = LOSS_CHUNK_BYTES, positions=None):
    """response_loss_sums from the final hidden states [B, L, D]: (sum_t loss_t, n) per row, float32 [B].

    positions: int [B, R], the positions t whose next token carries loss (labels[t + 1] != -100), padded
    with -1 (data.Batch.loss_positions). The lm-head and the cross-entropy then run at those R positions
    only, not at every one of the L - 1. A row whose positions miss one of its loss tokens gets a NaN sum,
    never a quietly smaller one. None: every position.

    Where the float32 logits [B, positions, V] would exceed chunk_bytes (a 128k vocabulary at 2048 tokens:
    1 GiB per row), the lm-head and the cross-entropy run over chunks of positions under jax.checkpoint:
    only one chunk's logits exist at a time, forward and backward, for one more lm-head pass in the backward.
    """
    h, targets = hidden[:, :-1], labels[:, 1:]
    if positions is not None:
        every = jnp.sum(targets != IGNORE_INDEX, axis=-1)
        targets, h = at_positions(positions, targets, h)
        total, count = _head_loss_sums(model, h, targets, chunk_bytes)
        return jnp.where(count == every, total, jnp.nan), count
    return _head_loss_sums(model, h, targets, chunk_bytes)


def _head_loss_sums(model, h, targets, chunk_bytes: int):
    """(sum_t loss_t, n) per row of hidden states h [B, T, D] against their next tokens targets [B, T]."""
    b, length, _ = h.shape
    per_chunk = max(1, chunk_bytes // (4 * b * model.config.vocab_size))
    if per_chunk >= length:
        loss, mask = _cross_entropy(model.logits(h), targets)
        return loss.sum(-1), mask.sum(-1).astype(jnp.float32)
    matrix, tied = model.head()
    steps = -(-length // per_chunk)
    pad = steps * per_chunk - length
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    h = h.reshape(b, steps, per_chunk, h.shape[-1]).swapaxes(0, 1)
    targets = targets.reshape(b, steps, per_chunk).swapaxes(0, 1)

    @jax.checkpoint
    def piece(h, t):
        loss, mask = _cross_entropy(head_logits(h, matrix, tied), t)
        return loss.sum(-1), mask.sum(-1).astype(jnp.float32)

    def body(carry, xs):
        total, count = piece(*xs)
        return (carry[0] + total, carry[1] + count), None

    zeros = jnp.zeros((b,), jnp.float32)
    (total, count), _ = jax.lax.scan(body, (zeros, zeros), (h, targets))
    return total, count


def sample_losses(model, input_ids, attention_mask, labels, *, chunk_bytes: int = LOSS_CHUNK_BYTES,
                  positions=None):
    """Mean response-token loss of every sample: float32 [B]; 0 for samples without responses. The
    logits are never whole where they would exceed chunk_bytes, and only at `positions` when given
    (hidden_loss_sums)."""
    hidden, _ = model.hidden_states(input_ids, attention_mask)
    total, count = hidden_loss_sums(model, hidden, labels, chunk_bytes=chunk_bytes, positions=positions)
    return total / jnp.maximum(count, 1.0)
