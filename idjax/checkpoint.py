"""Orbax checkpoints of a training run: save, restore, and the fingerprint that makes resuming safe.

A checkpoint step (`<run>/checkpoints/<step>/`) holds the state arrays (trainable parameters or LoRA
adapters, optax state, RNG key data) and JSON metadata: position in the data order, elapsed time,
and the run's fingerprint (model config, optimizer, batch, seed, dtype, LoRA, data hash, total
steps). Resuming with another fingerprint would not continue the same run, so it is refused with
one line naming the fields that differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp

from idjax.data import examples_fingerprint
from idjax.models import CheckpointError
from idjax.optim import check_shapes
from idjax.sharding import commit

log = logging.getLogger(__name__)

#: Fingerprint fields that must match for a checkpoint to be resumed.
TRAJECTORY_FIELDS = ("model", "optimizer", "batch_size", "grad_accum", "seed", "compute_dtype", "lora",
                     "data", "total_steps")


def run_fingerprint(model, examples, config, steps: int) -> dict:
    """What decides a run's trajectory: model config, recipe (a train.TrainConfig), data and length."""
    c = config.to_dict()
    return {"model": json.loads(json.dumps(model.config.to_hf())), "optimizer": c["optimizer"],
            "batch_size": config.batch_size, "grad_accum": config.grad_accum, "seed": config.seed,
            "compute_dtype": config.compute_dtype, "lora": c["lora"], "total_steps": steps,
            "data": {"examples": len(examples), "hash": examples_fingerprint(examples)}}


def manager(directory: Path, keep: int | None = None, *, create: bool):
    """An Orbax CheckpointManager over `directory` keeping the last `keep` steps (None: all), synchronous."""
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory.absolute(), options=opts)


def open_run_checkpoints(out: Path, resume, keep: int):
    """The checkpoint manager of the run directory `out`; refuse to mix two runs' checkpoints there."""
    ckpt = out / "checkpoints"
    same = resume is not None and Path(resume).absolute() in (out.absolute(), ckpt.absolute())
    if ckpt.is_dir() and any(ckpt.iterdir()) and not same:
        raise CheckpointError(f"{ckpt}: holds checkpoints of an earlier run; resume it (--resume {out}) "
                              "or write to a new --out")
    return manager(ckpt, keep, create=True)


def resumable(out: Path) -> Path | None:
    """`out` when out/checkpoints holds a finished step of an interrupted run to resume from, else None.

    Orbax names a finished step by its number; a save cut short leaves only a temporary directory, and a
    checkpoints directory holding nothing finished is removed, so that the run starts over instead of
    failing on it. The one rule of every resumable training stage (the warm-up, `idjax run`'s train)."""
    ckpt = Path(out) / "checkpoints"
    if not ckpt.is_dir():
        return None
    if any(p.name.isdigit() for p in ckpt.iterdir()):
        return Path(out)
    shutil.rmtree(ckpt)
    return None


def _abstract(tree):
    """Shapes, dtypes and (default: first device) shardings: the restore target Orbax needs."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)
                                                       or default), tree)


def save_checkpoint(manager, state, meta: dict) -> None:
    """One Orbax step of a train.TrainState: its arrays plus JSON metadata (position, fingerprint, time)."""
    import orbax.checkpoint as ocp

    step = int(state.step)
    arrays = {"trainable": state.trainable, "opt_state": state.opt_state, "rng": state.rng}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                               meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()
    log.info("checkpoint: step %d", step)


def restore_checkpoint(directory: str | os.PathLike, template, fingerprint: dict | None = None,
                       step: int | None = None):
    """Restore the latest (or given) step of a run's checkpoints into the shapes of `template`.

    template: a train.TrainState of arrays or of ShapeDtypeStructs (`trainer.abstract_state()`);
    returns (a TrainState like it, the step's metadata).

    Raises CheckpointError when there is no checkpoint, or it was made by a different recipe
    (model, optimizer, batch, seed, data: resuming would not continue the same run).
    """
    import orbax.checkpoint as ocp

    root = Path(directory)
    ckpt = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    if not ckpt.is_dir():
        raise CheckpointError(f"{root}: no checkpoints to resume from (expected {root / 'checkpoints'})")
    with manager(ckpt, create=False) as mgr:
        step = mgr.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{ckpt}: holds no finished checkpoint to resume from")
        try:
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise CheckpointError(f"{ckpt}: step {step} has no readable metadata ({type(e).__name__}: {e})") from e
        if fingerprint is not None:
            check_fingerprint(ckpt, meta.get("fingerprint", {}), fingerprint)
        target = {"trainable": _abstract(template.trainable), "opt_state": _abstract(template.opt_state),
                  "rng": _abstract(template.rng)}
        check_shapes(ckpt / str(step) / "state", target, "model and optimizer")
        try:
            got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state
        except Exception as e:
            raise CheckpointError(f"{ckpt}: step {step} does not match this model and optimizer "
                                  f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    state = dataclasses.replace(template, trainable=got["trainable"], opt_state=got["opt_state"],
                                step=jnp.asarray(step, jnp.int32), rng=got["rng"])
    sharded = any(isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding)
                  for x in jax.tree.leaves(template))
    return (state if sharded else commit(state)), meta  # a sharded target is restored in place


def check_fingerprint(where: Path, saved: dict, current: dict) -> None:
    """CheckpointError naming the trajectory fields in which `saved` and `current` differ."""
    diff = [k for k in TRAJECTORY_FIELDS if saved.get(k) != current.get(k)]
    if diff:
        details = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diff)
        raise CheckpointError(f"{where}: the checkpoint was made by a different run ({details[:800]}); "
                              "resume with the same model, data and recipe, or start a new --out")


__all__ = ["TRAJECTORY_FIELDS", "run_fingerprint", "manager", "open_run_checkpoints", "resumable",
           "save_checkpoint", "restore_checkpoint", "check_fingerprint"]
