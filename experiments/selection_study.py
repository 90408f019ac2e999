"""Does Influence Distillation pick better fine-tuning data than the baselines, and at what cost? (issue 8)

The paper's comparison (its Figure 1: target performance against selection cost) at CPU scale:

* model: SmolLM2-135M-Instruct, warmed up as `idjax demo` does (AdamW, 4 steps on 5% of the pool);
* pool: the bundled five-domain pool (idjax/assets/demo/pool.jsonl, its first --pool-limit rows);
* targets: the three bundled tasks (code: Python docstring Q&A; definitions: WordNet glosses;
  jargon: Jargon File entries), 16 target rows each; 60 held-out eval rows each;
* budgets: k = 5% and 10% of the pool; seeds 0, 1, 2 (the seed draws the random subset, the
  landmarks, the gradient sketch and the fine-tuning order);
* methods: random, RDS+, mid-PPL, Influence Distillation with 10% landmarks ("influence"),
  Influence Distillation with every sample a landmark ("exact", the LESS-style first-order
  baseline), and the full pool;
* one fine-tuning recipe for every selection: AdamW 5e-5, clip 1, batch 8, two epochs of the
  selection (ceil(2k / 8) steps) from the warmed-up model; the metric is the eval set's target
  loss (mean response-token loss per sample, docs/method.md 1), lower is better.

Selection cost is measured from scratch, each method in a fresh store (pool embeddings, landmark /
pool gradients, target gradients), twice: with compilation, then steady state (cold_costs); the
selections of the study itself reuse a shared store, so their times are not costs. FLOPs are
counted by hand from the model's shapes at the padded length of 128 tokens per row
(analytic_flops): upper bounds, since most rows are shorter.

    python experiments/selection_study.py --out experiments/.store/selection-study
    python experiments/selection_study.py --out ... --report   # tables + plot from results.json

--cost-only measures only the selection cost, e.g. of ID against --exact on the whole bundled pool:

    python experiments/selection_study.py --out experiments/.store/cost-879 --pool-limit 879 \
        --tasks code --cost-only --cost-methods influence,exact --cost-passes steady

(--cost-passes steady: one timed call per method after an untimed call on the first 32 rows has
compiled its functions, instead of the two full passes.)

--ablations adds the ABLATIONS below (one setting of ID changed each, on --ablation-task at the
largest budget), e.g. `--seeds 0,1 --ablations --ablation-seeds 0` for a shorter run.

Everything lands in OUT/results.json as it finishes (atomic writes): an interrupted run resumes
with the next unfinished fine-tune.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO = ROOT / "idjax" / "assets" / "demo"
TASKS = ("code", "definitions", "jargon")
METHODS = ("random", "rds", "mid-ppl", "influence", "exact", "influence-rr")
LABELS = {"random": "random", "rds": "RDS+", "mid-ppl": "mid-PPL", "influence": "ID (10% landmarks)",
          "exact": "ID exact (LESS-style)", "influence-rr": "ID round-robin (10% landmarks)", "full": "full pool"}
ID_METHODS = ("influence", "exact", "influence-rr")
# Their selection order does not depend on k (top-k by score, round-robin turns, a seeded permutation), so
# one ranking of the whole pool serves every budget, in rows and in tokens (what --budget-tokens does).
PREFIX_METHODS = ("random", "rds", "influence", "exact", "influence-rr")


class Results:
    """OUT/results.json: finished runs keyed by a readable string; rewritten atomically per put.
    Unlike the demo's cache, an unreadable file is an error: it holds hours of fine-tuning."""

    def __init__(self, path: Path):
        self.path = path
        self.items = json.loads(path.read_text()) if path.exists() else {}

    def __contains__(self, key):
        return key in self.items

    def __getitem__(self, key):
        return self.items[key]

    def put(self, key, value):
        from idjax.io import atomic_write

        self.items[key] = value
        atomic_write(self.path, lambda f: f.write(json.dumps(self.items, indent=1).encode()))


