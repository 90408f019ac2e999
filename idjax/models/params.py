"""Checkpoint conversion: HF safetensors and GGUF files to the NNX state, and back.

Kept apart from modeling: the decoder knows nothing of file formats. Every format is first turned
into HF tensor names (numpy, PyTorch [out, in] layout), then one table of regex rules maps HF names
to NNX paths, stacking layers and transposing linear kernels.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from idjax.models.config import CheckpointError, ModelConfig, UnsupportedModelError
from idjax.models.modeling import CausalLM, abstract_model

log = logging.getLogger(__name__)

_L = r"model\.layers\.(\d+)\."
# (HF name regex, NNX path with {g} for the captured module name, is-per-layer, transpose)
_RULES: list[tuple[re.Pattern, tuple[str, ...], bool, bool]] = [
    (re.compile(r"model\.embed_tokens\.weight"), ("embed_tokens", "embedding"), False, False),
    (re.compile(r"model\.norm\.weight"), ("norm", "weight"), False, False),
    (re.compile(r"lm_head\.weight"), ("lm_head", "kernel"), False, True),
    (re.compile(_L + r"(input_layernorm|post_attention_layernorm)\.weight"), ("layers", "{g}", "weight"), True, False),
    (re.compile(_L + r"self_attn\.([qkvo]_proj)\.weight"), ("layers", "self_attn", "{g}", "kernel"), True, True),
    (re.compile(_L + r"self_attn\.([qkvo]_proj)\.bias"), ("layers", "self_attn", "{g}", "bias"), True, False),
    (re.compile(_L + r"self_attn\.([qk]_norm)\.weight"), ("layers", "self_attn", "{g}", "weight"), True, False),
    (re.compile(_L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight"), ("layers", "mlp", "{g}", "kernel"), True, True),
    (re.compile(_L + r"mlp\.(gate_proj|up_proj|down_proj)\.bias"), ("layers", "mlp", "{g}", "bias"), True, False),
]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")


def _match(name: str):
    for pattern, path, per_layer, transpose in _RULES:
        m = pattern.fullmatch(name)
        if m:
            group = m.group(m.re.groups) if m.re.groups else None
            layer = int(m.group(1)) if per_layer else None
            return tuple(p.format(g=group) for p in path), layer, transpose
    return None


def _hf_name(path: tuple[str, ...], layer: int | None) -> str:
    """Inverse of the rules: the HF name of one NNX path (and layer)."""
    if path[0] == "embed_tokens":
        return "model.embed_tokens.weight"
    if path[0] == "norm":
        return "model.norm.weight"
    if path[0] == "lm_head":
        return "lm_head.weight"
    leaf = "weight" if path[-1] in ("kernel", "weight") else path[-1]
    return f"model.layers.{layer}." + ".".join(path[1:-1]) + "." + leaf


class Tensor:
    """A checkpoint tensor read on demand: `shape` (HF layout), and `read(index)` the numpy values of a
    tuple of slices, so a sharded load reads only what each device holds."""

    def __init__(self, shape, read):
        self.shape = tuple(int(d) for d in shape)
        self.read = read

    @classmethod
    def of(cls, value) -> "Tensor":
        if isinstance(value, Tensor):
            return value
        array = np.asarray(value)
        return cls(array.shape, lambda index: array[index])


def _read(tensor: Tensor, index: tuple[slice, ...], transpose: bool, np_dtype) -> np.ndarray:
    """The NNX-layout values at `index` (one slice per NNX dimension) of an HF-layout tensor."""
    value = np.asarray(tensor.read(tuple(reversed(index)) if transpose else index))
    return (value.T if transpose else value).astype(np_dtype, copy=False)


def model_from_hf_tensors(
    config: ModelConfig, tensors: Mapping[str, object] | Iterable[tuple[str, object]],
    *, dtype=jnp.float32, source: str = "checkpoint", shardings: Mapping[tuple[str, ...], object] | None = None,
) -> CausalLM:
    """Build a CausalLM from HF-named tensors (numpy arrays or `Tensor`s) without a random initialisation.

    shardings: NNX path -> jax.sharding.Sharding; each parameter is then made by
    jax.make_array_from_callback, every device's block read from the tensors on its own (a `Tensor`
    reads only that slice), so no device ever holds a whole sharded matrix. None: the default device.
    """

    abstract = abstract_model(config, dtype=dtype)
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    parts: dict[tuple[str, ...], dict[int | None, Tensor]] = {}
    np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    unknown = []
    for name, value in items:
        if _IGNORED.fullmatch(name):
            continue
        hit = _match(name)
        if hit is None:
            unknown.append(name)
            continue
        path, layer, transpose = hit
        if path not in flat:
            if path == ("lm_head", "kernel") and config.tie_word_embeddings:
                continue  # some tied checkpoints also store lm_head.weight
            raise CheckpointError(f"{source}: tensor {name} does not fit this config ({config.model_type})")
        tensor = Tensor.of(value)
        shape = tuple(reversed(tensor.shape)) if transpose else tensor.shape
        target = flat[path].get_value()
        want = target.shape[1:] if layer is not None else target.shape
        if shape != tuple(want):
            raise CheckpointError(f"{source}: tensor {name} has shape {tensor.shape}, config expects "
                                  f"{tuple(reversed(want)) if transpose else tuple(want)}")
        if layer is not None and layer >= config.num_layers:
            raise CheckpointError(f"{source}: tensor {name} names layer {layer} of {config.num_layers}")
        parts.setdefault(path, {})[layer] = tensor
    if unknown:
        raise CheckpointError(f"{source}: unexpected tensors (unsupported architecture?): {unknown[:8]}")
    missing = []
    for path in flat:
        need = set(range(config.num_layers)) if path[0] == "layers" else {None}
        lacking = need - set(parts.get(path, {}))
        if lacking:
            missing.append(_hf_name(path, min(lacking) if path[0] == "layers" else None))
    if missing:
        raise CheckpointError(f"{source}: missing tensors: {missing[:8]}")
    for path, var in flat.items():
        shape = var.get_value().shape
        stacked, transpose = path[0] == "layers", path[-1] == "kernel"
        here = parts.pop(path)  # in-memory tensors are freed as soon as their parameter exists

        def block(index, here=here, stacked=stacked, transpose=transpose, shape=shape):
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            index = tuple(slice(*sl.indices(n)) for sl, n in zip(index, shape))
            if not stacked:
                return _read(here[None], index, transpose, np_dtype)
            layers = range(*index[0].indices(shape[0]))  # the layer axis is never sharded: all of them
            return np.stack([_read(here[layer], index[1:], transpose, np_dtype) for layer in layers])

        sharding = None if shardings is None else shardings.get(path)
        if sharding is None:
            var.set_value(jnp.asarray(block(())))
        else:
            var.set_value(jax.make_array_from_callback(shape, sharding, block))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def host_array(value) -> np.ndarray:
    """The whole array as numpy. One that spans several processes (a model sharded over every host's
    devices) is gathered from all of them: a collective, which every process must call alike."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def gather_params(model: CausalLM) -> None:
    """What a process that does not write calls instead of iter_hf_tensors: the same gathers of the arrays
    that span processes, in the same order (each is a collective), and none of the host copies, casts and
    transposes of the HF layout."""
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            host_array(value)


