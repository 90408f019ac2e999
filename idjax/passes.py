"""The selection's passes over the pool (docs/method.md 4-6), each into a fingerprinted, resumable
store: JVP embeddings of every row, projected gradients and curvature of the landmarks, and the
cached target direction; with the fingerprints that name those stores.

A store's directory name carries the fingerprint of everything its rows depend on (model, data,
configuration): an interrupted pass resumes at its first missing chunk, and a later selection with
another target set, k or solver reuses the pool's rows. With several processes each computes its own
chunks (`fill_store`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import time
import zipfile
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from idjax import data as D
from idjax import distributed as dist
from idjax import sharding as shd
from idjax.embed import EmbedConfig, JVPEmbedder
from idjax.grads import PerExampleGradients
from idjax.hessian import ProjectedCurvature
from idjax.io import atomic_write, fingerprint
from idjax.optim import UpdateModel
from idjax.store import ArrayStore, StoreError, compute_missing

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- fingerprints


def _bits(x):
    """The raw bits of an array as unsigned integers of its width (bool as uint8)."""
    import jax.numpy as jnp

    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint8)
    width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, width)


@functools.partial(jax.jit, static_argnums=1)
def _leaf_digest(x, strides: tuple[int, ...]):
    """(sum of the bits mod 2^32, a strided sample): computed where the array lives, sharded or not. The
    integer sum wraps, so it is exact and the same whatever order the devices add in."""
    import jax.numpy as jnp

    checksum = jnp.sum(_bits(x).astype(jnp.uint32), dtype=jnp.uint32)
    return checksum, x[tuple(slice(None, None, s) for s in strides)]


def tree_fingerprint(tree) -> str:
    """A cheap, stable fingerprint of a pytree of arrays: shapes, dtypes, an exact checksum of every
    bit and a strided sample of about 4096 values per leaf.

    Both are computed on the devices that hold each leaf: only the checksum and the sample come to the
    host, so an 8B model sharded over hosts is fingerprinted without gathering it, in the same value
    on any mesh (the checksum is an integer sum, the sample the same elements).
    """
    parts = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        x = leaf if isinstance(leaf, jax.Array) else jax.numpy.asarray(leaf)
        per_axis = math.ceil(4096 ** (1 / x.ndim)) if x.ndim else 1
        strides = tuple(max(1, math.ceil(n / per_axis)) for n in x.shape)
        checksum, sample = _leaf_digest(x, strides)
        parts.append([jax.tree_util.keystr(path), list(x.shape), str(x.dtype), int(shd.to_host(checksum)),
                      fingerprint(np.asarray(shd.to_host(sample), np.float32).ravel())])
    return fingerprint(parts)


def model_fingerprint(model) -> str:
    from flax import nnx

    return fingerprint([dataclasses.asdict(model.config) | {"rope": str(model.config.rope)},
                        tree_fingerprint(nnx.state(model, nnx.Param))])


def update_fingerprint(update: UpdateModel | None) -> str:
    if update is None:
        return "gd"
    return fingerprint([update.name, update.eta, tree_fingerprint(update.a), tree_fingerprint(update.b)])


# ----------------------------------------------------------------------------- stages


@contextlib.contextmanager
def timed_stage(name: str, timings: dict, *, label: str = "stage", digits: int = 3):
    """Log "<label> <name> ..." and, when the block ends (even by an error), its seconds, rounded to
    `digits`, into timings[name]: the per-stage times a selection's metadata and the demo report."""
    t0 = time.perf_counter()
    log.info("%s %s ...", label, name)
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, digits)
        log.info("%s %s: %.1f s", label, name, timings[name])


def open_store(root: Path, name: str, shape, chunk_rows: int, fp: dict) -> ArrayStore:
    """The float32 store `name` under `root`, in a directory named by its fingerprint `fp`."""
    directory = root / f"{name}-{fingerprint(fp)[:12]}"
    return ArrayStore.open(directory, shape=shape, dtype=np.float32, chunk_rows=chunk_rows, fingerprint=fp)