class Study:
    def __init__(self, args):
        from flax import nnx

        from idjax import data, demo, models, stages, train
        from idjax.optim import load_optimizer_state, update_model

        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = Results(self.out / "results.json")
        self._rankings: dict = {}
        self._trained: tuple = (None, None)  # (rows, seed, unweighted) -> last fine-tune, kept for reuse
        self.tok = models.load_tokenizer(models.resolve(demo.MODEL))
        self.pad = self.tok.pad_token_id or 0
        self.pool_records = data.read_records(DEMO / "pool.jsonl", limit=args.pool_limit)
        self.pool, _ = data.tokenize(self.pool_records, self.tok, max_length=args.max_length, source="pool")
        self.targets, self.evals = {}, {}
        for task in args.tasks:
            t = data.read_records(DEMO / "targets" / f"{task}.jsonl", limit=args.target_limit)
            e = data.read_records(DEMO / "eval" / f"{task}.jsonl", limit=args.eval_limit)
            self.targets[task], _ = data.tokenize(t, self.tok, max_length=args.max_length, source=f"{task} targets")
            self.evals[task], _ = data.tokenize(e, self.tok, max_length=args.max_length, source=f"{task} eval")
        t0 = time.perf_counter()
        wdir = self.out / "warmup"
        if not (wdir / "optimizer.json").exists():  # trained once per study directory (its settings are fixed)
            recipe = demo.DemoConfig(warmup_steps=args.warmup_steps, max_length=args.max_length).warmup_recipe()
            examples = train.warmup_examples(self.pool_records, self.tok, fraction=recipe.fraction, seed=0,
                                             max_length=args.max_length)
            base, _ = models.load(demo.MODEL, tokenizer=False)
            stages.warm_up(base, examples, self.tok, dataclasses.replace(recipe, remat=True), wdir,
                           pool_size=len(self.pool_records), donate_model=True)
        self.warmup_s = time.perf_counter() - t0
        self.model, _ = models.load(self.out / "warmup", tokenizer=False)
        spec, opt_state = load_optimizer_state(self.out / "warmup", self.model)
        self.update = update_model(spec, opt_state, nnx.state(self.model, nnx.Param))
        self.domains = [demo.domain(self.pool_records[e.index]) for e in self.pool]
        self.tokens = np.asarray([e.response_tokens for e in self.pool], np.int64)

    # -- selection

    def select_top(self, method: str, task: str, k: int | None, seed: int, budget_tokens: int | None = None,
                   weighted: bool = False, **overrides):
        """(rows, Selection, seconds) of k rows, or of the longest prefix within `budget_tokens` response
        tokens. Where the order does not depend on k (PREFIX_METHODS, first order, unweighted), one ranking
        of the whole pool serves every budget and the target gradient is computed once per cell; otherwise
        (weights are wanted for k rows, mid-PPL's window) the library selects with k or budget_tokens."""
        from idjax.select import within_token_budget

        if method not in PREFIX_METHODS or overrides.get("order", 1) != 1 or weighted:
            sel, sec = self.select(method, task, k, seed, budget_tokens=budget_tokens, **overrides)
            return [int(r) for r in sel.rows], sel, sec
        key = (method, task, seed, repr(sorted(overrides.items())))
        if key not in self._rankings:
            self._rankings[key] = self.select(method, task, len(self.pool), seed, **overrides)
        sel, sec = self._rankings[key]
        rows = sel.rows[:k] if budget_tokens is None else within_token_budget(sel.rows, self.tokens, budget_tokens)
        return [int(r) for r in rows], sel, sec

    def select(self, method: str, task: str, k: int | None, seed: int, store=None, pool=None,
               budget_tokens: int | None = None, **overrides):
        """(Selection, seconds) of one method; store: the array store (default OUT/store, shared);
        pool: the tokenized rows to select from (default the study's pool)."""
        from idjax import baselines, pipeline
        from idjax.embed import EmbedConfig

        targets = self.targets[task]
        pool = self.pool if pool is None else pool
        store = self.out / "store" if store is None else store
        t0 = time.perf_counter()
        if method in ID_METHODS:
            cfg = dict(k=k, budget_tokens=budget_tokens, landmarks=self.args.landmarks, exact=method == "exact",
                       aggregate="round-robin" if method == "influence-rr" else "mean", params="down_proj",
                       proj_dim=1024, seed=seed, batch_size=8,
                       embed=EmbedConfig(num_blocks=4, num_tangents=2, dim=1152, seed=0))
            cfg.update(overrides)
            update = cfg.pop("update", self.update)
            model = self.base_model() if cfg.pop("model", None) == "base" else self.model
            sel = pipeline.select_samples(model, pool, targets, pipeline.SelectConfig(**cfg),
                                          update=update, store_dir=store)
        else:
            sel = baselines.select_baseline(method, self.model, pool, targets, k, seed=seed, batch_size=8,
                                            store_dir=store, budget_tokens=budget_tokens)
        return sel, time.perf_counter() - t0

    def base_model(self):
        """The model before warm-up (the 'without warm-up' ablation selects with it)."""
        from idjax import demo, models

        if not hasattr(self, "_base"):
            self._base, _ = models.load(demo.MODEL, tokenizer=False)
        return self._base

    # -- fine-tuning

    def finetune(self, task: str, rows, seed: int, weights=None) -> dict:
        from idjax import evaluate, train
        from idjax.optim import OptimizerSpec

        examples = [self.pool[int(r)] for r in rows]
        steps = max(1, math.ceil(self.args.epochs * len(examples) / 8))
        recipe = train.TrainConfig(optimizer=OptimizerSpec("adamw", 5e-5, clip_norm=1.0), batch_size=8,
                                   steps=steps, seed=seed)
        w = None
        if weights is not None:  # mean weight 1 over the selection, so the step size is comparable
            w = np.zeros(len(self.pool_records) + 1, np.float64)
            sw = np.asarray([weights[int(r)] for r in rows], np.float64)
            sw = sw / max(sw.mean(), 1e-12)
            for r, v in zip(rows, sw):
                w[self.pool[int(r)].index] = v
        t0 = time.perf_counter()
        key = (tuple(int(r) for r in rows), seed, weights is None)
        if weights is None and self._trained[0] == key:  # the full pool: one fine-tune serves every task
            res, train_s = self._trained[1]
        else:
            res = train.train(self.model, examples, recipe, weights=w, tokenizer=self.tok, pad_id=self.pad,
                              progress=False)
            train_s = round(time.perf_counter() - t0, 1)
            self._trained = (key, (res, train_s))
        loss = evaluate.target_loss(res.model, self.evals[task], batch_size=16, pad_id=self.pad)["loss"]
        return {"loss": loss, "steps": steps, "train_s": train_s,
                "final_train_loss": round(res.history[-1]["loss"], 4)}

    def composition(self, rows, task):
        share = sum(self.domains[int(r)] == task for r in rows) / max(len(rows), 1)
        return round(share, 3)

    def run_one(self, key, method, task, k, seed, weighted=False, budget_tokens=None, **overrides):
        """Select, fine-tune, evaluate and record one cell unless it is already in results.json."""
        if key in self.results:
            return self.results[key]
        rows, sel, sec = self.select_top(method, task, k, seed, budget_tokens=budget_tokens, weighted=weighted,
                                         **overrides)
        ft = self.finetune(task, rows, seed, weights=sel.weights if weighted else None)
        value = {"method": method, "task": task, "k": len(rows), "seed": seed, "select_s": round(sec, 2),
                 "select_stages_s": sel.info.get("timings_s", {}), "target_share": self.composition(rows, task),
                 "response_tokens": int(self.tokens[rows].sum()), "budget_tokens": budget_tokens, "rows": rows, **ft}
        if method in ID_METHODS:
            value["scores"] = np.asarray(sel.scores, np.float32).round(5).tolist()
            value["landmarks"] = [int(i) for i in sel.landmarks]
        self.results.put(key, value)
        print(f"{key}: loss {ft['loss']:.4f} ({len(rows)} rows, {value['response_tokens']} response tokens, "
              f"target-domain share {value['target_share']:.2f}, select {sec:.1f} s, train {ft['train_s']} s)",
              flush=True)
        return value

    def before(self, task):
        from idjax import evaluate

        key = f"before/{task}"
        if key not in self.results:
            loss = evaluate.target_loss(self.model, self.evals[task], batch_size=16, pad_id=self.pad)["loss"]
            self.results.put(key, {"loss": loss})
        return self.results[key]["loss"]

    def cold_costs(self):
        """Selection cost of each method from scratch (a fresh store: first task, seed 0, largest k).

        Two passes: the first includes XLA compilation (and which method compiles a shared function
        first depends on the order), the second is the steady state a long run or a second target
        set sees. Both are recorded; the plot and the ratios use the second. With --cost-passes
        steady, the first pass runs on the first 32 rows only, untimed: it compiles the same
        functions (the propagation's shapes depend on the pool size, so that small compile stays in
        the timed pass, against the landmarks).
        """
        import shutil

        from bench_pool import StageClock

        if "cost" in self.results:
            return self.results["cost"]
        clock = StageClock()  # compiles left in the timed pass (shapes the 32 warm rows did not have)
        task = self.args.tasks[0]
        methods = self.args.cost_methods
        out = {m: {} for m in methods}
        scores: dict = {}
        for rep in ("with_compile", "steady"):
            warm_only = rep == "with_compile" and self.args.cost_passes == "steady"
            pool = self.pool[:32] if warm_only else self.pool
            k = max(1, round(max(self.args.budgets) * len(pool)))
            for method in methods:
                cold = self.out / f"store-cold-{method}"
                shutil.rmtree(cold, ignore_errors=True)
                clock.reset()
                sel, sec = self.select(method, task, k, 0, store=cold, pool=pool)
                shutil.rmtree(cold, ignore_errors=True)
                if warm_only:
                    continue
                key = "seconds" if rep == "steady" else "seconds_with_compile"
                out[method][key] = round(sec, 2)
                out[method]["stages_s" if rep == "steady" else "stages_with_compile_s"] = sel.info.get("timings_s", {})
                out[method]["landmarks"] = int(len(sel.landmarks))
                if rep == "steady":
                    compiled = {name: round(t, 2) for name, t in clock.compile.items() if t >= 0.005}
                    out[method]["compile_s"] = compiled
                    out[method]["seconds_excl_compile"] = round(sec - sum(compiled.values()), 2)
                scores[method] = {"scores": np.asarray(sel.scores), "landmarks": [int(i) for i in sel.landmarks]}
                print(f"cost ({rep}) {method}: {sec:.1f} s  {sel.info.get('timings_s', {})}"
                      + (f"; compiling in it: {out[method]['compile_s']}" if rep == "steady" else ""), flush=True)
        clock.close()
        if {"influence", "exact"} <= scores.keys():  # how well the timed landmark run tracks the exact one
            out["influence"]["spearman_vs_exact"] = round(_spearman_off_landmarks(scores["influence"],
                                                                                  scores["exact"]), 4)
        self.results.put("cost", out)
        return out


