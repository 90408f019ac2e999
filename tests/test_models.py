"""Golden tests: idjax's NNX decoder against transformers' PyTorch models, and checkpoint I/O."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import idjax.models as M
from idjax.models.params import CheckpointError

TINY = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
VARIANTS = {
    "llama": (transformers.LlamaConfig, dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama-tied-llama3rope-bias": (
        transformers.LlamaConfig,
        dict(
            tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=32),
        ),
    ),
    "llama-linear-rope-mha": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=4, rope_scaling=dict(rope_type="linear", factor=2.0)),
    ),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=24, tie_word_embeddings=False)),
}


def make_hf(variant, tmp_path, seed=0):
    cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = cls(**{**TINY, **extra})
    hf = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # HF zero/one-initialises some tensors: randomise so every weight is tested
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / variant
    hf.save_pretrained(path)
    return hf, path


def padded_batch(rng, lengths, width, side, vocab):
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        tokens = rng.integers(1, vocab, n)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, sl], mask[i, sl] = tokens, 1
    return ids, mask


def hf_logits(hf, ids, mask):
    # idjax derives positions from the mask; give HF the same (as its generate() does).
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(variant, side, tmp_path):
    hf, path = make_hf(variant, tmp_path)
    model, tok = M.load(path, tokenizer=False)
    assert tok is None
    rng = np.random.default_rng(1)
    ids, mask = padded_batch(rng, [7, 12, 3], 12, side, TINY["vocab_size"])
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["llama-tied-llama3rope-bias", "qwen3"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_last_layer_at_query_positions_matches_transformers(variant, side, tmp_path):
    """hidden_states(queries=): the last layer's queries and MLP at a few positions per row only."""
    hf, path = make_hf(variant, tmp_path)
    model, _ = M.load(path, tokenizer=False)
    ids, mask = padded_batch(np.random.default_rng(3), [7, 12, 3], 12, side, TINY["vocab_size"])
    ref = hf_logits(hf, ids, mask)
    first = np.argmax(mask, axis=1)
    queries = np.stack([first, first + 2, np.full(3, 11)], axis=1)  # position 11: padding in some rows
    for remat in (False, True):
        model.remat = remat
        hidden, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), queries=jnp.asarray(queries))
        assert hidden.shape == (3, 3, TINY["hidden_size"])
        ours = np.asarray(model.logits(hidden))
        want = np.take_along_axis(ref, queries[..., None], axis=1)
        real = np.take_along_axis(mask, queries, axis=1).astype(bool)
        np.testing.assert_allclose(ours[real], want[real], atol=1e-4, rtol=0)
    model.remat = False
    short, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), num_blocks=1, queries=jnp.asarray(queries))
    whole, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), num_blocks=1)
    np.testing.assert_allclose(np.asarray(short), np.take_along_axis(np.asarray(whole), queries[..., None], 1),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cache"):
        model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), queries=jnp.asarray(queries),
                            cache=M.KVCache.empty(model.config, 3, 16, jnp.float32))


def test_padding_does_not_change_real_tokens(tmp_path):
    _, path = make_hf("qwen3", tmp_path)
    model, _ = M.load(path, tokenizer=False)
    rng = np.random.default_rng(2)
    ids, mask = padded_batch(rng, [9], 9, "right", TINY["vocab_size"])
    alone = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[0]
    left = np.zeros((1, 16), np.int64)
    left[0, 7:] = ids[0]
    lmask = (left != 0).astype(np.int64)
    lmask[0, 7:] = 1
    shifted = np.asarray(model(jnp.asarray(left), jnp.asarray(lmask)))[0, 7:]
    np.testing.assert_allclose(shifted, alone, atol=1e-5)


