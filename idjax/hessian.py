"""Second-order pieces: the target loss L_T, its gradient, Hessian-vector products (exact and
Gauss-Newton), the projected landmark curvature, and the target direction (docs/method.md 3, 4.3).

Core functions take arrays (a TargetArrays, or one batch as a tuple of arrays) and run inside a
caller's jit / vmap; `model` and `params` are as in grads.split_params. ProjectedCurvature and
target_direction are the shells over host batches.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax import sharding as shd
from idjax.data import IGNORE_INDEX
from idjax.grads import (
    LOSS_CHUNK_BYTES, GradientConfig, batch_arrays, local_microbatch, map_in_steps, sample_losses, single_sample_loss,
    split_params,
)
from idjax.losses import at_positions
from idjax.models.modeling import head_logits
from idjax.sketch import Projector, global_norm_sq

HESSIANS = ("exact", "gauss-newton")


class TargetArrays(NamedTuple):
    """A target set as arrays: per batch (input_ids, attention_mask, labels, sample_mask, loss_positions or
    None), and the number of real samples (float32), the denominator of L_T. With loss positions (as
    data.Batch carries them) the exact loss and its Hessian run the lm-head there only."""

    arrays: tuple
    total: jax.Array


def as_targets(targets) -> TargetArrays:
    """A TargetArrays as it is; one batch (input_ids, attention_mask, labels[, sample_mask[, loss_positions]])
    as a one-batch TargetArrays (every row real when sample_mask is not given). Traceable."""
    if isinstance(targets, TargetArrays):
        return targets
    ids, mask, labels, *rest = targets
    real = jnp.ones(ids.shape[0], bool) if not rest else jnp.asarray(rest[0], bool)
    positions = rest[1] if len(rest) > 1 else None
    return TargetArrays(((ids, mask, labels, real, positions),), jnp.sum(real).astype(jnp.float32))


def target_arrays(batches) -> TargetArrays:
    """The data.Batch-es of a target set as device arrays, passed to jitted functions as arguments, so a
    new target set of the same shapes reuses their compilation (closed over, they would be constants
    baked into each trace). An empty target set has no loss: ValueError."""
    total = sum(int(np.asarray(b.sample_mask).sum()) for b in batches)
    if total == 0:
        raise ValueError("the target set is empty")
    arrays = tuple((jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), jnp.asarray(b.labels),
                    jnp.asarray(b.sample_mask), None if b.loss_positions is None else jnp.asarray(b.loss_positions))
                   for b in batches)
    return TargetArrays(arrays, jnp.float32(total))


def mean_target_loss(model, targets, *, params=None):
    """L_T = (1/t) sum_j l(theta; z_j): the mean over the t real target samples of their mean
    response-token loss (docs/method.md 1), as a function of the selected `params`."""
    graphdef, selected, rest = split_params(model, params)
    return _mean_target_loss(graphdef, rest, as_targets(targets), selected)


def _mean_target_loss(graphdef, rest, targets: TargetArrays, selected):
    model = nnx.merge(graphdef, selected, rest)
    acc = jnp.float32(0.0)
    for ids, mask, labels, real, positions in targets.arrays:
        acc = acc + jnp.sum(jnp.where(real, sample_losses(model, ids, mask, labels, positions=positions), 0.0))
    return acc / targets.total


def target_gradient(model, targets, *, params=None):
    """g_T = grad L_T with respect to the selected params: a pytree like them."""
    graphdef, selected, rest = split_params(model, params)
    return jax.grad(functools.partial(_mean_target_loss, graphdef, rest, as_targets(targets)))(selected)


def hvp(loss, params, vectors):
    """Exact Hessian-vector products H v of the scalar function `loss` at `params`, forward-over-reverse
    (jvp of grad): one extra forward-mode pass per vector, no d x d matrix.

    `vectors` is a pytree like `params` with a leading axis of n vectors; returns the same shape.
    """
    grad = jax.grad(loss)
    return jax.vmap(lambda v: jax.jvp(grad, (params,), (v,))[1])(vectors)


def gauss_newton_vp(model, targets, vectors, *, params=None, chunk_bytes: int = LOSS_CHUNK_BYTES,
                    gradient_minus=None):
    """Gauss-Newton products G v = sum_j w_j J_j^T H_out J_j v of L_T (always PSD), for a stack of vectors.

    J_j is the Jacobian of the logits of trained token j and H_out = diag(p) - p p^T the softmax
    cross-entropy Hessian there; w_j = 1 / (response tokens of its sample * real samples), the weights
    of L_T. `vectors`: a pytree like the selected params with a leading axis of n; same shape out.

    The model is linearised up to its final hidden states and lm-head matrix; the logits, their tangents
    and H_out u are formed per chunk of positions where [B, L, V] float32 would exceed chunk_bytes (as
    in the chunked loss, grads.hidden_loss_sums), so no full-vocabulary array of the whole batch exists,
    and, where the targets carry loss positions (TargetArrays), at those positions only.

    gradient_minus=eta (a float, may be traced): g_T - eta G v instead, with g_T = sum_j w_j J_j^T (p_j - e_j)
    the gradient of L_T. Both come from the same linearisation and one transpose of it: target_direction's
    g_T - eta H_T b for what G b alone costs (0.77 of the gradient and the product in one program, SmolLM2).
    """
    graphdef, selected, rest = split_params(model, params)
    targets = as_targets(targets)
    whole = nnx.merge(graphdef, selected, rest)
    config = whole.config  # static: the vocabulary and whether the head is tied
    tied = bool(config.tie_word_embeddings)
    # The head matrix is linearised only when it is among the differentiated parameters: as a constant
    # output of jax.linearize (a symbolic-zero tangent), linear_transpose under jit returned garbage.
    owner = "embed_tokens." if tied else "lm_head."
    head_selected = any(shd.param_name(path).startswith(owner)
                        for path, _ in jax.tree_util.tree_flatten_with_path(selected)[0])
    fixed_matrix = None if head_selected else whole.head()[0]

    def gv(v):
        out = jax.tree.map(jnp.zeros_like, selected)
        for ids, mask, labels, real, positions in targets.arrays:
            def features(p):
                m = nnx.merge(graphdef, p, rest)
                hidden = m.hidden_states(ids, mask)[0][:, :-1]
                return (hidden, m.head()[0]) if head_selected else (hidden,)

            primal, lin = jax.linearize(features, selected)
            tangent = lin(v)
            hidden, d_hidden = primal[0], tangent[0]
            matrix, d_matrix = (primal[1], tangent[1]) if head_selected else (fixed_matrix, None)
            nexts = labels[:, 1:]
            tok = nexts != IGNORE_INDEX
            count = tok.sum(-1, keepdims=True)
            b, full, dim = hidden.shape
            if positions is not None:  # the lm-head at the loss positions only (weight 0 at the -1 padding)
                nexts, hidden, d_hidden = at_positions(positions, nexts, hidden, d_hidden)
                picked = nexts != IGNORE_INDEX
                # positions that miss a loss token make the product NaN, never quietly smaller
                tok = jnp.where(picked.sum(-1, keepdims=True) == count, picked, jnp.nan)
            weight = tok / jnp.maximum(count, 1) * real[:, None] / targets.total
            length = hidden.shape[1]

            def piece(h, dh, w, nxt):
                """(cotangent of h, of the head matrix) of sum_j w_j <H_out u_j, logits_j> for one chunk
                (with gradient_minus: of sum_j w_j <(p_j - e_j) - eta H_out u_j, logits_j>)."""
                logits, head_vjp = jax.vjp(lambda x, mat: head_logits(x, mat, tied), h, matrix)
                u = head_logits(dh, matrix, tied)
                if d_matrix is not None:
                    u = u + head_logits(h, d_matrix, tied)
                prob = jax.nn.softmax(logits, axis=-1)
                hu = prob * u - prob * jnp.sum(prob * u, axis=-1, keepdims=True)
                if gradient_minus is not None:  # d(cross-entropy)/d(logits) = p - e_next, weight 0 off the loss
                    onehot = jax.nn.one_hot(jnp.maximum(nxt, 0), logits.shape[-1], dtype=prob.dtype)
                    hu = prob - onehot - gradient_minus * hu
                return head_vjp(hu * w[..., None])

            per_chunk = max(1, chunk_bytes // (4 * b * config.vocab_size))
            if per_chunk >= length:
                cot_hidden, cot_matrix = piece(hidden, d_hidden, weight, nexts)
            else:
                steps = -(-length // per_chunk)
                pad = steps * per_chunk - length
                split = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)).reshape(  # noqa: E731
                    b, steps, per_chunk, *x.shape[2:]).swapaxes(0, 1)

                def body(acc, xs):
                    ch, cm = piece(*xs)
                    return acc + cm.astype(jnp.float32), ch

                acc, chunks = jax.lax.scan(body, jnp.zeros(matrix.shape, jnp.float32),
                                           (split(hidden), split(d_hidden), split(weight), split(nexts)))
                cot_hidden = chunks.swapaxes(0, 1).reshape(b, steps * per_chunk, dim)[:, :length]
                cot_matrix = acc.astype(matrix.dtype)
            if positions is not None:  # back to every position (the padding's cotangent is 0)
                at = jnp.maximum(positions, 0)
                cot_hidden = jnp.zeros((b, full, dim), cot_hidden.dtype).at[jnp.arange(b)[:, None], at].add(cot_hidden)
            cots = (cot_hidden, cot_matrix) if head_selected else (cot_hidden,)
            (back,) = jax.linear_transpose(lin, selected)(cots)
            out = jax.tree.map(jnp.add, out, back)
        return out

    return jax.vmap(gv)(vectors)


def hessian_products(model, targets, vectors, *, params=None, kind: str = "exact"):
    """H_T v for a stack of vectors: kind "exact" (hvp of L_T) or "gauss-newton" (gauss_newton_vp).

    The vectors are cast to the parameters' dtypes first: forward mode wants tangents of the primal's
    dtype, and a bfloat16 model's directions (the update model's b, a * g) arrive in float32."""
    if kind not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {kind!r}")
    graphdef, selected, rest = split_params(model, params)
    vectors = jax.tree.map(lambda v, p: v.astype(p.dtype), vectors, selected)
    if kind == "exact":
        loss = functools.partial(_mean_target_loss, graphdef, rest, as_targets(targets))
        return hvp(loss, selected, vectors)
    return gauss_newton_vp((graphdef, rest), targets, vectors, params=selected)


def landmark_curvature(model, input_ids, attention_mask, labels, *, targets, params=None,
                       projector: Projector | None = None, precondition=None, normalize: bool = False,
                       hessian: str = "exact", shards: int = 1, loss_positions=None):
    """(P u_i, P h_i), float32 [B, k] each: the second-order landmark terms of docs/method.md 4.3.

        u_i = a (.) g_i   (g_i the per-example gradient, a = precondition), / ||u_i|| when normalize
        h_i = H_T u_i     (hessian "exact" or "gauss-newton", of the target loss over `targets`)

    both sketched with the same P, so Q_L[i, j] = <P h_i, P u_j>. One sample at a time (lax.map): memory
    is one double pass over the targets. targets: a TargetArrays or one batch of arrays (as_targets).
    shards: the batch axis is split over that many devices, one sample per device at a time.
    loss_positions: as per_example_gradients takes them (the lm-head of g_i at those positions only).
    """
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    graphdef, selected, rest = split_params(model, params)
    projector = Projector("none", 0) if projector is None else projector
    targets = as_targets(targets)
    loss = single_sample_loss(graphdef, rest)

    def one(args):
        g = jax.grad(loss)(selected, *args)
        u = g if precondition is None else jax.tree.map(lambda a, x: (a * x).astype(jnp.float32), precondition, g)
        if normalize:
            norm = jnp.sqrt(global_norm_sq(u))
            u = jax.tree.map(lambda x: x / jnp.maximum(norm, 1e-30).astype(x.dtype), u)
        h = hessian_products((graphdef, rest), targets, jax.tree.map(lambda x: x[None], u), params=selected,
                             kind=hessian)
        h = jax.tree.map(lambda x: x[0], h)
        return projector.project(u), projector.project(h)

    args = (input_ids, attention_mask, labels, loss_positions)
    if shards > 1:
        local_microbatch(input_ids.shape[0], shards, 1)  # checks the batch splits
        return map_in_steps(lambda *a: one(a), args, per_step=shards, shards=shards)
    return jax.lax.map(one, args)


# ----------------------------------------------------------------------------- shells over host batches


def _curvature(graphdef, projector, config: GradientConfig, hessian: str, shards: int,
               selected, rest, precondition, targets: TargetArrays, ids, mask, labels, positions):
    """The compiled body of ProjectedCurvature: landmark_curvature with the shell's settings."""
    return landmark_curvature((graphdef, rest), ids, mask, labels, targets=targets, params=selected,
                              projector=projector, precondition=precondition, normalize=config.normalize,
                              hessian=hessian, shards=shards, loss_positions=positions)


