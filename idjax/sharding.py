"""Devices of one process: the device mesh, placement of arrays on it, FSDP rules and the jit cache.

Devices of one process (several GPUs, the chips of a TPU host, or CPU devices forced with
XLA_FLAGS=--xla_force_host_platform_device_count=4) form a `jax.sharding.Mesh` with the axes
("data", "fsdp") (docs/method.md 4.5, DESIGN.md "Sharding"). Every hot path shards its sample / row
axis over both axes (`ROWS`): the microbatch of JVP embeddings and per-example gradients, the N rows
of propagation and top-k, the batch of training. Parameters are replicated, or, when the mesh has
fsdp > 1, sharded by logical-axis rules in the style of MaxText (`RULES`: each parameter dimension
gets a logical name, e.g. "embed" or "mlp", and the rules map logical names to mesh axes); XLA
inserts the all-gathers and reduce-scatters. A mesh may also span the devices of every process
(`mesh_from_spec(..., global_devices=True)`, SPMD training); starting and coordinating the processes
is idjax.distributed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

DATA, FSDP = "data", "fsdp"
AXES = (DATA, FSDP)
ROWS = (DATA, FSDP)  # sample / row axes are split over every mesh axis


# ----------------------------------------------------------------------------- the mesh


_MESH: list[Mesh | None] = [None]
_MESH_SET: list[bool] = [False]


def parse_mesh(spec: str | None) -> dict[str, int]:
    """"data=4,fsdp=2" -> {"data": 4, "fsdp": 2}; a missing axis is filled in by make_mesh."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", part)
        if not m or m[1] not in AXES:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated AXIS=SIZE with AXIS in {AXES}, "
                             f"e.g. data=4,fsdp=2")
        out[m[1]] = int(m[2])
    return out


def make_mesh(data: int | None = None, fsdp: int | None = None, *, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: this process's local devices).

    A size left as None (or -1) takes the devices the other axis leaves: make_mesh() puts every
    device on "data", make_mesh(fsdp=2) on 8 devices gives data=4, fsdp=2. Axis types are Auto:
    jit-compiled code sees global shapes and XLA partitions it (GSPMD).
    """
    devices = list(jax.local_devices() if devices is None else devices)
    n = len(devices)
    data = None if data in (None, -1) else int(data)
    fsdp = None if fsdp in (None, -1) else int(fsdp)
    if data is None and fsdp is None:
        data, fsdp = n, 1
    elif data is None:
        data = n // fsdp if fsdp >= 1 and n % fsdp == 0 else 0
    elif fsdp is None:
        fsdp = n // data if data >= 1 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp > n:
        raise ValueError(f"mesh data={data}, fsdp={fsdp} does not fit {n} device(s)")
    return jax.make_mesh((data, fsdp), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=devices[: data * fsdp])


def set_mesh(mesh: Mesh | None) -> None:
    """The mesh the pipeline stages use by default (None: a single device, no sharding)."""
    _MESH[0], _MESH_SET[0] = mesh, True


def get_mesh() -> Mesh | None:
    """The mesh set by set_mesh, else one over every local device (None when there is one device)."""
    if not _MESH_SET[0]:
        _MESH[0] = make_mesh() if jax.local_device_count() > 1 else None
        _MESH_SET[0] = True
    return _MESH[0]


def constrain_rows(x):
    """x with its leading (row) axis split over the ambient mesh's axes (jax.set_mesh); unchanged without
    one, or when the rows do not split evenly (a per-example function under vmap sees one row).

    The model applies it to its residual stream. Without it XLA's partitioner may keep the FSDP-sharded
    weights in place and shard the matmuls' contraction axis instead, so that every device holds the whole
    batch's activations (a JVP embedding of Llama-3.1-8B at 2048 tokens: 30 GiB per device on 16 devices,
    9 with the rows split). On short rows the all-gathered weights can cost more than that saves, so the
    shells compile both layouts and keep the first that fits (ROW_LAYOUTS, memory.first_fit)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not x.ndim or x.shape[0] % mesh.size:
        return x
    return jax.lax.with_sharding_constraint(x, P(tuple(a for a in ROWS if a in mesh.axis_names),
                                                 *([None] * (x.ndim - 1))))


#: The activation layouts a sharded shell compiles, in order: the partitioner's own, then the residual
#: stream split by rows (its program lowered under jax.set_mesh, so that constrain_rows applies).
ROW_LAYOUTS = (("the partitioner's layout", False), ("activations split by rows", True))


