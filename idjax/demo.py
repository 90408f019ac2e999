"""`idjax demo`: the whole Influence Distillation pipeline on the embedded SmolLM2-135M, on a CPU, in minutes.

Data: the bundled real pool of five domains (`idjax/assets/demo/pool.jsonl`: WordNet definitions,
Jargon File entries, Python standard-library code and docstring Q&A, Linux man-page summaries) and
one of three target tasks, each with a 16-row target (query) set and a 60-row held-out eval set
(`targets/<task>.jsonl`, `eval/<task>.jsonl`; see the README there).

It is `idjax run` (idjax/run.py) on the demo's configuration (`DemoConfig.run_config`: the same
keys as idjax/assets/run-example.yaml), plus a comparison with random selection. Every stage is
timed and reuses what an earlier run left in `out_dir`:

1. data: the pool (its first `pool_limit` rows: the file is shuffled with a fixed seed, so any
   prefix mixes the domains), the target set and the eval set, tokenized by SmolLM2-135M-Instruct's
   tokenizer into out_dir/data;
2. warm-up (docs/method.md 8): AdamW for `warmup_steps` steps on a seeded random `warmup_fraction` of
   the pool, saved to out_dir/warmup (model + optimizer state);
3. selection (docs/method.md 3-7) with the warmed-up model and the AdamW update model read from its
   optimizer state: JVP embeddings of the pool, random landmarks (`landmarks` of the pool),
   projected Adam-preconditioned gradients of the landmarks, KRR propagation, first-order cosine
   scores against the target set's mean gradient, top-k with k = `k_fraction` of the pool. The
   arrays go to the resumable store out_dir/store (another --task reuses the pool embeddings and
   landmark gradients, which do not depend on the target); the selection is written to
   out_dir/select/selection.jsonl (+ .meta.json);
4. fine-tuning of the warmed-up model on the selection (AdamW, `train_steps` steps of `batch_size`;
   out_dir/train/model) and the target loss (mean response-token loss, docs/method.md 1) on the eval
   set before and after it (out_dir/eval/eval.json);
5. the comparison: the same recipe on a seeded random subset of the pool of the same size, and its
   eval loss (out_dir/random.json);
6. report: a table on stdout (`demo_report.format_report`), out_dir/demo.json with every number, and
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
recompute each layer's activations (the run key `remat`), 2 per-example gradients are taken at a
time (`microbatch`), the trainers own their model copies (no float32 copy beside them), selection
keeps the update model of the gradient parameters only, and compiled programs and freed heap go
back to the OS after each stage and after each long compilation (idjax/host_memory.py). The
recomputed activations agree with kept ones to float32 rounding (XLA fuses the recomputed graph
differently), far below the table's 4 decimals.
"""

from __future__ import annotations

import dataclasses
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
from idjax.run_config import RunConfig

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
    landmarks: float = like(SelectConfig, "landmarks", default=0.25)
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

    def warmup_recipe(self) -> WarmupRecipe:
        """AdamW at a constant rate, clipped at 1, no learning-rate warm-up."""
        return WarmupRecipe(fraction=self.warmup_fraction, steps=self.warmup_steps, lr=self.warmup_lr,
                            batch_size=self.batch_size, lr_warmup_steps=0)

    def train_recipe(self) -> TrainRecipe:
        """The warm-up's recipe (one compiled training step) for `train_steps` steps."""
        return TrainRecipe(steps=self.train_steps, lr=self.lr, batch_size=self.batch_size, schedule="constant",
                           lr_warmup_steps=0)

    def run_config(self, out) -> RunConfig:
        """The `idjax run` configuration of this demo in `out`: first-order selection with random
        landmarks and KRR, 2 per-example gradients at a time (not the most that fit a machine's memory:
        each holds ~300 MB of temporaries, the gradient, a * g and the padded SRHT input, and the demo
        stays under 4 GB), layer activations recomputed in every backward pass."""
        return RunConfig(
            pool=str(DATA_DIR / "pool.jsonl"), target=str(DATA_DIR / "targets" / f"{self.task}.jsonl"),
            eval=str(DATA_DIR / "eval" / f"{self.task}.jsonl"), model=MODEL, max_length=self.max_length,
            pool_limit=self.pool_limit, target_limit=self.target_limit, eval_limit=self.eval_limit,
            k=float(self.k_fraction), landmarks=self.landmarks, params=self.params, proj_dim=self.proj_dim,
            microbatch=2, embed_blocks=self.embed_blocks, embed_tangents=2, embed_dim=self.embed_dim,
            seed=self.seed, batch_size=self.batch_size, remat=True, warmup=self.warmup_recipe(),
            train=self.train_recipe(), out=str(out))


