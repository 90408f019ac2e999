"""`idjax embed` / `idjax select` on the embedded SmolLM2: bad input, an interrupted run, a real selection."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from idjax.cli import main
from idjax.store import ArrayStore

DEMO = Path(__file__).resolve().parents[1] / "idjax" / "assets" / "demo"
FIX = Path(__file__).parent / "fixtures" / "tasks"
POOL = FIX / "tulu_v2.jsonl"
TARGET = FIX / "gsm8k.jsonl"


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _chat(i, answer="An answer."):
    return {"id": f"t{i}", "messages": [{"role": "user", "content": f"Question {i}?"},
                                        {"role": "assistant", "content": answer}]}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("t") / "target.jsonl", [_chat(i) for i in range(2)])


def _run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("case", ["k_too_large", "empty_target", "no_response_target", "malformed_pool",
                                  "missing_field", "bad_optimizer_state", "usage", "no_k_or_budget",
                                  "budget_too_small"])
def test_select_bad_input_is_one_line(case, target, tmp_path, capsys):
    argv = ["select", "--train", str(POOL), "--target", str(target), "--k", "2", "--out", str(tmp_path / "s.jsonl")]
    expect, code_want = None, 1
    if case == "k_too_large":  # a request the input cannot satisfy: a usage error
        argv[argv.index("--k") + 1] = "1000"
        expect, code_want = "larger than the pool", 2
    elif case == "empty_target":
        argv[argv.index("--target") + 1] = str(_write(tmp_path / "empty.jsonl", []))
        expect = "no records"
    elif case == "no_response_target":
        argv[argv.index("--target") + 1] = str(_write(tmp_path / "nr.jsonl", [_chat(0, answer="")]))
        expect = "no target sample has a response token"
    elif case == "malformed_pool":
        argv[argv.index("--train") + 1] = str(_write(tmp_path / "bad.jsonl", [_chat(0), "{not json"]))
        expect = r"bad\.jsonl:2"
    elif case == "missing_field":
        argv[argv.index("--train") + 1] = str(_write(tmp_path / "nf.jsonl", [{"id": "x", "text": "hello"}]))
        expect = "nf.jsonl:1"
    elif case == "bad_optimizer_state":
        import jax
        from flax import nnx

        from idjax.models import CausalLM, ModelConfig
        from idjax.optim import OptimizerSpec, save_optimizer_state

        tiny = CausalLM(ModelConfig(model_type="llama", vocab_size=32, hidden_size=8, intermediate_size=8,
                                    num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4), rngs=nnx.Rngs(0))
        spec = OptimizerSpec("adamw", 1e-3)
        params = nnx.state(tiny, nnx.Param)
        save_optimizer_state(tmp_path / "warm", spec, spec.build().init(jax.tree.map(lambda x: x, params)), 0)
        argv += ["--optimizer-state", str(tmp_path / "warm")]
        expect = "does not match this model"
    elif case == "usage":
        argv[argv.index("--k") + 1] = "0"
        expect, code_want = "--k must be >= 1", 2
    elif case == "no_k_or_budget":
        del argv[argv.index("--k"):argv.index("--k") + 2]
        expect, code_want = "give --k .* or --budget-tokens", 2
    elif case == "budget_too_small":  # every pool sample has more than one response token
        argv[argv.index("--k"):argv.index("--k") + 2] = ["--budget-tokens", "1"]
        expect = "budget_tokens=1 is smaller than the shortest sample"
    code, out, err = _run(argv, capsys)
    assert code == code_want, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and re.search(expect, lines[0]), err
    assert "Traceback" not in err and out == ""


def _embed_cmd(store, pool):
    return [sys.executable, "-m", "idjax.cli", "embed", "--train", str(pool), "--store", str(store),
            "--chunk-rows", "2", "--batch-size", "2", "--embed-blocks", "1", "--embed-dim", "64", "--max-length", "128"]


def _env():
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def test_embed_resumes_after_a_kill(tmp_path):
    """SIGKILL `idjax embed` after its first chunk; the re-run computes only the missing chunks and ends
    with the same array as an uninterrupted run."""
    store = tmp_path / "store"
    proc = subprocess.Popen(_embed_cmd(store, POOL), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(store.glob("embeddings-*/chunk-*.npy")):
        if proc.poll() is not None:
            pytest.fail(f"embed ended before writing a chunk: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (sub,) = store.glob("embeddings-*")
    done_before = len(list(sub.glob("chunk-*.npy")))
    total = ArrayStore.open(sub, create=False).num_chunks
    assert 1 <= done_before < total
    again = subprocess.run(_embed_cmd(store, POOL), env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    m = re.search(r"(\d+) chunk\(s\) reused, (\d+) computed", again.stderr)
    assert m and int(m[1]) >= done_before and int(m[1]) + int(m[2]) == total, again.stderr[-2000:]
    fresh = subprocess.run(_embed_cmd(tmp_path / "fresh", POOL), env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    resumed = ArrayStore.open(sub, create=False).to_array()
    (fsub,) = (tmp_path / "fresh").glob("embeddings-*")
    np.testing.assert_array_equal(resumed, ArrayStore.open(fsub, create=False).to_array())
    assert json.loads(again.stdout)["rows"] == resumed.shape[0]


def test_select_writes_rows_and_sidecar(tmp_path, capsys):
    """A real landmark run with per-task budgets (targets carry "task"), read back from disk."""
    rows = [dict(_chat(i, answer=f"Answer {i}."), task="a" if i % 2 else "b") for i in range(4)]
    tgt = _write(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "sel.jsonl"
    argv = ["select", "--train", str(POOL), "--target", str(tgt), "--k", "6", "--out", str(out),
            "--landmarks", "0.5", "--proj-dim", "256", "--params", "down_proj", "--embed-blocks", "1",
            "--embed-dim", "64", "--batch-size", "4", "--max-length", "128", "--aggregate", "round-robin"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 6 and len({r["id"] for r in got}) == 6
    assert [r["by"] for r in got] == ["a"] * 3 + ["b"] * 3
    assert all(set(r) >= {"index", "id", "score", "weight"} for r in got)
    meta = json.loads(Path(summary["meta"]).read_text())
    assert meta["landmarks"] == 8 and meta["config"]["k"] == 6
    # what the selection trains on: every row's response tokens, and their sum in the sidecar
    assert all(1 <= r["response_tokens"] <= 128 for r in got)
    assert meta["response_tokens"] == sum(r["response_tokens"] for r in got)
    # the share of computed tokens that are real, per pass (counted against the batches in test_data)
    assert set(meta["real_token_fraction"]) == {"embed", "gradients", "targets"}
    assert all(0.5 < f <= 1 for f in meta["real_token_fraction"].values())
    assert {"load", "embed", "landmarks", "gradients", "targets", "propagate", "weights", "select"} <= set(
        meta["timings_s"])


@pytest.mark.parametrize("method", ["rds", "mid-ppl"])
def test_select_baseline_method(method, tmp_path, capsys):
    """`--method` runs a docs/method.md 9 baseline through the same data checks and output format."""
    out = tmp_path / "sel.jsonl"
    argv = ["select", "--train", str(POOL), "--target-task", "gsm8k", "--target", str(TARGET), "--k", "4", "--out", str(out),
            "--method", method, "--batch-size", "4", "--max-length", "128", "--seed", "2"]
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == 4 and len({r["index"] for r in got}) == 4
    assert all(r["weight"] == pytest.approx(0.25) for r in got)
    meta = json.loads(Path(json.loads(stdout)["meta"]).read_text())
    assert meta["method"] == method and meta["selected"] == 4
    if method == "rds":
        assert all("by" in r for r in got)


@pytest.fixture(scope="module")
def pool_stores(tmp_path_factory):
    """Store directories both modes below share: their pools are the same, so the second mode reuses the
    first one's pool gradients (stores are keyed by model, pool and settings, not by the targets)."""
    return tmp_path_factory.mktemp("pool-stores")


