"""The `idjax` command.

Every subcommand reports bad input as one line on stderr and a non-zero exit (2 for usage errors,
1 for bad files or checkpoints); --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter

log = logging.getLogger("idjax")


def _add_model(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="HF checkpoint directory, .gguf file, or an embedded name (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and compute dtype (logits are float32 either way)")


def cmd_chat(args) -> int:
    from idjax import models

    model, tok = models.load(args.model, dtype=args.dtype)
    answers = models.chat(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    for q, a in zip(args.prompt, answers):
        print(json.dumps({"prompt": q, "answer": a}, ensure_ascii=False))
    return 0


def cmd_convert(args) -> int:
    from idjax import models

    model, tok = models.load(args.model, dtype=args.dtype)
    out = models.save(model, args.out, tok)
    print(json.dumps({"saved": str(out), "model_type": model.config.model_type,
                      "parameters": model.config.num_params}))
    return 0


def cmd_data(args) -> int:
    from idjax import data, models

    records = data.read_records(args.file, limit=args.limit)
    tok = models.load_tokenizer(args.model)
    examples, stats = data.tokenize(records, tok, max_length=args.max_length, source=str(args.file))
    buckets = data.default_buckets(args.max_length)
    per_bucket = Counter(data.bucket_for(len(e.input_ids), buckets) for e in examples)
    trained = sum(int((e.labels != -100).sum()) for e in examples)
    print(json.dumps({
        "file": str(args.file),
        "records": stats.n_records,
        "kept": stats.n_kept,
        "truncated": stats.n_truncated,
        "skipped_no_response": len(stats.skipped_no_response),
        "response_tokens": trained,
        "tokens": sum(len(e.input_ids) for e in examples),
        "buckets": {str(k): per_bucket[k] for k in sorted(per_bucket)},
        "tasks": dict(Counter(r["task"] for r in records if r.get("task"))),
    }))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idjax", description=__import__("idjax").__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="greedy answers from a model (checks a checkpoint loads and works)")
    _add_model(p)
    p.add_argument("prompt", nargs="+", help="one or more user messages")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="write a model (e.g. a GGUF file) as an HF safetensors directory")
    _add_model(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("data", help="validate and tokenize a chat JSONL/Parquet/HF dataset; print statistics")
    _add_model(p)
    p.add_argument("file", help="JSONL, Parquet, or a local HF datasets directory")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("jax", "absl", "transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("idjax: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # DataError, CheckpointError, UnsupportedModelError are ValueErrors
        if args.debug:
            raise
        print(f"idjax: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
