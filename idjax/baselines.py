"""Baseline selection methods (docs/method.md 9), behind the same interface as Influence Distillation.

Why here: a comparison is only fair when every method sees the same pool, budget, tokenization and
store, and writes the same selection file that `idjax train` reads. `select_baseline` returns the
pipeline's `Selection`, so `selection_file.write_selection` and the training recipe are shared.

    random   k rows drawn uniformly with the seed (the paper's floor)
    rds      RDS+ (Ivison et al. 2025): final-layer hidden states of the whole sequence, mean-pooled
             with weights proportional to the token position, cosine with every target sample,
             then round-robin over the target samples
    mid-ppl  the k rows whose response perplexity under the model is closest to the pool's median
             (Marion et al. 2023: drop both the trivial and the noisy tails)
    full     every row (the "train on everything" reference; k is ignored)

LESS-style exact first-order influence is `select_samples` with `exact=True` (every sample a
landmark), so it is not repeated here. Per-sample features go through the same resumable chunked
store as the embeddings, so an interrupted baseline resumes too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax import data as D
from idjax import passes as P
from idjax.pipeline import Selection, cut_to_token_budget, ranking_size
from idjax.grads import sample_losses
from idjax.select import round_robin

log = logging.getLogger(__name__)

METHODS = ("random", "rds", "mid-ppl", "full")


@partial(jax.jit, static_argnums=(0, 6))
def _features(graphdef, state, ids, mask, labels, positions, what: str):
    """Per row: the position-weighted mean of the final-normed hidden states ("rds", [B, D]: no lm-head) or
    the mean response-token loss ("loss", [B, 1]; the lm-head at the loss positions only), float32."""
    model = nnx.merge(graphdef, state)
    if what == "rds":
        hidden, _ = model.hidden_states(ids, mask)
        m = mask.astype(jnp.float32)
        w = jnp.cumsum(m, axis=-1) * m                      # 1, 2, ..., n on real tokens, 0 on padding
        w = w / jnp.maximum(w.sum(axis=-1, keepdims=True), 1.0)
        return jnp.einsum("bl,bld->bd", w, hidden.astype(jnp.float32))
    return sample_losses(model, ids, mask, labels, positions=positions)[:, None]


def sample_features(model, examples: Sequence[D.Example], what: str, *, batch_size: int = 8,
                    store_dir=None, chunk_rows: int = 256) -> np.ndarray:
    """RDS+ embeddings [N, D] (what="rds") or mean response-token losses [N, 1] (what="loss"), rows
    in the order of `examples`; kept in a resumable store under store_dir when one is given."""
    if what not in ("rds", "loss"):
        raise ValueError(f"unknown feature {what!r}: rds or loss")
    if not examples:
        raise D.DataError("no examples")
    graphdef, state = nnx.split(model)
    pad = model.config.pad_token_id or 0
    rows = chunk_rows if store_dir is not None else None
    ladder = P.sorted_ladder(examples, batch_size, rows, f"{what} features")
    heads = {} if what == "rds" else P.loss_heads(examples, batch_size, rows, ladder, f"{what} features")
    dim = model.config.hidden_size if what == "rds" else 1

    def chunk(start, stop):
        return D.collect_rows(D.sorted_batches(examples[start:stop], batch_size, pad_id=pad, ladder=ladder,
                                               heads=heads),
                              lambda b: _features(graphdef, state, b.input_ids, b.attention_mask, b.labels,
                                                  b.loss_positions, what),
                              progress=False)

    if store_dir is None:
        return chunk(0, len(examples))
    fp = {"kind": f"baseline-{what}", "model": P.model_fingerprint(model), "data": D.examples_fingerprint(examples)}
    store = P.open_store(Path(store_dir), f"baseline-{what}", (len(examples), dim), chunk_rows, fp)
    P.fill_store(store, chunk, f"{what} features")
    return store.to_array()


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rds_columns(pool_emb, target_emb) -> np.ndarray:
    """[N, t] cosine of every pool embedding with every target embedding."""
    return _normalize(pool_emb) @ _normalize(target_emb).T


def mid_ppl_rows(losses, k: int) -> np.ndarray:
    """The k rows whose loss (log-perplexity) ranks closest to the median rank, by ascending loss;
    ties broken by row index."""
    losses = np.asarray(losses, np.float64).reshape(-1)
    n = len(losses)
    order = np.lexsort((np.arange(n), losses))             # ascending loss, then index
    start = (n - k) // 2
    return order[start:start + k]


def select_baseline(method: str, model, pool: Sequence[D.Example], targets: Sequence[D.Example], k: int | None,
                    *, seed: int = 0, batch_size: int = 8, store_dir=None, chunk_rows: int = 256,
                    budget_tokens: int | None = None) -> Selection:
    """Run one baseline; the Selection's scores are what the method ranks by (cosine, -|rank - median|,
    or 0), its weights are uniform over the selected rows. budget_tokens: the longest prefix of the
    selection order within that many response tokens (k, if given, caps the rows); mid-PPL's order is
    then its closeness to the median."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(METHODS)} (or influence)")
    n = len(pool)
    if n == 0:
        raise D.DataError("the pool is empty")
    if method == "full":
        k, budget_tokens = n, None
    elif budget_tokens is not None:
        selection = select_baseline(method, model, pool, targets, ranking_size(k, budget_tokens, pool), seed=seed,
                                    batch_size=batch_size, store_dir=store_dir, chunk_rows=chunk_rows)
        if method == "mid-ppl":  # its rows are a window around the median, listed by ascending loss
            order = np.argsort(-selection.scores[selection.rows], kind="stable")
            selection = dataclasses.replace(selection, rows=selection.rows[order])
        selection = cut_to_token_budget(selection, pool, budget_tokens)
        weights = np.zeros(n, np.float32)
        weights[selection.rows] = 1.0 / len(selection.rows)
        return dataclasses.replace(selection, weights=weights)
    if k is None:
        raise ValueError("give k or budget_tokens")
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} must be between 1 and the pool size {n}")
    timings: dict = {}
    t0 = time.perf_counter()
    scores, owners = np.zeros(n, np.float32), None
    if method == "random":
        rows = np.random.default_rng(seed).permutation(n)[:k]
    elif method == "full":
        rows = np.arange(n)
    elif method == "rds":
        if not targets:
            raise D.DataError("the target set is empty")
        with P.timed_stage("rds embeddings", timings):
            pool_emb = sample_features(model, pool, "rds", batch_size=batch_size, store_dir=store_dir,
                                       chunk_rows=chunk_rows)
            target_emb = sample_features(model, targets, "rds", batch_size=batch_size)
        with P.timed_stage("select", timings):
            cols = rds_columns(pool_emb, target_emb)
            rows, owner_cols = round_robin(cols, k, seed=seed, return_owner=True)
            owners = [targets[int(j)].id for j in owner_cols]
            scores = cols.max(axis=1).astype(np.float32)
    else:  # mid-ppl
        with P.timed_stage("losses", timings):
            losses = sample_features(model, pool, "loss", batch_size=batch_size, store_dir=store_dir,
                                     chunk_rows=chunk_rows)[:, 0]
        rank = np.empty(n, np.int64)
        rank[np.lexsort((np.arange(n), losses))] = np.arange(n)
        scores = -np.abs(rank - (n - 1) / 2).astype(np.float32)
        rows = mid_ppl_rows(losses, k)
    weights = np.zeros(n, np.float32)
    weights[rows] = 1.0 / len(rows)
    timings["total"] = round(time.perf_counter() - t0, 3)
    info = {"method": method, "k": int(k), "seed": seed, "pool": n, "targets": len(targets),
            "timings_s": timings}
    if method in ("rds", "mid-ppl"):  # the features pass over the pool, in length-sorted batches
        info["real_token_fraction"] = {"features": P.real_tokens(pool, batch_size,
                                                                 chunk_rows if store_dir is not None else None)}
    return Selection(np.asarray(rows, np.int64), scores, weights, owners, np.zeros(0, np.int64), info)
