"""What the `idjax` command accepts: every subcommand's flags, and the checks of their values and
output paths made before any work starts (a usage error exits 2, an output that would overwrite an
input or cannot be written exits 1). idjax/cli.py runs the commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_model(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="HF checkpoint directory, .gguf file, or an embedded name (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and compute dtype (logits are float32 either way)")


def add_training(p: argparse.ArgumentParser, *, lr: float, optimizer: str, schedule: str, batch_size: int):
    p.add_argument("--data", required=True, help="chat JSONL / Parquet / HF dataset (Tulu V2 format)")
    p.add_argument("--out", required=True, help="output directory (model, optimizer state, checkpoints, metrics)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps")
    length.add_argument("--epochs", type=float, default=None, help="passes over the data (default 1)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--optimizer", default=optimizer, choices=["adamw", "adam", "sgd"])
    p.add_argument("--schedule", default=schedule, choices=["constant", "linear", "cosine"],
                   help=f"learning-rate decay after the linear warm-up (default {schedule})")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up steps as a fraction of the run")
    p.add_argument("--warmup-steps", type=int, default=None, help="warm-up steps (overrides --warmup-ratio)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (sgd only)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="samples per microbatch")
    p.add_argument("--grad-accum", type=int, default=1, help="microbatches per optimizer step")
    p.add_argument("--max-length", type=int, default=1024, help="truncate samples to this many tokens")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="matmul dtype; master weights stay float32")
    p.add_argument("--remat", action="store_true", help="recompute layer activations (less memory)")
    p.add_argument("--seed", type=int, default=0, help="data order, LoRA init and warm-up subset")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a checkpoint every N steps (0: at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=3)


def add_distributed(p: argparse.ArgumentParser):
    """Several devices and processes (idjax.distributed); the IDJAX_* variables give the defaults."""
    g = p.add_argument_group("several devices and processes")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 for a multi-process run (jax.distributed), or 'auto' on a TPU pod "
                        "slice / SLURM / Open MPI; env IDJAX_COORDINATOR")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run; env IDJAX_NUM_PROCESSES")
    g.add_argument("--process-id", type=int, default=None, help="this process, 0..N-1; env IDJAX_PROCESS_ID")
    g.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=4,fsdp=2 (fsdp > 1 shards parameters; default: every local device "
                        "on data)")
    g.add_argument("--heartbeat-timeout", type=int, default=60,
                   help="seconds without a heartbeat after which a process counts as dead (default 60)")


def add_pool(p: argparse.ArgumentParser):
    p.add_argument("--train", required=True, help="the pool: chat JSONL / Parquet / HF dataset (Tulu V2 format)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate samples to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="samples per compiled batch")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per store chunk (the unit of resumption)")
    p.add_argument("--seed", type=int, default=0, help="landmarks, tangents, sketches, round-robin order")
    p.add_argument("--embed-blocks", type=int, default=4, help="decoder blocks kept for JVP embeddings")
    p.add_argument("--embed-tangents", type=int, default=2, help="random tangents per JVP embedding")
    p.add_argument("--embed-dim", type=int, default=4096, help="embedding size after projection")


def build_parser(commands: dict[str, Callable]) -> argparse.ArgumentParser:
    """The `idjax` argument parser; commands[name] runs subcommand `name` (set as args.func)."""
    parser = argparse.ArgumentParser(prog="idjax", description=__import__("idjax").__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="greedy answers from a model (checks a checkpoint loads and works)")
    add_model(p)
    p.add_argument("prompt", nargs="+", help="one or more user messages")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=commands["chat"])

    p = sub.add_parser("convert", help="write a model (e.g. a GGUF file) as an HF safetensors directory")
    add_model(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=commands["convert"])

    p = sub.add_parser("data", help="validate and tokenize a chat JSONL/Parquet/HF dataset; print statistics")
    add_model(p)
    p.add_argument("file", help="JSONL, Parquet, or a local HF datasets directory")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="read at most this many records")
    p.set_defaults(func=commands["data"])
    p = sub.add_parser("train", help="fine-tune a model on a chat dataset or a selection of it")
    add_model(p)
    add_training(p, lr=2e-5, optimizer="adamw", schedule="linear", batch_size=8)
    p.add_argument("--selection", default=None, help="JSONL from `idjax select`: train on these ids only")
    p.add_argument("--weighted", action="store_true", help="use the selection's weights as loss weights")
    p.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of every weight")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--resume", default=None, help="a run directory to continue from its last checkpoint")
    add_distributed(p)
    p.set_defaults(func=commands["train"])

    p = sub.add_parser("warmup", help="train briefly on a random fraction of the pool; save optimizer state")
    add_model(p)
    add_training(p, lr=2e-5, optimizer="adamw", schedule="constant", batch_size=8)
    p.add_argument("--fraction", type=float, default=0.05, help="fraction of the pool to train on (default 0.05)")
    add_distributed(p)
    p.set_defaults(func=commands["warmup"])

    p = sub.add_parser("eval", help="target loss / perplexity and a task metric; prints one JSON object")
    add_model(p)
    p.add_argument("--data", default=None, help="chat JSONL, or with --task a file in the HF dataset's format")
    p.add_argument("--task", default=None, choices=["gsm8k", "mmlu", "squad", "humaneval"],
                   help="also compute the task metric (data from --data, else the HF hub)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length for generated answers")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="humaneval: run model-written code in a subprocess")
    add_distributed(p)
    p.set_defaults(func=commands["eval"])

    p = sub.add_parser("embed", help="JVP embeddings of a pool into a resumable store (reused by select)")
    add_model(p)
    add_pool(p)
    p.add_argument("--store", required=True, help="store directory (re-running resumes / reuses it)")
    add_distributed(p)
    p.set_defaults(func=commands["embed"])

    p = sub.add_parser("select", help="choose and weight the pool samples that most help on a target set")
    add_model(p)
    add_pool(p)
    p.add_argument("--target", default=None,
                   help="target chat JSONL (rows may carry \"task\": per-task budgets); with --target-task, "
                        "a file in that task's HF format (absent: the HF hub)")
    p.add_argument("--target-task", default=None, choices=["gsm8k", "mmlu", "squad", "humaneval"],
                   help="build the target set with a task recipe (e.g. GSM8k chain-of-thought exemplars)")
    p.add_argument("--k", type=int, required=True, help="how many samples to select")
    p.add_argument("--out", required=True, help="output JSONL; the configuration goes to OUT.meta.json")
    p.add_argument("--store", default=None, help="store directory (default: OUT with suffix .store)")
    p.add_argument("--method", default="influence", choices=["influence", "random", "rds", "mid-ppl", "full"],
                   help="influence (Influence Distillation; with --exact: LESS-style exact first order) or a "
                        "baseline: random, rds (RDS+), mid-ppl, full (docs/method.md 9); default influence")
    p.add_argument("--landmarks", type=float, default=0.1,
                   help="landmarks: a fraction of the pool (< 1) or a count (default 0.1)")
    p.add_argument("--exact", action="store_true", help="every sample is a landmark (no embeddings; LESS-style)")
    p.add_argument("--landmark-method", default="random", choices=["random", "kmeans++"])
    p.add_argument("--propagation", default="krr", choices=["krr", "ridge"])
    p.add_argument("--order", type=int, default=1, choices=[1, 2], help="2 adds the target Hessian term")
    p.add_argument("--hessian", default="gauss-newton", choices=["exact", "gauss-newton"], help="for --order 2")
    p.add_argument("--lam", type=float, default=None,
                   help="weight regulariser (default: the value whose first-order support is the top k)")
    p.add_argument("--lr", type=float, default=1e-5, help="step size of the GD update model (no optimizer state)")
    p.add_argument("--optimizer-state", default=None,
                   help="a warm-up/train output directory: model a, b, eta from its optimizer (absent: GD)")
    p.add_argument("--aggregate", default="mean", choices=["mean", "round-robin"],
                   help="score against the mean target gradient, or round-robin over target samples")
    p.add_argument("--rank-by", default=None, choices=["score", "weight"],
                   help="top-k by score or by optimal weight (default: score for order 1, weight for 2)")
    p.add_argument("--proj-dim", type=int, default=4096, help="gradient sketch size (0: no projection)")
    p.add_argument("--proj-kind", default="srht", choices=["srht", "rademacher", "gaussian"])
    p.add_argument("--params", default=None, help="regex over parameter names (e.g. down_proj); default all")
    p.add_argument("--microbatch", type=int, default=None,
                   help="samples per vmapped gradient (default: as many as fit in ~1 GiB, dividing --batch-size)")
    p.add_argument("--no-normalize", action="store_true", help="inner products instead of cosines")
    add_distributed(p)
    p.set_defaults(func=commands["select"])

    p = sub.add_parser("demo", help="the whole pipeline on the embedded SmolLM2 and bundled data, on a CPU, "
                                    "in minutes: warm-up, selection, fine-tuning vs random, target loss")
    p.add_argument("--out", default="idjax-demo", help="output directory; re-running reuses it (default ./idjax-demo)")
    p.add_argument("--task", default=None, choices=["code", "definitions", "jargon"],
                   help="target task of the bundled data (default definitions)")
    p.add_argument("--k-fraction", type=float, default=None, help="selection budget, a fraction of the pool (0.1)")
    p.add_argument("--landmarks", type=float, default=None, help="random landmarks, a fraction of the pool (0.25)")
    p.add_argument("--seed", type=int, default=None, help="warm-up subset, landmarks, sketches, random subset (0)")
    p.add_argument("--pool-limit", type=int, default=None, help="use the first N pool rows (300; all: 879)")
    p.add_argument("--train-steps", type=int, default=None, help="fine-tuning steps for both subsets (8)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (64 pool rows, 2 fine-tuning steps, 64 tokens) to check the setup")
    p.set_defaults(func=commands["demo"])

    p = sub.add_parser("run", help="the whole pipeline from a YAML config (data, warm-up, selection, "
                                   "fine-tuning, evaluation); re-running skips every stage whose inputs did not change")
    p.add_argument("config", help="YAML file (example: idjax/assets/run-example.yaml); relative input paths "
                                  "in it are relative to the file")
    p.add_argument("--out", default=None, help="output directory (overrides the config's `out`)")
    p.add_argument("--force", action="append", default=None,
                   choices=["data", "warmup", "select", "train", "eval", "all"],
                   help="recompute this stage and everything after it, even when cached (repeatable)")
    p.set_defaults(func=commands["run"])
    return parser


# (dests, test, requirement) for flags shared by several subcommands: checked before any work starts.
_ARG_RULES = (
    (("batch_size", "grad_accum", "microbatch", "steps", "max_length", "max_new_tokens", "limit", "chunk_rows",
      "embed_blocks", "embed_tangents", "embed_dim", "keep_checkpoints", "pool_limit", "train_steps"),
     lambda v: v >= 1, ">= 1"),
    (("proj_dim", "lora_rank", "warmup_steps", "weight_decay", "clip_norm", "checkpoint_every"),
     lambda v: v >= 0, ">= 0"),
    (("epochs",), lambda v: v > 0, "> 0"),
    (("lr",), lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    (("lam",), lambda v: 0 < v < float("inf"), "a finite number > 0"),
    (("fraction",), lambda v: 0 < v <= 1, "in (0, 1]"),
    (("warmup_ratio",), lambda v: 0 <= v <= 1, "in [0, 1]"),
)


def check_args(args) -> str | None:
    """The first flag value no command can work with (a usage error, exit 2), or None."""
    import re

    for dests, ok, need in _ARG_RULES:
        for dest in dests:
            v = getattr(args, dest, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
                return f"--{dest.replace('_', '-')} must be {need}, got {v}"
    pattern = getattr(args, "params", None)
    if isinstance(pattern, str):
        try:
            re.compile(pattern)
        except re.error as e:
            return f"--params {pattern!r} is not a regular expression ({e})"
    return None


def store_dir(args):
    """Where this command keeps resumable chunks, or None."""
    from pathlib import Path

    if args.command == "embed":
        return Path(args.store)
    if args.command == "select":
        return Path(args.store) if args.store else Path(args.out).with_suffix(".store")
    return None


def check_outputs(args) -> str | None:
    """An output path that would overwrite an input or cannot be written, or None.

    Checked before any model is loaded, so that a long run neither destroys its own input nor fails
    at its very end."""
    from idjax import outputs
    from idjax.selection_file import meta_path

    inputs = {f"--{name.replace('_', '-')}": getattr(args, name, None)
              for name in ("model", "train", "target", "data", "selection", "optimizer_state")}
    files, dirs = {}, {}
    if args.command == "select":
        files = {"--out": args.out, "--out's sidecar": meta_path(args.out)}
    elif args.command in ("convert", "train", "warmup", "demo"):
        dirs = {"--out": args.out}
    store = store_dir(args)
    if store is not None:
        dirs["--store"] = store
    return outputs.check_outputs(inputs, files, dirs)
