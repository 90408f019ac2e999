"""`idjax run CONFIG.yaml`: a full run, a fully cached re-run, a change of k that reuses the warm-up and
the embedding store, clear one-line errors for bad configs, and Ctrl-C in the middle of the embedding
store followed by a resumed run that equals an uninterrupted one."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from idjax.cli import main

STAGES = ("data", "warmup", "select", "train", "eval")
N_POOL = 32
TASKS = Path(__file__).parent / "fixtures" / "tasks"
WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "glass", "ocean", "ember", "frost", "lemon"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random one-block Llama with the SmolLM2 tokenizer (its chat template masks the prompts)."""
    from flax import nnx

    from idjax.models import CausalLM, ModelConfig, load_tokenizer, resolve, save

    tok = load_tokenizer(resolve("smollm2-135m"))
    config = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=2, head_dim=8, eos_token_ids=(tok.eos_token_id,),
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save(CausalLM(config, rngs=nnx.Rngs(0)), path, tok)
    return path


def chat(i, q, a, prefix="p"):
    return {"id": f"{prefix}{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def pool_rows(n):
    """Two kinds of rows: sums and word definitions."""
    rows = []
    for i in range(n):
        if i % 2:
            rows.append(chat(i, f"What is {i} plus {2 * i + 1}?", f"{3 * i + 1}"))
        else:
            w = WORDS[i % len(WORDS)]
            rows.append(chat(i, f"What does the word {w} mean?", f"A {w} is a thing called {w} number {i}."))
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(directory: Path, model, *, n_pool=N_POOL, **over) -> Path:
    """Data files next to a config that names them by relative paths; returns the config path."""
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "pool.jsonl", pool_rows(n_pool))
    write_jsonl(directory / "target.jsonl", [chat(i, f"What is {i} plus {i}?", f"{2 * i}", "t") for i in range(3)])
    write_jsonl(directory / "eval.jsonl", [chat(i, f"What is {i} plus 7?", f"{i + 7}", "e") for i in range(4)])
    config = {"pool": "pool.jsonl", "target": "target.jsonl", "eval": "eval.jsonl", "model": str(model),
              "max_length": 64, "k": 4, "landmarks": 0.5, "params": "down_proj", "proj_dim": 32,
              "embed_blocks": 1, "embed_dim": 32, "batch_size": 4, "chunk_rows": 4, "out": str(directory / "out"),
              "warmup": {"fraction": 0.25, "steps": 1, "lr": 1e-3},
              "train": {"steps": 2, "lr": 1e-3, "schedule": "constant", "weighted": True}}
    # warm-up and fine-tuning share one optimizer recipe and batch size, so one compiled step
    config.update(over)
    path = directory / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(capsys, *argv):
    rc = main(["run", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def first_run(tiny_model, tmp_path_factory):
    """One full run shared by the caching tests (they copy its out dir before changing anything)."""
    from idjax import run, run_config

    directory = tmp_path_factory.mktemp("run")
    cfg = make_run(directory, tiny_model)
    result = run.run(run_config.load_config(cfg))
    return cfg, directory / "out", result


def snapshot(out: Path) -> dict:
    """Content of the stage results, and mtimes of every file (unchanged when a stage is cached)."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "run.json")
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes() if p.suffix in (".json", ".jsonl")
                                      else p.stat().st_size) for p in files}


def test_full_run_writes_every_stage(first_run):
    cfg, out, result = first_run
    assert result.status == {s: "computed" for s in STAGES}
    rows = [json.loads(line) for line in (out / "select" / "selection.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and len({r["id"] for r in rows}) == 4
    meta = json.loads((out / "select" / "selection.meta.json").read_text())
    assert meta["selected"] == 4 and meta["update_model"] == "adamw" and meta["command"] == "idjax run"
    assert meta["run"]["k"] == 4 and meta["run"]["pool"] == str(cfg.parent / "pool.jsonl")
    assert (out / "train" / "model" / "config.json").exists()
    assert list((out / "train" / "model").glob("*.safetensors"))
    assert (out / "train" / "model" / "opt_state").is_dir() and not (out / "train" / "model" / "checkpoints").exists()
    assert (out / "warmup" / "optimizer.json").exists()
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["before"]["samples"] == ev["after"]["samples"] == 4
    assert ev["before"]["loss"] != ev["after"]["loss"] and ev["delta"] == ev["after"]["loss"] - ev["before"]["loss"]
    s = result.summary
    assert s["selected"] == 4 and s["pool"] == N_POOL and s["train_steps"] == 2
    assert s["eval"]["after"] == ev["after"]["loss"] and s["stages"] == result.status
    for stage in STAGES:
        assert json.loads((out / stage / "done.json").read_text())["stage"] == stage
    assert not list(out.rglob("*.tmp"))


def test_rerun_skips_every_stage(first_run, capsys, caplog):
    cfg, out, _ = first_run
    before = snapshot(out)
    with caplog.at_level("INFO", logger="idjax"):
        rc, stdout, _ = run_cli(capsys, cfg)
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["stages"] == {s: "cached" for s in STAGES}
    for stage in STAGES:
        assert f"stage {stage}: cached" in caplog.text
    assert "loaded " not in caplog.text  # a fully cached run loads no model
    assert snapshot(out) == before  # same files, same bytes, not rewritten


def test_changing_k_reuses_warmup_and_embeddings(first_run, tmp_path, capsys, caplog):
    cfg, out, first = first_run
    work = tmp_path / "copy"
    shutil.copytree(cfg.parent, work)  # keeps mtimes
    conf = yaml.safe_load((work / "run.yaml").read_text())
    (work / "run.yaml").write_text(yaml.safe_dump({**conf, "k": 0.5, "out": str(work / "out")}))
    emb = sorted((work / "out" / "store").rglob("embeddings-*/chunk-*.npy"))
    assert len(emb) == N_POOL // 4
    emb_mtimes = [p.stat().st_mtime_ns for p in emb]
    warm = {p: p.stat().st_mtime_ns for p in (work / "out" / "warmup").rglob("*") if p.is_file()}
    with caplog.at_level("INFO", logger="idjax"):
        rc, stdout, _ = run_cli(capsys, work / "run.yaml")
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["stages"] == {"data": "cached", "warmup": "cached", "select": "computed",
                                 "train": "computed", "eval": "computed"}
    assert summary["k"] == summary["selected"] == N_POOL // 2
    assert "stage select: computing (inputs changed: k)" in caplog.text
    assert f"embed pool: {N_POOL // 4} chunk(s) reused, 0 computed" in caplog.text
    assert f"landmark gradients: {N_POOL // 8} chunk(s) reused, 0 computed" in caplog.text  # same landmarks
    assert [p.stat().st_mtime_ns for p in emb] == emb_mtimes
    assert {p: p.stat().st_mtime_ns for p in warm} == warm
    assert "model before fine-tuning is unchanged" in caplog.text  # the "before" loss is reused too
    assert summary["eval"]["before"] == first.summary["eval"]["before"]
    rows = [json.loads(line)["id"] for line in (work / "out" / "select" / "selection.jsonl").read_text().splitlines()]
    assert len(rows) == N_POOL // 2

    # --force recomputes that stage and everything after it
    with caplog.at_level("INFO", logger="idjax"):
        rc, stdout, _ = run_cli(capsys, work / "run.yaml", "--force", "train")
    assert json.loads(stdout)["stages"] == {"data": "cached", "warmup": "cached", "select": "cached",
                                            "train": "computed", "eval": "computed"}


def test_train_cut_short_in_its_first_save_starts_over(first_run, tmp_path, capsys, caplog):
    """Killed inside the fine-tuning's first checkpoint save: the re-run has nothing finished to resume
    from, so it trains from the start (the warm-up's rule, checkpoint.resumable) and ends as the first run."""
    cfg, out0, first = first_run
    work = tmp_path / "cut"
    shutil.copytree(cfg.parent, work)
    conf = yaml.safe_load((work / "run.yaml").read_text())
    (work / "run.yaml").write_text(yaml.safe_dump({**conf, "out": str(work / "out")}))
    (work / "out" / "train" / "done.json").unlink()  # started.json stays: the same work, cut short
    shutil.rmtree(work / "out" / "train" / "model")
    (work / "out" / "train" / "model" / "checkpoints" / "1.orbax-checkpoint-tmp-7").mkdir(parents=True)
    with caplog.at_level("INFO", logger="idjax"):
        rc, stdout, _ = run_cli(capsys, work / "run.yaml")
    assert rc == 0
    assert json.loads(stdout)["stages"] == {"data": "cached", "warmup": "cached", "select": "cached",
                                            "train": "computed", "eval": "computed"}
    assert "resuming the interrupted fine-tuning" not in caplog.text
    assert not (work / "out" / "train" / "model" / "checkpoints").exists()
    assert (work / "out" / "eval" / "eval.json").read_text() == (out0 / "eval" / "eval.json").read_text()


@pytest.mark.parametrize("change, message", [
    ({"trian": {"steps": 1}}, "unknown key 'trian' (did you mean 'train'?)"),
    ({"train": {"steps": 1, "lrr": 0.1}}, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"pool": "missing.jsonl"}, "key 'pool': no such file or directory: "),
    ({"k": 1000}, "key 'k': 1000 is larger than the pool (32 samples with a response token"),
    ({"k": "many"}, "key 'k': expected a number, got 'many'"),
    ({"train": {"lr": "fast"}}, "key 'train.lr': expected a number, got 'fast'"),
    ({"order": 3}, "key 'order': expected one of 1, 2, got 3"),
    ({"target": None}, "key 'target': give `target` (a chat JSONL) or `target_task`"),
    ({"params": "down_proj("}, "key 'params': 'down_proj(' is not a regular expression"),
])
def test_bad_config_is_one_clear_line(tiny_model, tmp_path, capsys, change, message):
    cfg = make_run(tmp_path, tiny_model, **change)
    conf = yaml.safe_load(cfg.read_text())
    cfg.write_text(yaml.safe_dump({k: v for k, v in conf.items() if v is not None}))
    rc, out, err = run_cli(capsys, cfg)
    assert rc == 1 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("idjax")]
    assert len(lines) == 1 and lines[0].startswith(f"idjax: error: {cfg}: ") and message in lines[0], err
    assert "Traceback" not in err


def test_target_task_gives_target_and_eval_sets(tiny_model, tmp_path, capsys):
    """A task recipe builds the target set and, without `eval`, the evaluation set; the data stage
    stays done when the run then stops on a k larger than the pool."""
    cfg = make_run(tmp_path, tiny_model, target=str(TASKS / "gsm8k.jsonl"), target_task="gsm8k", k=1000)
    conf = yaml.safe_load(cfg.read_text())
    del conf["eval"]
    cfg.write_text(yaml.safe_dump(conf))
    rc, _, err = run_cli(capsys, cfg)
    assert rc == 1 and "larger than the pool" in err
    data = json.loads((tmp_path / "out" / "data" / "summary.json").read_text())
    assert (data["targets"]["source"], data["targets"]["kept"]) == ("gsm8k target set", 5)
    assert (data["eval"]["source"], data["eval"]["kept"]) == ("gsm8k evaluation set", 1)
    assert json.loads((tmp_path / "out" / "data" / "done.json").read_text())["stage"] == "data"


def test_bad_config_from_the_shell(tmp_path):
    """The real command: exit 1 and exactly one line on stderr; a missing config file and a bad
    --force stage too (the latter is a usage error: exit 2)."""
    (tmp_path / "bad.yaml").write_text("pool: p.jsonl\nk: 3\nlandmark: 0.1\n")
    cmd = [sys.executable, "-m", "idjax.cli", "run"]
    r = subprocess.run([*cmd, tmp_path / "bad.yaml"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == (f"idjax: error: {tmp_path / 'bad.yaml'}: unknown key 'landmark' "
                                "(did you mean 'landmarks'?)")
    r = subprocess.run([*cmd, tmp_path / "none.yaml"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == f"idjax: error: {tmp_path / 'none.yaml'}: no such config file"
    r = subprocess.run([*cmd, tmp_path / "bad.yaml", "--force", "embed"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice: 'embed'" in r.stderr


@pytest.mark.parametrize("over, message", [
    ({"landmarks": 1.5}, "key 'landmarks': must be a fraction of the pool in (0, 1) or a whole count >= 1, got 1.5"),
    ({"out": "pool.jsonl"}, "key 'out': out {d}/pool.jsonl: is the input pool {d}/pool.jsonl; writing there would "
                            "destroy it, choose another path"),
    ({"out": "afile"}, "key 'out': out {d}/afile: is a file; out names a directory"),
])
def test_config_values_that_would_mislead_or_destroy(over, message, tmp_path, capsys):
    """A non-whole landmark count (it would run with 1 landmark), an `out` that is the pool, or a file."""
    (tmp_path / "afile").write_text("keep me")
    over = {k: str(tmp_path / v) if k == "out" else v for k, v in over.items()}
    cfg = make_run(tmp_path, "smollm2-135m", **over)
    pool = (tmp_path / "pool.jsonl").read_bytes()
    rc, out, err = run_cli(capsys, cfg)
    assert rc == 1 and out == ""
    assert err.strip() == f"idjax: error: {cfg}: " + message.format(d=tmp_path)
    assert (tmp_path / "pool.jsonl").read_bytes() == pool and (tmp_path / "afile").read_text() == "keep me"


def test_interrupt_and_resume_equals_uninterrupted(first_run, tmp_path, capsys, caplog, interruptible_cli):
    """Ctrl-C while the store fills; the re-run computes only the missing chunks and its selection is
    the uninterrupted first run's (one row per chunk here, four there: the same rows either way)."""
    from idjax.store import ArrayStore

    cfg0, out0, _ = first_run
    work = tmp_path / "w"
    shutil.copytree(cfg0.parent, work, ignore=shutil.ignore_patterns("store", "select", "train", "eval"))
    conf = yaml.safe_load((work / "run.yaml").read_text())
    (work / "run.yaml").write_text(yaml.safe_dump({**conf, "chunk_rows": 1, "out": str(work / "out")}))
    out = work / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(interruptible_cli + ["run", str(work / "run.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 300
        while not list(out.glob("store/*/embeddings-*/chunk-000000.npy")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the embedding store never got its first chunk"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.rstrip().splitlines()[-1].startswith("idjax: interrupted")
    assert "Traceback" not in stderr and stdout == ""
    assert "stage data: cached" in stderr and "stage warmup: cached" in stderr
    assert not (out / "select" / "done.json").exists()
    present = {}
    for store_dir in (p for p in (out / "store").rglob("*") if (p / "manifest.json").exists()):
        store = ArrayStore.open(store_dir, create=False)  # every chunk file on disk is whole
        present[store_dir.name.split("-")[0]] = store.num_chunks - len(store.missing())
        assert not store.corrupt and len(list(store_dir.glob("chunk-*.npy"))) == present[store_dir.name.split("-")[0]]
        assert not list(store_dir.glob(".*.tmp"))
    assert present["embeddings"] >= 1 and sum(present.values()) < N_POOL + N_POOL // 2, present  # stopped inside

    with caplog.at_level("INFO", logger="idjax"):
        rc, stdout, _ = run_cli(capsys, work / "run.yaml")
    assert rc == 0
    summary = json.loads(stdout)
    assert summary["stages"] == {"data": "cached", "warmup": "cached", "select": "computed", "train": "computed",
                                 "eval": "computed"}
    for name, desc, rows in (("embeddings", "embed pool", N_POOL), ("gradients", "landmark gradients", N_POOL // 2)):
        fill = re.search(rf"{desc}: (\d+) chunk\(s\) reused, (\d+) computed", caplog.text)
        assert (int(fill[1]), int(fill[2])) == (present.get(name, 0), rows - present.get(name, 0))  # only the missing
    for name in ("select/selection.jsonl", "eval/eval.json"):
        assert (out / name).read_text() == (out0 / name).read_text()
