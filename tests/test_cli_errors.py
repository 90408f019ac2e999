"""Every `idjax` command on bad input: one line on stderr naming the file, row or field, the right exit code
(2 usage, 1 bad file / checkpoint / runtime, 130 Ctrl-C), and no traceback unless --debug.

Runs in-process through idjax.cli.main on a tiny random Llama with the SmolLM2 tokenizer, except the
Ctrl-C test, which interrupts a real `idjax embed` subprocess and resumes it.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from idjax import cli, data, models, pipeline, train
from idjax.cli import main
from idjax.store import ArrayStore

FIX = Path(__file__).parent / "fixtures" / "tasks"


def _chat(i, answer="An answer."):
    return {"id": f"r{i}", "messages": [{"role": "user", "content": f"Question {i}?"},
                                        {"role": "assistant", "content": answer}]}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (1 layer) with the SmolLM2 tokenizer, saved as an HF checkpoint directory."""
    from flax import nnx

    tok = models.load_tokenizer(models.resolve("smollm2-135m"))
    config = models.ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
                                eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny") / "model"
    models.save(models.CausalLM(config, rngs=nnx.Rngs(0)), path, tok)
    return path


def _small_gguf(path) -> bytes:
    """A small, complete GGUF file (llama metadata and two tensors); its bytes."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.ones((64, 16), np.float32))
    w.add_tensor("output_norm.weight", np.ones(16, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path).read_bytes()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny):
    """Good and bad inputs, made once: name -> path."""
    d = tmp_path_factory.mktemp("files")
    f = {"pool": _write(d / "pool.jsonl", [_chat(i) for i in range(6)]),
         "target": _write(d / "target.jsonl", [_chat(i) for i in range(2)])}
    # data files
    f["missing"] = d / "nope.jsonl"
    (d / "adir.jsonl").mkdir()
    f["directory"] = d / "adir.jsonl"
    f["malformed"] = _write(d / "malformed.jsonl", [_chat(0), '{"id": "r1", "messages": ['])
    f["empty"] = _write(d / "empty.jsonl", [])
    bad_role = _chat(1)
    bad_role["messages"][1]["role"] = "bot"
    f["role"] = _write(d / "role.jsonl", [_chat(0), bad_role])
    f["no_messages"] = _write(d / "nomsg.jsonl", [_chat(0), _chat(1), {"id": "x", "text": "hello"}])
    bad_type = _chat(1)
    bad_type["messages"][0]["content"] = ["not", "a", "string"]
    f["content_type"] = _write(d / "ctype.jsonl", [_chat(0), bad_type])
    f["not_utf8"] = d / "latin1.jsonl"
    f["not_utf8"].write_bytes(json.dumps(_chat(0)).encode() + b"\n" + '{"id": "caf\xe9"}\n'.encode("latin-1"))
    f["bad_parquet"] = d / "bad.parquet"
    f["bad_parquet"].write_bytes(b"PAR1 this is not parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a", "b"], "text": ["hello", "world"]}), d / "fields.parquet")
    f["parquet_fields"] = d / "fields.parquet"
    # checkpoints: copies of the tiny model, each broken in one way
    cfg = json.loads((tiny / "config.json").read_text())

    def ckpt(name, config=None, drop=(), edit=None):
        p = d / name
        shutil.copytree(tiny, p)
        for x in drop:
            (p / x).unlink()
        if config is not None:
            (p / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if edit:
            edit(p)
        f[name] = p
        return p

    ckpt("no_config", drop=["config.json"])
    ckpt("bad_config", config='{"model_type": "llama",')
    ckpt("empty_config", config="")
    ckpt("list_config", config=[cfg])
    ckpt("missing_key", config={k: v for k, v in cfg.items() if k != "hidden_size"})
    ckpt("string_size", config={**cfg, "num_hidden_layers": "two"})
    ckpt("gpt2", config={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 16, "n_head": 2,
                         "n_layer": 1, "n_positions": 64, "vocab_size": len(json.loads(
                             (tiny / "tokenizer.json").read_text())["model"]["vocab"])})
    ckpt("mamba", config={"architectures": ["MambaForCausalLM"], "model_type": "mamba", "hidden_size": 16,
                          "state_size": 16, "num_hidden_layers": 1, "vocab_size": cfg["vocab_size"]})
    ckpt("no_safetensors", drop=["model.safetensors"])
    ckpt("no_tokenizer", drop=[x.name for x in tiny.iterdir() if x.name.startswith("tokenizer")])

    def truncate(p):
        st = p / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])

    ckpt("truncated_safetensors", edit=truncate)
    ckpt("bad_index", edit=lambda p: (p / "model.safetensors.index.json").write_text('{"weights": {}}'))
    with open(models.resolve("smollm2-135m"), "rb") as src:
        head = src.read(1000)  # the start of a real GGUF: cut inside its metadata
    for name, blob in (("truncated_gguf", _small_gguf(d / "small.gguf")[:-1000]), ("truncated_gguf_header", head),
                       ("garbage_gguf", b"not a gguf file at all" * 10), ("empty_gguf", b"")):
        f[name] = d / f"{name}.gguf"
        f[name].write_bytes(blob)
    f["wrong_suffix"] = f["pool"]  # an existing file that is no checkpoint
    f["no_such_model"] = d / "no-such-model"
    return f


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _embed_args(tiny, pool, store):
    """argv of `idjax embed` of a pool on the tiny model, one row per chunk (the unit of resumption)."""
    return ["embed", "--model", str(tiny), "--train", str(pool), "--store",
            str(store), "--chunk-rows", "1", "--batch-size", "1", "--embed-blocks", "1", "--embed-dim", "8",
            "--max-length", "64"]


def _one_error(err, pattern, prefix="idjax"):
    """Exactly one `idjax...` line on stderr, matching `pattern`; no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- bad data files

