"""The stages every front end runs (docs/design.md, layer 3): read and tokenize the sets, read an
update model from a warm-up directory, build a fine-tuning recipe, select and write the selection.

`idjax select / embed / train / warmup / eval`, `idjax run` and `idjax demo` call these, so each
step is written once: the same data checks and messages, the same update model, the same recipe
from the same flags or YAML keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from idjax import data as D
from idjax.configs import Recipe, TrainRecipe, WarmupRecipe  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- data


def tokenized(records: Sequence[dict], tokenizer, *, max_length: int, source: str, what: str = "sample",
              cache_dir: str | os.PathLike | None = None) -> tuple[list[D.Example], D.TokenizeStats]:
    """data.tokenize, refusing a set left with no sample to use (a DataError naming `source`).

    cache_dir: tokenize through cached_tokenize there (a selection's store: a 10^5-row pool is
    minutes of tokenizing, paid once; several processes tokenize a share each)."""
    if cache_dir is None:
        examples, stats = D.tokenize(records, tokenizer, max_length=max_length, source=source)
    else:
        examples, stats = cached_tokenize(records, tokenizer, max_length=max_length, source=source,
                                          directory=Path(cache_dir))
    if not examples:
        raise D.DataError(f"{source}: no {what} has a response token ({len(stats.skipped_no_response)} "
                          f"skipped at max_length={max_length})")
    return examples, stats


def cached_tokenize(records: Sequence[dict], tokenizer, *, max_length: int, source: str,
                    directory: Path) -> tuple[list[D.Example], D.TokenizeStats]:
    """data.tokenize(records, ...), kept in `directory` as tokenized-<fingerprint>.npz (example_file's
    format) + .json (the statistics), keyed by the records, the tokenizer and max_length, and read
    back by later calls. With several processes each tokenizes its contiguous share of the records
    (a -part-<i>-of-<n> pair), waits for the others, and reads their shares: the same examples, in the
    same order, as one process tokenizing everything."""
    import json

    from idjax import distributed as dist
    from idjax.example_file import load_examples, save_examples
    from idjax.io import fingerprint, write_text

    key = fingerprint({"records": D.records_fingerprint(records), "tokenizer": D.tokenizer_fingerprint(tokenizer),
                       "max_length": max_length, "format": 1})
    stem = f"tokenized-{key[:12]}"

    def file(base: str, ext: str) -> Path:
        return directory / (base + ext)

    def save(base: str, examples, stats) -> None:  # the .npz last: it marks the pair complete
        write_text(file(base, ".json"), json.dumps({"key": key, "stats": dataclasses.asdict(stats)}))
        save_examples(file(base, ".npz"), examples)

    def load(base: str):
        meta = json.loads(file(base, ".json").read_text())
        if meta.get("key") != key:
            raise D.DataError(f"{file(base, '.json')}: belongs to another tokenization; delete it")
        return load_examples(file(base, ".npz")), D.TokenizeStats(**meta["stats"])

    if file(stem, ".npz").exists():
        examples, stats = load(stem)
        log.info("%s: %d tokenized samples read from %s", source, len(examples), file(stem, ".npz"))
    else:
        directory.mkdir(parents=True, exist_ok=True)
        n, count, me = len(records), dist.process_count(), dist.process_index()
        if count == 1:
            examples, stats = D.tokenize(records, tokenizer, max_length=max_length, source=source, report=False)
            save(stem, examples, stats)
        else:
            lo, hi = me * n // count, (me + 1) * n // count
            parts = [f"{stem}-part-{i}-of-{count}" for i in range(count)]
            dist.set_note(f"the tokenized shares are kept in {directory}; re-run the same command to resume")
            if file(parts[me], ".npz").exists():  # from a run that stopped before every share was done
                log.info("%s: process %d reads its tokenized rows %d-%d from %s", source, me, lo, hi, directory)
            else:
                log.info("%s: process %d tokenizes rows %d-%d of %d", source, me, lo, hi, n)
                save(parts[me], *D.tokenize(records[lo:hi], tokenizer, max_length=max_length, source=source,
                                            start=lo, report=False))
            dist.barrier(f"tokenized {source}")
            shares = [load(part) for part in parts]
            examples = [e for share, _ in shares for e in share]
            stats = D.merge_stats([st for _, st in shares])
            if dist.is_primary():
                save(stem, examples, stats)
            dist.barrier(f"merged the tokenized {source}")
            for ext in (".npz", ".json"):
                file(parts[me], ext).unlink(missing_ok=True)
    D.report_stats(stats, source, max_length)
    return examples, stats


def target_records(target=None, target_task: str | None = None, *, limit: int | None = None):
    """(records, source name, Task or None) of a target set: a chat file, or a task recipe's target
    split (`target`, if given, is then that split's file in the task's own format)."""
    if target_task:
        from idjax import tasks

        task = tasks.load_task(target_task, target)
        return task.target[:limit], f"{target_task} target set", task
    if target is None:
        raise ValueError("give a target set: a chat JSONL file, or a target task")
    return D.read_records(target, limit=limit), str(target), None


@dataclasses.dataclass
class Sets:
    """Tokenized pool, target and evaluation sets (None where not asked for), their tokenize()
    statistics and source names; `pool_records` are the pool's rows as read (before tokenizing)."""

    pool: list[D.Example]
    pool_records: list[dict]
    targets: list[D.Example] | None = None
    evals: list[D.Example] | None = None
    stats: dict[str, D.TokenizeStats] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> dict:
        """Per set: source, records, kept, truncated, skipped (the run's data stage result)."""
        return {name: {"source": self.sources[name], "records": s.n_records, "kept": s.n_kept,
                       "truncated": s.n_truncated, "skipped_no_response": len(s.skipped_no_response)}
                for name, s in self.stats.items()}


