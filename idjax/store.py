"""Chunked, resumable on-disk arrays for per-sample embeddings and projected gradients.

JVP embeddings [N, e] and sketched gradients [n, k] of a large pool take hours to compute, so
they go to disk in row chunks as they are produced. A run that dies (SIGKILL, Ctrl-C, OOM)
resumes where it stopped, and a later run with another target set reuses the pool's rows.

The files (manifest, chunk files with checksum trailers) are described in idjax.store_format.

The resume rule: chunk i is done iff `chunk-<i>.npy` exists, its .npy header and size match the
manifest, and its trailer checks out. Completion is never recorded in the shared manifest, which is
written once, when the store is created, so several processes or hosts can fill disjoint chunks of one store
without coordinating. Every file is written to a temporary name in the same directory, fsynced,
then renamed into place (atomic on POSIX), so a reader never sees half a chunk; a killed writer
leaves at most a temporary file, which is ignored and removed on the next open. A chunk file
that fails validation (wrong shape or dtype, truncated, not .npy, a checksum mismatch) counts as
missing: a warning names the file and the next fill recomputes it.

Validation reads each chunk once per store object to check the CRC (about 4 GB/s: 1 s for a
200k x 4096 float32 store), so a flipped bit or a chunk overwritten with NaN or other numbers is
recomputed, never used. The fingerprint digest in each chunk's trailer says what it was computed
from: a store whose manifest.json was deleted is rebuilt from the caller's expectations, and only
chunks made for that fingerprint are kept.

The fingerprint is a dict of short hashes (model, data, config, ...; see `idjax.io.fingerprint`)
that says what the rows were computed from. Opening an existing store with a different fingerprint,
shape, dtype or chunk_rows is an error, never a silent mix of old and new rows.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from idjax import store_format as F
from idjax.io import atomic_write, clean_temps, fingerprint
from idjax.store_format import StoreError

log = logging.getLogger(__name__)

_MAPS_CACHED = 32      # memory maps kept open per store (address space only, not memory)


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
        self.dtype: np.dtype = F.resolve_dtype(manifest["dtype"])
        self.chunk_rows: int = manifest["chunk_rows"]
        self.num_chunks: int = manifest["num_chunks"]
        self.fingerprint: dict = dict(manifest["fingerprint"])
        self.created: str = manifest.get("created", "")
        self._storage = F.storage_dtype(self.dtype)
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
        want = F.expected(shape, dtype, chunk_rows, fingerprint)
        manifest_path = path / F.MANIFEST
        if overwrite and manifest_path.exists():
            F.wipe(path)
        if manifest_path.exists():
            store = cls(path, F.read_manifest(manifest_path))
            store._check_matches(want)
            if removed := clean_temps(path, F.TEMP_RE):
                log.info("store %s: removed %d temporary file(s) left by interrupted writers", path, removed)
            n = store.num_chunks - len(store.missing())
            log.info("store %s: opened, %d of %d chunks on disk", path, n, store.num_chunks)
            return store
        if not create:
            raise StoreError(f"no array store at {path} (no {F.MANIFEST}); run the step that creates it first")
        if path.exists() and not path.is_dir():
            raise StoreError(f"store path {path} exists and is not a directory")
        missing = [k for k in ("shape", "dtype", "chunk_rows") if k not in want]
        if path.exists():
            names = [p.name for p in path.iterdir() if not F.TEMP_RE.match(p.name)]
            if F.MANIFEST in names:  # another process created the store since the check above: open theirs
                return cls.open(path, shape=shape, dtype=dtype, chunk_rows=chunk_rows, fingerprint=fingerprint,
                                create=False)
            chunks = [n for n in names if F.CHUNK_RE.match(n)]
            if len(chunks) < len(names) or (chunks and missing):
                raise StoreError(f"store directory {path} is not empty and has no {F.MANIFEST}: "
                                 "refusing to use it; choose a new --store directory")
            if chunks:  # the manifest was lost: the chunks' trailers say whether they belong here
                log.warning("store %s: %s is missing; rebuilt from this run's shape, dtype, chunk_rows and "
                            "fingerprint. Each of its %d chunk file(s) is kept only if its trailer names this "
                            "fingerprint and its checksum matches; the others are recomputed",
                            path, F.MANIFEST, len(chunks))
        if missing:
            raise StoreError(f"creating the store {path} needs {', '.join(missing)}")
        return cls._create(path, want)

    @classmethod
    def _create(cls, path: Path, want: dict) -> ArrayStore:
        manifest = F.new_manifest(want)
        path.mkdir(parents=True, exist_ok=True)
        manifest_path = path / F.MANIFEST
        if not F.publish_manifest(manifest_path, manifest):
            # Another process created the store between our check and our write: use theirs.
            store = cls(path, F.read_manifest(manifest_path))
            store._check_matches(want)
            return store
        log.info("store %s: created, shape %s %s in %d chunks of %d rows", path,
                 tuple(manifest["shape"]), manifest["dtype"], manifest["num_chunks"], manifest["chunk_rows"])
        return cls(path, manifest)

    def _check_matches(self, want: dict) -> None:
        have = {"shape": list(self.shape), "dtype": self.dtype.name, "chunk_rows": self.chunk_rows,
                "fingerprint": self.fingerprint}
        diffs = F.mismatches(have, want)
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
        return self.path / F.chunk_name(i)

    def done(self, i: int) -> bool:
        """Whether chunk i is on disk and valid (checked now: other writers may add chunks)."""
        start, stop = self.chunk_range(i)
        path = self.chunk_path(i)
        if not path.exists():
            self._forget(i)
            return False
        if i in self._valid:
            return True
        reason = F.check_npy(path, (stop - start, *self.row_shape), self._storage,
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
        if not allow_nonfinite and F.is_floating(self.dtype):
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
                f.write(F.trailer(self._tag, stored))

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
