"""What the benchmarks share: the gradient-stage benchmarks' options, the bundled pool's first rows tokenized,
and a clock of JAX's compile time per pipeline stage."""

from __future__ import annotations

import argparse
import collections
import logging
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # idjax from this checkout, installed or not
    sys.path.insert(0, str(ROOT))


def add_arguments(ap) -> None:
    """--rows, --max-length, --batch-size, --params, --proj-dim, --repeats: the selection study's settings."""
    ap.add_argument("--rows", type=int, default=64, help="first rows of the bundled pool")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--params", default="down_proj")
    ap.add_argument("--proj-dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)


def parser(doc: str, **defaults) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring's first line, add_arguments' options (with `defaults`) and --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(ap)
    ap.set_defaults(**defaults)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    return ap


def load(args):
    """(model, tokenizer, examples): the embedded SmolLM2-135M and the bundled pool's first --rows rows."""
    from idjax import data as D
    from idjax import demo, models

    model, tok = models.load(demo.MODEL)
    records = D.read_records(ROOT / "idjax" / "assets" / "demo" / "pool.jsonl", limit=args.rows)
    examples, _ = D.tokenize(records, tok, max_length=args.max_length, source="pool")
    return model, tok, examples


class StageClock(logging.Handler):
    """Follows pipeline.timed_stage's "stage NAME ..." log lines and charges every JAX tracing /
    lowering / XLA compile duration to the stage that is running."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        super().__init__(logging.INFO)
        self.stage = "setup"
        self.compile = collections.Counter()
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        self.logger = logging.getLogger("idjax.passes")  # where pipeline.timed_stage logs
        self.logger.addHandler(self)
        self.logger_level = self.logger.level  # (a Handler's own `level` is its threshold)
        if not self.logger.isEnabledFor(logging.INFO):
            self.logger.setLevel(logging.INFO)

    def emit(self, record):
        m = re.match(r"stage (\S+) \.\.\.$", record.getMessage())
        if m:
            self.stage = m.group(1)

    def _on_event(self, event, duration, **_):
        if event in self.EVENTS:
            self.compile[self.stage] += duration

    def reset(self):
        self.stage = "setup"
        self.compile = collections.Counter()

    def close(self):
        """Stop following the stages (the logger's level as it was); compile events are no longer charged."""
        self.logger.removeHandler(self)
        self.logger.setLevel(self.logger_level)
        self.EVENTS = ()
        super().close()
