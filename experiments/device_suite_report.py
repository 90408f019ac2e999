"""Combine the device suite's part outputs into OUT/suite.json and OUT/suite.md (issue 19).

experiments/device_suite.sh runs bench_engine.py, torch_compare.py and selection_study.py --cost-only,
each writing its own JSON into OUT, and records each part's wall seconds and command in OUT/parts.tsv;
this script reads those files only (no figure is computed twice), adds what machine they ran on, and
writes one table of the headline figures. Every speed-up is idjax's (or the landmarks') advantage:
baseline seconds / idjax seconds, or idjax samples/s / baseline samples/s, so > 1 means faster.

    python experiments/device_suite_report.py OUT --mode full --command 'bash experiments/device_suite.sh OUT'
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("bench_engine", "torch_compare", "selection_study")
BUDGET_S = 480  # issue 19: the full suite on one GPU within 8 minutes


def _shell(cmd: list[str]) -> str:
    """A command's stdout, or '' when the tool is missing or fails (machine facts are best effort)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict:
    """Where the suite ran: host CPU, accelerators as jax and torch see them, and library versions."""
    import flax
    import jax
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _shell(["lscpu"]).splitlines()
                if line.startswith("Model name")), platform.processor())
    cuda = torch.cuda.is_available()
    return {
        "host_cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "jax_backend": jax.default_backend(), "jax_devices": [str(d) for d in jax.devices()],
        "torch_device": "cuda" if cuda else "cpu",
        "torch_cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "nvidia_smi": _shell(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"]) or None,
        "float32_matmuls": {"JAX_DEFAULT_MATMUL_PRECISION": os.environ.get("JAX_DEFAULT_MATMUL_PRECISION"),
                            "torch": torch.get_float32_matmul_precision()},
        "xla_client_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "git_commit": _shell(["git", "-C", str(ROOT), "rev-parse", "HEAD"]) or None,
        "git_dirty": bool(_shell(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])),
    }


def finite(x):
    """NaN / inf (a Spearman over constant scores, say) as None: suite.json stays strict JSON."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def read_parts(out: Path) -> dict:
    """Each part's JSON plus its wall seconds and command from parts.tsv; a missing part is an error."""
    runs = {}
    for line in (out / "parts.tsv").read_text().splitlines():
        name, wall, command = line.split("\t", 2)
        runs[name] = {"wall_s": float(wall), "command": command}
    parts = {}
    for name in PARTS:
        if name not in runs:
            raise SystemExit(f"device_suite_report: part {name} has no entry in {out / 'parts.tsv'}")
        parts[name] = {**runs[name], "result": finite(json.loads((out / f"{name}.json").read_text()))}
    return parts


