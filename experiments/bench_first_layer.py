"""What stopping the backward pass at a first layer saves (issue 19, waste 3).

With `--params down_proj` every per-example gradient still ran its backward pass through all the
decoder layers, because they run under one lax.scan. `first_layer=s` (SelectConfig / `--first-layer`)
differentiates only the selected parameters of layers s..: the layers below run forward once per batch,
outside every gradient, and each sample's backward pass stops at layer s.

This script times the pipeline's gradient stage (grads.PerExampleGradients.run: down_proj, SRHT sketch,
normalised, the selection study's settings) on the same length-sorted batches of the bundled pool in one
process, for each first layer, and checks each against the full backward pass with the layers below
zeroed by the preconditioner (grads.layer_mask): the same rows to float32 rounding.

    python experiments/bench_first_layer.py                       # 64 rows, first layers 0, 15, 22
    python experiments/bench_first_layer.py --rows 128 --first-layers 0,8,15,22 --repeats 5
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import bench_pool  # the benchmarks' options and rows (and this checkout on sys.path)


def main(argv=None) -> int:
    ap = bench_pool.parser(__doc__)
    ap.add_argument("--first-layers", default="0,15,22")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from idjax import data as D
    from idjax.grads import GradientConfig, PerExampleGradients, layer_mask
    from idjax.sketch import Projector

    model, tok, examples = bench_pool.load(args)
    batches = D.sorted_batches(examples, args.batch_size, pad_id=tok.pad_token_id or 0)
    layers = model.config.num_layers
    firsts = [int(s) for s in args.first_layers.split(",")]
    print(f"{len(examples)} rows in {len(batches)} length-sorted batches of {args.batch_size}; SmolLM2-135M, "
          f"{layers} layers; gradients of {args.params!r}, SRHT k={args.proj_dim}", flush=True)
    projector = Projector("srht", args.proj_dim, seed=0)

    results = {"rows": len(examples), "layers": layers, "params": args.params, "proj_dim": args.proj_dim,
               "runs": {}}
    shells, outputs = {}, {}
    for s in firsts:  # compile every batch length of every variant first
        shells[s] = PerExampleGradients(model, projector, GradientConfig(params=args.params, first_layer=s))
        outputs[s] = shells[s].run(batches, progress=False)
    seconds = {s: [] for s in firsts}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine hits every variant
        for s in firsts:
            t0 = time.perf_counter()
            shells[s].run(batches, progress=False)
            seconds[s].append(time.perf_counter() - t0)
    base = statistics.median(seconds[firsts[0]])
    for s in firsts:
        sec = statistics.median(seconds[s])
        run = {"seconds": sec, "all_seconds": seconds[s], "time_ratio": sec / base,
               # a full gradient is 1 forward and 2 backward layer passes per layer (dW and dx)
               "layer_passes_ratio": (layers + 2 * (layers - s)) / (3 * layers)}
        if s:  # the reference: the full backward pass, the layers below zeroed by the preconditioner
            ones = jax.tree.map(jnp.ones_like, shells[s].selected)
            ref = PerExampleGradients(model, projector, GradientConfig(params=args.params),
                                      precondition=layer_mask(ones, s)).run(batches, progress=False)
            run["max_abs_diff_vs_masked_full"] = float(np.abs(outputs[s] - ref).max())
        results["runs"][s] = run
        print(f"first_layer {s}: {sec:.2f} s ({run['time_ratio']:.3f} of first_layer {firsts[0]}; layer-pass "
              f"count {run['layer_passes_ratio']:.3f})", flush=True)

    print("\n| first layer | seconds | / all layers | layer passes / all layers' | max abs diff vs the full pass, "
          "masked |")
    print("|---:|---:|---:|---:|---:|")
    for s, r in results["runs"].items():
        diff = r.get("max_abs_diff_vs_masked_full")
        print(f"| {s} | {r['seconds']:.2f} | {r['time_ratio']:.3f} | {r['layer_passes_ratio']:.3f} | "
              f"{'-' if diff is None else f'{diff:.1e}'} |")
    print(f"\nmachine: {jax.devices()[0].platform}, jax {jax.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
