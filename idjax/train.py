"""Fine-tuning for the NNX models: an Optax loop with accumulation, weights, LoRA and Orbax checkpoints.

Why functional: `nnx.split` turns the model into (graphdef, params); one jitted step per length
bucket updates params and the optax state, so the state that selection reads (optim.update_model)
is exactly the one training produced. Why one step = one jit call: the A microbatches of a step
share a bucket ([A, B, L] arrays) and are summed inside a `lax.scan`, so accumulation costs no
host round trips and the accumulated gradient equals the big-batch gradient of
sum_i w_i l_i / sum_i w_i (l_i: masked mean token loss of sample i, docs/method.md 1).

Output directory of a run (train or warm-up):
    config.json, model*.safetensors, tokenizer files   the final model (idjax.models.load, transformers)
    optimizer.json + opt_state/                        OptimizerSpec and optax state (full fine-tuning)
    train_config.json, metrics.jsonl                   the recipe and one JSON row per step
    checkpoints/<step>/                                Orbax: params (or LoRA), opt_state, rng, position
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from idjax import data as D
from idjax import distributed as dist
from idjax.grads import sample_losses
from idjax.models import CausalLM, CheckpointError
from idjax.models.modeling import abstract_model
from idjax.optim import OptimizerSpec, check_shapes, save_optimizer_state

log = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_TRAJECTORY_FIELDS = ("model", "optimizer", "batch_size", "grad_accum", "seed", "compute_dtype", "lora",
                      "data", "total_steps")


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W + (alpha / rank) * A @ B on the stacked projection kernels.

    B starts at zero, so step 0 is the base model; A is drawn like PEFT's (uniform +-1/sqrt(in)).
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {bad or '()'}: choose from {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The recipe. One optimizer step sees batch_size * grad_accum samples of one length bucket."""

    optimizer: OptimizerSpec
    batch_size: int = 8
    grad_accum: int = 1
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float | None = None
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": bf16 matmuls on float32 master weights
    lora: LoraConfig | None = None
    buckets: tuple[int, ...] | None = None  # None: data.default_buckets(longest example)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    remat: bool = False

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(_DTYPES)}, got {self.compute_dtype!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every must be >= 0 and keep_checkpoints >= 1")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["optimizer"] = self.optimizer.to_dict()
        d["lora"] = None if self.lora is None else {**dataclasses.asdict(self.lora), "targets": list(self.lora.targets)}
        d["buckets"] = None if self.buckets is None else list(self.buckets)
        return d


def example_buckets(examples: Sequence[D.Example], config: TrainConfig | None = None) -> tuple[int, ...]:
    """The length buckets a run uses: the configured ones, or powers of two from 64 that hold the
    longest example (the same shapes across runs and datasets, so compilations are reused)."""
    if config is not None and config.buckets:
        return tuple(sorted(config.buckets))
    longest = max(len(e.input_ids) for e in examples)
    return D.default_buckets(max(64, 1 << (longest - 1).bit_length()))


def steps_per_epoch(examples: Sequence[D.Example], config: TrainConfig) -> int:
    """Optimizer steps in one pass: batches per bucket do not depend on the shuffle."""
    counts: dict[int, int] = {}
    buckets = example_buckets(examples, config)
    for e in examples:
        b = D.bucket_for(len(e.input_ids), buckets)
        counts[b] = counts.get(b, 0) + 1
    return sum(-(-n // config.rows_per_step) for n in counts.values())


def total_steps(examples: Sequence[D.Example], config: TrainConfig) -> int:
    """config.steps, or ceil(epochs * steps_per_epoch) (one epoch when neither is set)."""
    if config.steps is not None:
        return config.steps
    return max(1, math.ceil((config.epochs or 1.0) * steps_per_epoch(examples, config)))


# ----------------------------------------------------------------------------- parameter trees


def param_name(path) -> str:
    """Dotted name of a parameter leaf ("layers.mlp.down_proj.kernel"), as grads.param_filter sees it."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            keys.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(str(k.idx))
    return ".".join(keys)


def _lora_names(params, lora: LoraConfig) -> list[str]:
    names = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        parts = param_name(path).split(".")
        if parts[0] == "layers" and parts[-1] == "kernel" and parts[-2] in lora.targets and leaf.ndim == 3:
            names.append(".".join(parts))
    return names


def lora_init(params, lora: LoraConfig, key) -> dict[str, dict[str, jax.Array]]:
    """{kernel name: {"a": [layers, in, r], "b": [layers, r, out] zeros}} for every targeted kernel."""
    flat = {param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    out = {}
    for i, name in enumerate(_lora_names(params, lora)):
        n, d_in, d_out = flat[name].shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (n, d_in, lora.rank), jnp.float32, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros((n, lora.rank, d_out), jnp.float32)}
    if not out:
        raise ValueError(f"LoRA targets {lora.targets} match no stacked projection kernel")
    return out


def lora_merge(params, adapters, scale: float):
    """Base params with W + scale * A @ B on adapted kernels (float32; the base arrays are not changed)."""
    def merge(path, w):
        ad = adapters.get(param_name(path))
        if ad is None:
            return w
        delta = jnp.einsum("lir,lro->lio", ad["a"], ad["b"], preferred_element_type=jnp.float32)
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, params)


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


def _commit(tree):
    """Place every array on the default device explicitly. Fresh, stepped and Orbax-restored states
    then look alike to jit (restored arrays come back committed), so a resumed run reuses the
    compilation of the first step instead of compiling twice more."""
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything a resumed run needs besides the data: trainable params, optax state, step, RNG."""

    trainable: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array  # raw uint32 key data, so Orbax stores it as a plain array


def _microbatch_loss(graphdef, lora: LoraConfig | None, trainable, base, rest, ids, mask, labels, weights,
                     total_weight):
    """sum_i w_i l_i / W of one microbatch (W: total weight of the whole step), float32."""
    params = trainable if lora is None else lora_merge(base, trainable, lora.scale)
    model = nnx.merge(graphdef, params, rest)
    losses = sample_losses(model, ids, mask, labels).astype(jnp.float32)
    return jnp.sum(weights * losses) / total_weight


def _train_step_fn(graphdef, spec: OptimizerSpec, lora: LoraConfig | None, state: TrainState, base, rest,
                   ids, mask, labels, weights):
    """One optimizer step on [A, B, L] microbatches with per-row weights [A, B] (0 = padding).

    Module-level with hashable static arguments, so every Trainer of the same model and recipe
    shares one compilation per bucket.
    """
    total = jnp.maximum(jnp.sum(weights, dtype=jnp.float32), jnp.finfo(jnp.float32).tiny)
    grad_fn = jax.value_and_grad(partial(_microbatch_loss, graphdef, lora))
    if ids.shape[0] == 1:
        loss, grads = grad_fn(state.trainable, base, rest, ids[0], mask[0], labels[0], weights[0], total)
    else:
        def micro(carry, xs):
            acc_loss, acc_grads = carry
            loss, g = grad_fn(state.trainable, base, rest, *xs, total)
            return (acc_loss + loss, jax.tree.map(jnp.add, acc_grads, g)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.trainable)
        (loss, grads), _ = jax.lax.scan(micro, (jnp.zeros((), jnp.float32), zeros), (ids, mask, labels, weights))
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
    return dist.jit_once(("train step", treedef, tuple(leaves)), _train_step_fn, static_argnums=(0, 1, 2),
                         donate_argnums=(3,), out_shardings=(state_shardings, dist.replicated(mesh)))


class Trainer:
    """Holds the split model; `step` is a pure function of (state, batch), jitted once per bucket.

    Full fine-tuning: trainable = the float32 Param state of the model. LoRA: trainable = the
    adapters; the base Param state (float32 copy) is passed to the step, never updated.

    mesh (default distributed.get_mesh(): every local device): data parallel training. Each batch's
    rows are split over the devices (batch_size must be a multiple of the mesh size) and XLA sums the
    gradients across them; the state is replicated, or FSDP-sharded by distributed.RULES when the
    mesh has fsdp > 1. A mesh over several processes' devices (distributed.mesh_from_spec(...,
    global_devices=True)) trains SPMD across hosts: every process runs the same loop on the same data.

    donate_model (full fine-tuning): train the model's own float32 arrays instead of a copy, one
    model's worth less memory; the first step donates them, so `model` is unusable afterwards.
    """

    def __init__(self, model: CausalLM, config: TrainConfig, *, mesh=None, donate_model: bool = False):
        self.config = config
        self.donate_model = donate_model
        self.mesh = dist.get_mesh() if mesh is None else mesh
        if dist.active(self.mesh) and config.batch_size % self.mesh.size:
            if mesh is not None or dist.multi_process():
                raise ValueError(f"batch size {config.batch_size} does not split over {self.mesh.size} devices: "
                                 f"use a multiple of {self.mesh.size}")
            log.warning("batch size %d does not split over the %d local devices: training on one device (use a "
                        "multiple of %d to train data parallel)", config.batch_size, self.mesh.size, self.mesh.size)
            self.mesh = None
        self.model_config = model.config
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.param_dtypes = jax.tree.map(lambda x: x.dtype, params)
        compute = abstract_model(model.config, dtype=_DTYPES[config.compute_dtype], param_dtype=jnp.float32)
        compute.remat = config.remat or getattr(model, "remat", False)
        self.compute_graphdef = nnx.split(compute, nnx.Param, ...)[0]
        self.optimizer = config.optimizer.build()
        self.schedule = config.optimizer.lr_schedule()
        if config.lora is None:
            self.base = None
            self._params = params  # copied to float32 in init_state
        else:
            self.base = _f32_copy(params)
            self._params = None
        self._step = _train_step
        if dist.active(self.mesh):
            self.rest, self.base = dist.shard_params(self.rest, self.mesh), dist.shard_params(self.base, self.mesh)
            self._step = _sharded_train_step(dist.param_shardings(self.abstract_state(), self.mesh), self.mesh)

    def place(self, state: TrainState) -> TrainState:
        """The state on this trainer's devices: committed to the default device, or on the mesh."""
        return dist.shard_params(state, self.mesh) if dist.active(self.mesh) else _commit(state)

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
        """Fresh state: float32 masters (or new LoRA adapters) and the optimizer's initial state."""
        return self.place(self._init(self._params if self.config.lora is None else self.base))

    def abstract_state(self) -> TrainState:
        """The shapes and dtypes of init_state(), computing nothing (a restore target)."""
        return jax.eval_shape(self._init, self._params if self.config.lora is None else self.base)

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

        weights: per-row loss weights [rows] (None: 1 for every real row); padding rows get 0.
        The input state's arrays are donated: use the returned state.
        """
        a = self.config.grad_accum
        rows, length = batch.input_ids.shape
        if rows % a:
            raise ValueError(f"a batch of {rows} rows does not split into grad_accum={a} microbatches")
        w = np.ones(rows, np.float32) if weights is None else np.asarray(weights, np.float32)
        w = np.where(batch.sample_mask, w, 0.0).astype(np.float32)
        shape = (a, rows // a, length)
        mesh = self.mesh if dist.active(self.mesh) else None
        put = lambda x: x if mesh is None else dist.put_rows(x, mesh, axis=1)  # noqa: E731 (rows of each microbatch)
        return self._step(self.compute_graphdef, self.config.optimizer, self.config.lora, state, self.base,
                           self.rest, put(batch.input_ids.reshape(shape)), put(batch.attention_mask.reshape(shape)),
                           put(batch.labels.reshape(shape)), put(w.reshape(shape[:2])))

    def lr(self, step: int) -> float:
        """The learning rate applied at optimizer step `step` (0-based)."""
        return float(self.schedule(step))


# ----------------------------------------------------------------------------- data order


def epoch_batches(examples: Sequence[D.Example], config: TrainConfig, epoch: int, pad_id: int) -> list[D.Batch]:
    """The batches of one epoch: shuffled within buckets by a seed derived from (seed, epoch)."""
    seed = int(np.random.default_rng([config.seed, epoch]).integers(2**31))
    return D.make_batches(examples, config.rows_per_step, example_buckets(examples, config),
                          pad_id=pad_id, shuffle=True, seed=seed)


def data_fingerprint(examples: Sequence[D.Example]) -> str:
    """A hash of ids and tokens: resuming on different data would silently change the run."""
    h = hashlib.sha256()
    for e in examples:
        h.update(e.id.encode())
        h.update(np.ascontiguousarray(e.input_ids).tobytes())
        h.update(np.ascontiguousarray(e.labels).tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- checkpoints


def _manager(directory: Path, config: TrainConfig | None = None, *, create: bool):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if config else None, create=create,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=opts)


def _abstract(tree):
    """Shapes, dtypes and (default: first device) shardings: the restore target Orbax needs."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                       or default), tree)


def save_checkpoint(manager, state: TrainState, meta: dict) -> None:
    """One Orbax step: the state arrays plus JSON metadata (position, fingerprint, elapsed time)."""
    import orbax.checkpoint as ocp

    step = int(state.step)
    arrays = {"trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    log.info("checkpoint: step %d", step)


def restore_checkpoint(directory: str | os.PathLike, template: TrainState, fingerprint: dict | None = None,
                       step: int | None = None) -> tuple[TrainState, dict]:
    """Restore the latest (or given) step of a run's checkpoints into the shapes of `template`.

    template: a TrainState of arrays or of ShapeDtypeStructs (`trainer.abstract_state()`).

    Raises CheckpointError when there is no checkpoint, or it was made by a different recipe
    (model, optimizer, batch, seed, data: resuming would not continue the same run).
    """
    import orbax.checkpoint as ocp

    root = Path(directory)
    ckpt = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not ckpt.is_dir():
        raise CheckpointError(f"{root}: no checkpoints to resume from (expected {root / 'checkpoints'})")
    with _manager(ckpt, create=False) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{ckpt}: holds no finished checkpoint to resume from")
        try:
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"{ckpt}: step {step} has no readable metadata ({type(e).__name__}: {e})") from e
        if fingerprint is not None:
            _check_fingerprint(ckpt, meta.get("fingerprint", {}), fingerprint)
        target = {"trainable": _abstract(template.trainable), "opt_state": _abstract(template.opt_state),
                  "rng": _abstract(template.rng)}
        check_shapes(ckpt / str(step) / "state", target, "model and optimizer")
        try:
            got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        except Exception as e:
            raise CheckpointError(f"{ckpt}: step {step} does not match this model and optimizer "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    state = _commit(TrainState(got["trainable"], got["opt_state"], jnp.asarray(step, jnp.int32), got["rng"]))
    return state, meta


def _check_fingerprint(where: Path, saved: dict, current: dict) -> None:
    diff = [k for k in _TRAJECTORY_FIELDS if saved.get(k) != current.get(k)]
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise CheckpointError(f"{where}: the checkpoint was made by a different run ({details[:800]}); "
                              "resume with the same model, data and recipe, or start a new --out")


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    model: CausalLM
    state: TrainState
    trainer: Trainer
    history: list[dict]  # the metrics rows of this process (also in metrics.jsonl)
    out_dir: Path | None


def _fingerprint(model: CausalLM, examples, config: TrainConfig, steps: int) -> dict:
    c = config.to_dict()
    return {"model": json.loads(json.dumps(model.config.to_hf())), "optimizer": c["optimizer"],
            "batch_size": config.batch_size, "grad_accum": config.grad_accum, "seed": config.seed,
            "compute_dtype": config.compute_dtype, "lora": c["lora"], "total_steps": steps,
            "data": {"examples": len(examples), "hash": data_fingerprint(examples)}}


class TrainingError(ValueError):
    """Training cannot go on (e.g. the loss is not finite); the last checkpoint is intact."""


def _check_weights(weights, examples) -> np.ndarray | None:
    if weights is None:
        return None
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) <= max(e.index for e in examples):
        raise ValueError(f"weights must be a vector indexed by Example.index, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    return w


def _row_weights(batch: D.Batch, w_all: np.ndarray | None, step: int) -> np.ndarray | None:
    """Per-row loss weights of a batch (0 on padding rows), or None for unweighted training."""
    if w_all is None:
        return None
    w = np.where(batch.indices >= 0, w_all[np.maximum(batch.indices, 0)], 0.0)
    if not w.sum() > 0:
        log.warning("step %d: every sample in the batch has weight 0; the step applies momentum only", step)
    return w


def _open_run_dir(out: Path, resume, config: TrainConfig, steps: int, spe: int):
    """Create the run directory and its checkpoint manager; refuse to mix two runs' checkpoints."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoints"
    same = resume is not None and Path(resume).absolute() in (out.absolute(), ckpt.absolute())
    if ckpt.is_dir() and any(ckpt.iterdir()) and not same:
        raise CheckpointError(f"{ckpt}: holds checkpoints of an earlier run; resume it (--resume {out}) "
                              "or write to a new --out")
    if dist.is_primary():  # several processes (SPMD training) share one run directory
        (out / "train_config.json").write_text(json.dumps({**config.to_dict(), "total_steps": steps,
                                                           "steps_per_epoch": spe}, indent=2))
    return _manager(ckpt, config, create=True)


def train(model: CausalLM, examples: Sequence[D.Example], config: TrainConfig, *, weights=None,
          out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          tokenizer=None, pad_id: int | None = None, progress: bool = True, mesh=None,
          final_checkpoint: bool = True, donate_model: bool = False) -> TrainResult:
    """Fine-tune `model` on `examples`; return the trained model (a new object) and its state.

    weights: per-example loss weights indexed by Example.index (None: unweighted). out_dir: write
    checkpoints every config.checkpoint_every steps and at the end, metrics.jsonl, the final HF
    model and (full fine-tuning) the optimizer state. resume: a run directory (or its checkpoints/)
    to continue from; the result is bit-identical to an uninterrupted run. Ctrl-C saves a
    checkpoint of the last finished step before it stops. final_checkpoint=False: no checkpoint at
    the end (it only serves resuming; writing one copies the whole state, ~3x the model's size).
    donate_model=True (full fine-tuning): train `model`'s own float32 arrays, not a copy (one model's
    worth less memory); `model` is unusable afterwards, use the returned one.
    """
    if not examples:
        raise D.DataError("no training examples (empty data, or every sample lost its response to truncation)")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) or model.config.pad_token_id or 0
    w_all = _check_weights(weights, examples)
    steps, spe = total_steps(examples, config), steps_per_epoch(examples, config)
    spec = config.optimizer
    if spec.schedule != "constant" and spec.total_steps != steps:
        log.warning("optimizer total_steps=%d but the run has %d steps: the %s schedule will not end at 0",
                    spec.total_steps, steps, spec.schedule)
    trainer = Trainer(model, config, mesh=mesh, donate_model=donate_model)
    fingerprint = _fingerprint(model, examples, config, steps)
    elapsed0 = 0.0
    if resume is None:
        state = trainer.init_state()
    else:  # restore into shapes only: the fresh state is never materialised
        state, meta = restore_checkpoint(resume, trainer.abstract_state(), fingerprint)
        if dist.active(trainer.mesh):
            state = trainer.place(state)
        elapsed0 = float(meta.get("seconds", 0.0))
        log.info("resumed %s at step %d of %d", resume, int(state.step), steps)
    out = Path(out_dir) if out_dir is not None else None
    manager = _open_run_dir(out, resume, config, steps, spe) if out is not None else None
    t0 = time.perf_counter()

    def checkpoint(st):
        s = int(st.step)
        save_checkpoint(manager, st, {"step": s, "epoch": s // spe, "position": s % spe, "steps_per_epoch": spe,
                                      "shuffle_seed": config.seed, "seconds": elapsed0 + time.perf_counter() - t0,
                                      "fingerprint": fingerprint})

    history: list[dict] = []
    try:
        state = _loop(trainer, state, examples, w_all, steps, spe, pad_id, history, elapsed0, t0,
                      out / "metrics.jsonl" if out is not None and dist.is_primary() else None,
                      checkpoint if manager else None, progress)
    except BaseException:
        if manager is not None:
            manager.close()
        raise
    final = trainer.model(state)
    if manager is not None:
        if final_checkpoint and manager.latest_step() != int(state.step):
            checkpoint(state)
        manager.close()
        if dist.is_primary():  # Orbax saves above are collective; the exported model is written once
            export(final, out, tokenizer)
        if config.lora is None:
            save_optimizer_state(out, spec, state.opt_state, int(state.step))
    if history:
        log.info("trained %d steps: loss %.4f -> %.4f", len(history), history[0]["loss"], history[-1]["loss"])
    return TrainResult(final, state, trainer, history, out)


def _loop(trainer: Trainer, state: TrainState, examples, w_all, steps: int, spe: int, pad_id: int,
          history: list, elapsed0: float, t0: float, metrics_path: Path | None, checkpoint, progress: bool):
    """Steps from state.step to `steps`: batches of epoch e come from the seed and e alone, so a
    resumed loop sees exactly the batches the uninterrupted one would have. Ctrl-C checkpoints
    the last finished step, then stops."""
    from tqdm.auto import tqdm

    config = trainer.config
    epoch, batches, start = -1, [], int(state.step)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=None if progress else True)
    metrics = open(metrics_path, "a") if metrics_path is not None else None
    try:
        while int(state.step) < steps:
            s = int(state.step)
            if s // spe != epoch:
                epoch = s // spe
                batches = epoch_batches(examples, config, epoch, pad_id)
            batch = batches[s % spe]
            lr, t = trainer.lr(s), time.perf_counter()
            state, m = trainer.step(state, batch, _row_weights(batch, w_all, s))
            loss = float(m["loss"])
            dt = time.perf_counter() - t
            tokens = int(batch.attention_mask.sum())
            row = {"step": s + 1, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                   "tokens": tokens, "tokens_per_s": tokens / dt, "seconds": elapsed0 + time.perf_counter() - t0}
            if not math.isfinite(loss):
                raise TrainingError(f"step {s + 1}: the loss is {loss}; lower --lr or keep --clip-norm on "
                                    "(the last checkpoint is intact)")
            history.append(row)
            if metrics is not None:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}")
            if checkpoint is not None and config.checkpoint_every and (s + 1) % config.checkpoint_every == 0 \
                    and s + 1 < steps:
                checkpoint(state)
    except KeyboardInterrupt:
        if checkpoint is not None and int(state.step) > start:
            log.warning("interrupted: saving a checkpoint at step %d so the run can be resumed", int(state.step))
            try:
                checkpoint(state)
            except Exception as e:  # e.g. Ctrl-C landed inside a step whose inputs were donated
                log.error("could not save the interrupted state (%s); resume from the last checkpoint", e)
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return state


def export(model: CausalLM, out_dir: str | os.PathLike, tokenizer=None) -> Path:
    """The trained model as an HF safetensors directory (idjax.models.load and transformers read it)."""
    from idjax import models

    return models.save(model, out_dir, tokenizer)


# ----------------------------------------------------------------------------- selections


def read_selection(path, records: list[dict], weighted: bool):
    """Keep the records a selection file names, in its order; their weights when `weighted`.

    A selection is JSONL rows {"index", "id", "score", "weight"} (`idjax select`); rows are matched
    to the data by id, and ids missing from the data are an error (the file belongs to other data).
    """
    p = Path(path)
    if not p.is_file():
        raise D.DataError(f"{p}: selection file does not exist")
    by_id = {r["id"]: r for r in records}
    chosen, weights, missing, seen, unweighted = [], [], [], set(), 0
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise D.DataError(f"{p}:{n}: field '<row>': malformed JSON: {e.msg}") from None
        if not isinstance(row, dict) or row.get("id") is None:
            raise D.DataError(f"{p}:{n}: field 'id': missing (selection rows are {{index, id, score, weight}})")
        rid = str(row["id"])
        if rid in seen:
            raise D.DataError(f"{p}:{n}: field 'id': duplicate id {rid!r}")
        seen.add(rid)
        if rid not in by_id:
            missing.append(rid)
            continue
        unweighted += "weight" not in row
        w = row.get("weight", 1.0)
        if weighted and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf")):
            raise D.DataError(f"{p}:{n}: field 'weight': expected a finite number >= 0, got {w!r}")
        chosen.append(by_id[rid])
        weights.append(float(w) if weighted else 1.0)
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise D.DataError(f"{p}: {len(missing)} selected ids are not in the training data: "
                          f"{', '.join(missing[:5])}{more} (was the selection made from another file?)")
    if not chosen:
        raise D.DataError(f"{p}: selects no samples")
    if weighted and unweighted == len(chosen):
        raise D.DataError(f"{p}: no row has a 'weight' field; --weighted needs the weights `idjax select` writes")
    if weighted and unweighted:
        log.warning("%s: %d of %d rows have no 'weight' field; --weighted trains them with weight 1.0", p,
                    unweighted, len(chosen))
    if weighted and not sum(weights) > 0:
        raise D.DataError(f"{p}: every weight is 0; nothing to train on with --weighted")
    return chosen, (weights if weighted else None)


# ----------------------------------------------------------------------------- warm-up


def warmup_subset(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random `fraction` of n samples (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise D.DataError("the pool is empty")
    k = max(1, round(fraction * n))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def warmup_examples(records: Sequence[dict], tokenizer, *, fraction: float = 0.05, seed: int = 0,
                    max_length: int = 1024) -> list[D.Example]:
    """Tokenized seeded random `fraction` of the pool (Example.index points into `records`)."""
    chosen = warmup_subset(len(records), fraction, seed)
    examples, _ = D.tokenize([records[i] for i in chosen], tokenizer, max_length=max_length, source="warm-up subset")
    if not examples:
        raise D.DataError("no warm-up sample has a response token left to train on")
    return [dataclasses.replace(e, index=int(chosen[e.index])) for e in examples]


def warmup(model: CausalLM, examples: Sequence[D.Example], tokenizer, config: TrainConfig, out_dir, *,
           pool_size: int | None = None, fraction: float | None = None, progress: bool = True,
           final_checkpoint: bool = True, donate_model: bool = False) -> TrainResult:
    """docs/method.md 8: train briefly on a random part of the pool (warmup_examples); save model + optimizer state.

    Full fine-tuning only (the update model needs a state per model parameter). out_dir is a
    model directory for `idjax select --model`, and its optimizer.json + opt_state/ are what
    load_optimizer_state reads for `--optimizer-state`. warmup.json lists the ids trained on.
    """
    if config.lora is not None:
        raise ValueError("warm-up trains every parameter (selection reads an optimizer state per parameter); "
                         "drop the LoRA option")
    log.info("warm-up on %d samples%s", len(examples), f" of {pool_size}" if pool_size else "")
    result = train(model, examples, config, out_dir=out_dir, tokenizer=tokenizer, progress=progress,
                   final_checkpoint=final_checkpoint, donate_model=donate_model)
    meta = {"fraction": fraction, "seed": config.seed, "pool_size": pool_size, "samples": len(examples),
            "steps": int(result.state.step), "ids": [e.id for e in examples]}
    (Path(out_dir) / "warmup.json").write_text(json.dumps(meta))
    return result
