"""The selection pipeline (docs/method.md 3-7): embed -> landmarks -> landmark gradients -> propagate -> weights -> select.

Every expensive per-sample array (pool embeddings, landmark gradients, landmark curvature) goes
through an on-disk chunked store whose directory name carries the fingerprint of everything it
depends on (model, data, configuration), so an interrupted run resumes where it stopped and a
later run with another target set reuses the pool's embeddings and gradients.

Several devices and processes (idjax.distributed): a device mesh splits every batch and the N rows of
propagation and top-k over the devices of a process. With several processes (jax.distributed), each
computes its own chunks of every store (chunk i belongs to process i mod P; the stores live on a file
system all of them see), they meet at a barrier after each store, landmark-sized values (landmark
indices, the propagated values) are broadcast from process 0, and process 0 reads the complete stores,
solves for the weights and selects; select_samples returns None on the other processes.

Scores are cosines by default (docs/method.md 3, "cosine variant"): each source direction a * g_i is
L2-normalised and the reported score is <u_i, v> / ||v|| with v = g_T - eta H_T b. The weight
solver sees the same u_i but the unnormalised v, so p and Q keep the scale of the Taylor model.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idjax import data as D
from idjax import distributed as dist
from idjax import sharding as shd
from idjax.configs import EmbedConfig, SelectConfig  # noqa: F401 (re-exported)
from idjax.grads import GradientConfig, PerExampleGradients, restrict, split_params
from idjax.hessian import target_direction
from idjax.io import fingerprint
from idjax.landmarks import choose_landmarks
from idjax.optim import UpdateModel
from idjax.passes import (
    curvature_store, embed_pool, fill_store, gradient_store, load_targets, loss_share, mesh_batch,
    model_fingerprint, open_store, real_tokens, save_targets, timed_stage, update_fingerprint,
)
from idjax.propagator import Propagator
from idjax.select import per_task, round_robin, token_budget_cap, top_k, top_k_lexicographic, within_token_budget
from idjax.sketch import Projector, global_norm_sq
from idjax.subsets import check_first_layer, layer_mask
from idjax.curvature import dense_matvec
from idjax.scores import cosine_scores, curvature_matrix, influence_scores
from idjax.weights import default_lam, lam_for_budget, solve_weights

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Selection:
    """A selection and everything needed to explain it."""

    rows: np.ndarray          # positions in the pool examples, in selection order
    scores: np.ndarray        # [N] cosine of each u_i with the target direction (propagated off landmarks)
    weights: np.ndarray       # [N] optimal weights on the simplex
    owners: list | None       # who took each selected row: a target id (round-robin) or task (per-task)
    landmarks: np.ndarray     # landmark positions in the pool
    info: dict                # configuration, timings per stage, stores, solver report


def ranking_size(k: int | None, budget_tokens: int | None, pool: Sequence[D.Example]) -> int:
    """How many rows to rank: k, or with a token budget the most rows the budget can hold (at most k):
    the budget's prefix of that ranking is the prefix of the whole pool's ranking."""
    n = len(pool)
    if k is not None and k > n:
        raise ValueError(f"k={k} is larger than the pool ({n} samples with a response token)")
    if budget_tokens is None:
        return k
    cap = token_budget_cap([e.response_tokens for e in pool], budget_tokens)
    return min(cap, n if k is None else k)


def cut_to_token_budget(selection: Selection, pool: Sequence[D.Example], budget_tokens: int) -> Selection:
    """The selection's rows, in their order, while their response tokens sum to at most `budget_tokens`."""
    tokens = np.asarray([e.response_tokens for e in pool], np.int64)
    rows = within_token_budget(selection.rows, tokens, budget_tokens)
    info = {**selection.info, "budget_tokens": {"budget": int(budget_tokens), "ranked": len(selection.rows),
                                                "selected": len(rows), "response_tokens": int(tokens[rows].sum())}}
    owners = None if selection.owners is None else selection.owners[:len(rows)]
    return dataclasses.replace(selection, rows=rows, owners=owners, info=info)


# ----------------------------------------------------------------------------- the whole selection