def main_run(args) -> None:
    study = Study(args)
    print(f"pool {len(study.pool)} rows; warm-up {study.warmup_s:.0f} s", flush=True)
    if not args.skip_cost:
        cost = study.cold_costs()
        if {"influence", "exact"} <= set(cost):
            print(f"landmarks vs --exact, steady state: {cost['exact']['seconds'] / cost['influence']['seconds']:.2f}x "
                  f"at N = {len(study.pool)}; score Spearman on non-landmark rows "
                  f"{cost['influence'].get('spearman_vs_exact')}", flush=True)
            if "seconds_excl_compile" in cost["exact"]:
                ratio = cost["exact"]["seconds_excl_compile"] / cost["influence"]["seconds_excl_compile"]
                print(f"landmarks vs --exact, steady state without the compiles left in it: {ratio:.2f}x", flush=True)
    if args.cost_only:
        return
    n = len(study.pool)
    for task in args.tasks:
        study.before(task)
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:  # budgets innermost: one ranking serves them all
                for frac in args.budgets:
                    k = max(1, round(frac * n))
                    study.run_one(f"main/{task}/{method}/{frac:g}/{seed}", method, task, k, seed)
                    if args.equal_tokens:  # the same share of the pool's response tokens for every method
                        budget = max(1, round(frac * int(study.tokens.sum())))
                        study.run_one(f"tokens/{task}/{method}/{frac:g}/{seed}", method, task, None, seed,
                                      budget_tokens=budget)
    for seed in args.full_seeds:
        for task in args.tasks:
            study.run_one(f"main/{task}/full/1/{seed}", "full", task, n, seed)
    if args.ablations:
        ablations(study, args)
    report(args)


