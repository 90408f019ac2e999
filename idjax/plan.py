"""`idjax plan`: will a selection and a fine-tuning fit the devices, before renting them?

The model is built abstractly from its config.json (no weights are read) and the program of each stage
is compiled for the mesh with abstract inputs (jax.ShapeDtypeStruct with their shardings). The
compiler's own memory analysis gives the bytes each device needs (arguments + outputs + temporaries,
less what is aliased); FLOPs per sample are counted from the architecture (forward_flops), since
XLA's cost analysis counts a scanned layer once. A stage with a knob (the per-example gradient
microbatch; the training step's microbatches and rematerialisation) is compiled for each setting from the
fastest to the leanest, and the first that fits is the plan: the settings the run itself tries
(grads.gradient_settings, trainer.step_settings; idjax.memory).

The stages (docs/method.md): `embed` (JVP embeddings of the pool, 6), `gradients` (projected per-example
gradients preconditioned by the Adam update model, 4.3), `target` (the target gradient, 4.1), `hvp`
(one Gauss-Newton product of the target loss, order 2) and `train` (one AdamW step of fine-tuning).

On a CPU, forced host devices stand for the accelerators (XLA_FLAGS=--xla_force_host_platform_device_count,
set by `idjax plan` itself): the plan is then XLA:CPU's, whose fusion and layouts differ from a GPU's or a
TPU's. It is a compile-time plan, to be confirmed on the hardware.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable


GiB = 1 << 30
STAGES = ("embed", "gradients", "target", "hvp", "train")


@dataclasses.dataclass
class StagePlan:
    """One stage's verdict: per-device bytes of the chosen (or leanest tried) setting, FLOPs per sample."""

    stage: str
    setting: str
    bytes_per_device: int
    flops_per_sample: float
    fits: bool
    tried: list = dataclasses.field(default_factory=list)  # (setting, bytes) of every compilation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def forward_flops(config, tokens: int, *, blocks: int | None = None, lm_head: bool = True) -> float:
    """Matmul FLOPs of one forward pass over `tokens` tokens (2 per multiply-add): the projections and
    MLP of `blocks` layers (default all), causal attention's scores and values, and the lm-head. XLA's
    cost analysis counts a scanned layer once, so stages are counted here, in passes of this."""
    d, h, kv, hd, inter = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                           config.intermediate_size)
    layers = config.num_layers if blocks is None else blocks
    per_layer = d * h * hd * 2 + d * kv * hd * 2 + 3 * d * inter
    attention = 2 * h * hd * tokens * (tokens + 1)  # q k^T and p v, each h*hd*T*(T+1)/2 multiply-adds
    head = d * config.vocab_size if lm_head else 0
    return 2.0 * tokens * (layers * per_layer + head) + layers * attention


#: Forward passes per sample of each stage: backward = 2 forwards; remat adds one; a Gauss-Newton
#: product is a forward, a JVP (2) and a VJP (2); a JVP embedding is the primal and K tangents (2 each).
PASSES = {"gradients": 3, "target": 3, "hvp": 5, "train": 3}


def abstract_model_state(config, mesh, dtype="bfloat16", *, remat: bool = False):
    """(graphdef, state) of the model with ShapeDtypeStruct leaves sharded by the FSDP rules: nothing is
    allocated. dtype: "bfloat16", "float32" or a jnp dtype."""
    import jax.numpy as jnp
    from flax import nnx

    from idjax.models.modeling import abstract_model

    model = abstract_model(config, dtype=jnp.dtype(dtype))
    model.remat = remat
    graphdef, state = nnx.split(model)
    return graphdef, _like(state, mesh)


