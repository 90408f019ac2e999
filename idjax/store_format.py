"""The on-disk format of an ArrayStore (idjax.store): manifest, chunk files and their trailers.

Layout of a store directory:

    manifest.json       {"format": "idjax-array-store", "version": 2, "shape", "dtype",
                         "chunk_rows", "num_chunks", "fingerprint": {...}, "created"}
    chunk-000000.npy    rows [0, chunk_rows), then a 24-byte trailer (see below)
    chunk-000001.npy    rows [chunk_rows, 2 * chunk_rows)
    ...                 the last chunk may be short
    .chunk-000002.npy.<host>.<pid>.<token>.tmp    a write in flight (or left by a killed one)

The manifest is written once, when the store is created (an atomic create-if-absent, so two
processes creating one store agree on one manifest); chunk files are written atomically
(idjax.io.atomic_write). A chunk file is valid iff its .npy header and size match the manifest
and its trailer checks out (`check_npy`).

The trailer, written in the same atomic file after the array's bytes (numpy ignores it, so a chunk
still loads with np.load), is b"idjxchk1", 8 bytes of the store fingerprint's digest, and the
CRC-32 of the array bytes (as a little-endian uint64). Stores of version 1 (no trailers) still
open; their chunks are checked by header and size only.

Files are plain .npy (no pickles anywhere). ml_dtypes types (bfloat16, float8_*) have no .npy
type code, so their chunks hold the raw bits as unsigned integers of the same width; the
manifest records the real dtype and reads give it back.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import ml_dtypes  # registers bfloat16 & co. with numpy, so np.dtype("bfloat16") works
import numpy as np

from idjax.io import atomic_create, temp_pattern

log = logging.getLogger(__name__)

FORMAT = "idjax-array-store"
VERSION = 2            # 2: chunks carry a trailer with a checksum and the fingerprint's digest
READS = (1, 2)         # versions this code opens
_TRAILER = struct.Struct("<8s8sQ")  # magic, fingerprint digest, CRC-32 of the array bytes
_MAGIC = b"idjxchk1"
MANIFEST = "manifest.json"
CHUNK_RE = re.compile(r"^chunk-(\d+)\.npy$")
TEMP_RE = temp_pattern(r"manifest\.json|chunk-\d+\.npy")


class StoreError(ValueError):
    """A store that cannot be used as asked: mismatched, corrupt, or incomplete."""


def chunk_name(i: int) -> str:
    return f"chunk-{i:06d}.npy"


def trailer(tag: bytes, stored: np.ndarray) -> bytes:
    """The bytes written after chunk `stored`'s array: magic, fingerprint digest `tag`, CRC-32."""
    return _TRAILER.pack(_MAGIC, tag, zlib.crc32(memoryview(stored).cast("B")))


def new_manifest(want: dict) -> dict:
    """The manifest of a new store from the caller's expectations (see `expected`)."""
    rows, chunk_rows = want["shape"][0], want["chunk_rows"]
    return {
        "format": FORMAT,
        "version": VERSION,
        "shape": want["shape"],
        "dtype": want["dtype"],
        "chunk_rows": chunk_rows,
        "num_chunks": math.ceil(rows / chunk_rows),
        "fingerprint": want.get("fingerprint", {}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def publish_manifest(path: Path, manifest: dict) -> bool:
    """Write the manifest atomically unless one exists; False if another process won the race."""
    return atomic_create(path, json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")


def mismatches(have: dict, want: dict) -> list[str]:
    """How a store's manifest values `have` differ from the caller's `want` (one line each)."""
    diffs = [f"{k} {have[k]} (store) != {want[k]} (now)"
             for k in ("shape", "dtype", "chunk_rows") if k in want and want[k] != have[k]]
    if "fingerprint" in want and want["fingerprint"] != have["fingerprint"]:
        old, new = have["fingerprint"], want["fingerprint"]
        for key in sorted(set(old) | set(new)):
            if old.get(key, _ABSENT) != new.get(key, _ABSENT):
                diffs.append(f"fingerprint[{key!r}] {_short(old.get(key, _ABSENT))} (store) != "
                             f"{_short(new.get(key, _ABSENT))} (now)")
    return diffs


# --------------------------------------------------------------------------- dtypes

def resolve_dtype(dtype: Any) -> np.dtype:
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


def storage_dtype(dtype: np.dtype) -> np.dtype:
    """What the .npy files hold: the dtype itself, or same-width uints for ml_dtypes types."""
    if _is_ml_dtype(dtype):
        return np.dtype(f"u{dtype.itemsize}")
    return dtype


def _is_ml_dtype(dtype: np.dtype) -> bool:
    return dtype.type.__module__ == ml_dtypes.__name__


def is_floating(dtype: np.dtype) -> bool:
    return dtype.kind in "fc" or "float" in dtype.name


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _short(value: Any, width: int = 40) -> str:
    text = repr(value) if value is _ABSENT else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[:width - 3] + "..."


def expected(shape, dtype, chunk_rows, fingerprint) -> dict:
    """The caller's expectations in manifest form (JSON round-tripped: tuples become lists)."""
    want: dict[str, Any] = {}
    if shape is not None:
        want["shape"] = [int(s) for s in shape]
        if not want["shape"] or any(s < 0 for s in want["shape"]):
            raise StoreError(f"store shape must be (rows, *row_shape) with sizes >= 0, got {tuple(shape)}")
    if dtype is not None:
        want["dtype"] = resolve_dtype(dtype).name
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


def read_manifest(path: Path) -> dict:
    """The manifest at `path`, every field checked (StoreError names the first bad one)."""
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
    if m.get("version") not in READS:
        raise StoreError(f"store manifest {path} has version {m.get('version')!r}; this idjax reads "
                         f"versions {', '.join(map(str, READS))}")
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
        resolve_dtype(m.get("dtype"))
    except StoreError as e:
        raise bad(str(e)) from None
    return m


def wipe(path: Path) -> None:
    """Delete a store's own files (manifest, chunks, temps), nothing else."""
    removed = 0
    for p in path.iterdir():
        if p.name == MANIFEST or CHUNK_RE.match(p.name) or TEMP_RE.match(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
            removed += 1
    log.info("store %s: overwrite=True, removed %d file(s)", path, removed)


def check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype, tag: bytes | None = None) -> str | None:
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
