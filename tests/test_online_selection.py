"""README's "Online batch selection" example, run as written on a tiny model: the jitted step compiles
once, picks the top half of an independent reference (a loop of jax.grad, projected with the same
sketch), and lowers the target loss."""

import re
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idjax import data
from idjax.grads import sample_losses
from idjax.models import CausalLM, ModelConfig

README = Path(__file__).resolve().parents[1] / "README.md"
HEADING = "### Online batch selection"
CFG = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)


def readme_block() -> str:
    """The first python block after the subsection's heading."""
    text = README.read_text(encoding="utf-8")
    assert HEADING in text, f"README.md lost its {HEADING!r} subsection"
    return re.search(r"```python\n(.*?)```", text[text.index(HEADING):], flags=re.S).group(1)


def sample(i: int, rng, patterned: bool) -> data.Example:
    """A 4-token random prompt, then a response: an ascending run (the target task) or random tokens."""
    prompt = rng.integers(1, CFG.vocab_size, 4)
    n = int(rng.choice((6, 10)))
    start = int(rng.integers(1, CFG.vocab_size))
    response = (start + np.arange(n)) % (CFG.vocab_size - 1) + 1 if patterned else rng.integers(1, CFG.vocab_size, n)
    ids = np.concatenate([prompt, response]).astype(np.int32)
    labels = ids.copy()
    labels[:4] = data.IGNORE_INDEX
    return data.Example(i, f"s{i}", None, ids, labels, False)


def test_readme_online_selection_step():
    rng = np.random.default_rng(0)
    ns = {  # what README's earlier blocks define: the model, its tokenizer, the pool and the targets
        "model": CausalLM(CFG, rngs=nnx.Rngs(0)), "tok": SimpleNamespace(pad_token_id=0),
        "examples": [sample(i, rng, patterned=i % 2 == 0) for i in range(32)],
        "targets": [sample(100 + i, rng, patterned=True) for i in range(6)],
    }
    exec(compile(readme_block(), "README.md", "exec"), ns)
    assert len(ns["cands"]) == 8 and ns["traces"] == [1]
    before = float(ns["before"])
    assert float(ns["after"]) < before

    # Reference: each sample's own jax.grad on its unpadded tokens, in a Python loop, projected with the
    # README's sketch; the target direction is the mean of the target samples' gradients.
    graphdef, rest, sketch = ns["graphdef"], ns["rest"], ns["sketch"]

    @jax.jit
    def grad_one(p, ids, labels):
        loss = lambda q: sample_losses(nnx.merge(graphdef, q, rest), ids[None], jnp.ones_like(ids)[None],  # noqa: E731
                                       labels[None])[0]
        return jax.grad(loss)(p)

    def reference_scores(params, batch):
        chosen = [ns["targets"][p] for p in ns["tb"].positions if p >= 0]
        gt = [grad_one(params, ex.input_ids, ex.labels) for ex in chosen]
        g_t = sketch.project(jax.tree.map(lambda *x: sum(x) / len(x), *gt), normalize=True)
        rows = [ns["examples"][p] for p in batch.positions]
        return np.array([float(sketch.project(grad_one(params, ex.input_ids, ex.labels), normalize=True) @ g_t)
                         for ex in rows])

    # A second pass over the candidates, each step against the reference at the weights it starts from.
    params, opt_state = ns["params"], ns["opt_state"]
    for b in ns["cands"]:
        assert b.sample_mask.all()
        ref = reference_scores(params, b)
        params, opt_state, best, scores = ns["online_step"](params, ns["rest"], opt_state, b.input_ids,
                                                            b.attention_mask, b.labels, b.sample_mask, ns["target"])
        np.testing.assert_allclose(np.asarray(scores), ref, atol=2e-5)
        top = np.argsort(-ref)[: len(ref) // 2]
        assert sorted(np.asarray(best).tolist()) == sorted(top.tolist())
        gap = np.sort(ref)[::-1]
        assert gap[len(ref) // 2 - 1] - gap[len(ref) // 2] > 1e-4  # the reference's top half is unambiguous
    assert ns["traces"] == [1]  # sixteen steps, new data and new weights: still one compilation
    assert float(ns["mean_target_loss"]((graphdef, rest), ns["target"], params=params)) < float(ns["after"])
