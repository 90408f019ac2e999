"""Per-sample losses and projected per-example gradients: the pure core, and its batch shell.

docs/method.md 1: l(theta; x) is the token cross-entropy over the response tokens of x (labels != -100),
averaged over those tokens. A sample with no response token has no loss: it contributes 0 here and
is reported upstream (data.tokenize skips it), never a NaN.

The core functions take arrays and pytrees, with options as keyword arguments, and run inside a
caller's jax.jit / jax.vmap / shard_map. A `model` argument is an nnx module or a (graphdef, state, ...)
tuple from nnx.split; `params` names the differentiated parameters (see split_params). Hessian
products, curvature and the target direction are in idjax.hessian.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax import data as D
from idjax import memory
from idjax import sharding as shd
from idjax.data import IGNORE_INDEX
from idjax.models.modeling import head_logits
from idjax.sketch import Projector
from idjax.subsets import (  # noqa: F401 (re-exported: grads.split_params etc.)
    CoordinateMask, check_first_layer, in_layer_stack, layer_mask, param_filter, restrict, split_params, zero_prefixes,
)


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
        at = jnp.maximum(positions, 0)
        h = jnp.take_along_axis(h, at[..., None], axis=1)
        targets = jnp.where(positions >= 0, jnp.take_along_axis(targets, at, axis=1), IGNORE_INDEX)
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


# ----------------------------------------------------------------------------- a layer range


def _upper_layer_gradients(graphdef, selected, rest, first_layer: int, input_ids, attention_mask):
    """(grad(ids, mask, labels, positions, residual), residuals [B, L, D]) for gradients of the selected parameters of
    layers first_layer.. only: the layers below run forward once for the batch, outside every
    gradient, and each sample's backward pass stops at first_layer. Gradients come back in the full
    layout, zero below first_layer (layer_mask)."""
    below = nnx.merge(graphdef, selected, rest)
    residuals, _ = below.hidden_states(input_ids, attention_mask, num_blocks=first_layer, final_norm=False)

    def upper(tree):
        return jax.tree_util.tree_map_with_path(lambda p, x: x[first_layer:] if in_layer_stack(p) else x, tree)

    up_selected, up_rest = upper(selected), upper(rest)

    def loss(sel, ids, mask, labels, positions, residual):
        model = nnx.merge(graphdef, sel, up_rest)
        hidden, _ = model.hidden_states(ids[None], mask[None], residual=residual[None])
        total, count = hidden_loss_sums(model, hidden, labels[None],
                                        positions=None if positions is None else positions[None])
        return (total / jnp.maximum(count, 1.0))[0]

    def grad(ids, mask, labels, positions, residual):
        g = jax.grad(loss)(up_selected, ids, mask, labels, positions, residual)
        return jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.concatenate([jnp.zeros((first_layer,) + x.shape[1:], x.dtype), x])
            if in_layer_stack(p) else x, g)

    return grad, residuals


# ----------------------------------------------------------------------------- per-example gradients


def map_in_steps(one, args, *, per_step: int, shards: int = 1):
    """vmap(one) over `per_step` samples at a time, lax.map over the steps, so at most per_step
    samples' intermediates (full gradients) are alive at once.

    The batch axis of `args` (None entries: absent optional inputs, they stay None) is split in `shards`
    contiguous blocks, one per device. Each step takes per_step / shards samples from every block, so the
    vmapped axis stays split over the devices and every device works on its own samples (XLA keeps the
    sharding through these reshapes). With one shard this is the plain reshape [b] -> [b / per_step, per_step].
    """
    b = args[0].shape[0]
    steps, local = b // per_step, per_step // shards

    def fold(x):
        return x.reshape(shards, steps, local, *x.shape[1:]).swapaxes(0, 1).reshape(steps, per_step, *x.shape[1:])

    def unfold(y):
        return y.reshape(steps, shards, local, *y.shape[2:]).swapaxes(0, 1).reshape(b, *y.shape[2:])

    out = jax.lax.map(lambda c: jax.vmap(one)(*c), jax.tree.map(fold, tuple(args)))
    return jax.tree.map(unfold, out)


def local_microbatch(b: int, shards: int, microbatch: int) -> int:
    """Samples per step on each device: the largest divisor of the per-device batch <= microbatch."""
    if b % shards:
        raise ValueError(f"a batch of {b} rows does not split over {shards} devices: use a batch size that is a "
                         f"multiple of {shards}")
    local = b // shards
    return max(m for m in range(1, min(local, max(1, microbatch)) + 1) if local % m == 0)


def single_sample_loss(graphdef, rest):
    """loss(selected, input_ids [L], attention_mask [L], labels [L], positions [R] or None) -> l(theta; x)
    for ONE unbatched sample, the function whose gradient is a per-example gradient (positions: its loss
    positions, -1 padded, as hidden_loss_sums takes them)."""
    def loss(selected, ids, mask, labels, positions=None):
        model = nnx.merge(graphdef, selected, rest)
        return sample_losses(model, ids[None], mask[None], labels[None],
                             positions=None if positions is None else positions[None])[0]

    return loss


def per_example_gradients(model, input_ids, attention_mask, labels, *, params=None,
                          projector: Projector | None = None, precondition=None, offset=None,
                          normalize: bool = False, microbatch: int | None = None,
                          mask: CoordinateMask | None = None, shards: int = 1, first_layer: int = 0,
                          loss_positions=None):
    """Projected per-example gradients P u_i, float32 [B, k] (docs/method.md 4.3 and 6).

        g_i = grad_theta l(theta; x_i)        (mean response-token loss of row i, selected params only)
        u_i = a (.) (g_i - offset)            (a = precondition, the update model's D_a; offset: eta H_T b)
        u_i <- u_i / ||u_i||                  (normalize=True; full-space norm, a zero row stays zero)
        out_i = P M u_i                       (M: the coordinate mask, P: the projector's sketch)

    input_ids, attention_mask, labels: int [B, L] arrays (labels -100 carry no loss). model, params:
    see split_params. precondition / offset: pytrees like the selected params, or None. projector:
    a sketch.Projector; None keeps the flattened gradient (k = d). microbatch: vmap over that many
    samples at a time under a lax.map (must divide B, else all B at once), so only that many full
    gradients are alive; None: all at once. shards: the batch axis is split in that many contiguous
    device blocks (a mesh), `microbatch` then counts per device. first_layer > 0: g_i is the gradient of
    the selected parameters of layers first_layer.. only (zero below, as layer_mask makes it): the lower
    layers run forward once per batch and no backward pass goes below first_layer. loss_positions: int
    [B, R], each row's positions whose next token carries loss, -1 padded (data.Batch.loss_positions): the
    lm-head runs there only (hidden_loss_sums); None: at every position.
    Pure: jit, vmap and shard_map it.
    """
    graphdef, selected, rest = split_params(model, params)
    projector = Projector("none", 0) if projector is None else projector
    args = (input_ids, attention_mask, labels, loss_positions)
    # The sketch skips the blocks of the layers below first_layer: zero in every gradient (not once a
    # coordinate mask has reordered the coordinates).
    zeros = zero_prefixes(selected, first_layer) if first_layer and mask is None else None
    if first_layer:  # and the shift: a * (g - offset) is then zero below too
        offset = layer_mask(offset, first_layer)
        grad, residuals = _upper_layer_gradients(graphdef, selected, rest, first_layer, input_ids, attention_mask)
        args = (*args, residuals)
    else:
        loss = single_sample_loss(graphdef, rest)

        def grad(ids, attn, labels, positions):
            return jax.grad(loss)(selected, ids, attn, labels, positions)

    def one(*row):
        g = grad(*row)
        if offset is not None:
            g = jax.tree.map(lambda x, o: x - o.astype(x.dtype), g, offset)
        if precondition is not None:
            g = jax.tree.map(lambda a, x: (a * x).astype(jnp.float32), precondition, g)
        if mask is not None:
            g = mask.apply(g)
        return projector.project(g, normalize=normalize, zeros=zeros)

    b = input_ids.shape[0]
    mb = b if microbatch is None else microbatch
    if shards > 1:  # `mb` samples per device at a time
        m = local_microbatch(b, shards, mb)
        if m == b // shards:
            return jax.vmap(one)(*args)
        return map_in_steps(one, args, per_step=m * shards, shards=shards)
    if b <= mb or b % mb:
        return jax.vmap(one)(*args)
    # Several microbatches: a scan keeps at most `mb` full gradients alive.
    return map_in_steps(one, args, per_step=mb)


# ----------------------------------------------------------------------------- the shell: host batches, a mesh


def batch_arrays(batch, mesh=None):
    """(input_ids, attention_mask, labels, loss_positions or None) of a data.Batch on the device(s): split
    over the mesh, padded with empty rows (no tokens, no labels, no loss positions) to a multiple of its
    size; as they are without a mesh."""
    positions = batch.loss_positions
    if mesh is None:
        return (jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels),
                None if positions is None else jnp.asarray(positions))
    return (shd.put_rows(shd.pad_rows(batch.input_ids, mesh), mesh),
            shd.put_rows(shd.pad_rows(batch.attention_mask, mesh), mesh),
            shd.put_rows(shd.pad_rows(batch.labels, mesh, IGNORE_INDEX), mesh),
            None if positions is None else shd.put_rows(shd.pad_rows(positions, mesh, -1), mesh))


@dataclasses.dataclass(frozen=True)
class GradientConfig:
    """What a projected per-example gradient is: which parameters, which preconditioner, which sketch."""

    params: str | None = None        # regex over parameter paths (None: all)
    keep: int | None = None          # keep a fixed random subset of this many coordinates
    normalize: bool = True           # L2-normalise a(.)g before projecting (cosine scores)
    microbatch: int | None = None    # samples per vmapped gradient computation (None: the most that fit the device)
    seed: int = 0
    first_layer: int = 0             # only the selected parameters of layers first_layer.. (the backward stops there)


def _gradients(graphdef, projector, config: GradientConfig, mask, shards: int,
               selected, rest, precondition, offset, ids, attention_mask, labels, positions):
    """The compiled body of PerExampleGradients: per_example_gradients with the shell's settings."""
    return per_example_gradients((graphdef, rest), ids, attention_mask, labels, params=selected,
                                 projector=projector, precondition=precondition, offset=offset,
                                 normalize=config.normalize, microbatch=config.microbatch, mask=mask,
                                 shards=shards, first_layer=config.first_layer, loss_positions=positions)


def gradient_settings(rows_per_device: int, *, remat: bool = True) -> list:
    """(name, (microbatch, remat)) of per-example gradients on `rows_per_device` rows, fastest first: every
    microbatch dividing the rows from the largest, then 1 sample with layer remat (when `remat`)."""
    out = [(f"microbatch {m} per device", (m, False))
           for m in range(rows_per_device, 0, -1) if rows_per_device % m == 0]
    return out + ([("microbatch 1 per device, remat", (1, True))] if remat else [])


class PerExampleGradients:
    """per_example_gradients over host batches: one jit per length bucket, batches split over a mesh.

    For a batch, vmap(grad) gives every sample's gradient of its own mean response-token loss
    w.r.t. the selected parameters; each is multiplied by the update model's a (Adam: D_a), masked
    to the kept coordinates, optionally L2-normalised, and projected, all inside one compiled
    function, so only a microbatch of full gradients ever exists at once.
    """

    def __init__(self, model, projector, config: GradientConfig = GradientConfig(), precondition=None,
                 offset=None, *, mesh=None, device_memory: int | None = None):
        self.config = config
        self.projector = projector
        self.graphdef, self.selected, self.rest = split_params(model, config.params)
        check_first_layer(self.selected, config.first_layer, model.config.num_layers)
        # Pytrees like the selected params (restrict() cuts them from full-model trees), or None:
        self.precondition = precondition  # the update model's a: each gradient becomes a * g
        self.offset = offset              # subtracted from each gradient first (targets: eta * H_T b)
        self.mask = CoordinateMask.create(self.selected, config.keep, config.seed) if config.keep else None
        # A device mesh splits each batch over its devices (distributed.get_mesh() by default).
        self.mesh = shd.get_mesh() if mesh is None else mesh
        self.shards = self.mesh.size if shd.active(self.mesh) else 1
        if self.shards > 1:
            self.selected, self.rest, self.precondition, self.offset = (
                shd.shard_params(t, self.mesh) for t in (self.selected, self.rest, self.precondition, self.offset))
        self.sharding = shd.row_sharding(self.mesh, 2) if self.shards > 1 else None
        # The budget of a planned microbatch (device_memory overrides what the device says).
        self.device_memory = (memory.device_memory(device_memory, agree=shd.spans_processes(self.mesh))
                              if config.microbatch is None else None)
        self.plans = {}  # (rows, length[, lm-head positions]) -> ((microbatch, remat), compiled program), planned

    def _jitted(self, microbatch: int | None, remat: bool = False):
        """The compiled body for one microbatch size (and, planned, with layer remat). One compilation per
        key, shared: a second selection in the same process (another target set, the landmark and target
        passes) reuses the compiled length buckets. The coordinate mask is a function of (keep, seed, the
        selected shapes): all in the key."""
        config = dataclasses.replace(self.config, microbatch=microbatch)
        graphdef = self.graphdef
        if remat:  # the same model with model.remat set: only the graph differs, not the arrays
            model = nnx.merge(self.graphdef, self.selected, self.rest)
            model.remat = True
            graphdef = nnx.split(model)[0]
        return shd.jit_once(
            ("gradients", graphdef, self.projector, config, self.shards, self.sharding),
            functools.partial(_gradients, graphdef, self.projector, config, self.mask, self.shards),
            out_shardings=self.sharding)

    def _plan(self, args):
        """The program with the largest microbatch (a divisor of the per-device rows) that fits the device,
        by the compiler's memory analysis (memory.first_fit); at 1 sample per device, with layer remat if
        it still does not fit (unless the model recomputes already)."""
        rows, length = args[-2].shape
        settings = gradient_settings(rows // self.shards,
                                     remat=not getattr(nnx.merge(self.graphdef, self.selected, self.rest), "remat",
                                                       False))
        key = ("gradients", self.graphdef, self.projector, self.config, self.shards, self.sharding,
               memory.input_key(args))
        return memory.planned(key, settings, lambda s: self._jitted(*s).lower(*args).compile(),
                              self.device_memory, what=f"per-example gradients of {rows} rows of {length} tokens")

    def __call__(self, batch):
        """Projected gradients [B, k] float32 and a validity flag [B] for one data.Batch."""
        args = (self.selected, self.rest, self.precondition, self.offset,
                *batch_arrays(batch, self.mesh if self.shards > 1 else None))
        if self.config.microbatch is not None:
            out = self._jitted(self.config.microbatch)(*args)
        else:
            shape = args[-2].shape if args[-1] is None else (*args[-2].shape, args[-1].shape[1])
            if shape not in self.plans:
                self.plans[shape] = self._plan(args)
            out = self.plans[shape][1](*args)
        if out.shape[0] != len(batch.input_ids):  # rows added to fill the mesh
            out = out[: len(batch.input_ids)]
        has_response = (np.asarray(batch.labels)[:, 1:] != IGNORE_INDEX).any(axis=1)
        return out, np.asarray(batch.sample_mask) & has_response

    def run(self, batches, *, desc: str = "gradients", progress: bool = True) -> np.ndarray:
        """Gradients [n, k] of all the batches of one make_batches call, rows in the order of its examples
        (zero for a row with no response token after the shift)."""
        def rows(batch):
            g, valid = self(batch)
            return np.where(valid[:, None], np.asarray(g), np.float32(0.0))

        return D.collect_rows(batches, rows, desc=desc, progress=progress)
