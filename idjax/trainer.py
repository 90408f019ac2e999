"""The training shell: one jitted optimizer step on the split model, on one device or a mesh.

Why functional: `nnx.split` turns the model into (graphdef, params); one jitted step per length
bucket updates params and the optax state, so the state that selection reads (optim.update_model)
is exactly the one training produced. Why one step = one jit call: the A microbatches of a step
share a bucket ([A, B, L] arrays) and are summed inside a `lax.scan`, so accumulation costs no
host round trips and the accumulated gradient equals the big-batch gradient of
sum_i w_i l_i / sum_i w_i (l_i: masked mean token loss of sample i, docs/method.md 1).

The loop around it (data order, checkpoints, metrics, export) is idjax.train.
"""

from __future__ import annotations

import dataclasses
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from idjax import configs
from idjax import data as D
from idjax import distributed as dist
from idjax import memory
from idjax import sharding as shd
from idjax.grads import sample_losses
from idjax.lora import LoraConfig, lora_init, lora_merge
from idjax.models import CausalLM
from idjax.models.modeling import abstract_model
from idjax.optim import OptimizerSpec

if TYPE_CHECKING:
    from idjax.train import TrainConfig

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {name: jnp.dtype(name) for name in configs.COMPUTE_DTYPES}


def _f32_copy(tree, copy: bool = True):
    """Float32 master copies (fresh buffers: the jitted step donates them, the caller's model stays valid).
    copy=False: float32 leaves are taken as they are (the step then donates the caller's arrays).

    Shapes stay shapes: an abstract model (ShapeDtypeStruct leaves) gives an abstract copy.
    """
    def cast(x):
        dtype = jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype)
        return jnp.array(x, dtype=dtype, copy=True) if copy else jnp.asarray(x, dtype)

    return jax.tree.map(cast, tree)


# ----------------------------------------------------------------------------- the trainer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs besides the data: trainable params, optax state, step, RNG."""

    trainable: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array  # raw uint32 key data, so Orbax stores it as a plain array


def _microbatch_loss(graphdef, lora: LoraConfig | None, trainable, base, rest, ids, mask, labels, weights,
                     positions, real_rows):
    """sum_i w_i l_i / n of one microbatch (n: the real rows of the whole step), float32; the lm-head at
    the loss positions when given (grads.hidden_loss_sums)."""
    params = trainable if lora is None else lora_merge(base, trainable, lora.scale)
    model = nnx.merge(graphdef, params, rest)
    losses = sample_losses(model, ids, mask, labels, positions=positions).astype(jnp.float32)
    return jnp.sum(weights * losses) / real_rows


def _train_step_fn(graphdef, spec: OptimizerSpec, lora: LoraConfig | None, state: TrainState, base, rest,
                   ids, mask, labels, weights, real_rows, positions=None):
    """One optimizer step on [A, B, L] microbatches with per-row weights [A, B] (0 = padding) and loss
    positions [A, B, R] (data.Batch.loss_positions) or None: the loss is
    the mean of w_i l_i over the step's `real_rows` rows (a float32 scalar), an unbiased minibatch
    estimate of the weighted objective, so a batch of low-weight rows takes a small step.

    Module-level with hashable static arguments, so every Trainer of the same model and recipe
    shares one compilation per bucket.
    """
    total = jnp.maximum(real_rows, 1.0)
    grad_fn = jax.value_and_grad(partial(_microbatch_loss, graphdef, lora))
    if ids.shape[0] == 1:
        loss, grads = grad_fn(state.trainable, base, rest, ids[0], mask[0], labels[0], weights[0],
                              None if positions is None else positions[0], total)
    else:
        def micro(carry, xs):
            acc_loss, acc_grads = carry
            loss, g = grad_fn(state.trainable, base, rest, *xs, total)
            return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, g)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
        (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros),
                                        (ids, mask, labels, weights, positions))
    updates, opt_state = spec.build().update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return TrainState(trainable, opt_state, state.step + 1, state.rng), metrics


_train_step = jax.jit(_train_step_fn, static_argnums=(0, 1, 2), donate_argnums=(3,))


