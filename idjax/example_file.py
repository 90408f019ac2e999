"""Tokenized examples on disk: one .npz of plain arrays (no pickles), ragged tokens with offsets.

`idjax run` keeps its tokenized sets this way, so a cached data stage loads no tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idjax.io import atomic_write


def save_examples(path: Path, examples) -> None:
    """Tokenized examples as one .npz of plain arrays (no pickles): ragged tokens + offsets."""
    def cat(arrays):
        return np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)

    arrays = {
        "ids": np.array([e.id for e in examples], dtype=str),
        "tasks": np.array([e.task or "" for e in examples], dtype=str),
        "has_task": np.array([e.task is not None for e in examples], dtype=bool),
        "index": np.array([e.index for e in examples], dtype=np.int64),
        "truncated": np.array([e.truncated for e in examples], dtype=bool),
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int64),
        "input_ids": cat([e.input_ids for e in examples]),
        "labels": cat([e.labels for e in examples]),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_examples(path: Path):
    """The examples `save_examples` wrote, equal field by field."""
    from idjax.data import Example

    with np.load(path, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    ends = np.cumsum(a["lengths"])
    starts = ends - a["lengths"]
    return [Example(int(a["index"][i]), str(a["ids"][i]), str(a["tasks"][i]) if a["has_task"][i] else None,
                    a["input_ids"][s:e].copy(), a["labels"][s:e].copy(), bool(a["truncated"][i]))
            for i, (s, e) in enumerate(zip(starts, ends))]
