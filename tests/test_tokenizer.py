"""The GGUF tokenizer idjax builds without PyTorch, against transformers' own GGUF loader (which needs it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from idjax.models import gguf_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "idjax" / "assets" / "demo"


def _records():
    files = [DEMO / "pool.jsonl", *sorted((DEMO / "targets").glob("*.jsonl"))]
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def _reference(path: Path):
    pytest.importorskip("torch")  # transformers reads GGUF metadata through torch
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _assert_same(mine, ref, texts, conversations):
    assert len(mine) == len(ref)
    assert mine.all_special_tokens == ref.all_special_tokens and mine.all_special_ids == ref.all_special_ids
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(mine, name) == getattr(ref, name), name
    assert mine.added_tokens_decoder == ref.added_tokens_decoder
    for special in (False, True):
        a = mine(texts, add_special_tokens=special, return_offsets_mapping=True)
        b = ref(texts, add_special_tokens=special, return_offsets_mapping=True)
        assert a["input_ids"] == b["input_ids"]
        assert a["offset_mapping"] == b["offset_mapping"]
    assert mine.batch_decode(a["input_ids"]) == ref.batch_decode(b["input_ids"])
    for msgs in conversations:
        for gen in (False, True):
            assert (mine.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                    == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen))
            assert (mine.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
                    == ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))


def test_smollm2_tokenizer_equals_transformers_gguf_loader(smollm2_path):
    ref = _reference(smollm2_path)
    records = _records()
    texts = [m["content"] for r in records for m in r["messages"]]
    texts += ["", " ", "  leading spaces", "tabs\tand\r\nnewlines\n\n", "<|im_start|>user\nhi<|im_end|>",
              "émoji 🙂 中文 ÿ", "x" * 3000]
    assert len(texts) > 1500
    _assert_same(gguf_tokenizer(smollm2_path), ref, texts, [r["messages"] for r in records[:300]])


def _write_gguf(path: Path, pre: str, add_bos: bool):
    """A tokenizer-only GGUF: a byte-level BPE trained on the demo pool, with control and user tokens."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|begin|>", "<|end|>", "<think>"], show_progress=False)
    numbers = [" ".join(str(i * 7919 % 100000) for i in range(2000))]  # digit merges: the split rules differ on them
    tk.train_from_iterator([m["content"] for r in _records()[:400] for m in r["messages"]] + numbers, trainer)
    spec = json.loads(tk.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    types = [3 if t in ("<|endoftext|>", "<|begin|>", "<|end|>") else 4 if t == "<think>" else 1 for t in tokens]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin|>"))
    w.add_eos_token_id(tokens.index("<|end|>"))
    # With no unknown token, transformers' GPT2Tokenizer would append one past the model's vocabulary.
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|end|>"))
    w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|begin|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|begin|>assistant\n{% endif %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre,add_bos", [("qwen2", False), ("llama-bpe", True), ("gpt2", False)])
def test_split_rules_and_bos_equal_transformers(tmp_path, pre, add_bos):
    path = _write_gguf(tmp_path / f"{pre}.gguf", pre, add_bos)
    ref = _reference(path)
    texts = ["Hello world's 12345 numbers!!\n\n  x", "I'll <think> it'S\r\n\tok", "日本語 ünïcödé 🙂", "a  b   c",
             *[m["content"] for r in _records()[400:500] for m in r["messages"]]]
    convs = [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok <think> 42"}] for t in texts[:20]]
    _assert_same(gguf_tokenizer(path), ref, texts, convs)


def test_the_main_path_needs_no_torch(tmp_path):
    """Load the embedded model and its tokenizer, tokenize and run it, with `import torch` failing."""
    program = """
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import jax.numpy as jnp
import idjax.models as M
from idjax import data
model, tok = M.load("smollm2-135m")
records = data.read_records(sys.argv[1], limit=4)
examples, _ = data.tokenize(records, tok, max_length=64)
(b,) = data.make_batches(examples, 4, (64,), pad_id=tok.pad_token_id)
print(model(jnp.asarray(b.input_ids), jnp.asarray(b.attention_mask)).shape)
"""
    env = {**os.environ, "IDJAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", program, str(DEMO / "pool.jsonl")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "(4, 64, 49152)"
    assert any((tmp_path / "cache" / "tokenizers").iterdir())  # built here, not read from a cache


def test_the_cached_tokenizer_equals_the_built_one(smollm2_path, tmp_path, monkeypatch):
    """load_tokenizer builds a GGUF tokenizer once, then reads it back from the cache by its class name."""
    from idjax.models import load_tokenizer

    monkeypatch.setenv("IDJAX_CACHE", str(tmp_path))
    built = load_tokenizer(smollm2_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    cached = load_tokenizer(smollm2_path)
    records = _records()[:200]
    texts = [m["content"] for r in records for m in r["messages"]] + ["", "émoji 🙂 中文", "<|im_start|>user\nhi"]
    _assert_same(cached, built, texts, [r["messages"] for r in records[:50]])