@pytest.mark.parametrize("mode", ["round-robin", "per-task"])
def test_select_with_skipped_target_and_pool_rows(mode, tmp_path, capsys, caplog, pool_stores):
    """Records that tokenize() skips (an empty answer, a prompt longer than --max-length) shift every later
    row's file index away from its position. The selection must equal the one on the files without those
    records, with "index" still pointing at the row of the original file."""
    pool = [json.loads(line) for line in POOL.read_text().splitlines()]
    long_prompt = {"id": "long", "messages": [{"role": "user", "content": "word " * 400},
                                              {"role": "assistant", "content": "cut off"}]}
    skipped_pool = [dict(_chat(90, answer=""), id="p-empty"), dict(long_prompt, id="p-long")]
    targets = [dict(_chat(i, answer=f"Answer {i}."), task="a" if i % 2 else "b") for i in range(4)]
    if mode == "round-robin":
        targets = [{k: v for k, v in t.items() if k != "task"} for t in targets]
    skipped_targets = [dict(_chat(91, answer=""), task="a"), dict(long_prompt, task="b")]
    files = {
        "dirty": (_write(tmp_path / "pool.jsonl", skipped_pool + pool),
                  _write(tmp_path / "t.jsonl", [skipped_targets[0], *targets[:2], skipped_targets[1], *targets[2:]])),
        "clean": (_write(tmp_path / "pool-clean.jsonl", pool), _write(tmp_path / "t-clean.jsonl", targets)),
    }
    got = {}
    for name, (pool_file, target_file) in files.items():
        out = tmp_path / f"{name}.jsonl"
        argv = ["select", "--train", str(pool_file), "--target", str(target_file), "--k", "6", "--out", str(out),
                "--exact", "--proj-dim", "256", "--params", "down_proj", "--batch-size", "4", "--max-length", "128",
                "--store", str(pool_stores / f"{name}.store")]
        if mode == "round-robin":
            argv += ["--aggregate", "round-robin"]
        caplog.clear()
        code, _, err = _run(argv, capsys)
        assert code == 0, err
        skips = [r.getMessage() for r in caplog.records if "skipped 2 samples" in r.getMessage()]
        assert len(skips) == (2 if name == "dirty" else 0), skips  # the pool's and the targets'
        # the tokenized pool is kept in the store (the second mode reads it back, and warns again)
        assert len(list((pool_stores / f"{name}.store").glob("tokenized-*.npz"))) == 1
        got[name] = [json.loads(line) for line in out.read_text().splitlines()]
    dirty, clean = got["dirty"], got["clean"]
    assert [r["id"] for r in dirty] == [r["id"] for r in clean] and len(dirty) == 6
    assert [r["by"] for r in dirty] == [r["by"] for r in clean]
    np.testing.assert_allclose([r["score"] for r in dirty], [r["score"] for r in clean], rtol=1e-5, atol=1e-6)
    assert all(r["index"] == c["index"] + 2 for r, c in zip(dirty, clean))
    assert all(pool[c["index"]]["id"] == c["id"] for c in clean)
    if mode == "round-robin":  # every kept target takes its turn, and only kept targets
        assert {r["by"] for r in dirty} == {t["id"] for t in targets}