def _sharded_train_step(state_shardings, mesh):
    """_train_step on a mesh, its output state pinned to the input's shardings: left to itself, XLA may
    shard the updated state differently from the state it was given, and the next step recompiles.
    One compilation per (shardings, bucket), shared by every Trainer, like _train_step."""
    leaves, treedef = jax.tree.flatten(state_shardings)
    return shd.jit_once(("train step", treedef, tuple(leaves)), _train_step_fn, static_argnums=(0, 1, 2),
                         donate_argnums=(3,), out_shardings=(state_shardings, shd.replicated(mesh)))


def step_settings(rows_per_device: int, grad_accum: int = 1, remats=(False, True)) -> list:
    """(name, (microbatches, remat)) of a training step on `rows_per_device` rows, fastest first: the
    fewest microbatches (a multiple of grad_accum dividing the rows), without remat before with it."""
    per = rows_per_device // grad_accum
    return [(f"{grad_accum * s} microbatch{'es' if grad_accum * s > 1 else ''}{', remat' if r else ''}",
             (grad_accum * s, r)) for s in range(1, per + 1) if per % s == 0 for r in remats]


class Trainer:
    """Holds the split model; `step` is a pure function of (state, batch), jitted once per bucket.

    Full fine-tuning: trainable = the float32 Param state of the model. LoRA: trainable = the
    adapters; the base Param state (float32 copy) is passed to the step, never updated.

    mesh (default sharding.get_mesh(): every local device): data parallel training. Each batch's
    rows are split over the devices (batch_size must be a multiple of the mesh size) and XLA sums the
    gradients across them; the state is replicated, or FSDP-sharded by sharding.RULES when the
    mesh has fsdp > 1. A mesh over several processes' devices (sharding.mesh_from_spec(...,
    global_devices=True)) trains SPMD across hosts: every process runs the same loop on the same data.

    donate_model (full fine-tuning): train the model's own float32 arrays instead of a copy, one
    model's worth less memory; the first step donates them, so `model` is unusable afterwards.
    """

    def __init__(self, model: CausalLM, config: TrainConfig, *, mesh=None, donate_model: bool = False):
        self.config = config
        self.donate_model = donate_model
        self.mesh = shd.get_mesh() if mesh is None else mesh
        if shd.active(self.mesh) and config.batch_size % self.mesh.size:
            if mesh is not None or dist.multi_process():
                raise ValueError(f"batch size {config.batch_size} does not split over {self.mesh.size} devices: "
                                 f"use a multiple of {self.mesh.size}")
            log.warning("batch size %d does not split over the %d local devices: training on one device (use a "
                        "multiple of %d to train data parallel)", config.batch_size, self.mesh.size, self.mesh.size)
            self.mesh = None
        self.model_config = model.config
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.param_dtypes = jax.tree.map(lambda x: x.dtype, params)
        compute = abstract_model(model.config, dtype=COMPUTE_DTYPES[config.compute_dtype], param_dtype=jnp.float32)
        # The step's program per remat setting; remat is always on when asked for, else where the plan needs it.
        self.remat_choices = (True,) if config.remat or getattr(model, "remat", False) else (False, True)
        self.compute_graphdefs = {}
        for remat in self.remat_choices:
            compute.remat = remat
            self.compute_graphdefs[remat] = nnx.split(compute, nnx.Param, ...)[0]
        self.device_memory = memory.device_memory(config.device_memory, agree=shd.spans_processes(self.mesh))
        self.plans = {}  # (rows, length[, lm-head positions]) -> (microbatches, compiled step)
        self.optimizer = config.optimizer.build()
        self.schedule = config.optimizer.lr_schedule()
        if config.lora is None:
            self.base = None
            self._params = params  # copied to float32 in init_state
        else:
            self.base = _f32_copy(params)
            self._params = None
        self._step = _train_step
        self.shardings = None  # of the state, on a mesh
        if shd.active(self.mesh):
            self.rest, self.base = shd.shard_params(self.rest, self.mesh), shd.shard_params(self.base, self.mesh)
            self.shardings = shd.param_shardings(self._shapes(), self.mesh)
            self._step = _sharded_train_step(self.shardings, self.mesh)

    def place(self, state: TrainState) -> TrainState:
        """The state on this trainer's devices: committed to the default device, or on the mesh."""
        return shd.shard_params(state, self.mesh) if shd.active(self.mesh) else shd.commit(state)

    # -- state

    def _init(self, params) -> TrainState:
        key = jax.random.key(self.config.seed)
        if self.config.lora is None:
            trainable = _f32_copy(params, copy=not self.donate_model)
        else:
            key, sub = jax.random.split(key)
            trainable = lora_init(params, self.config.lora, sub)
        return TrainState(trainable, self.optimizer.init(trainable), jnp.zeros((), jnp.int32),
                          jax.random.key_data(key))

    def init_state(self) -> TrainState:
        """Fresh state: float32 masters (or new LoRA adapters) and the optimizer's initial state.

        On a mesh the state is born sharded: one jitted init with the state's out_shardings, so each
        device computes only its block of the masters and moments (none is ever whole on one device)."""
        params = self._params if self.config.lora is None else self.base
        if self.shardings is None:
            return self.place(self._init(params))
        params = shd.shard_params(params, self.mesh)
        donate = (0,) if self.donate_model and self.config.lora is None else ()
        return jax.jit(self._init, out_shardings=self.shardings, donate_argnums=donate)(params)

    def _shapes(self) -> TrainState:
        return jax.eval_shape(self._init, self._params if self.config.lora is None else self.base)

    def abstract_state(self) -> TrainState:
        """The shapes and dtypes of init_state() (with its shardings on a mesh), computing nothing: the
        target a checkpoint is restored into, sharded from the start."""
        shapes = self._shapes()
        if self.shardings is None:
            return shapes
        return shd.abstract_arrays(shapes, self.shardings)

    def params(self, state: TrainState):
        """Full float32 parameters of `state` (LoRA merged into the base)."""
        if self.config.lora is None:
            return state.trainable
        return lora_merge(self.base, state.trainable, self.config.lora.scale)

    def model(self, state: TrainState) -> CausalLM:
        """A new CausalLM with the trained weights in the original storage dtype (LoRA merged)."""
        params = jax.tree.map(lambda x, dt: jnp.asarray(x, dt), self.params(state), self.param_dtypes)
        return nnx.merge(self.graphdef, params, self.rest)

    # -- the step

    def step(self, state: TrainState, batch: D.Batch, weights=None) -> tuple[TrainState, dict]:
        """Apply one optimizer step to a Batch of batch_size * grad_accum rows.

        weights: per-row loss weights [rows] (None: 1 for every real row); padding rows get 0. The loss
        is the mean of w_i l_i over the real rows: weights are not normalised per step (train()
        rescales them to mean 1 over the training set). The input state's arrays are donated: use
        the returned state.

        The rows run in grad_accum microbatches, or in more where the compiled step would not fit the
        device (memory.device_memory, TrainConfig.device_memory): the step is the same sum either way.
        """
        a = self.config.grad_accum
        rows, length = batch.input_ids.shape
        if rows % a:
            raise ValueError(f"a batch of {rows} rows does not split into grad_accum={a} microbatches")
        w = np.ones(rows, np.float32) if weights is None else np.asarray(weights, np.float32)
        w = np.where(batch.sample_mask, w, 0.0).astype(np.float32)
        arrays = (batch.input_ids, batch.attention_mask, batch.labels, w, batch.loss_positions)
        key = (rows, length) if batch.loss_positions is None else (rows, length, batch.loss_positions.shape[1])
        if key not in self.plans:
            self.plans[key] = self._plan(state, arrays, a)
        micro, compiled = self.plans[key]
        real_rows = self._real_rows(np.count_nonzero(batch.sample_mask))
        return compiled(state, self.base, self.rest, *self._inputs(arrays, micro, real_rows))

    def _real_rows(self, n: int):
        """The step's count of real rows, a float32 scalar (replicated on the mesh)."""
        return shd.put_replicated(np.float32(n), self.mesh if shd.active(self.mesh) else None)

    def _inputs(self, arrays, micro: int, real_rows):
        """The step's data arguments: (ids, mask, labels, weights) as `micro` microbatches [micro, rows /
        micro, ...] on the devices, real_rows, then the loss positions likewise (or None)."""
        mesh = self.mesh if shd.active(self.mesh) else None
        out = []
        for x in arrays:
            if x is not None:
                x = x.reshape(micro, x.shape[0] // micro, *x.shape[1:])
                x = x if mesh is None else shd.put_rows(x, mesh, axis=1)  # the rows of each microbatch
            out.append(x)
        return (*out[:4], real_rows, out[4])

    def _plan(self, state: TrainState, arrays, grad_accum: int):
        """(microbatches, compiled step) for batches shaped like `arrays`: the fewest microbatches (a
        multiple of grad_accum), without remat before with it, on a mesh each in the partitioner's
        activation layout before the rows split (sharding.layout_settings), whose program fits the device memory."""
        rows = arrays[0].shape[0]
        sharded = shd.active(self.mesh)
        settings = shd.layout_settings(step_settings(rows // (self.mesh.size if sharded else 1), grad_accum,
                                                     self.remat_choices), sharded)

        def compile_one(setting):
            micro, remat, split = setting
            args = (self.compute_graphdefs[remat], self.config.optimizer, self.config.lora, state, self.base,
                    self.rest, *self._inputs(arrays, micro, self._real_rows(1)))
            return shd.lower_in_layout(self._step, args, self.mesh, split)

        key = ("train step", self._step, tuple(self.compute_graphdefs.items()), self.config.optimizer,
               self.config.lora, memory.input_key((state, self.base, self.rest, arrays)), grad_accum)
        (micro, _, _), compiled = memory.planned(key, settings, compile_one, self.device_memory,
                                                 what=f"training step on {rows} rows of {arrays[0].shape[1]} tokens")
        return micro, compiled

    def lr(self, step: int) -> float:
        """The learning rate applied at optimizer step `step` (0-based)."""
        return float(self.schedule(step))


__all__ = ["COMPUTE_DTYPES", "TrainState", "Trainer", "step_settings"]


def compile_step(model_config, spec: OptimizerSpec, mesh, *, rows: int, grad_accum: int = 1, length: int,
                 remat: bool = False, compute_dtype: str = "float32", split_rows: bool = False):
    """The training step of full fine-tuning compiled for abstract inputs on `mesh` (idjax plan): float32
    masters and the optimizer state sharded by the FSDP rules, `rows` rows per step in `grad_accum`
    microbatches of `length` tokens, the activations split by rows when `split_rows` (sharding.layout_settings).
    Nothing is allocated; the result's memory_analysis() is the plan."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    compute = abstract_model(model_config, dtype=COMPUTE_DTYPES[compute_dtype], param_dtype=jnp.float32)
    compute.remat = remat
    graphdef, params, rest = nnx.split(compute, nnx.Param, ...)
    state = jax.eval_shape(lambda p: TrainState(p, spec.build().init(p), jnp.zeros((), jnp.int32),
                                                jax.random.key_data(jax.random.key(0))), params)
    shardings = shd.param_shardings(state, mesh)
    state = shd.abstract_arrays(state, shardings)
    rest = shd.abstract_arrays(rest, shd.param_shardings(rest, mesh))
    per = rows // grad_accum
    batch = NamedSharding(mesh, P(None, shd.ROWS))
    ids = jax.ShapeDtypeStruct((grad_accum, per, length), jnp.int32, sharding=batch)
    weights = jax.ShapeDtypeStruct((grad_accum, per), jnp.float32, sharding=batch)
    step = _sharded_train_step(shardings, mesh)
    real_rows = jax.ShapeDtypeStruct((), jnp.float32)
    return shd.lower_in_layout(step, (graphdef, spec, None, state, None, rest, ids, ids, ids, weights, real_rows),
                               mesh, split_rows)
