"""The `idjax` command.

Every subcommand reports bad input as one line on stderr that names the file, row and field, and a
non-zero exit: 2 for usage errors (a bad flag value, --k larger than the pool), 1 for bad files,
checkpoints and runtime failures (out of memory: a hint on what to shrink), 130 for Ctrl-C (finished
store chunks and checkpoints are kept; re-running resumes). --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
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
    trained = sum(int((e.labels != data.IGNORE_INDEX).sum()) for e in examples)
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


# ----------------------------------------------------------------------------- train / warmup / eval


def _usage(command: str, msg: str) -> int:
    print(f"idjax {command}: error: {msg}", file=sys.stderr)
    return 2


def _optimizer_spec(args, steps: int):
    from idjax.optim import OptimizerSpec

    warm = args.warmup_steps if args.warmup_steps is not None else round(args.warmup_ratio * steps)
    return OptimizerSpec(
        name=args.optimizer, learning_rate=args.lr, schedule=args.schedule, warmup_steps=warm,
        total_steps=steps if args.schedule != "constant" else 0, weight_decay=args.weight_decay,
        momentum=args.momentum if args.optimizer == "sgd" else 0.0, clip_norm=args.clip_norm or None,
    )


def _train_config(args, examples, lora=None):
    """The TrainConfig of the parsed flags; the schedule's total_steps is the run's length."""
    import dataclasses

    from idjax import train
    from idjax.optim import OptimizerSpec

    base = train.TrainConfig(
        optimizer=OptimizerSpec(args.optimizer, args.lr), batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, epochs=args.epochs, seed=args.seed, compute_dtype=args.compute_dtype, lora=lora,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, remat=args.remat)
    steps = train.total_steps(examples, base)
    return dataclasses.replace(base, optimizer=_optimizer_spec(args, steps))


def cmd_train(args) -> int:
    from idjax import data, models, train
    from idjax.lora import LoraConfig
    from idjax.selection_file import read_selection

    if args.weighted and not args.selection:
        return _usage("train", "--weighted needs --selection FILE (the weights come from the selection)")
    lora = None
    if args.lora_rank:
        lora = LoraConfig(args.lora_rank, args.lora_alpha)
    _start_distributed(args, spmd=True)
    records = data.read_records(args.data)
    weights = None
    if args.selection:
        records, weights = read_selection(args.selection, records, args.weighted)
    model, tok = models.load(args.model, dtype=args.dtype)
    examples, _ = data.tokenize(records, tok, max_length=args.max_length, source=str(args.data))
    if not examples:
        raise data.DataError(f"{args.data}: no sample has a response token to train on")
    config = _train_config(args, examples, lora)
    result = train.train(model, examples, config, weights=weights, out_dir=args.out, resume=args.resume,
                         tokenizer=tok)
    hist = result.history
    print(json.dumps({"out": str(args.out), "steps": int(result.state.step), "samples": len(examples),
                      "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
                      "lora_rank": args.lora_rank or None, "weighted": bool(args.weighted)}))
    return 0


def cmd_warmup(args) -> int:
    from idjax import data, models, train

    _start_distributed(args, spmd=True)
    records = data.read_records(args.data)
    model, tok = models.load(args.model, dtype=args.dtype)
    examples = train.warmup_examples(records, tok, fraction=args.fraction, seed=args.seed,
                                     max_length=args.max_length)
    config = _train_config(args, examples)
    result = train.warmup(model, examples, tok, config, args.out, pool_size=len(records), fraction=args.fraction)
    hist = result.history
    print(json.dumps({"out": str(args.out), "steps": int(result.state.step), "samples": len(examples),
                      "pool": len(records), "optimizer": config.optimizer.name,
                      "last_loss": hist[-1]["loss"] if hist else None}))
    return 0


def cmd_eval(args) -> int:
    from idjax import data, evaluate, models, tasks

    if args.task is None and args.data is None:
        return _usage("eval", "give --data FILE (a chat JSONL), --task NAME, or both")
    if args.task == "humaneval" and not args.allow_code_execution:
        return _usage("eval", "humaneval's pass@1 runs model-written code on this machine; add "
                              "--allow-code-execution to accept that")
    _start_distributed(args)
    from idjax import distributed

    if not distributed.is_primary():  # evaluation is not split over processes: process 0 does it all
        print(json.dumps({"process": distributed.process_index(), "evaluated_by": 0}))
        return 0
    model, tok = models.load(args.model, dtype=args.dtype)
    out: dict = {"model": str(args.model), "data": None if args.data is None else str(args.data), "task": args.task}
    if args.task:
        task = tasks.load_task(args.task, args.data, limit=args.limit, with_target=False)
        records, source = task.eval_records, f"{args.task} evaluation set"
    else:
        task, records, source = None, data.read_records(args.data, limit=args.limit), str(args.data)
    examples, _ = data.tokenize(records, tok, max_length=args.max_length, source=source)
    if not examples:
        raise data.DataError(f"{source}: no sample has a response token to score")
    out.update(evaluate.target_loss(model, examples, batch_size=args.batch_size, pad_id=tok.pad_token_id or 0))
    if task is not None:
        out["metric"] = task.metric
        out.update(task.score(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              allow_code_execution=args.allow_code_execution))
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- embed / select


def _embed_config(args):
    from idjax.embed import EmbedConfig

    return EmbedConfig(num_blocks=args.embed_blocks, num_tangents=args.embed_tangents, dim=args.embed_dim,
                       seed=args.seed)


def _pool(args, tok):
    from idjax import data

    records = data.read_records(args.train)
    examples, stats = data.tokenize(records, tok, max_length=args.max_length, source=str(args.train))
    if not examples:
        raise data.DataError(f"{args.train}: no sample has a response token")
    return examples, stats


def cmd_embed(args) -> int:
    from idjax import models, pipeline

    _start_distributed(args)
    model, tok = models.load(args.model, dtype=args.dtype)
    examples, stats = _pool(args, tok)
    store = pipeline.embed_pool(model, examples, _embed_config(args), args.store, batch_size=args.batch_size,
                                chunk_rows=args.chunk_rows)
    print(json.dumps({"store": str(store.path), "rows": store.shape[0], "dim": store.shape[1],
                      "skipped_no_response": len(stats.skipped_no_response), "truncated": stats.n_truncated}))
    return 0


def cmd_select(args) -> int:
    import time
    from pathlib import Path

    from idjax import data, models, pipeline
    from idjax.optim import load_optimizer_state, update_model

    if args.k < 1:
        return _usage("select", f"--k must be >= 1, got {args.k}")
    if pipeline.landmarks_problem(args.landmarks):
        return _usage("select", f"--landmarks {pipeline.landmarks_problem(args.landmarks)}")
    _start_distributed(args)
    t0 = time.perf_counter()
    # Data first: bad input fails in seconds, before the model is loaded.
    tok = models.load_tokenizer(models.resolve(args.model))
    pool, stats = _pool(args, tok)
    if args.target_task:
        from idjax import tasks

        target_records = tasks.load_task(args.target_task, args.target).target
        source = f"{args.target_task} target set"
    elif args.target:
        target_records, source = data.read_records(args.target), str(args.target)
    else:
        return _usage("select", "give --target FILE (chat JSONL) or --target-task NAME")
    targets, tstats = data.tokenize(target_records, tok, max_length=args.max_length, source=source)
    if not targets:
        raise data.DataError(f"{source}: no target sample has a response token "
                             f"({len(tstats.skipped_no_response)} skipped)")
    if args.k > len(pool):
        return _usage("select", f"--k {args.k} is larger than the pool: {args.train} has {len(pool)} samples with "
                                f"a response token ({len(stats.skipped_no_response)} skipped)")
    model, _ = models.load(args.model, dtype=args.dtype, tokenizer=False)
    out = Path(args.out)
    store = Path(args.store) if args.store else out.with_suffix(".store")
    if args.method != "influence":  # docs/method.md 9: the same pool, budget, store and output file
        from idjax import baselines, distributed

        load_s = time.perf_counter() - t0
        selection = baselines.select_baseline(args.method, model, pool, targets, args.k, seed=args.seed,
                                              batch_size=args.batch_size, store_dir=store, chunk_rows=args.chunk_rows)
        if not distributed.is_primary():
            return 0
        return _write_selection(args, selection, pool, stats, tstats, out, store, t0, load_s)
    update = None
    if args.optimizer_state:
        spec, state = load_optimizer_state(args.optimizer_state, model)
        from flax import nnx

        update = update_model(spec, state, nnx.state(model, nnx.Param))
    config = pipeline.SelectConfig(
        k=args.k, landmarks=args.landmarks, exact=args.exact, landmark_method=args.landmark_method,
        propagation=args.propagation, order=args.order, hessian=args.hessian, lam=args.lam,
        learning_rate=args.lr, aggregate=args.aggregate, rank_by=args.rank_by, proj_dim=args.proj_dim,
        proj_kind=args.proj_kind, params=args.params, microbatch=args.microbatch,
        normalize=not args.no_normalize, embed=_embed_config(args), seed=args.seed, batch_size=args.batch_size,
        chunk_rows=args.chunk_rows)
    load_s = time.perf_counter() - t0
    selection = pipeline.select_samples(model, pool, targets, config, update=update, store_dir=store)
    if selection is None:  # another process of a multi-process run: process 0 writes the selection
        from idjax import distributed

        print(json.dumps({"process": distributed.process_index(), "processes": distributed.process_count(),
                          "out": str(out), "written_by": 0, "store": str(store)}))
        return 0
    return _write_selection(args, selection, pool, stats, tstats, out, store, t0, load_s)


def _write_selection(args, selection, pool, stats, tstats, out, store, t0, load_s) -> int:
    import time

    from idjax.selection_file import write_selection

    selection.info["timings_s"] = {"load": round(load_s, 3), **selection.info["timings_s"]}
    extra = {"command": {"model": str(args.model), "train": str(args.train), "target": args.target,
                         "target_task": args.target_task,
                         "optimizer_state": args.optimizer_state, "max_length": args.max_length,
                         "dtype": args.dtype},
             "pool_stats": {"records": stats.n_records, "kept": stats.n_kept, "truncated": stats.n_truncated,
                            "skipped_no_response": stats.skipped_no_response[:100]},
             "target_stats": {"records": tstats.n_records, "kept": tstats.n_kept,
                              "skipped_no_response": tstats.skipped_no_response[:100]}}
    meta = write_selection(selection, pool, out, extra)
    print(json.dumps({"out": str(out), "meta": str(meta), "selected": len(selection.rows),
                      "pool": len(pool), "landmarks": int(len(selection.landmarks)),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_demo(args) -> int:
    from idjax import demo

    if args.k_fraction is not None and not 0 < args.k_fraction <= 1:
        return _usage("demo", f"--k-fraction must be in (0, 1], got {args.k_fraction}")
    if args.landmarks is not None and not 0 < args.landmarks <= 1:
        return _usage("demo", f"--landmarks must be a fraction of the pool in (0, 1], got {args.landmarks}")
    kwargs = dict(demo.QUICK) if args.quick else {}
    for name in ("task", "k_fraction", "landmarks", "seed", "pool_limit", "train_steps"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    report = demo.run_demo(args.out, **kwargs)
    print(demo.format_report(report))
    return 0


def cmd_run(args) -> int:
    """The whole pipeline from a YAML config; every stage is cached under the out directory."""
    from idjax import run

    config = run.load_config(args.config, out=args.out)
    result = run.run(config, force=args.force or (), source=args.config)
    print(json.dumps(result.summary))
    return 0


def _add_training(p: argparse.ArgumentParser, *, lr: float, optimizer: str, schedule: str, batch_size: int):
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


def _add_distributed(p: argparse.ArgumentParser):
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


def _start_distributed(args, *, spmd: bool = False):
    """Join the multi-process run (if any) and set the device mesh, before any model is loaded.

    spmd: the command runs collectives across processes (training), so the mesh spans every process's
    devices and a dead process aborts the others; otherwise each process uses its own devices and the
    others report a dead process at their next barrier (selection, embeddings)."""
    from idjax import distributed, sharding

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout_s=args.heartbeat_timeout, fault_tolerant=not spmd)
    sharding.set_mesh(sharding.mesh_from_spec(args.mesh, global_devices=spmd))


def _add_pool(p: argparse.ArgumentParser):
    p.add_argument("--train", required=True, help="the pool: chat JSONL / Parquet / HF dataset (Tulu V2 format)")
    p.add_argument("--max-length", type=int, default=1024, help="truncate samples to this many tokens")
    p.add_argument("--batch-size", type=int, default=8, help="samples per compiled batch")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per store chunk (the unit of resumption)")
    p.add_argument("--seed", type=int, default=0, help="landmarks, tangents, sketches, round-robin order")
    p.add_argument("--embed-blocks", type=int, default=4, help="decoder blocks kept for JVP embeddings")
    p.add_argument("--embed-tangents", type=int, default=2, help="random tangents per JVP embedding")
    p.add_argument("--embed-dim", type=int, default=4096, help="embedding size after projection")


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
    p = sub.add_parser("train", help="fine-tune a model on a chat dataset or a selection of it")
    _add_model(p)
    _add_training(p, lr=2e-5, optimizer="adamw", schedule="linear", batch_size=8)
    p.add_argument("--selection", default=None, help="JSONL from `idjax select`: train on these ids only")
    p.add_argument("--weighted", action="store_true", help="use the selection's weights as loss weights")
    p.add_argument("--lora-rank", type=int, default=0, help="train rank-R LoRA adapters instead of every weight")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--resume", default=None, help="a run directory to continue from its last checkpoint")
    _add_distributed(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("warmup", help="train briefly on a random fraction of the pool; save optimizer state")
    _add_model(p)
    _add_training(p, lr=2e-5, optimizer="adamw", schedule="constant", batch_size=8)
    p.add_argument("--fraction", type=float, default=0.05, help="fraction of the pool to train on (default 0.05)")
    _add_distributed(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("eval", help="target loss / perplexity and a task metric; prints one JSON object")
    _add_model(p)
    p.add_argument("--data", default=None, help="chat JSONL, or with --task a file in the HF dataset's format")
    p.add_argument("--task", default=None, choices=["gsm8k", "mmlu", "squad", "humaneval"],
                   help="also compute the task metric (data from --data, else the HF hub)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation length for generated answers")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N questions only")
    p.add_argument("--allow-code-execution", action="store_true",
                   help="humaneval: run model-written code in a subprocess")
    _add_distributed(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("embed", help="JVP embeddings of a pool into a resumable store (reused by select)")
    _add_model(p)
    _add_pool(p)
    p.add_argument("--store", required=True, help="store directory (re-running resumes / reuses it)")
    _add_distributed(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("select", help="choose and weight the pool samples that most help on a target set")
    _add_model(p)
    _add_pool(p)
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
    _add_distributed(p)
    p.set_defaults(func=cmd_select)

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
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="the whole pipeline from a YAML config (data, warm-up, selection, "
                                   "fine-tuning, evaluation); re-running skips every stage whose inputs did not change")
    p.add_argument("config", help="YAML file (example: idjax/assets/run-example.yaml); relative input paths "
                                  "in it are relative to the file")
    p.add_argument("--out", default=None, help="output directory (overrides the config's `out`)")
    p.add_argument("--force", action="append", default=None,
                   choices=["data", "warmup", "select", "train", "eval", "all"],
                   help="recompute this stage and everything after it, even when cached (repeatable)")
    p.set_defaults(func=cmd_run)
    return parser


# ----------------------------------------------------------------------------- errors and exit codes
#
# Exit codes: 0 done; 1 a bad file, path or checkpoint, or a runtime failure (out of memory included);
# 2 a usage error (argparse, a flag value out of range, a request the input cannot satisfy such as --k
# larger than the pool); 130 Ctrl-C. Each failure is one line on stderr; --debug adds the traceback.

# (dest, test, requirement) for flags shared by several subcommands: checked before any work starts.
_ARG_RULES = (
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("grad_accum", lambda v: v >= 1, ">= 1"),
    ("microbatch", lambda v: v >= 1, ">= 1"),
    ("steps", lambda v: v >= 1, ">= 1"),
    ("epochs", lambda v: v > 0, "> 0"),
    ("max_length", lambda v: v >= 1, ">= 1"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"),
    ("limit", lambda v: v >= 1, ">= 1"),
    ("chunk_rows", lambda v: v >= 1, ">= 1"),
    ("embed_blocks", lambda v: v >= 1, ">= 1"),
    ("embed_tangents", lambda v: v >= 1, ">= 1"),
    ("embed_dim", lambda v: v >= 1, ">= 1"),
    ("proj_dim", lambda v: v >= 0, ">= 0"),
    ("lr", lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    ("lam", lambda v: 0 < v < float("inf"), "a finite number > 0"),
    ("lora_rank", lambda v: v >= 0, ">= 0"),
    ("fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmup_steps", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("clip_norm", lambda v: v >= 0, ">= 0"),
    ("checkpoint_every", lambda v: v >= 0, ">= 0"),
    ("keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("pool_limit", lambda v: v >= 1, ">= 1"),
    ("train_steps", lambda v: v >= 1, ">= 1"),
)


def _check_args(args) -> str | None:
    """The first flag value no command can work with (a usage error, exit 2), or None."""
    import re

    for dest, ok, need in _ARG_RULES:
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


def _store_dir(args):
    """Where this command keeps resumable chunks, or None."""
    from pathlib import Path

    if args.command == "embed":
        return Path(args.store)
    if args.command == "select":
        return Path(args.store) if args.store else Path(args.out).with_suffix(".store")
    return None


def _check_outputs(args) -> str | None:
    """An output path that would overwrite an input or cannot be written, or None.

    Checked before any model is loaded, so that a long run neither destroys its own input nor fails
    at its very end."""
    from idjax.outputs import check_outputs
    from idjax.selection_file import meta_path

    inputs = {f"--{name.replace('_', '-')}": getattr(args, name, None)
              for name in ("model", "train", "target", "data", "selection", "optimizer_state")}
    files, dirs = {}, {}
    if args.command == "select":
        files = {"--out": args.out, "--out's sidecar": meta_path(args.out)}
    elif args.command in ("convert", "train", "warmup", "demo"):
        dirs = {"--out": args.out}
    store = _store_dir(args)
    if store is not None:
        dirs["--store"] = store
    return check_outputs(inputs, files, dirs)


def _one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_oom(e: BaseException) -> bool:
    """XLA's RESOURCE_EXHAUSTED (jax.errors.JaxRuntimeError, a RuntimeError) or a host MemoryError."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "RESOURCE_EXHAUSTED" in str(e))


