"""Which embedding / propagation choices make landmark-propagated scores track the exact ones? (issue 4)

landmark_study.py showed that with the default JVP embedding (first 4 of 30 blocks, 2 tangents,
last non-pad token) KRR-propagated first-order scores correlate only 0.26-0.57 (Spearman, non-
landmark rows, 25% landmarks) with the exact cosine scores on the bundled pool. This study
separates the two places where that can be lost:

  * the propagation step (KRR bandwidth, damping, normalisation, the oracle "embedding = a small
    random sketch of the exact gradient itself", which bounds what any embedding could give);
  * the embedding itself (depth, tangents, token pooling, final hidden states, per-sample loss).

Stages, each cached on disk under experiments/.store so they can run one per process:

    python experiments/embedding_study.py exact          # exact scores from the cached gradients
    python experiments/embedding_study.py features --name multi16 --blocks 16 --tangents 2
    python experiments/embedding_study.py eval [--record]

`features` runs ONE forward-mode pass over the pool with K tangents on the first `--blocks`
decoder blocks (and the embedding table / final norm), and records at once, for every depth in
`--depths`: the tangent outputs j_k (final-normed hidden states' directional derivative, as
idjax.embed does for a model truncated at that depth) pooled three ways (last non-pad token, mean
over response tokens, mean over all tokens), the primal hidden states pooled the same ways, and,
through a plain (tangent-free) forward of the remaining blocks, the final layer's hidden states
and each sample's mean response-token loss. A depth-B slice of this pass is the JVP embedding of
the B-block truncated model (tangent perturbations of deeper blocks cannot reach depth B), with
tangents drawn for a 16-block stack instead of a B-block one: the same distribution, other draws.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

DEMO = ROOT / "idjax" / "assets" / "demo"
STORE = ROOT / "experiments" / ".store"
TASKS = ("code", "definitions", "jargon")
GRAD_FP = dict(proj_dim=2048, params="down_proj")  # the cached exact gradients (landmark_study.py)


def _load(max_length):
    from idjax import data, models

    model, tok = models.load("smollm2-135m")
    records = data.read_records(DEMO / "pool.jsonl")
    pool, _ = data.tokenize(records, tok, max_length=max_length, source="pool")
    return model, tok, records, pool


# ----------------------------------------------------------------------------- exact scores


def exact_stage(args) -> None:
    from idjax import data, passes
    from idjax.grads import GradientConfig
    from idjax.hessian import target_direction
    from idjax.sketch import Projector

    model, tok, records, pool = _load(args.max_length)
    n = len(pool)
    projector = Projector("srht", GRAD_FP["proj_dim"], seed=0)
    gcfg = GradientConfig(params=GRAD_FP["params"], normalize=True, microbatch=8)
    fp = {"kind": "gradients", "model": passes.model_fingerprint(model), "data": data.examples_fingerprint(pool),
          "rows": "all", "update": "gd", "params": GRAD_FP["params"], "keep": None, "normalize": True,
          "projection": ["srht", GRAD_FP["proj_dim"], 0]}
    gstore, _ = passes.gradient_store(model, pool, np.arange(n), projector, gcfg, None, STORE, fp, 8, 256)
    g = gstore.to_array().astype(np.float64)
    scores, vs = [], []
    for task in TASKS:
        trecs = data.read_records(DEMO / "targets" / f"{task}.jsonl")
        targets, _ = data.tokenize(trecs, tok, max_length=args.max_length, source=task)
        batches = data.make_batches(targets, 4, data.example_buckets(targets, tight=True), pad_id=0)
        # One batch of 4 per call (sum weighted by real samples = the mean over the target set)
        # and rematerialised layers: all batches in one differentiated call kept > 6 GB alive.
        model.remat = True
        vp = 0.0
        for b in batches:
            v, _ = target_direction(model, [b], GRAD_FP["params"])
            vp = vp + np.asarray(projector.project(v), np.float64) * b.sample_mask.sum() / len(targets)
        vs.append(vp)
        scores.append(g @ vp / np.linalg.norm(vp))
        print(f"{task}: exact scores done", flush=True)
    domains = np.array([e.task or "" for e in pool])  # the pool's "task" field is its domain
    np.savez(STORE / "study-exact.npz", scores=np.stack(scores, 1), v=np.stack(vs), tasks=np.array(TASKS),
             domains=domains, lengths=np.array([len(e.input_ids) for e in pool]),
             responses=np.array([int((e.labels != -100).sum()) for e in pool]), gradients_store=str(gstore.path))
    print("wrote", STORE / "study-exact.npz")


# ----------------------------------------------------------------------------- features


def _multi_depth_fn(model, blocks: int, depths: tuple[int, ...], with_tail: bool = True):
    """A jitted f(params, rest, tangents, ids, mask, labels) -> dict of pooled features [B, ...].

    params: (embed table, first `blocks` layers' stacked state, final norm scale), tangents the
    same with a leading K axis. Layers after `blocks` run without tangents.
    """
    from flax import nnx

    from idjax.grads import mean_response_loss, response_loss_sums
    from idjax.models.config import rope_inverse_frequencies

    cfg = model.config
    layer_def, layer_state = nnx.split(model.layers)
    head = jax.tree.map(lambda a: a[:blocks], layer_state)
    tail = jax.tree.map(lambda a: a[blocks:], layer_state)
    norm_def, norm_state = nnx.split(model.norm)
    embed = model.embed_tokens.embedding[...]
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg.head_dim, cfg.rope), jnp.float32)
    params = {"embed": embed, "layers": head, "norm": norm_state}

    def run(state, h, positions, key_mask):
        def body(x, st):
            layer = nnx.merge(layer_def, st)
            x, _ = layer(x, positions, inv_freq, key_mask, None, jnp.zeros((), jnp.int32))
            return x, x

        return jax.lax.scan(body, h, state)  # final, all depths [n, B, L, D]

    def pools(h, mask, resp):
        """[B, L, D] -> last non-pad token, mean over response tokens, mean over all tokens."""
        last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
        m = mask.astype(h.dtype)
        r = resp.astype(h.dtype)
        return {
            "last": jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0],
            "resp": jnp.einsum("bld,bl->bd", h, r) / jnp.maximum(r.sum(-1), 1.0)[:, None],
            "mean": jnp.einsum("bld,bl->bd", h, m) / jnp.maximum(m.sum(-1), 1.0)[:, None],
        }

    def fn(p, tail, tangents, ids, mask, labels):
        mask_b = mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask_b, axis=-1) - 1, 0)
        # the tokens whose hidden state predicts a response token (labels shifted by one)
        resp = jnp.concatenate([labels[:, 1:] != -100, jnp.zeros_like(labels[:, :1], bool)], axis=1)
        normer = lambda st, x: nnx.merge(norm_def, st)(x)  # noqa: E731

        def head_fn(q):
            x = jnp.take(q["embed"], ids, axis=0)
            _, hs = run(q["layers"], x, positions, mask_b)
            return {d: normer(q["norm"], hs[d - 1]) for d in depths}, hs[-1]

        def tangent_out(v):
            primal, (dout, _) = jax.jvp(head_fn, (p,), (v,))
            return primal, {d: pools(dout[d], mask_b, resp) for d in depths}

        # vmap over tangents; the primal does not depend on them, so it is computed once
        (prim, h_last), jv = jax.vmap(tangent_out, out_axes=(None, 0))(tangents)  # jv {d: {pool: [K, B, D]}}
        out = {"ntok": mask.sum(-1)}
        for d in depths:
            for name, x in jv[d].items():
                out[f"jvp{d}_{name}"] = jnp.moveaxis(x, 0, 1)           # [B, K, D]
            for name, x in pools(prim[d], mask_b, resp).items():
                out[f"hid{d}_{name}"] = x
        if not with_tail:
            return out
        final = run(tail, h_last, positions, mask_b)[0] if blocks < cfg.num_layers else h_last
        final = normer(p["norm"], final)
        if not cfg.tie_word_embeddings:
            raise NotImplementedError("untied lm_head")
        logits = jnp.einsum("bld,vd->blv", final, p["embed"], preferred_element_type=jnp.float32)
        out.update(loss=mean_response_loss(logits, labels), nresp=response_loss_sums(logits, labels)[1])
        for name, x in pools(final, mask_b, resp).items():
            out[f"hidfinal_{name}"] = x
        return out

    return jax.jit(fn), params, tail


def _per_row(call, batches, n: int) -> tuple[dict[str, np.ndarray], float]:
    """Run call(ids, mask, labels) -> {name: [B, ...]} over the batches; gather each output into an
    [n, ...] float32 array in the order of the examples given to make_batches (padding rows dropped);
    (arrays, seconds)."""
    out: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        res = call(jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask), jnp.asarray(b.labels))
        real = np.asarray(b.sample_mask)
        rows = np.asarray(b.positions)[real]
        for k, x in res.items():
            x = np.asarray(x)
            if k not in out:
                out[k] = np.zeros((n, *x.shape[1:]), np.float32)
            out[k][rows] = x[real]
        if i % 10 == 0:
            print(f"batch {i + 1}/{len(batches)} bucket {b.bucket} {time.perf_counter() - t0:.0f}s", flush=True)
    return out, time.perf_counter() - t0


def features_stage(args) -> None:
    from idjax import data
    from idjax.embed import random_tangents

    model, tok, records, pool = _load(args.max_length)
    depths = tuple(int(d) for d in args.depths.split(","))
    if max(depths) > args.blocks:
        raise SystemExit("--depths must be <= --blocks")
    fn, params, tail = _multi_depth_fn(model, args.blocks, depths, not args.no_tail)
    tangents = random_tangents(params, args.tangents, args.seed)
    batches = data.make_batches(pool, args.batch_size, data.example_buckets(pool, tight=True),
                                pad_id=model.config.pad_token_id or 0)
    out, secs = _per_row(lambda ids, mask, labels: fn(params, tail, tangents, ids, mask, labels), batches, len(pool))
    path = STORE / f"study-feat-{args.name}.npz"
    np.savez(path, seconds=secs, blocks=args.blocks, tangents=args.tangents, depths=np.array(depths), **out)
    print(f"wrote {path} in {secs:.0f}s", flush=True)


def _tail_gradient_fn(model, tail_layers: int, r_in: int, r_out: int, seed: int):
    """Jitted f(ids, mask, labels) -> per-sample features from ONE batched forward + a backward
    through only the last `tail_layers` blocks (their input is a constant):

      tail{j}_kron  [B, r_in * r_out]  Kronecker sketch R_in^T G R_out of sample i's exact gradient
                    G = sum_t a_t delta_t^T of block (L - tail_layers + j)'s down_proj kernel
                    (a_t: the kernel's input at token t, delta_t: d l_i / d (its output at t));
                    E<sketch_i, sketch_j> = <G_i, G_j> for Gaussian R with N(0, 1/r) entries.
      tail{j}_bias  [B, D]  sum_t delta_t: the gradient of a bias on that down_proj's output.
      out_bias      [B, D]  d l_i / d (final residual stream), summed over tokens.
      loss, hidfinal_{last,resp,mean}.
    Samples never interact in the forward pass, so the gradient of sum_i l_i w.r.t. per-token
    activations is each sample's own.
    """
    from flax import nnx

    from idjax.grads import mean_response_loss, response_loss_sums
    from idjax.models.config import rope_inverse_frequencies

    cfg = model.config
    nl = cfg.num_layers
    layer_def, layer_state = nnx.split(model.layers)
    head = jax.tree.map(lambda a: a[: nl - tail_layers], layer_state)
    tail = jax.tree.map(lambda a: a[nl - tail_layers:], layer_state)
    norm = model.norm
    embed = model.embed_tokens.embedding[...]
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg.head_dim, cfg.rope), jnp.float32)
    key = jax.random.key(seed)
    r_a = jax.random.normal(jax.random.fold_in(key, 0), (tail_layers, cfg.intermediate_size, r_in)) / math.sqrt(r_in)
    r_d = jax.random.normal(jax.random.fold_in(key, 1), (tail_layers, cfg.hidden_size, r_out)) / math.sqrt(r_out)

    def fn(head, tail, embed, ids, mask, labels):
        mask_b = mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask_b, axis=-1) - 1, 0)
        zero = jnp.zeros((), jnp.int32)

        def body(x, st):
            x, _ = nnx.merge(layer_def, st)(x, positions, inv_freq, mask_b, None, zero)
            return x, None

        x = jax.lax.stop_gradient(jax.lax.scan(body, jnp.take(embed, ids, axis=0), head)[0])

        def loss_fn(z, z_out):
            def tbody(h, xs):
                st, zl = xs
                layer = nnx.merge(layer_def, st)
                att, _ = layer.self_attn(layer.input_layernorm(h), positions, inv_freq, mask_b, None, zero)
                h = h + att
                y = layer.post_attention_layernorm(h)
                a = jax.nn.silu(layer.mlp.gate_proj(y)) * layer.mlp.up_proj(y)
                return h + layer.mlp.down_proj(a) + zl, a

            h, acts = jax.lax.scan(tbody, x, (tail, z))
            final = norm(h + z_out)
            logits = jnp.einsum("bld,vd->blv", final, embed, preferred_element_type=jnp.float32)
            per = mean_response_loss(logits, labels)
            return per.sum(), (per, acts, final, response_loss_sums(logits, labels)[1])

        b, l = ids.shape
        z = jnp.zeros((tail_layers, b, l, cfg.hidden_size), jnp.float32)
        z_out = jnp.zeros((b, l, cfg.hidden_size), jnp.float32)
        (dz, dz_out), (per, acts, final, nresp) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(z, z_out)
        pa = jnp.einsum("jbli,jir->jblr", acts, r_a)
        pd = jnp.einsum("jbld,jdr->jblr", dz, r_d)
        kron = jnp.einsum("jblr,jbls->jbrs", pa, pd).reshape(tail_layers, b, -1)
        resp = jnp.concatenate([labels[:, 1:] != -100, jnp.zeros_like(labels[:, :1], bool)], axis=1).astype(final.dtype)
        m = mask_b.astype(final.dtype)
        last = jnp.maximum(jnp.sum(mask, axis=-1) - 1, 0)
        out = {"loss": per, "nresp": nresp, "out_bias": dz_out.sum(1),
               "hidfinal_last": jnp.take_along_axis(final, last[:, None, None], axis=1)[:, 0],
               "hidfinal_resp": jnp.einsum("bld,bl->bd", final, resp) / jnp.maximum(resp.sum(-1), 1)[:, None],
               "hidfinal_mean": jnp.einsum("bld,bl->bd", final, m) / jnp.maximum(m.sum(-1), 1)[:, None]}
        for j in range(tail_layers):
            out[f"tail{j}_kron"] = kron[j]
            out[f"tail{j}_bias"] = dz[j].sum(1)
        return out

    return jax.jit(fn), head, tail, embed


def tail_stage(args) -> None:
    from idjax import data

    model, tok, records, pool = _load(args.max_length)
    fn, head, tail, embed = _tail_gradient_fn(model, args.tail_layers, args.rank, args.rank, args.seed)
    batches = data.make_batches(pool, args.batch_size, data.example_buckets(pool, tight=True),
                                pad_id=model.config.pad_token_id or 0)
    if args.limit:
        batches = batches[: args.limit]
    out, secs = _per_row(lambda ids, mask, labels: fn(head, tail, embed, ids, mask, labels), batches, len(pool))
    path = STORE / f"study-feat-{args.name}.npz"
    np.savez(path, seconds=secs, tail_layers=args.tail_layers, rank=args.rank, **out)
    print(f"wrote {path} in {secs:.0f}s", flush=True)


def library_stage(args) -> None:
    """Embeddings through idjax.embed.JVPEmbedder (passes.embed_pool), timed: the measured cost."""
    from idjax import passes
    from idjax.embed import EmbedConfig

    model, tok, records, pool = _load(args.max_length)
    kw = json.loads(args.config)
    cfg = EmbedConfig(**kw)
    t0 = time.perf_counter()
    store = passes.embed_pool(model, pool, cfg, STORE, batch_size=args.batch_size)
    secs = time.perf_counter() - t0
    np.savez(STORE / f"study-feat-{args.name}.npz", seconds=secs, emb=store.to_array(),
             config=json.dumps(dataclasses.asdict(cfg)), store=str(store.path))
    print(f"{args.name}: {cfg} -> {store.path} in {secs:.0f}s", flush=True)


def bench_stage(args) -> None:
    """The issue's benchmark: pipeline.select_samples end to end, fresh store, landmarks vs exact."""
    import tempfile

    from idjax import data, pipeline

    model, tok, records, pool = _load(args.max_length)
    # Rematerialised layers in both modes: without, the targets stage pushed the landmark run past
    # 6 GB on this machine (it holds the embedder's and the gradient engine's buffers by then).
    model.remat = True
    trecs = data.read_records(DEMO / "targets" / f"{args.task}.jsonl")
    targets, _ = data.tokenize(trecs, tok, max_length=args.max_length, source=args.task)
    k = round(0.1 * len(pool))
    config = pipeline.SelectConfig(k=k, landmarks=args.fraction, exact=args.mode == "exact", params="down_proj",
                                   proj_dim=2048, batch_size=args.batch_size, seed=0)
    c0, t0 = time.process_time(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="idjax-bench-", dir=STORE) as tmp:
        sel = pipeline.select_samples(model, pool, targets, config, store_dir=tmp)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    name = f"study-bench-{args.mode}-{args.task}" + ("" if args.mode == "exact" else f"-{args.fraction:g}")
    np.savez(STORE / f"{name}.npz", scores=sel.scores, rows=sel.rows, landmarks=sel.landmarks, wall=wall, cpu=cpu,
             info=json.dumps(sel.info, default=str))
    print(f"{name}: wall {wall:.0f}s cpu {cpu:.0f}s stages {sel.info['timings_s']}", flush=True)


def timing_stage(args) -> None:
    """Cost of each kind of pass on the same batches: a warm-up call (compiles), then --timing-batches
    timed calls; wall and process CPU seconds per sample, scaled to the pool. One process, run
    sequentially, so the numbers are comparable with each other (not with other days' runs)."""
    import resource

    from idjax import data
    from idjax.embed import EmbedConfig, JVPEmbedder, random_tangents
    from idjax.grads import GradientConfig, PerExampleGradients
    from idjax.sketch import Projector

    model, tok, records, pool = _load(args.max_length)
    n = len(pool)
    buckets = data.example_buckets(pool, tight=True)
    batches = data.make_batches(pool, args.batch_size, buckets, pad_id=0, shuffle=True, seed=0)
    # the most common bucket, so one compilation serves the warm-up and every timed call
    common = max(set(b.bucket for b in batches), key=lambda c: sum(b.bucket == c for b in batches))
    batches = [b for b in batches if b.bucket == common][: args.timing_batches + 1]
    samples = sum(int(b.sample_mask.sum()) for b in batches[1:])
    frac = {c: sum(b.bucket == c for b in data.make_batches(pool, args.batch_size, buckets, pad_id=0))
            for c in buckets}
    print(f"timing on {len(batches) - 1} batches of bucket {common} ({samples} samples); pool buckets {frac}",
          flush=True)

    def jvp_lib(**kw):
        emb = JVPEmbedder(model, EmbedConfig(**kw))
        return lambda b: emb(b)

    def multi(blocks, tangents, tail):
        fn, params, tl = _multi_depth_fn(model, blocks, (blocks,), tail)
        tg = random_tangents(params, tangents, 0)
        return lambda b: fn(params, tl, tg, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask),
                            jnp.asarray(b.labels))

    def tailgrad(layers):
        fn, head, tl, embed = _tail_gradient_fn(model, layers, 32, 32, 0)
        return lambda b: fn(head, tl, embed, jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask),
                            jnp.asarray(b.labels))

    def exact():
        g = PerExampleGradients(model, Projector("srht", GRAD_FP["proj_dim"], seed=0),
                                GradientConfig(params=GRAD_FP["params"], normalize=True, microbatch=8))
        return lambda b: g(b)[0]

    cases = {  # cost key (eval's variants) -> (description, builder)
        "default": ("JVP 4 blocks, K=2, last token (library default)", lambda: jvp_lib(num_blocks=4, num_tangents=2)),
        "jvp4": ("JVP 4 blocks, K=2, pooling=mean (library)", lambda: jvp_lib(num_blocks=4, num_tangents=2,
                                                                             pooling="mean")),
        "k4": ("JVP 4 blocks, K=4 (study pass)", lambda: multi(4, 4, False)),
        "k8": ("JVP 4 blocks, K=8 (study pass)", lambda: multi(4, 8, False)),
        "jvp8": ("JVP 8 blocks, K=2 (study pass)", lambda: multi(8, 2, False)),
        "jvp16": ("JVP 16 blocks, K=2 (study pass)", lambda: multi(16, 2, False)),
        "fwd": ("forward of all 30 blocks: hidden states + loss (study pass)", lambda: multi(1, 1, True)),
        "tail1": ("tail gradient, last block (study pass)", lambda: tailgrad(1)),
        "tail4": ("tail gradient, last 4 blocks (study pass)", lambda: tailgrad(4)),
        "tail19": ("tail gradient, last 19 blocks (study pass)", lambda: tailgrad(19)),
        "exact": ("exact per-example gradients, down_proj, SRHT 2048 (library)", exact),
    }
    only = args.only.split(",") if args.only else None
    res = {}
    prev = STORE / "study-timing.json"
    if prev.exists():
        res = json.loads(prev.read_text())["cases"]
    for key, (name, make) in cases.items():
        if only and key not in only:
            continue
        f = make()
        jax.block_until_ready(f(batches[0]))
        c0, t0 = time.process_time(), time.perf_counter()
        for b in batches[1:]:
            jax.block_until_ready(f(b))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        res[key] = {"name": name, "wall_per_sample": wall / samples, "cpu_per_sample": cpu / samples,
                    "load": list(__import__("os").getloadavg())}
        print(f"{name:65s} wall {wall / samples:.3f} s/sample ({wall / samples * n:.0f} s for {n}), "
              f"cpu {cpu / samples:.3f} s/sample; peak rss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB",
              flush=True)
        del f
    with open(STORE / "study-timing.json", "w") as fh:
        json.dump({"bucket": int(common), "samples": samples, "pool": n, "cases": res}, fh, indent=1)


