"""`idjax run CONFIG.yaml`: the whole pipeline from one YAML file, every stage cached on disk.

Why: a selection experiment is a chain of slow steps (tokenize, warm up, embed, select, fine-tune,
evaluate) that researchers re-run many times while changing one knob. Each stage here writes its
result under out/<stage>/ together with a done-marker (done.json) holding the fingerprint of its
inputs: the config keys it reads, the content of the data files and model, and the fingerprints of
the stages it depends on. A re-run skips every stage whose fingerprint matches ("stage X: cached"),
recomputes a stage whose inputs changed, and then everything downstream of it. Within the select
stage the pool's embeddings and landmark gradients live in out/store/, the resumable chunked store
of `idjax select`, so a run killed in the middle resumes at the first missing chunk and a change of
k or of the target set recomputes no embedding.

    out/data/     pool.npz, targets.npz, eval.npz (tokenized), summary.json
    out/warmup/   the warmed-up model and its optimizer state (absent recipe: the GD update model)
    out/store/    chunked embeddings / gradients / curvature (never wiped: fingerprinted by name)
    out/select/   selection.jsonl + selection.meta.json
    out/train/    model/: the model fine-tuned on the selection (HF safetensors + optimizer state)
    out/eval/     eval.json: target loss before and after fine-tuning
    out/run.json  the configuration and summary of the last run

Relative input paths in a config file are relative to the file (a config travels with its data);
`out` is relative to the working directory. Every file is written to a temporary name and
renamed; a stage's done-marker is written last, so an interrupted stage is never taken as done.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from idjax.io import atomic_write

log = logging.getLogger(__name__)

STAGES = ("data", "warmup", "select", "train", "eval")
MARKER = "done.json"      # a finished stage: {"fingerprint", "inputs", "result", ...}
STARTED = "started.json"  # a stage directory this command owns (written before any work)
_HASH_WHOLE = 256 << 20   # files up to this size are hashed whole; larger ones by size, mtime, head and tail


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and the key."""


def _choice(*values, default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"choices": values})