class ProjectedCurvature:
    """landmark_curvature over host batches: one compilation per length bucket, batches split over a mesh.

    For each source sample, u = a * g (L2-normalised when asked, as the first-order scores are) and
    h = H_T u, both projected with the same sketch, so Q_L[i, j] = <P u_j, P h_i>.
    """

    def __init__(self, model, projector, target_batches, config: GradientConfig = GradientConfig(),
                 precondition=None, hessian: str = "exact", *, mesh=None):
        if config.keep:
            raise ValueError("second-order selection works on whole parameter tensors; drop the coordinate mask "
                             "(keep) or restrict --params instead")
        if hessian not in HESSIANS:
            raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
        self.config, self.projector, self.hessian = config, projector, hessian
        self.targets = target_arrays(target_batches)  # raises on an empty target set
        self.graphdef, self.selected, self.rest = split_params(model, config.params)
        self.precondition = precondition
        self.mesh = shd.get_mesh() if mesh is None else mesh
        self.shards = self.mesh.size if shd.active(self.mesh) else 1
        rows = None
        if self.shards > 1:  # one sample per device at a time
            self.selected, self.rest, self.precondition = (
                shd.shard_params(t, self.mesh) for t in (self.selected, self.rest, self.precondition))
            self.targets = shd.put_replicated(self.targets, self.mesh)
            rows = shd.row_sharding(self.mesh, 2)
        # Shared like the gradients' compilation; the target set is an argument, so another target set
        # of the same batch shapes compiles nothing.
        self._fn = shd.jit_once(
            ("curvature", self.graphdef, projector, config, hessian, self.shards, rows),
            functools.partial(_curvature, self.graphdef, projector, config, hessian, self.shards),
            out_shardings=None if rows is None else (rows, rows))

    def __call__(self, batch):
        """(P u [B, k], P h [B, k]) for one data.Batch; padding rows are garbage (mask them)."""
        u, h = self._fn(self.selected, self.rest, self.precondition, self.targets,
                        *batch_arrays(batch, self.mesh if self.shards > 1 else None))
        rows = len(batch.input_ids)
        return (u, h) if u.shape[0] == rows else (u[:rows], h[:rows])


