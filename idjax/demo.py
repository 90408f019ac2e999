"""`idjax demo`: the whole Influence Distillation pipeline on the embedded SmolLM2-135M, on a CPU, in minutes.

Data: the bundled real pool of five domains (`idjax/assets/demo/pool.jsonl`: WordNet definitions,
Jargon File entries, Python standard-library code and docstring Q&A, Linux man-page summaries) and
one of three target tasks, each with a 16-row target (query) set and a 60-row held-out eval set
(`targets/<task>.jsonl`, `eval/<task>.jsonl`; see the README there).

Stages (each timed; every one reuses what an earlier run left in `out_dir`):

1. load SmolLM2-135M-Instruct, read and tokenize the pool (its first `pool_limit` rows: the file
   is shuffled with a fixed seed, so any prefix mixes the domains), the target set and the eval set;
2. warm-up (docs/method.md 8): AdamW for `warmup_steps` steps on a seeded random `warmup_fraction` of
   the pool, saved to out_dir/warmup (model + optimizer state; reused when it is there);
3. selection (docs/method.md 3-7) with the warmed-up model and the AdamW update model read from its
   optimizer state: JVP embeddings of the pool, random landmarks (`landmarks` of the pool),
   projected Adam-preconditioned gradients of the landmarks, KRR propagation, first-order cosine
   scores against the target set's mean gradient, top-k with k = `k_fraction` of the pool. The
   arrays go to the resumable store out_dir/store (a second run computes nothing there; another
   --task reuses the pool embeddings and landmark gradients, which do not depend on the target);
   the selection is written to out_dir/selection.jsonl (+ .meta.json);
4. the comparison: the warmed-up model is fine-tuned with one recipe (AdamW, `train_steps` steps of
   `batch_size`) on the selection and on a seeded random subset of the pool of the same size, and
   the target loss (mean response-token loss, docs/method.md 1) on the eval set is measured for the
   warmed-up model ("before") and both fine-tuned models;
5. report: a table on stdout (`demo_report.format_report`), out_dir/demo.json with every number, and
   out_dir/demo.png (eval loss of the three models; domain composition of both subsets).

Why these defaults (measured on a shared 2-core CPU). With the defaults (a 300-row pool, k = 30, 75
landmarks, 8 fine-tuning steps) the selection beats the random subset on all three tasks: eval
target loss 2.713 vs 3.067 on `definitions` (the selection is 80% definitions, the pool 24%), 1.273
vs 1.437 on `code` (77% code), 3.909 vs 4.060 on `jargon` (73% jargon); with --seed 1,
`definitions` gives 2.786 vs 2.924. `definitions` (WordNet glosses: "What does the word X mean?")
is the default because its win is the largest and its rows are the shortest (about 60 tokens), so
fine-tuning on them costs least; its pool domain is distinctive (one-line gloss answers), so the
target gradient points at one region of the pool. Fine-tuning is short on purpose (8 steps of 8,
about two epochs of the selection): over two seeds the selection won at every length tried from 2
to 12 steps (by 0.06 to 0.35 nats), but the win shrank with more epochs, and in a trial with 40
selected rows and 24 steps (5 epochs) the selection memorised its few glosses (train loss 0.4) and
lost to the more varied random subset (3.19 vs 3.07). The pool is cut to its first 300 rows (all
five domains) and samples to 128 tokens, so the landmark gradients (one full backward pass each,
the dominant cost with the target direction) and one compilation per length bucket (64 and 128) fit
in a few minutes. Gradients are taken for the MLP down projections only (26.5M of the 135M
parameters) and sketched to 1024 dimensions with an SRHT (inner products of unit vectors kept to
about 1/sqrt(1024) = 0.03); that sketch costs little next to the backward pass, while sketching all
135M parameters made each landmark gradient 2.6x slower. With the default learning rates, warm-up
and fine-tuning share one AdamW recipe (learning rate, clipping, batch), so they run the same
training step.

Memory (peak RSS 8 GB before, under 4 GB now, so an 8 GB laptop runs it): backward passes
recompute each layer's activations (`_REMAT`), 2 per-example gradients are taken at a time, the
trainers own their model copies (no float32 copy beside them), selection keeps the update model
of the gradient parameters only, and compiled programs and freed heap go back to the OS after
each stage (`_release_memory`) and freed heap after each long compilation (`_trim_after_compile`).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from idjax import demo_report
from idjax.io import write_text

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "assets" / "demo"
TASKS = ("code", "definitions", "jargon")
MODEL = "smollm2-135m"
MODEL_TITLE = "SmolLM2-135M-Instruct"

#: Settings of `idjax demo --quick` (and of the test): a 64-row pool, one warm-up step, two
#: fine-tuning steps of 4, 64-token samples (one length bucket, so one compilation per stage),
#: 4 target and 8 eval samples. It checks that everything runs; its numbers mean little.
QUICK: dict[str, Any] = {
    "pool_limit": 64, "warmup_steps": 1, "train_steps": 2, "max_length": 64, "batch_size": 4,
    "target_limit": 4, "eval_limit": 8, "proj_dim": 256, "embed_dim": 256, "embed_blocks": 2,
}

#: Recompute each decoder layer in the backward passes (warm-up, landmark and target gradients, target
#: HVP, fine-tuning) instead of keeping its activations: an 8 GB laptop runs the default demo (peak
#: RSS 8.0 -> <4 GB). The results agree with the activation-keeping passes to float32 rounding (XLA
#: fuses the recomputed graph differently), far below the table's 4 decimals.
_REMAT = True

_LISTENING = False  # _trim_after_compile is registered

_CACHE = "demo-cache.json"
_WARMUP_DONE = "demo-warmup.json"


def domain(record: dict) -> str:
    """The pool domain of a demo record (its "domain", else its "task")."""
    return str(record.get("domain") or record.get("task") or "?")


def _share(counts: Counter, total: int, order) -> dict:
    return {d: {"count": int(counts.get(d, 0)), "fraction": counts.get(d, 0) / max(total, 1)} for d in order}


def _trim_heap() -> None:
    """Return glibc's free heap pages to the OS (a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _release_memory() -> None:
    """Hand memory the next stage does not need back to the OS (results are unchanged).

    jax.clear_caches(): every compiled XLA:CPU program holds ~1.5 MB, and warm-up and selection leave
    hundreds (mostly small eager operations; ~0.6 GB). malloc_trim: glibc keeps freed heap memory
    (~0.3-0.8 GB after a stage) that the next stage's large buffers do not reuse. The cost: a stage
    compiles again what an earlier one had compiled (the training step: ~3 s per length bucket).
    """
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    _trim_heap()