ABLATIONS = {
    # name: (SelectConfig overrides, weighted training)
    "landmarks 5%": ({"landmarks": 0.05}, False),
    "landmarks 25%": ({"landmarks": 0.25}, False),
    "landmarks 50%": ({"landmarks": 0.5}, False),
    "k-means++ landmarks": ({"landmark_method": "kmeans++"}, False),
    "ridge propagation": ({"propagation": "ridge"}, False),
    "JVP 2 blocks": ({"embed_blocks": 2}, False),
    "JVP 8 blocks": ({"embed_blocks": 8}, False),
    "JVP 1 tangent": ({"embed_tangents": 1}, False),
    "JVP 4 tangents": ({"embed_tangents": 4}, False),
    "second order": ({"order": 2}, False),
    "second order, weighted training": ({"order": 2}, True),
    "first order, weighted training": ({}, True),
    "GD update model": ({"update": None, "learning_rate": 5e-5}, False),
    # the base model has no optimizer state, so the update model is GD here too; compare with the row above
    "no warm-up (base model, GD)": ({"model": "base", "update": None, "learning_rate": 5e-5}, False),
    # issue 19, waste 3: the down_proj of layers 15-29 of 30 only (the backward pass stops at layer 15)
    "down_proj of the upper half of the layers": ({"first_layer": 15}, False),
}


