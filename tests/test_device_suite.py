"""experiments/device_suite.sh --small end to end (issue 19), so that the GPU suite cannot rot between GPU sessions.

One --small run (a few minutes on a 2-core CPU) serves every test: its JSON must hold real, positive figures,
the headline ratios must be the quotients of what the parts recorded, and suite.md must show those numbers.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "experiments" / "device_suite.sh"
PARTS = ("bench_engine", "torch_compare", "selection_study")


def suite_env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, **extra}


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("device-suite")
    proc = subprocess.run(["bash", str(SUITE), str(out), "--small"], cwd=ROOT, env=suite_env(),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"suite failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return out


def load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text())


def test_suite_json_holds_every_part_with_positive_figures(suite_out):
    suite = load(suite_out, "suite")
    assert suite["mode"] == "small" and suite["command"].endswith("--small")
    assert set(suite["parts"]) == set(PARTS) == set(suite["wall_s"])
    assert all(suite["wall_s"][p] > 0 for p in PARTS)
    assert suite["total_wall_s"] == pytest.approx(sum(suite["wall_s"].values()))
    machine = suite["machine"]
    assert machine["jax_backend"] == "cpu" and machine["torch_device"] == "cpu" and machine["jax_devices"]
    assert machine["torch"] and machine["jax"] and machine["python"]
    for name in PARTS:  # suite.json carries each part's own file unchanged
        assert suite["parts"][name]["result"] == load(suite_out, name)
        assert suite["parts"][name]["command"].startswith(sys.executable)

    bench = load(suite_out, "bench_engine")
    assert bench["torch_device"] == "cpu" and bench["samples"] == 4
    assert all(bench["samples_per_s"][k] > 0 for k in ("grad_idjax", "grad_torch_loop", "emb_idjax", "emb_torch_loop"))
    compare = load(suite_out, "torch_compare")
    for path in ("exact", "landmarks"):
        t = compare["totals"][path]
        assert t["idjax_excl_compile_s"] > 0 and t["torch_plus_sketch_s"] > 0 and all(w > 0 for w in t["idjax_wall_s"])
    cost = load(suite_out, "selection_study")["cost"]
    assert cost["influence"]["seconds"] > 0 and cost["exact"]["seconds"] > 0
    assert 0 < cost["influence"]["landmarks"] < cost["exact"]["landmarks"] == 16


def test_idjax_and_torch_select_the_same_way(suite_out):
    """The comparison measures one computation done twice: scores must agree (they did to ~1e-5 in every run)."""
    agree = load(suite_out, "torch_compare")["agreement"]
    assert agree["exact_spearman"] > 0.99 and agree["propagated_spearman"] > 0.99
    assert agree["gradients_min_cosine"] > 0.999 and agree["same_landmarks"]


def test_headline_ratios_are_quotients_of_the_recorded_figures(suite_out):
    rows = {row["label"]: row for row in load(suite_out, "suite")["headline"]}
    bench, compare = load(suite_out, "bench_engine"), load(suite_out, "torch_compare")
    cost = load(suite_out, "selection_study")["cost"]

    def row(prefix):
        found = [r for label, r in rows.items() if label.startswith(prefix)]
        assert len(found) == 1, (prefix, list(rows))
        return found[0]

    rate = bench["samples_per_s"]
    grads = row("per-example gradients")
    assert (grads["idjax"], grads["baseline"]) == (rate["grad_idjax"], rate["grad_torch_loop"])
    assert grads["speedup"] == pytest.approx(rate["grad_idjax"] / rate["grad_torch_loop"])
    assert grads["speedup"] == pytest.approx(bench["idjax_speedup"]["gradients_vs_torch_loop"])
    emb = row("JVP embeddings")
    assert emb["speedup"] == pytest.approx(rate["emb_idjax"] / rate["emb_torch_loop"])

    n = compare["pool"]
    for path, name, call in (("exact", "exact path", "exact"), ("landmarks", "landmark path", "lm")):
        t = compare["totals"][path]
        stages = compare["torch_stages"]
        assert t["torch_plus_sketch_s"] == pytest.approx(sum(stages[s]["torch_s"] + stages[s]["sketch_s"]
                                                             for s in t["torch_stages"]))
        calls = [compare["idjax_calls"][f"{call}{i}"] for i in (1, 2) if f"{call}{i}" in compare["idjax_calls"]]
        assert t["idjax_excl_compile_s"] == pytest.approx(min(c["wall_s"] - sum(c["compile_s"].values())
                                                              for c in calls))
        steady = row(f"select_samples, {name}, N = {n}, excl. compile")
        assert steady["speedup"] == pytest.approx(t["torch_plus_sketch_s"] / t["idjax_excl_compile_s"])
        first = row(f"select_samples, {name}, N = {n}, first call")
        assert first["speedup"] == pytest.approx(t["torch_plus_sketch_s"] / t["idjax_wall_s"][0])

    lm = row(f"selection cost, steady state, N = {cost['exact']['landmarks']}")
    assert (lm["idjax"], lm["baseline"]) == (cost["influence"]["seconds"], cost["exact"]["seconds"])
    assert lm["speedup"] == pytest.approx(cost["exact"]["seconds"] / cost["influence"]["seconds"])
    assert row("score agreement idjax vs torch: Spearman of the exact scores")["idjax"] == \
        compare["agreement"]["exact_spearman"]


def test_markdown_table_shows_the_json_numbers(suite_out):
    md = (suite_out / "suite.md").read_text()
    assert "| figure | unit | idjax | baseline | speed-up |" in md
    for row in load(suite_out, "suite")["headline"]:
        line = next((ln for ln in md.splitlines() if ln.startswith(f"| {row['label']} |")), None)
        assert line is not None, row["label"]
        cells = [c.strip() for c in line.strip("|").split("|")][2:]  # idjax, baseline, speed-up
        for cell, value in zip(cells, (row["idjax"], row["baseline"], row["speedup"])):
            if value is None:
                assert cell == "-"
            else:  # four significant digits
                assert float(re.fullmatch(r"(\S+?)x?", cell).group(1)) == pytest.approx(value, rel=1e-3)


def test_suite_writes_nothing_outside_its_folder(suite_out):
    assert not list(suite_out.glob("scratch.*")), "the scratch folder (model copy, stores, checkpoint) must go"
    assert sorted(p.name for p in suite_out.iterdir()) == sorted(
        [f"{p}.json" for p in PARTS] + [f"{p}.log" for p in PARTS] + ["parts.tsv", "suite.json", "suite.md"])
    commands = load(suite_out, "suite")["parts"]
    assert "--no-record" in commands["bench_engine"]["command"]
    assert "--no-record" in commands["torch_compare"]["command"]
    for flag in ("--hf-dir", "--scratch-dir"):  # torch_compare's defaults are under experiments/.store
        assert re.search(rf"{flag} {re.escape(str(suite_out))}/scratch\.", commands["torch_compare"]["command"])
    results = ROOT / "experiments" / "RESULTS.md"
    assert not results.exists() or str(suite_out) not in results.read_text()


def test_a_failing_part_fails_the_suite(tmp_path):
    proc = subprocess.run(["bash", str(SUITE), str(tmp_path), "--small"], cwd=ROOT, env=suite_env(PYTHON="false"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "part bench_engine failed" in proc.stderr
    assert not (tmp_path / "suite.json").exists() and not list(tmp_path.glob("scratch.*"))
    usage = subprocess.run(["bash", str(SUITE)], cwd=ROOT, env=suite_env(), capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
