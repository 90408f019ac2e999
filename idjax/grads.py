"""Projected per-example gradients: the pure core, and its batch shell.

A per-example gradient is the gradient of one sample's loss (idjax.losses, docs/method.md 1), sketched
whole or layer by layer. The core functions take arrays and pytrees, with options as keyword arguments,
and run inside a caller's jax.jit / jax.vmap / shard_map. A `model` argument is an nnx module or a
(graphdef, state, ...) tuple from nnx.split; `params` names the differentiated parameters (see
split_params). Hessian products, curvature and the target direction are in idjax.hessian."""

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
from idjax.losses import (  # noqa: F401 (re-exported: grads.sample_losses etc.)
    LOSS_CHUNK_BYTES, hidden_loss_sums, mean_response_loss, response_loss_sums, sample_losses, token_losses,
)
from idjax.sketch import Projector, global_norm_sq
from idjax.subsets import (  # noqa: F401 (re-exported: grads.split_params etc.)
    CoordinateMask, check_first_layer, in_layer_stack, layer_mask, param_filter, restrict, split_params, zero_prefixes,
)


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


# ----------------------------------------------------------------------------- layer by layer


def _split_layers(state):
    """(the stacked layer entries as a State of the `layers` module, the other entries) of a State, or
    (None, None)."""
    if state is None:
        return None, None
    flat = list(nnx.to_flat_state(state))
    return (nnx.from_flat_state([(p[1:], v) for p, v in flat if p[0] == "layers"]),
            nnx.from_flat_state([(p, v) for p, v in flat if p[0] != "layers"]))


def _preconditioned(g, precondition, offset):
    """u = a (.) (g - offset), float32 where a is given (per_example_gradients' docstring)."""
    if offset is not None:
        g = jax.tree.map(lambda x, o: x - o.astype(x.dtype), g, offset)
    if precondition is not None:
        g = jax.tree.map(lambda a, x: (a * x).astype(jnp.float32), precondition, g)
    return g