def layout_settings(settings: list, sharded: bool) -> list:
    """memory.first_fit settings (name, tuple) with the activations' layout appended: on a mesh of several
    devices each setting in the partitioner's layout, then split by rows (ROW_LAYOUTS); on one device, where
    the two are the same program, the first only."""
    layouts = ROW_LAYOUTS if sharded else ROW_LAYOUTS[:1]
    return [(name if not split else f"{name}, {layout}", (*value, split))
            for name, value in settings for layout, split in layouts]


def lower_in_layout(jitted, args, mesh: Mesh, rows: bool):
    """jitted.lower(*args).compile(), under jax.set_mesh(mesh) when `rows` (ROW_LAYOUTS)."""
    if not rows:
        return jitted.lower(*args).compile()
    with jax.set_mesh(mesh):
        return jitted.lower(*args).compile()


def active(mesh: Mesh | None) -> bool:
    """Whether `mesh` shards anything (more than one device)."""
    return mesh is not None and mesh.size > 1


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether `mesh` holds several processes' devices (its programs run SPMD across them)."""
    return active(mesh) and mesh.is_multi_process


def mesh_from_spec(spec: str | None, *, global_devices: bool = False) -> Mesh | None:
    """The mesh of a --mesh option over local (or, for SPMD training, all processes') devices."""
    devices = jax.devices() if global_devices else jax.local_devices()
    sizes = parse_mesh(spec)
    if not sizes and len(devices) == 1:
        return None
    return make_mesh(sizes.get(DATA), sizes.get(FSDP), devices=devices)


