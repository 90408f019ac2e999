"""Device memory, planned by the compiler: how much a device has, what a compiled program needs, and
the first of several settings (microbatch, rematerialisation) whose program fits.

Why the compiler: activation memory depends on fusion, layouts and what XLA keeps for the backward
pass, which no rule of thumb predicts (a 135M model's training step on 8 x 1024 tokens needs 33 GiB
without remat and 4 GiB with it). `jit(...).lower(...).compile().memory_analysis()` is the program's own count.

Planned programs are kept compiled, so planning costs no second compilation: the setting that
fits is the executable that runs, and the next caller with the same key reuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import jax
import numpy as np

from idjax.options import parse_bytes

log = logging.getLogger(__name__)

GiB = 1 << 30
#: The share of a device's memory a planned program may use: the rest is for the allocator's
#: fragmentation, the arrays of the loop around it, and the compiler's own estimate error.
HEADROOM = 0.9


def compiled_bytes(compiled) -> int:
    """Per-device bytes of a compiled program: arguments + outputs + temporaries - aliased + code."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes + m.generated_code_size_in_bytes)


def _available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_memory(override: int | str | None = None, *, agree: bool = False) -> int | None:
    """Bytes one local device can give a program: `override` (bytes or '24GB') when given; else the
    backend's limit (memory_stats()['bytes_limit'] on GPU and TPU); on a CPU, the host's available
    memory plus what this process's arrays already hold (a program's arguments are counted in its
    need), shared by the local CPU devices. None when nothing says.

    agree: for a program over a mesh of several processes' devices. Every process must then call it (a
    collective) and all get the smallest value, so they plan the same program (different ones would
    deadlock the SPMD step)."""
    if override is not None:
        return parse_bytes(override) if isinstance(override, str) else int(override)
    local = _local_device_memory()
    if not agree or jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.int64(-1 if local is None else local)))
    return None if (every < 0).any() else int(every.min())


def _local_device_memory() -> int | None:
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    available = _available_host_bytes()
    if device.platform != "cpu" or available is None:
        return None
    held = 0
    for x in jax.live_arrays():
        try:
            held += sum(s.data.nbytes for s in x.addressable_shards)
        except RuntimeError:  # a deleted or donated array has no buffers: it holds nothing
            continue
    return (available + held) // jax.local_device_count()


def fits(need: int, budget: int | None) -> bool:
    """Whether a program of `need` bytes per device fits `budget` with the HEADROOM (None: it does)."""
    return budget is None or need <= HEADROOM * budget


_COMPILED: dict = {}  # (key, setting name) -> (compiled, bytes per device)


def first_fit(settings: Sequence[tuple[str, object]], compile_one: Callable, budget: int | None, *, key=None):
    """Compile each (name, value) setting in order, fastest first; the first whose program fits
    `budget` bytes per device wins (budget None: the first). Returns (name, value, compiled, tried):
    tried lists (name, bytes) of every setting looked at; when none fits, the last (leanest) is
    returned and the caller decides what to say.

    key: when given, compiled programs are kept under (key, name) and reused by later calls, whatever
    their budget; it must name everything the programs depend on (the function, its static arguments,
    the shapes, dtypes and shardings of its inputs: input_key)."""
    tried = []
    for name, value in settings:
        cached = None if key is None else _COMPILED.get((key, name))
        if cached is None:
            compiled = compile_one(value)
            cached = (compiled, compiled_bytes(compiled))
            if key is not None:
                _COMPILED[key, name] = cached
        compiled, need = cached
        tried.append((name, need))
        if fits(need, budget):
            break
    return name, value, compiled, tried


def planned(key, settings, compile_one: Callable, budget: int | None, *, what: str):
    """(value, compiled) of first_fit with `key`; a setting other than the first, or none that fits,
    is logged."""
    name, value, compiled, tried = first_fit(settings, compile_one, budget, key=key)
    need = tried[-1][1]
    if not fits(need, budget):
        log.warning("%s: even the leanest setting (%s) needs %.2f GiB per device, more than the %.2f GiB "
                    "available; running it anyway", what, name, need / GiB, budget / GiB)
    elif len(tried) > 1:
        log.info("%s: %s (%.2f GiB per device of %.2f GiB; %s)", what, name, need / GiB, budget / GiB,
                 ", ".join(f"{n}: {b / GiB:.2f} GiB" for n, b in tried[:-1]))
    return value, compiled


def kept(kind: str) -> int:
    """How many executables are kept for keys whose first element is `kind` ("train step", "gradients")."""
    return sum(1 for key, _ in _COMPILED if key[0] == kind)


def clear() -> None:
    """Drop the kept executables (host_memory.release calls this between stages)."""
    _COMPILED.clear()


def input_key(args) -> tuple:
    """The shapes, dtypes and shardings of a pytree of arrays: what an executable was compiled for."""
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((tuple(x.shape), str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
