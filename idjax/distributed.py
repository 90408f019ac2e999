"""Several processes (hosts): start, work split, barriers, broadcast and failure detection.

The devices of one process and the mesh over them are idjax.sharding (docs/method.md 4.5).

Processes (hosts) start with `initialize` (jax.distributed: a coordinator address, the number of
processes and this process's index; from CLI options, IDJAX_* environment variables, or JAX's
cluster auto-detection on TPU pods, SLURM and Open MPI). Gloo carries CPU collectives.
Pool-axis work is embarrassingly parallel, so the selection pipeline does not run it in lockstep:
process p computes the chunks p, p + P, p + 2P, ... of each on-disk store (a shared file system; one
manifest per store, chunk files written atomically), on its own devices, then waits at a barrier;
landmark-sized values are broadcast from process 0; process 0 gathers (reads the complete stores)
and writes the result. Training runs SPMD over a global mesh of every process's devices.

Failure handling. The barriers and broadcasts here poll the coordination service: they fail fast,
with `DistributedError` (one clear line from the CLI), when another process reports a failure, when
a process stops sending heartbeats (it died; detected after `heartbeat_timeout_s`), or when the wait
exceeds its timeout. A process that fails publishes its error so that the others stop too. Finished
store chunks stay on disk: re-running the same command (with any number of processes) resumes.
For that, commands that only coordinate through barriers start the service in JAX's recoverable mode
(`jax_enable_recoverability`), so one process's death does not abort the others before they can
report it. If process 0 (which hosts the coordination service) dies, jaxlib aborts the others at once
from its own thread ("the JAX distributed service detected fatal errors"); the CLI runs every other
process's command under a small parent (idjax.supervise) that turns this into one line and exit code 1.
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from idjax.io import atomic_write
from idjax.sharding import get_mesh

log = logging.getLogger(__name__)

ENV = {"coordinator": "IDJAX_COORDINATOR", "num_processes": "IDJAX_NUM_PROCESSES",
       "process_id": "IDJAX_PROCESS_ID"}


class DistributedError(ConnectionError):
    """Another process failed, died or cannot be reached; finished work is kept on disk."""


# ----------------------------------------------------------------------------- starting processes


@dataclasses.dataclass
class _State:
    started: bool = False          # initialize() started jax.distributed in this process
    fault_tolerant: bool = False   # recoverable mode: peers' deaths are reported, not fatal
    heartbeat_s: int = 60
    counter: int = 0               # barrier / broadcast sequence number (the same on every process)
    failed: bool = False           # this process published a failure
    note: str = ""                 # appended to errors, e.g. where the finished chunks are
    seen: dict = dataclasses.field(default_factory=dict)  # peer -> (heartbeat count, when it last changed)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


_STATE = _State()


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, local_device_ids: Sequence[int] | None = None, heartbeat_timeout_s: int = 60,
               init_timeout_s: int = 300, fault_tolerant: bool = True) -> bool:
    """Start jax.distributed when asked to; return whether this is a multi-process run.

    coordinator: "host:port" of process 0 (which starts the coordination service there), or "auto"
        for JAX's cluster auto-detection (TPU pod slices, SLURM, Open MPI). Each of the three
        arguments falls back to the environment (IDJAX_COORDINATOR, IDJAX_NUM_PROCESSES,
        IDJAX_PROCESS_ID); with no coordinator at all this is a single-process run and nothing starts.
    heartbeat_timeout_s: a process that stops sending heartbeats this long counts as dead.
    fault_tolerant: start the service in JAX's recoverable mode, so a dead process is reported by
        the barriers here (DistributedError) instead of aborting everyone. Use False for work that
        runs collectives across processes (training): a collective cannot outlive a peer.
    Must run before anything touches a JAX backend. On CPU, collectives go over gloo.
    """
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError("--num-processes / --process-id need --coordinator HOST:PORT (or 'auto')")
        return False
    if coordinator != "auto":
        if num_processes is None or process_id is None:
            raise ValueError(f"--coordinator {coordinator} needs --num-processes N and --process-id I "
                             "(or --coordinator auto on a TPU pod / SLURM / Open MPI cluster)")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if fault_tolerant:
        jax.config.update("jax_enable_recoverability", True)
    kwargs = dict(initialization_timeout=int(init_timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    if coordinator != "auto":
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JaxRuntimeError, ValueError from auto-detection, ...
        raise DistributedError(f"cannot start the distributed run (coordinator {coordinator}, "
                               f"{num_processes} processes, this is {process_id}): "
                               f"{_first_line(e)}") from e
    _STATE.started, _STATE.fault_tolerant, _STATE.heartbeat_s = True, fault_tolerant, int(heartbeat_timeout_s)
    atexit.register(_at_exit)  # runs before JAX's own shutdown (atexit is last-in, first-out)
    if jax.process_count() > 1:
        threading.Thread(target=_heartbeat, name="idjax-heartbeat", daemon=True).start()
    log.info("process %d of %d started (coordinator %s): %d local and %d global devices", jax.process_index(),
             jax.process_count(), coordinator, jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Process 0: the one that gathers results and writes outputs."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def set_note(note: str) -> None:
    """Context added to DistributedError messages (e.g. which store keeps the finished chunks)."""
    _STATE.note = note


# ----------------------------------------------------------------------------- splitting work


def process_chunks(num_chunks: int, index: int | None = None, count: int | None = None) -> list[int]:
    """The store chunks this process computes: index, index + count, ... (round-robin, so a store's
    chunks, which follow the pool order, spread evenly over the processes)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return list(range(index, num_chunks, count))


