"""The configuration of `idjax run`: the YAML keys are the fields of RunConfig (and of its nested
WarmupRecipe / TrainRecipe), checked by type and range, with one-line errors naming the file and key.

Types come from the dataclass annotations, choices from field metadata (`_choice`), ranges from
`_validate`: adding a key is adding a field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path


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