def select_samples(model, pool: Sequence[D.Example], targets: Sequence[D.Example], config: SelectConfig, *,
                   update: UpdateModel | None = None, store_dir=None, mesh=None) -> Selection | None:
    """Influence Distillation on `pool` for `targets` (docs/method.md 3-7).

    update: the update model read from a warm-up's optimizer state (optim.update_model); None is
    plain GD with step config.learning_rate. store_dir: where resumable arrays live (None: a
    temporary directory, nothing kept). mesh: the devices batches and the N axis are split over
    (default sharding.get_mesh(): every local device; the selection does not depend on it).
    With several processes (jax.distributed), store_dir must be on a file system every process sees;
    process 0 returns the Selection, the others None.

    config.budget_tokens: rank the rows `ranking_size` says (the first-order weights' lam is set for that
    many), then keep the longest prefix of the selection order within the budget (cut_to_token_budget).
    """
    if not pool:
        raise D.DataError("the pool has no sample with a response token")
    if not targets:
        raise D.DataError("the target set has no sample with a response token")
    if config.budget_tokens is not None and len({t.task for t in targets if t.task}) > 1:
        raise ValueError("budget_tokens with targets of several tasks (per-task budgets) is not supported: "
                         "select for each task with its own budget, or give k")
    k = ranking_size(config.k, config.budget_tokens, pool)
    if k != config.k:
        config = dataclasses.replace(config, k=k)
    if config.keep and config.order == 2:
        raise ValueError("order 2 works on whole parameter tensors: drop keep (the coordinate mask)")
    if store_dir is None:
        if dist.multi_process():
            raise ValueError("several processes share their work through the store: give a store directory on "
                             "a file system every process sees (--store)")
        with tempfile.TemporaryDirectory(prefix="idjax-store-") as tmp:
            return select_samples(model, pool, targets, config, update=update, store_dir=tmp, mesh=mesh)
    if config.remat and not getattr(model, "remat", False):
        from flax import nnx

        model = nnx.merge(*nnx.split(model))  # the same arrays; only this view recomputes activations
        model.remat = True
    with dist.failures_published():
        selection = _select(model, pool, targets, config, update, Path(store_dir),
                            shd.get_mesh() if mesh is None else mesh)
    if selection is None or config.budget_tokens is None:
        return selection
    return cut_to_token_budget(selection, pool, config.budget_tokens)