def process_rows(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """A contiguous block [start, stop) of n rows for this process; the blocks tile [0, n)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


# ----------------------------------------------------------------------------- coordinating processes


def _client():
    from jax._src import distributed as _dist  # the coordination client jax.distributed started

    client = _dist.global_state.client
    if client is None:
        raise DistributedError("jax.distributed is not initialized")
    return client


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:400]


def _error(msg: str) -> DistributedError:
    note = f"; {_STATE.note}" if _STATE.note else ""
    return DistributedError(f"process {jax.process_index()} of {jax.process_count()}: {msg}{note}")


def _key(kind: str, name: str) -> str:
    return f"idjax/{kind}/{name}"  # values of kind "value" are bytes: never list them with dir_get


def _heartbeat(period_s: float = 1.0) -> None:
    """Count up this process's key in the coordination service every second (a daemon thread).

    The peers watch the count: one that stops changing for heartbeat_timeout_s means a dead (or
    hung) process. JAX's own heartbeats cannot be read without a collective: the service's
    get_live_nodes blocks until every listed process calls it.
    """
    key = _key("alive", str(jax.process_index()))
    while not _STATE.stop.is_set():
        try:
            _client().key_value_increment(key, 1)
        except Exception:  # noqa: BLE001 - the service is gone; the main thread will find out
            return
        _STATE.stop.wait(period_s)


def _count(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _poll_peers(watch: Sequence[int]) -> tuple[list[tuple[str, str]], list[int], list[int]]:
    """(failures published by others, watched peers whose heartbeat stopped, watched peers that left)."""
    client = _client()
    me, now = jax.process_index(), time.monotonic()
    try:
        beats = {k.rsplit("/", 1)[-1]: v for k, v in client.key_value_dir_get(_key("alive", ""))}
        left = {k.rsplit("/", 1)[-1] for k, _ in client.key_value_dir_get(_key("exit", ""))}
        failed = [(k.rsplit("/", 1)[-1], v) for k, v in client.key_value_dir_get(_key("failed", ""))
                  if not k.endswith(f"/{me}")]
    except Exception as e:  # noqa: BLE001 - the service itself is gone (process 0 died)
        raise _error(f"lost contact with the coordination service on process 0 ({_first_line(e)})") from e
    dead = []
    for i in watch:
        count = _count(beats.get(str(i)))
        last = _STATE.seen.get(i)
        if last is None or last[0] != count:
            _STATE.seen[i] = (count, now)
        elif now - last[1] > _STATE.heartbeat_s:
            dead.append(i)
    return failed, dead, [i for i in watch if str(i) in left]


def check_peers(waiting_for: Sequence[int] | None = None) -> None:
    """Raise DistributedError if another process published a failure, or one of `waiting_for` (default:
    every other process) stopped its heartbeat for heartbeat_timeout_s (it died or hangs) or left."""
    if not multi_process():
        return
    me = jax.process_index()
    watch = [i for i in (range(jax.process_count()) if waiting_for is None else waiting_for) if i != me]
    failed, dead, left = _poll_peers(watch)
    if failed:
        raise _error(f"process {failed[0][0]} failed: {failed[0][1]}")
    if dead:
        raise _error(f"process(es) {', '.join(map(str, dead))} died or stopped responding (no heartbeat for "
                     f"{_STATE.heartbeat_s} s)")
    if left:
        raise _error(f"process(es) {', '.join(map(str, left))} left the run before getting here")


def _wait(ready: Callable[[], Any], what: str, timeout_s: float | None, waiting_for=None):
    """Poll `ready` until it returns a value that is not None, checking peers in between."""
    t0, pause = time.monotonic(), 0.05
    while True:
        try:
            value = ready()
        except Exception as e:  # noqa: BLE001
            raise _error(f"{what}: lost contact with the coordination service on process 0 "
                         f"({_first_line(e)})") from e
        if value is not None:
            return value
        check_peers(waiting_for)
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise _error(f"{what}: gave up after {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(1.0, pause * 1.5)


def barrier(name: str, timeout_s: float | None = None) -> None:
    """Wait until every process reaches the barrier `name` (a no-op with one process).

    Fails with DistributedError when a process died or failed first, or after timeout_s (None:
    wait as long as every process is alive: the others may still be computing for hours).
    """
    if not multi_process():
        return
    _STATE.counter += 1
    client, me, n = _client(), jax.process_index(), jax.process_count()
    prefix = _key("barrier", f"{_STATE.counter}-{name}/")
    try:
        client.key_value_set(prefix + str(me), "1")
    except Exception as e:  # noqa: BLE001
        raise _error(f"barrier {name}: lost contact with the coordination service ({_first_line(e)})") from e

    def ready():
        return True if len(client.key_value_dir_get(prefix)) >= n else None

    log.info("waiting for %d processes at %s", n, name)
    _wait(ready, f"barrier {name}", timeout_s)


_KV_BYTES = 1 << 20  # larger broadcasts go through a file in the shared directory


def broadcast(name: str, value: np.ndarray | None = None, *, src: int = 0, timeout_s: float | None = None,
              directory: str | os.PathLike | None = None):
    """Process `src`'s array, on every process (as numpy).

    Small arrays travel through the coordination service's key-value store; arrays over 1 MiB are
    written to `directory` (a file system every process sees, e.g. the store directory) when given.
    """
    if not multi_process():
        return np.asarray(value)
    _STATE.counter += 1
    client = _client()
    key = _key("value", f"{_STATE.counter}-{name}")
    if jax.process_index() == src:
        value = np.asarray(value)
        buf = io.BytesIO()
        if directory is not None and value.nbytes > _KV_BYTES:
            path = Path(directory) / f".broadcast-{_STATE.counter}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy"
            atomic_write(path, lambda f: np.save(f, value, allow_pickle=False))
            buf.write(b"file:" + str(path.absolute()).encode())
        else:
            np.save(buf, value, allow_pickle=False)
        try:
            client.key_value_set_bytes(key, buf.getvalue())
        except Exception as e:  # noqa: BLE001
            raise _error(f"broadcast {name}: {_first_line(e)}") from e
        return value

    def ready():
        try:
            return client.key_value_try_get_bytes(key)
        except Exception as e:  # noqa: BLE001 - NOT_FOUND until src has set it
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    data = _wait(ready, f"waiting for {name} from process {src}", timeout_s, waiting_for=[src])
    if data.startswith(b"file:"):
        return np.load(data[len(b"file:"):].decode(), allow_pickle=False)
    return np.load(io.BytesIO(data), allow_pickle=False)


def publish_failure(error: BaseException | str) -> None:
    """Tell the other processes that this one failed, so their next barrier (or peer check) stops."""
    if not multi_process() or _STATE.failed:
        return
    _STATE.failed = True
    msg = error if isinstance(error, str) else _first_line(error)
    try:
        _client().key_value_set(_key("failed", str(jax.process_index())), msg[:500])
    except Exception:  # noqa: BLE001 - nothing more to do: the others find out from the heartbeat
        pass


class failures_published:
    """Context manager: an exception inside is published to the other processes, then re-raised."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is not None and not isinstance(exc, DistributedError):
            publish_failure(exc)
        return False


def _at_exit(timeout_s: float = 600.0) -> None:
    """Leave in order: process 0 hosts the coordination service, so it waits until every other process
    has left (posted its exit and disconnected) or stopped its heartbeat; a peer still disconnecting
    when the service goes away would be aborted by JAX."""
    if not _STATE.started or not jax.distributed.is_initialized():
        return
    if not _STATE.fault_tolerant:  # JAX's own shutdown barrier orders the exit
        _STATE.stop.set()
        return
    try:
        client, me, n = _client(), jax.process_index(), jax.process_count()
        if me != 0:
            _STATE.stop.set()
            client.key_value_set(_key("exit", str(me)), "1")
            return
        t0, others = time.monotonic(), list(range(1, n))
        while time.monotonic() - t0 < timeout_s:
            _, dead, left = _poll_peers(others)
            if set(dead) | set(left) >= set(others):
                break  # every peer left or died: get_live_nodes below returns once they are disconnected
            time.sleep(0.2)
        _STATE.stop.set()
        done = threading.Event()
        threading.Thread(target=lambda: (client.get_live_nodes(list(range(n))), done.set()), daemon=True).start()
        done.wait(2.0 * _STATE.heartbeat_s + 5.0)
    except Exception:  # noqa: BLE001 - at exit, never raise
        pass


def describe(mesh: Mesh | None = None) -> dict:
    """Where this process stands: for logs and the selection's metadata."""
    mesh = get_mesh() if mesh is None else mesh
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "mesh": None if mesh is None else dict(mesh.shape)}


__all__ = [
    "DistributedError", "initialize", "process_index", "process_count", "is_primary", "multi_process", "set_note",
    "process_chunks", "process_rows", "check_peers", "barrier", "broadcast", "publish_failure",
    "failures_published", "describe",
]
