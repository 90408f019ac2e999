"""Files and hashes every layer shares: the project's fingerprint and its atomic writes.

Nothing here knows about models or stages, so any module may import it (the store, the
processes, the stages and the front ends all write files that a killed process must never leave
half written, and all name their caches by `fingerprint`).

An atomic write goes to a temporary name beside the target, `.<name>.<host>.<pid>.<token>.tmp`,
is fsynced and renamed over the target; a reader sees the old file or the new one, never half of
one. The host and pid in the name let `clean_temps` tell a dead writer's leftover from a file in
flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

STALE_TEMP_S = 3600.0  # a temp file this old is a leftover, whoever wrote it


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
    """The bytes `fingerprint` hashes (see there)."""
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


# --------------------------------------------------------------------------- atomic files

def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """write(f) into a temp file beside `path`, fsync, rename over `path`, fsync the directory."""
    path = Path(path)
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


def write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write of a UTF-8 text."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_create(path: str | os.PathLike, data: bytes) -> bool:
    """Write `data` to `path` atomically unless a file is there; False if one was (another writer won).

    A hard link of the fsynced temp file is an atomic create-if-absent; where links are not
    supported, fall back to a plain atomic rename (last writer wins).
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
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


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """write(tmp) fills a temp directory beside `path`, which is then renamed to `path`.

    Raises OSError when `path` already exists (e.g. another process made it first); the temp
    directory is removed whatever happens.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def _temp_name(path: Path) -> Path:
    """The temp name an atomic write of `path` uses (host and pid in it, for clean_temps)."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temp_pattern(final: str) -> re.Pattern:
    """A regex for the temp names of atomic writes whose target name matches the regex `final`."""
    return re.compile(rf"^\.(?P<final>{final})\.(?P<host>.+)\.(?P<pid>\d+)\.(?P<token>[0-9a-f]+)\.tmp$")


def clean_temps(directory: str | os.PathLike, pattern: re.Pattern) -> int:
    """Remove the temp files (names matching `pattern`, from temp_pattern) of dead writers in
    `directory`: this host's with a dead pid, anyone's after STALE_TEMP_S; return how many.

    A live writer on another host keeps its temp file (it is renamed within seconds of being
    started), so cleaning is safe while other processes write into the same directory.
    """
    host, now, removed = socket.gethostname(), time.time(), 0
    for entry in os.scandir(directory):
        m = pattern.match(entry.name)
        if not m:
            continue
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        dead = m["host"] == host and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
        if dead or age > STALE_TEMP_S:
            _unlink_quietly(Path(entry.path))
            removed += 1
    return removed


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


__all__ = ["fingerprint", "atomic_write", "write_text", "atomic_create", "atomic_directory", "temp_pattern",
           "clean_temps", "STALE_TEMP_S"]