def iter_hf_tensors(model: CausalLM, *, dtype=None):
    """(HF name, array) of every parameter in HF layout, one stacked leaf gathered at a time (host_array:
    with several processes every process iterates, and each may drop what it does not write)."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = host_array(var.get_value())
        if dtype is not None:
            value = value.astype(dtype)
        transpose = path[-1] == "kernel"
        if path[0] == "layers":
            for i in range(value.shape[0]):
                yield _hf_name(path, i), np.ascontiguousarray(value[i].T if transpose else value[i])
        else:
            yield _hf_name(path, None), np.ascontiguousarray(value.T if transpose else value)


# ----------------------------------------------------------------------------- safetensors


def _unreadable(fpath: Path, e: Exception) -> Exception:
    """The error to raise for a safetensors file that cannot be read."""
    if isinstance(e, (CheckpointError, OSError)) and (not isinstance(e, OSError) or e.filename):
        return e
    msg = " ".join(str(e).split())  # SafetensorError (truncated, bad header) derives from Exception only
    return CheckpointError(f"{fpath}: not a readable safetensors file, truncated or corrupt "
                           f"({type(e).__name__}: {msg})")


def _read_slice(fpath: Path, name: str, index: tuple[slice, ...]) -> np.ndarray:
    from safetensors import safe_open

    try:
        with safe_open(str(fpath), framework="numpy") as f:
            return f.get_slice(name)[index]
    except Exception as e:  # noqa: BLE001 -- named, one line (see _unreadable)
        raise _unreadable(fpath, e) from None


def read_safetensors_dir(path: Path):
    """Yield (name, Tensor) over a single-file or index-sharded safetensors checkpoint. Only the
    headers are read here; a Tensor reads the slice it is asked for (a sharded load reads each
    device's block, never a whole matrix)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, no/odd weight_map
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' object "
                                  f"({type(e).__name__}: {e})") from None
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files next to config.json")
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{path}: shard {fname} named in the index is missing")
        try:
            with safe_open(str(fpath), framework="numpy") as f:
                shapes = [(name, f.get_slice(name).get_shape()) for name in f.keys()]
        except Exception as e:  # noqa: BLE001 -- named, one line (see _unreadable)
            raise _unreadable(fpath, e) from None
        for name, shape in shapes:
            yield name, Tensor(shape, functools.partial(_read_slice, fpath, name))