#: Settings of `idjax demo --quick` (and of the test): a 64-row pool, one warm-up step, two
#: fine-tuning steps of 4, 64-token samples (one length bucket, so one compilation per stage),
#: 4 target and 8 eval samples. It checks that everything runs; its numbers mean little.
QUICK: dict[str, Any] = {
    "pool_limit": 64, "warmup_steps": 1, "train_steps": 2, "max_length": 64, "batch_size": 4,
    "target_limit": 4, "eval_limit": 8, "proj_dim": 256, "embed_dim": 256, "embed_blocks": 2,
}

_RANDOM = "random.json"  # the random subset's fine-tuning and evaluation, with the fingerprint of its inputs


def domain(record: dict) -> str:
    """The pool domain of a demo record (its "domain", else its "task")."""
    return str(record.get("domain") or record.get("task") or "?")


def _share(counts: Counter, total: int, order) -> dict:
    return {d: {"count": int(counts.get(d, 0)), "fraction": counts.get(d, 0) / max(total, 1)} for d in order}


def _retire_old_layout(out: Path) -> None:
    """Demos before `idjax run` kept their own warm-up and caches in out/; they are recomputed in the
    run's layout (a run refuses directories it did not write)."""
    old_warmup, old_cache = out / "warmup" / "demo-warmup.json", out / "demo-cache.json"
    if not (old_warmup.exists() or old_cache.exists()):
        return  # not an older demo's directory: nothing here is ours to remove
    if old_warmup.exists():
        log.warning("demo: %s is from an older idjax demo; its warm-up is trained again in the run layout",
                    out / "warmup")
        shutil.rmtree(out / "warmup")
    for name in ("demo-cache.json", "selection.jsonl", "selection.meta.json"):
        (out / name).unlink(missing_ok=True)


def random_comparison(out: Path, c: DemoConfig, run_result, pool, evals, k: int, pad: int) -> tuple[list, dict, bool]:
    """(rows, result, reused): the run's fine-tuning recipe on a seeded random subset of `k` pool rows,
    from the same warmed-up model, and the eval loss after it; out/random.json keeps the result with
    the fingerprint of its inputs (warm-up, data, rows, recipe), so a re-run with the same inputs reuses it."""
    from idjax import evaluate, host_memory, models, stages, train
    from idjax.io import fingerprint

    rng = np.random.default_rng([c.seed, 1])
    rows = [int(r) for r in np.sort(rng.choice(len(pool), size=k, replace=False))]
    recipe = stages.finetune_config([pool[r] for r in rows], c.train_recipe(), seed=c.seed)
    key = fingerprint({"warmup": run_result.fingerprints["warmup"], "data": run_result.fingerprints["data"],
                       "rows": [pool[r].id for r in rows], "recipe": recipe.to_dict(), "remat": True})
    path = out / _RANDOM
    try:
        saved = json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        log.warning("demo: %s is unreadable; computing it again", path)
        saved = None
    if saved and saved.get("fingerprint") == key:
        log.info("demo: the random subset's fine-tuning and evaluation reused from %s", path)
        return rows, saved["result"], True
    model, _ = models.load(out / "warmup", tokenizer=False)
    model.remat = True
    # The trainer owns the fresh copy of the warmed-up model (donate_model: no float32 copy of it).
    result = train.train(model, [pool[r] for r in rows], recipe, pad_id=pad, donate_model=True)
    trained, history = result.model, result.history
    del result, model  # the optimizer state (twice the model) is not needed to evaluate
    value = {"eval": evaluate.target_loss(trained, evals, batch_size=c.batch_size, pad_id=pad),
             "train_losses": [round(h["loss"], 4) for h in history]}
    del trained
    write_text(path, json.dumps({"fingerprint": key, "result": value}))
    host_memory.release()
    return rows, value, False


