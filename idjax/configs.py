"""The configuration of each stage, declared once (idjax/options.py): the dataclass fields are the
Python arguments, the `idjax` flags and the keys of an `idjax run` YAML file, with their defaults,
choices and ranges. This module imports no JAX, so the CLI parses and checks its flags in milliseconds.

- EmbedConfig: the JVP embeddings (docs/method.md 6): `idjax embed`, `idjax select`;
- SelectConfig: everything that decides a selection besides model and data (docs/method.md 3-7);
- Recipe / TrainRecipe / WarmupRecipe: a training run (`idjax train`, `idjax warmup`, run's `train:` / `warmup:`).
"""

from __future__ import annotations

import dataclasses

from idjax import options as O
from idjax.options import like, option

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
COMPUTE_DTYPES = ("float32", "bfloat16")

POOLINGS = ("last", "mean", "response")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """docs/method.md 6: which JVP embedding. Fields are also flags of `idjax embed / select` and keys
    of `idjax run` (idjax/options.py)."""

    num_blocks: int = option(4, "B: decoder blocks kept for JVP embeddings", check=O.AT_LEAST_1,
                             flag="embed-blocks")
    num_tangents: int = option(2, "K: random tangents per JVP embedding", check=O.AT_LEAST_1, flag="embed-tangents")
    dim: int = option(4096, "embedding size after projection (K * d_model when that is smaller: no projection)",
                      check=O.AT_LEAST_1, flag="embed-dim")
    seed: int = option(0, cli=False)
    pooling: str = option("last", "f(x) from the hidden states (see pooled_features)", choices=POOLINGS, cli=False)

    def __post_init__(self):
        O.validate(self)