def _data_argv(command, path, tiny, tmp, files):
    return {
        "data": ["data", path, "--model", tiny],
        "train": ["train", "--model", tiny, "--data", path, "--out", tmp / "o", "--steps", 1, "--max-length", 64],
        "warmup": ["warmup", "--model", tiny, "--data", path, "--out", tmp / "o", "--steps", 1, "--max-length", 64],
        "eval": ["eval", "--model", tiny, "--data", path, "--max-length", 64],
        "embed": ["embed", "--model", tiny, "--train", path, "--store", tmp / "s", "--max-length", 64],
        "select-pool": ["select", "--model", tiny, "--train", path, "--target", files["target"], "--k", 1,
                        "--out", tmp / "sel.jsonl", "--max-length", 64],
        "select-target": ["select", "--model", tiny, "--train", files["pool"], "--target", path, "--k", 1,
                          "--out", tmp / "sel.jsonl", "--max-length", 64],
    }[command]


DATA_CASES = {  # case -> what the message must say (the file name is checked separately)
    "missing": r"nope\.jsonl: path does not exist",
    "directory": r"adir\.jsonl: a directory, but not a HF datasets directory",
    "malformed": r"malformed\.jsonl:2: field '<row>': malformed JSON",
    "empty": r"empty\.jsonl: contains no records",
    "role": r"role\.jsonl:2: field 'messages\[1\]\.role': expected one of user/assistant/system, got 'bot'",
    "no_messages": r"nomsg\.jsonl:3: field 'messages': missing",
    "content_type": r"ctype\.jsonl:2: field 'messages\[0\]\.content': expected a string, got list",
    "not_utf8": r"latin1\.jsonl:2: field '<row>': not UTF-8 text \(byte 0xe9",
    "bad_parquet": r"bad\.parquet: not a readable Parquet file",
    "parquet_fields": r"fields\.parquet:1: field 'messages': missing",
}


@pytest.mark.parametrize("command, case", [("data", c) for c in DATA_CASES] + [
    ("train", "malformed"), ("train", "directory"), ("warmup", "role"), ("warmup", "missing"),
    ("eval", "not_utf8"), ("eval", "bad_parquet"), ("embed", "no_messages"), ("embed", "empty"),
    ("select-pool", "content_type"), ("select-pool", "parquet_fields"), ("select-target", "role"),
    ("select-target", "missing"),
])
def test_bad_data_file(command, case, tiny, files, tmp_path, capsys):
    code, out, err = _run(_data_argv(command, files[case], tiny, tmp_path, files), capsys)
    assert code == 1, err
    line = _one_error(err, DATA_CASES[case])
    assert line.startswith(f"idjax: error: {files[case]}"), line  # the full path, first
    assert out == ""
    assert not (tmp_path / "s").exists() and not (tmp_path / "o" / "model.safetensors").exists()