@dataclasses.dataclass(frozen=True)
class WarmupRecipe:
    """docs/method.md 8: a brief training run on a seeded random fraction of the pool; selection then reads
    the update model (a, b, eta) of its optimizer state."""

    fraction: float = 0.05
    steps: int | None = None            # None: one pass over the warm-up subset
    lr: float = 2e-5
    batch_size: int | None = None       # None: the run's batch_size
    optimizer: str = _choice("adamw", "adam", "sgd", default="adamw")


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """The fine-tuning run on the selection (idjax train)."""

    steps: int | None = None            # optimizer steps; None: `epochs` passes (default 1)
    epochs: float | None = None
    lr: float = 2e-5
    batch_size: int | None = None       # None: the run's batch_size
    weighted: bool = False              # per-sample loss weights from the selection's optimal weights
    optimizer: str = _choice("adamw", "adam", "sgd", default="adamw")
    schedule: str = _choice("constant", "linear", "cosine", default="linear")
    lr_warmup_steps: int = 0            # linear learning-rate warm-up at the start of the schedule
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `idjax run` does; the keys of the YAML file are these field names."""

    pool: str                                   # chat JSONL / Parquet / local HF dataset dir
    k: int | float                              # selection size: a count (int) or a fraction of the pool
    target: str | None = None                   # chat JSONL; with target_task, a file in that task's HF format
    target_task: str | None = _choice(None, "gsm8k", "mmlu", "squad", "humaneval", default=None)
    eval: str | None = None                     # chat JSONL; None: the task's eval set, else the target set
    model: str = "smollm2-135m"                 # HF dir, .gguf file or embedded name
    dtype: str = _choice("float32", "bfloat16", default="float32")
    max_length: int = 1024
    pool_limit: int | None = None               # use the first N pool records
    eval_limit: int | None = None               # evaluate the first N eval records
    landmarks: float = 0.1                      # a fraction of the pool (< 1) or a count
    exact: bool = False                         # every sample a landmark (no embeddings)
    landmark_method: str = _choice("random", "kmeans++", default="random")
    propagation: str = _choice("krr", "ridge", default="krr")
    order: int = _choice(1, 2, default=1)
    hessian: str = _choice("gauss-newton", "exact", default="gauss-newton")
    lam: float | None = None
    gd_lr: float = 1e-5                         # eta of the plain-GD update model (no warm-up)
    aggregate: str = _choice("mean", "round-robin", default="mean")
    rank_by: str | None = _choice(None, "score", "weight", default=None)
    proj_dim: int = 4096
    proj_kind: str = _choice("srht", "rademacher", "gaussian", default="srht")
    params: str | None = None                   # regex over parameter names (e.g. down_proj)
    normalize: bool = True
    microbatch: int | None = None
    embed_blocks: int = 4
    embed_tangents: int = 2
    embed_dim: int = 4096
    seed: int = 0
    batch_size: int = 8
    chunk_rows: int = 256                       # rows per store chunk: the unit of resumption
    warmup: WarmupRecipe | None = None          # None: no warm-up, GD update model with gd_lr
    train: TrainRecipe = TrainRecipe()
    out: str = "idjax-run"

    def __post_init__(self):
        _validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- config checking


def _validate(c: RunConfig) -> None:
    """Ranges and combinations (types were checked by the loader, or by the caller's code)."""
    def need(ok, key, msg):
        if not ok:
            raise ConfigError(f"key '{key}': {msg}")

    for obj, prefix in ((c, ""), (c.warmup, "warmup."), (c.train, "train.")):
        if obj is None:
            continue
        for f in dataclasses.fields(obj):
            allowed = f.metadata.get("choices")
            if allowed is not None:
                need(getattr(obj, f.name) in allowed, prefix + f.name,
                     f"expected one of {', '.join(str(a) for a in allowed if a is not None)}, "
                     f"got {getattr(obj, f.name)!r}")
    k = c.k
    need(not isinstance(k, bool) and ((isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k <= 1)),
         "k", f"expected a count >= 1 or a fraction of the pool in (0, 1], got {k!r}")
    need(c.target is not None or c.target_task is not None, "target",
         "give `target` (a chat JSONL) or `target_task` (a task recipe)")
    need(c.max_length >= 1, "max_length", f"must be >= 1, got {c.max_length}")
    for key in ("pool_limit", "eval_limit", "microbatch"):
        v = getattr(c, key)
        need(v is None or v >= 1, key, f"must be >= 1, got {v}")
    from idjax.pipeline import landmarks_problem

    need(landmarks_problem(c.landmarks) is None, "landmarks", landmarks_problem(c.landmarks) or "")
    need(c.lam is None or c.lam > 0, "lam", f"must be > 0, got {c.lam}")
    need(math.isfinite(c.gd_lr) and c.gd_lr > 0, "gd_lr", f"must be > 0, got {c.gd_lr}")
    if c.params is not None:
        try:
            re.compile(c.params)
        except re.error as e:
            raise ConfigError(f"key 'params': {c.params!r} is not a regular expression ({e})") from None
    need(c.proj_dim >= 0, "proj_dim", f"must be >= 0 (0: no projection), got {c.proj_dim}")
    for key in ("embed_blocks", "embed_tangents", "embed_dim", "batch_size", "chunk_rows"):
        need(getattr(c, key) >= 1, key, f"must be >= 1, got {getattr(c, key)}")
    need(bool(c.out), "out", "must be a directory name")
    from idjax.outputs import check_outputs

    problem = check_outputs({k: getattr(c, k) for k in ("pool", "target", "eval", "model")}, dirs={"out": c.out})
    need(problem is None, "out", problem)
    if c.warmup is not None:
        w = c.warmup
        need(0 < w.fraction <= 1, "warmup.fraction", f"must be in (0, 1], got {w.fraction}")
        need(w.steps is None or w.steps >= 1, "warmup.steps", f"must be >= 1, got {w.steps}")
        need(math.isfinite(w.lr) and w.lr > 0, "warmup.lr", f"must be > 0, got {w.lr}")
        need(w.batch_size is None or w.batch_size >= 1, "warmup.batch_size", f"must be >= 1, got {w.batch_size}")
    t = c.train
    need(t.steps is None or t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    need(t.epochs is None or t.epochs > 0, "train.epochs", f"must be > 0, got {t.epochs}")
    need(t.steps is None or t.epochs is None, "train.steps", "give train.steps or train.epochs, not both")
    need(math.isfinite(t.lr) and t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    need(t.batch_size is None or t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    need(t.lr_warmup_steps >= 0, "train.lr_warmup_steps", f"must be >= 0, got {t.lr_warmup_steps}")
    need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    need(t.clip_norm is None or t.clip_norm > 0, "train.clip_norm", f"must be > 0 or null, got {t.clip_norm}")


def _describe(hint) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    args = typing.get_args(hint)
    if args:
        return " or ".join(_describe(a) for a in args)
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _convert(value, hint, key: str):
    """`value` checked against the type annotation `hint`; ConfigError names the key otherwise.

    Numbers written like 1e-5 are strings to YAML 1.1 (it wants 1.0e-5), so a string that parses
    as a float is accepted where a float is expected.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if set(options) == {int, float}:  # k: a count or a fraction
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return _convert(value, float, key)
        if len(options) == 1:
            try:
                return _convert(value, options[0], key)
            except ConfigError:
                raise ConfigError(f"key '{key}': expected {_describe(hint)}, got {value!r}") from None
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"key '{key}': expected a mapping (nested keys), got {value!r}")
        return _build(hint, value, key + ".")
    ok = {bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool)}
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"key '{key}': expected a number, got {value!r}")
    if hint in ok:
        if ok[hint](value):
            return value
        raise ConfigError(f"key '{key}': expected {_describe(hint)}, got {value!r}")
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")


def _build(cls, mapping: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in mapping:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{prefix}{key}' ({hint})")
    missing = [n for n, f in fields.items() if n not in mapping and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key '{prefix}{missing[0]}'")
    values = {k: _convert(v, hints[k], prefix + k) for k, v in mapping.items()}
    return cls(**values)


def load_config(path, *, out=None) -> RunConfig:
    """Read and check a YAML run configuration; input paths become absolute (relative to the file).

    out: overrides the file's `out` (the CLI's --out). Raises ConfigError naming the file and key.
    """
    import yaml

    from idjax.models import is_embedded

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read it ({e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of keys (pool, target, k, ...), got {type(raw).__name__}")
    if out is not None:
        raw = {**raw, "out": str(out)}
    base = p.resolve().parent
    for key in ("pool", "target", "eval"):
        if isinstance(raw.get(key), str):
            raw[key] = str(_under(base, raw[key]))
    if isinstance(raw.get("model"), str) and not is_embedded(raw["model"]):
        candidate = _under(base, raw["model"])
        if candidate.exists():
            raw["model"] = str(candidate)
    try:
        config = _build(RunConfig, raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    try:
        check_inputs(config)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
    return config


def _under(base: Path, value: str) -> Path:
    q = Path(value).expanduser()
    return q if q.is_absolute() else base / q


def check_inputs(config: RunConfig) -> None:
    """The input files exist and the model resolves: fail before any work starts."""
    from idjax.models import resolve

    for key in ("pool", "target", "eval"):
        value = getattr(config, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"key '{key}': no such file or directory: {value}")
    try:
        resolve(config.model)
    except ValueError as e:  # CheckpointError
        raise ConfigError(f"key 'model': {e}") from None


# ----------------------------------------------------------------------------- files and fingerprints


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, default=str).encode() + b"\n"))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _file_digest(path: Path) -> str:
    """sha256 of the content; for huge files (model shards) size, mtime and 1 MiB at each end."""
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= _HASH_WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def path_fingerprint(path) -> str | None:
    """A fingerprint of a file's or a directory's content (not of its name or location)."""
    from idjax.io import fingerprint

    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        return _file_digest(p)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
        return fingerprint([[str(q.relative_to(p)), _file_digest(q)] for q in files])
    raise ConfigError(f"no such file or directory: {p}")


def _save_examples(path: Path, examples) -> None:
    """Tokenized examples as one .npz of plain arrays (no pickles): ragged tokens + offsets."""
    def cat(arrays):
        return np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)

    arrays = {
        "ids": np.array([e.id for e in examples], dtype=str),
        "tasks": np.array([e.task or "" for e in examples], dtype=str),
        "has_task": np.array([e.task is not None for e in examples], dtype=bool),
        "index": np.array([e.index for e in examples], dtype=np.int64),
        "truncated": np.array([e.truncated for e in examples], dtype=bool),
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int64),
        "input_ids": cat([e.input_ids for e in examples]),
        "labels": cat([e.labels for e in examples]),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _load_examples(path: Path):
    from idjax.data import Example

    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    ends = np.cumsum(a["lengths"])
    starts = ends - a["lengths"]
    return [Example(int(a["index"][i]), str(a["ids"][i]), str(a["tasks"][i]) if a["has_task"][i] else None,
                    a["input_ids"][s:e].copy(), a["labels"][s:e].copy(), bool(a["truncated"][i]))
            for i, (s, e) in enumerate(zip(starts, ends))]


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RunResult:
    """What `run` did: per-stage status ("computed", "cached", "skipped"), timings and the summary."""

    out: Path
    status: dict[str, str]
    seconds: dict[str, float]
    summary: dict


class _Runner:
    def __init__(self, config: RunConfig, force: Iterable[str], source=None):
        force = set(force)
        unknown = force - set(STAGES) - {"all"}
        if unknown:
            raise ConfigError(f"--force: unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(STAGES)}, all")
        self.config = config
        self.where = f"{source}: " if source is not None else ""  # config errors found late name the file
        self.out = Path(config.out)
        first = min([STAGES.index(s) for s in force if s in STAGES] + ([0] if "all" in force else [len(STAGES)]))
        self.force = set(STAGES[first:])  # forcing a stage forces everything downstream
        self.status: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.fps: dict[str, str | None] = {}
        self.dirty = False  # a stage was computed: everything after it is recomputed
        self._tok = None
        self._model_key, self._model = None, None

    # -- stage bookkeeping

    def stage(self, name: str, inputs: dict, compute: Callable[[Path], dict], *, resumable: bool = False) -> dict:
        """Run `compute(stage_dir)` unless the done-marker holds the fingerprint of `inputs`."""
        from idjax.io import fingerprint

        d = self.out / name
        fp = fingerprint(inputs)
        self.fps[name] = fp
        marker = _read_json(d / MARKER)
        if name not in self.force and not self.dirty and marker and marker.get("fingerprint") == fp:
            log.info("stage %s: cached (%s)", name, d)
            self.status[name], self.seconds[name] = "cached", 0.0
            return marker["result"]
        if name in self.force:
            why = "forced"
        elif not marker:
            why = "no finished result"
        elif self.dirty:
            why = "an upstream stage was recomputed"
        else:
            old = marker.get("inputs") or {}
            changed = sorted(k for k in set(old) | set(inputs) if old.get(k) != inputs.get(k))
            why = f"inputs changed: {', '.join(changed) or 'fingerprint'}"
        log.info("stage %s: computing (%s)", name, why)
        # Resume only the same work cut short: not when forced, nor after an upstream recompute.
        resume = self._claim(d, fp, resumable and name not in self.force and not self.dirty)
        t0 = time.perf_counter()
        result = compute(d, resume) if resumable else compute(d)
        seconds = round(time.perf_counter() - t0, 2)
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        _write_json(d / MARKER, {"stage": name, "fingerprint": fp, "inputs": inputs, "result": result,
                                 "seconds": seconds, "finished": now})
        log.info("stage %s: done in %.1f s", name, seconds)
        self.status[name], self.seconds[name] = "computed", seconds
        self.dirty = True
        return result

    def _claim(self, d: Path, fp: str, resumable: bool) -> bool:
        """Make `d` ours and empty (or keep it to resume the same interrupted work); True if resuming."""
        if d.exists() and not d.is_dir():
            raise ConfigError(f"{d} exists and is not a directory; choose another out directory")
        if d.is_dir() and any(d.iterdir()) and not ((d / MARKER).exists() or (d / STARTED).exists()):
            raise ConfigError(f"{d} exists and was not written by `idjax run`; choose another out directory")
        (d / MARKER).unlink(missing_ok=True)  # from here on the old result is no longer "done"
        started = _read_json(d / STARTED)
        if resumable and started and started.get("fingerprint") == fp:
            return True
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        _write_json(d / STARTED, {"fingerprint": fp})
        return False

    # -- lazily loaded things (a fully cached run loads no model)

    def tokenizer(self):
        from idjax import models

        if self._tok is None:
            self._tok = models.load_tokenizer(models.resolve(self.config.model))
        return self._tok

    def model(self, path):
        """One model at a time, so a run never holds the base, warmed-up and trained models at once."""
        from idjax import models

        key = str(path)
        if self._model_key != key:
            self._model = None
            self._model, _ = models.load(path, dtype=self.config.dtype, tokenizer=False)
            self._model_key = key
        return self._model

    def before_model(self):
        """The model selection scores and fine-tuning starts from: the warmed-up one, else the base."""
        return self.model(self.out / "warmup" if self.config.warmup is not None else self.config.model)

    # -- the stages

    def run(self) -> RunResult:
        c = self.config
        t_start = time.perf_counter()
        check_inputs(c)
        self.out.mkdir(parents=True, exist_ok=True)
        model_fp = path_fingerprint(self._resolved_model())

        # 1. data
        data_inputs = {"pool": path_fingerprint(c.pool), "pool_limit": c.pool_limit,
                       "target": path_fingerprint(c.target), "target_task": c.target_task,
                       "eval": path_fingerprint(c.eval), "eval_limit": c.eval_limit,
                       "max_length": c.max_length, "tokenizer": model_fp}
        data_info = self.stage("data", data_inputs, self._data)
        d = self.out / "data"
        pool, targets, evals = (_load_examples(d / f"{n}.npz") for n in ("pool", "targets", "eval"))
        pad = int(data_info["pad_id"])
        k = self.k(len(pool))

        # 2. warm-up
        if c.warmup is None:
            log.info("stage warmup: skipped (no warm-up recipe: selection uses the plain GD update model, "
                     "eta = gd_lr = %g)", c.gd_lr)
            self.status["warmup"], self.seconds["warmup"], self.fps["warmup"] = "skipped", 0.0, None
            warm_info = None
        else:
            w = c.warmup
            inputs = {"data": self.fps["data"], "model": model_fp, "dtype": c.dtype,
                      "recipe": dataclasses.asdict(w), "batch_size": w.batch_size or c.batch_size, "seed": c.seed}
            warm_info = self.stage("warmup", inputs, lambda sd: self._warmup(sd, pool, data_info))

        # 3. selection
        sel_keys = ("landmarks", "exact", "landmark_method", "propagation", "order", "hessian", "lam",
                    "aggregate", "rank_by", "proj_dim", "proj_kind", "params", "normalize", "microbatch",
                    "embed_blocks", "embed_tangents", "embed_dim", "seed", "batch_size")
        inputs = {"data": self.fps["data"], "warmup": self.fps["warmup"], "model": model_fp, "dtype": c.dtype,
                  "k": k, "gd_lr": c.gd_lr if c.warmup is None else None,
                  **{key: getattr(c, key) for key in sel_keys}}
        sel_info = self.stage("select", inputs, lambda sd: self._select(sd, pool, targets, k))

        # 4. fine-tuning on the selection
        t = c.train
        inputs = {"select": self.fps["select"], "recipe": dataclasses.asdict(t),
                  "batch_size": t.batch_size or c.batch_size, "seed": c.seed}
        train_info = self.stage("train", inputs, lambda sd, resume: self._train(sd, resume, pool, pad),
                                resumable=True)

        # 5. evaluation before / after
        from idjax.io import fingerprint

        before_fp = fingerprint({"data": self.fps["data"], "warmup": self.fps["warmup"], "model": model_fp,
                                 "dtype": c.dtype, "batch_size": c.batch_size})
        previous = _read_json(self.out / "eval" / "eval.json")
        inputs = {"train": self.fps["train"], "before": before_fp}
        eval_info = self.stage("eval", inputs, lambda sd: self._eval(sd, evals, pad, before_fp, previous))

        summary = {
            "out": str(self.out), "stages": dict(self.status),
            "pool": len(pool), "targets": len(targets), "k": k, "selected": sel_info["selected"],
            "warmup_steps": None if warm_info is None else warm_info["steps"],
            "train_steps": train_info["steps"],
            "eval": {"samples": eval_info["after"]["samples"], "source": data_info["eval"]["source"],
                     "before": eval_info["before"]["loss"], "after": eval_info["after"]["loss"],
                     "delta": eval_info["delta"]},
            "files": {"selection": str(self.out / "select" / "selection.jsonl"),
                      "meta": str(self.out / "select" / "selection.meta.json"),
                      "model": str(self.out / "train" / "model"), "eval": str(self.out / "eval" / "eval.json")},
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        _write_json(self.out / "run.json", {"config": c.to_dict(), "summary": summary, "stage_seconds": self.seconds})
        return RunResult(self.out, dict(self.status), dict(self.seconds), summary)

    def _resolved_model(self) -> Path:
        from idjax.models import resolve

        return resolve(self.config.model)

    def k(self, n: int) -> int:
        c = self.config
        k = c.k if isinstance(c.k, int) else max(1, round(c.k * n))
        if k > n:
            raise ConfigError(f"{self.where}key 'k': {k} is larger than the pool ({n} samples with a response token in "
                              f"{c.pool})")
        return k

    def _data(self, d: Path) -> dict:
        from idjax import data

        c = self.config
        tok = self.tokenizer()
        pool_records = data.read_records(c.pool, limit=c.pool_limit)
        if c.target_task:
            from idjax import tasks

            task = tasks.load_task(c.target_task, c.target)
            target_records, target_source = task.target, f"{c.target_task} target set"
        else:
            task, target_records, target_source = None, data.read_records(c.target), str(c.target)
        pool, pstats = data.tokenize(pool_records, tok, max_length=c.max_length, source=str(c.pool))
        targets, tstats = data.tokenize(target_records, tok, max_length=c.max_length, source=target_source)
        if not pool:
            raise data.DataError(f"{c.pool}: no sample has a response token ({len(pstats.skipped_no_response)} "
                                 f"skipped at max_length={c.max_length})")
        if not targets:
            raise data.DataError(f"{target_source}: no target sample has a response token "
                                 f"({len(tstats.skipped_no_response)} skipped at max_length={c.max_length})")
        if c.eval is not None:
            eval_records, eval_source = data.read_records(c.eval, limit=c.eval_limit), str(c.eval)
        elif task is not None:
            eval_records, eval_source = task.eval_records[:c.eval_limit], f"{c.target_task} evaluation set"
        else:
            log.warning("no `eval` set: the target loss is measured on the target set, which selection also saw")
            eval_records, eval_source = target_records[:c.eval_limit], f"{target_source} (no eval set given)"
        evals, estats = data.tokenize(eval_records, tok, max_length=c.max_length, source=eval_source)
        if not evals:
            raise data.DataError(f"{eval_source}: no sample has a response token to evaluate")
        for name, examples in (("pool", pool), ("targets", targets), ("eval", evals)):
            _save_examples(d / f"{name}.npz", examples)

        def stats(s, source):
            return {"source": source, "records": s.n_records, "kept": s.n_kept, "truncated": s.n_truncated,
                    "skipped_no_response": len(s.skipped_no_response)}

        result = {"pool": stats(pstats, str(c.pool)), "targets": stats(tstats, target_source),
                  "eval": stats(estats, eval_source), "pad_id": int(tok.pad_token_id or 0)}
        _write_json(d / "summary.json", result)
        return result

    def _warmup(self, d: Path, pool, data_info) -> dict:
        from idjax import train
        from idjax.optim import OptimizerSpec

        c, w = self.config, self.config.warmup
        n_records = int(data_info["pool"]["records"])
        chosen = set(train.warmup_subset(n_records, w.fraction, c.seed).tolist())
        examples = [e for e in pool if e.index in chosen]  # what train.warmup_examples would tokenize
        if not examples:
            raise ValueError("no warm-up sample has a response token: raise warmup.fraction or max_length")
        config = train.TrainConfig(optimizer=OptimizerSpec(w.optimizer, w.lr, clip_norm=1.0),
                                   batch_size=w.batch_size or c.batch_size, steps=w.steps, seed=c.seed)
        base = self.model(c.model)
        result = train.warmup(base, examples, self.tokenizer(), config, d, pool_size=n_records, fraction=w.fraction)
        # The exported model + optimizer state are what selection reads; the Orbax checkpoint (params
        # and both Adam moments again) only serves to resume, and this run is finished.
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
        return {"samples": len(examples), "steps": int(result.state.step),
                "losses": [round(h["loss"], 4) for h in result.history]}

    def _select(self, d: Path, pool, targets, k: int) -> dict:
        from flax import nnx

        from idjax import pipeline
        from idjax.embed import EmbedConfig
        from idjax.optim import load_optimizer_state, update_model
        from idjax.selection_file import write_selection

        c = self.config
        model = self.before_model()
        update = None
        if c.warmup is not None:
            spec, state = load_optimizer_state(self.out / "warmup", model)
            update = update_model(spec, state, nnx.state(model, nnx.Param))
            del state
        config = pipeline.SelectConfig(
            k=k, landmarks=c.landmarks, exact=c.exact, landmark_method=c.landmark_method,
            propagation=c.propagation, order=c.order, hessian=c.hessian, lam=c.lam, learning_rate=c.gd_lr,
            aggregate=c.aggregate, rank_by=c.rank_by, proj_dim=c.proj_dim, proj_kind=c.proj_kind, params=c.params,
            normalize=c.normalize, microbatch=c.microbatch, seed=c.seed, batch_size=c.batch_size,
            chunk_rows=c.chunk_rows,
            embed=EmbedConfig(num_blocks=c.embed_blocks, num_tangents=c.embed_tangents, dim=c.embed_dim, seed=c.seed))
        # Stores of another chunk size cannot be reopened (a chunk is the unit of resumption): one
        # directory per chunk size keeps a change of chunk_rows from failing the run.
        store = self.out / "store" / f"chunk-rows-{c.chunk_rows}"
        selection = pipeline.select_samples(model, pool, targets, config, update=update, store_dir=store)
        write_selection(selection, pool, d / "selection.jsonl", {"command": "idjax run", "run": c.to_dict()})
        info = selection.info
        return {"selected": int(len(selection.rows)), "landmarks": int(info["landmarks"]),
                "update_model": info["update_model"], "timings_s": info["timings_s"], "stores": info["stores"],
                "solver": info["solver"]}

    def _train(self, d: Path, resume: bool, pool, pad: int) -> dict:
        from idjax import train
        from idjax.optim import OptimizerSpec
        from idjax.selection_file import read_selection

        c, t = self.config, self.config.train
        rows, weights = read_selection(self.out / "select" / "selection.jsonl", [{"id": e.id} for e in pool],
                                       t.weighted)
        by_id = {e.id: e for e in pool}
        examples = [dataclasses.replace(by_id[r["id"]], index=j) for j, r in enumerate(rows)]
        base = train.TrainConfig(optimizer=OptimizerSpec(t.optimizer, t.lr), batch_size=t.batch_size or c.batch_size,
                                 steps=t.steps, epochs=t.epochs, seed=c.seed)
        steps = train.total_steps(examples, base)
        spec = OptimizerSpec(t.optimizer, t.lr, schedule=t.schedule, warmup_steps=min(t.lr_warmup_steps, steps - 1),
                             total_steps=steps if t.schedule != "constant" else 0, weight_decay=t.weight_decay,
                             clip_norm=t.clip_norm)
        config = dataclasses.replace(base, optimizer=spec)
        out = d / "model"
        resume_from = out if resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()) \
            else None
        if resume_from is not None:
            log.info("stage train: resuming the interrupted fine-tuning from %s", out / "checkpoints")
        elif out.exists():
            shutil.rmtree(out)
        result = train.train(self.before_model(), examples, config, weights=weights, out_dir=out,
                             resume=resume_from, tokenizer=self.tokenizer(), pad_id=pad)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the exported model is the result
        hist = result.history
        return {"samples": len(examples), "steps": int(result.state.step), "weighted": t.weighted,
                "first_loss": hist[0]["loss"] if hist else None, "last_loss": hist[-1]["loss"] if hist else None}

    def _eval(self, d: Path, evals, pad: int, before_fp: str, previous) -> dict:
        from idjax import evaluate

        c = self.config
        if previous and previous.get("before_fingerprint") == before_fp and "before" in previous:
            log.info("stage eval: the model before fine-tuning is unchanged; its loss is reused")
            before = previous["before"]
        else:
            before = evaluate.target_loss(self.before_model(), evals, batch_size=c.batch_size, pad_id=pad)
        after = evaluate.target_loss(self.model(self.out / "train" / "model"), evals, batch_size=c.batch_size,
                                     pad_id=pad)
        result = {"before": before, "after": after, "delta": after["loss"] - before["loss"],
                  "before_fingerprint": before_fp}
        _write_json(d / "eval.json", result)
        return result


def run(config: RunConfig, *, force: Iterable[str] = (), source=None) -> RunResult:
    """Run (or resume, or reuse) every stage of `config`; see the module docstring.

    force: stage names (or "all") to recompute even when cached; everything downstream follows.
    source: the config file, named in errors about its keys that show only once data is read (k).
    """
    return _Runner(config, force, source).run()