@functools.partial(jax.jit, static_argnums=0)
def _gradient_jit(graphdef, selected, rest, targets):
    return target_gradient((graphdef, rest), targets, params=selected)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _direction_jit(graphdef, hessian, with_offset, selected, rest, targets, shift, eta):
    """(g_T - eta H_T shift, eta H_T shift or None) in as few passes as the kind allows: exact, one
    forward-over-reverse pass (the jvp of the gradient, whose primal is g_T); Gauss-Newton without the
    offset, one linearisation (gauss_newton_vp(gradient_minus=)); with it, a gradient and a product."""
    shift = jax.tree.map(lambda v, p: v.astype(p.dtype), shift, selected)
    if hessian == "exact":
        loss = functools.partial(_mean_target_loss, graphdef, rest, targets)
        g, hb = jax.jvp(jax.grad(loss), (selected,), (shift,))
    elif not with_offset:
        v = gauss_newton_vp((graphdef, rest), targets, jax.tree.map(lambda x: x[None], shift), params=selected,
                            gradient_minus=eta)
        return jax.tree.map(lambda x: x[0], v), None
    else:
        g = target_gradient((graphdef, rest), targets, params=selected)
        hb = jax.tree.map(lambda x: x[0], gauss_newton_vp((graphdef, rest), targets,
                                                          jax.tree.map(lambda x: x[None], shift), params=selected))
    offset = jax.tree.map(lambda x: eta * x, hb)
    return jax.tree.map(jnp.subtract, g, offset), (offset if with_offset else None)