def _layerwise_sketch(graphdef, selected, rest, projector: Projector, precondition, offset, first_layer: int,
                      normalize: bool):
    """one(ids, mask, labels, positions) -> P u for ONE sample, its backward pass run layer by layer.

    The layers run forward once, keeping each one's input (as remat does); then a reverse scan takes the
    vjp of one layer at a time, and that layer's gradient is preconditioned and sketched at once
    (Projector.project_layer), so a sample holds one layer's gradient, never the whole model's: the memory
    of a full-size float32 gradient per sample (32 GB for an 8B model) is gone, for one more forward pass.
    The same P u as the whole gradient's sketch, to float rounding; the norm for `normalize` is summed
    over the layers as they pass.
    """
    flat = jax.tree_util.tree_flatten_with_path(selected)[0]
    layer_index = [i for i, (path, _) in enumerate(flat) if in_layer_stack(path)]
    other_index = [i for i, (path, _) in enumerate(flat) if not in_layer_stack(path)]
    (sel_layers, sel_other), (rest_layers, _) = _split_layers(selected), _split_layers(rest)
    (a_layers, a_other), (o_layers, o_other) = _split_layers(precondition), _split_layers(offset)
    model = nnx.merge(graphdef, selected, rest)
    layer_entries = nnx.from_flat_state([(p, v) for p, v in nnx.to_flat_state(selected) if p[0] == "layers"])

    def with_other(other):  # the model with the selected non-layer entries `other` (differentiated)
        return nnx.merge(graphdef, layer_entries, other, rest)

    num_layers = model.config.num_layers
    embedded = first_layer == 0 and any(str(path[0]) == "embed_tokens" for path, _ in nnx.to_flat_state(selected))

    def cut(tree, lo, hi):
        return jax.tree.map(lambda x: x[lo:hi], tree)

    def one(ids, mask, labels, positions):
        step = model.layer_step(mask[None])

        x = model.embed_tokens(ids[None])
        if first_layer:  # the layers below: forward only
            x = jax.lax.scan(lambda h, st: (step(h, *st), None), x,
                             (cut(sel_layers, 0, first_layer), cut(rest_layers, 0, first_layer)))[0]
        top, inputs = jax.lax.scan(lambda h, st: (step(h, *st), h), x,
                                   (cut(sel_layers, first_layer, None), cut(rest_layers, first_layer, None)))

        def head(other, h):
            m = with_other(other)
            total, count = hidden_loss_sums(m, m.norm(h), labels[None],
                                            positions=None if positions is None else positions[None])
            return (total / jnp.maximum(count, 1.0))[0]

        g_other, dh = jax.grad(head, argnums=(0, 1))(sel_other, top)

        def back(carry, xs):
            dh, out, sq = carry
            layer, sel, rest_l, a, o, h = xs
            g, dh = jax.vjp(lambda s_, h_: step(h_, s_, rest_l), sel, h)[1](dh)
            u = _preconditioned(g, a, o)
            for i, x in zip(layer_index, jax.tree.leaves(u)):
                out = out + projector.project_layer(x, layer, index=i, layers=num_layers)
            return (dh, out, sq + global_norm_sq(u)), None

        start = (dh, jnp.zeros((projector.dim,), jnp.float32), jnp.float32(0.0))
        if layer_index or embedded:
            upper = (jnp.arange(first_layer, num_layers), cut(sel_layers, first_layer, None),
                     cut(rest_layers, first_layer, None), cut(a_layers, first_layer, None),
                     cut(o_layers, first_layer, None), inputs)
            (dh, out, sq), _ = jax.lax.scan(back, start, upper, reverse=True)
        else:
            _, out, sq = start
        if embedded:  # the token embedding's share, from the gradient at the first layer's input
            g_embed = jax.vjp(lambda o: with_other(o).embed_tokens(ids[None]), sel_other)[1](dh)[0]
            g_other = jax.tree.map(jnp.add, g_other, g_embed)
        u = _preconditioned(g_other, a_other, o_other)
        out = out + projector.project_leaves(dict(zip(other_index, jax.tree.leaves(u))))
        sq = sq + global_norm_sq(u)
        if normalize:  # the sketch is linear: scaling it equals scaling u
            out = out * jnp.where(sq > 0, jax.lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
        return out

    return one


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
                          loss_positions=None, layerwise: bool = False):
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
    lm-head runs there only (hidden_loss_sums); None: at every position. layerwise: the backward pass runs
    layer by layer and each layer's gradient is sketched as it comes (a sketching projector, no mask): one
    layer's gradient alive per sample instead of the whole model's, for one more forward pass (as remat).
    Pure: jit, vmap and shard_map it.
    """
    graphdef, selected, rest = split_params(model, params)
    projector = Projector("none", 0) if projector is None else projector
    args = (input_ids, attention_mask, labels, loss_positions)
    if layerwise:
        if projector.kind == "none" or mask is not None:
            raise ValueError("layerwise gradients need a sketch (a projector kind other than 'none') and no "
                             "coordinate mask (keep)")
        one = _layerwise_sketch(graphdef, selected, rest, projector, precondition, offset, first_layer, normalize)
        return _over_rows(one, args, microbatch, shards)
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
        g = _preconditioned(grad(*row), precondition, offset)
        if mask is not None:
            g = mask.apply(g)
        return projector.project(g, normalize=normalize, zeros=zeros)

    return _over_rows(one, args, microbatch, shards)


def _over_rows(one, args, microbatch: int | None, shards: int):
    """vmap(one) over the rows of args, `microbatch` rows (per device, of `shards`) at a time."""
    b = args[0].shape[0]
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
    layerwise: bool = False          # the backward pass layer by layer, each layer's gradient sketched as it comes


def _gradients(graphdef, projector, config: GradientConfig, mask, shards: int,
               selected, rest, precondition, offset, ids, attention_mask, labels, positions):
    """The compiled body of PerExampleGradients: per_example_gradients with the shell's settings."""
    return per_example_gradients((graphdef, rest), ids, attention_mask, labels, params=selected,
                                 projector=projector, precondition=precondition, offset=offset,
                                 normalize=config.normalize, microbatch=config.microbatch, mask=mask,
                                 shards=shards, first_layer=config.first_layer, loss_positions=positions,
                                 layerwise=config.layerwise)


def gradient_settings(rows_per_device: int, *, remat: bool = True, layerwise: bool = False) -> list:
    """(name, (microbatch, remat, layerwise)) of per-example gradients on `rows_per_device` rows, fastest
    first: every microbatch dividing the rows from the largest; then, with `layerwise` (a sketch, no mask),
    the same microbatches layer by layer (one layer's gradient alive per sample, for one more forward pass),
    else 1 sample with layer remat (when `remat`)."""
    sizes = [m for m in range(rows_per_device, 0, -1) if rows_per_device % m == 0]
    out = [(f"microbatch {m} per device", (m, False, False)) for m in sizes]
    if layerwise:
        return out + [(f"microbatch {m} per device, layer by layer", (m, False, True)) for m in sizes]
    return out + ([("microbatch 1 per device, remat", (1, True, False))] if remat else [])


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

    def _jitted(self, microbatch: int | None, remat: bool = False, layerwise: bool | None = None):
        """The compiled body for one microbatch size (and, planned, with layer remat). One compilation per
        key, shared: a second selection in the same process (another target set, the landmark and target
        passes) reuses the compiled length buckets. The coordinate mask is a function of (keep, seed, the
        selected shapes): all in the key."""
        config = dataclasses.replace(self.config, microbatch=microbatch,
                                     layerwise=self.config.layerwise if layerwise is None else layerwise)
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
                                                       False),
                                     layerwise=self.projector.kind != "none" and self.mask is None)
        if self.config.layerwise:  # asked for: only its own microbatches
            settings = [(name, s) for name, s in settings if s[2]]
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
