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

import dataclasses
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
from idjax import options as O
from idjax.configs import EmbedConfig, SelectConfig, TrainRecipe, WarmupRecipe
from idjax.io import write_text
from idjax.options import like, option

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "assets" / "demo"
TASKS = ("code", "definitions", "jargon")
MODEL = "smollm2-135m"
MODEL_TITLE = "SmolLM2-135M-Instruct"

@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The demo's recipe (module docstring: why these values). `idjax demo` takes the fields
    cli_args.DEMO_FLAGS as flags; the others are fixed there and free here."""

    task: str = option("definitions", "target task of the bundled data", choices=TASKS)
    pool_limit: int | None = option(300, "use the first N pool rows (all: 879)", check=O.AT_LEAST_2)
    k_fraction: float = option(0.1, "selection budget, a fraction of the pool", check=O.FRACTION)
    landmarks: float = option(0.25, "random landmarks, a fraction of the pool", check=O.FRACTION)
    warmup_fraction: float = like(WarmupRecipe, "fraction")
    warmup_steps: int = option(4, check=O.AT_LEAST_1)
    warmup_lr: float = option(5e-5, check=O.FINITE_NON_NEGATIVE)
    train_steps: int = option(8, "fine-tuning steps for both subsets", check=O.AT_LEAST_1)
    lr: float = option(5e-5, check=O.FINITE_NON_NEGATIVE)
    batch_size: int = like(SelectConfig, "batch_size")
    seed: int = option(0, "warm-up subset, landmarks, sketches, random subset")
    max_length: int = option(128, check=O.AT_LEAST_1)
    params: str = like(SelectConfig, "params", default="down_proj")
    proj_dim: int = like(SelectConfig, "proj_dim", default=1024)
    embed_dim: int = like(EmbedConfig, "dim", default=1152)
    embed_blocks: int = like(EmbedConfig, "num_blocks")
    target_limit: int | None = option(None, check=O.AT_LEAST_1)
    eval_limit: int | None = option(None, check=O.AT_LEAST_1)

    def __post_init__(self):
        O.validate(self)

    def select_config(self, k: int) -> SelectConfig:
        """First-order selection with random landmarks and KRR, 2 per-example gradients at a time (not
        auto_microbatch's 8: each holds ~300 MB of temporaries, the gradient, a * g and the padded SRHT
        input, so 8 at once add 2.4 GB)."""
        return SelectConfig(k=k, landmarks=self.landmarks, params=self.params, proj_dim=self.proj_dim, seed=self.seed,
                            batch_size=self.batch_size, microbatch=2,
                            embed=EmbedConfig(num_blocks=self.embed_blocks, num_tangents=2, dim=self.embed_dim,
                                              seed=self.seed))

    def warmup_recipe(self) -> WarmupRecipe:
        """AdamW at a constant rate, clipped at 1, no learning-rate warm-up."""
        return WarmupRecipe(fraction=self.warmup_fraction, steps=self.warmup_steps, lr=self.warmup_lr,
                            batch_size=self.batch_size, lr_warmup_steps=0, remat=_REMAT)

    def train_recipe(self) -> TrainRecipe:
        """The warm-up's recipe (one compiled training step) for `train_steps` steps."""
        return TrainRecipe(steps=self.train_steps, lr=self.lr, batch_size=self.batch_size, schedule="constant",
                           lr_warmup_steps=0, remat=_REMAT)


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


