"""What the `idjax` command accepts: every subcommand's flags (most generated from the stage configs of
idjax/configs.py, which declare their defaults, choices and ranges), and the checks of their values and
output paths made before any work starts (a usage error exits 2, an output that would overwrite an
input or cannot be written exits 1). idjax/cli.py runs the commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from idjax import options as O
from idjax.configs import EmbedConfig, SelectConfig, TrainRecipe, WarmupRecipe
from idjax.demo import DemoConfig
from idjax.options import add_argument, add_flags

#: The settings `idjax demo` takes as flags (the others are its measured recipe: idjax/demo.py).
DEMO_FLAGS = ("task", "k_fraction", "landmarks", "seed", "pool_limit", "train_steps")


def add_model(p: argparse.ArgumentParser):
    p.add_argument("--model", default="smollm2-135m",
                   help="HF checkpoint directory, .gguf file, or an embedded name (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter and compute dtype (logits are float32 either way)")


def add_max_length(p: argparse.ArgumentParser, default: int = 1024):
    add_argument(p, "--max-length", type=int, default=default, check=O.AT_LEAST_1,
                 help=f"truncate samples to this many tokens (default {default})")


def add_training(p: argparse.ArgumentParser, recipe):
    """The flags of a training Recipe (idjax/configs.py) and of the data it trains on."""
    p.add_argument("--data", required=True, help="chat JSONL / Parquet / HF dataset (Tulu V2 format)")
    p.add_argument("--out", required=True, help="output directory (model, optimizer state, checkpoints, metrics)")
    add_max_length(p)
    p.add_argument("--seed", type=int, default=0, help="data order, LoRA init and warm-up subset")
    add_flags(p, recipe, defaults={"batch_size": 8}, exclusive=("steps", "epochs"))


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
    """The pool and how it is embedded (EmbedConfig); `idjax select` adds SelectConfig's other flags."""
    p.add_argument("--train", required=True, help="the pool: chat JSONL / Parquet / HF dataset (Tulu V2 format)")
    add_max_length(p)
    add_flags(p, EmbedConfig, group="JVP embeddings (docs/method.md 6)")


