"""Random projections (sketches) of gradient pytrees, docs/method.md section 6.

A gradient has d = 1e6..1e10 coordinates spread over many leaves; a sketch maps it to k
float32 numbers with E[<Px, Py>] = <x, y>. The d x k matrix is never materialized: each leaf
gets its own key, fold_in(key(seed), leaf_index), and Rademacher / Gaussian matrices are
generated block by block (block_size rows at a time) inside a loop, so peak memory is
O(block_size * k) and no index ever needs more than int32, whatever the total d.

The sketch is a pure function of (seed, leaf order, leaf shapes): the same seed gives the same
projection in any process, with the threefry PRNG pinned explicitly.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from idjax.sampling import sample_without_replacement

logger = logging.getLogger(__name__)

KINDS = ("rademacher", "gaussian", "srht", "none")
_PRNG_IMPL = "threefry2x32"  # pinned so a user's jax_default_prng_impl cannot change the sketch
_INT32_MAX = 2**31 - 1


def sylvester_hadamard(n: int) -> np.ndarray:
    """The unnormalised n x n Hadamard matrix in Sylvester order (scipy.linalg.hadamard), float32."""
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal fast Walsh-Hadamard transform over the last axis (Sylvester order).

    Equals x @ scipy.linalg.hadamard(n) / sqrt(n) with no n x n matrix: H_n = H_a (x) H_b (x) H_c for
    a b c = n (Kronecker factors of Sylvester matrices, each at most ~n^(1/3) wide), so the transform is
    three small matmuls over the axes of x.reshape(..., a, b, c), O(n (a + b + c)). They run at matmul
    speed, where log2(n) butterfly passes were bound by memory traffic (1.9x slower on a CPU at n = 2^14,
    experiments/bench_fwht.py).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last axis, got {n}")
    bits = n.bit_length() - 1
    a, b, c = (1 << (bits // 3 + (i < bits % 3)) for i in range(3))
    lead = x.shape[:-1]
    y = x.reshape(*lead, a, b, c)
    for spec, size in (("ia,...abc->...ibc", a), ("jb,...ibc->...ijc", b), ("kc,...ijc->...ijk", c)):
        if size > 1:
            y = jnp.einsum(spec, jnp.asarray(sylvester_hadamard(size), x.dtype), y, precision=lax.Precision.HIGHEST)
    return y.reshape(*lead, n) * jnp.asarray(1.0 / math.sqrt(n), x.dtype)


def random_signs(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Float32 +-1 matrix of `shape`, 32 signs per random uint32 word.

    Unpacking bits costs 1/32 of the PRNG work of jax.random.rademacher. Bits are drawn as a
    1-D array (several times faster to compile than 2-D threefry) with the threefry mode
    pinned, so the signs depend on nothing but the key.
    """
    rows, cols = shape
    words = -(-cols // 32)
    with jax.threefry_partitionable(True):
        bits = jax.random.bits(key, (rows * words,), jnp.uint32).reshape(rows, words)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    unpacked = ((bits[..., None] >> shifts) & 1).reshape(rows, words * 32)[:, :cols]
    return 1.0 - 2.0 * unpacked.astype(jnp.float32)


def block_matrix(key: jax.Array, rows: int, k: int, kind: str) -> jax.Array:
    """The [rows, k] unscaled block of a Rademacher or Gaussian sketch.

    This is the definition of the sketch: coordinates [j*B, (j+1)*B) of leaf i (B = block_size)
    meet block_matrix(fold_in(fold_in(key(seed), i), j), B, k, kind) / sqrt(k); a leaf's last,
    partial block uses the leading rows.
    """
    if kind == "rademacher":
        return random_signs(key, (rows, k))
    if kind == "gaussian":
        with jax.threefry_partitionable(True):
            return jax.random.normal(key, (rows * k,), jnp.float32).reshape(rows, k)
    raise ValueError(f"block_matrix: kind must be 'rademacher' or 'gaussian', got {kind!r}")


def _fetch_block(x: jax.Array, j: jax.Array, rows: int) -> jax.Array:
    """Coordinates [j*rows, (j+1)*rows) of flat leaf x as float32, zero past its end.

    A static-size slice cannot run past the leaf, so the last block is sliced at n - rows
    and rolled into place; leaves shorter than a block are zero padded (they are small).
    """
    n = x.shape[-1]
    if n <= rows:
        return jnp.pad(x.astype(jnp.float32), (0, rows - n))
    start = j * rows
    s = jnp.minimum(start, n - rows)
    blk = lax.dynamic_slice_in_dim(x, s, rows).astype(jnp.float32)
    if n % rows == 0:
        return blk
    shift = start - s  # > 0 only in the last block
    keep = jnp.arange(rows) < rows - shift
    return jnp.where(keep, jnp.roll(blk, -shift), 0.0)


def _dense(leaves: list[jax.Array], key: jax.Array, k: int, block_size: int, kind: str,
           zeros: list[int], indices: list[int]) -> jax.Array:
    """Unscaled sum of x_block @ block_matrix over every block of every leaf (but the blocks that lie inside
    a leaf's known-zero prefix of zeros[i] coordinates: they add nothing); leaves[p] is leaf indices[p] of
    the tree (its key).

    One fori_loop walks a static (leaf, block) table and a lax.switch fetches the block from
    its leaf, so the PRNG and the matmul are compiled once, not once per leaf (threefry costs
    ~0.3 s of XLA compile per instance; a model has hundreds of leaves). One [block, k] matrix
    is alive at a time.
    """
    pairs = [(p, indices[p], j) for p, x in enumerate(leaves)
             for j in range(zeros[p] // block_size, -(-x.size // block_size))]
    if not pairs:
        return jnp.zeros((k,), jnp.float32)
    table = jnp.asarray(np.array(pairs, np.int32).reshape(-1, 3))
    fetchers = [functools.partial(_fetch_block, jnp.ravel(x), rows=block_size) for x in leaves]

    def body(t, acc):
        p, i, j = table[t, 0], table[t, 1], table[t, 2]
        xb = lax.switch(p, fetchers, j) if len(fetchers) > 1 else fetchers[0](j)
        m = block_matrix(jax.random.fold_in(jax.random.fold_in(key, i), j), block_size, k, kind)
        return acc + jnp.dot(xb, m, precision=lax.Precision.HIGHEST)

    return lax.fori_loop(0, len(pairs), body, jnp.zeros((k,), jnp.float32))


def srht_blocks(n: int, block_size: int) -> int:
    """Hadamard blocks (of block_size, the tail zero padded) covering a leaf of n coordinates."""
    return -(-n // block_size)


@functools.partial(jax.jit, static_argnums=1)
def srht_signs(sign_keys: jax.Array, block_size: int) -> jax.Array:
    """[blocks, block_size] +-1 signs, one key per Hadamard block (one batched PRNG call)."""
    return jax.vmap(lambda kk: random_signs(kk, (1, block_size))[0])(sign_keys)


def srht_plan(leaf_key: jax.Array, n: int, k: int, block_size: int):
    """Random parts of one leaf's SRHT: (sign_keys [blocks], src, dst, scale).

    The leaf's sketch is out[dst] += scale * y[src], y = blockdiag(H) (signs * x_padded) with
    signs = srht_signs(sign_keys, block_size).
    With n_pad >= k: src = k uniform distinct coordinates, dst = 0..k-1, scale = sqrt(n_pad/k).
    A leaf with n_pad < k keeps all coordinates (scale 1) in n_pad distinct random output slots.
    Either way E[P^T P] = I for the leaf; independent signs make cross-leaf terms vanish.
    """
    blocks = srht_blocks(n, block_size)
    n_pad = blocks * block_size
    # Hoisted to trace time when the key is concrete: a jitted projection then carries the
    # sample as a constant instead of redrawing it on every call.
    with jax.ensure_compile_time_eval():
        sign_keys, src, dst = _srht_draw(leaf_key, blocks, n_pad, k)
    scale = math.sqrt(n_pad / k) if n_pad >= k else 1.0
    return sign_keys, src, dst, scale


@functools.partial(jax.jit, static_argnums=1)
def _block_keys(leaf_key: jax.Array, blocks: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(leaf_key, 0), jnp.arange(blocks))


def _srht_draw(leaf_key: jax.Array, blocks: int, n_pad: int, k: int):
    """(sign_keys, src, dst) of srht_plan."""
    sample_key = jax.random.fold_in(leaf_key, 1)
    if n_pad >= k:
        src, dst = sample_without_replacement(sample_key, n_pad, k), jnp.arange(k)
    else:
        src, dst = jnp.arange(n_pad), sample_without_replacement(sample_key, k, n_pad)
    return _block_keys(leaf_key, blocks), src, dst


def _srht(leaves: list[jax.Array], key: jax.Array, k: int, block_size: int, zeros: list[int],
          indices: list[int]) -> jax.Array:
    """All leaves' SRHTs in a few batched transforms, so compile time does not grow per leaf (leaves[p] is
    leaf indices[p] of the tree: its key).

    Each leaf is zero padded to whole Hadamard blocks; the blocks of consecutive leaves are
    stacked (an O(d) copy, like the padding itself) into groups of < 2**31 coordinates, so
    int32 indices suffice, and each group goes through one fwht and one gather/scatter-add.
    The whole blocks inside a leaf's known-zero prefix (zeros[i] coordinates) transform to zero:
    they are left out of the transform, and the sampled coordinates that fall in them add 0.
    """
    out = jnp.zeros((k,), jnp.float32)
    group: list = []
    offset = 0

    def flush(group):
        parts, keys, src, dst, scale = zip(*group)
        cat = jnp.concatenate
        y = fwht(cat(parts).reshape(-1, block_size) * srht_signs(cat(keys), block_size)).reshape(-1)
        return jnp.zeros((k,), jnp.float32).at[cat(dst)].add(y[cat(src)] * cat(scale))

    for i, leaf, zero in zip(indices, leaves, zeros):
        n = leaf.size
        if not n:
            continue
        n_pad = srht_blocks(n, block_size) * block_size
        if group and offset + n_pad > _INT32_MAX:  # (n_pad: an upper bound of what this leaf adds)
            out, group, offset = out + flush(group), [], 0
        with jax.ensure_compile_time_eval():
            leaf_key = jax.random.fold_in(key, i)
        keys, src, dst, scale = srht_plan(leaf_key, n, k, block_size)
        skip = min(zero // block_size * block_size, n_pad)  # whole zero blocks
        if skip == n_pad:
            continue
        x = jnp.pad(jnp.ravel(leaf)[skip:].astype(jnp.float32), (0, n_pad - n))
        weight = jnp.where(src >= skip, jnp.float32(scale), jnp.float32(0.0))  # 0: a coordinate of a zero block
        group.append((x, keys[skip // block_size:], jnp.maximum(src - skip, 0) + offset, dst, weight))
        offset += n_pad - skip
    return out + flush(group) if group else out


def _sketch(leaves, indices, key, kind: str, dim: int, block_size: int, zeros) -> jax.Array:
    """The sketch's share of leaves[p] (leaf indices[p] of a tree): srht or a scaled dense kind."""
    if kind == "srht":
        return _srht(leaves, key, dim, block_size, zeros, indices)
    return _dense(leaves, key, dim, block_size, kind, zeros, indices) * jnp.float32(1.0 / math.sqrt(dim))


def _check_parts(kind: str, sizes) -> None:
    if kind not in KINDS or kind == "none":
        raise ValueError(f"a sketch in parts needs kind rademacher, gaussian or srht, got {kind!r}")
    if any(n > _INT32_MAX for n in sizes):
        raise ValueError("a leaf has > 2**31-1 coordinates; split it")


def sketch_leaves(leaves: dict, key: jax.Array, kind: str, dim: int, block_size: int = 2**14) -> jax.Array:
    """The share of some whole leaves in project_tree's sketch of a tree (normalize=False): `leaves` maps
    each leaf's index in the tree's jax.tree.leaves order (its key) to its values. With sketch_layer for the
    stacked layer leaves, the shares add up to the sketch of the whole tree, which never has to exist."""
    _check_parts(kind, [jnp.size(x) for x in leaves.values()])
    indices = [i for i, x in leaves.items() if jnp.size(x)]
    if not indices:
        return jnp.zeros((dim,), jnp.float32)
    return _sketch([jnp.asarray(leaves[i]) for i in indices], indices, key, kind, dim, block_size, [0] * len(indices))


#: Coordinates sketch_layer transforms at a time (16 MiB of float32), whatever the size of the layer.
LAYER_STEP_COORDS = 1 << 22


def sketch_layer(x: jax.Array, layer, *, index: int, layers: int, key: jax.Array, kind: str, dim: int,
                 block_size: int = 2**14) -> jax.Array:
    """Layer `layer`'s share of project_tree's sketch (normalize=False) of a stacked layer leaf, from that
    layer's slice x alone: the leaf is leaf `index` of the tree, of shape [layers, *x.shape]; `layer` may be
    traced (a scan over the layers). Summed over the layers it is the leaf's share (sketch_leaves), to
    float rounding: a per-example gradient is sketched layer by layer as its backward pass makes it.

    The blocks of the flattened leaf that hold the slice (ceil(size / block) of them, one more where a
    block straddles two layers) are rebuilt from x with zeros outside it, LAYER_STEP_COORDS at a time (no
    float32 copy of the slice); the sketch being linear, a straddling block's share splits exactly between
    its layers. Blocks past the leaf's end hold zeros and no sampled coordinate: they add nothing.
    """
    s, b = x.size, block_size
    n = layers * s
    _check_parts(kind, [n])
    span = -(-s // b) + (1 if s % b else 0)  # blocks a slice can touch
    group = 1 if kind != "srht" else max(1, min(span, LAYER_STEP_COORDS // b))
    steps = -(-span // group)
    start = jnp.asarray(layer, jnp.int32) * s
    j0 = start // b  # the slice begins in block j0, at offset start - j0 * b
    padded = jnp.pad(jnp.ravel(x), (b, steps * group * b))  # zeros before and after the slice
    with jax.ensure_compile_time_eval():
        leaf_key = jax.random.fold_in(key, index)

    def window(t):  # blocks j0 + t*group .. + group of the flattened leaf: [group, b] float32
        at = start - j0 * b  # in [0, b)
        return lax.dynamic_slice_in_dim(padded, b - at + t * group * b, group * b).astype(jnp.float32).reshape(
            group, b)

    if kind == "srht":
        _, src, dst, scale = srht_plan(leaf_key, n, dim, b)
        sign_base = jax.random.fold_in(leaf_key, 0)  # block j's signs: fold_in(sign_base, j) (_block_keys)

        def body(t, acc):
            first = j0 + t * group
            keys = jax.vmap(jax.random.fold_in, (None, 0))(sign_base, first + jnp.arange(group))
            y = fwht(window(t) * srht_signs(keys, b)).reshape(-1)
            at = src - first * b
            inside = (at >= 0) & (at < group * b)
            picked = jnp.where(inside, y[jnp.clip(at, 0, group * b - 1)], 0.0)
            return acc.at[dst].add(picked * jnp.float32(scale))

        return lax.fori_loop(0, steps, body, jnp.zeros((dim,), jnp.float32))

    def dense(t, acc):
        m = block_matrix(jax.random.fold_in(leaf_key, j0 + t), b, dim, kind)
        return acc + jnp.dot(window(t)[0], m, precision=lax.Precision.HIGHEST)

    return lax.fori_loop(0, steps, dense, jnp.zeros((dim,), jnp.float32)) * jnp.float32(1.0 / math.sqrt(dim))


def global_norm_sq(tree) -> jax.Array:
    """Squared L2 norm of all leaves together, accumulated in float32."""
    sq = [jnp.sum(jnp.square(jnp.asarray(l).astype(jnp.float32))) for l in jax.tree.leaves(tree)]
    return sum(sq, jnp.float32(0.0))


def project_tree(tree, key: jax.Array, kind: str, dim: int, block_size: int = 2**14,
                 normalize: bool = False, zeros=None) -> jax.Array:
    """Sketch one sample's pytree with an explicit (possibly traced) key; see Projector.

    Projector.project calls this with key(seed); a traced key (e.g. vmapped over seeds) works
    too, it only moves the SRHT coordinate sample from trace time into the graph. zeros: per leaf
    (in jax.tree.leaves order), how many leading coordinates of its flattened values the caller knows
    are zero (a static tuple of ints, or None): the sketch is the same, without the work on those blocks.
    """
    leaves = [jnp.asarray(l) for l in jax.tree.leaves(tree)]
    zeros = [0] * len(leaves) if zeros is None else [int(z) for z in zeros]
    if len(zeros) != len(leaves):
        raise ValueError(f"zeros has {len(zeros)} entries for {len(leaves)} leaves")
    for i, leaf in enumerate(leaves):
        if leaf.size > _INT32_MAX:
            raise ValueError(f"leaf {i} has {leaf.size} > 2**31-1 coordinates; split it")
    if kind == "none":
        flat = [jnp.ravel(l).astype(jnp.float32) for l in leaves]
        out = jnp.concatenate(flat) if flat else jnp.zeros((0,), jnp.float32)
    elif not any(l.size for l in leaves):
        out = jnp.zeros((dim,), jnp.float32)
    else:
        out = _sketch(leaves, list(range(len(leaves))), key, kind, dim, block_size, zeros)
    if normalize:
        # The sketch is linear, so scaling the [k] output equals normalizing the input tree.
        # Both wheres keep value and gradient finite for an all-zero tree.
        sq = global_norm_sq(tree)
        out = out * jnp.where(sq > 0, lax.rsqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
    return out


@dataclass(frozen=True)
class Projector:
    """A fixed random linear map from a gradient pytree to R^k with E[<Px, Py>] = <x, y>.

    kind: "rademacher" | "gaussian" (dense blockwise sketches, entries +-1/sqrt(k) or
    N(0, 1/k)), "srht" (subsampled randomized Hadamard, O(d log block_size) per sample), or
    "none" (the flattened tree itself, for tiny models and exact references).
    block_size: coordinates per generated block; memory is O(block_size * k) for the dense
    kinds (2**14 x 2**15 float32 is 2 GiB: lower it for large k). For "srht" it is the
    Hadamard block length and must be a power of two.
    """

    kind: str
    dim: int
    seed: int = 0
    block_size: int = 2**14

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Projector.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "none" and self.dim < 1:
            raise ValueError(f"Projector.dim must be >= 1, got {self.dim}")
        if self.block_size < 1:
            raise ValueError(f"Projector.block_size must be >= 1, got {self.block_size}")
        if self.kind == "srht" and self.block_size & (self.block_size - 1):
            raise ValueError(f"srht needs a power-of-two block_size, got {self.block_size}")

    def key(self) -> jax.Array:
        """The root PRNG key; leaf i uses fold_in(key, i)."""
        with jax.ensure_compile_time_eval():
            return jax.random.key(self.seed, impl=_PRNG_IMPL)

    @functools.partial(jax.jit, static_argnames=("self", "normalize", "zeros"))
    def project(self, tree, *, normalize: bool = False, zeros: tuple[int, ...] | None = None) -> jax.Array:
        """Sketch ONE sample's pytree to a float32 [dim] vector (jit- and vmap-able).

        normalize=True divides by the tree's global L2 norm first (cosine scores); a zero
        tree gives zeros, never NaN. Jitted with the (hashable) projector static, so eager
        calls compile once per tree structure; inside a caller's jit/vmap it simply inlines.
        zeros: per leaf, a known-zero prefix of its flattened coordinates (project_tree), whose
        blocks the sketch skips (the gradients of layers below a first layer).
        """
        return project_tree(tree, self.key(), self.kind, self.dim, self.block_size, normalize, zeros)

    def project_leaves(self, leaves: dict) -> jax.Array:
        """The share of some whole leaves {index in the tree: values} in project's sketch (sketch_leaves)."""
        return sketch_leaves(leaves, self.key(), self.kind, self.dim, self.block_size)

    def project_layer(self, x, layer, *, index: int, layers: int) -> jax.Array:
        """Layer `layer`'s share, from its slice x, of project's sketch of stacked leaf `index` (sketch_layer)."""
        return sketch_layer(x, layer, index=index, layers=layers, key=self.key(), kind=self.kind, dim=self.dim,
                            block_size=self.block_size)

    def project_batch(self, trees, *, normalize: bool = False) -> jax.Array:
        """Sketch a pytree whose leaves have a leading sample axis: [B, dim]."""
        return jax.vmap(lambda t: self.project(t, normalize=normalize))(trees)