def write_safetensors_dir(tensors: dict[str, np.ndarray], path: Path, max_shard_bytes: int = 5 * 2**30):
    """Write one file, or HF-style shards plus model.safetensors.index.json when large."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if size and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(v.nbytes for v in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


# ----------------------------------------------------------------------------- GGUF

_GGUF_NAMES = [
    (re.compile(r"token_embd\.weight"), "model.embed_tokens.weight"),
    (re.compile(r"output_norm\.weight"), "model.norm.weight"),
    (re.compile(r"output\.weight"), "lm_head.weight"),
    (re.compile(r"blk\.(\d+)\.attn_norm\.weight"), "model.layers.{0}.input_layernorm.weight"),
    (re.compile(r"blk\.(\d+)\.ffn_norm\.weight"), "model.layers.{0}.post_attention_layernorm.weight"),
    (re.compile(r"blk\.(\d+)\.attn_q\.(weight|bias)"), "model.layers.{0}.self_attn.q_proj.{1}"),
    (re.compile(r"blk\.(\d+)\.attn_k\.(weight|bias)"), "model.layers.{0}.self_attn.k_proj.{1}"),
    (re.compile(r"blk\.(\d+)\.attn_v\.(weight|bias)"), "model.layers.{0}.self_attn.v_proj.{1}"),
    (re.compile(r"blk\.(\d+)\.attn_output\.(weight|bias)"), "model.layers.{0}.self_attn.o_proj.{1}"),
    (re.compile(r"blk\.(\d+)\.attn_q_norm\.weight"), "model.layers.{0}.self_attn.q_norm.weight"),
    (re.compile(r"blk\.(\d+)\.attn_k_norm\.weight"), "model.layers.{0}.self_attn.k_norm.weight"),
    (re.compile(r"blk\.(\d+)\.ffn_gate\.weight"), "model.layers.{0}.mlp.gate_proj.weight"),
    (re.compile(r"blk\.(\d+)\.ffn_up\.weight"), "model.layers.{0}.mlp.up_proj.weight"),
    (re.compile(r"blk\.(\d+)\.ffn_down\.weight"), "model.layers.{0}.mlp.down_proj.weight"),
]


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope) back to HF's rotate-half layout."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_value(reader, key, default=None):
    """A metadata value of an open GGUF file (`default` when absent)."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader) -> ModelConfig:
    arch = gguf_value(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (llama, qwen2, qwen3)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError(
            "GGUF files with rope_freqs (Llama 3.1 style scaling) are not supported; load the HF checkpoint"
        )
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise CheckpointError("no token_embd.weight tensor")
    for key in ("embedding_length", "attention.head_count", "feed_forward_length", "block_count"):
        if gguf_value(reader, f"{arch}.{key}") is None:
            raise CheckpointError(f"metadata field '{arch}.{key}': missing")
    hidden = int(gguf_value(reader, f"{arch}.embedding_length"))
    n_head = int(gguf_value(reader, f"{arch}.attention.head_count"))
    eos = gguf_value(reader, "tokenizer.ggml.eos_token_id")
    hf = {
        "model_type": arch,
        "vocab_size": int(embd.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(gguf_value(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(gguf_value(reader, f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(gguf_value(reader, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(gguf_value(reader, f"{arch}.attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(gguf_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(gguf_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(gguf_value(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names and arch != "qwen2",
        "bos_token_id": gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": gguf_value(reader, "tokenizer.ggml.padding_token_id"),
    }
    scaling = gguf_value(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UnsupportedModelError(f"GGUF rope scaling {scaling!r} is not supported")
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(gguf_value(reader, f"{arch}.rope.scaling.factor"))}
    return ModelConfig.from_hf(hf)


def open_gguf(path: Path):
    """A gguf.GGUFReader of `path`; a damaged file is one CheckpointError naming it."""
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        if isinstance(e, OSError) and e.filename:
            raise  # unreadable: the OSError names the file
        msg = " ".join(str(e).split())  # e.g. a truncated file: its tensors overrun the end
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({msg})") from None


def read_gguf(path: Path) -> tuple[ModelConfig, Iterable[tuple[str, Tensor]]]:
    """Config and HF-named tensors of a GGUF file, dequantized to float32 when read."""

    reader = open_gguf(path)
    try:
        config = gguf_config(reader)
    except ValueError as e:  # UnsupportedModelError, CheckpointError, a bad metadata value
        raise (type(e) if isinstance(e, (UnsupportedModelError, CheckpointError)) else CheckpointError)(
            f"{path}: {e}") from None

    def tensors():
        for t in reader.tensors:
            for pattern, template in _GGUF_NAMES:
                m = pattern.fullmatch(t.name)
                if m:
                    name = template.format(*m.groups())
                    break
            else:
                raise CheckpointError(f"{path}: unexpected GGUF tensor {t.name}")
            heads = None
            if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
            yield name, Tensor(shape, functools.partial(_dequantized, t, heads))

    return config, tensors()


def _dequantized(t, heads: int | None, index: tuple[slice, ...]) -> np.ndarray:
    """A slice of a GGUF tensor: the whole tensor is dequantized (quantized blocks run along rows), then
    cut; llama's q/k rows are put back in HF's order first."""
    import gguf

    w = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32)
    if heads is not None:
        w = _unpermute_rope(w, heads)
    return w[index]
