"""Per-sample losses and gradients of the masked mean token loss, and Hessian-vector products.

docs/method.md 1: l(theta; x) is the token cross-entropy over the response tokens of x (labels != -100),
averaged over those tokens. A sample with no response token has no loss: it contributes 0 here and
is reported upstream (data.tokenize skips it), never a NaN.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax import data as D
from idjax import distributed as dist
from idjax.data import IGNORE_INDEX


def token_losses(logits, labels):
    """Per-token cross-entropy of next-token prediction; labels are aligned with the inputs.

    Returns (loss [B, L-1] float32, mask [B, L-1] bool): position t predicts labels[t + 1].
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, logz - picked, 0.0), mask


def sample_losses(model, input_ids, attention_mask, labels):
    """Mean response-token loss of every sample: float32 [B]; 0 for samples without responses."""
    logits = model(input_ids, attention_mask)
    loss, mask = token_losses(logits, labels)
    count = mask.sum(axis=-1)
    return loss.sum(axis=-1) / jnp.maximum(count, 1)


# ----------------------------------------------------------------------------- parameter subsets


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


def split_params(model, pattern: str | None = None):
    """(graphdef, selected params, everything else): the gradient is taken w.r.t. the selection."""
    graphdef, selected, rest = nnx.split(model, param_filter(pattern), ...)
    if not jax.tree.leaves(selected):
        names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
        raise ValueError(f"--params {pattern!r} matches no parameter; names look like {names[:4]}")
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


# ----------------------------------------------------------------------------- per-example gradients


def _sharded_map(one, args, per_step: int, shards: int):
    """vmap(one) over `per_step` samples at a time, lax.map over the steps, so at most per_step
    samples' intermediates (full gradients) are alive at once.

    The batch axis of `args` is split in `shards` contiguous blocks, one per device. Each step takes
    per_step / shards samples from every block, so the vmapped axis stays split over the devices and
    every device works on its own samples (XLA keeps the sharding through these reshapes). With one
    shard this is the plain reshape [b] -> [b / per_step, per_step].
    """
    b = args[0].shape[0]
    steps, local = b // per_step, per_step // shards

    def fold(x):
        return x.reshape(shards, steps, local, *x.shape[1:]).swapaxes(0, 1).reshape(steps, per_step, *x.shape[1:])

    def unfold(y):
        return y.reshape(steps, shards, local, *y.shape[2:]).swapaxes(0, 1).reshape(b, *y.shape[2:])

    out = jax.lax.map(lambda c: jax.vmap(one)(*c), tuple(fold(x) for x in args))
    return jax.tree.map(unfold, out)


def _put_batch(batch, mesh):
    """(input_ids, attention_mask, labels) on the device(s): split over the mesh, padded with empty rows
    (no tokens, no labels) to a multiple of its size; as they are without a mesh."""
    if mesh is None:
        return jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask), jnp.asarray(batch.labels)
    return (dist.put_rows(dist.pad_rows(batch.input_ids, mesh), mesh),
            dist.put_rows(dist.pad_rows(batch.attention_mask, mesh), mesh),
            dist.put_rows(dist.pad_rows(batch.labels, mesh, IGNORE_INDEX), mesh))


def _local_microbatch(b: int, shards: int, microbatch: int) -> int:
    """Samples per step on each device: the largest divisor of the per-device batch <= microbatch."""
    if b % shards:
        raise ValueError(f"a batch of {b} rows does not split over {shards} devices: use a batch size that is a "
                         f"multiple of {shards}")
    local = b // shards
    return max(m for m in range(1, min(local, max(1, microbatch)) + 1) if local % m == 0)


def _one_sample_loss(graphdef, rest):
    def loss(selected, ids, mask, labels):
        model = nnx.merge(graphdef, selected, rest)
        return sample_losses(model, ids[None], mask[None], labels[None])[0]

    return loss


@dataclasses.dataclass(frozen=True)
class GradientConfig:
    """What a projected per-example gradient is: which parameters, which preconditioner, which sketch."""

    params: str | None = None        # regex over parameter paths (None: all)
    keep: int | None = None          # keep a fixed random subset of this many coordinates
    normalize: bool = True           # L2-normalise a(.)g before projecting (cosine scores)
    microbatch: int = 8              # samples per vmapped gradient computation
    seed: int = 0