def build_parser(commands: dict[str, Callable]) -> argparse.ArgumentParser:
    """The `idjax` argument parser; commands[name] runs subcommand `name` (set as args.func)."""
    parser = argparse.ArgumentParser(prog="idjax", description=__import__("idjax").__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="greedy answers from a model (checks a checkpoint loads and works)")
    add_model(p)
    p.add_argument("prompt", nargs="+", help="one or more user messages")
    add_argument(p, "--max-new-tokens", type=int, default=64, check=O.AT_LEAST_1)
    p.set_defaults(func=commands["chat"])

    p = sub.add_parser("convert", help="write a model (e.g. a GGUF file) as an HF safetensors directory")
    add_model(p)
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=commands["convert"])

    p = sub.add_parser("data", help="validate and tokenize a chat JSONL/Parquet/HF dataset; print statistics")
    add_model(p)
    p.add_argument("file", help="JSONL, Parquet, or a local HF datasets directory")
    add_max_length(p)
    add_argument(p, "--limit", type=int, default=None, check=O.AT_LEAST_1, help="read at most this many records")
    p.set_defaults(func=commands["data"])
    p = sub.add_parser("train", help="fine-tune a model on a chat dataset or a selection of it")
    add_model(p)
    add_training(p, TrainRecipe)
    p.add_argument("--selection", default=None, help="JSONL from `idjax select`: train on these ids only")
    add_argument(p, "--lora-rank", type=int, default=0, check=O.NON_NEGATIVE,
                 help="train rank-R LoRA adapters instead of every weight")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--resume", default=None, help="a run directory to continue from its last checkpoint")
    add_distributed(p)
    p.set_defaults(func=commands["train"])

    p = sub.add_parser("warmup", help="train briefly on a random fraction of the pool; save optimizer state")
    add_model(p)
    add_training(p, WarmupRecipe)
    add_distributed(p)
    p.set_defaults(func=commands["warmup"])

    p = sub.add_parser("eval", help="target loss / perplexity and a task metric; prints one JSON object")
    add_model(p)
    p.add_argument("--data", default=None, help="chat JSONL, or with --task a file in the HF dataset's format")
    p.add_argument("--task", default=None, choices=["gsm8k", "mmlu", "squad", "humaneval"],
                   help="also compute the task metric (data from --data, else the HF hub)")
    add_argument(p, "--batch-size", type=int, default=8, check=O.AT_LEAST_1)
    add_max_length(p, 2048)
    add_argument(p, "--max-new-tokens", type=int, default=256, check=O.AT_LEAST_1,
                 help="generation length for generated answers")
    add_argument(p, "--limit", type=int, default=None, check=O.AT_LEAST_1, help="evaluate the first N questions only")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="humaneval: run model-written code in a subprocess")
    add_distributed(p)
    p.set_defaults(func=commands["eval"])

    p = sub.add_parser("embed", help="JVP embeddings of a pool into a resumable store (reused by select)")
    add_model(p)
    add_pool(p)
    add_flags(p, SelectConfig, only=("batch_size", "chunk_rows", "seed"))
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
    p.add_argument("--out", required=True, help="output JSONL; the configuration goes to OUT.meta.json")
    p.add_argument("--store", default=None, help="store directory (default: OUT with suffix .store)")
    p.add_argument("--method", default="influence", choices=["influence", "random", "rds", "mid-ppl", "full"],
                   help="influence (Influence Distillation; with --exact: LESS-style exact first order) or a "
                        "baseline: random, rds (RDS+), mid-ppl, full (docs/method.md 9); default influence")
    p.add_argument("--optimizer-state", default=None,
                   help="a warm-up/train output directory: model a, b, eta from its optimizer (absent: GD)")
    add_flags(p, SelectConfig, group="selection (docs/method.md 3-7)")
    add_distributed(p)
    p.set_defaults(func=commands["select"])

    p = sub.add_parser("demo", help="the whole pipeline on the embedded SmolLM2 and bundled data, on a CPU, "
                                    "in minutes: warm-up, selection, fine-tuning vs random, target loss")
    p.add_argument("--out", default="idjax-demo", help="output directory; re-running reuses it (default ./idjax-demo)")
    add_flags(p, DemoConfig, defaults=dict.fromkeys(DEMO_FLAGS, argparse.SUPPRESS), only=DEMO_FLAGS)
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (64 pool rows, 2 fine-tuning steps, 64 tokens) to check the setup")
    p.set_defaults(func=commands["demo"])

    p = sub.add_parser("plan", help="compile each stage for a mesh from the model's config alone (no weights): "
                                    "memory per device, microbatch, FLOPs, store sizes, and whether it fits")
    p.add_argument("--model", default="smollm2-135m",
                   help="a config.json, an HF checkpoint directory, a .gguf file or an embedded name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    p.add_argument("--mesh", default=None, help="the devices to plan for, e.g. data=2,fsdp=4 (default: one device); "
                                               "on a CPU, that many host devices are simulated")
    add_argument(p, "--pool", type=int, default=200_000, check=O.AT_LEAST_1, help="pool size (default 200000)")
    add_max_length(p)
    add_argument(p, "--device-memory", default=None, check=O.memory_size,
                 help="memory per device, e.g. 80GB or 16GiB (default: what the device reports)")
    add_argument(p, "--targets", type=int, default=16, check=O.AT_LEAST_1, help="target samples (default 16)")
    add_flags(p, SelectConfig, only=("landmarks", "proj_dim", "params", "batch_size"))
    add_flags(p, EmbedConfig, group="JVP embeddings (docs/method.md 6)")
    p.add_argument("--stages", default="embed,gradients,target,hvp,train",
                   help="comma-separated stages to compile (default: all of embed,gradients,target,hvp,train)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.set_defaults(func=commands["plan"])

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


def check_args(args) -> str | None:
    """The first flag value outside its declared range (a usage error, exit 2), or None."""
    return O.flag_problem(args)


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
