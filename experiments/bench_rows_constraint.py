"""Where XLA's partitioner puts a JVP embedding's activations on an FSDP mesh, and what constraining them to
be split by rows would change (compile-time memory, issue 18's plans; nothing runs).

idjax's model carries no sharding constraint: on a ("data", "fsdp") mesh the batch comes in split by rows
and the weights split on their hidden axis, and XLA's SPMD partitioner chooses the rest. For the JVP
embedding of a 7-8B model at 2048 tokens it keeps the weights where they are and shards the matmuls'
contraction axis instead, so every device holds the whole batch's float32 activations and all-reduces
them: the plan's bytes per device grow with the number of devices (1 row per device). This script compiles
the plan's embedding program (plan.plan's "embed" stage: jvp_embeddings of the first 4 blocks, 2 tangents)
twice for each setting, once as idjax does today and once with every decoder layer's output constrained to
be split by rows over the mesh (jax.lax.with_sharding_constraint, under jax.set_mesh; added here by
wrapping DecoderLayer.__call__, not in the library), and prints the compiler's bytes per device
(memory.compiled_bytes: arguments + outputs + temporaries - aliased) for both.

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
    from jax.sharding import PartitionSpec as P

    from idjax import embed as E
    from idjax import grads as G
    from idjax import memory, models, plan
    from idjax import sharding as shd
    from idjax.models import modeling

    plain_call = modeling.DecoderLayer.__call__

    def rows_call(self, x, *a, **k):  # the layer's output split by rows over the ambient mesh, if any
        h, cache = plain_call(self, x, *a, **k)
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and h.shape[0] % mesh.size == 0:
            h = jax.lax.with_sharding_constraint(h, P(shd.ROWS, *([None] * (h.ndim - 1))))
        return h, cache

    modeling.DecoderLayer.__call__ = rows_call
    rows = []
    print("| model | devices | tokens | blocks | as today: GiB per device | activations split by rows | ratio |")
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
        for way in ("today", "rows"):
            t0 = time.perf_counter()
            if way == "rows":
                with jax.set_mesh(mesh):
                    compiled = fn.lower(state, tangents, batch, batch, batch).compile()
            else:  # no ambient mesh: the wrapper adds nothing, the program is idjax's
                compiled = fn.lower(state, tangents, batch, batch, batch).compile()
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