def test_unreadable_file(files, tiny, tmp_path, capsys, monkeypatch):
    """A file the user may not read: the OS error, reduced to `PATH: reason`."""
    path = tmp_path / "locked.jsonl"
    shutil.copy(files["pool"], path)
    if os.geteuid() != 0:  # root reads anything: simulate the error there
        path.chmod(0)
    else:
        real = data._jsonl_rows

        def denied(p, name):
            if Path(p) == path:
                raise PermissionError(13, "Permission denied", str(p))
            return real(p, name)

        monkeypatch.setattr(data, "_jsonl_rows", denied)
    try:
        code, _, err = _run(["data", path, "--model", tiny], capsys)
    finally:
        path.chmod(0o644)
    assert code == 1
    _one_error(err, rf"^idjax: error: {re.escape(str(path))}: Permission denied$")


# ----------------------------------------------------------------------------- bad checkpoints

CKPT_CASES = {
    "no_such_model": r"no-such-model: no such checkpoint",
    "no_config": r"no_config: not an HF checkpoint directory \(no config\.json\)",
    "bad_config": r"bad_config/config\.json: invalid JSON",
    "empty_config": r"empty_config/config\.json: invalid JSON",
    "list_config": r"list_config/config\.json: expected a JSON object, got list",
    "missing_key": r"missing_key/config\.json: field 'hidden_size': missing",
    "string_size": r"string_size/config\.json: field 'num_hidden_layers': expected a positive integer, got 'two'",
    "gpt2": r"gpt2/config\.json: model_type 'gpt2' .*is not supported; idjax implements llama, qwen2, qwen3",
    "mamba": r"mamba/config\.json: model_type 'mamba' .*is not supported",
    "no_safetensors": r"no_safetensors: no \*\.safetensors files",
    "no_tokenizer": r"no_tokenizer: no tokenizer in the checkpoint directory",
    "truncated_safetensors": r"truncated_safetensors/model\.safetensors: not a readable safetensors file",
    "bad_index": r"bad_index/model\.safetensors\.index\.json: not a safetensors index",
    "truncated_gguf": r"truncated_gguf\.gguf: not a readable GGUF file, truncated or corrupt",
    "truncated_gguf_header": r"truncated_gguf_header\.gguf: not a readable GGUF file",
    "garbage_gguf": r"garbage_gguf\.gguf: not a readable GGUF file",
    "empty_gguf": r"empty_gguf\.gguf: not a readable GGUF file",
    "wrong_suffix": r"pool\.jsonl: expected an HF checkpoint directory or a \.gguf file",
}


def _model_argv(command, model, tmp, files):
    return {
        "chat": ["chat", "--model", model, "hello"],
        "convert": ["convert", "--model", model, "--out", tmp / "c"],
        "train": ["train", "--model", model, "--data", files["pool"], "--out", tmp / "o", "--steps", 1],
        "warmup": ["warmup", "--model", model, "--data", files["pool"], "--out", tmp / "o", "--steps", 1],
        "eval": ["eval", "--model", model, "--data", files["pool"]],
        "embed": ["embed", "--model", model, "--train", files["pool"], "--store", tmp / "s"],
        "select": ["select", "--model", model, "--train", files["pool"], "--target", files["target"], "--k", 1,
                   "--out", tmp / "sel.jsonl"],
        "data": ["data", files["pool"], "--model", model],
    }[command]


@pytest.mark.parametrize("command, case", [("chat", c) for c in CKPT_CASES if c != "no_tokenizer"] + [
    ("convert", "gpt2"), ("convert", "truncated_gguf_header"), ("train", "mamba"), ("train", "truncated_safetensors"),
    ("warmup", "missing_key"), ("eval", "gpt2"), ("eval", "no_config"), ("embed", "mamba"),
    ("embed", "garbage_gguf"), ("select", "gpt2"), ("select", "no_tokenizer"), ("select", "truncated_safetensors"),
    ("select", "empty_gguf"), ("data", "no_tokenizer"), ("data", "no_such_model"), ("data", "garbage_gguf"),
])
def test_bad_checkpoint(command, case, files, tmp_path, capsys):
    code, out, err = _run(_model_argv(command, files[case], tmp_path, files), capsys)
    assert code == 1, err
    want = CKPT_CASES[case]  # the tokenizer (read first by select and data) and the weights fail alike
    _one_error(err, r"^idjax: error: " + re.escape(str(files[case].parent)) + r".*" + want)
    assert out == ""