def _oom_hint(args) -> str:
    """What to shrink, among the flags this command has."""
    tips = []
    if getattr(args, "batch_size", None):
        tips.append(f"a smaller --batch-size (now {args.batch_size})")
    if hasattr(args, "microbatch"):
        tips.append("--microbatch 1")
    if getattr(args, "proj_dim", None):
        tips.append(f"a smaller --proj-dim (now {args.proj_dim})")
    if hasattr(args, "params") and not args.params:
        tips.append("a parameter subset such as --params down_proj")
    if getattr(args, "max_length", None):
        tips.append(f"a smaller --max-length (now {args.max_length})")
    if getattr(args, "dtype", None) == "float32":
        tips.append("--dtype bfloat16")
    if getattr(args, "compute_dtype", None) == "float32":
        tips.append("--compute-dtype bfloat16")
    if hasattr(args, "remat") and not args.remat:
        tips.append("--remat")
    if not tips:
        return "free memory on the device or use a smaller model"
    return "try " + (", ".join(tips[:-1]) + " or " + tips[-1] if len(tips) > 1 else tips[0])


def _describe(e: Exception, args) -> str:
    """One line for stderr that says what went wrong and, where it helps, what to do."""
    if _is_oom(e):
        first = next((t.strip() for t in str(e).splitlines() if t.strip()), type(e).__name__)
        store = _store_dir(args)
        kept = f"; finished chunks are kept in {store}" if store is not None else ""
        return f"idjax: error: out of memory ({_one_line(first, 200)}); {_oom_hint(args)}{kept}"
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        other = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"idjax: error: {e.filename}{other}: {e.strerror}"
    if isinstance(e, (ValueError, OSError)):  # DataError, CheckpointError, UnsupportedModelError, StoreError
        return f"idjax: error: {_one_line(e)}"
    return (f"idjax: error: {type(e).__name__}: {_one_line(e, 300)} (unexpected; --debug shows the traceback, "
            "please report it)")


def _interrupted(args) -> str:
    """The Ctrl-C line: what was kept and how to go on."""
    from pathlib import Path

    store = _store_dir(args)
    if store is not None:
        return f"idjax: interrupted; finished chunks are kept in {store}, re-run the same command to resume"
    if args.command == "train" and (Path(args.out) / "checkpoints").is_dir():
        return (f"idjax: interrupted; checkpoints are kept in {Path(args.out) / 'checkpoints'}, re-run with "
                f"--resume {args.out} to continue")
    if args.command in ("demo", "run"):
        where = f" in {args.out}" if getattr(args, "out", None) else ""
        return f"idjax: interrupted; finished stages are kept{where}, re-run the same command to resume"
    return "idjax: interrupted"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("jax", "absl", "transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    problem = _check_args(args)
    if problem:
        return _usage(args.command, problem)
    problem = _check_outputs(args)
    if problem:
        print(f"idjax: error: {problem}", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(_interrupted(args), file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the one place every failure becomes one line and an exit code
        if args.debug:
            traceback.print_exc()
        print(_describe(e, args), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