@pytest.mark.parametrize("method", ["influence", "random"])
def test_select_with_a_token_budget(method, tmp_path, capsys, pool_stores):
    """--budget-tokens: the selection is the longest prefix of the whole pool's selection order whose
    response tokens fit the budget (a loop over a --k N run's file is the reference)."""
    target_file = _write(tmp_path / "t.jsonl", [_chat(i) for i in range(4)])
    common = ["select", "--train", str(POOL), "--target", str(target_file), "--method", method, "--exact",
              "--proj-dim", "256", "--params", "down_proj", "--batch-size", "4",
              "--max-length", "128", "--aggregate", "round-robin", "--seed", "3",
              "--store", str(pool_stores / "clean.store")]
    n = len(POOL.read_text().splitlines())
    runs = {}
    for name, flags in {"all": ["--k", str(n)], "budget": ["--budget-tokens", None]}.items():
        if name == "budget":  # about half of the first six rows' tokens: several rows, not the whole pool
            flags[1] = str(sum(r["response_tokens"] for r in runs["all"][:6]) // 2)
        out = tmp_path / f"{name}.jsonl"
        code, stdout, err = _run(common + flags + ["--out", str(out)], capsys)
        assert code == 0, err
        runs[name] = [json.loads(line) for line in out.read_text().splitlines()]
    budget = int(flags[1])
    want, total = [], 0
    for r in runs["all"]:
        if total + r["response_tokens"] > budget:
            break
        want.append(r["id"])
        total += r["response_tokens"]
    assert 1 <= len(want) < 6
    assert [r["id"] for r in runs["budget"]] == want
    meta = json.loads((tmp_path / "budget.meta.json").read_text())
    assert meta["response_tokens"] == total <= budget
    assert meta["budget_tokens"]["budget"] == budget and meta["budget_tokens"]["selected"] == len(want)
    if method == "random":  # uniform weights over the rows kept
        assert all(r["weight"] == pytest.approx(1 / len(want)) for r in runs["budget"])