def load_sets(tokenizer, *, pool: str | os.PathLike, target=None, target_task: str | None = None,
              eval=None, with_eval: bool = False, max_length: int = 1024, pool_limit: int | None = None,
              target_limit: int | None = None, eval_limit: int | None = None,
              names: dict[str, str] | None = None, cache_dir: str | os.PathLike | None = None) -> Sets:
    """Read and tokenize the pool, the target set (when `target` or `target_task` is given) and, with
    `with_eval`, the evaluation set: `eval`, else the task's evaluation split, else the target set
    itself (with a warning: selection saw those samples). Every set must keep at least one sample.

    names: display names of the sets in messages (e.g. {"pool": "demo pool"}); file paths otherwise.
    cache_dir: where the tokenized pool is kept and read back (cached_tokenize).
    """
    names = names or {}
    pool_records = D.read_records(pool, limit=pool_limit)
    pool_source = names.get("pool", str(pool))
    examples, stats = tokenized(pool_records, tokenizer, max_length=max_length, source=pool_source,
                                cache_dir=cache_dir)
    sets = Sets(examples, pool_records, stats={"pool": stats}, sources={"pool": pool_source})
    task = None
    if target is not None or target_task:
        records, source, task = target_records(target, target_task, limit=target_limit)
        source = names.get("targets", source)
        sets.targets, sets.stats["targets"] = tokenized(records, tokenizer, max_length=max_length, source=source,
                                                        what="target sample")
        sets.sources["targets"] = source
    if with_eval:
        if eval is not None:
            records, source = D.read_records(eval, limit=eval_limit), str(eval)
        elif task is not None:
            records, source = task.eval_records[:eval_limit], f"{target_task} evaluation set"
        elif sets.targets is not None:
            log.warning("no evaluation set: the target loss is measured on the target set, which selection "
                        "also saw")
            records, source = target_records(target, limit=eval_limit)[0], f"{target} (no eval set given)"
        else:
            raise ValueError("give an evaluation set, a target set or a target task")
        source = names.get("eval", source)
        sets.evals, sets.stats["eval"] = tokenized(records, tokenizer, max_length=max_length, source=source,
                                                   what="sample to evaluate")
        sets.sources["eval"] = source
    return sets


# ----------------------------------------------------------------------------- update model


def read_update_model(directory: str | os.PathLike, model, *, params: str | None = None, mesh=None):
    """The update model (a, b, eta; docs/method.md 2) of the optimizer state a warm-up saved in
    `directory`, for the parameters selection differentiates (`params`, a regex) only: the moments of
    the others are never read, and a, b of the whole model never exist. mesh: with fsdp > 1 the state is
    restored sharded (optim.load_optimizer_state)."""
    import jax
    from flax import nnx

    from idjax.grads import restrict, split_params
    from idjax.optim import load_optimizer_state, update_model

    selected = split_params(model, params)[1]
    spec, state = load_optimizer_state(Path(directory), model, keep=selected, mesh=mesh)
    # each model-shaped tree of the state (Adam's mu and nu, a momentum trace) cut to the selected params
    state = jax.tree.map(lambda t: restrict(t, selected) if isinstance(t, nnx.State) else t, state,
                         is_leaf=lambda x: isinstance(x, nnx.State))
    return update_model(spec, state, selected)


# ----------------------------------------------------------------------------- selection


