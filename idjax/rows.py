"""Reading rows of a pool-sized array held anywhere: numpy, a memmap, or any object with len(),
.shape and row slices x[a:b] (an on-disk store). Landmark choice and propagation stream E through
these, in fixed-size zero-padded chunks so that each compiled function compiles once."""

from __future__ import annotations

from typing import Any

import numpy as np


def rows_shape(embeddings: Any) -> tuple[int, int]:
    """(N, e) of a 2-D row-sliceable array, with a clear error for anything else."""
    shape = getattr(embeddings, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"embeddings must be a 2-D [N, e] array, got shape {shape}")
    n, e = int(shape[0]), int(shape[1])
    if len(embeddings) != n:
        raise ValueError(f"embeddings: len() = {len(embeddings)} but shape[0] = {n}")
    if n < 1 or e < 1:
        raise ValueError(f"embeddings must be non-empty, got shape {tuple(shape)}")
    return n, e


def check_chunk_rows(chunk_rows: int) -> int:
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return int(chunk_rows)


def read_rows(x: Any, a: int, b: int, rows: int) -> np.ndarray:
    """Rows [a, b) of x as float32, zero padded to `rows` rows (a static shape for jit).

    A fresh array every time: on the CPU backend jax may alias host memory, so a reused buffer
    could change under a computation still in flight.
    """
    blk = np.asarray(x[a:b], dtype=np.float32)
    if blk.shape[0] == rows:
        return np.ascontiguousarray(blk)
    out = np.zeros((rows, blk.shape[1]), np.float32)
    out[: blk.shape[0]] = blk
    return out


def take_rows(x: Any, idx: np.ndarray) -> np.ndarray:
    """x[idx] as float32 for ndarray/memmap (fancy indexing), else one row slice at a time."""
    idx = np.asarray(idx, np.int64)
    if isinstance(x, np.ndarray):
        order = np.argsort(idx, kind="stable")  # sorted reads are sequential on a memmap
        out = np.empty((idx.size, x.shape[1]), np.float32)
        out[order] = np.asarray(x[idx[order]], dtype=np.float32)
        return out
    return np.stack([np.asarray(x[int(i):int(i) + 1], dtype=np.float32)[0] for i in idx]) \
        if idx.size else np.zeros((0, x.shape[1]), np.float32)


def row_spans(n: int, rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]