def ablations(study, args) -> None:
    from idjax.embed import EmbedConfig

    task, frac = args.ablation_task, max(args.budgets)
    k = max(1, round(frac * len(study.pool)))
    for name, (over, weighted) in ABLATIONS.items():
        if args.ablation_names and name not in args.ablation_names:
            continue
        over = dict(over)
        blocks, tangents = over.pop("embed_blocks", 4), over.pop("embed_tangents", 2)
        if (blocks, tangents) != (4, 2):
            over["embed"] = EmbedConfig(num_blocks=blocks, num_tangents=tangents, dim=1152, seed=0)
        for seed in args.ablation_seeds:
            study.run_one(f"ablation/{name}/{task}/{frac:g}/{seed}", "influence", task, k, seed,
                          weighted=weighted, **over)


# ----------------------------------------------------------------------------- report


def _ms(values):
    v = np.asarray(values, np.float64)
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def report(args) -> None:
    out = Path(args.out)
    res = json.loads((out / "results.json").read_text())
    cells = _cells(res, "main")
    tasks = [t for t in TASKS if any(c[0] == t for c in cells)]
    fracs = sorted({c[1] for c in cells if c[2] != "full"}, key=float)
    methods = [m for m in METHODS if any(c[2] == m for c in cells)]
    lines = ["| task | budget | " + " | ".join(LABELS[m] for m in methods) + " | full pool | before |",
             "|---|---|" + "---|" * (len(methods) + 2)]
    wins = []
    for task in tasks:
        full = cells.get((task, "1", "full"))
        before = res.get(f"before/{task}", {}).get("loss")
        for frac in fracs:
            row = []
            stats = {}
            for m in methods:
                vals = [v["loss"] for v in cells.get((task, frac, m), [])]
                if vals:
                    mu, sd = _ms(vals)
                    stats[m] = mu
                    row.append(f"{mu:.3f} ± {sd:.3f} ({len(vals)})")
                else:
                    row.append("-")
            best = min(stats, key=stats.get) if stats else None
            row = [f"**{c}**" if best and m == best else c for m, c in zip(methods, row)]
            fl = f"{_ms([v['loss'] for v in full])[0]:.3f}" if full else "-"
            lines.append(f"| {task} | {float(frac):.0%} | " + " | ".join(row) + f" | {fl} | "
                         + (f"{before:.3f}" if before else "-") + " |")
            if {"influence", "exact", "random", "rds", "mid-ppl"} <= stats.keys():
                wins.append(stats)
    table = "\n".join(lines)
    # target-domain share of the selections
    share = ["| task | budget | " + " | ".join(LABELS[m] for m in methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in tasks:
        for frac in fracs:
            share.append(f"| {task} | {float(frac):.0%} | " + " | ".join(
                f"{np.mean([v['target_share'] for v in cells.get((task, frac, m), [])]):.2f}"
                if cells.get((task, frac, m)) else "-" for m in methods) + " |")
    # agreement of landmark scores with exact scores (same task, same seed)
    agree = []  # one per (task, seed): every budget is cut from the same ranking
    for key, v in res.items():
        if key.startswith("main/") and v["method"] == "influence" and key.split("/")[3] == fracs[-1]:
            ex = res.get(key.replace("/influence/", "/exact/"))
            if ex and "scores" in ex and "scores" in v:
                agree.append(_spearman_off_landmarks(v, ex))
    cost = res.get("cost", {})
    text = [table, "", "Share of each selection drawn from the target task's own pool domain:", "",
            "\n".join(share)]
    if wins:
        text += ["", "Cells (task x budget, mean over seeds) where ID has the lower target loss: " + "; ".join(
            f"{LABELS[m]} beats " + ", ".join(f"{LABELS[b]} {sum(w[m] < w[b] for w in wins)}/{len(wins)}"
                                              for b in ("random", "rds", "mid-ppl"))
            for m in ("influence", "exact"))]
    paired = _paired_differences(cells)
    if paired:
        text += ["", "Paired differences in target loss (ID minus baseline, same task, budget and seed; "
                     "mean ± standard error over the pairs; negative = ID better):", "", paired]
    if agree:
        text += ["", f"Spearman of ID (10% landmarks) scores with exact scores on the non-landmark rows: "
                     f"{np.mean(agree):.3f} ± {np.std(agree):.3f} ({len(agree)} selections)"]
    if cost:
        cl = ["| method | selection time from scratch (s) | stages (s) | first call incl. compilation (s) | "
              "est. FLOPs |", "|---|---|---|---|---|"]
        n_pool = cost.get("exact", {}).get("landmarks")  # every pool row is a landmark there
        fl = _model_flops(out, args.max_length)
        for m in METHODS:
            c = cost.get(m)
            if not c:
                continue
            stages = ", ".join(f"{s} {t:.1f}" for s, t in c["stages_s"].items() if s != "total" and t >= 0.05)
            est = _flops(m, c, fl, n_pool)
            cl.append(f"| {LABELS[m]} | {c['seconds']:.1f} | {stages} | {c.get('seconds_with_compile', 0):.1f} | "
                      f"{est} |")
        text += ["", "\n".join(cl)]
    text += _equal_tokens_section(res, cells)
    abl = _ablation_table(res)
    if abl:
        text += ["", abl]
    (out / "report.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    _plot(res, cells, cost, out / "selection_study.png")
    print(f"wrote {out / 'report.md'} and {out / 'selection_study.png'}")


def _model_flops(out: Path, tokens: int) -> dict | None:
    from idjax.models.config import ModelConfig

    path = out / "warmup" / "config.json"
    if not path.exists():
        return None
    return analytic_flops(ModelConfig.from_hf(json.loads(path.read_text())), tokens)


def _spearman_off_landmarks(v, ex) -> float:
    """Spearman of propagated vs exact scores on the rows that were not landmarks (those are exact)."""
    from idjax.landmarks import spearman

    keep = np.ones(len(v["scores"]), bool)
    keep[v.get("landmarks", [])] = False
    return spearman(np.asarray(v["scores"])[keep], np.asarray(ex["scores"])[keep])


def analytic_flops(cfg, tokens: int, blocks: int = 4, tangents: int = 2) -> dict:
    """Matmul FLOPs per row of `tokens` tokens (2 per multiply-add; attention scores included).

    Counted by hand rather than with XLA's cost analysis, which counts the body of the scanned
    layer stack once instead of num_layers times. forward: the loss (all layers + LM head);
    gradient: forward + the backward pass to the activations + the down_proj weight gradients
    (the parameters the scores use); embed: the JVP of the first `blocks` layers with `tangents`
    tangents (primal once, each tangent about twice the primal: d(Wx) = dW x + W dx).
    """
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer = h * q + 2 * h * kv + q * h + 3 * h * i       # weights per decoder layer
    attn = 2 * tokens * q                                # QK^T and PV per token (full-length upper bound)
    per_layer = 2 * layer * tokens + 2 * attn * tokens
    head = 2 * h * cfg.vocab_size * tokens
    forward = L * per_layer + head
    gradient = 2 * forward + 2 * L * h * i * tokens
    embed = (1 + 2 * tangents) * blocks * per_layer
    return {"forward": forward, "gradient": gradient, "embed": embed}


def _flops(method, c, fl, n_pool):
    if not fl or not n_pool:
        return "-"
    g, e, f = fl["gradient"], fl["embed"], fl["forward"]
    lm = c.get("landmarks") or 0
    targets = 3 * 16 * g  # the target stage: the mean gradient and one HVP (Adam's b) over 16 rows
    est = {"random": 0.0, "rds": f * n_pool, "mid-ppl": f * n_pool,
           "influence": e * n_pool + g * lm + targets, "exact": g * n_pool + targets}.get(method)
    return "0" if not est else f"{est / 1e12:.1f} TFLOP"


def _mean_se(d) -> str:
    """Signed mean of paired differences ± its standard error (no error bar from a single pair)."""
    se = f" ± {np.std(d, ddof=1) / np.sqrt(len(d)):.3f}" if len(d) > 1 else ""
    return f"{np.mean(d):+.3f}{se}"


def _paired_differences(cells) -> str:
    present = {c[2] for c in cells}
    baselines = [b for b in ("random", "rds", "mid-ppl") if b in present]
    lines = ["| method | " + " | ".join(f"vs {LABELS[b]}" for b in baselines) + " |", "|---|" + "---|" * len(baselines)]
    for m in (m for m in ID_METHODS if m in present):
        row = []
        for b in baselines:
            d = []
            for (task, frac, method), vals in cells.items():
                if method != m:
                    continue
                other = {v["seed"]: v["loss"] for v in cells.get((task, frac, b), [])}
                d += [v["loss"] - other[v["seed"]] for v in vals if v["seed"] in other]
            row.append(f"{_mean_se(d)} ({len(d)} pairs)" if d else "-")
        lines.append(f"| {LABELS[m]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cells(res, prefix: str) -> dict:
    """{(task, budget, method): [result of each seed]} of the `prefix`/task/method/budget/seed keys."""
    cells: dict = {}
    for key, v in res.items():
        if key.startswith(prefix + "/"):
            _, task, method, frac, _seed = key.split("/")
            cells.setdefault((task, frac, method), []).append(v)
    return cells


def _equal_tokens_section(res, main_cells) -> list[str]:
    """The tokens/ cells (every method given the same share of the pool's response tokens) next to the
    equal-k cells: loss, rows and response tokens per method, and the paired differences."""
    cells = _cells(res, "tokens")
    if not cells:
        return []
    methods = [m for m in METHODS if any(c[2] == m for c in cells)]
    lines = ["| task | budget | selected at | " + " | ".join(LABELS[m] for m in methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    for task, frac in sorted({(c[0], c[1]) for c in cells}, key=lambda c: (TASKS.index(c[0]), float(c[1]))):
        for mode, cs in (("equal k", main_cells), ("equal tokens", cells)):
            row = []
            for m in methods:
                vals = cs.get((task, frac, m), [])
                if not vals or "response_tokens" not in vals[0]:
                    row.append("-")
                    continue
                mu, sd = _ms([v["loss"] for v in vals])
                row.append(f"{mu:.3f} ± {sd:.3f} ({len(vals)}); {np.mean([v['k'] for v in vals]):.0f} rows, "
                           f"{np.mean([v['response_tokens'] for v in vals]):.0f} tok")
            lines.append(f"| {task} | {float(frac):.0%} | {mode} | " + " | ".join(row) + " |")
    return ["", "Equal k against equal response tokens (target loss mean ± std (seeds); mean rows and response "
                "tokens per selection; the token budget is the budget's share of the pool's response tokens):",
            "", "\n".join(lines), "", "Paired differences at equal response tokens (ID minus baseline, same task, "
            "budget and seed; mean ± standard error; negative = ID better):", "", _paired_differences(cells)]


def _ablation_table(res) -> str:
    cells: dict = {}
    for key, v in res.items():
        if key.startswith("ablation/"):
            _, name, task, frac, _seed = key.split("/")
            cells.setdefault((name, task, frac), []).append(v)
    if not cells:
        return ""
    from idjax.landmarks import spearman

    lines = ["| ablation (ID, one setting changed) | task | budget | target loss | minus default, paired by seed "
             "(mean ± s.e.) | Spearman vs exact | Spearman vs default ID: its landmarks / all rows | select (s, "
             "stores shared with earlier runs) |",
             "|---|---|---|---|---|---|---|---|"]
    for (name, task, frac), vals in cells.items():
        base = [res.get(f"main/{task}/influence/{frac}/{v['seed']}") for v in vals]
        mu, sd = _ms([v["loss"] for v in vals])
        rhos, same = [], []
        for v, b in zip(vals, base):
            ex = res.get(f"main/{task}/exact/{frac}/{v['seed']}")
            if ex and "scores" in v:
                rhos.append(_spearman_off_landmarks(v, ex))
            if b and "scores" in v and "scores" in b:  # at the default's landmarks, exact scores on both sides
                lm = b.get("landmarks", [])
                same.append((spearman(np.asarray(v["scores"])[lm], np.asarray(b["scores"])[lm]),
                             spearman(np.asarray(v["scores"]), np.asarray(b["scores"]))))
        ref = [b["loss"] for b in base if b]
        delta = f" (default {_ms(ref)[0]:.3f})" if ref else ""
        d = [v["loss"] - b["loss"] for v, b in zip(vals, base) if b]
        paired = _mean_se(d) if d else "-"
        lines.append(f"| {name} | {task} | {float(frac):.0%} | {mu:.3f} ± {sd:.3f} ({len(vals)}){delta} | {paired} | "
                     + (f"{np.mean(rhos):.3f}" if rhos else "-") + " | "
                     + (" / ".join(f"{x:.3f}" for x in np.mean(same, axis=0)) if same else "-")
                     + f" | {np.mean([v['select_s'] for v in vals]):.0f} |")
    return "\n".join(lines)


def _plot(res, cells, cost, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cost:
        return
    fracs = sorted({c[1] for c in cells if c[2] != "full"}, key=float)
    frac = fracs[-1] if fracs else None
    tasks = sorted({c[0] for c in cells})
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in METHODS:
        if m not in cost:
            continue
        # improvement over random, averaged over tasks (same seed and budget)
        gains = []
        for task in tasks:
            for v in cells.get((task, frac, m), []):
                r = res.get(f"main/{task}/random/{frac}/{v['seed']}")
                if r:
                    gains.append(r["loss"] - v["loss"])
        if not gains:
            continue
        mu, sd = _ms(gains)
        x = max(cost[m]["seconds"], 0.1)
        ax.errorbar([x], [mu], yerr=[sd], fmt="o", capsize=4, label=LABELS[m])
        ax.annotate(LABELS[m], (x, mu), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("selection time from scratch on this CPU (s, log scale; random at 0.1)")
    ax.set_ylabel("target loss gain over random (nats)")
    ax.set_title(f"SmolLM2-135M, budget {float(frac):.0%}, mean over tasks and seeds")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "experiments" / ".store" / "selection-study"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--budgets", default="0.05,0.1")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--full-seeds", default="0", help="seeds of the full-pool fine-tune ('' for none)")
    ap.add_argument("--pool-limit", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=None)
    ap.add_argument("--target-limit", type=int, default=None, help="the first N target rows of each task (16)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--landmarks", type=float, default=0.1)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--warmup-steps", type=int, default=4)
    ap.add_argument("--ablations", action="store_true")
    ap.add_argument("--ablation-task", default="definitions")
    ap.add_argument("--ablation-seeds", default="0,1,2")
    ap.add_argument("--ablation-names", default="", help="';'-separated ABLATIONS names to run (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS), help="the main grid's methods")
    ap.add_argument("--equal-tokens", action="store_true",
                    help="also select each budget as that share of the pool's response tokens (tokens/ cells)")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--cost-only", action="store_true", help="measure the selection cost and stop")
    ap.add_argument("--cost-methods", default=",".join(METHODS))
    ap.add_argument("--cost-passes", choices=("both", "steady"), default="both",
                    help="steady: compile on 32 rows untimed, then one timed call per method")
    ap.add_argument("--report", action="store_true", help="only write the tables and the plot")
    args = ap.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.full_seeds = [int(s) for s in args.full_seeds.split(",") if s]
    args.ablation_seeds = [int(s) for s in args.ablation_seeds.split(",") if s]
    args.cost_methods = [m for m in args.cost_methods.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.ablation_names = [a for a in args.ablation_names.split(";") if a]
    bad = [m for m in args.methods if m not in METHODS] + [a for a in args.ablation_names if a not in ABLATIONS]
    if bad:
        ap.error(f"unknown method(s) or ablation(s) {bad}: methods {METHODS}, ablations {list(ABLATIONS)}")
    bad = [t for t in args.tasks if t not in TASKS]
    if bad:
        ap.error(f"unknown task(s) {bad}: choose from {TASKS}")
    bad = [m for m in args.cost_methods if m not in METHODS]
    if bad or not args.cost_methods:
        ap.error(f"unknown cost method(s) {bad}: choose from {METHODS}")
    if args.report:
        report(args)
        return 0
    started = datetime.datetime.now().isoformat(timespec="seconds")
    print(f"selection study, {started}, {platform.machine()}, python {platform.python_version()}", flush=True)
    main_run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