def row_sharding(mesh: Mesh, ndim: int = 1, axis: int = 0) -> NamedSharding:
    """Axis `axis` of an ndim-array split over every mesh axis, the rest replicated."""
    spec = [None] * ndim
    spec[axis] = ROWS
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def round_up(n: int, mesh: Mesh | None) -> int:
    """n rounded up to a multiple of the mesh size (the row count every device gets equally)."""
    d = 1 if mesh is None else mesh.size
    return -(-int(n) // d) * d


def fit_batch_size(batch_size: int, mesh: Mesh | None) -> int:
    """batch_size rounded up to a multiple of the mesh size (logged when it changes)."""
    fitted = round_up(batch_size, mesh)
    if fitted != batch_size:
        log.info("batch size %d -> %d: a multiple of the %d devices", batch_size, fitted, mesh.size)
    return fitted


def _put(x, sharding):
    """One leaf onto `sharding`: device_put within one process; across processes, every process passes
    the same full array and keeps the shards of its own devices."""
    if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return x
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and (
            not x.is_fully_addressable or jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_rows(x, mesh: Mesh | None, axis: int = 0):
    """A host array with `axis` split over the mesh. Without a mesh: jnp.asarray."""
    if not active(mesh):
        return jnp.asarray(x)
    x = np.asarray(x)
    if x.shape[axis] % mesh.size:
        raise ValueError(f"{x.shape[axis]} rows do not split over {mesh.size} devices: make the batch a "
                         f"multiple of {mesh.size}")
    return _put(x, row_sharding(mesh, x.ndim, axis))


def pad_rows(x, mesh: Mesh | None, fill=0) -> np.ndarray:
    """x with `fill` rows appended so that its rows split evenly over the mesh."""
    x = np.asarray(x)
    extra = round_up(x.shape[0], mesh if active(mesh) else None) - x.shape[0]
    if not extra:
        return x
    return np.concatenate([x, np.full((extra, *x.shape[1:]), fill, x.dtype)])


def put_replicated(tree, mesh: Mesh | None):
    """A pytree copied to every device of the mesh."""
    if not active(mesh):
        return tree
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _put(x, sharding), tree)


def commit(tree):
    """Every array of `tree` placed on the default device explicitly. Fresh, stepped and Orbax-restored
    training states then look alike to jit (restored arrays come back committed), so a resumed run
    reuses the compilation of the first step instead of compiling twice more."""
    return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def to_host(x) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ----------------------------------------------------------------------------- parameter sharding

# Logical axes of each parameter dimension, by parameter name (MaxText's style). Layers are stacked,
# so a layer weight has a leading "layers" dimension. LoRA adapters: a [layers, in, rank],
# b [layers, rank, out] (their in/out take the name of the kernel's).
_LOGICAL: list[tuple[str, tuple[str, ...]]] = [
    (r"embed_tokens\.embedding$", ("vocab", "embed")),
    (r"lm_head\.kernel$", ("embed", "vocab")),
    (r"(q_proj|k_proj|v_proj)\.kernel$", ("layers", "embed", "heads")),
    (r"(q_proj|k_proj|v_proj)\.bias$", ("layers", "heads")),
    (r"o_proj\.kernel$", ("layers", "heads", "embed")),
    (r"o_proj\.bias$", ("layers", "embed")),
    (r"(gate_proj|up_proj)\.kernel$", ("layers", "embed", "mlp")),
    (r"(gate_proj|up_proj)\.bias$", ("layers", "mlp")),
    (r"down_proj\.kernel$", ("layers", "mlp", "embed")),
    (r"down_proj\.bias$", ("layers", "embed")),
    (r"(q_norm|k_norm)\.weight$", ("layers", "head_dim")),
    (r"layers\..*layernorm\.weight$", ("layers", "norm")),
    (r"^norm\.weight$|\.norm\.weight$", ("norm",)),
]

# Logical axis -> mesh axis (None: replicated). FSDP-style: the model dimension of every matrix is
# split over "fsdp"; activations' batch goes over ("data", "fsdp").
RULES: dict[str, str | None] = {"embed": FSDP, "vocab": None, "heads": None, "mlp": None, "layers": None,
                                "norm": None, "head_dim": None, "rank": None}


def logical_axes(name: str, ndim: int) -> tuple[str | None, ...]:
    """The logical axes of the parameter `name` (dotted path) with `ndim` dims; unknown: all None.

    Paths of optimizer states end with the parameter's own path, so they match the same rules.
    """
    lora = re.search(r"\.(a|b)$", name)
    base = name[: lora.start()] if lora else name
    for pattern, axes in _LOGICAL:
        if re.search(pattern, base):
            if lora:  # a: [layers, in, rank], b: [layers, rank, out]
                axes = (axes[0], axes[1], "rank") if lora[1] == "a" else (axes[0], "rank", axes[-1])
            if len(axes) == ndim:
                return axes
            if len(axes) == ndim + 1 and axes[0] == "layers":  # one layer's slice
                return axes[1:]
    return (None,) * ndim


def spec_for(name: str, shape: Sequence[int], mesh: Mesh, rules: dict[str, str | None] = RULES) -> P:
    """PartitionSpec of one parameter: logical axes through the rules; a dimension the mesh axis does
    not divide stays replicated (and each mesh axis is used at most once)."""
    out, used = [], set()
    for dim, logical in zip(shape, logical_axes(name, len(shape))):
        axis = rules.get(logical) if logical else None
        if axis is not None and (axis in used or dim % mesh.shape[axis]):
            axis = None
        if axis is not None:
            used.add(axis)
        out.append(axis)
    return P(*out)


def param_name(path) -> str:
    """Dotted name of a parameter leaf ("layers.mlp.down_proj.kernel"), as grads.param_filter and the
    rules here see it; NNX's ".value" attribute is left out."""
    keys = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            keys.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
            keys.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(str(k.idx))
    return ".".join(keys)


def param_sharding(name: str, shape: Sequence[int], mesh: Mesh, rules: dict[str, str | None] = RULES, *,
                   lead: int = 0) -> NamedSharding:
    """The NamedSharding of the parameter `name` (dotted path): replicated unless fsdp > 1, then by
    `rules`; `lead` leading dimensions (e.g. a stack of tangents [K, *param]) are not sharded."""
    shape = tuple(shape)
    if mesh.shape.get(FSDP, 1) == 1 or len(shape) <= lead:
        return NamedSharding(mesh, P())
    return NamedSharding(mesh, P(*([None] * lead), *spec_for(name, shape[lead:], mesh, rules)))


def param_shardings(tree, mesh: Mesh, rules: dict[str, str | None] = RULES, *, lead: int = 0):
    """NamedShardings for a pytree of parameters (or an optimizer state mirroring them)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param_sharding(param_name(path), getattr(x, "shape", ()), mesh, rules, lead=lead), tree)


def abstract_arrays(tree, shardings):
    """ShapeDtypeStructs like the leaves of `tree` (arrays or shapes), each with the matching sharding of
    `shardings` (a pytree of the same structure): inputs or restore targets, nothing allocated."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shard_params(tree, mesh: Mesh | None, rules: dict[str, str | None] = RULES, *, lead: int = 0):
    """Place a parameter pytree on the mesh: replicated, or FSDP-sharded by `rules` when fsdp > 1."""
    if not active(mesh) or tree is None:
        return tree
    return jax.tree.map(_put, tree, param_shardings(tree, mesh, rules, lead=lead))


# ----------------------------------------------------------------------------- the jit cache


#: Every compilation made by jit_once, keyed by what it computes.
_JITTED: dict = {}


def jit_once(key, fn: Callable, *, out_shardings=None, **jit_kwargs):
    """jax.jit(fn), made the first time `key` is seen and shared by every later caller with that key:
    a second gradient pass, embedder, trainer or top-k over the same model structure and mesh reuses
    the compiled shapes instead of tracing and compiling every length bucket again. `key` must name
    everything fn closes over that changes what it computes (graphdef, config, projector, mesh,
    shardings), and must be hashable."""
    if key not in _JITTED:
        if out_shardings is not None:
            jit_kwargs["out_shardings"] = out_shardings
        _JITTED[key] = jax.jit(fn, **jit_kwargs)
    return _JITTED[key]


# ----------------------------------------------------------------------------- top-k over the mesh


def _canon(x):
    """-0.0 -> 0.0 so every backend's comparisons agree with numpy's (they compare equal there)."""
    return jnp.where(x == 0, jnp.zeros_like(x), x)


def _sharded_top_k(mesh: Mesh, kk: int):
    """shard_map: x [t, n] rows-sharded along n -> the kk best (value desc, index asc) per row."""
    def local(x):
        per = x.shape[-1]
        shard = jax.lax.axis_index(ROWS)
        vals, idx = jax.lax.top_k(_canon(x), min(kk, per))           # ties: the lower index first
        idx = idx.astype(jnp.int32) + shard * per
        vals = jax.lax.all_gather(vals, ROWS, axis=1, tiled=True)   # [t, D * kk]
        idx = jax.lax.all_gather(idx, ROWS, axis=1, tiled=True)
        neg, idx = jax.lax.sort((-vals, idx), dimension=1, num_keys=2)
        return -neg[:, :kk], idx[:, :kk]

    return jax.shard_map(local, mesh=mesh, in_specs=P(None, ROWS), out_specs=(P(), P()), check_vma=False)


def _device_top(x32: np.ndarray, kk: int, mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
    t, n = x32.shape
    npad = round_up(n, mesh)
    if npad != n:
        x32 = np.concatenate([x32, np.full((t, npad - n), -np.inf, np.float32)], axis=1)
    kk = min(kk, npad // mesh.size * mesh.size)
    top = jit_once(("top_k", mesh, kk), _sharded_top_k(mesh, kk))
    vals, idx = top(put_rows(x32, mesh, axis=1))
    return np.asarray(vals), np.asarray(idx)


def top_k_rows(columns, k: int, mesh: Mesh, candidates=None) -> list[np.ndarray]:
    """For each column of `columns` [N, t] (or a vector [N]), its k best rows in exactly the order of
    select.top_k: value descending (compared in float64), ties by the lower row.

    The N axis is split over the mesh: each device takes the top of its rows in float32, the
    candidates are all-gathered and merged. float32 rounding can only merge values into ties, never
    reorder them, so every row whose float32 value reaches the k-th best float32 value is refined
    exactly on the host (the candidate set grows until it holds all of them).
    """
    cols = np.asarray(columns, np.float64)
    if cols.ndim == 1:
        cols = cols[:, None]
    n, t = cols.shape
    allowed = np.ones(n, bool) if candidates is None else np.asarray(candidates, bool)
    available = int(allowed.sum())
    k = min(k, available)
    x32 = np.where(allowed[:, None], cols.astype(np.float32), -np.inf).T.copy()  # [t, N]
    x32[x32 == 0] = 0.0
    extra = max(16, k // 8)
    while True:
        kk = min(k + extra, n)
        vals, idx = _device_top(x32, kk, mesh)
        thr = vals[:, k - 1:k]                                        # the k-th best float32, per column
        done = kk >= n or bool(np.all(vals[:, kk - 1] < thr[:, 0]))
        if done:
            break
        extra *= 4
    out = []
    for j in range(t):
        cand = idx[j][(vals[j] >= thr[j, 0]) & (idx[j] < n)]
        cand = cand[allowed[cand]]
        c = cols[cand, j]
        out.append(cand[np.lexsort((cand, -c))][:k].astype(np.int64))
    return out


def top_k(scores, k: int, mesh: Mesh, candidates=None) -> np.ndarray:
    """select.top_k with the N axis sharded over the mesh: the same rows in the same order."""
    return top_k_rows(np.asarray(scores)[:, None], k, mesh, candidates)[0]


__all__ = [
    "DATA", "FSDP", "AXES", "ROWS", "RULES", "parse_mesh", "make_mesh", "set_mesh", "get_mesh", "active",
    "mesh_from_spec", "row_sharding", "replicated", "round_up", "put_rows", "pad_rows", "put_replicated", "commit",
    "to_host", "logical_axes", "spec_for", "param_name", "param_shardings", "shard_params", "jit_once", "top_k",
    "top_k_rows", "fit_batch_size",
]