def _per_example_gradients(graphdef, projector, config: GradientConfig, mask, shards: int,
                           selected, rest, precondition, offset, ids, mask_ids, labels):
    """[B, k] projected gradients of one batch (the compiled body of PerExampleGradients)."""
    loss = _one_sample_loss(graphdef, rest)
    mb = config.microbatch

    def one(ids, attn, labels):
        g = jax.grad(loss)(selected, ids, attn, labels)
        if offset is not None:
            g = jax.tree.map(lambda x, o: x - o.astype(x.dtype), g, offset)
        if precondition is not None:
            g = jax.tree.map(lambda a, x: (a * x).astype(jnp.float32), precondition, g)
        if mask is not None:
            g = mask.apply(g)
        return projector.project(g, normalize=config.normalize)

    b = ids.shape[0]
    if shards > 1:  # `mb` samples per device at a time
        m = _local_microbatch(b, shards, mb)
        if m == b // shards:
            return jax.vmap(one)(ids, mask_ids, labels)
        return _sharded_map(one, (ids, mask_ids, labels), m * shards, shards)
    if b <= mb or b % mb:
        return jax.vmap(one)(ids, mask_ids, labels)
    # Several microbatches: a scan keeps at most `mb` full gradients alive.
    return _sharded_map(one, (ids, mask_ids, labels), mb, 1)


class PerExampleGradients:
    """Projected, optionally preconditioned per-example gradients, one jit per length bucket.

    For a batch, vmap(grad) gives every sample's gradient of its own mean response-token loss
    w.r.t. the selected parameters; each is multiplied by the update model's a (Adam: D_a), masked
    to the kept coordinates, optionally L2-normalised, and projected, all inside one compiled
    function, so only a microbatch of full gradients ever exists at once.
    """

    def __init__(self, model, projector, config: GradientConfig = GradientConfig(), precondition=None,
                 offset=None, *, mesh=None):
        self.config = config
        self.projector = projector
        self.graphdef, self.selected, self.rest = split_params(model, config.params)
        # Pytrees like the selected params (restrict() cuts them from full-model trees), or None:
        self.precondition = precondition  # the update model's a: each gradient becomes a * g
        self.offset = offset              # subtracted from each gradient first (targets: eta * H_T b)
        self.mask = CoordinateMask.create(self.selected, config.keep, config.seed) if config.keep else None
        # A device mesh splits each batch over its devices (distributed.get_mesh() by default).
        self.mesh = dist.get_mesh() if mesh is None else mesh
        self.shards = self.mesh.size if dist.active(self.mesh) else 1
        if self.shards > 1:
            self.selected, self.rest, self.precondition, self.offset = (
                dist.shard_params(t, self.mesh) for t in (self.selected, self.rest, self.precondition, self.offset))
        # The coordinate mask is a function of (keep, seed, the selected shapes): all in the key.
        sharding = dist.row_sharding(self.mesh, 2) if self.shards > 1 else None
        # One compilation per key, shared: a second selection in the same process (another target
        # set, the landmark and target passes) reuses the compiled length buckets.
        self._fn = dist.jit_once(
            ("gradients", self.graphdef, projector, config, self.shards, sharding),
            functools.partial(_per_example_gradients, self.graphdef, projector, config, self.mask, self.shards),
            out_shardings=sharding)

    def __call__(self, batch):
        """Projected gradients [B, k] float32 and a validity flag [B] for one data.Batch."""
        out = self._fn(self.selected, self.rest, self.precondition, self.offset,
                       *_put_batch(batch, self.mesh if self.shards > 1 else None))
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


# ----------------------------------------------------------------------------- Hessian-vector products


def _num_samples(batches) -> int:
    """Real (non-padding) samples of a target set; an empty one has no loss to take products of."""
    total = sum(int(np.asarray(b.sample_mask).sum()) for b in batches)
    if total == 0:
        raise ValueError("the target set is empty")
    return total


class TargetArrays(NamedTuple):
    arrays: tuple   # per batch: (input_ids, attention_mask, labels, sample_mask) device arrays
    total: jax.Array  # number of real samples, float32


