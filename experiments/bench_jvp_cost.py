"""What a JVP embedding costs against its own limit (issue 19, waste 4).

A JVP embedding runs the first B decoder blocks once for the primal and, for each of K tangents, a tangent
pass: every matmul y = W x gets dy = dW x + W dx, two matmuls. Its limit is therefore (1 + 2K) primal
passes of B blocks, (1 + 2K) * primal / full of the full forward pass that RDS+ features take (no lm-head in
either), where primal / full is the ratio of the compiler's FLOP counts: B / layers, less the last block's
work at every position but the last token's (CausalLM.hidden_states(queries=)). This script times, on the
same length-sorted batches in one process:

* the full forward pass to the final hidden states (what RDS+ computes);
* the primal of the truncated model alone (the pooled features, no tangent);
* JVP embeddings (idjax.embed.jvp_embeddings, the default EmbedConfig otherwise) with K = 1, 2, 4 tangents,
  and with K = 2 over the decoder blocks' parameters only (no tangent on the embedding table);
* the default JVP embedding as it was before hidden_states(queries=): the last block at every position;

each as its compiled XLA program, with the compiler's own FLOP count (cost_analysis) next to the seconds, so
that the measured cost can be split into "more FLOPs than the count" and "the same FLOPs run slower".

    python experiments/bench_jvp_cost.py                  # 64 bundled rows, max 128 tokens, batch 8
    python experiments/bench_jvp_cost.py --rows 128 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compiled_flops(compiled) -> float | None:
    """The compiler's FLOP count of one compiled call (cost_analysis is a dict or a list of one dict)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def time_program(name: str, fn, args_per_batch, repeats: int, flops: float | None) -> dict:
    """Compile fn for every batch shape, then time `repeats` passes over all batches; median seconds.
    flops: the program's FLOPs over all batches (scan_flops / depth_flops), reported next to the time."""
    import jax

    jitted = jax.jit(fn)
    compiled = {}
    shape = lambda args: args[-1].shape  # noqa: E731 (the batch's [B, L]; the rest is the same for every batch)
    for args in args_per_batch:
        if shape(args) not in compiled:
            compiled[shape(args)] = jitted.lower(*args).compile()
    for args in args_per_batch:  # warm: the first run of an executable allocates
        jax.block_until_ready(compiled[shape(args)](*args))
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for args in args_per_batch:
            jax.block_until_ready(compiled[shape(args)](*args))
        seconds.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(seconds), "all_seconds": seconds, "flops": flops}
    print(f"{name}: {out['seconds']:.2f} s, compiler count {flops / 1e9 if flops else float('nan'):.1f} GFLOP",
          flush=True)
    return out


def counts(fn, args_per_batch) -> list:
    """The compiler's FLOP count of fn for each batch (one compilation per batch shape)."""
    import jax

    jitted, seen = jax.jit(fn), {}
    for args in args_per_batch:
        if args[-1].shape not in seen:
            seen[args[-1].shape] = compiled_flops(jitted.lower(*args).compile())
    return [seen[args[-1].shape] for args in args_per_batch]


def scan_flops(fn, args_per_batch, trips: int) -> float | None:
    """FLOPs of a program whose layers all run under one lax.scan: the compiler counts a loop's body once,
    so its count times the trips (the embedding lookup and the norm outside the loop are noise)."""
    c = counts(fn, args_per_batch)
    return None if None in c else sum(c) * trips


