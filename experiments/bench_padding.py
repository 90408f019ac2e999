"""How much of the computed tokens are real (issue 19): power-of-two buckets against length-sorted batches.

The resumable selection passes batch each chunk of `--chunk-rows` rows on its own. Before, each chunk's rows
were grouped into power-of-two length buckets (make_batches with example_buckets(tight=True)); now they are
sorted by length and cut into consecutive batches, each padded to the smallest length of a finer ladder
(data.sorted_batches, data.length_ladder). Counted from the lengths alone (data.real_token_fraction), on:

* the bundled pool (idjax/assets/demo/pool.jsonl), tokenized as the demo does, at --max-length;
* Tulu V2-format rows with long-tailed lengths (experiments/bench_tokenize.py's generator, --tulu-rows rows),
  tokenized at --long-max-length;
* a long-tailed length distribution: log-normal token counts (median --median, sigma --sigma), cut at
  --long-max-length, --rows rows (instruction pools such as Tulu V2 have this shape).

    python experiments/bench_padding.py
    python experiments/bench_padding.py --time-embed 256   # also time JVP embeddings of 256 bundled rows

--time-embed N: the seconds of idjax's JVP embeddings (JVPEmbedder, the default EmbedConfig) of the bundled
pool's first N rows at --max-length, batched both ways, each twice (the first call compiles its shapes), in
one process; and the largest difference between the two batchings' embeddings (the maths is unchanged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))


def fractions(lengths, batch_size: int, chunk_rows: int) -> dict:
    from idjax import data as D

    longest = int(max(lengths))
    out = {"power-of-two buckets (before)": {
        "real_token_fraction": D.real_token_fraction(lengths, batch_size, None, chunk_rows=chunk_rows),
        "shapes": len(D.default_buckets(longest, min_length=min(64, longest)))}}
    for steps in (2, 4):
        ladder = D.length_ladder(longest, steps_per_octave=steps)
        out[f"sorted, {steps} lengths per octave" + (" (now)" if steps == 4 else "")] = {
            "real_token_fraction": D.real_token_fraction(lengths, batch_size, ladder, chunk_rows=chunk_rows),
            "shapes": len(ladder)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=1024, help="bundled pool truncation")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--tulu-rows", type=int, default=20_000)
    ap.add_argument("--median", type=float, default=300.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--long-max-length", type=int, default=2048)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--time-embed", type=int, default=0, metavar="N", help="time JVP embeddings of N bundled rows")
    args = ap.parse_args(argv)

    from idjax import data as D
    from idjax import demo, models

    tok = models.load_tokenizer(models.resolve(demo.MODEL))
    records = D.read_records(ROOT / "idjax" / "assets" / "demo" / "pool.jsonl")
    pool, _ = D.tokenize(records, tok, max_length=args.max_length, source="pool")
    import tempfile

    from bench_tokenize import write_pool

    with tempfile.TemporaryDirectory() as tmp:
        write_pool(Path(tmp) / "tulu.jsonl", args.tulu_rows)
        tulu, _ = D.tokenize(D.read_records(Path(tmp) / "tulu.jsonl"), tok, max_length=args.long_max_length,
                             source="tulu")
    rng = np.random.default_rng(0)
    long_tail = np.clip(np.round(rng.lognormal(np.log(args.median), args.sigma, args.rows)), 8,
                        args.long_max_length).astype(np.int64)
    sets = {f"bundled pool ({len(pool)} rows, max {args.max_length})": [len(e.input_ids) for e in pool],
            f"Tulu-format rows ({len(tulu)} rows, max {args.long_max_length})": [len(e.input_ids) for e in tulu],
            f"log-normal (median {args.median:g}, sigma {args.sigma:g}, {args.rows} rows, max "
            f"{args.long_max_length})": long_tail}
    results = {name: fractions(lengths, args.batch_size, args.chunk_rows) for name, lengths in sets.items()}
    print(f"batch {args.batch_size}, chunks of {args.chunk_rows} rows\n")
    print("| lengths | batching | real tokens / computed tokens | compiled lengths |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        for scheme, r in rows.items():
            print(f"| {name} | {scheme} | {r['real_token_fraction']:.1%} | {r['shapes']} |")
    if args.time_embed:
        results["timed"] = time_embeddings(pool[:args.time_embed], args.batch_size, tok.pad_token_id or 0)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def time_embeddings(examples, batch_size: int, pad_id: int) -> dict:
    import time

    from idjax import data as D
    from idjax import demo, models
    from idjax.embed import EmbedConfig, JVPEmbedder

    model, _ = models.load(demo.MODEL, tokenizer=False)
    embedder = JVPEmbedder(model, EmbedConfig())
    longest = max(len(e.input_ids) for e in examples)
    batchings = {
        "power-of-two buckets (before)": lambda: D.make_batches(
            examples, batch_size, D.default_buckets(longest, min_length=min(64, longest)), pad_id=pad_id),
        "length-sorted, 4 lengths per octave (now)": lambda: D.sorted_batches(examples, batch_size, pad_id=pad_id)}
    out, embeddings = {}, {}
    print(f"\nJVP embeddings of {len(examples)} bundled rows (longest {longest} tokens), batch {batch_size}:\n")
    print("| batching | real tokens / computed | first call, with compilation (s) | second call (s) |")
    print("|---|---|---|---|")
    for name, make in batchings.items():
        batches = make()
        seconds = []
        for _ in range(2):
            t0 = time.perf_counter()
            embeddings[name] = embedder.run(batches, progress=False)
            seconds.append(time.perf_counter() - t0)
        real = sum(int(b.attention_mask.sum()) for b in batches) / sum(b.input_ids.size for b in batches)
        out[name] = {"real_token_fraction": real, "first_s": seconds[0], "second_s": seconds[1]}
        print(f"| {name} | {real:.1%} | {seconds[0]:.1f} | {seconds[1]:.1f} |", flush=True)
    a, b = embeddings.values()
    out["max_abs_difference"] = float(np.abs(a - b).max())
    print(f"\nlargest difference between the two batchings' embeddings: {out['max_abs_difference']:.2e} "
          f"(largest entry {float(np.abs(a).max()):.2e})")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