def target_arrays(batches) -> TargetArrays:
    """(arrays, total): each batch as device arrays (ids, mask, labels, sample_mask) and the number of
    real samples. Passed to jitted functions as arguments, so a new target set of the same shapes
    reuses their compilation (closed over, they would be constants baked into each trace)."""
    total = _num_samples(batches)
    arrays = tuple((jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), jnp.asarray(b.labels),
                    jnp.asarray(b.sample_mask)) for b in batches)
    return TargetArrays(arrays, jnp.float32(total))


def _mean_loss(graphdef, rest, arrays, total, selected):
    model = nnx.merge(graphdef, selected, rest)
    acc = jnp.float32(0.0)
    for ids, mask, labels, real in arrays:
        acc = acc + jnp.sum(jnp.where(real, sample_losses(model, ids, mask, labels), 0.0))
    return acc / total


def mean_loss_fn(graphdef, rest, batches):
    """L_T(selected) = mean over all real samples of their mean response-token loss (docs/method.md 1)."""
    arrays, total = target_arrays(batches)
    return functools.partial(_mean_loss, graphdef, rest, arrays, total)


def hvp(loss, params, vectors):
    """Exact Hessian-vector products H v by forward-over-reverse (jvp of grad).

    `vectors` is a pytree like `params` with a leading axis of n vectors; returns the same shape.
    """
    grad = jax.grad(loss)
    return jax.vmap(lambda v: jax.jvp(grad, (params,), (v,))[1])(vectors)


def gauss_newton_vp(graphdef, rest, batches, params, vectors):
    """Gauss-Newton products G v = J^T H_out J v of the mean target loss (always PSD).

    J is the Jacobian of the logits and H_out the softmax cross-entropy Hessian diag(p) - p p^T
    of each trained token, weighted as in the mean loss.
    """
    return _gauss_newton_vp(graphdef, rest, *target_arrays(batches), params, vectors)


def _gauss_newton_vp(graphdef, rest, arrays, total, params, vectors):
    def gv(v):
        out = jax.tree.map(jnp.zeros_like, params)
        for ids, mask, labels, real in arrays:
            def logits_fn(p):
                return nnx.merge(graphdef, p, rest)(ids, mask)[:, :-1].astype(jnp.float32)

            logits, lin = jax.linearize(logits_fn, params)
            u = lin(v)
            prob = jax.nn.softmax(logits, axis=-1)
            hu = prob * u - prob * jnp.sum(prob * u, axis=-1, keepdims=True)
            tok = labels[:, 1:] != IGNORE_INDEX
            weight = tok / jnp.maximum(tok.sum(-1, keepdims=True), 1) * real[:, None] / total
            (back,) = jax.linear_transpose(lin, params)(hu * weight[..., None])
            out = jax.tree.map(jnp.add, out, back)
        return out

    return jax.vmap(gv)(vectors)


def hessian_products(graphdef, rest, batches, params, vectors, kind: str = "exact"):
    """H_T v for a stack of vectors: exact Hessian (jvp of grad) or Gauss-Newton (always PSD).
    `batches`: data.Batch-es, or target_arrays(batches) (inside a jit: as arguments, not constants)."""
    arrays, total = batches if isinstance(batches, TargetArrays) else target_arrays(batches)
    if kind == "exact":
        return hvp(functools.partial(_mean_loss, graphdef, rest, arrays, total), params, vectors)
    if kind == "gauss-newton":
        return _gauss_newton_vp(graphdef, rest, arrays, total, params, vectors)
    raise ValueError(f"hessian must be 'exact' or 'gauss-newton', got {kind!r}")


@functools.partial(jax.jit, static_argnums=0)
def _target_gradient(graphdef, selected, rest, arrays, total):
    return jax.grad(functools.partial(_mean_loss, graphdef, rest, arrays, total))(selected)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _target_hvp(graphdef, hessian, selected, rest, arrays, total, shift):
    vectors = jax.tree.map(lambda x: x[None], shift)
    return hessian_products(graphdef, rest, TargetArrays(arrays, total), selected, vectors, hessian)


