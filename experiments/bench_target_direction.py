"""What the target direction v = g_T - eta H_T b costs in one pass against a gradient and a product apart
(issue 19).

hessian.target_direction now takes g_T and H_T b from one jvp of the gradient (exact Hessian) or, when the
offset is not needed, g_T - eta G b from one linearisation (Gauss-Newton, gauss_newton_vp(gradient_minus=)).
This script times those against the gradient and the product as two compiled calls (what it did before),
on the same target batches in one process, interleaved, and checks that they give the same v.

    python experiments/bench_target_direction.py            # the bundled pool's first 16 rows, down_proj
    python experiments/bench_target_direction.py --rows 32 --repeats 3
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

import bench_pool  # the benchmarks' options and rows (and this checkout on sys.path)


def main(argv=None) -> int:
    ap = bench_pool.parser(__doc__, rows=16, repeats=2)
    ap.add_argument("--eta", type=float, default=5e-5)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from idjax import data as D
    from idjax import hessian as H
    from idjax.grads import split_params

    model, tok, examples = bench_pool.load(args)
    batches = D.sorted_batches(examples, args.batch_size, pad_id=tok.pad_token_id or 0)
    graphdef, selected, rest = split_params(model, args.params)
    shift = jax.tree.map(lambda x: jnp.full(x.shape, 1e-3, jnp.float32), selected)
    targets = H.target_arrays(batches)
    print(f"{len(examples)} target rows in {len(batches)} batches; SmolLM2-135M, {args.params}, eta {args.eta}",
          flush=True)

    @functools.partial(jax.jit, static_argnums=0)
    def gradient(graphdef, selected, rest, targets):
        return H.target_gradient((graphdef, rest), targets, params=selected)

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def product(graphdef, kind, selected, rest, targets, shift):
        vectors = jax.tree.map(lambda x: x[None], shift)
        return jax.tree.map(lambda x: x[0], H.hessian_products((graphdef, rest), targets, vectors, params=selected,
                                                                kind=kind))

    def apart(kind):  # before: a gradient call, then a product call
        g = gradient(graphdef, selected, rest, targets)
        hb = product(graphdef, kind, selected, rest, targets, shift)
        return jax.tree.map(lambda a, b: a - args.eta * b, g, hb)

    def one_pass(kind, offset):
        return H.target_direction(model, batches, args.params, shift=shift, eta=args.eta, hessian=kind,
                                  offset=offset)[0]

    variants = {
        "Gauss-Newton: gradient and product apart (before)": lambda: apart("gauss-newton"),
        "Gauss-Newton: with the offset (one program)": lambda: one_pass("gauss-newton", True),
        "Gauss-Newton: one linearisation, no offset (mean scores)": lambda: one_pass("gauss-newton", False),
        "exact: gradient and product apart (before)": lambda: apart("exact"),
        "exact: one jvp of the gradient": lambda: one_pass("exact", True),
    }
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])  # noqa: E731
    values = {name: flat(jax.block_until_ready(fn())) for name, fn in variants.items()}  # compiles
    seconds = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            seconds[name].append(time.perf_counter() - t0)
    print("\n| variant | seconds (median) | all | max abs difference of v from the kind's 'apart' |")
    print("|---|---:|---|---:|")
    for name in variants:
        ref = values[[n for n in variants if n.startswith(name.split(":")[0]) and "apart" in n][0]]
        diff = float(np.max(np.abs(values[name] - ref)))
        print(f"| {name} | {statistics.median(seconds[name]):.2f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds[name])} | {diff:.1e} |")
    print(f"\nmachine: {jax.devices()[0].platform}, jax {jax.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
