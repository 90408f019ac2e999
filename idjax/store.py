"""Chunked, resumable on-disk arrays for per-sample embeddings and projected gradients.

JVP embeddings [N, e] and sketched gradients [n, k] of a large pool take hours to compute, so
they go to disk in row chunks as they are produced. A run that dies (SIGKILL, Ctrl-C, OOM)
resumes where it stopped, and a later run with another target set reuses the pool's rows.

Layout of a store directory:

    manifest.json       {"format": "idjax-array-store", "version": 2, "shape", "dtype",
                         "chunk_rows", "num_chunks", "fingerprint": {...}, "created"}
    chunk-000000.npy    rows [0, chunk_rows), then a 24-byte trailer (see below)
    chunk-000001.npy    rows [chunk_rows, 2 * chunk_rows)
    ...                 the last chunk may be short
    .chunk-000002.npy.<host>.<pid>.<token>.tmp    a write in flight (or left by a killed one)

The resume rule: chunk i is done iff `chunk-<i>.npy` exists, its .npy header and size match the
manifest, and its trailer checks out. Completion is never recorded in the shared manifest, which is written once, when
the store is created, so several processes or hosts can fill disjoint chunks of one store
without coordinating. Every file is written to a temporary name in the same directory, fsynced,
then renamed into place (atomic on POSIX), so a reader never sees half a chunk; a killed writer
leaves at most a temporary file, which is ignored and removed on the next open. A chunk file
that fails validation (wrong shape or dtype, truncated, not .npy, a checksum mismatch) counts as
missing: a warning names the file and the next fill recomputes it.

The trailer, written in the same atomic file after the array's bytes (numpy ignores it, so a chunk
still loads with np.load), is b"idjxchk1", 8 bytes of the store fingerprint's digest, and the
CRC-32 of the array bytes (as a little-endian uint64). Validation reads each chunk once per store
object to check the CRC (about 4 GB/s: 1 s for a 200k x 4096 float32 store), so a flipped bit or a
chunk overwritten with NaN or other numbers is recomputed, never used. The fingerprint digest
makes every chunk say what it was computed from: a store whose manifest.json was deleted is
rebuilt from the caller's expectations, and only chunks made for that fingerprint are kept.
Stores of version 1 (no trailers) still open; their chunks are checked by header and size only.

The fingerprint is a dict of short hashes (model, data, config, ...; see `fingerprint`) that
says what the rows were computed from. Opening an existing store with a different fingerprint,
shape, dtype or chunk_rows is an error, never a silent mix of old and new rows.

Files are plain .npy (no pickles anywhere). ml_dtypes types (bfloat16, float8_*) have no .npy
type code, so their chunks hold the raw bits as unsigned integers of the same width; the
manifest records the real dtype and reads give it back.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes  # registers bfloat16 & co. with numpy, so np.dtype("bfloat16") works
import numpy as np

log = logging.getLogger(__name__)

FORMAT = "idjax-array-store"
VERSION = 2            # 2: chunks carry a trailer with a checksum and the fingerprint's digest
_READS = (1, 2)        # versions this code opens
_TRAILER = struct.Struct("<8s8sQ")  # magic, fingerprint digest, CRC-32 of the array bytes
_MAGIC = b"idjxchk1"
MANIFEST = "manifest.json"
_CHUNK_RE = re.compile(r"^chunk-(\d+)\.npy$")
_TMP_RE = re.compile(r"^\.(?P<final>manifest\.json|chunk-\d+\.npy)\.(?P<host>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.tmp$")
_STALE_TMP_S = 3600.0  # a temp file this old is a leftover, whoever wrote it
_MAPS_CACHED = 32      # memory maps kept open per store (address space only, not memory)


class StoreError(ValueError):
    """A store that cannot be used as asked: mismatched, corrupt, or incomplete."""


# --------------------------------------------------------------------------- fingerprints

def fingerprint(obj: Any, length: int = 16) -> str:
    """A stable sha256 hex digest (first `length` chars) of `obj`, the same in any process.

    bytes-like objects hash their bytes; arrays (numpy, jax, anything with __array__) hash
    dtype name, shape and C-order little-endian bytes; anything else must be JSON-able and
    hashes its JSON with sorted keys (tuples hash like lists; numpy scalars like Python
    numbers; arrays or bytes nested inside are replaced by their own digest). The three kinds
    are domain-separated, so b"1", "1" and np.array(1) differ.
    """
    return hashlib.sha256(_canonical(obj)).hexdigest()[:length]


def _canonical(obj: Any) -> bytes:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return b"bytes\0" + bytes(obj)
    if _is_array(obj):
        a = np.asarray(obj)
        if a.dtype.hasobject or a.dtype.fields is not None:
            raise TypeError(f"fingerprint: cannot hash an array of dtype {a.dtype}")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        head = json.dumps([a.dtype.name, list(a.shape)]).encode()
        return b"array\0" + head + b"\0" + np.ascontiguousarray(a).tobytes()

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        if isinstance(o, (bytes, bytearray, memoryview)) or _is_array(o):
            return {"__digest__": hashlib.sha256(_canonical(o)).hexdigest()}
        raise TypeError(f"fingerprint: {type(o).__name__} is not JSON-able, bytes or an array")

    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)
    return b"json\0" + text.encode()


def _is_array(obj: Any) -> bool:
    return isinstance(obj, np.ndarray) or (hasattr(obj, "__array__") and hasattr(obj, "dtype")
                                            and not isinstance(obj, np.generic))


# --------------------------------------------------------------------------- dtypes

def _resolve_dtype(dtype: Any) -> np.dtype:
    """The store dtype in native byte order; only plain numeric numpy and ml_dtypes types."""
    try:
        d = np.dtype(dtype)
    except TypeError as e:
        raise StoreError(f"unknown dtype {dtype!r}: {e}") from None
    if _is_ml_dtype(d):
        return d
    if d.fields is not None or d.kind not in "biufc":
        raise StoreError(f"dtype {d} cannot be stored: use a numeric numpy dtype or an ml_dtypes "
                         "one (bfloat16, float8_*)")
    return np.dtype(d.name)  # native byte order


def _storage_dtype(dtype: np.dtype) -> np.dtype:
    """What the .npy files hold: the dtype itself, or same-width uints for ml_dtypes types."""
    if _is_ml_dtype(dtype):
        return np.dtype(f"u{dtype.itemsize}")
    return dtype


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.type.__module__ == ml_dtypes.__name__


def _is_floating(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or "float" in dtype.name


# --------------------------------------------------------------------------- atomic files

def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """write(f) into a temp file beside `path`, fsync, rename over `path`, fsync the directory.

    The one atomic file write of the package (stores, run state, demo cache). The temp name
    carries host and pid so `_clean_temps` can tell a dead writer's leftover
    from a live writer's file in flight.
    """
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; directories cannot be opened for fsync everywhere (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # cannot tell cheaply: rely on the age rule
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_temps(directory: Path) -> int:
    """Remove temp files of dead writers: this host's with a dead pid, anyone's after an hour.

    A live writer on another host keeps its temp file (it is renamed within seconds of being
    started), so cleaning on open is safe while other processes fill the same store.
    """
    host, now, removed = socket.gethostname(), time.time(), 0
    for entry in os.scandir(directory):
        m = _TMP_RE.match(entry.name)
        if not m:
            continue
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        dead = m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        if dead or age > _STALE_TMP_S:
            _unlink_quietly(Path(entry.path))
            removed += 1
    if removed:
        log.info("store %s: removed %d temporary file(s) left by interrupted writers", directory, removed)
    return removed


# --------------------------------------------------------------------------- the store

@dataclasses.dataclass(frozen=True)
class FillStats:
    """What `compute_missing` did: chunks found on disk vs computed now."""
    reused: int
    computed: int


class ArrayStore:
    """An on-disk array of shape (rows, *row_shape), written and read in row chunks.

    Build one with `ArrayStore.open`. Any number of ArrayStore objects (in one process or
    many) may write disjoint chunks of one directory at once; each chunk is one file.
    """

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.shape: tuple[int, ...] = tuple(manifest["shape"])
        self.dtype: np.dtype = _resolve_dtype(manifest["dtype"])
        self.chunk_rows: int = manifest["chunk_rows"]
        self.num_chunks: int = manifest["num_chunks"]
        self.fingerprint: dict = dict(manifest["fingerprint"])
        self.created: str = manifest.get("created", "")
        self._storage = _storage_dtype(self.dtype)
        self.version: int = manifest["version"]
        self._tag = bytes.fromhex(fingerprint(self.fingerprint))[:8]  # written into every chunk's trailer
        self._valid: set[int] = set()     # chunks whose file passed validation
        self._bad: dict[int, str] = {}    # chunk -> why its file was rejected
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    # ---------------------------------------------------------------- opening

    @classmethod
    def open(cls, directory: str | os.PathLike, *, shape: Iterable[int] | None = None,
             dtype: Any = None, chunk_rows: int | None = None, fingerprint: dict | None = None,
             create: bool = True, overwrite: bool = False) -> ArrayStore:
        """Open the store in `directory`, creating it if needed (create=True).

        shape, dtype, chunk_rows and fingerprint describe what the caller expects; an existing
        store must match every one given (None: accept what is there), else StoreError names
        the differences. Creating a store needs shape, dtype and chunk_rows; fingerprint
        defaults to {}. overwrite=True deletes an existing store's files first (only files
        that belong to a store; run it from one process before others open the store).
        """
        path = Path(directory)
        want = _expected(shape, dtype, chunk_rows, fingerprint)
        manifest_path = path / MANIFEST
        if overwrite and manifest_path.exists():
            _wipe(path)
        if manifest_path.exists():
            store = cls(path, _read_manifest(manifest_path))
            store._check_matches(want)
            _clean_temps(path)
            n = store.num_chunks - len(store.missing())
            log.info("store %s: opened, %d of %d chunks on disk", path, n, store.num_chunks)
            return store
        if not create:
            raise StoreError(f"no array store at {path} (no {MANIFEST}); run the step that creates it first")
        if path.exists() and not path.is_dir():
            raise StoreError(f"store path {path} exists and is not a directory")
        missing = [k for k in ("shape", "dtype", "chunk_rows") if k not in want]
        if path.exists():
            names = [p.name for p in path.iterdir() if not _TMP_RE.match(p.name)]
            chunks = [n for n in names if _CHUNK_RE.match(n)]
            if len(chunks) < len(names) or (chunks and missing):
                raise StoreError(f"store directory {path} is not empty and has no {MANIFEST}: "
                                 "refusing to use it; choose a new --store directory")
            if chunks:  # the manifest was lost: the chunks' trailers say whether they belong here
                log.warning("store %s: %s is missing; rebuilt from this run's shape, dtype, chunk_rows and "
                            "fingerprint. Each of its %d chunk file(s) is kept only if its trailer names this "
                            "fingerprint and its checksum matches; the others are recomputed",
                            path, MANIFEST, len(chunks))
        if missing:
            raise StoreError(f"creating the store {path} needs {', '.join(missing)}")
        return cls._create(path, want)

    @classmethod
    def _create(cls, path: Path, want: dict) -> ArrayStore:
        rows, chunk_rows = want["shape"][0], want["chunk_rows"]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "shape": want["shape"],
            "dtype": want["dtype"],
            "chunk_rows": chunk_rows,
            "num_chunks": math.ceil(rows / chunk_rows),
            "fingerprint": want.get("fingerprint", {}),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        path.mkdir(parents=True, exist_ok=True)
        manifest_path = path / MANIFEST
        if not _publish_manifest(manifest_path, manifest):
            # Another process created the store between our check and our write: use theirs.
            store = cls(path, _read_manifest(manifest_path))
            store._check_matches(want)
            return store
        log.info("store %s: created, shape %s %s in %d chunks of %d rows", path,
                 tuple(manifest["shape"]), manifest["dtype"], manifest["num_chunks"], chunk_rows)
        return cls(path, manifest)

    def _check_matches(self, want: dict) -> None:
        have = {"shape": list(self.shape), "dtype": self.dtype.name, "chunk_rows": self.chunk_rows,
                "fingerprint": self.fingerprint}
        diffs = [f"{k} {have[k]} (store) != {want[k]} (now)"
                 for k in ("shape", "dtype", "chunk_rows") if k in want and want[k] != have[k]]
        if "fingerprint" in want and want["fingerprint"] != self.fingerprint:
            old, new = self.fingerprint, want["fingerprint"]
            for key in sorted(set(old) | set(new)):
                if old.get(key, _ABSENT) != new.get(key, _ABSENT):
                    diffs.append(f"fingerprint[{key!r}] {_short(old.get(key, _ABSENT))} (store) != "
                                 f"{_short(new.get(key, _ABSENT))} (now)")
        if diffs:
            raise StoreError(f"store {self.path} was built for something else: {'; '.join(diffs)}. "
                             "Use another --store directory, delete this one, or (Python) open it with overwrite=True")

    # ---------------------------------------------------------------- chunk bookkeeping

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    def chunk_range(self, i: int) -> tuple[int, int]:
        """Rows [start, stop) held by chunk i."""
        if not 0 <= i < self.num_chunks:
            raise IndexError(f"chunk {i} out of range: store {self.path} has {self.num_chunks} chunks")
        start = i * self.chunk_rows
        return start, min(start + self.chunk_rows, self.shape[0])

    def chunk_path(self, i: int) -> Path:
        return self.path / f"chunk-{i:06d}.npy"

    def done(self, i: int) -> bool:
        """Whether chunk i is on disk and valid (checked now: other writers may add chunks)."""
        start, stop = self.chunk_range(i)
        path = self.chunk_path(i)
        if not path.exists():
            self._forget(i)
            return False
        if i in self._valid:
            return True
        reason = _check_npy(path, (stop - start, *self.row_shape), self._storage,
                            self._tag if self.version >= 2 else None)
        if reason is None:
            self._valid.add(i)
            self._bad.pop(i, None)
            return True
        if self._bad.get(i) != reason:
            log.warning("store %s: chunk %d file %s is unusable (%s); it counts as missing and will be "
                        "recomputed", self.path, i, path.name, reason)
        self._bad[i] = reason
        return False

    def missing(self) -> list[int]:
        """Indices of chunks not (validly) on disk, in order."""
        return [i for i in range(self.num_chunks) if not self.done(i)]

    @property
    def complete(self) -> bool:
        return not self.missing()

    @property
    def corrupt(self) -> list[int]:
        """Chunks whose file was found unusable (and not rewritten since) by this object."""
        return sorted(self._bad)

    def _forget(self, i: int) -> None:
        self._valid.discard(i)
        self._maps.pop(i, None)

    # ---------------------------------------------------------------- writing

    def write(self, i: int, array: Any, *, allow_nonfinite: bool = False) -> None:
        """Write chunk i atomically (replacing any file there).

        `array` must have the chunk's rows (the last chunk may be short) and a dtype that
        casts to the store's with numpy's same_kind rule (float64 -> float32 yes, float ->
        int no). NaN or inf rows are refused unless allow_nonfinite=True: one bad embedding
        would poison every solve downstream, and catching it here names the chunk.
        """
        start, stop = self.chunk_range(i)
        a = np.asarray(array)
        want_shape = (stop - start, *self.row_shape)
        if a.shape != want_shape:
            raise StoreError(f"chunk {i} of store {self.path} (rows {start}:{stop}) needs shape "
                             f"{want_shape}, got {a.shape}")
        if not np.can_cast(a.dtype, self.dtype, casting="same_kind"):
            raise StoreError(f"chunk {i} of store {self.path}: cannot store {a.dtype} rows as {self.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused below
            a = np.ascontiguousarray(a.astype(self.dtype, copy=False))
        if not allow_nonfinite and _is_floating(self.dtype):
            bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
            if bad.any():
                rows = start + np.flatnonzero(bad)
                raise StoreError(f"chunk {i} of store {self.path}: {bad.sum()} row(s) with NaN or inf "
                                 f"(after casting to {self.dtype}; first rows {rows[:5].tolist()}); "
                                 "nothing written")
        self._forget(i)
        stored = a.view(self._storage) if self._storage != self.dtype else a

        def write(f):
            np.lib.format.write_array(f, stored, allow_pickle=False)
            if self.version >= 2:
                f.write(_TRAILER.pack(_MAGIC, self._tag, zlib.crc32(memoryview(stored).cast("B"))))

        atomic_write(self.chunk_path(i), write)
        self._valid.add(i)
        self._bad.pop(i, None)

    # ---------------------------------------------------------------- reading

    def read_chunk(self, i: int) -> np.ndarray:
        """Chunk i, memory-mapped read-only (the OS pages rows in as they are touched)."""
        if i in self._maps and i in self._valid:
            self._maps.move_to_end(i)
            return self._maps[i]
        if not self.done(i):
            start, stop = self.chunk_range(i)
            why = f"its file is unusable ({self._bad[i]})" if i in self._bad else "it was never written"
            raise StoreError(f"chunk {i} (rows {start}:{stop}) of store {self.path} is missing: {why}; "
                             f"{len(self.missing())} of {self.num_chunks} chunks are missing. Finish (re-run) "
                             "the step that fills this store")
        try:
            a = np.load(self.chunk_path(i), mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            self._forget(i)
            raise StoreError(f"chunk {i} of store {self.path} cannot be read: {e}") from None
        if self._storage != self.dtype:
            a = a.view(self.dtype)
        self._maps[i] = a
        if len(self._maps) > _MAPS_CACHED:
            self._maps.popitem(last=False)
        return a

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as an in-memory array, gathered across chunks."""
        n = self.shape[0]
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows {start}:{stop} out of range for store {self.path} with {n} rows")
        out = np.empty((stop - start, *self.row_shape), self.dtype)
        if stop == start:
            return out
        for i in range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1):
            c0, c1 = self.chunk_range(i)
            a, b = max(start, c0), min(stop, c1)
            out[a - start:b - start] = self.read_chunk(i)[a - c0:b - c0]
        return out

    def take(self, indices: Any) -> np.ndarray:
        """Rows at integer `indices` (any order, repeats and negatives allowed), in that order.

        Reads each touched chunk once, whatever the order of the indices.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise TypeError("take() wants integer indices; use view()[mask] for a boolean mask")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"take() wants integer indices, got {idx.dtype}")
        n = self.shape[0]
        flat = idx.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"index out of range for store {self.path} with {n} rows")
        flat = np.where(flat < 0, flat + n, flat)
        out = np.empty((flat.size, *self.row_shape), self.dtype)
        chunk_of = flat // self.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        bounds = np.flatnonzero(np.diff(chunk_of[order])) + 1
        for group in np.split(order, bounds) if flat.size else []:
            i = int(chunk_of[group[0]])
            out[group] = self.read_chunk(i)[flat[group] - i * self.chunk_rows]
        return out.reshape(*idx.shape, *self.row_shape)

    def to_array(self) -> np.ndarray:
        """The whole store in memory (for small stores)."""
        return self.rows(0, self.shape[0])

    def view(self) -> StoreView:
        """A read-only numpy-like view: len, shape, dtype, x[a:b], x[indices], x[i]."""
        return StoreView(self)

    def __repr__(self) -> str:
        return (f"ArrayStore({str(self.path)!r}, shape={self.shape}, dtype={self.dtype.name}, "
                f"chunk_rows={self.chunk_rows}, num_chunks={self.num_chunks})")


class StoreView:
    """Array-like access to an ArrayStore, so code written for numpy arrays can read it.

    Indexing on the first axis (int, slice with any step, integer array, boolean mask) reads
    only the rows asked for; further axes of a tuple key are applied to those rows.
    """

    def __init__(self, store: ArrayStore):
        self.store = store

    @property
    def shape(self) -> tuple[int, ...]:
        return self.store.shape

    @property
    def dtype(self) -> np.dtype:
        return self.store.dtype

    @property
    def ndim(self) -> int:
        return len(self.store.shape)

    def __len__(self) -> int:
        return self.store.shape[0]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("a StoreView cannot become an array without copying it from disk")
        a = self.store.to_array()
        return a if dtype is None else a.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if not key:
                return self.store.to_array()
            if any(k is Ellipsis or k is None for k in key[:1]):
                raise TypeError("StoreView: the first index must be an int, slice or index array")
            first = self[key[0]]
            rest = key[1:]
            return first[rest] if _is_int(key[0]) else first[(slice(None), *rest)]
        n = len(self)
        if _is_int(key):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for store {self.store.path} with {n} rows")
            return self.store.take([i])[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return self.store.rows(start, max(start, stop))
            return self.store.take(np.arange(start, stop, step))
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean index of shape {idx.shape} does not match {n} rows")
            return self.store.take(np.flatnonzero(idx))
        return self.store.take(idx)

    def __repr__(self) -> str:
        return f"StoreView({self.store!r})"


def _is_int(key: Any) -> bool:
    return isinstance(key, (int, np.integer)) and not isinstance(key, bool)


# --------------------------------------------------------------------------- filling a store

def compute_missing(store: ArrayStore, fn: Callable[[int, int], Any], *, desc: str = "compute",
                    chunks: Iterable[int] | None = None, allow_nonfinite: bool = False) -> FillStats:
    """Fill the missing chunks: store.write(i, fn(start, stop)) for each chunk i not on disk.

    Chunks already on disk are skipped (reused). `chunks` restricts the work to some chunk
    indices, e.g. range(p, store.num_chunks, P) in process p of P. Each chunk is checked just
    before it is computed, so another writer's finished chunk is not redone. On any error or
    Ctrl-C the chunks written so far stay on disk, the log says how to resume, and the
    exception propagates.
    """
    from tqdm.auto import tqdm

    todo = range(store.num_chunks) if chunks is None else sorted(set(chunks))
    reused = computed = 0
    bar = tqdm(total=len(todo), desc=desc, unit="chunk", disable=None)
    try:
        for i in todo:
            if store.done(i):
                reused += 1
            else:
                start, stop = store.chunk_range(i)
                store.write(i, fn(start, stop), allow_nonfinite=allow_nonfinite)
                computed += 1
            bar.set_postfix(reused=reused, computed=computed, refresh=False)
            bar.update(1)
    except BaseException as e:
        kind = "interrupted" if isinstance(e, KeyboardInterrupt) else f"failed ({type(e).__name__})"
        log.warning("%s %s after computing %d chunk(s); %d of %d chunks of %s are on disk and will be "
                    "reused: re-run to resume", desc, kind, computed, store.num_chunks - len(store.missing()),
                    store.num_chunks, store.path)
        raise
    finally:
        bar.close()
    log.info("%s: %d chunk(s) reused, %d computed (store %s)", desc, reused, computed, store.path)
    return FillStats(reused=reused, computed=computed)


# --------------------------------------------------------------------------- manifest helpers

class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _short(value: Any, width: int = 40) -> str:
    text = repr(value) if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 3] + "..."


def _expected(shape, dtype, chunk_rows, fingerprint) -> dict:
    """The caller's expectations in manifest form (JSON round-tripped: tuples become lists)."""
    want: dict[str, Any] = {}
    if shape is not None:
        want["shape"] = [int(s) for s in shape]
        if not want["shape"] or any(s < 0 for s in want["shape"]):
            raise StoreError(f"store shape must be (rows, *row_shape) with sizes >= 0, got {tuple(shape)}")
    if dtype is not None:
        want["dtype"] = _resolve_dtype(dtype).name
    if chunk_rows is not None:
        if int(chunk_rows) < 1:
            raise StoreError(f"chunk_rows must be >= 1, got {chunk_rows}")
        want["chunk_rows"] = int(chunk_rows)
    if fingerprint is not None:
        if not isinstance(fingerprint, dict):
            raise StoreError(f"fingerprint must be a dict, got {type(fingerprint).__name__}")
        try:
            want["fingerprint"] = json.loads(json.dumps(fingerprint, sort_keys=True))
        except (TypeError, ValueError) as e:
            raise StoreError(f"fingerprint must be JSON-able (hash big things with fingerprint()): {e}") from None
    return want


