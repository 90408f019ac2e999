"""Where XLA's partitioner puts a JVP embedding's activations on an FSDP mesh, and what splitting them by rows
changes (compile-time memory, issues 18 and 19; nothing runs).

On a ("data", "fsdp") mesh the batch comes in split by rows and the weights split on their hidden axis; left
to itself, XLA's SPMD partitioner may keep the weights in place and shard the matmuls' contraction axis, so
every device holds the whole batch's float32 activations and all-reduces them. Under jax.set_mesh the model
constrains its residual stream to be split by rows (sharding.constrain_rows), and the partitioner all-gathers
the weights instead. This script compiles the plan's embedding program (jvp_embeddings of the first blocks, 2
tangents, 1 row per device) both ways (sharding.ROW_LAYOUTS, as JVPEmbedder and `idjax plan` do) and prints
the compiler's bytes per device (memory.compiled_bytes) for each.

    python experiments/bench_rows_constraint.py                      # forces 16 CPU devices
    python experiments/bench_rows_constraint.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"

CONFIGS = ROOT / "tests" / "fixtures" / "configs"
#: (config, devices, tokens, blocks): the plan table's embed rows, and shorter or shallower programs
SETTINGS = [("llama-3.1-8b", 8, 2048, 4), ("llama-3.1-8b", 16, 2048, 4), ("llama-3.1-8b", 16, 512, 4),
            ("qwen2.5-7b", 8, 2048, 4), ("qwen2.5-7b", 16, 2048, 4),
            ("llama-3.1-8b", 8, 512, 4), ("llama-3.1-8b", 8, 128, 4), ("llama-3.1-8b", 8, 1024, 2)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from idjax import embed as E
    from idjax import grads as G
    from idjax import memory, models, plan
    from idjax import sharding as shd

    rows = []
    print("| model | devices | tokens | blocks | the partitioner's layout: GiB per device | activations split by rows "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, devices, tokens, blocks in SETTINGS:
        config = dataclasses.replace(models.load_config(CONFIGS / f"{name}.json"), num_layers=blocks)
        mesh = shd.make_mesh(1, devices, devices=jax.devices()[:devices])
        graphdef, state = plan.abstract_model_state(config, mesh, "bfloat16")
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2, *x.shape), x.dtype),
                              G.split_params((graphdef, state), None)[1])  # K = 2 tangents
        tangents = shd.abstract_arrays(shapes, shd.param_shardings(shapes, mesh, lead=1))
        batch = jax.ShapeDtypeStruct((devices, tokens), jnp.int32, sharding=shd.row_sharding(mesh, 2))
        fn = jax.jit(lambda st, t, ids, mask, labels: E.jvp_embeddings((graphdef, st), ids, mask, labels,
                                                                      tangents=t))
        got = {}
        for way, split in zip(("today", "rows"), (split for _, split in shd.ROW_LAYOUTS)):
            t0 = time.perf_counter()
            compiled = shd.lower_in_layout(fn, (state, tangents, batch, batch, batch), mesh, split)
            got[way] = memory.compiled_bytes(compiled) / 2**30
            got[f"{way}_compile_s"] = round(time.perf_counter() - t0, 1)
        rows.append({"model": name, "devices": devices, "tokens": tokens, "blocks": blocks, **got})
        print(f"| {name} | {devices} | {tokens} | {blocks} | {got['today']:.2f} | {got['rows']:.2f} | "
              f"{got['rows'] / got['today']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