def headline(parts: dict) -> list[dict]:
    """The table's rows, each with the numbers it shows and the speed-up as their quotient."""
    bench = parts["bench_engine"]["result"]
    rate = bench["samples_per_s"]
    compare = parts["torch_compare"]["result"]
    totals, agree = compare["totals"], compare["agreement"]
    cost = parts["selection_study"]["result"]["cost"]
    n_compare, n_study = compare["pool"], cost["exact"]["landmarks"]  # exact: every pool row is a landmark
    rows = [
        {"label": f"per-example gradients, {bench['samples']} samples (baseline: torch.autograd per sample, "
                  "batch 1)", "unit": "samples/s", "idjax": rate["grad_idjax"], "baseline": rate["grad_torch_loop"]},
        {"label": "JVP embeddings (baseline: torch.func.jvp per sample, one tangent at a time)", "unit": "samples/s",
         "idjax": rate["emb_idjax"], "baseline": rate["emb_torch_loop"]},
    ]
    for path, name in (("exact", "exact path"), ("landmarks", "landmark path")):
        if path not in totals:
            continue
        t = totals[path]
        rows += [
            {"label": f"select_samples, {name}, N = {n_compare}, excl. compile (baseline: PyTorch implementation)",
             "unit": "s", "idjax": t["idjax_excl_compile_s"], "baseline": t["torch_plus_sketch_s"]},
            {"label": f"select_samples, {name}, N = {n_compare}, first call incl. compile (baseline: PyTorch)",
             "unit": "s", "idjax": t["idjax_wall_s"][0], "baseline": t["torch_plus_sketch_s"]},
        ]
    rows.append({"label": "score agreement idjax vs torch: Spearman of the exact scores", "unit": "Spearman",
                 "idjax": agree["exact_spearman"], "baseline": None})
    if "propagated_spearman" in agree:
        rows.append({"label": "score agreement idjax vs torch: Spearman of the propagated (landmark) scores",
                     "unit": "Spearman", "idjax": agree["propagated_spearman"], "baseline": None})
    rows.append({"label": f"selection cost, steady state, N = {n_study}: {cost['influence']['landmarks']} landmarks "
                          "(idjax column) vs --exact (baseline)", "unit": "s",
                 "idjax": cost["influence"]["seconds"], "baseline": cost["exact"]["seconds"]})
    if cost["influence"].get("spearman_vs_exact") is not None:
        rows.append({"label": "landmark vs exact scores: Spearman on the non-landmark rows", "unit": "Spearman",
                     "idjax": cost["influence"]["spearman_vs_exact"], "baseline": None})
    for row in rows:
        a, b = row["idjax"], row["baseline"]
        if b is None:
            row["speedup"] = None
        elif a is None or not a > 0 or not b > 0:
            raise SystemExit(f"device_suite_report: no positive figures for {row['label']!r}: {a}, {b}")
        else:
            row["speedup"] = a / b if row["unit"] == "samples/s" else b / a
    return rows


def fmt(x) -> str:
    """Four significant digits: what the table shows (tests compare it with suite.json at that precision)."""
    return "-" if x is None else f"{x:.4g}"


def markdown(suite: dict) -> str:
    m, walls = suite["machine"], suite["wall_s"]
    within = (f"; {'within' if suite['total_wall_s'] <= BUDGET_S else 'OVER'} the {BUDGET_S} s budget"
              if suite["mode"] == "full" else "")
    lines = [
        f"# Device suite ({suite['mode']} mode, {suite['date']})", "",
        f"- command: `{suite['command']}`",
        f"- machine: {m['torch_cuda_device'] or 'no CUDA device'}; {m['cpu_count']} CPUs, {m['host_cpu']}; jax "
        f"{m['jax']} backend {m['jax_backend']} ({', '.join(m['jax_devices'])}); torch {m['torch']} on "
        f"{m['torch_device']}; commit {(m['git_commit'] or '?')[:12]}{' (dirty)' if m['git_dirty'] else ''}",
        "- wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in walls.items())
        + f"; total {suite['total_wall_s']:.1f}{within}",
        "- speed-up = baseline seconds / idjax seconds, or idjax samples/s / baseline samples/s (> 1: idjax or "
        "the landmarks are faster); float32 throughout",
        "",
        "| figure | unit | idjax | baseline | speed-up |",
        "|---|---|---|---|---|",
    ]
    for row in suite["headline"]:
        speed = "-" if row["speedup"] is None else fmt(row["speedup"]) + "x"
        lines.append(f"| {row['label']} | {row['unit']} | {fmt(row['idjax'])} | {fmt(row['baseline'])} | {speed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the suite's output folder")
    ap.add_argument("--mode", choices=("full", "small"), required=True)
    ap.add_argument("--command", required=True, help="the suite's command line, for the record")
    args = ap.parse_args(argv)
    out = Path(args.out)
    parts = read_parts(out)
    suite = {
        "suite": "experiments/device_suite.sh", "mode": args.mode, "command": args.command,
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "machine": machine_info(),
        "wall_s": {name: part["wall_s"] for name, part in parts.items()},
        "total_wall_s": sum(part["wall_s"] for part in parts.values()),
        "budget_s": BUDGET_S if args.mode == "full" else None,
        "headline": headline(parts),
        "parts": parts,
    }
    (out / "suite.json").write_text(json.dumps(suite, indent=1, allow_nan=False) + "\n")
    (out / "suite.md").write_text(markdown(suite))
    print(markdown(suite))
    print(f"wrote {out / 'suite.json'} and {out / 'suite.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