def _rows(mesh, shape, dtype, axis: int = 0):
    """An abstract int/float batch whose `axis` is split over every mesh axis."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from idjax import sharding as shd

    spec = [None] * len(shape)
    spec[axis] = shd.ROWS
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*spec)))


def _like(tree, mesh, dtype=None, *, lead: int = 0, lead_shape: tuple = ()):
    """Abstract arrays like the parameter pytree `tree` (optionally float32, or with leading dims)."""
    import jax

    from idjax import sharding as shd

    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((*lead_shape, *x.shape), dtype or x.dtype), tree)
    return shd.abstract_arrays(shapes, shd.param_shardings(shapes, mesh, lead=lead))


def _first_fit(stage: str, settings: list, compile_one: Callable, budget: int, flops: Callable) -> StagePlan:
    """memory.first_fit as a StagePlan. flops(value): FLOPs per sample of that setting."""
    from idjax import memory

    name, value, _, tried = memory.first_fit(settings, compile_one, budget)
    need = tried[-1][1]
    return StagePlan(stage, name, need, flops(value), memory.fits(need, budget), tried)


def plan(config, mesh, *, pool: int, max_length: int, device_memory: int, batch_size: int = 8,
         dtype: str = "bfloat16", params: str | None = None, proj_dim: int = 4096, landmarks: float = 0.1,
         embed_blocks: int = 4, embed_tangents: int = 2, embed_dim: int = 4096, targets: int = 16,
         stages=STAGES) -> dict:
    """Compile each stage of a selection and a fine-tuning of `config` (a ModelConfig) on `mesh` for
    `max_length`-token samples; per stage, the setting that fits `device_memory` bytes per device.

    batch_size: rows per compiled batch (rounded up to a multiple of the mesh size). Returns a report:
    the stages (StagePlan dicts), the store sizes on disk, and `fits`.
    """
    import jax
    import jax.numpy as jnp

    from idjax import embed as E
    from idjax import grads as G
    from idjax import hessian as H
    from idjax import sharding as shd
    from idjax import trainer as TR
    from idjax.optim import OptimizerSpec
    from idjax.sketch import Projector

    n_dev = mesh.size
    rows = max(n_dev, math.ceil(batch_size / n_dev) * n_dev)
    jdtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[dtype]
    graphdef, state = abstract_model_state(config, mesh, jdtype)
    graphdefs = {False: graphdef, True: abstract_model_state(config, mesh, jdtype, remat=True)[0]}
    i32 = jnp.int32
    fwd = forward_flops(config, max_length)

    def batch(b, lead=()):
        axis = len(lead)
        return (_rows(mesh, (*lead, b, max_length), i32, axis), _rows(mesh, (*lead, b, max_length), i32, axis),
                _rows(mesh, (*lead, b, max_length), i32, axis))

    out: list[StagePlan] = []
    selected = G.split_params((graphdef, state), params)[1]
    projector = Projector("srht", proj_dim)

    if "gradients" in stages:
        a = _like(selected, mesh, jnp.float32)  # the Adam update model's D_a, like the selected params

        def grads(setting):
            m, remat, layerwise = setting
            fn = jax.jit(lambda st, a, ids, mask, labels: G.per_example_gradients(
                (graphdefs[remat], st), ids, mask, labels, params=params, projector=projector, precondition=a,
                normalize=True, microbatch=m, shards=n_dev, layerwise=layerwise))
            return fn.lower(state, a, *batch(rows)).compile()
        settings = G.gradient_settings(rows // n_dev, layerwise=True)
        out.append(_first_fit("gradients", settings, grads, device_memory,
                              lambda s: (PASSES["gradients"] + (s[1] or s[2])) * fwd))

    if "embed" in stages:
        blocks = min(embed_blocks, config.num_layers)
        cut_def, cut_state = abstract_model_state(dataclasses.replace(config, num_layers=blocks), mesh, jdtype)
        tangent_params = G.split_params((cut_def, cut_state), None)[1]
        tangents = _like(tangent_params, mesh, lead=1, lead_shape=(embed_tangents,))
        width = embed_tangents * config.hidden_size
        projection = None if embed_dim >= width else jax.ShapeDtypeStruct((width, embed_dim), jnp.float32)

        def embed(setting):  # as JVPEmbedder plans it: the partitioner's layout, else the rows split
            fn = jax.jit(lambda st, t, p, ids, mask, labels: E.jvp_embeddings(
                (cut_def, st), ids, mask, labels, tangents=t, projection=p))
            return shd.lower_in_layout(fn, (cut_state, tangents, projection, *batch(rows)), mesh, setting[0])
        embed_flops = (1 + 2 * embed_tangents) * forward_flops(config, max_length, blocks=blocks, lm_head=False)
        layouts = shd.layout_settings([(f"{blocks} blocks, {embed_tangents} tangents", ())], n_dev > 1)
        out.append(_first_fit("embed", layouts, embed, device_memory, lambda _: embed_flops))

    t_rows = max(n_dev, math.ceil(targets / n_dev) * n_dev)
    if "target" in stages:
        def target(remat):
            fn = jax.jit(lambda st, ids, mask, labels: H.target_gradient((graphdefs[remat], st), (ids, mask, labels),
                                                                         params=params))
            return fn.lower(state, *batch(t_rows)).compile()
        settings = [(f"{t_rows} target samples{', remat' if r else ''}", r) for r in (False, True)]
        out.append(_first_fit("target", settings, target, device_memory,
                              lambda r: (PASSES["target"] + r) * fwd))

    if "hvp" in stages:
        vectors = _like(selected, mesh, lead=1, lead_shape=(1,))  # in the parameters' dtype, as linearize wants

        def hvp(remat):
            fn = jax.jit(lambda st, v, ids, mask, labels: H.gauss_newton_vp(
                (graphdefs[remat], st), (ids, mask, labels), v, params=params))
            return fn.lower(state, vectors, *batch(t_rows)).compile()
        settings = [(f"Gauss-Newton, 1 vector{', remat' if r else ''}", r) for r in (False, True)]
        out.append(_first_fit("hvp", settings, hvp, device_memory, lambda r: (PASSES["hvp"] + r) * fwd))

    if "train" in stages:
        spec = OptimizerSpec("adamw", 2e-5, clip_norm=1.0)
        settings = shd.layout_settings(TR.step_settings(rows // n_dev), n_dev > 1)  # as the Trainer plans it

        def step(setting):
            micro, remat, split = setting
            return TR.compile_step(config, spec, mesh, rows=rows, grad_accum=micro, length=max_length, remat=remat,
                                   compute_dtype=dtype, split_rows=split)
        out.append(_first_fit("train", settings, step, device_memory,
                              lambda s: (PASSES["train"] + s[1]) * fwd))

    out.sort(key=lambda p: STAGES.index(p.stage))
    n_landmarks = max(1, round(landmarks * pool)) if landmarks < 1 else int(landmarks)
    stores = {"embeddings": pool * min(embed_dim, embed_tangents * config.hidden_size) * 4,
              "landmark gradients": n_landmarks * proj_dim * 4}
    return {"model": config.model_type, "parameters": config.num_params, "mesh": dict(mesh.shape),
            "devices": n_dev, "device_memory": device_memory, "max_length": max_length, "rows": rows,
            "dtype": dtype, "stages": [p.to_dict() for p in out], "stores_bytes": stores,
            "fits": all(p.fits for p in out)}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def format_plan(report: dict) -> str:
    """The plan as a markdown table and a verdict line."""
    mesh = ",".join(f"{k}={v}" for k, v in report["mesh"].items())
    head = (f"idjax plan: {report['model']} ({report['parameters'] / 1e9:.2f}B parameters, {report['dtype']}) on "
            f"{report['devices']} devices ({mesh}), {_gib(report['device_memory'])} GiB each; {report['rows']} rows "
            f"of {report['max_length']} tokens per compiled batch")
    lines = ["| stage | setting | GiB per device | fits | GFLOP per sample | leaner settings tried |",
             "|---|---|---:|---|---:|---|"]
    for s in report["stages"]:
        tried = "; ".join(f"{name}: {_gib(b)}" for name, b in s["tried"][:-1]) or "-"
        lines.append(f"| {s['stage']} | {s['setting']} | {_gib(s['bytes_per_device'])} | "
                     f"{'yes' if s['fits'] else 'NO'} | {s['flops_per_sample'] / 1e9:.1f} | {tried} |")
    stores = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in report["stores_bytes"].items())
    if report["fits"]:
        verdict = "fits: every stage compiles within the device memory (a compile-time plan: confirm on the hardware)"
    else:
        worst = max((s for s in report["stages"] if not s["fits"]), key=lambda s: s["bytes_per_device"])
        fsdp, devices = report["mesh"].get("fsdp", 1), report["devices"]
        change = (f"shard the parameters over more devices (--mesh data={devices // (2 * fsdp)},fsdp={2 * fsdp})"
                  if 2 * fsdp <= devices else "more devices, a parameter subset (--params) or a shorter --max-length")
        verdict = (f"does NOT fit: {worst['stage']} needs {_gib(worst['bytes_per_device'])} GiB per device at its "
                   f"leanest setting ({worst['setting']}), {_gib(report['device_memory'])} GiB available; "
                   f"smallest change to try: {change}")
    return "\n\n".join([head, "\n".join(lines), f"stores on disk: {stores}", verdict])
