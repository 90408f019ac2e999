"""What per-example gradients sketched layer by layer cost and save (issue 18, memory-aware compute).

`per_example_gradients(layerwise=True)` (GradientConfig.layerwise, the memory planner's fallback) runs the
layers forward once keeping each one's input, then a reverse scan takes one layer's vjp at a time and
sketches that layer's gradient at once: one layer's gradient per sample in flight instead of the whole
model's, for one more forward pass. This script runs both on the same length-sorted batches of the
bundled pool in one process (interleaved repeats), checks that they give the same rows, and reads the
compiler's memory analysis of one batch's program for each.

    python experiments/bench_layerwise.py                     # all parameters, 32 rows, microbatch 8
    python experiments/bench_layerwise.py --params down_proj --rows 64 --repeats 3
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import bench_pool  # the benchmarks' options and rows (and this checkout on sys.path)


def main(argv=None) -> int:
    ap = bench_pool.parser(__doc__, params="", rows=32, repeats=2)
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from idjax import data as D
    from idjax.grads import GradientConfig, PerExampleGradients, per_example_gradients
    from idjax.sketch import Projector

    model, tok, examples = bench_pool.load(args)
    batches = D.sorted_batches(examples, args.batch_size, pad_id=tok.pad_token_id or 0)
    projector = Projector("srht", args.proj_dim, seed=0)
    params = args.params or None
    print(f"{len(examples)} rows in {len(batches)} length-sorted batches of {args.batch_size}; SmolLM2-135M; "
          f"gradients of {params or 'every parameter'}, SRHT k={args.proj_dim}, microbatch {args.batch_size}",
          flush=True)
    variants = {"whole": False, "layer by layer": True}
    shells, outputs = {}, {}
    for name, layerwise in variants.items():  # compile every batch length first
        config = GradientConfig(params=params, microbatch=args.batch_size, layerwise=layerwise)
        shells[name] = PerExampleGradients(model, projector, config)
        outputs[name] = shells[name].run(batches, progress=False)
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine hits both
        for name in variants:
            t0 = time.perf_counter()
            shells[name].run(batches, progress=False)
            seconds[name].append(time.perf_counter() - t0)

    longest = max(batches, key=lambda b: b.input_ids.shape[1])
    graphdef, state = nnx.split(model)
    arrays = [jax.numpy.asarray(x) for x in (longest.input_ids, longest.attention_mask, longest.labels,
                                            longest.loss_positions)]
    results = {"rows": len(examples), "params": params, "proj_dim": args.proj_dim, "microbatch": args.batch_size,
               "longest_batch": list(longest.input_ids.shape), "runs": {}}
    for name, layerwise in variants.items():
        fn = jax.jit(lambda st, i, m, lab, pos, lw=layerwise: per_example_gradients(
            (graphdef, st), i, m, lab, params=params, projector=projector, normalize=True,
            microbatch=args.batch_size, loss_positions=pos, layerwise=lw))
        mem = fn.lower(state, *arrays).compile().memory_analysis()
        sec = statistics.median(seconds[name])
        results["runs"][name] = {"seconds": sec, "all_seconds": seconds[name],
                                 "temp_bytes_longest_batch": int(mem.temp_size_in_bytes)}
    base = results["runs"]["whole"]
    for name, run in results["runs"].items():
        run["time_ratio"] = run["seconds"] / base["seconds"]
        run["temp_ratio"] = run["temp_bytes_longest_batch"] / base["temp_bytes_longest_batch"]
        print(f"{name}: {run['seconds']:.2f} s ({run['time_ratio']:.3f} of whole), temporaries of the "
              f"{results['longest_batch']} batch {run['temp_bytes_longest_batch'] / 2**30:.3f} GiB "
              f"({run['temp_ratio']:.3f})", flush=True)
    diff = float(np.abs(outputs["whole"] - outputs["layer by layer"]).max())
    results["max_abs_diff"] = diff
    print(f"max |whole - layer by layer| over the rows: {diff:.2e} (rows are unit vectors)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
