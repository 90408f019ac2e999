"""LoRA: low-rank adapters on the stacked projection kernels, as pure functions on parameter trees.

The adapters are a dict {kernel name: {"a", "b"}} beside the base parameters, never inside them, so
training updates only the adapters and `lora_merge` gives plain parameters for export and selection.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from idjax.sharding import param_name

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters W + (alpha / rank) * A @ B on the stacked projection kernels.

    B starts at zero, so step 0 is the base model; A is drawn like PEFT's (uniform +-1/sqrt(in)).
    """

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = sorted(set(self.targets) - set(LORA_TARGETS))
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {bad or '()'}: choose from {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _lora_names(params, lora: LoraConfig) -> list[str]:
    names = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        parts = param_name(path).split(".")
        if parts[0] == "layers" and parts[-1] == "kernel" and parts[-2] in lora.targets and leaf.ndim == 3:
            names.append(".".join(parts))
    return names


def lora_init(params, lora: LoraConfig, key) -> dict[str, dict[str, jax.Array]]:
    """{kernel name: {"a": [layers, in, r], "b": [layers, r, out] zeros}} for every targeted kernel."""
    flat = {param_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
    out = {}
    for i, name in enumerate(_lora_names(params, lora)):
        n, d_in, d_out = flat[name].shape
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (n, d_in, lora.rank), jnp.float32, -bound, bound)
        out[name] = {"a": a, "b": jnp.zeros((n, lora.rank, d_out), jnp.float32)}
    if not out:
        raise ValueError(f"LoRA targets {lora.targets} match no stacked projection kernel")
    return out


def lora_merge(params, adapters, scale: float):
    """Base params with W + scale * A @ B on adapted kernels (float32; the base arrays are not changed)."""
    def merge(path, w):
        ad = adapters.get(param_name(path))
        if ad is None:
            return w
        delta = jnp.einsum("lir,lro->lio", ad["a"], ad["b"], preferred_element_type=jnp.float32)
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(merge, params)


__all__ = ["LORA_TARGETS", "LoraConfig", "lora_init", "lora_merge"]