def _select(model, pool, targets, config: SelectConfig, update, store_dir: Path, mesh) -> Selection | None:
    n = len(pool)
    multi, primary = dist.multi_process(), dist.is_primary()
    store_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    batch_size = mesh_batch(config.batch_size, mesh)
    eta = update.eta if update is not None else config.learning_rate
    _, selected, _ = split_params(model, config.params)
    a = restrict(update.a, selected) if update is not None else None
    b = restrict(update.b, selected) if update is not None else None
    if config.first_layer:  # the selection's parameters are those of layers first_layer.. alone
        check_first_layer(selected, config.first_layer, model.config.num_layers)
        if config.order == 2:  # u = a g is zero below (first order: the gradients themselves are)
            a = layer_mask(a if a is not None else jax.tree.map(jnp.ones_like, selected), config.first_layer)
        b = layer_mask(b, config.first_layer)
    projector = Projector("none" if config.proj_dim == 0 else config.proj_kind, config.proj_dim, seed=config.seed)
    gcfg = GradientConfig(params=config.params, keep=config.keep, normalize=config.normalize,
                          microbatch=config.microbatch, seed=config.seed, first_layer=config.first_layer,
                          layerwise=config.layerwise)
    # first_layer enters the store keys only when set: stores of every layer keep their names
    layers_key = {"first_layer": config.first_layer} if config.first_layer else {}
    model_fp, pool_fp = model_fingerprint(model), D.examples_fingerprint(pool)
    stores = {}

    embeddings, estore = None, None
    if not config.exact:
        with timed_stage("embed", timings):
            estore = embed_pool(model, pool, config.embed, store_dir, batch_size=batch_size,
                                chunk_rows=config.chunk_rows, model_fp=model_fp, data_fp=pool_fp, mesh=mesh)
            embeddings = estore.view()
            stores["embeddings"] = str(estore.path)

    with timed_stage("landmarks", timings):
        num = config.num_landmarks(n)
        if config.exact or num == n:
            landmarks = np.arange(n)
        elif multi:  # every process must use the same landmarks: process 0 chooses them
            chosen = choose_landmarks(embeddings, num, method=config.landmark_method, seed=config.seed) \
                if primary else None
            landmarks = dist.broadcast("landmarks", chosen, directory=store_dir).astype(np.int64)
        else:
            landmarks = choose_landmarks(embeddings, num, method=config.landmark_method, seed=config.seed)
    log.info("%d landmarks of %d pool samples", len(landmarks), n)

    with timed_stage("gradients", timings):
        fp = {"kind": "gradients", "model": model_fp, "data": pool_fp, "rows": fingerprint(landmarks),
              "update": update_fingerprint(update), "params": config.params, "keep": config.keep,
              "normalize": config.normalize, "projection": [projector.kind, config.proj_dim, config.seed],
              **layers_key}
        gstore, grads = gradient_store(model, pool, landmarks, projector, gcfg, a, store_dir, fp,
                                   batch_size, config.chunk_rows, mesh)
        stores["gradients"] = str(gstore.path)

    target_batches = D.sorted_batches(targets, batch_size, pad_id=model.config.pad_token_id or 0)
    real = {"embed": None if config.exact else real_tokens(pool, batch_size, config.chunk_rows),
            "gradients": real_tokens([pool[int(r)] for r in landmarks], batch_size, config.chunk_rows),
            "targets": real_tokens(targets, batch_size)}
    loss_shares = {"gradients": loss_share([pool[int(r)] for r in landmarks], batch_size, config.chunk_rows),
                   "targets": loss_share(targets, batch_size)}
    h_l = None
    if config.order == 2:
        with timed_stage("curvature", timings):
            cfp = {**fp, "kind": "curvature", "hessian": config.hessian,
                   "targets": D.examples_fingerprint(targets), "eta": eta}
            cstore = curvature_store(model, pool, landmarks, projector, gcfg, a, target_batches, config.hessian,
                                store_dir, cfp, batch_size, config.chunk_rows, mesh)
            stores["curvature"] = str(cstore.path)
    propagate = len(landmarks) < n
    if multi and not primary and not propagate:
        return None  # process 0 reads the complete stores and selects

    if primary:
        g_l = gstore.to_array()
        if config.order == 2:
            h_l = cstore.to_array().astype(np.float64)
        per_task_mode = len({t.task for t in targets if t.task}) > 1
        want_columns = config.aggregate == "round-robin" or per_task_mode
        with timed_stage("targets", timings):
            tfp = {"kind": "targets", "model": model_fp, "targets": D.examples_fingerprint(targets),
                   "update": update_fingerprint(update), "eta": eta, "hessian": config.hessian,
                   "params": config.params, "keep": config.keep, "seed": config.seed, "columns": want_columns,
                   "projection": [projector.kind, config.proj_dim], **layers_key}
            tpath = store_dir / f"targets-{fingerprint(tfp)[:12]}.npz"
            cached = load_targets(tpath, tfp)
            if cached is None:
                v, offset = target_direction(model, target_batches, config.params, shift=b, eta=eta,
                                             hessian=config.hessian, offset=want_columns)
                v = layer_mask(v, config.first_layer)
                v_sel = v if grads.mask is None else grads.mask.apply(v)
                v_norm = float(jnp.sqrt(global_norm_sq(v_sel)))
                v_proj = np.asarray(projector.project(v_sel), np.float64)
                columns = None
                if want_columns:
                    tg = PerExampleGradients(model, projector, dataclasses.replace(gcfg, normalize=True),
                                             offset=offset, mesh=mesh)
                    columns = tg.run(target_batches, progress=False).astype(np.float64)  # [t, k]
                save_targets(tpath, tfp, v_proj, v_norm, columns)
            else:
                v_proj, v_norm, columns = cached
            stores["targets"] = str(tpath)
            if not v_norm > 0:
                raise ValueError("the target gradient is zero: nothing to align with (is the target loss already 0?)")
        p_l, cols_l = influence_scores(g_l.astype(np.float64), v_proj, target_columns=columns)  # <u_l, v>, <u_l, c_j>

    with timed_stage("propagate", timings):
        prop = None
        if not propagate:
            order = np.empty(n, np.int64)
            order[landmarks] = np.arange(n)
            p = p_l[order]
            cols = None if cols_l is None else cols_l[order]
        else:
            prop = Propagator.fit(embeddings, landmarks, kind=config.propagation, delta=config.delta, mesh=mesh)
            if multi:  # each process propagates its chunks of rows into a store; process 0 reads them all
                values = np.column_stack([p_l] + ([] if cols_l is None else [cols_l])).astype(np.float32) \
                    if primary else None
                values = dist.broadcast("landmark values", values, directory=store_dir)
                pfp = {"kind": "propagated", "embeddings": estore.fingerprint, "rows": fingerprint(landmarks),
                       "propagation": [config.propagation, config.delta], "values": fingerprint(values)}
                pstore = open_store(store_dir, "propagated", (n, values.shape[1]), config.chunk_rows, pfp)
                fill_store(pstore, lambda lo, hi: prop.apply_rows(values, lo, hi, rows=config.chunk_rows), "propagate")
                if not primary:
                    return None
                stores["propagated"] = str(pstore.path)
                out = pstore.to_array().astype(np.float64)
                p, cols = out[:, 0], (None if cols_l is None else out[:, 1:])
            else:
                p = np.asarray(prop.apply(p_l.astype(np.float32)), np.float64)
                cols = None if cols_l is None else np.asarray(prop.apply(cols_l.astype(np.float32)), np.float64)
        scores = cosine_scores(p, v_norm)

    solver_info: dict = {"eta": eta}
    with timed_stage("weights", timings):
        if config.order == 1:
            lam = config.lam if config.lam is not None else float(lam_for_budget(p, config.k))
            sol = solve_weights(p, None, eta=eta, lam=lam)
        else:
            q_l = curvature_matrix(h_l, g_l.astype(np.float64))     # Q_L[i, j] = <P h_i, P u_j>, symmetrised
            if prop is None:
                perm = np.empty(n, np.int64)
                perm[landmarks] = np.arange(n)
                matvec = dense_matvec(q_l[np.ix_(perm, perm)])
            else:
                matvec = prop.low_rank_matvec(np.asarray(q_l, np.float32))
            lam = config.lam if config.lam is not None else float(default_lam(p, matvec, eta, config.k))
            sol = solve_weights(p, matvec, eta=eta, lam=lam)
            if not sol.converged:
                log.warning("weight solver stopped after %d iterations with duality gap %.3g", sol.iterations, sol.gap)
        weights = np.asarray(sol.weights, np.float64)
        solver_info.update(lam=float(sol.lam), objective=float(sol.objective), iterations=int(sol.iterations),
                           converged=bool(sol.converged), gap=float(sol.gap),
                           support=int((weights > 0).sum()))

    with timed_stage("select", timings):
        owners = None
        if per_task_mode:
            rows, owners = per_task(cols, [t.task or "" for t in targets], config.k, aggregate=config.aggregate,
                                    seed=config.seed, mesh=mesh)
        elif config.aggregate == "round-robin":
            rows, owner_cols = round_robin(cols, config.k, seed=config.seed, return_owner=True, mesh=mesh)
            owners = [targets[int(j)].id for j in owner_cols]
        elif (config.rank_by or ("score" if config.order == 1 else "weight")) == "weight":
            rows = top_k_lexicographic(weights, scores, config.k)
        else:
            rows = top_k(scores, config.k, mesh=mesh)

    info = {"config": config.to_dict(), "timings_s": timings, "stores": stores, "solver": solver_info,
            "pool_size": n, "targets": len(targets), "landmarks": int(len(landmarks)),
            "update_model": update.name if update is not None else "gd",
            "fingerprints": {"model": model_fp, "pool": pool_fp, "targets": D.examples_fingerprint(targets)},
            "target_norm": v_norm, "gradient_dim": int(g_l.shape[1]), "devices": dist.describe(mesh),
            "real_token_fraction": {stage: f for stage, f in real.items() if f is not None},
            "lm_head_loss_share": loss_shares}
    if prop is not None:
        info["propagation"] = {"kind": prop.kind, "bandwidth": float(getattr(prop, "bandwidth", math.nan) or 0.0)}
    return Selection(rows=np.asarray(rows, np.int64), scores=scores, weights=weights, owners=owners,
                     landmarks=np.asarray(landmarks), info=info)