def select(model, pool: Sequence[D.Example], targets: Sequence[D.Example], config, *, store_dir,
           method: str = "influence", optimizer_state=None, out=None, meta: dict | None = None,
           timings: dict | None = None):
    """Select `config.k` samples (or `config.budget_tokens` response tokens) of `pool` for `targets` and
    write the selection file `out` (with `meta` in its sidecar): Influence Distillation (config: a
    SelectConfig) with the update model of the optimizer state in `optimizer_state` (a warm-up or train
    directory; None: plain GD), or a baseline `method` (docs/method.md 9) on the same pool, budget,
    store and file. timings: stages timed before this call (e.g. {"load": s}), put first in the sidecar's
    timings. Returns the Selection, or None on the processes of a multi-process run other than process 0
    (which writes the file)."""
    from idjax import distributed, pipeline
    from idjax import sharding as shd
    from idjax.selection_file import write_selection

    if method != "influence":
        from idjax import baselines

        selection = baselines.select_baseline(method, model, pool, targets, config.k, seed=config.seed,
                                              batch_size=config.batch_size, store_dir=store_dir,
                                              chunk_rows=config.chunk_rows, budget_tokens=config.budget_tokens)
        if not distributed.is_primary():
            return None
    else:
        update = None if optimizer_state is None else read_update_model(
            optimizer_state, model, params=config.params, mesh=shd.get_mesh())
        selection = pipeline.select_samples(model, pool, targets, config, update=update, store_dir=store_dir)
        del update  # a and b can be as large as the model: free them before the caller goes on
        if selection is None:
            return None
    selection.info["timings_s"] = {**(timings or {}), **selection.info["timings_s"]}
    if out is not None:
        write_selection(selection, pool, out, meta)
    return selection


# ----------------------------------------------------------------------------- training recipes


def finetune_config(examples: Sequence[D.Example], recipe: Recipe, *, seed: int = 0, batch_size: int = 8,
                    lora=None):
    """The TrainConfig of `recipe` over `examples`: their number decides the schedule's total steps, and
    the learning-rate warm-up is `lr_warmup_steps`, else `lr_warmup_ratio` of them, cut (with a
    warning) to leave at least one step after it. batch_size: used when the recipe gives none."""
    from idjax import train
    from idjax.options import parse_bytes
    from idjax.optim import OptimizerSpec

    r = recipe
    base = train.TrainConfig(optimizer=OptimizerSpec(r.optimizer, r.lr), batch_size=r.batch_size or batch_size,
                             grad_accum=r.grad_accum, steps=r.steps, epochs=r.epochs, seed=seed,
                             compute_dtype=r.compute_dtype, lora=lora, checkpoint_every=r.checkpoint_every,
                             keep_checkpoints=r.keep_checkpoints, remat=r.remat,
                             device_memory=None if r.device_memory is None else parse_bytes(r.device_memory))
    total = train.total_steps(examples, base)
    warm = r.lr_warmup_steps if r.lr_warmup_steps is not None else round(r.lr_warmup_ratio * total)
    if warm > total - 1:
        log.warning("a learning-rate warm-up of %d steps in a run of %d steps: it is cut to %d", warm, total,
                    max(0, total - 1))
        warm = max(0, total - 1)
    spec = OptimizerSpec(name=r.optimizer, learning_rate=r.lr, schedule=r.schedule, warmup_steps=warm,
                         total_steps=total if r.schedule != "constant" else 0, weight_decay=r.weight_decay,
                         momentum=r.momentum if r.optimizer == "sgd" else 0.0, clip_norm=r.clip_norm or None)
    return dataclasses.replace(base, optimizer=spec)


def warm_up(model, examples: Sequence[D.Example], tokenizer, recipe: WarmupRecipe, out_dir, *, pool_size: int,
            seed: int = 0, batch_size: int = 8, **train_options):
    """Train the warm-up (docs/method.md 8) on `examples` (the warm-up subset) and export its model and
    optimizer state to out_dir, which selection reads (read_update_model).

    Its Orbax checkpoints (every recipe.checkpoint_every steps, and on Ctrl-C) hold the parameters and
    both Adam moments again and only serve an unfinished warm-up: a re-run into the same out_dir resumes
    from the latest (refused, with the differing fields named, when the recipe or data changed), and they
    are deleted once it ends. No checkpoint of the finished run is written. train_options: passed to
    train.warmup (donate_model)."""
    import shutil

    from idjax import train
    from idjax.checkpoint import CheckpointError, resumable

    if not examples:
        raise ValueError("no warm-up sample has a response token: raise the warm-up fraction or max_length")
    config = finetune_config(examples, recipe, seed=seed, batch_size=batch_size)
    ckpt = Path(out_dir) / "checkpoints"
    resume = resumable(out_dir)
    if resume is not None:
        log.info("warm-up: resuming from the checkpoints in %s", ckpt)
    try:
        result = train.warmup(model, examples, tokenizer, config, out_dir, pool_size=pool_size,
                              fraction=recipe.fraction, resume=resume, final_checkpoint=False, **train_options)
    except CheckpointError as e:
        if resume is None:
            raise
        raise CheckpointError(f"{e} (the checkpoints of an unfinished warm-up: delete {ckpt} to start over)") from e
    shutil.rmtree(ckpt)
    return result
