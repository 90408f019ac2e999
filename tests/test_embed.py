"""JVP embeddings against finite differences and one-tangent-at-a-time references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from idjax import data
from idjax.embed import EmbedConfig, JVPEmbedder, jvp_embeddings, random_tangents, truncate
from idjax.models import CausalLM, ModelConfig

CFG = ModelConfig(
    model_type="qwen3", vocab_size=53, hidden_size=16, intermediate_size=32, num_layers=4,
    num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
)


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    exs = []
    for i, n in enumerate([5, 9, 12]):
        ids = rng.integers(1, CFG.vocab_size, n).astype(np.int32)
        exs.append(data.Example(i, str(i), None, ids, ids.copy(), False))
    (b,) = data.make_batches(exs, 4, (16,), pad_id=0)
    return b


def test_truncated_model_matches_first_blocks(model, batch):
    small = truncate(model, 2)
    ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)
    a, _ = small.hidden_states(ids, mask)
    b, _ = model.hidden_states(ids, mask, num_blocks=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="num_blocks"):
        truncate(model, 5)


def test_jvp_embeddings_equal_finite_differences(model, batch):
    emb = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=2, dim=4096, seed=3))
    assert emb.dim == 2 * CFG.hidden_size and emb.projection is None
    got = np.asarray(emb(batch)).reshape(4, 2, CFG.hidden_size)
    ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)

    last = np.asarray(batch.attention_mask).sum(1) - 1

    @jax.jit
    def f(p):  # every position through both blocks, then the last token's (not hidden_states(queries=))
        hidden, _ = nnx.merge(emb.graphdef, p, emb.rest).hidden_states(ids, mask)
        return hidden[np.arange(len(last)), last]

    eps = 1e-4  # tangents are N(0, 1) against weights of scale 0.02: keep the step small
    for k in range(2):
        v = jax.tree.map(lambda t: t[k], emb.tangents)
        plus = f(jax.tree.map(lambda p, t: p + eps * t, emb.params, v))
        minus = f(jax.tree.map(lambda p, t: p - eps * t, emb.params, v))
        fd = np.asarray((plus - minus) / (2 * eps))
        real = batch.sample_mask
        err = np.linalg.norm(fd[real] - got[real, k]) / np.linalg.norm(got[real, k])
        assert err < 3e-3, err  # measured ~1e-4; FD error falls as eps^2 down to this eps


def test_tangent_batching_equals_one_at_a_time(model, batch):
    emb = JVPEmbedder(model, EmbedConfig(num_blocks=3, num_tangents=3, seed=0))
    together = np.asarray(emb(batch))
    d = CFG.hidden_size
    for k in range(3):
        one = JVPEmbedder(model, EmbedConfig(num_blocks=3, num_tangents=1, seed=0))
        one.tangents = jax.tree.map(lambda t: t[k:k + 1], emb.tangents)
        np.testing.assert_allclose(np.asarray(one(batch)), together[:, k * d:(k + 1) * d], rtol=1e-5, atol=1e-5)


def test_last_token_embedding_skips_the_last_blocks_other_positions(model, batch):
    """The compiler's FLOP count of a one-block embedding (no scan, whose body it counts once): with the last
    token's features the block computes its queries and MLP at that token only, against every token for mean
    pooling; and the values are those of the block run at every position (the FD test's reference)."""
    small = truncate(model, 1)
    graphdef, params, rest = nnx.split(small, nnx.Param, ...)
    tangents = random_tangents(params, 2, 0)
    ids, mask = jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)

    def flops(pooling):
        fn = jax.jit(lambda p, t: jvp_embeddings((graphdef, rest), ids, mask, tangents=t, params=p, pooling=pooling))
        return fn.lower(params, tangents).compile().cost_analysis()["flops"]

    assert flops("last") < 0.4 * flops("mean")  # measured 0.19 at [4, 16]


def test_padding_and_projection(model, batch):
    emb = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=2, dim=8, seed=0))
    assert emb.dim == 8 and emb.projection.shape == (32, 8)
    raw = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=2, seed=0))
    projected = np.asarray(raw(batch)) @ np.asarray(emb.projection)  # entries up to ~300: float32 sums
    np.testing.assert_allclose(np.asarray(emb(batch)), projected, rtol=1e-5, atol=1e-6 * np.abs(projected).max())
    # The same sample in a wider bucket (more right padding) embeds identically.
    wide = data.Batch(*(np.pad(x, ((0, 0), (0, 16)), constant_values=c) for x, c in
                        ((batch.input_ids, 0), (batch.attention_mask, 0), (batch.labels, -100))),
                      batch.sample_mask, batch.indices, batch.positions, batch.total)
    real = batch.sample_mask
    np.testing.assert_allclose(np.asarray(raw(wide))[real], np.asarray(raw(batch))[real], rtol=1e-5, atol=1e-5)
    out = raw.run([batch])
    assert out.shape == (3, 32) and np.all(np.isfinite(out))


def test_second_embedder_reuses_the_compilation(model, batch):
    """Embedders of one model structure share a compiled function; the weights stay arguments."""
    cfg = EmbedConfig(num_blocks=2, num_tangents=2, seed=4)
    first = JVPEmbedder(model, cfg)
    a = np.asarray(first(batch))
    compiled = first._fn._cache_size()  # other tests may have compiled other shapes already
    other = JVPEmbedder(CausalLM(CFG, rngs=nnx.Rngs(9)), cfg)  # same structure, other weights
    b = np.asarray(other(batch))
    assert other._fn is first._fn and first._fn._cache_size() == compiled
    assert not np.allclose(a, b, atol=1e-3)  # not the first model's weights baked in as constants
    np.testing.assert_array_equal(np.asarray(JVPEmbedder(model, cfg)(batch)), a)
    assert JVPEmbedder(model, EmbedConfig(num_blocks=2, pooling="mean"))._fn is not first._fn