def _publish_manifest(path: Path, manifest: dict) -> bool:
    """Write the manifest atomically unless one exists; False if another process won the race.

    A hard link of the fsynced temp file is an atomic create-if-absent; where links are not
    supported, fall back to a plain atomic rename (last writer wins).
    """
    text = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:
            if path.exists():
                return False
            os.replace(tmp, path)
    finally:
        _unlink_quietly(tmp)
    _fsync_dir(path.parent)
    return True


def _read_manifest(path: Path) -> dict:
    def bad(why: str) -> StoreError:
        return StoreError(f"corrupt store manifest {path}: {why}; delete the directory or pass "
                          "overwrite=True (Python) to start again")

    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"cannot parse it ({e})") from None
    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != FORMAT:
        raise bad(f"format is {m.get('format')!r}, not {FORMAT!r}")
    if m.get("version") not in _READS:
        raise StoreError(f"store manifest {path} has version {m.get('version')!r}; this idjax reads "
                         f"versions {', '.join(map(str, _READS))}")
    shape, chunk_rows, num_chunks = m.get("shape"), m.get("chunk_rows"), m.get("num_chunks")
    if not (isinstance(shape, list) and shape and all(type(s) is int and s >= 0 for s in shape)):
        raise bad(f"shape {shape!r} is not a list of sizes")
    if not (type(chunk_rows) is int and chunk_rows >= 1):
        raise bad(f"chunk_rows {chunk_rows!r} is not a positive int")
    if num_chunks != math.ceil(shape[0] / chunk_rows):
        raise bad(f"num_chunks {num_chunks!r} does not match shape {shape} and chunk_rows {chunk_rows}")
    if not isinstance(m.get("fingerprint"), dict):
        raise bad("fingerprint is not an object")
    try:
        _resolve_dtype(m.get("dtype"))
    except StoreError as e:
        raise bad(str(e)) from None
    return m