def save_targets(path: Path, fp: dict, v_proj, v_norm: float, columns) -> None:
    """The projected target direction (and per-target columns) next to the stores: every later
    selection with the same model, targets, update model and sketch (another k, lam, order or
    ranking rule) skips the target gradient and HVP."""
    arrays = {"fingerprint": np.frombuffer(json.dumps(fp, sort_keys=True).encode(), np.uint8),
              "v_proj": v_proj, "v_norm": np.float64(v_norm)}
    if columns is not None:
        arrays["columns"] = columns
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_targets(path: Path, fp: dict):
    """(v_proj, v_norm, columns) from a file written by save_targets, or None to recompute."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(z["fingerprint"].tobytes()) != json.loads(json.dumps(fp, sort_keys=True)):
                raise ValueError("fingerprint mismatch")
            return z["v_proj"], float(z["v_norm"]), (z["columns"] if "columns" in z else None)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # cut short, overwritten
        log.warning("recomputing the target direction: %s is unreadable (%s)", path, exc)
        return None


def fill_store(store: ArrayStore, fn, desc: str) -> None:
    """Compute the store's missing chunks. With several processes: this process's chunks only (chunk i
    belongs to process i mod P), checking between chunks that no other process failed or died, then a
    barrier; afterwards every chunk must be on disk (the stores live on a shared file system)."""
    if not dist.multi_process():
        compute_missing(store, fn, desc=desc)
        return
    last = [time.monotonic()]

    def checked(start, stop):
        if time.monotonic() - last[0] > 2.0:  # cheap, but not for every chunk
            dist.check_peers()
            last[0] = time.monotonic()
        return fn(start, stop)

    dist.set_note(f"the finished chunks are kept in {store.path.parent}; re-run the same command to resume")
    compute_missing(store, checked, desc=f"{desc} (process {dist.process_index()})",
                    chunks=dist.process_chunks(store.num_chunks))
    dist.barrier(desc)
    missing = store.missing()
    if missing:
        raise StoreError(f"{len(missing)} chunks of {store.path} (e.g. {missing[:5]}) are missing after every "
                         "process finished its part: do all processes see the same --store directory?")


def _ladder_and_real_tokens(examples: Sequence[D.Example], batch_size: int, chunk_rows: int | None):
    lengths = [len(e.input_ids) for e in examples]
    ladder = D.length_ladder(max(lengths))
    return ladder, round(D.real_token_fraction(lengths, batch_size, ladder, chunk_rows=chunk_rows), 4)


def real_tokens(examples: Sequence[D.Example], batch_size: int, chunk_rows: int | None = None) -> float:
    """The share of the computed tokens that are real when a pass batches `examples` (each chunk of
    chunk_rows on its own) in length-sorted batches: what the stage logs and the sidecar reports."""
    return _ladder_and_real_tokens(examples, batch_size, chunk_rows)[1]


def sorted_ladder(examples: Sequence[D.Example], batch_size: int, chunk_rows: int | None, stage: str):
    """The padded lengths of a pass's length-sorted batches, one ladder for every chunk so that they share
    compilations; logs the share of the computed tokens that are real."""
    ladder, real = _ladder_and_real_tokens(examples, batch_size, chunk_rows)
    log.info("%s: %.1f%% of the computed tokens are real (%d rows in length-sorted batches of %d)",
             stage, 100 * real, len(examples), batch_size)
    return ladder


def _heads_and_share(examples: Sequence[D.Example], batch_size: int, chunk_rows: int | None, ladder=None):
    lengths = [len(e.input_ids) for e in examples]
    counts = [len(D.loss_positions(e.labels)) for e in examples]
    ladder = D.length_ladder(max(lengths)) if ladder is None else ladder
    heads = D.head_plan(lengths, counts, batch_size, ladder, chunk_rows=chunk_rows)
    return heads, round(D.head_fraction(lengths, counts, batch_size, ladder, heads, chunk_rows=chunk_rows), 4)


def loss_share(examples: Sequence[D.Example], batch_size: int, chunk_rows: int | None = None) -> float:
    """The share of the positions the lm-head runs at that carry loss, when a pass batches `examples` with
    their loss positions (loss_heads): what the sidecar reports next to the real-token fraction."""
    return _heads_and_share(examples, batch_size, chunk_rows)[1]


def loss_heads(examples: Sequence[D.Example], batch_size: int, chunk_rows: int | None, ladder, stage: str):
    """{padded length: lm-head positions} of a pass's length-sorted batches (data.head_plan), one per length
    for every chunk so that they share compilations; logs the share of those positions that carry loss."""
    heads, share = _heads_and_share(examples, batch_size, chunk_rows, ladder)
    log.info("%s: %.1f%% of the positions the lm-head runs at carry loss", stage, 100 * share)
    return heads


def mesh_batch(batch_size: int, mesh) -> int:
    """The batch size rounded up to fill every device of `mesh` (unchanged without one)."""
    return shd.fit_batch_size(batch_size, mesh) if shd.active(mesh) else batch_size


def embed_pool(model, examples: Sequence[D.Example], config: EmbedConfig, store_dir, *, batch_size: int = 8,
               chunk_rows: int = 256, model_fp: str | None = None, data_fp: str | None = None,
               mesh=None) -> ArrayStore:
    """JVP embeddings of every pool example, in a resumable store: rows follow `examples`.

    mesh: devices each batch is split over (default sharding.get_mesh(): every local device).
    With several processes, each computes its own chunks, then all wait for the store to be complete.
    """
    if not examples:
        raise D.DataError("the pool is empty")
    mesh = shd.get_mesh() if mesh is None else mesh
    with dist.failures_published():
        embedder = JVPEmbedder(model, config, mesh=mesh)
        fp = {"kind": "jvp-embeddings", "model": model_fp or model_fingerprint(model),
              "data": data_fp or D.examples_fingerprint(examples), "embed": dataclasses.asdict(config)}
        store = open_store(Path(store_dir), "embeddings", (len(examples), embedder.dim), chunk_rows, fp)
        pad = model.config.pad_token_id or 0
        batch_size = mesh_batch(batch_size, mesh)
        ladder = sorted_ladder(examples, batch_size, chunk_rows, "embed pool")

        def chunk(start, stop):
            return embedder.run(D.sorted_batches(examples[start:stop], batch_size, pad_id=pad, ladder=ladder),
                                progress=False)

        fill_store(store, chunk, "embed pool")
    return store


def row_batches(examples, rows, batch_size: int, chunk_rows: int, pad_id: int, stage: str):
    """batches(start, stop): the length-sorted batches, with loss positions, of examples[rows[start:stop]], one
    chunk of a resumable pass over those rows; every chunk pads to one ladder and one head per length (logged)."""
    chosen = [examples[int(r)] for r in rows]
    ladder = sorted_ladder(chosen, batch_size, chunk_rows, stage)
    heads = loss_heads(chosen, batch_size, chunk_rows, ladder, stage)
    return lambda start, stop: D.sorted_batches(chosen[start:stop], batch_size, pad_id=pad_id, ladder=ladder,
                                                heads=heads)


def gradient_store(model, examples, rows, projector, gcfg, precondition, store_dir, fp, batch_size, chunk_rows,
               mesh=None):
    """Projected gradients of examples[rows] (in that order), through a resumable store."""
    grads = PerExampleGradients(model, projector, gcfg, precondition=precondition, mesh=mesh)
    dim = out_dim(grads.selected, projector, grads.mask)
    store = open_store(Path(store_dir), "gradients", (len(rows), dim), chunk_rows, fp)
    batches = row_batches(examples, rows, batch_size, chunk_rows, model.config.pad_token_id or 0,
                          "landmark gradients")
    fill_store(store, lambda start, stop: grads.run(batches(start, stop), progress=False), "landmark gradients")
    return store, grads


def out_dim(selected, projector, mask) -> int:
    """The length of one projected gradient of `selected` (after the coordinate mask, if any)."""
    tree = selected if mask is None else mask.apply(selected)
    return int(jax.eval_shape(lambda t: projector.project(t), tree).shape[0])


def curvature_store(model, examples, rows, projector, gcfg, precondition, target_batches, hessian, store_dir, fp,
               batch_size, chunk_rows, mesh=None):
    """Projected H_T u_i of the landmarks (u_i as in the gradient store), through a resumable store."""
    curv = ProjectedCurvature(model, projector, target_batches, gcfg, precondition=precondition, hessian=hessian,
                              mesh=mesh)
    dim = out_dim(curv.selected, projector, None)
    store = open_store(Path(store_dir), "curvature", (len(rows), dim), chunk_rows, fp)
    batches = row_batches(examples, rows, batch_size, chunk_rows, model.config.pad_token_id or 0,
                          "landmark curvature")
    fill_store(store, lambda start, stop: D.collect_rows(batches(start, stop), lambda b: curv(b)[1], progress=False),
               "landmark curvature")
    return store