def run_demo(out_dir="idjax-demo", config: DemoConfig | None = None, *, plot: bool = True, **overrides) -> dict:
    """Run the demo (module docstring) with `config` (default DemoConfig(); `overrides` replace its
    fields) in `out_dir`; return everything demo.json holds.

    Every stage reuses what an earlier run left in out_dir when it was made from the same inputs:
    `idjax run`'s stages and the random comparison (out_dir/random.json). `QUICK` holds the `--quick`
    overrides.
    """
    import jax

    from idjax import data, run
    from idjax.example_file import load_examples
    from idjax.selection_file import read_selection

    c = dataclasses.replace(config or DemoConfig(), **overrides)
    out = Path(out_dir)
    t_start = time.perf_counter()
    _retire_old_layout(out)
    result = run.run(c.run_config(out))
    results, status = result.results, result.status
    pool, evals = (load_examples(out / "data" / f"{n}.npz") for n in ("pool", "eval"))
    pool_records = data.read_records(DATA_DIR / "pool.jsonl", limit=c.pool_limit)
    pad = int(results["data"]["pad_id"])
    position = {e.id: r for r, e in enumerate(pool)}
    chosen, _ = read_selection(out / "select" / "selection.jsonl", [{"id": e.id} for e in pool], False)
    sel_rows = [position[r["id"]] for r in chosen]

    t0 = time.perf_counter()
    rand_rows, random_, random_reused = random_comparison(out, c, result, pool, evals, len(sel_rows), pad)
    timings = {**result.seconds, "random": 0.0 if random_reused else round(time.perf_counter() - t0, 2)}
    reused = {**{name: s == "cached" for name, s in status.items()}, "random": random_reused}

    domains = sorted({domain(r) for r in pool_records})

    def composition(rows):
        return _share(Counter(domain(pool_records[pool[r].index]) for r in rows), len(rows), domains)

    data_info, select_info, eval_info = results["data"], results["select"], results["eval"]
    report = {
        "task": c.task, "model": MODEL_TITLE, "device": str(jax.devices()[0].platform),
        "settings": dataclasses.asdict(c),
        "pool": {"records": data_info["pool"]["records"], "examples": len(pool),
                 "truncated": data_info["pool"]["truncated"],
                 "skipped_no_response": data_info["pool"]["skipped_no_response"], "domains": domains},
        "targets": data_info["targets"]["kept"], "eval_samples": len(evals), "k": len(sel_rows),
        "landmarks": int(select_info["landmarks"]),
        "warmup": {key: results["warmup"][key] for key in ("samples", "steps", "losses")},
        "loss": {"before": eval_info["before"]["loss"], "selected": eval_info["after"]["loss"],
                 "random": random_["eval"]["loss"]},
        "eval": {"before": eval_info["before"], "selected": eval_info["after"], "random": random_["eval"]},
        "train_losses": {"selected": results["train"]["losses"], "random": random_["train_losses"]},
        "composition": {"pool": _share(Counter(domain(pool_records[e.index]) for e in pool), len(pool), domains),
                        "selected": composition(sel_rows), "random": composition(rand_rows)},
        "selected_ids": [pool[r].id for r in sel_rows],
        "random_ids": [pool[r].id for r in rand_rows],
        "timings_s": timings,
        "selection_timings_s": select_info["timings_s"],
        "reused": reused,
        "files": {"selection": str(out / "select" / "selection.jsonl"), "warmup": str(out / "warmup"),
                  "store": str(out / "store"), "model": str(out / "train" / "model"),
                  "plot": str(out / "demo.png") if plot else None, "json": str(out / "demo.json")},
    }
    report["win"] = report["loss"]["random"] - report["loss"]["selected"]
    if plot:
        demo_report.save_plot(report, out / "demo.png")
    timings["total"] = round(time.perf_counter() - t_start, 2)
    write_text(out / "demo.json", json.dumps(report, indent=2))
    log.info("demo: done in %.1f s; results in %s", timings["total"], out / "demo.json")
    return report
