"""Fine-tuning for the NNX models: an Optax loop with accumulation, weights, LoRA and Orbax checkpoints.

The recipe (TrainConfig), the data order, the loop (metrics, checkpoints, Ctrl-C, export) and the
warm-up. The jitted step is idjax.trainer, LoRA adapters idjax.lora, checkpoints idjax.checkpoint.

Output directory of a run (train or warm-up):
    config.json, model*.safetensors, tokenizer files   the final model (idjax.models.load, transformers)
    optimizer.json + opt_state/                        OptimizerSpec and optax state (full fine-tuning)
    train_config.json, metrics.jsonl                   the recipe and one JSON row per step
    checkpoints/<step>/                                Orbax: params (or LoRA), opt_state, rng, position
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from idjax import data as D
from idjax import distributed as dist
from idjax import sharding as shd
from idjax.checkpoint import open_run_checkpoints, restore_checkpoint, run_fingerprint, save_checkpoint
from idjax.io import write_text
from idjax.lora import LoraConfig
from idjax.models import CausalLM
from idjax.optim import OptimizerSpec, save_optimizer_state
from idjax.trainer import COMPUTE_DTYPES, Trainer, TrainState

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------- configuration


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
    buckets: tuple[int, ...] | None = None  # None: data.example_buckets(examples)
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 3
    remat: bool = False  # always; without it the memory plan turns it on where a step would not fit
    device_memory: int | None = None  # bytes per device the step is planned against (None: the device's own)

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {self.batch_size}, {self.grad_accum}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
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
    """The length buckets a run uses: the configured ones, or data.example_buckets."""
    if config is not None and config.buckets:
        return tuple(sorted(config.buckets))
    return D.example_buckets(examples)


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


# ----------------------------------------------------------------------------- data order


def epoch_batches(examples: Sequence[D.Example], config: TrainConfig, epoch: int, pad_id: int) -> list[D.Batch]:
    """The batches of one epoch: shuffled within buckets by a seed derived from (seed, epoch). They carry
    each row's loss positions, one count per bucket for the whole set (data.bucket_heads), so the lm-head
    runs where the loss needs it and each bucket still compiles one step."""
    seed = int(np.random.default_rng([config.seed, epoch]).integers(2**31))
    buckets = example_buckets(examples, config)
    return D.make_batches(examples, config.rows_per_step, buckets, pad_id=pad_id, shuffle=True, seed=seed,
                          heads=D.bucket_heads(examples, buckets))


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class TrainResult:
    model: CausalLM
    state: TrainState
    trainer: Trainer
    history: list[dict]  # the metrics rows of this process (also in metrics.jsonl)
    out_dir: Path | None


class TrainingError(ValueError):
    """Training cannot go on (e.g. the loss is not finite); the last checkpoint is intact."""


def _check_weights(weights, examples) -> np.ndarray | None:
    """The weights rescaled to mean 1 over the training examples: each step's loss, the mean of w_i l_i
    over its rows, is then an unbiased estimate of the weighted objective at the unweighted step size."""
    if weights is None:
        return None
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) <= max(e.index for e in examples):
        raise ValueError(f"weights must be a vector indexed by Example.index, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("weights must be finite and >= 0")
    mean = w[[e.index for e in examples]].mean()
    if not mean > 0:
        raise ValueError("every training example has weight 0")
    return w / mean


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
    manager = open_run_checkpoints(out, resume, config.keep_checkpoints)
    if dist.is_primary():  # several processes (SPMD training) share one run directory
        write_text(out / "train_config.json", json.dumps({**config.to_dict(), "total_steps": steps,
                                                          "steps_per_epoch": spe}, indent=2))
    return manager


def train(model: CausalLM, examples: Sequence[D.Example], config: TrainConfig, *, weights=None,
          out_dir: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          tokenizer=None, pad_id: int | None = None, progress: bool = True, mesh=None,
          final_checkpoint: bool = True, donate_model: bool = False) -> TrainResult:
    """Fine-tune `model` on `examples`; return the trained model (a new object) and its state.

    weights: per-example loss weights indexed by Example.index (None: unweighted), rescaled to mean 1 over
    `examples`; each step's loss is the mean of w_i l_i over its rows (the weighted objective's
    minibatch estimate, not renormalised per step). out_dir: write
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
    fingerprint = run_fingerprint(model, examples, config, steps)
    elapsed0 = 0.0
    if resume is None:
        state = trainer.init_state()
    else:  # restore into shapes only: the fresh state is never materialised
        state, meta = restore_checkpoint(resume, trainer.abstract_state(), fingerprint)
        if shd.active(trainer.mesh):
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
        export(final, out, tokenizer)  # collective like the Orbax saves: gathered from every process, written once
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
                log.info("epoch %d: %.1f%% of the computed tokens are real (%d batches, power-of-two buckets)",
                         epoch, 100 * sum(int(b.attention_mask.sum()) for b in batches)
                         / sum(b.input_ids.size for b in batches), len(batches))
            batch = batches[s % spe]
            lr, t = trainer.lr(s), time.perf_counter()
            state, m = trainer.step(state, batch, _row_weights(batch, w_all, s))
            loss = float(m["loss"])
            dt = time.perf_counter() - t
            tokens = int(batch.attention_mask.sum())
            row = {"step": s + 1, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                   "tokens": tokens, "computed_tokens": int(batch.input_ids.size), "tokens_per_s": tokens / dt,
                   "seconds": elapsed0 + time.perf_counter() - t0}
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
           pool_size: int | None = None, fraction: float | None = None, progress: bool = True, resume=None,
           final_checkpoint: bool = True, donate_model: bool = False) -> TrainResult:
    """docs/method.md 8: train briefly on a random part of the pool (warmup_examples); save model + optimizer state.

    Full fine-tuning only (the update model needs a state per model parameter). out_dir is a
    model directory for `idjax select --model`, and its optimizer.json + opt_state/ are what
    load_optimizer_state reads for `--optimizer-state`. warmup.json lists the ids trained on. resume:
    out_dir (or its checkpoints/) to continue an interrupted warm-up from, as in train().
    """
    if config.lora is not None:
        raise ValueError("warm-up trains every parameter (selection reads an optimizer state per parameter); "
                         "drop the LoRA option")
    log.info("warm-up on %d samples%s", len(examples), f" of {pool_size}" if pool_size else "")
    result = train(model, examples, config, out_dir=out_dir, resume=resume, tokenizer=tokenizer, progress=progress,
                   final_checkpoint=final_checkpoint, donate_model=donate_model)
    meta = {"fraction": fraction, "seed": config.seed, "pool_size": pool_size, "samples": len(examples),
            "steps": int(result.state.step), "ids": [e.id for e in examples]}
    write_text(Path(out_dir) / "warmup.json", json.dumps(meta))
    return result