# ----------------------------------------------------------------------------- usage errors (exit 2)

@pytest.mark.parametrize("argv, message", [
    (["chat", "--max-new-tokens", "0", "hi"], r"idjax chat: error: --max-new-tokens must be >= 1, got 0"),
    (["data", "{pool}", "--limit", "0"], r"--limit must be >= 1"),
    (["data", "{pool}", "--max-length", "0"], r"--max-length must be >= 1"),
    (["train", "--data", "{pool}", "--out", "{tmp}/o", "--batch-size", "0"],
     r"idjax train: error: --batch-size must be >= 1"),
    (["train", "--data", "{pool}", "--out", "{tmp}/o", "--steps", "0"], r"--steps must be >= 1"),
    (["train", "--data", "{pool}", "--out", "{tmp}/o", "--lr", "-1"], r"--lr must be a finite number >= 0, got -1"),
    (["train", "--data", "{pool}", "--out", "{tmp}/o", "--lr", "nan"], r"--lr must be a finite number"),
    (["train", "--data", "{pool}", "--out", "{tmp}/o", "--grad-accum", "0"], r"--grad-accum must be >= 1"),
    (["train", "--data", "{pool}", "--out", "{tmp}/o", "--weighted"], r"--weighted needs --selection"),
    (["warmup", "--data", "{pool}", "--out", "{tmp}/o", "--fraction", "1.5"], r"--fraction must be in \(0, 1\]"),
    (["eval", "--model", "{tiny}"], r"give --data FILE"),
    (["eval", "--task", "humaneval", "--data", "{pool}"], r"--allow-code-execution"),
    (["embed", "--train", "{pool}", "--store", "{tmp}/s", "--embed-dim", "0"], r"--embed-dim must be >= 1"),
    (["embed", "--train", "{pool}", "--store", "{tmp}/s", "--chunk-rows", "0"], r"--chunk-rows must be >= 1"),
    (["select", "--train", "{pool}", "--target", "{target}", "--k", "0", "--out", "{tmp}/s.jsonl"],
     r"--k must be >= 1"),
    (["select", "--model", "{tiny}", "--train", "{pool}", "--k", "1", "--out", "{tmp}/s.jsonl", "--max-length", "64"],
     r"give --target FILE"),
    (["select", "--train", "{pool}", "--target", "{target}", "--k", "1", "--out", "{tmp}/s.jsonl", "--params", "(("],
     r"--params '\(\(' is not a regular expression"),
    (["select", "--train", "{pool}", "--target", "{target}", "--k", "1", "--out", "{tmp}/s.jsonl", "--proj-dim", "-1"],
     r"--proj-dim must be >= 0"),
    (["select", "--train", "{pool}", "--target", "{target}", "--k", "1", "--out", "{tmp}/s.jsonl", "--lam", "0"],
     r"--lam must be a finite number > 0"),
    (["select", "--model", "{tiny}", "--train", "{pool}", "--target", "{target}", "--k", "7", "--out", "{tmp}/s.jsonl",
      "--max-length", "64"], r"idjax select: error: --k 7 is larger than the pool: .*pool\.jsonl has 6 samples"),
    (["select", "--train", "{pool}", "--target", "{target}", "--k", "1", "--out", "{tmp}/s.jsonl", "--landmarks", "1.5"],
     r"--landmarks must be a fraction of the pool in \(0, 1\) or a whole count >= 1, got 1.5"),
    (["demo", "--k-fraction", "2"], r"--k-fraction must be in \(0, 1\]"),
    (["demo", "--pool-limit", "1"], r"--pool-limit must be >= 2, got 1"),
])
def test_usage_error(argv, message, tiny, files, tmp_path, capsys):
    argv = [a.format(pool=files["pool"], target=files["target"], tmp=tmp_path, tiny=tiny) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2, err
    _one_error(err, message)
    assert out == "" and not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv", [[], ["nope"], ["chat"], ["chat", "--dtype", "float8", "hi"],
                                  ["train", "--data", "x"], ["select", "--train", "x", "--k", "two", "--out", "y"]])
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- bad output and state paths

