"""How well do landmarks + propagation reproduce exact first-order scores? (issue 4, docs/method.md 4)

On SmolLM2-135M and the bundled real pool (idjax/assets/demo), compute:
  * exact cosine scores of every pool sample against each target task's mean gradient
    (projected per-sample gradients of all pool samples, the --exact path);
  * JVP embeddings of the pool;
  * for random and k-means++ landmarks (--fraction of the pool) and KRR / ridge propagation,
    the propagated scores, and their Spearman correlation with the exact scores on the
    non-landmark rows (landmarks keep exact values, so they are left out of the statistic),
    plus the overlap of the top-k selections.
Results (a markdown table, the command, the machine) are appended to experiments/RESULTS.md.

    python experiments/landmark_study.py --fraction 0.25 --proj-dim 2048 --seeds 3
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from idjax import data, models, passes  # noqa: E402
from idjax.embed import EmbedConfig  # noqa: E402
from idjax.grads import GradientConfig  # noqa: E402
from idjax.hessian import target_direction  # noqa: E402
from idjax.landmarks import choose_landmarks, spearman  # noqa: E402
from idjax.propagator import Propagator  # noqa: E402
from idjax.sketch import Projector  # noqa: E402

DEMO = ROOT / "idjax" / "assets" / "demo"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", default=str(DEMO / "pool.jsonl"))
    ap.add_argument("--tasks", default="code,definitions,jargon", help="target sets under assets/demo/targets")
    ap.add_argument("--limit", type=int, default=None, help="use the first N pool rows")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--proj-dim", type=int, default=2048)
    ap.add_argument("--params", default=None, help="parameter regex (default: all)")
    ap.add_argument("--embed-blocks", type=int, default=4)
    ap.add_argument("--embed-dim", type=int, default=1152)
    ap.add_argument("--seeds", type=int, default=3, help="landmark draws per setting")
    ap.add_argument("--k", type=float, default=0.1, help="selection overlap at this budget (fraction)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--store", default=str(ROOT / "experiments" / ".store"))
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = models.load("smollm2-135m")
    records = data.read_records(args.pool, limit=args.limit)
    pool, _ = data.tokenize(records, tok, max_length=args.max_length, source=args.pool)
    n = len(pool)
    store = Path(args.store)
    timings = {}

    s = time.perf_counter()
    emb = passes.embed_pool(model, pool, EmbedConfig(num_blocks=args.embed_blocks, dim=args.embed_dim), store,
                              batch_size=args.batch_size).view()
    timings["embed"] = time.perf_counter() - s

    projector = Projector("srht", args.proj_dim, seed=0)
    gcfg = GradientConfig(params=args.params, normalize=True, microbatch=1 if args.params is None else 8)
    fp = {"kind": "gradients", "model": passes.model_fingerprint(model), "data": data.examples_fingerprint(pool),
          "rows": "all", "update": "gd", "params": args.params, "keep": None, "normalize": True,
          "projection": ["srht", args.proj_dim, 0]}
    s = time.perf_counter()
    gstore, _ = passes.gradient_store(model, pool, np.arange(n), projector, gcfg, None, store, fp, args.batch_size,
                                        256)
    g = gstore.to_array().astype(np.float64)
    timings["exact gradients"] = time.perf_counter() - s

    k = max(1, round(args.k * n))
    num = round(args.fraction * n)
    rows = []
    for task in args.tasks.split(","):
        trecs = data.read_records(DEMO / "targets" / f"{task}.jsonl")
        targets, _ = data.tokenize(trecs, tok, max_length=args.max_length, source=task)
        batches = data.make_batches(targets, args.batch_size, data.example_buckets(targets, tight=True), pad_id=0)
        v, _ = target_direction(model, batches, args.params)
        exact = g @ np.asarray(projector.project(v), np.float64)
        top = set(np.argsort(-exact)[:k].tolist())
        for method in ("random", "kmeans++"):
            for kind in ("krr", "ridge"):
                rhos, overlaps, secs = [], [], []
                for seed in range(args.seeds):
                    s = time.perf_counter()
                    lm = choose_landmarks(emb, num, method=method, seed=seed)
                    prop = Propagator.fit(emb, lm, kind=kind)
                    est = np.asarray(prop.apply(exact[lm].astype(np.float32)), np.float64)
                    secs.append(time.perf_counter() - s)
                    rest = np.setdiff1d(np.arange(n), lm)
                    rhos.append(spearman(est[rest], exact[rest]))
                    overlaps.append(len(top & set(np.argsort(-est)[:k].tolist())) / k)
                rows.append((task, method, kind, np.mean(rhos), np.std(rhos), np.mean(overlaps), np.mean(secs)))
                print(f"{task:12s} {method:9s} {kind:6s} spearman {np.mean(rhos):.3f} +- {np.std(rhos):.3f}  "
                      f"top-{k} overlap {np.mean(overlaps):.2f}", flush=True)

    table = ["| target | landmarks | propagation | Spearman (non-landmarks), mean ± sd | top-k overlap | "
             "choose+fit+propagate (s) |", "|---|---|---|---|---|---|"]
    table += [f"| {t} | {m} | {kd} | {r:.3f} ± {sd:.3f} | {o:.2f} | {sec:.2f} |" for t, m, kd, r, sd, o, sec in rows]
    cmd = "python experiments/landmark_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join([
        f"\n## Landmark propagation vs exact scores ({datetime.date.today()})\n",
        f"`{cmd}`\n",
        f"- machine: {platform.machine()}, {jax.devices()[0].platform}, {jax.device_count()} device(s); "
        f"jax {jax.__version__}",
        f"- model: SmolLM2-135M-Instruct (float32); pool: {args.pool} ({n} samples); landmarks: "
        f"{num} ({args.fraction:.0%}); {args.seeds} landmark draws per row; gradients: SRHT k={args.proj_dim}, "
        f"params {args.params or 'all'}, cosine; embeddings: JVP, {args.embed_blocks} blocks, 2 tangents, "
        f"dim {args.embed_dim}; top-k overlap at k = {k}",
        "- stage times (s): " + ", ".join(f"{a} {b:.0f}" for a, b in timings.items())
        + f"; total {time.perf_counter() - t0:.0f}",
        "", *table, ""])
    print(report)
    if not args.no_record:
        with open(ROOT / "experiments" / "RESULTS.md", "a") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