# ----------------------------------------------------------------------------- evaluation


def rownorm(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def standardize(x):
    x = x - x.mean(0)
    return x / np.maximum(x.std(0), 1e-12)


def evaluate(emb, exact, *, fraction=0.25, seeds=3, kind="krr", delta=1e-2, bw_scale=1.0, k_frac=0.1,
             method="random", scale=None):
    """Per task: (mean, sd) Spearman on non-landmarks and mean top-k overlap over landmark seeds.

    scale [N]: propagate exact * scale (an unnormalised <g_i, v> when scale estimates ||g_i||),
    then divide the propagated values by scale again.
    """
    if scale is not None:
        scale = np.asarray(scale, np.float64)[:, None]
        exact_in = exact * scale
    else:
        exact_in = exact
    from idjax.landmarks import choose_landmarks, spearman
    from idjax.propagator import Propagator

    n = exact.shape[0]
    num = round(fraction * n)
    k = max(1, round(k_frac * n))
    emb = np.ascontiguousarray(emb, np.float32)
    res = {}
    per_seed = []
    for seed in range(seeds):
        lm = choose_landmarks(emb, num, method=method, seed=seed)
        bw = None
        if kind == "krr" and bw_scale != 1.0:
            bw = Propagator.fit(emb, lm, kind="krr", delta=delta).bandwidth * bw_scale
        prop = Propagator.fit(emb, lm, kind=kind, delta=delta, bandwidth=bw)
        est = np.asarray(prop.apply(exact_in[lm].astype(np.float32), progress=False), np.float64)
        if scale is not None:
            est = est / scale
        per_seed.append((lm, est))
    for j in range(exact.shape[1]):
        top = set(np.argsort(-exact[:, j])[:k].tolist())
        rhos, ovs = [], []
        for lm, est in per_seed:
            rest = np.setdiff1d(np.arange(n), lm)
            rhos.append(spearman(est[rest, j], exact[rest, j]))
            ovs.append(len(top & set(np.argsort(-est[:, j])[:k].tolist())) / k)
        res[j] = (float(np.mean(rhos)), float(np.std(rhos)), float(np.mean(ovs)))
    return res


def _feat(name):
    path = STORE / f"study-feat-{name}.npz"
    return dict(np.load(path)) if path.exists() else None


def _sketch(x, dim, seed=0):
    rng = np.random.default_rng(seed)
    return x @ (rng.standard_normal((x.shape[1], dim)) / math.sqrt(dim))


def _jvp(f, depth, pool, k=None):
    """[N, K*D] JVP features of one depth/pooling, first k tangents."""
    x = f[f"jvp{depth}_{pool}"]
    return x[:, : (k or x.shape[1])].reshape(x.shape[0], -1)


def variants(ex):
    """(group, name, cost key, thunk -> embedding or None, propagation kwargs)."""
    lengths = ex["responses"].astype(np.float64)
    dom = ex["domains"]
    onehot = (dom[:, None] == np.unique(dom)[None, :]).astype(np.float64)
    from idjax.store import ArrayStore

    grads = ArrayStore.open(str(ex["gradients_store"]), create=False).to_array()
    base = _feat("default")
    if base is None and (STORE / "embeddings-c33432e806c3").exists():  # landmark_study.py's run: 332 s
        base = {"emb": ArrayStore.open(STORE / "embeddings-c33432e806c3", create=False).to_array(), "seconds": 332.0}
    m16 = _feat("multi16")
    k8 = _feat("k8")
    out = []
    add = lambda g, n, c, fn, **kw: out.append((g, n, c, fn, kw))  # noqa: E731

    if grads is not None:
        for dim in (16, 64, 256):
            add("ceiling", f"oracle: exact gradients sketched to {dim} dims, krr", "oracle",
                lambda dim=dim: _sketch(np.asarray(grads, np.float64), dim))
            add("ceiling", f"oracle: exact gradients sketched to {dim} dims, ridge", "oracle",
                lambda dim=dim: _sketch(np.asarray(grads, np.float64), dim), kind="ridge")
    add("ceiling", "domain one-hot only (between-domain baseline)", "free", lambda: onehot)
    add("ceiling", "response length (log) only", "free", lambda: np.log(lengths)[:, None])
    if base is not None:
        e = base["emb"]
        add("propagation", "default JVP (4 blocks, K=2, last token), krr", "default", lambda: e)
        for sc in (0.25, 0.5, 2.0, 4.0):
            add("propagation", f"default, krr bandwidth x{sc}", "default", lambda: e, bw_scale=sc)
        for d in (1e-4, 1e-3, 1e-1, 1.0):
            add("propagation", f"default, krr delta {d:g}", "default", lambda: e, delta=d)
        add("propagation", "default, row-normalised, krr", "default", lambda: rownorm(e))
        add("propagation", "default, standardised columns, krr", "default", lambda: standardize(e))
        add("propagation", "default, ridge", "default", lambda: e, kind="ridge")
    if m16 is not None:
        for d in (4, 8, 16):
            for pool in ("last", "resp", "mean"):
                add("jvp depth x pooling", f"JVP {d} blocks, K=2, {pool}", f"jvp{d}",
                    lambda d=d, pool=pool: _jvp(m16, d, pool))
        for pool in ("last", "resp", "mean"):
            add("jvp depth x pooling", f"JVP 16 blocks, K=2, {pool}, row-normalised", "jvp16",
                lambda pool=pool: rownorm(_jvp(m16, 16, pool)))
        for where in ("4", "8", "16", "final"):
            for pool in ("last", "resp", "mean"):
                add("hidden states", f"hidden states after {where} blocks, {pool}", "fwd" if where == "final" else "fwd",
                    lambda where=where, pool=pool: m16[f"hid{where}_{pool}"])
    tl = _feat("tail19")
    if tl is not None:
        nt = int(tl["tail_layers"])
        first = 30 - nt
        kr = lambda js: np.concatenate([tl[f"tail{j}_kron"] for j in js], 1).astype(np.float64)  # noqa: E731
        sets = {"layer 29": [nt - 1], "layers 28-29": [nt - 2, nt - 1], "layers 26-29": list(range(nt - 4, nt)),
                f"layer {first}": [0], f"layers {first}-29": list(range(nt))}
        for label, js in sets.items():
            cost = f"tail{nt - js[0]}"
            add("tail gradient", f"down_proj grad sketch, {label}", cost, lambda js=js: kr(js))
            add("tail gradient", f"down_proj grad sketch, {label}, row-normalised", cost,
                lambda js=js: rownorm(kr(js)))
            add("tail gradient", f"down_proj grad sketch, {label}, row-normalised, ridge", cost,
                lambda js=js: rownorm(kr(js)), kind="ridge")
        add("tail gradient", "bias gradient at the final residual (576)", "tail0", lambda: tl["out_bias"])
        add("tail gradient", "bias gradient at the final residual, row-normalised", "tail0",
            lambda: rownorm(tl["out_bias"]))
        add("tail gradient", f"down_proj bias gradients, layers {first}-29, row-normalised", f"tail{nt}",
            lambda: rownorm(np.concatenate([tl[f"tail{j}_bias"] for j in range(nt)], 1)))
        nrm = np.linalg.norm(kr(range(nt)), axis=1)
        add("tail gradient", f"sketch layers {first}-29 row-normalised; propagate s*||g_{first}-29|| then divide",
            f"tail{nt}", lambda: rownorm(kr(range(nt))), scale=nrm)
        add("loss", "per-sample loss only", "fwd", lambda: tl["loss"][:, None])
        add("loss", "loss + log response length", "fwd", lambda: standardize(np.c_[tl["loss"], np.log(lengths)]))
        add("hidden states", "final hidden, resp, row-normalised (RDS-like)", "fwd",
            lambda: rownorm(tl["hidfinal_resp"]))
    if k8 is not None:
        for kk in (1, 2, 4, 8):
            for pool in ("last", "resp"):
                add("tangents", f"JVP 4 blocks, K={kk}, {pool}", f"k{kk}", lambda kk=kk, pool=pool: _jvp(k8, 4, pool, kk))
    return out


def eval_stage(args) -> None:
    from idjax.landmarks import spearman

    ex = np.load(STORE / "study-exact.npz")
    exact = ex["scores"]
    domains = ex["domains"]
    lengths = ex["responses"].astype(np.float64)
    print("exact score summary per task: overall sd, between-domain sd, within-domain sd (pooled)")
    for j, t in enumerate(TASKS):
        s = exact[:, j]
        dm = np.array([s[domains == d].mean() for d in domains])
        within = [spearman(s[domains == d], lengths[domains == d]) for d in np.unique(domains)]
        print(f"  {t:12s} sd {s.std():.4f}  between {dm.std():.4f}  within {np.sqrt(((s - dm) ** 2).mean()):.4f}"
              f"  R2(domain) {1 - ((s - dm) ** 2).mean() / s.var():.3f}  "
              f"Spearman(score, response length) {spearman(s, lengths):.3f}, within domains "
              + " ".join(f"{w:.2f}" for w in within))
    print("  Spearman of exact scores between tasks: "
          + ", ".join(f"{TASKS[a]}/{TASKS[b]} {spearman(exact[:, a], exact[:, b]):.3f}"
                      for a, b in ((0, 1), (0, 2), (1, 2))), flush=True)
    only = args.only.split(",") if args.only else None
    rows = []
    for group, name, cost, fn, kw in variants(ex):
        if only and group not in only:
            continue
        emb = fn()
        r = evaluate(emb, exact, fraction=args.fraction, seeds=args.seeds, **kw)
        rows.append((group, name, cost, emb.shape[1], r))
        print(f"{group:20s} {name:55s} " + "  ".join(f"{TASKS[j][:4]} {m:.3f}±{sd:.3f} ov {o:.2f}"
                                                   for j, (m, sd, o) in r.items()), flush=True)
    with open(STORE / "study-eval.json", "w") as f:
        json.dump(rows, f)
    if args.record:
        record(args, rows, exact.shape[0])


def _cost(key, timing, n):
    """(text, seconds) of the embedding cost behind a variant's cost key, from study-timing.json."""
    cases = timing.get("cases", {}) if timing else {}
    sec = lambda k: cases[k]["wall_per_sample"] * n if k in cases else None  # noqa: E731
    if key == "free":
        return "0 (tokenizer)", 0.0
    if key == "oracle":
        t = sec("exact")
        return (f"exact gradients ({t:.0f})" if t else "exact gradients"), t
    approx = {"tail0": ("fwd", "≈"), "tail2": ("tail4", "<"), "k1": ("default", "<"), "k2": ("default", "")}
    k, mark = approx.get(key, (key, ""))
    t = sec(k)
    return (f"{mark}{t:.0f}" if t is not None else "?"), t


def record(args, rows, n) -> None:
    timing_path = STORE / "study-timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else None
    ex_t = _cost("oracle", timing, n)[1]
    lines = ["| group | variant | dims | embedding cost, s for 879 rows (x exact) | code | definitions | jargon | "
             "top-10% overlap c / d / j |", "|---|---|---|---|---|---|---|---|"]
    for group, name, cost, dims, r in rows:
        text, t = _cost(cost, timing, n)
        ratio = f" ({t / ex_t:.2f}x)" if t and ex_t and cost != "oracle" else ""
        rho = [f"{r[j][0]:.3f} ± {r[j][1]:.3f}" for j in sorted(r)]
        ov = " / ".join(f"{r[j][2]:.2f}" for j in sorted(r))
        lines.append(f"| {group} | {name} | {dims} | {text}{ratio} | {' | '.join(rho)} | {ov} |")
    path = STORE / "study-table.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("exact", "features", "tail", "library", "bench", "timing", "eval"))
    ap.add_argument("--timing-batches", type=int, default=4)
    ap.add_argument("--mode", default="landmarks", choices=("landmarks", "exact"), help="bench")
    ap.add_argument("--task", default="definitions", help="bench: target set")
    ap.add_argument("--name", default="multi16")
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--tangents", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tail-layers", type=int, default=4)
    ap.add_argument("--no-tail", action="store_true", help="features: skip the final hidden states and loss")
    ap.add_argument("--rank", type=int, default=32, help="tail: Kronecker sketch r_in = r_out")
    ap.add_argument("--limit", type=int, default=0, help="tail: first N batches only (smoke test)")
    ap.add_argument("--config", default="{}", help="library stage: EmbedConfig fields as JSON")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--only", default="", help="eval: comma-separated groups")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    {"exact": exact_stage, "features": features_stage, "tail": tail_stage, "library": library_stage,
     "bench": bench_stage, "timing": timing_stage,
     "eval": eval_stage}[args.stage](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