def depth_flops(make, args_per_batch, blocks: int) -> float | None:
    """FLOPs of a program over the first `blocks` blocks whose last block runs apart from the scan of the
    others (CausalLM.hidden_states(queries=), the last-token features): c(1) + (blocks - 1) (c(2) - c(1)),
    from the compiler's counts of the same program at depth 1 (the last block alone) and at depth 2 (one
    scanned block, counted once, and the last). make(depth) -> (fn, leading args)."""
    per_depth = {}
    for depth in (1, 2):
        fn, lead = make(depth)
        per_depth[depth] = counts(fn, [(*lead, *x) for x in args_per_batch])
    if None in per_depth[1] + per_depth[2]:
        return None
    return sum(c1 + (blocks - 1) * (c2 - c1) for c1, c2 in zip(per_depth[1], per_depth[2]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="first rows of the bundled pool")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from idjax import data as D
    from idjax import demo, models
    from idjax.configs import EmbedConfig
    from idjax.embed import jvp_embeddings, pooled_features, random_tangents, truncate
    from idjax.grads import split_params

    cfg = EmbedConfig()
    model, tok = models.load(demo.MODEL)
    records = D.read_records(ROOT / "idjax" / "assets" / "demo" / "pool.jsonl", limit=args.rows)
    examples, _ = D.tokenize(records, tok, max_length=args.max_length, source="pool")
    batches = D.sorted_batches(examples, args.batch_size, pad_id=tok.pad_token_id or 0)
    real_tokens = sum(int(b.attention_mask.sum()) for b in batches)
    rows = len(examples)
    layers, blocks = model.config.num_layers, cfg.num_blocks
    print(f"{rows} rows, {real_tokens} real tokens in {len(batches)} length-sorted batches of {args.batch_size}; "
          f"SmolLM2-135M, {layers} layers, JVP of the first {blocks}", flush=True)

    full_def, full_state = nnx.split(model)
    inputs = [(jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask)) for b in batches]

    def full_forward(state, ids, mask):  # RDS+'s pass: the final hidden states, no lm-head
        hidden, _ = nnx.merge(full_def, state).hidden_states(ids, mask)
        return hidden.astype(jnp.float32).mean(axis=1)

    def primal_program(depth):
        short_def, short_state = nnx.split(truncate(model, depth))

        def primal(state, ids, mask):
            return pooled_features(nnx.merge(short_def, state), ids, mask, None, cfg.pooling)

        return primal, (short_state,)

    def jvp_program(params, k, depth):
        short_def, short_state = nnx.split(truncate(model, depth))
        _, selected, _ = split_params((short_def, short_state), params)
        tangents = random_tangents(selected, k, cfg.seed)

        def embed(state, tangents, ids, mask):
            return jvp_embeddings((short_def, state), ids, mask, None, tangents=tangents, params=params,
                                  pooling=cfg.pooling)

        return embed, (short_state, tangents)

    results = {"rows": rows, "real_tokens": real_tokens, "layers": layers, "blocks": blocks,
               "batch_size": args.batch_size, "max_length": args.max_length, "programs": {}}
    programs = results["programs"]
    full_args = [(full_state, *x) for x in inputs]
    programs["full forward (RDS+)"] = time_program(
        "full forward (RDS+)", full_forward, full_args, args.repeats, scan_flops(full_forward, full_args, layers))
    variants = [("primal, truncated", primal_program, 1)]
    variants += [(f"JVP, K = {k}", lambda d, k=k: jvp_program(None, k, d), 1 + 2 * k) for k in (1, 2, 4)]
    variants += [("JVP, K = 2, decoder blocks only", lambda d: jvp_program("layers", 2, d), 5)]
    for name, make, passes in variants:
        fn, lead = make(blocks)
        programs[name] = time_program(name, fn, [(*lead, *x) for x in inputs], args.repeats,
                                      depth_flops(make, inputs, blocks))
        programs[name]["passes"] = passes  # the limit, in primal passes

    # Before hidden_states(queries=): the last block at every position, then the last token's row.
    short_def, selected, rest = split_params(truncate(model, blocks), None)
    tangents = random_tangents(selected, cfg.num_tangents, cfg.seed)

    def every_position(selected, tangents, ids, mask):
        last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)

        def f(p):
            hidden, _ = nnx.merge(short_def, p, rest).hidden_states(ids, mask)
            return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]

        return jax.vmap(lambda v: jax.jvp(f, (selected,), (v,))[1])(tangents)

    name = f"JVP, K = {cfg.num_tangents}, last block at every position (before)"
    full_positions = [(selected, tangents, *x) for x in inputs]
    programs[name] = time_program(name, every_position, full_positions, args.repeats,
                                  scan_flops(every_position, full_positions, blocks))
    programs[name]["passes"] = 1 + 2 * cfg.num_tangents

    # The same rows through the shells the selection uses: what the pipeline's stages cost, host included.
    from idjax.baselines import sample_features
    from idjax.embed import JVPEmbedder

    embedder = JVPEmbedder(model, cfg)
    stages = results["stages"] = {}
    for name, run in (("RDS+ features (baselines.sample_features)", lambda: sample_features(model, examples, "rds")),
                      ("JVP embeddings (JVPEmbedder.run)", lambda: embedder.run(batches, progress=False))):
        run()  # compiles
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - t0)
        stages[name] = statistics.median(seconds)
        print(f"{name}: {stages[name]:.2f} s", flush=True)

    full = programs["full forward (RDS+)"]
    base = programs["primal, truncated"]
    print("\n| program | seconds | / primal | limit / primal | / full forward | limit / full | "
          "compiler GFLOP | FLOPs / primal's | GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")

    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    for name, p in programs.items():
        limit = p.get("passes")
        p["per_primal"] = p["seconds"] / base["seconds"]
        p["per_full"] = p["seconds"] / full["seconds"]
        p["limit_per_full"] = None if limit is None else limit * base["flops"] / full["flops"]
        p["flops_per_primal"] = None if not (p["flops"] and base["flops"]) else p["flops"] / base["flops"]
        p["gflop_per_s"] = None if not p["flops"] else p["flops"] / p["seconds"] / 1e9
        print(f"| {name} | {p['seconds']:.2f} | {p['per_primal']:.2f} | {fmt(limit, 'd')} | {p['per_full']:.3f} | "
              f"{fmt(p['limit_per_full'], '.3f')} | {fmt(p['flops'] and p['flops'] / 1e9, '.1f')} | "
              f"{fmt(p['flops_per_primal'])} | {fmt(p['gflop_per_s'], '.1f')} |")
    rds, jvp = stages.values()
    limit = programs[f"JVP, K = {cfg.num_tangents}"]["passes"] * base["flops"] / full["flops"]
    results["stage_ratio"], results["stage_limit"] = jvp / rds, limit
    print(f"\nstages: JVP embeddings / RDS+ features = {jvp / rds:.3f} (limit {limit:.3f})")
    print(f"\nmachine: {jax.devices()[0].platform}, jax {jax.__version__}; numpy {np.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
