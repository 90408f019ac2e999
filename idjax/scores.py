"""Scores and the curvature matrix of the weight problem, from sketched directions (docs/method.md 3, 4.3).

Pure functions of arrays: numpy in gives numpy out (the pipeline keeps float64 on the host),
anything else gives float32 jax arrays, so the same call works inside a caller's jit / vmap.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_HIGHEST = lax.Precision.HIGHEST




def _matmul(a, b):
    """a @ b: numpy stays numpy (the pipeline keeps float64 on the host), jax is float32 HIGHEST."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a @ b
    return jnp.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), precision=_HIGHEST)


class InfluenceScores(NamedTuple):
    """p [n]: p_i = <P u_i, P v>; columns [n, t] or None: <P u_i, P c_j>, one per target sample."""

    p: jax.Array
    columns: jax.Array | None


def influence_scores(gradients, target, *, target_columns=None) -> InfluenceScores:
    """Linear terms of the objective from sketched directions (docs/method.md 3, "cosine scores").

    gradients [n, k]: rows P u_i (u_i = a (.) g_i, normalised for cosine scores); target [k]: P v
    with v = g_T - eta H_T b, unnormalised; target_columns [t, k]: P c_j of normalised per-target
    directions. p = G v is what the weight solver maximises; `cosine_scores` divides by ||v||.
    Numpy inputs give numpy (float64 kept), anything else float32 jax arrays (jittable).
    """
    p = _matmul(gradients, target)
    return InfluenceScores(p, None if target_columns is None else _matmul(gradients, target_columns.T))


def cosine_scores(p, target_norm):
    """p_i / ||v||, with ||v|| the full-space (pre-sketch) norm: an estimate of cos(u_i, v)."""
    return p / target_norm


def curvature_matrix(curvature, gradients):
    """Q_L = (H G^T + G H^T) / 2 with H [l, k] rows P (H_T u_i) and G [l, k] rows P u_j.

    H_T is symmetric but the sketch does not preserve inner products exactly: symmetrised.
    """
    q = _matmul(curvature, gradients.T)
    return 0.5 * (q + q.T)