def landmarks_problem(value) -> str | None:
    """Why `value` is no landmark setting (a fraction of the pool in (0, 1) or a whole count >= 1), or None.

    A non-whole count such as 1.5 would silently become 1 landmark: refused everywhere (CLI, YAML, Python).
    """
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (0 < value < 1 or (value >= 1 and float(value).is_integer())))
    return None if ok else f"must be a fraction of the pool in (0, 1) or a whole count >= 1, got {value!r}"


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Everything that decides a selection besides the model and the data. Each field is also the flag
    of `idjax select` and the key of an `idjax run` config (idjax/options.py)."""

    k: int | None = option(None, "how many samples to select (with --budget-tokens: at most this many)",
                           check=O.AT_LEAST_1)
    budget_tokens: int | None = option(None, "take rows in selection order while their response tokens sum to at "
                                             "most this (equal-token selections)", check=O.AT_LEAST_1)
    landmarks: float = option(0.1, "landmarks: a fraction of the pool (< 1) or a count", check=landmarks_problem)
    exact: bool = option(False, "every sample is a landmark (no embeddings, no propagation; LESS-style)")
    landmark_method: str = option("random", choices=("random", "kmeans++"))
    propagation: str = option("krr", choices=("krr", "ridge"))
    delta: float = option(1e-2, "ridge damping, relative to the kernel's mean diagonal", check=O.NON_NEGATIVE,
                          cli=False)
    order: int = option(1, "2 adds the target Hessian term", choices=(1, 2))
    hessian: str = option("gauss-newton", "for --order 2", choices=("exact", "gauss-newton"))
    lam: float | None = option(None, "weight regulariser (default: the value whose first-order support is the "
                                     "top k)", check=O.FINITE_POSITIVE)
    learning_rate: float = option(1e-5, "step size eta of the GD update model (no optimizer state); only order 2 "
                                        "depends on it", check=O.FINITE_POSITIVE, flag="lr")
    aggregate: str = option("mean", "score against the mean target gradient, or round-robin over target samples",
                            choices=("mean", "round-robin"))
    rank_by: str | None = option(None, "top-k by score or by optimal weight (default: score for order 1, weight "
                                       "for 2)", choices=(None, "score", "weight"))
    proj_dim: int = option(4096, "gradient sketch size (0: no projection)", check=O.NON_NEGATIVE)
    proj_kind: str = option("srht", choices=("srht", "rademacher", "gaussian"))
    params: str | None = option(None, "regex over parameter names (e.g. down_proj); default all", check=O.regex)
    keep: int | None = option(None, "a fixed random subset of this many coordinates before projecting",
                              check=O.AT_LEAST_1, cli=False)
    first_layer: int = option(0, "only the --params of layers N and above (0: every layer): the backward pass of "
                                 "each per-example gradient stops at layer N", check=O.NON_NEGATIVE)
    normalize: bool = option(True, "inner products instead of cosines")
    microbatch: int | None = option(None, "samples per vmapped gradient (default: the most, dividing --batch-size, "
                                          "whose compiled program fits the device's memory)", check=O.AT_LEAST_1)
    remat: bool = option(False, "recompute each layer's activations in the gradient and HVP backward passes: less "
                                "memory (idjax plan says when it is needed), the same results to float32 rounding")
    layerwise: bool = option(False, "per-example gradients layer by layer, each layer's share of the sketch taken as "
                                    "its backward pass makes it: one layer's gradient per sample in memory, not the "
                                    "model's (the fallback of the memory plan otherwise); the same rows to float32 "
                                    "rounding")
    embed: EmbedConfig = option(EmbedConfig(), cli=False)
    seed: int = option(0, "landmarks, tangents, sketches, round-robin order")
    batch_size: int = option(8, "samples per compiled batch", check=O.AT_LEAST_1)
    chunk_rows: int = option(256, "rows per store chunk (the unit of resumption)", check=O.AT_LEAST_1)

    def __post_init__(self):
        O.validate(self)
        if self.k is None and self.budget_tokens is None:
            raise O.ConfigError("give k (how many samples) or budget_tokens (how many response tokens)", "k")
        if self.layerwise and (self.proj_dim == 0 or self.keep):
            raise O.ConfigError("layerwise needs a sketch (proj_dim > 0) and no coordinate subset (keep)", "layerwise")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def num_landmarks(self, n: int) -> int:
        if self.exact:
            return n
        count = round(self.landmarks * n) if self.landmarks < 1 else int(self.landmarks)
        return int(min(n, max(1, count)))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The settings of a training run, before its length is known: the flags of `idjax train / warmup`
    and the keys of an `idjax run` config's `train:` / `warmup:` sections (idjax/options.py)."""

    steps: int | None = option(None, "optimizer steps (default: `epochs` passes)", check=O.AT_LEAST_1)
    epochs: float | None = option(None, "passes over the data (default 1)", check=O.POSITIVE)
    lr: float = option(2e-5, "peak learning rate", check=O.FINITE_NON_NEGATIVE)
    batch_size: int | None = option(None, "samples per microbatch (default: the command's or run's batch size)",
                                    check=O.AT_LEAST_1)
    grad_accum: int = option(1, "microbatches per optimizer step", check=O.AT_LEAST_1)
    optimizer: str = option("adamw", choices=OPTIMIZERS)
    schedule: str = option("linear", "learning-rate decay after the linear warm-up", choices=SCHEDULES)
    lr_warmup_steps: int | None = option(None, "learning-rate warm-up steps (overrides the ratio)",
                                         check=O.NON_NEGATIVE, flag="warmup-steps")
    lr_warmup_ratio: float = option(0.03, "learning-rate warm-up as a fraction of the run's steps",
                                    check=O.UNIT_INTERVAL, flag="warmup-ratio")
    weight_decay: float = option(0.0, check=O.NON_NEGATIVE)
    momentum: float = option(0.9, "SGD momentum (sgd only)", check=O.MOMENTUM)
    clip_norm: float | None = option(1.0, "global gradient-norm clipping (0 or null: off)", check=O.NON_NEGATIVE)
    compute_dtype: str = option("float32", "matmul dtype; master weights stay float32", choices=COMPUTE_DTYPES)
    remat: bool = option(False, "recompute layer activations in the backward pass (less memory); without it, "
                                "the memory plan turns it on only where a step would not fit")
    device_memory: str | None = option(None, "memory per device the training step is planned against, e.g. 24GB "
                                             "(default: the device's own; on a CPU, the host's available memory)",
                                       check=O.memory_size)
    checkpoint_every: int = option(0, "save a checkpoint every N steps (0: at the end)", check=O.NON_NEGATIVE)
    keep_checkpoints: int = option(3, check=O.AT_LEAST_1)

    def __post_init__(self):
        O.validate(self)
        if self.steps is not None and self.epochs is not None:
            raise O.ConfigError("give steps or epochs, not both", "steps")


@dataclasses.dataclass(frozen=True)
class TrainRecipe(Recipe):
    """Fine-tuning on a selection (`idjax train`, an `idjax run` config's `train:`)."""

    weighted: bool = option(False, "use the selection's weights as loss weights")


@dataclasses.dataclass(frozen=True)
class WarmupRecipe(Recipe):
    """docs/method.md 8: a brief training run on a seeded random fraction of the pool (`idjax warmup`,
    an `idjax run` config's `warmup:`); selection then reads the update model (a, b, eta) of its
    optimizer state."""

    schedule: str = like(Recipe, "schedule", default="constant")
    checkpoint_every: int = like(Recipe, "checkpoint_every", help="save a checkpoint every N steps, for a re-run to "
                                 "resume an interrupted warm-up from (0: only on Ctrl-C); deleted when it ends")
    fraction: float = option(0.05, "fraction of the pool to train on", check=O.FRACTION)