def target_direction(model, batches, pattern: str | None = None, *, shift=None, eta: float = 1.0,
                     hessian: str = "exact"):
    """(v, offset): v = g_T - eta * H_T shift over the selected params, offset = eta * H_T shift (or None).

    docs/method.md 3: p = G D_a (g_T - eta H_T b). `shift` is the update model's b restricted to the
    selection (None for GD). `offset` is what per-target-sample columns subtract from their own
    gradient (the mean-target Hessian stands in for each sample's own).
    """
    graphdef, selected, rest = split_params(model, pattern)
    # Weights and data go in as arguments (closed over, they would be constants that XLA folds, and
    # every new target set would compile again): one compilation per model structure and batch shapes.
    arrays, total = target_arrays(batches)
    g = _target_gradient(graphdef, selected, rest, arrays, total)
    if shift is None:
        return g, None
    hb = _target_hvp(graphdef, hessian, selected, rest, arrays, total, shift)
    offset = jax.tree.map(lambda x: eta * x[0], hb)
    return jax.tree.map(jnp.subtract, g, offset), offset


def _curvature(graphdef, projector, config: GradientConfig, hessian: str, shards: int,
               selected, rest, precondition, targets: TargetArrays, ids, mask, labels):
    """(P u, P h) [B, k] of one batch (the compiled body of ProjectedCurvature)."""
    loss = _one_sample_loss(graphdef, rest)

    def one(args):
        g = jax.grad(loss)(selected, *args)
        u = g if precondition is None else jax.tree.map(lambda a, x: (a * x).astype(jnp.float32), precondition, g)
        if config.normalize:
            norm = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(u)))
            u = jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30).astype(x.dtype), u)
        h = hessian_products(graphdef, rest, targets, selected, jax.tree.map(lambda x: x[None], u), hessian)
        h = jax.tree.map(lambda x: x[0], h)
        return projector.project(u), projector.project(h)

    if shards > 1:
        _local_microbatch(ids.shape[0], shards, 1)  # checks the batch splits
        return _sharded_map(lambda *a: one(a), (ids, mask, labels), shards, shards)
    return jax.lax.map(one, (ids, mask, labels))


class ProjectedCurvature:
    """Second-order landmark terms (docs/method.md 4.3): for each source sample, u = a * g (L2-normalised
    when asked, as the first-order scores are) and h = H_T u, both projected with the same sketch,
    so Q_L[i, j] = <P u_j, P h_i>. One HVP at a time (lax.map) bounds memory to one double pass
    over the target set; one compilation per length bucket.
    """

    def __init__(self, model, projector, target_batches, config: GradientConfig = GradientConfig(),
                 precondition=None, hessian: str = "exact", *, mesh=None):
        if config.keep:
            raise ValueError("second-order selection works on whole parameter tensors; drop the coordinate mask "
                             "(keep) or restrict --params instead")
        if hessian not in ("exact", "gauss-newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss-newton', got {hessian!r}")
        self.config, self.projector, self.hessian = config, projector, hessian
        self.targets = target_arrays(target_batches)  # raises on an empty target set
        self.graphdef, self.selected, self.rest = split_params(model, config.params)
        self.precondition = precondition
        self.mesh = dist.get_mesh() if mesh is None else mesh
        self.shards = self.mesh.size if dist.active(self.mesh) else 1
        rows = None
        if self.shards > 1:  # one sample per device at a time
            self.selected, self.rest, self.precondition = (
                dist.shard_params(t, self.mesh) for t in (self.selected, self.rest, self.precondition))
            self.targets = dist.put_replicated(self.targets, self.mesh)
            rows = dist.row_sharding(self.mesh, 2)
        # Shared like the gradients' compilation; the target set is an argument, so another target set
        # of the same batch shapes compiles nothing.
        self._fn = dist.jit_once(
            ("curvature", self.graphdef, projector, config, hessian, self.shards, rows),
            functools.partial(_curvature, self.graphdef, projector, config, hessian, self.shards),
            out_shardings=None if rows is None else (rows, rows))

    def __call__(self, batch):
        """(P u [B, k], P h [B, k]) for one data.Batch; padding rows are garbage (mask them)."""
        u, h = self._fn(self.selected, self.rest, self.precondition, self.targets,
                        *_put_batch(batch, self.mesh if self.shards > 1 else None))
        rows = len(batch.input_ids)
        return (u, h) if u.shape[0] == rows else (u[:rows], h[:rows])