@pytest.fixture(scope="module")
def chat_batch():
    """Rows with a prompt part (labels -100) and a response part, right-padded in one bucket."""
    rng = np.random.default_rng(1)
    exs = []
    for i, (n, prompt) in enumerate([(6, 3), (11, 7), (14, 4)]):
        ids = rng.integers(1, CFG.vocab_size, n).astype(np.int32)
        labels = ids.copy()
        labels[:prompt] = -100
        exs.append(data.Example(i, str(i), None, ids, labels, False))
    (b,) = data.make_batches(exs, 4, (16,), pad_id=0)
    return b


def _pool_loop(hidden, ids_len, labels, pooling):
    """Independent reference: pool one row's hidden states [L, D] with an explicit position loop."""
    picked = []
    for t in range(ids_len):
        if pooling == "mean" or (pooling == "response" and t + 1 < ids_len and labels[t + 1] != -100):
            picked.append(hidden[t])
    return np.mean(picked, axis=0)


@pytest.mark.parametrize("pooling", ["mean", "response"])
def test_pooled_jvp_embeddings_equal_finite_differences(model, chat_batch, pooling):
    emb = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=2, seed=5, pooling=pooling))
    got = np.asarray(emb(chat_batch)).reshape(4, 2, CFG.hidden_size)
    ids, mask = jnp.asarray(chat_batch.input_ids), jnp.asarray(chat_batch.attention_mask)

    @jax.jit
    def hidden(p):  # all final-normed hidden states of the 2-block model, no pooling
        return nnx.merge(emb.graphdef, p, emb.rest).hidden_states(ids, mask)[0]

    eps = 1e-4
    lengths = chat_batch.attention_mask.sum(1)
    for k in range(2):
        v = jax.tree.map(lambda t: t[k], emb.tangents)
        plus = np.asarray(hidden(jax.tree.map(lambda p, t: p + eps * t, emb.params, v)), np.float64)
        minus = np.asarray(hidden(jax.tree.map(lambda p, t: p - eps * t, emb.params, v)), np.float64)
        fd_hidden = (plus - minus) / (2 * eps)
        for r in np.flatnonzero(chat_batch.sample_mask):
            ref = _pool_loop(fd_hidden[r], lengths[r], chat_batch.labels[r], pooling)
            err = np.linalg.norm(ref - got[r, k]) / np.linalg.norm(ref)
            assert err < 3e-3, (pooling, k, r, err)


def test_pooling_differs_and_ignores_padding(model, chat_batch):
    outs = {}
    for pooling in ("last", "mean", "response"):
        emb = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=1, seed=0, pooling=pooling))
        outs[pooling] = np.asarray(emb(chat_batch))
        wide = data.Batch(*(np.pad(x, ((0, 0), (0, 8)), constant_values=c) for x, c in
                            ((chat_batch.input_ids, 0), (chat_batch.attention_mask, 0), (chat_batch.labels, -100))),
                          chat_batch.sample_mask, chat_batch.indices, chat_batch.positions, chat_batch.total)
        real = chat_batch.sample_mask
        np.testing.assert_allclose(np.asarray(emb(wide))[real], outs[pooling][real], rtol=1e-5, atol=1e-5)
    real = chat_batch.sample_mask
    default = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=1, seed=0))
    np.testing.assert_array_equal(np.asarray(default(chat_batch))[real], outs["last"][real])
    assert not np.allclose(outs["mean"][real], outs["last"][real])
    assert not np.allclose(outs["response"][real], outs["mean"][real])
    with pytest.raises(ValueError, match="pooling"):
        EmbedConfig(pooling="max")


def test_public_jvp_embeddings_in_a_users_jit_and_vmap(model, chat_batch):
    """jvp_embeddings on arrays, in a caller's jit with the model as a (graphdef, state) pair, equals the
    shell; vmapped over tangent sets it equals one call per set (one jvp per tangent)."""
    small = truncate(model, 2)
    graphdef, state = nnx.split(small)
    ids, mask, labels = (jnp.asarray(x) for x in (chat_batch.input_ids, chat_batch.attention_mask, chat_batch.labels))
    emb = JVPEmbedder(model, EmbedConfig(num_blocks=2, num_tangents=2, dim=8, seed=6, pooling="response"))
    fn = jax.jit(lambda m, t, p: jvp_embeddings(m, ids, mask, labels, tangents=t, projection=p, pooling="response"))
    got = fn((graphdef, state), emb.tangents, emb.projection)
    real = chat_batch.sample_mask
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(emb(chat_batch))[real], rtol=1e-5, atol=1e-6)
    # Only the MLP weights move: tangents over that selection, vmapped over three seeds.
    _, sel, _ = nnx.split(small, lambda path, v: "mlp" in map(str, path), ...)
    sets = jax.tree.map(lambda *t: jnp.stack(t), *[random_tangents(sel, 1, seed) for seed in range(3)])
    together = jax.jit(jax.vmap(lambda t: jvp_embeddings(small, ids, mask, tangents=t, params="mlp")))(sets)
    for seed in range(3):
        one = jvp_embeddings(small, ids, mask, tangents=random_tangents(sel, 1, seed), params="mlp")
        np.testing.assert_allclose(np.asarray(together[seed]), np.asarray(one), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(together[0]), np.asarray(together[1]))
