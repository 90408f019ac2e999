"""The Hadamard transform of the SRHT sketch: log2(n) butterfly passes against three small matmuls.

sketch.fwht computes x @ H_n / sqrt(n) (Sylvester order) as three matmuls over the axes of
x.reshape(..., a, b, c), H_n = H_a (x) H_b (x) H_c. Before, it ran log2(n) butterfly passes (the function
`butterflies` below, kept here as the reference). This times both, jitted, on the shape the gradient stage
transforms (a microbatch of down_proj gradients of SmolLM2-135M: 26.5M coordinates per row, in blocks of
2^14), and reports the largest difference.

    python experiments/bench_fwht.py                    # 8 rows x 1620 blocks of 16384
    python experiments/bench_fwht.py --rows 2 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def butterflies(x):
    """The earlier fwht: log2(n) passes, each pairing the entries h apart."""
    import jax.numpy as jnp

    n, lead, h = x.shape[-1], x.shape[:-1], 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2).reshape(*lead, n)
        h *= 2
    return x * (1.0 / math.sqrt(n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=1620, help="Hadamard blocks per row (1620: 26.5M coordinates)")
    ap.add_argument("--block-size", type=int, default=2**14)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from idjax.sketch import fwht

    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.rows, args.blocks, args.block_size)), jnp.float32)
    seconds, out = {}, {}
    for name, fn in (("butterfly passes (before)", butterflies), ("three matmuls (now)", fwht)):
        jitted = jax.jit(fn)
        out[name] = jax.block_until_ready(jitted(x))  # compiles
        start = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(jitted(x))
        seconds[name] = (time.perf_counter() - start) / args.repeats
    before, now = seconds.values()
    diff = float(jnp.abs(out["butterfly passes (before)"] - out["three matmuls (now)"]).max())
    print(f"{args.rows} rows x {args.blocks} blocks of {args.block_size} ({args.blocks * args.block_size:,} "
          f"coordinates per row), mean of {args.repeats} calls after a compiling one; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}\n\n| transform | seconds |\n|---|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} |")
    print(f"\nnow / before: {now / before:.3f}; largest difference {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
