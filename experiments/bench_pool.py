"""What the gradient-stage benchmarks share: their options, and the bundled pool's first rows tokenized."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_arguments(ap) -> None:
    """--rows, --max-length, --batch-size, --params, --proj-dim, --repeats: the selection study's settings."""
    ap.add_argument("--rows", type=int, default=64, help="first rows of the bundled pool")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--params", default="down_proj")
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)


def load(args):
    """(model, tokenizer, examples): the embedded SmolLM2-135M and the bundled pool's first --rows rows."""
    from idjax import data as D
    from idjax import demo, models

    model, tok = models.load(demo.MODEL)
    records = D.read_records(ROOT / "idjax" / "assets" / "demo" / "pool.jsonl", limit=args.rows)
    examples, _ = D.tokenize(records, tok, max_length=args.max_length, source="pool")
    return model, tok, examples
