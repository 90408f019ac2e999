"""Scaling of propagation and top-k with the pool size N (docs/method.md 4.4-4.5, issue 6).

For N = 1e4 ... 1e6 synthetic embeddings (float32, e dims, on disk) and l = 4096 random landmarks:
  - fit:      gather E_L, median bandwidth, Cholesky of the l x l KRR system (does not depend on N)
  - apply:    p_hat = C p_L, streaming E in row chunks (C is never built: N * l * 4 bytes = 16 GB at 1e6)
  - apply_t:  C^T w, the other half of the second-order product Q_hat w = C (Q_L (C^T w))
  - top-k:    the k = N / 100 best rows, on the host (select.top_k, a float64 sort) and on the device
              (sharding.top_k: lax.top_k per device, merge, exact float64 refinement)
and the peak resident memory of the process. Each N runs in its own subprocess, so its peak RSS is its
own. E is read through plain file reads (no memory map), so resident memory is what idjax holds: the
landmark system, one row chunk and its kernel block, and N-long output vectors.

    python experiments/bench_scaling.py --out experiments/scaling.json --plot experiments/scaling.png

Writes a JSON list (one row per N) and a two-panel plot (time vs N, peak RSS vs N).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


class FileRows:
    """A float32 [N, e] array in a raw file, read with pread (no memory map), sliceable by rows."""

    def __init__(self, path: Path, n: int, e: int):
        self.path, self.shape, self.dtype = path, (n, e), np.dtype(np.float32)
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("FileRows supports row slices only")
        a, b, _ = key.indices(self.shape[0])
        b = max(a, b)
        row = self.shape[1] * 4
        buf = os.pread(self._fd, (b - a) * row, a * row)
        return np.frombuffer(buf, np.float32).reshape(b - a, self.shape[1])


def make_embeddings(path: Path, n: int, e: int, seed: int = 0, block: int = 65536) -> None:
    """Clustered synthetic embeddings (64 Gaussian clusters), written block by block."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, e)).astype(np.float32) * 3.0
    with open(path, "wb") as f:
        for a in range(0, n, block):
            m = min(block, n - a)
            x = centers[rng.integers(64, size=m)] + rng.normal(size=(m, e)).astype(np.float32)
            f.write(x.astype(np.float32).tobytes())


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_one(n: int, l: int, e: int, chunk_rows: int, workdir: Path) -> dict:
    import jax

    from idjax import sharding as shd
    from idjax.propagator import Propagator
    from idjax.select import top_k

    path = workdir / f"E-{n}-{e}.f32"
    t = time.perf_counter()
    make_embeddings(path, n, e)
    gen_s = time.perf_counter() - t
    x = FileRows(path, n, e)
    rng = np.random.default_rng(1)
    landmarks = np.sort(rng.choice(n, size=l, replace=False))
    p_l = rng.normal(size=l).astype(np.float32)
    w = rng.random(n).astype(np.float32)
    base = rss_mb()

    t = time.perf_counter()
    prop = Propagator.fit(x, landmarks, kind="krr", chunk_rows=chunk_rows, cache_bytes=0, mesh=shd.make_mesh(1, 1))
    jax.block_until_ready(prop.state.chol)
    fit_s = time.perf_counter() - t
    times = {}
    for name, fn in (("apply", lambda: prop.apply(p_l, progress=False)),
                     ("apply_t", lambda: prop.apply_transpose(w, progress=False))):
        t = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = fn()
        times[name] = (first, time.perf_counter() - t)
    p = prop.apply(p_l, progress=False).astype(np.float64)
    k = max(1, n // 100)
    t = time.perf_counter()
    host = top_k(p, k)
    host_s = time.perf_counter() - t
    mesh = shd.make_mesh()
    dev = shd.top_k(p, k, mesh)  # compile
    t = time.perf_counter()
    dev = shd.top_k(p, k, mesh)
    dev_s = time.perf_counter() - t
    assert np.array_equal(host, dev), "device top-k differs from the host top-k"
    del out
    path.unlink()
    return {"N": n, "l": l, "e": e, "chunk_rows": chunk_rows, "devices": jax.device_count(),
            "generate_s": round(gen_s, 2), "fit_s": round(fit_s, 2),
            "apply_first_s": round(times["apply"][0], 2), "apply_s": round(times["apply"][1], 2),
            "apply_t_first_s": round(times["apply_t"][0], 2), "apply_t_s": round(times["apply_t"][1], 2),
            "top_k": k, "top_k_host_s": round(host_s, 4), "top_k_device_s": round(dev_s, 4),
            "rss_before_fit_mb": round(base, 1), "peak_rss_mb": round(rss_mb(), 1),
            "input_mb": round(n * e * 4 / 2**20, 1), "c_would_be_mb": round(n * l * 4 / 2**20, 1)}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["N"] for r in rows], float)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label in (("apply_s", "propagate  C p_L"), ("apply_t_s", "transpose  C^T w"),
                       ("top_k_host_s", "top-k host (N/100)"), ("top_k_device_s", "top-k device (N/100)")):
        ax1.loglog(n, [r[key] for r in rows], "o-", label=label)
    ref = rows[-1]["apply_s"] * n / n[-1]
    ax1.loglog(n, ref, "k:", label="linear in N")
    ax1.set_xlabel("pool size N")
    ax1.set_ylabel("seconds")
    ax1.set_title(f"l = {rows[0]['l']} landmarks, e = {rows[0]['e']}, float32, CPU")
    ax1.legend(fontsize=8)
    ax2.semilogx(n, [r["peak_rss_mb"] for r in rows], "o-", label="peak RSS of the process")
    ax2.semilogx(n, [r["input_mb"] for r in rows], "s--", label="E on disk (not loaded)")
    ax2.set_xlabel("pool size N")
    ax2.set_ylabel("MiB")
    ax2.set_title(f"memory (C would be {rows[-1]['c_would_be_mb'] / 1024:.1f} GiB at N = {int(n[-1]):,})")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000,300000,1000000")
    ap.add_argument("--landmarks", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64, help="embedding dims e")
    ap.add_argument("--chunk-rows", type=int, default=8192)
    ap.add_argument("--out", default="experiments/scaling.json")
    ap.add_argument("--plot", default="experiments/scaling.png")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        row = run_one(args.one, args.landmarks, args.dim, args.chunk_rows, Path(args.workdir))
        print("ROW " + json.dumps(row), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="idjax-scaling-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            cmd = [sys.executable, __file__, "--one", str(n), "--landmarks", str(args.landmarks), "--dim",
                   str(args.dim), "--chunk-rows", str(args.chunk_rows), "--workdir", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
            line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
            if proc.returncode or not line:
                sys.exit(f"N={n} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[0][4:]))
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
