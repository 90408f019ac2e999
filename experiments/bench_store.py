"""What the store's chunk checksums cost: write, validate on open (CRC-32 of every chunk), read back.

    python experiments/bench_store.py [--rows 20000] [--dim 4096] [--chunk-rows 256]

Validation reads every chunk once per store object; the files are in the page cache here (they were
just written), so the figure is the CRC's own cost, not the disk's.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from idjax.store import ArrayStore, compute_missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--chunk-rows", type=int, default=256)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    full = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        def open_store():
            return ArrayStore.open(Path(d), shape=full.shape, dtype=np.float32, chunk_rows=args.chunk_rows,
                                   fingerprint={"bench": 1})

        store = open_store()
        t = time.perf_counter()
        compute_missing(store, lambda a, b: full[a:b], desc="write")
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        again = open_store()
        assert again.missing() == []
        validate_s = time.perf_counter() - t
        t = time.perf_counter()
        np.testing.assert_array_equal(again.to_array(), full)
        read_s = time.perf_counter() - t
    gb = full.nbytes / 1e9
    print(f"store {gb:.2f} GB in {store.num_chunks} chunks: write {write_s:.2f} s, open + CRC validation "
          f"{validate_s:.2f} s ({gb / validate_s:.1f} GB/s), read all {read_s:.2f} s")


if __name__ == "__main__":
    main()