def _trim_after_compile(event: str, duration: float, **_) -> None:
    """A jax.monitoring listener: compiling a big program (a training step: seconds) leaves 0.2-0.4 GB
    of freed LLVM memory in glibc arenas of XLA's threads, resident through the stage that runs it."""
    if event == "/jax/core/compile/backend_compile_duration" and duration > 1.0:
        _trim_heap()


class _Cache:
    """out_dir/demo-cache.json: finished evaluations keyed by a fingerprint of what they depend on."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.items = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            log.warning("demo: %s is unreadable; recomputing what it held", path)
            self.items = {}

    def get(self, key: str):
        return self.items.get(key)

    def put(self, key: str, value) -> None:
        self.items[key] = value
        write_text(self.path, json.dumps(self.items, indent=1))


def warmup(out: Path, pool_records, tok, *, fraction, steps, lr, batch_size, seed, max_length) -> tuple[bool, dict]:
    """Train the demo's warm-up in out/warmup, or reuse the one there made with the same settings;
    return (reused, its description)."""
    from idjax import train
    from idjax.models import load
    from idjax.optim import OptimizerSpec
    from idjax.io import fingerprint

    wdir = out / "warmup"
    desc = {"model": MODEL, "pool": fingerprint([r["id"] for r in pool_records]), "fraction": fraction,
            "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "max_length": max_length}
    done = wdir / _WARMUP_DONE
    if done.exists() and (wdir / "optimizer.json").exists() and (wdir / "opt_state").is_dir():
        try:
            same = json.loads(done.read_text()).get("settings") == desc
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            log.info("demo: warm-up reused from %s", wdir)
            return True, json.loads(done.read_text())
        log.info("demo: %s was made with other settings; training the warm-up again", wdir)
    if wdir.exists():  # an earlier or interrupted demo warm-up: start it over, but never remove anything else
        if any(wdir.iterdir()) and not (wdir / "train_config.json").exists():
            raise ValueError(f"{wdir} exists and is not a demo warm-up; choose another --out")
        shutil.rmtree(wdir)
    examples = train.warmup_examples(pool_records, tok, fraction=fraction, seed=seed, max_length=max_length)
    # remat: see _REMAT.
    config = train.TrainConfig(optimizer=OptimizerSpec("adamw", lr, clip_norm=1.0), batch_size=batch_size,
                               steps=steps, seed=seed, remat=_REMAT)
    base, _ = load(MODEL, tokenizer=False)
    # The final model and optimizer state are exported next to it; an Orbax checkpoint (params and
    # both Adam moments again, ~1.6 GB on disk, ~1 GB more memory to write) is only needed to resume
    # an unfinished run, and this one is done: none is written.
    # donate_model: the base model is not used again, so the trainer takes its arrays (no float32 copy).
    result = train.warmup(base, examples, tok, config, wdir, pool_size=len(pool_records), fraction=fraction,
                          final_checkpoint=False, donate_model=True)
    del base
    shutil.rmtree(wdir / "checkpoints", ignore_errors=True)
    info = {"settings": desc, "samples": len(examples), "steps": int(result.state.step),
            "losses": [round(h["loss"], 4) for h in result.history]}
    write_text(done, json.dumps(info))
    return False, info


def run_demo(out_dir="idjax-demo", *, task: str = "definitions", pool_limit: int | None = 300,
             k_fraction: float = 0.1, landmarks: float = 0.25, warmup_fraction: float = 0.05,
             warmup_steps: int = 4, warmup_lr: float = 5e-5, train_steps: int = 8, lr: float = 5e-5,
             batch_size: int = 8, seed: int = 0, max_length: int = 128, params: str = "down_proj",
             proj_dim: int = 1024, embed_dim: int = 1152, embed_blocks: int = 4,
             target_limit: int | None = None, eval_limit: int | None = None, plot: bool = True) -> dict:
    """Run the demo (module docstring) in `out_dir`; return everything demo.json holds.

    Every stage reuses what an earlier run left in out_dir: the warm-up (out_dir/warmup), the
    selection's arrays (out_dir/store) and the evaluations of fine-tuned models (demo-cache.json),
    each only when it was made with the same settings. `QUICK` holds the `--quick` overrides.
    """
    import jax
    from tqdm.auto import tqdm

    global _LISTENING
    if not _LISTENING:  # once per process: listeners stay registered
        jax.monitoring.register_event_duration_secs_listener(_trim_after_compile)
        _LISTENING = True

    from idjax import data, evaluate, models, passes, pipeline, stages, train
    from idjax.embed import EmbedConfig
    from idjax.io import fingerprint
    from idjax.optim import OptimizerSpec
    from idjax.selection_file import write_selection

    timed = functools.partial(passes.timed_stage, label="demo:", digits=2)
    if task not in TASKS:
        raise ValueError(f"unknown demo task {task!r}: choose one of {', '.join(TASKS)}")
    if not 0 < k_fraction <= 1:
        raise ValueError(f"k_fraction must be in (0, 1], got {k_fraction}")
    if not 0 < landmarks <= 1:
        raise ValueError(f"landmarks must be a fraction of the pool in (0, 1], got {landmarks}")
    if pool_limit is not None and pool_limit < 2:
        raise ValueError(f"pool_limit must be >= 2, got {pool_limit}")
    settings = {k: v for k, v in locals().items() if k in (
        "task", "pool_limit", "k_fraction", "landmarks", "warmup_fraction", "warmup_steps", "warmup_lr",
        "train_steps", "lr", "batch_size", "seed", "max_length", "params", "proj_dim", "embed_dim",
        "embed_blocks", "target_limit", "eval_limit")}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = _Cache(out / _CACHE)
    bar = tqdm(total=6, desc="idjax demo", unit="stage", disable=None)
    timings: dict[str, float] = {}
    reused: dict[str, bool] = {}
    t_start = time.perf_counter()

    # 1. data and tokenizer
    with timed("load", timings):
        tok = models.load_tokenizer(models.resolve(MODEL))
        sets = stages.load_sets(tok, pool=DATA_DIR / "pool.jsonl", target=DATA_DIR / "targets" / f"{task}.jsonl",
                                eval=DATA_DIR / "eval" / f"{task}.jsonl", with_eval=True, max_length=max_length,
                                pool_limit=pool_limit, target_limit=target_limit, eval_limit=eval_limit,
                                names={"pool": "demo pool", "targets": f"{task} targets", "eval": f"{task} eval set"})
        pool_records, pool, targets, evals = sets.pool_records, sets.pool, sets.targets, sets.evals
        pool_stats = sets.stats["pool"]
        pad = tok.pad_token_id or 0
        k = max(1, min(len(pool), round(k_fraction * len(pool))))
    bar.update()
    domains = sorted({domain(r) for r in pool_records})

    def load_warm():
        # Always the saved model, so the store's model fingerprint is the same on every run.
        m, _ = models.load(out / "warmup", tokenizer=False)
        m.remat = _REMAT  # selection and fine-tuning; forward passes (embeddings, evaluation) are unchanged
        return m

    # 2. warm-up
    with timed("warmup", timings):
        reused["warmup"], warm_info = warmup(out, pool_records, tok, fraction=warmup_fraction, steps=warmup_steps,
                                             lr=warmup_lr, batch_size=batch_size, seed=seed, max_length=max_length)
        _release_memory()
        model = load_warm()
        # a and b of the gradient parameters only (`params`): the whole-model pair would hold 1 GB.
        update = stages.read_update_model(out / "warmup", model, params=params)
        _release_memory()
    bar.update()

    # 3. selection
    with timed("select", timings):
        config = pipeline.SelectConfig(
            k=k, landmarks=landmarks, params=params, proj_dim=proj_dim, seed=seed, batch_size=batch_size,
            # 2 per-example gradients at a time, not auto_microbatch's 8: each one holds ~300 MB of
            # temporaries (gradient, a * g, the padded SRHT input), so 8 at once add 2.4 GB.
            microbatch=2,
            embed=EmbedConfig(num_blocks=embed_blocks, num_tangents=2, dim=embed_dim, seed=seed))
        selection = pipeline.select_samples(model, pool, targets, config, update=update, store_dir=out / "store")
        write_selection(selection, pool, out / "selection.jsonl",
                        {"demo": settings, "command": "idjax demo", "model": MODEL})
        del update  # not needed by the fine-tuning stages
        _release_memory()
    bar.update()
    sel_rows = [int(r) for r in selection.rows]
    rng = np.random.default_rng([seed, 1])
    rand_rows = [int(r) for r in np.sort(rng.choice(len(pool), size=len(sel_rows), replace=False))]

    # 4. fine-tune and evaluate
    model_fp = selection.info["fingerprints"]["model"]
    eval_fp = data.examples_fingerprint(evals)
    recipe = train.TrainConfig(optimizer=OptimizerSpec("adamw", lr, clip_norm=1.0), batch_size=batch_size,
                               steps=train_steps, seed=seed, remat=_REMAT)

    def evaluate_model(m):
        return evaluate.target_loss(m, evals, batch_size=max(batch_size, 8), pad_id=pad)

    def stage(name, rows, model=None):
        key = fingerprint({"stage": name, "model": model_fp, "eval": eval_fp, "max_length": max_length,
                           "rows": None if rows is None else [pool[r].id for r in rows],
                           "recipe": None if rows is None else recipe.to_dict()})
        hit = cache.get(key)
        reused[name] = hit is not None
        if hit is not None:
            log.info("demo: %s reused from %s", name, cache.path)
            return hit
        if rows is None:
            value = {"eval": evaluate_model(model)}
        else:
            # The trainer owns a fresh copy of the warmed-up model (donate_model: no float32 copy of it).
            result = train.train(load_warm(), [pool[r] for r in rows], recipe, tokenizer=tok, pad_id=pad,
                                 donate_model=True)
            trained, history = result.model, result.history
            del result  # its optimizer state (twice the model) is not needed to evaluate
            value = {"eval": evaluate_model(trained), "train_losses": [round(h["loss"], 4) for h in history]}
            del trained
        cache.put(key, value)
        _release_memory()
        return value

    with timed("evaluate_before", timings):
        before = stage("before", None, model)
    del model  # each fine-tuning loads its own copy
    bar.update()
    with timed("train_selected", timings):
        selected = stage("selected", sel_rows)
    bar.update()
    with timed("train_random", timings):
        random_ = stage("random", rand_rows)
    bar.update()
    bar.close()

    # 5. report
    def composition(rows):
        return _share(Counter(domain(pool_records[pool[r].index]) for r in rows), len(rows), domains)

    pool_comp = _share(Counter(domain(pool_records[e.index]) for e in pool), len(pool), domains)
    sel_info = selection.info
    report = {
        "task": task, "model": MODEL_TITLE, "device": str(jax.devices()[0].platform),
        "settings": settings,
        "pool": {"records": len(pool_records), "examples": len(pool), "truncated": pool_stats.n_truncated,
                 "skipped_no_response": len(pool_stats.skipped_no_response), "domains": domains},
        "targets": len(targets), "eval_samples": len(evals), "k": len(sel_rows),
        "landmarks": int(sel_info["landmarks"]),
        "warmup": {"samples": warm_info.get("samples"), "steps": warm_info.get("steps"),
                   "losses": warm_info.get("losses")},
        "loss": {"before": before["eval"]["loss"], "selected": selected["eval"]["loss"],
                 "random": random_["eval"]["loss"]},
        "eval": {"before": before["eval"], "selected": selected["eval"], "random": random_["eval"]},
        "train_losses": {"selected": selected["train_losses"], "random": random_["train_losses"]},
        "composition": {"pool": pool_comp, "selected": composition(sel_rows), "random": composition(rand_rows)},
        "selected_ids": [pool[r].id for r in sel_rows],
        "random_ids": [pool[r].id for r in rand_rows],
        "timings_s": timings,
        "selection_timings_s": sel_info["timings_s"],
        "reused": reused,
        "files": {"selection": str(out / "selection.jsonl"), "warmup": str(out / "warmup"),
                  "store": str(out / "store"), "plot": str(out / "demo.png") if plot else None,
                  "json": str(out / "demo.json")},
    }
    report["win"] = report["loss"]["random"] - report["loss"]["selected"]
    if plot:
        with timed("plot", timings):
            demo_report.save_plot(report, out / "demo.png")
    timings["total"] = round(time.perf_counter() - t_start, 2)
    write_text(out / "demo.json", json.dumps(report, indent=2))
    log.info("demo: done in %.1f s; results in %s", timings["total"], out / "demo.json")
    return report


# ----------------------------------------------------------------------------- output
