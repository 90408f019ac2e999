"""The configuration of `idjax run`: the YAML keys are the fields of RunConfig and of its nested
WarmupRecipe / TrainRecipe (idjax/configs.py), checked by type, choice and range (idjax/options.py),
with one-line errors naming the file and key. The selection keys are declared by SelectConfig and
EmbedConfig themselves: adding a setting there adds it here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from idjax import options as O
from idjax.configs import EmbedConfig, SelectConfig, TrainRecipe, WarmupRecipe  # noqa: F401 (re-exported)
from idjax.options import ConfigError, from_mapping, like, option, shared_fields


def _k_problem(k) -> str | None:
    ok = not isinstance(k, bool) and ((isinstance(k, int) and k >= 1) or (isinstance(k, float) and 0 < k <= 1))
    return None if ok else f"expected a count >= 1 or a fraction of the pool in (0, 1], got {k!r}"


def _select(name: str):
    return like(SelectConfig, name)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything `idjax run` does; the keys of the YAML file are these field names. The selection keys
    are SelectConfig's and EmbedConfig's own declarations (`like`: same default, choices and range)."""

    pool: str = option(help="chat JSONL / Parquet / local HF dataset dir")
    k: int | float = option(help="selection size: a count (int) or a fraction of the pool (with budget_tokens: "
                                 "at most this many)", check=_k_problem)
    budget_tokens: int | None = _select("budget_tokens")
    target: str | None = option(None, "chat JSONL; with target_task, a file in that task's HF format")
    target_task: str | None = option(None, choices=(None, "gsm8k", "mmlu", "squad", "humaneval"))
    eval: str | None = option(None, "chat JSONL; None: the task's eval set, else the target set")
    model: str = option("smollm2-135m", "HF dir, .gguf file or embedded name")
    dtype: str = option("float32", choices=("float32", "bfloat16"))
    max_length: int = option(1024, "truncate samples to this many tokens", check=O.AT_LEAST_1)
    pool_limit: int | None = option(None, "use the first N pool records", check=O.AT_LEAST_1)
    target_limit: int | None = option(None, "use the first N target records", check=O.AT_LEAST_1)
    eval_limit: int | None = option(None, "evaluate the first N eval records", check=O.AT_LEAST_1)
    remat: bool = option(False, "recompute each decoder layer's activations in every backward pass (warm-up, "
                                "selection, fine-tuning): less memory, the same results to float32 rounding")
    landmarks: float = _select("landmarks")
    exact: bool = _select("exact")
    landmark_method: str = _select("landmark_method")
    propagation: str = _select("propagation")
    order: int = _select("order")
    hessian: str = _select("hessian")
    lam: float | None = _select("lam")
    gd_lr: float = _select("learning_rate")     # eta of the plain-GD update model (no warm-up)
    aggregate: str = _select("aggregate")
    rank_by: str | None = _select("rank_by")
    proj_dim: int = _select("proj_dim")
    proj_kind: str = _select("proj_kind")
    params: str | None = _select("params")
    first_layer: int = _select("first_layer")
    layerwise: bool = _select("layerwise")
    normalize: bool = _select("normalize")
    microbatch: int | None = _select("microbatch")
    embed_blocks: int = like(EmbedConfig, "num_blocks")
    embed_tangents: int = like(EmbedConfig, "num_tangents")
    embed_dim: int = like(EmbedConfig, "dim")
    seed: int = _select("seed")
    batch_size: int = _select("batch_size")
    chunk_rows: int = _select("chunk_rows")
    warmup: WarmupRecipe | None = option(None, "the warm-up; None: no warm-up, GD update model with gd_lr")
    train: TrainRecipe = option(TrainRecipe(), "the fine-tuning on the selection")
    out: str = option("idjax-run", "output directory")

    def __post_init__(self):
        O.validate(self)
        if self.target is None and self.target_task is None:
            raise ConfigError("give `target` (a chat JSONL) or `target_task` (a task recipe)", "target")
        if not self.out:
            raise ConfigError("must be a directory name", "out")
        from idjax.outputs import check_outputs

        problem = check_outputs({k: getattr(self, k) for k in ("pool", "target", "eval", "model")},
                                dirs={"out": self.out})
        if problem:
            raise ConfigError(problem, "out")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def select_config(self, k: int) -> SelectConfig:
        """The SelectConfig of this run for a pool where `k` resolved to this count."""
        embed = EmbedConfig(**shared_fields(self, EmbedConfig), seed=self.seed)
        return SelectConfig(k=k, **shared_fields(self, SelectConfig), embed=embed)


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
        config = from_mapping(RunConfig, raw)
        check_inputs(config)
    except ConfigError as e:
        raise ConfigError(f"{p}: key '{e.key}': {e.text}" if e.key else f"{p}: {e.text}") from None
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
            raise ConfigError(f"no such file or directory: {value}", key)
    try:
        resolve(config.model)
    except ValueError as e:  # CheckpointError
        raise ConfigError(str(e), "model") from None