@pytest.mark.parametrize("command", ["convert", "train", "warmup", "demo", "embed", "select-store", "select-out"])
def test_output_path_in_the_way(command, tiny, files, tmp_path, capsys):
    """A file where an output directory goes (or a directory where the selection file goes) fails before any work."""
    blocker = _write(tmp_path / "blocker", ["x"])
    (tmp_path / "adir").mkdir()
    argv = {
        "convert": ["convert", "--model", tiny, "--out", blocker],
        "train": ["train", "--model", tiny, "--data", files["pool"], "--out", blocker],
        "warmup": ["warmup", "--model", tiny, "--data", files["pool"], "--out", blocker],
        "demo": ["demo", "--out", blocker],
        "embed": ["embed", "--model", tiny, "--train", files["pool"], "--store", blocker],
        "select-store": ["select", "--model", tiny, "--train", files["pool"], "--target", files["target"], "--k", 1,
                         "--out", tmp_path / "s.jsonl", "--store", blocker],
        "select-out": ["select", "--model", tiny, "--train", files["pool"], "--target", files["target"], "--k", 1,
                       "--out", tmp_path / "adir"],
    }[command]
    code, out, err = _run(argv, capsys)
    assert code == 1
    what = "adir: is a directory; --out names a file" if command == "select-out" else "blocker: is a file"
    _one_error(err, re.escape(what))
    assert blocker.read_text() == "x\n" and list((tmp_path / "adir").iterdir()) == []


@pytest.mark.parametrize("case", ["out-is-train", "out-is-target", "out-links-to-train", "store-is-train",
                                  "train-out-is-model", "unwritable-out"])
def test_outputs_never_overwrite_inputs_and_are_checked_first(case, tiny, files, tmp_path, capsys):
    """No command writes over one of its inputs (by resolved path, through symlinks), and an unwritable
    output fails before any model is loaded (the model given here does not exist: its error never shows)."""
    import shutil

    pool, target = shutil.copy(files["pool"], tmp_path / "pool.jsonl"), shutil.copy(files["target"], tmp_path / "t.jsonl")
    before = {p: p.read_bytes() for p in (pool, target)}
    no_model = tmp_path / "no-such-model"
    select = ["select", "--model", no_model, "--train", pool, "--target", target, "--k", 1]
    if case == "out-is-train":
        argv, msg = select + ["--out", pool], r"--out .*pool\.jsonl: is the input --train"
    elif case == "out-is-target":
        argv, msg = select + ["--out", target], r"--out .*t\.jsonl: is the input --target"
    elif case == "out-links-to-train":
        (tmp_path / "link.jsonl").symlink_to(pool)
        argv, msg = select + ["--out", tmp_path / "link.jsonl"], r"--out .*link\.jsonl: is the input --train"
    elif case == "store-is-train":
        argv, msg = select + ["--out", tmp_path / "s.jsonl", "--store", pool], r"--store .*pool\.jsonl: is the input --train"
    elif case == "train-out-is-model":
        model = shutil.copytree(tiny, tmp_path / "ckpt")
        argv = ["train", "--model", model, "--data", pool, "--out", model, "--steps", 1]
        msg = r"--out .*ckpt: is the input --model"
    else:  # a parent that is a regular file: no one, root included, can create files under it
        blocker = _write(tmp_path / "blocker", ["x"])
        argv, msg = select + ["--out", blocker / "sel.jsonl"], r"--out .*blocker/sel\.jsonl: cannot write there"
    code, _, err = _run(argv, capsys)
    assert code == 1
    _one_error(err, msg)
    assert all(p.read_bytes() == b for p, b in before.items())


@pytest.mark.parametrize("case", ["selection-dir", "selection-malformed", "resume-file", "optimizer-state-missing",
                                  "eval-task-format"])