def _wipe(path: Path) -> None:
    """Delete a store's own files (manifest, chunks, temps), nothing else."""
    removed = 0
    for p in path.iterdir():
        if p.name == MANIFEST or _CHUNK_RE.match(p.name) or _TMP_RE.match(p.name):
            _unlink_quietly(p)
            removed += 1
    log.info("store %s: overwrite=True, removed %d file(s)", path, removed)


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype, tag: bytes | None = None) -> str | None:
    """None if `path` is a C-order .npy of exactly this shape and dtype, complete, and (tag given) ends in
    a trailer with this fingerprint digest and the CRC-32 of its array bytes; else why not."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = fmt.read_array_header_2_0(f)
            else:
                return f".npy version {version} not written by idjax"
            data_offset = f.tell()
        size = os.path.getsize(path)
    except (OSError, ValueError) as e:
        return f"not a readable .npy file: {e}"
    if got_shape != shape:
        return f"shape {got_shape}, expected {shape}"
    if got_dtype != dtype:
        return f"dtype {got_dtype}, expected {dtype}"
    if fortran:
        return "Fortran order"
    nbytes = math.prod(shape) * dtype.itemsize
    expected = data_offset + nbytes + (0 if tag is None else _TRAILER.size)
    if size != expected:
        return f"{size} bytes, expected {expected} (truncated?)"
    if tag is None:
        return None
    crc = 0
    with open(path, "rb") as f:
        f.seek(data_offset)
        for _ in range(0, nbytes, 1 << 24):
            crc = zlib.crc32(f.read(min(1 << 24, nbytes - f.tell() + data_offset)), crc)
        magic, got_tag, got_crc = _TRAILER.unpack(f.read(_TRAILER.size))
    if magic != _MAGIC:
        return "no checksum trailer"
    if got_tag != tag:
        return "computed for another fingerprint"
    if got_crc != crc:
        return "checksum mismatch: the file changed after it was written"
    return None