def test_save_load_round_trip_is_exact_and_loads_in_pytorch(tmp_path):
    hf, path = make_hf("qwen2", tmp_path)
    model, _ = M.load(path, tokenizer=False)
    out = M.save(model, tmp_path / "saved")
    again, _ = M.load(out, tokenizer=False)
    a = jax.tree.leaves(jax.tree.map(np.asarray, __import__("flax").nnx.state(model)))
    b = jax.tree.leaves(jax.tree.map(np.asarray, __import__("flax").nnx.state(again)))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert again.config == model.config
    # A PyTorch user loads what idjax wrote and gets the original model's logits bit-for-bit.
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids, mask = padded_batch(np.random.default_rng(3), [5, 8], 8, "right", TINY["vocab_size"])
    np.testing.assert_array_equal(hf_logits(back, ids, mask), hf_logits(hf, ids, mask))


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    from idjax.models.params import iter_hf_tensors, write_safetensors_dir

    hf, path = make_hf("llama", tmp_path)
    model, _ = M.load(path, tokenizer=False)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text(json.dumps(model.config.to_hf()))
    write_safetensors_dir(dict(iter_hf_tensors(model)), shard_dir, max_shard_bytes=40_000)
    index = json.loads((shard_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded, _ = M.load(shard_dir, tokenizer=False)
    ids, mask = padded_batch(np.random.default_rng(4), [6, 6], 6, "right", TINY["vocab_size"])
    f32 = np.asarray(sharded(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(f32, hf_logits(hf, ids, mask), atol=1e-4)
    bf16, _ = M.load(shard_dir, dtype="bfloat16", tokenizer=False)
    assert bf16.embed_tokens.embedding[...].dtype == jnp.bfloat16
    low = np.asarray(bf16(jnp.asarray(ids), jnp.asarray(mask)))
    assert low.dtype == np.float32
    assert np.abs(low - f32).max() < 0.05 * np.abs(f32).max()


def test_kv_cache_generation_matches_full_recompute(tmp_path):
    _, path = make_hf("qwen3", tmp_path)
    model, _ = M.load(path, tokenizer=False)
    prompts = [[5, 9, 13], [7, 2, 3, 4, 11, 40, 41]]
    got = M.generate(model, prompts, max_new_tokens=6, eos_ids=[-5])
    for prompt, continuation in zip(prompts, got):
        seq = list(prompt)
        for _ in range(6):  # naive greedy: the full forward pass for every new token
            logits = model(jnp.asarray([seq]))
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert continuation == seq[len(prompt):]


def test_generation_stops_at_the_context(monkeypatch, caplog):
    """max_new_tokens past the context is capped with a warning, an over-long prompt keeps its end, the KV
    cache never has more slots than the context, and the tokens equal a naive full-recompute loop."""
    from flax import nnx

    from idjax.models import modeling

    context = 24
    model = M.CausalLM(M.ModelConfig(model_type="llama", vocab_size=97, hidden_size=16, intermediate_size=32,
                                     num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8,
                                     max_position_embeddings=context), rngs=nnx.Rngs(0))
    sizes = []
    real_empty = modeling.KVCache.empty
    monkeypatch.setattr(modeling.KVCache, "empty",
                        staticmethod(lambda c, b, n, d: sizes.append(n) or real_empty(c, b, n, d)))

    def naive(seq, steps):
        seq = list(seq)
        for _ in range(steps):
            seq.append(int(jnp.argmax(model(jnp.asarray([seq]))[0, -1])))
        return seq[-steps:]

    prompts = [[5, 9, 13], [7, 2, 3, 4, 11, 40, 41]]
    with caplog.at_level("WARNING", logger="idjax.models.generate"):
        got = M.generate(model, prompts, max_new_tokens=100_000, eos_ids=[-5])
    assert "max_new_tokens 100000 capped at 17" in caplog.text
    assert [len(g) for g in got] == [17, 17] and got[1] == naive(prompts[1], 17)
    caplog.clear()
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(1, 97, 40)]
    with caplog.at_level("WARNING", logger="idjax.models.generate"):
        (one,) = M.generate(model, [long_prompt], max_new_tokens=4, eos_ids=[-5])
    assert "a prompt of 40 tokens is longer than the model's context of 24" in caplog.text
    assert one == naive(long_prompt[-(context - 1):], 1)
    assert sizes and max(sizes) <= context


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        M.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        M.load(tmp_path / "empty")
    _, path = make_hf("llama", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(M.UnsupportedModelError, match="gpt2"):
        M.load(path, tokenizer=False)
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    with pytest.raises(CheckpointError, match="missing tensors: \\['model.layers.3"):
        M.load(path, tokenizer=False)
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(CheckpointError, match="shape"):
        M.load(path, tokenizer=False)
    (path / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(M.UnsupportedModelError, match="yarn"):
        M.load(path, tokenizer=False)


# ----------------------------------------------------------------------------- SmolLM2 (real)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    ).eval()


def test_smollm2_logits_match_transformers_gguf(smollm2, hf_smollm2):
    model, tok = smollm2
    texts = ["The quick brown fox jumps over the lazy dog.", "Influence distillation selects data."]
    enc = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, enc))
    ids = np.full((2, width), tok.pad_token_id, np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e)], mask[i, :len(e)] = e, 1
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = hf_logits(hf_smollm2, ids, mask)
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() < 1e-3


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    (answer,) = M.chat(model, tok, ["What is the capital of France?"], max_new_tokens=24)
    assert "Paris" in answer