def test_other_bad_inputs(case, tiny, files, tmp_path, capsys):
    train_args = ["train", "--model", tiny, "--data", files["pool"], "--out", tmp_path / "o", "--steps", 1,
                  "--max-length", 64]
    if case == "selection-dir":
        argv, msg = train_args + ["--selection", tmp_path], r": selection file does not exist"
    elif case == "selection-malformed":
        sel = _write(tmp_path / "sel.jsonl", [{"index": 0, "id": "r0", "score": 1, "weight": 1}, "{nope"])
        argv, msg = train_args + ["--selection", sel], r"sel\.jsonl:2: field '<row>': malformed JSON"
    elif case == "resume-file":
        argv, msg = train_args + ["--resume", files["pool"]], r"pool\.jsonl: no checkpoints to resume from"
    elif case == "optimizer-state-missing":
        argv = ["select", "--model", tiny, "--train", files["pool"], "--target", files["target"], "--k", 1,
                "--out", tmp_path / "s.jsonl", "--max-length", 64, "--optimizer-state", tmp_path / "nowhere"]
        msg = r"nowhere: no optimizer state"
    else:  # a chat JSONL where the task recipe wants GSM8k's HF format
        argv = ["eval", "--model", tiny, "--task", "gsm8k", "--data", files["pool"], "--max-length", 64]
        msg = r"pool\.jsonl:1: field 'question'"
    code, out, err = _run(argv, capsys)
    assert code == 1, err
    _one_error(err, msg)


# ----------------------------------------------------------------------------- a real Ctrl-C

def test_ctrl_c_during_embed_keeps_a_valid_store_and_resumes(tiny, tmp_path, capsys, interruptible_cli):
    """SIGINT to a real `idjax embed` once its first chunk is on disk: exit 130, one line, no traceback; the
    store opens, holds only whole chunks, and the same command (here in-process, to save a start-up) finishes
    it without recomputing them. Then the same store with another --chunk-rows: refused, nothing lost."""
    rows = 200  # one-row chunks of ~30 ms: a window of seconds for the interrupt, even on a loaded machine
    pool = _write(tmp_path / "pool.jsonl", [_chat(i, answer=f"Answer number {i}.") for i in range(rows)])
    store = tmp_path / "store"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(interruptible_cli + _embed_args(tiny, pool, store), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not list(store.glob("embeddings-*/chunk-*.npy")):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"embed wrote no chunk: {proc.communicate()[1][-2000:]}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGSTOP)  # freeze it mid-run, so the interrupt lands while chunks are missing
        (sub,) = store.glob("embeddings-*")
        total = ArrayStore.open(sub, create=False).num_chunks
        assert len(list(sub.glob("chunk-*.npy"))) < total
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert out == ""
    assert _one_error(err, "interrupted") == (f"idjax: interrupted; finished chunks are kept in {store}, re-run "
                                              "the same command to resume")
    kept = ArrayStore.open(sub, create=False)
    done = total - len(kept.missing())
    assert 1 <= done < total
    assert not list(sub.glob(".*.tmp"))  # no half-written chunk left behind
    finished = {p.name: p.stat().st_mtime_ns for p in sub.glob("chunk-*.npy")}
    code, out, err = _run(_embed_args(tiny, pool, store), capsys)
    assert code == 0, err
    assert json.loads(out)["rows"] == rows
    assert not ArrayStore.open(sub, create=False).missing()
    assert {n: (sub / n).stat().st_mtime_ns for n in finished} == finished  # reused, not recomputed

    # the same store with another --chunk-rows: refused, naming the store and the field; nothing is lost
    argv = _embed_args(tiny, pool, store)
    argv[argv.index("--chunk-rows") + 1] = "4"
    code, out, err = _run(argv, capsys)
    assert code == 1
    _one_error(err, re.escape(str(sub)) + r" was built for something else: chunk_rows 1 \(store\) != 4")
    assert not ArrayStore.open(sub, create=False).missing()


# ----------------------------------------------------------------------------- runtime: OOM, crashes, --debug

def _oom(*args, **kwargs):
    from jax.errors import JaxRuntimeError  # the class XLA raises (XlaRuntimeError is the same class)

    raise JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes.\n"
                          "BufferAssignment OOM Debugging.\n...")


def _host_oom(*args, **kwargs):
    raise MemoryError()


