"""Output paths checked before any work: never over an input, never unwritable at the very end.

Every front end (the `idjax` commands, `idjax run`) names its inputs and outputs here first, so a
long run cannot end by replacing the pool it read or by failing on its last write.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping


def _resolved(path) -> Path:
    return Path(path).expanduser().resolve()  # through symlinks: a link to the pool is the pool


def _writable_dir(directory: Path) -> str | None:
    """Why files cannot be created in `directory` (or, while it is absent, in the nearest directory
    above it that exists), or None. Creates nothing that stays: a failed run leaves no empty output."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".idjax-write-check-"):
            pass
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def check_outputs(inputs: Mapping[str, object], files: Mapping[str, object] = {},
                  dirs: Mapping[str, object] = {}) -> str | None:
    """The first problem with the outputs, as one line naming the flag, or None.

    inputs: flag -> path read (None or a hub name that is no local path is ignored); files: flag ->
    a file to be written; dirs: flag -> a directory to be written into. An output may not be an
    input; a file's directory and every output directory must accept new files (they are created
    when absent).
    """
    read = {flag: _resolved(p) for flag, p in inputs.items() if p is not None and Path(p).expanduser().exists()}
    outs = [(flag, Path(p), False) for flag, p in files.items() if p is not None]
    outs += [(flag, Path(p), True) for flag, p in dirs.items() if p is not None]
    for flag, out, is_dir in outs:
        target = _resolved(out)
        for src_flag, src in read.items():
            if src == target:
                return (f"{flag} {out}: is the input {src_flag} {src}; writing there would destroy it, "
                        "choose another path")
        if out.exists() and out.is_dir() != is_dir:
            kind = "a directory" if is_dir else "a file"
            return f"{flag} {out}: is {'a file' if is_dir else 'a directory'}; {flag} names {kind}"
        problem = _writable_dir(out if is_dir else out.parent)
        if problem:
            return f"{flag} {out}: cannot write there ({problem})"
    return None

