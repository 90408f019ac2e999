"""The `idjax` command: each subcommand parses its flags (idjax/cli_args.py) and calls the library.

Every subcommand reports bad input as one line on stderr that names the file, row and field, and a
non-zero exit: 2 for usage errors (a bad flag value, --k larger than the pool), 1 for bad files,
checkpoints and runtime failures (out of memory: a hint on what to shrink), 130 for Ctrl-C (finished
store chunks and checkpoints are kept; re-running resumes). --debug adds the traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections import Counter

from idjax import cli_args, supervise

log = logging.getLogger("idjax")


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


def cmd_train(args) -> int:
    from idjax import data, models, options, stages, train
    from idjax.configs import TrainRecipe
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
    model, tok = models.load(args.model, dtype=args.dtype, mesh=_mesh())
    examples, _ = stages.tokenized(records, tok, max_length=args.max_length, source=str(args.data))
    config = stages.finetune_config(examples, options.from_args(TrainRecipe, args), seed=args.seed, lora=lora)
    result = train.train(model, examples, config, weights=weights, out_dir=args.out, resume=args.resume,
                         tokenizer=tok)
    hist = result.history
    print(json.dumps({"out": str(args.out), "steps": int(result.state.step), "samples": len(examples),
                      "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None,
                      "lora_rank": args.lora_rank or None, "weighted": bool(args.weighted)}))
    return 0


def cmd_warmup(args) -> int:
    from idjax import data, models, options, stages, train
    from idjax.configs import WarmupRecipe

    recipe = options.from_args(WarmupRecipe, args)
    _start_distributed(args, spmd=True)
    records = data.read_records(args.data)
    model, tok = models.load(args.model, dtype=args.dtype, mesh=_mesh())
    examples = train.warmup_examples(records, tok, fraction=recipe.fraction, seed=args.seed,
                                     max_length=args.max_length)
    result = stages.warm_up(model, examples, tok, recipe, args.out, pool_size=len(records), seed=args.seed,
                            donate_model=True)
    hist = result.history
    print(json.dumps({"out": str(args.out), "steps": int(result.state.step), "samples": len(examples),
                      "pool": len(records), "optimizer": recipe.optimizer,
                      "last_loss": hist[-1]["loss"] if hist else None}))
    return 0


def cmd_eval(args) -> int:
    from idjax import data, evaluate, models, stages, tasks

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
    model, tok = models.load(args.model, dtype=args.dtype, mesh=_mesh())
    out: dict = {"model": str(args.model), "data": None if args.data is None else str(args.data), "task": args.task}
    if args.task:
        task = tasks.load_task(args.task, args.data, limit=args.limit, with_target=False)
        records, source = task.eval_records, f"{args.task} evaluation set"
    else:
        task, records, source = None, data.read_records(args.data, limit=args.limit), str(args.data)
    examples, _ = stages.tokenized(records, tok, max_length=args.max_length, source=source, what="sample to score")
    out.update(evaluate.target_loss(model, examples, batch_size=args.batch_size, pad_id=tok.pad_token_id or 0))
    if task is not None:
        out["metric"] = task.metric
        out.update(task.score(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              allow_code_execution=args.allow_code_execution))
    print(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- embed / select


def _embed_config(args):
    from idjax import options
    from idjax.configs import EmbedConfig

    return options.from_args(EmbedConfig, args, seed=args.seed)


def cmd_embed(args) -> int:
    from idjax import models, passes, stages

    _start_distributed(args)
    model, tok = models.load(args.model, dtype=args.dtype, mesh=_mesh())
    sets = stages.load_sets(tok, pool=args.train, max_length=args.max_length, cache_dir=args.store)
    examples, stats = sets.pool, sets.stats["pool"]
    store = passes.embed_pool(model, examples, _embed_config(args), args.store, batch_size=args.batch_size,
                                chunk_rows=args.chunk_rows)
    print(json.dumps({"store": str(store.path), "rows": store.shape[0], "dim": store.shape[1],
                      "skipped_no_response": len(stats.skipped_no_response), "truncated": stats.n_truncated}))
    return 0


def cmd_select(args) -> int:
    import time
    from pathlib import Path

    from idjax import distributed, models, options, stages
    from idjax.configs import SelectConfig
    from idjax.selection_file import meta_path

    _start_distributed(args)
    t0 = time.perf_counter()
    if not args.target and not args.target_task:
        return _usage("select", "give --target FILE (chat JSONL) or --target-task NAME")
    if args.k is None and args.budget_tokens is None:
        return _usage("select", "give --k (how many samples) or --budget-tokens (how many response tokens)")
    # Data first: bad input fails in seconds, before the model is loaded.
    tok = models.load_tokenizer(models.resolve(args.model))
    store = cli_args.store_dir(args)  # also keeps the tokenized pool for the next selection
    sets = stages.load_sets(tok, pool=args.train, target=args.target, target_task=args.target_task,
                            max_length=args.max_length, cache_dir=store)
    pool, stats, tstats = sets.pool, sets.stats["pool"], sets.stats["targets"]
    if args.k is not None and args.k > len(pool):
        return _usage("select", f"--k {args.k} is larger than the pool: {args.train} has {len(pool)} samples with "
                                f"a response token ({len(stats.skipped_no_response)} skipped)")
    model, _ = models.load(args.model, dtype=args.dtype, tokenizer=False, mesh=_mesh())
    out = Path(args.out)
    meta = {"command": {"model": str(args.model), "train": str(args.train), "target": args.target,
                        "target_task": args.target_task, "optimizer_state": args.optimizer_state,
                        "max_length": args.max_length, "dtype": args.dtype},
            "pool_stats": {"records": stats.n_records, "kept": stats.n_kept, "truncated": stats.n_truncated,
                           "skipped_no_response": stats.skipped_no_response[:100]},
            "target_stats": {"records": tstats.n_records, "kept": tstats.n_kept,
                             "skipped_no_response": tstats.skipped_no_response[:100]}}
    config = options.from_args(SelectConfig, args, embed=_embed_config(args))
    selection = stages.select(model, pool, sets.targets, config, store_dir=store, method=args.method,
                              optimizer_state=args.optimizer_state, out=out, meta=meta,
                              timings={"load": round(time.perf_counter() - t0, 3)})
    if selection is None:  # another process of a multi-process run: process 0 wrote the selection
        print(json.dumps({"process": distributed.process_index(), "processes": distributed.process_count(),
                          "out": str(out), "written_by": 0, "store": str(store)}))
        return 0
    print(json.dumps({"out": str(out), "meta": str(meta_path(out)), "selected": len(selection.rows),
                      "pool": len(pool), "landmarks": int(len(selection.landmarks)),
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


def cmd_demo(args) -> int:
    from idjax import demo, demo_report

    given = {name: getattr(args, name) for name in cli_args.DEMO_FLAGS if hasattr(args, name)}
    config = demo.DemoConfig(**{**(demo.QUICK if args.quick else {}), **given})
    report = demo.run_demo(args.out, config)
    print(demo_report.format_report(report))
    return 0


def cmd_plan(args) -> int:
    """Compile every stage abstractly for the mesh (idjax/plan.py); on a CPU, simulate its devices."""
    import os

    from idjax import sharding

    sizes = sharding.parse_mesh(args.mesh)
    devices = max(1, sizes.get("data", 1)) * max(1, sizes.get("fsdp", 1))
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:  # read when JAX first looks for devices
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    import jax

    from idjax import models, plan
    from idjax.memory import device_memory

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = set(stages) - set(plan.STAGES)
    if unknown:
        return _usage("plan", f"--stages: unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(plan.STAGES)}")
    if len(jax.devices()) < devices:
        return _usage("plan", f"--mesh {args.mesh} needs {devices} devices, {len(jax.devices())} are visible "
                              f"(set XLA_FLAGS=--xla_force_host_platform_device_count={devices} on a CPU)")
    mesh = sharding.make_mesh(sizes.get("data"), sizes.get("fsdp"), devices=jax.devices()[:devices])
    stats = jax.devices()[0].memory_stats() or {}
    if args.device_memory is None and "bytes_limit" not in stats:
        return _usage("plan", f"{jax.devices()[0].platform} devices do not report their memory: give "
                              f"--device-memory (e.g. 80GB)")
    memory = device_memory(args.device_memory)
    config = models.load_config(args.model)
    report = plan.plan(config, mesh, pool=args.pool, max_length=args.max_length, device_memory=memory,
                       batch_size=args.batch_size, dtype=args.dtype, params=args.params, proj_dim=args.proj_dim,
                       landmarks=args.landmarks, embed_blocks=args.num_blocks, embed_tangents=args.num_tangents,
                       embed_dim=args.dim, targets=args.targets, stages=stages)
    print(json.dumps(report) if args.json else plan.format_plan(report))
    return 0


def cmd_run(args) -> int:
    """The whole pipeline from a YAML config; every stage is cached under the out directory."""
    from idjax import run, run_config

    config = run_config.load_config(args.config, out=args.out)
    result = run.run(config, force=args.force or (), source=args.config)
    print(json.dumps(result.summary))
    return 0


def _mesh():
    """The mesh _start_distributed set: with fsdp > 1 models are loaded sharded over it."""
    from idjax import sharding

    return sharding.get_mesh()


def _start_distributed(args, *, spmd: bool = False):
    """Join the multi-process run (if any) and set the device mesh, before any model is loaded.

    spmd: the command runs collectives across processes (training), so the mesh spans every process's
    devices and a dead process aborts the others; otherwise each process uses its own devices and the
    others report a dead process at their next barrier (selection, embeddings)."""
    from idjax import distributed, sharding

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           heartbeat_timeout_s=args.heartbeat_timeout, fault_tolerant=not spmd)
    sharding.set_mesh(sharding.mesh_from_spec(args.mesh, global_devices=spmd))


# ----------------------------------------------------------------------------- errors and exit codes
#
# Exit codes: 0 done; 1 a bad file, path or checkpoint, or a runtime failure (out of memory included);
# 2 a usage error (argparse, a flag value out of range, a request the input cannot satisfy such as --k
# larger than the pool); 130 Ctrl-C. Each failure is one line on stderr; --debug adds the traceback.


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
        store = cli_args.store_dir(args)
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

    store = cli_args.store_dir(args)
    if store is not None:
        return f"idjax: interrupted; finished chunks are kept in {store}, re-run the same command to resume"
    if args.command in ("train", "warmup") and (Path(args.out) / "checkpoints").is_dir():
        how = f"re-run with --resume {args.out} to continue" if args.command == "train" else \
            "re-run the same command to resume"  # a warm-up resumes on its own
        return f"idjax: interrupted; checkpoints are kept in {Path(args.out) / 'checkpoints'}, {how}"
    if args.command in ("demo", "run"):
        where = f" in {args.out}" if getattr(args, "out", None) else ""
        return f"idjax: interrupted; finished stages are kept{where}, re-run the same command to resume"
    return "idjax: interrupted"


COMMANDS = {"chat": cmd_chat, "convert": cmd_convert, "data": cmd_data, "train": cmd_train, "warmup": cmd_warmup,
            "eval": cmd_eval, "embed": cmd_embed, "select": cmd_select, "demo": cmd_demo, "plan": cmd_plan,
            "run": cmd_run}


def main(argv=None) -> int:
    parser = cli_args.build_parser(COMMANDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("jax", "absl", "transformers", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    problem = cli_args.check_args(args)
    if problem:
        return _usage(args.command, problem)
    problem = cli_args.check_outputs(args)
    if problem:
        print(f"idjax: error: {problem}", file=sys.stderr)
        return 1
    coordinator = supervise.coordinator_of(args)
    if coordinator is not None:  # another process than 0: jaxlib would abort it if process 0 died
        return supervise.run(sys.argv[1:] if argv is None else list(argv), *coordinator)
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