@pytest.mark.parametrize("command", ["embed", "select", "train", "chat"])
def test_out_of_memory_is_one_line_with_a_hint(command, tiny, files, tmp_path, capsys, monkeypatch):
    from idjax.embed import JVPEmbedder

    argv = _model_argv(command, tiny, tmp_path, files) + (["--max-length", 64] if command != "chat" else [])
    if command == "embed":  # inside the chunk loop: the store exists and is kept
        argv = _embed_args(tiny, files["pool"], tmp_path / "s")  # the shapes compiled above, in this process
        monkeypatch.setattr(JVPEmbedder, "run", _oom)
        want = [r"--batch-size \(now 1\)", r"--max-length", r"--dtype bfloat16",
                "finished chunks are kept in " + re.escape(str(tmp_path / "s"))]
    elif command == "select":
        monkeypatch.setattr(pipeline, "select_samples", _oom)
        want = [r"--batch-size", r"--microbatch 1", r"--proj-dim \(now 4096\)", r"--params down_proj",
                r"--dtype bfloat16", "kept in " + re.escape(str(tmp_path / "sel.store"))]
    elif command == "train":
        monkeypatch.setattr(train, "train", _host_oom)
        want = [r"out of memory \(MemoryError\)", r"--batch-size", r"--compute-dtype bfloat16", r"--remat"]
    else:
        monkeypatch.setattr(models, "chat", _oom)
        want = [r"--dtype bfloat16"]
    code, out, err = _run(argv, capsys)
    assert code == 1, err
    line = _one_error(err, r"^idjax: error: out of memory")
    if command != "train":
        assert "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes." in line
    for pattern in want:
        assert re.search(pattern, line), (pattern, line)
    if command == "embed":
        (sub,) = (tmp_path / "s").glob("embeddings-*")
        assert ArrayStore.open(sub, create=False).missing()  # a valid store, nothing in it yet


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    def boom(*a, **k):
        raise TypeError("something\nbroke")

    monkeypatch.setattr(models, "chat", boom)
    code, out, err = _run(["chat", "--model", tiny, "hi"], capsys)
    assert code == 1
    _one_error(err, r"^idjax: error: TypeError: something broke \(unexpected; --debug shows the traceback")
    code, out, err = _run(["--debug", "chat", "--model", tiny, "hi"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and 'raise TypeError("something' in err
    assert err.rstrip().splitlines()[-1].startswith("idjax: error: TypeError: something broke")


def test_debug_shows_the_traceback_of_a_bad_file(files, tiny, capsys):
    code, out, err = _run(["--debug", "data", files["role"], "--model", tiny], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.rstrip().splitlines()[-1].startswith(f"idjax: error: {files['role']}:2: field 'messages[1].role'")


@pytest.mark.parametrize("command", ["select", "train", "warmup", "chat"])
def test_interrupt_in_process(command, tiny, files, tmp_path, capsys, monkeypatch):
    """Ctrl-C anywhere in a command: exit 130 and one line that says what was kept and how to go on."""
    def interrupt(*a, **k):
        if command in ("train", "warmup"):
            (tmp_path / "o" / "checkpoints" / "3").mkdir(parents=True)  # what an interrupted run leaves
        raise KeyboardInterrupt

    target = {"select": (pipeline, "select_samples"), "train": (train, "train"), "warmup": (train, "train"),
              "chat": (models, "chat")}[command]
    monkeypatch.setattr(*target, interrupt)
    argv = _model_argv(command, tiny, tmp_path, files) + (["--max-length", 64] if command != "chat" else [])
    code, out, err = _run(argv, capsys)
    assert code == 130
    want = {"select": "idjax: interrupted; finished chunks are kept in " + str(tmp_path / "sel.store")
                      + ", re-run the same command to resume",
            "train": f"idjax: interrupted; checkpoints are kept in {tmp_path / 'o' / 'checkpoints'}, re-run with "
                     f"--resume {tmp_path / 'o'} to continue",
            "warmup": f"idjax: interrupted; checkpoints are kept in {tmp_path / 'o' / 'checkpoints'}, re-run the "
                      "same command to resume",
            "chat": "idjax: interrupted"}[command]
    assert _one_error(err, "interrupted") == want


def test_cli_docstring_states_the_exit_codes():
    doc = cli.__doc__
    assert "2 for usage errors" in doc and "130" in doc and "--debug" in doc