def warmup(out: Path, pool_records, tok, recipe: WarmupRecipe, *, seed: int, max_length: int) -> tuple[bool, dict]:
    """Train the demo's warm-up in out/warmup, or reuse the one there made with the same settings;
    return (reused, its description)."""
    from idjax import stages, train
    from idjax.io import fingerprint
    from idjax.models import load

    wdir = out / "warmup"
    desc = {"model": MODEL, "pool": fingerprint([r["id"] for r in pool_records]), "fraction": recipe.fraction,
            "steps": recipe.steps, "lr": recipe.lr, "batch_size": recipe.batch_size, "seed": seed,
            "max_length": max_length}
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
    examples = train.warmup_examples(pool_records, tok, fraction=recipe.fraction, seed=seed, max_length=max_length)
    base, _ = load(MODEL, tokenizer=False)
    # No Orbax checkpoint: it only serves to resume an unfinished run (params and both Adam moments
    # again, ~1.6 GB on disk, ~1 GB more memory to write), and this one is done.
    # donate_model: the base model is not used again, so the trainer takes its arrays (no float32 copy).
    result = stages.warm_up(base, examples, tok, recipe, wdir, pool_size=len(pool_records), seed=seed,
                            final_checkpoint=False, donate_model=True)
    del base
    info = {"settings": desc, "samples": len(examples), "steps": int(result.state.step),
            "losses": [round(h["loss"], 4) for h in result.history]}
    write_text(done, json.dumps(info))
    return False, info


def run_demo(out_dir="idjax-demo", config: DemoConfig | None = None, *, plot: bool = True, **overrides) -> dict:
    """Run the demo (module docstring) with `config` (default DemoConfig(); `overrides` replace its
    fields) in `out_dir`; return everything demo.json holds.

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

    from idjax import data, evaluate, models, passes, stages
    from idjax.io import fingerprint

    c = dataclasses.replace(config or DemoConfig(), **overrides)
    timed = functools.partial(passes.timed_stage, label="demo:", digits=2)
    settings = dataclasses.asdict(c)
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
        sets = stages.load_sets(tok, pool=DATA_DIR / "pool.jsonl", target=DATA_DIR / "targets" / f"{c.task}.jsonl",
                                eval=DATA_DIR / "eval" / f"{c.task}.jsonl", with_eval=True, max_length=c.max_length,
                                pool_limit=c.pool_limit, target_limit=c.target_limit, eval_limit=c.eval_limit,
                                names={"pool": "demo pool", "targets": f"{c.task} targets",
                                       "eval": f"{c.task} eval set"})
        pool_records, pool, targets, evals = sets.pool_records, sets.pool, sets.targets, sets.evals
        pool_stats = sets.stats["pool"]
        pad = tok.pad_token_id or 0
        k = max(1, min(len(pool), round(c.k_fraction * len(pool))))
    bar.update()
    domains = sorted({domain(r) for r in pool_records})

    def load_warm():
        # Always the saved model, so the store's model fingerprint is the same on every run.
        m, _ = models.load(out / "warmup", tokenizer=False)
        m.remat = _REMAT  # selection and fine-tuning; forward passes (embeddings, evaluation) are unchanged
        return m

    # 2. warm-up
    with timed("warmup", timings):
        reused["warmup"], warm_info = warmup(out, pool_records, tok, c.warmup_recipe(), seed=c.seed,
                                             max_length=c.max_length)
        _release_memory()
        model = load_warm()
    bar.update()

    # 3. selection, with the update model of the warm-up's optimizer state, read for the gradient
    # parameters only (`params`): the whole-model pair would hold 1 GB
    with timed("select", timings):
        selection = stages.select(model, pool, targets, c.select_config(k), store_dir=out / "store",
                                  optimizer_state=out / "warmup", out=out / "selection.jsonl",
                                  meta={"demo": settings, "command": "idjax demo", "model": MODEL})
        _release_memory()
    bar.update()
    sel_rows = [int(r) for r in selection.rows]
    rng = np.random.default_rng([c.seed, 1])
    rand_rows = [int(r) for r in np.sort(rng.choice(len(pool), size=len(sel_rows), replace=False))]

    # 4. fine-tune and evaluate
    model_fp = selection.info["fingerprints"]["model"]
    eval_fp = data.examples_fingerprint(evals)
    recipe = stages.finetune_config([pool[r] for r in sel_rows], c.train_recipe(), seed=c.seed)

    def evaluate_model(m):
        return evaluate.target_loss(m, evals, batch_size=max(c.batch_size, 8), pad_id=pad)

    def stage(name, rows, model=None):
        key = fingerprint({"stage": name, "model": model_fp, "eval": eval_fp, "max_length": c.max_length,
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
            from idjax import train

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
        "task": c.task, "model": MODEL_TITLE, "device": str(jax.devices()[0].platform),
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
