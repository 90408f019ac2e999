"""What reading and tokenizing a Tulu-size pool costs, next to the selection it feeds.

    python experiments/bench_tokenize.py [--rows 300000] [--max-length 1024] [--out FILE.jsonl]

Writes a Tulu V2-format JSONL pool of `rows` chat records (1-3 turns, long-tailed lengths: most
responses a few hundred words, some several thousand, as in Tulu V2's mixture of ShareGPT, FLAN,
code and science rows), then times `data.read_records` and the tokenization `idjax select` runs
(`stages.cached_tokenize` into an empty store: chat template, prompt masking, truncation, with the
embedded SmolLM2 tokenizer, one process, and the tokenized pool written to the store), then the same
call again, as a later selection on that store makes it (the records' fingerprint and reading the file).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from idjax import data as D
from idjax.models import load_tokenizer
from idjax.stages import cached_tokenize

WORDS = ("the of and to in is was for on that with as by at from it an be this are which or model data "
         "function return value number step answer question because therefore first then result").split()


def write_pool(path: Path, rows: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    with open(path, "w") as f:
        for i in range(rows):
            messages = []
            for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
                prompt = int(rng.lognormal(3.5, 0.8))                    # median ~33 words
                answer = int(min(rng.lognormal(5.0, 1.0), 6000))          # median ~150 words, long tail
                messages.append({"role": "user", "content": " ".join(rng.choice(vocab, max(prompt, 1)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choice(vocab, max(answer, 1)))})
            f.write(json.dumps({"id": f"tulu-{i}", "dataset": "synthetic", "messages": messages}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--out", default=None, help="keep the generated pool here (default: a temporary file)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as d:
        path = Path(args.out or Path(d) / "pool.jsonl")
        write_pool(path, args.rows)
        tokenizer = load_tokenizer("smollm2-135m")
        t = time.perf_counter()
        records = D.read_records(path)
        read_s = time.perf_counter() - t
        store = Path(d) / "store"
        t = time.perf_counter()
        examples, stats = cached_tokenize(records, tokenizer, max_length=args.max_length, source=str(path),
                                          directory=store)
        tok_s = time.perf_counter() - t
        t = time.perf_counter()
        D.records_fingerprint(records)
        fp_s = time.perf_counter() - t
        t = time.perf_counter()
        again, _ = cached_tokenize(records, tokenizer, max_length=args.max_length, source=str(path),
                                   directory=store)
        cached_s = time.perf_counter() - t
        assert D.examples_fingerprint(again) == D.examples_fingerprint(examples)
        tokens = sum(len(e.input_ids) for e in examples)
        print(json.dumps({"rows": args.rows, "bytes": path.stat().st_size, "read_s": round(read_s, 1),
                          "tokenize_s": round(tok_s, 1), "rows_per_s": round(args.rows / tok_s),
                          "cached_s": round(cached_s, 1), "records_fingerprint_s": round(fp_s, 1),
                          "store_bytes": sum(f.stat().st_size for f in store.iterdir()),
                          "tokens": tokens, "mean_tokens": round(tokens / len(examples), 1),
                          "truncated": stats.n_truncated, "kept": stats.n_kept}))


if __name__ == "__main__":
    main()