def target_direction(model, batches, pattern: str | None = None, *, shift=None, eta: float = 1.0,
                     hessian: str = "exact", offset: bool = True):
    """(v, offset): v = g_T - eta * H_T shift over the selected params, offset = eta * H_T shift (or None).

    docs/method.md 3: p = G D_a (g_T - eta H_T b). `shift` is the update model's b restricted to the
    selection (None for GD). `offset` is what per-target-sample columns subtract from their own
    gradient (the mean-target Hessian stands in for each sample's own); offset=False: not needed (the
    mean-gradient scores), None comes back, and with Gauss-Newton v costs one product, no gradient pass
    (with the exact Hessian g_T and H_T b always come from one pass).
    `batches`: data.Batch-es.
    """
    if hessian not in HESSIANS:
        raise ValueError(f"hessian must be one of {HESSIANS}, got {hessian!r}")
    graphdef, selected, rest = split_params(model, pattern)
    # Weights and data go in as arguments (closed over, they would be constants that XLA folds, and
    # every new target set would compile again): one compilation per model structure and batch shapes.
    targets = target_arrays(batches)
    if shift is None:
        return _gradient_jit(graphdef, selected, rest, targets), None
    return _direction_jit(graphdef, hessian, offset, selected, rest, targets, shift, jnp.float32(eta))
