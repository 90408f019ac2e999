"""What running the lm-head at the loss positions only saves (issue 19, waste 2).

The loss needs logits only where the next token carries loss (the response); the lm-head and the
cross-entropy ran at every position. A length-sorted batch now carries `loss_positions` (data.head_plan:
the most loss positions of its rows, rounded up to a quarter of its length, one count per padded length),
and grads.hidden_loss_sums gathers the hidden states there before the lm-head.

This script times, on the same length-sorted batches of the bundled pool in one process, with and without
the loss positions, the jitted core functions the passes run:
* per-example gradients (grads.per_example_gradients; --params, SRHT sketch of --proj-dim, normalised: the
  selection study's settings);
* the mean response-token losses (grads.sample_losses: the mid-PPL baseline's feature, evaluation).
Each batch runs both ways in turn, and its time is the fastest of --repeats calls after one that compiles
(summed over the batches), so a load change on the machine hits both alike. It counts the lm-head
positions and their FLOPs (2 V D each, forward), and checks that both ways give the same rows to float32
rounding.

    python experiments/bench_loss_positions.py                      # 64 rows at 128 tokens
    python experiments/bench_loss_positions.py --rows 128 --max-length 1024 --repeats 5
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import bench_pool  # the benchmarks' options and rows (and this checkout on sys.path)


def main(argv=None) -> int:
    ap = bench_pool.parser(__doc__)
    ap.add_argument("--chunk-rows", type=int, default=256, help="rows a resumable pass batches at a time")
    ap.add_argument("--tulu-rows", type=int, default=5000, help="Tulu-format rows for the loss-share table")
    args = ap.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from idjax import data as D
    from idjax.grads import per_example_gradients, sample_losses, split_params
    from idjax.sketch import Projector

    model, tok, examples = bench_pool.load(args)
    shares = loss_shares(tok, args.batch_size, args.chunk_rows, args.tulu_rows)
    pad = tok.pad_token_id or 0
    lengths = [len(e.input_ids) for e in examples]
    counts = [len(D.loss_positions(e.labels)) for e in examples]
    heads = D.head_plan(lengths, counts, args.batch_size, D.length_ladder(max(lengths)))
    batchings = {"every position (before)": D.sorted_batches(examples, args.batch_size, pad_id=pad, heads={}),
                 "loss positions (now)": D.sorted_batches(examples, args.batch_size, pad_id=pad, heads=heads)}
    print(f"{len(examples)} rows, {sum(lengths)} tokens, {sum(counts)} loss positions, in "
          f"{len(batchings['loss positions (now)'])} length-sorted batches of {args.batch_size}; heads {heads}",
          flush=True)
    graphdef, selected, rest = split_params(model, args.params)
    projector = Projector("srht", args.proj_dim, seed=0)

    @jax.jit
    def gradients(selected, rest, ids, mask, labels, positions):
        return per_example_gradients((graphdef, rest), ids, mask, labels, params=selected, projector=projector,
                                     normalize=True, loss_positions=positions)

    @jax.jit
    def losses(selected, rest, ids, mask, labels, positions):
        return sample_losses(nnx.merge(graphdef, selected, rest), ids, mask, labels, positions=positions)

    def arrays(b):
        return (selected, rest, b.input_ids, b.attention_mask, b.labels, b.loss_positions)

    names = list(batchings)
    pairs = list(zip(*batchings.values()))  # the same rows, batched both ways
    seconds = {(what, name): 0.0 for what in ("gradients", "losses") for name in names}
    out = {(what, name): [] for what in ("gradients", "losses") for name in names}
    for what, fn in (("gradients", gradients), ("losses", losses)):
        for pair in pairs:  # each batch both ways in turn, the fastest of --repeats after a compiling call
            best = [float("inf")] * len(pair)
            for i, b in enumerate(pair):
                out[what, names[i]].append(np.asarray(jax.block_until_ready(fn(*arrays(b))))[b.sample_mask])
            for _ in range(args.repeats):
                for i, b in enumerate(pair):
                    start = time.perf_counter()
                    jax.block_until_ready(fn(*arrays(b)))
                    best[i] = min(best[i], time.perf_counter() - start)
            for i, name in enumerate(names):
                seconds[what, name] += best[i]
    head_flops = 2 * model.config.vocab_size * model.config.hidden_size
    results = {}
    for name, batches in batchings.items():
        positions = sum(b.input_ids.shape[0] * (b.bucket - 1 if b.loss_positions is None
                                                else b.loss_positions.shape[1]) for b in batches)
        results[name] = {"lm_head_positions": positions, "loss_share": sum(counts) / positions,
                         "lm_head_forward_gflop": head_flops * positions / 1e9,
                         "gradients_s": seconds["gradients", name], "losses_s": seconds["losses", name]}
        print(name, json.dumps(results[name]), flush=True)
    diff = {what: float(max(np.abs(x - y).max() for x, y in zip(out[what, names[0]], out[what, names[1]])))
            for what in ("gradients", "losses")}
    print(f"largest difference between the two ways: {diff}")
    print("\n| lm-head at | positions | of them loss | lm-head forward GFLOP | gradients (s) | losses (s) |"
          "\n|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['lm_head_positions']} | {100 * r['loss_share']:.1f}% | {r['lm_head_forward_gflop']:.1f} "
              f"| {r['gradients_s']:.2f} | {r['losses_s']:.2f} |")
    first, second = (results[n] for n in names)
    print(f"\nnow / before: gradients {second['gradients_s'] / first['gradients_s']:.3f}, "
          f"losses {second['losses_s'] / first['losses_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "heads": {str(k): v for k, v in heads.items()},
                                               "results": results, "largest_difference": diff,
                                               "loss_shares": shares}, indent=1))
    return 0


def loss_shares(tok, batch_size: int, chunk_rows: int, tulu_rows: int) -> dict:
    """Loss positions / lm-head positions of whole sets in length-sorted batches (chunks of chunk_rows), at
    every position and at the planned loss positions: the bundled pool at 128 and 1024 tokens, and
    Tulu-format rows (experiments/bench_tokenize.py's generator) at 2048."""
    import tempfile

    from idjax import data as D

    from bench_tokenize import write_pool

    sets = {}
    for length in (128, 1024):
        records = D.read_records(bench_pool.ROOT / "idjax" / "assets" / "demo" / "pool.jsonl")
        sets[f"bundled pool at {length}"], _ = D.tokenize(records, tok, max_length=length, source="pool")
    with tempfile.TemporaryDirectory() as tmp:
        write_pool(Path(tmp) / "tulu.jsonl", tulu_rows)
        sets[f"{tulu_rows} Tulu-format rows at 2048"], _ = D.tokenize(
            D.read_records(Path(tmp) / "tulu.jsonl"), tok, max_length=2048, source="tulu")
    out = {}
    print("\n| set | loss positions / tokens | of the lm-head's positions: at every one | at the loss positions "
          "| padded lengths (one head each) |\n|---|---:|---:|---:|---:|")
    for name, examples in sets.items():
        lengths = [len(e.input_ids) for e in examples]
        counts = [len(D.loss_positions(e.labels)) for e in examples]
        ladder = D.length_ladder(max(lengths))
        heads = D.head_plan(lengths, counts, batch_size, ladder, chunk_rows=chunk_rows)
        every = {length: length - 1 for length in heads}
        row = {"loss_per_token": sum(counts) / sum(lengths),
               "every_position": D.head_fraction(lengths, counts, batch_size, ladder, every, chunk_rows=chunk_rows),
               "loss_positions": D.head_fraction(lengths, counts, batch_size, ladder, heads, chunk_rows=chunk_rows),
               "lengths": len(heads), "shortened": sum(h < length - 1 for length, h in heads.items())}
        out[name] = row
        print(f"| {name} | {100 * row['loss_per_token']:.1f}% | {100 * row['every_position']:.1f}% | "
              f"{100 * row['loss_positions']:.1f}% | {len(heads)} ({row['shortened']} shortened) |", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
