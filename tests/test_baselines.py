"""Baselines (docs/method.md 9) against independent references: the PyTorch HF model and plain loops."""

import numpy as np
import pytest
import torch

import idjax.models as M
from idjax import baselines, data
from conftest import random_examples, tiny_llama

VOCAB = 97


def _examples(n, seed, prefix):
    return random_examples(n, seed, prefix, vocab=VOCAB, lengths=(5, 9, 14, 20))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf, path = tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", vocab=VOCAB, seed=1)
    model, _ = M.load(path, tokenizer=False)
    return hf, model


def _torch_rds(hf, ex):
    with torch.no_grad():
        h = hf.model(input_ids=torch.tensor(ex.input_ids[None], dtype=torch.long)).last_hidden_state[0].double()
    w = torch.arange(1, h.shape[0] + 1, dtype=torch.float64)
    return ((w / w.sum())[:, None] * h).sum(0).numpy()


def _torch_loss(hf, ex):
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(ex.input_ids[None], dtype=torch.long)).logits[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ex.labels[1:], dtype=torch.long),
                                                   ignore_index=-100))


def test_features_match_torch_one_sample_at_a_time(tiny, tmp_path):
    hf, model = tiny
    pool = _examples(11, 0, "p")                      # several lengths, padded batches of 4
    rds = baselines.sample_features(model, pool, "rds", batch_size=4)
    loss = baselines.sample_features(model, pool, "loss", batch_size=4, store_dir=tmp_path, chunk_rows=4)
    np.testing.assert_allclose(rds, np.stack([_torch_rds(hf, e) for e in pool]), atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(loss[:, 0], [_torch_loss(hf, e) for e in pool], atol=2e-5, rtol=1e-5)
    again = baselines.sample_features(model, pool, "loss", batch_size=4, store_dir=tmp_path, chunk_rows=4)
    np.testing.assert_array_equal(again, loss)        # read back from the store


def test_mid_ppl_takes_the_middle_of_the_sorted_losses():
    rng = np.random.default_rng(0)
    losses = rng.permutation(np.r_[rng.normal(size=40), [0.5] * 5])  # with ties
    k = 9
    ranked = sorted(range(len(losses)), key=lambda i: (losses[i], i))
    start = (len(losses) - k) // 2
    assert baselines.mid_ppl_rows(losses, k).tolist() == ranked[start:start + k]
    assert baselines.mid_ppl_rows(losses, len(losses)).tolist() == ranked


def _round_robin_reference(cols, k, seed):
    """Independent loop: round r visits the targets in the order permutation(fold_in(key(seed), r)), each
    takes its best free row."""
    import jax

    taken, owner = [], []
    rnd = 0
    while len(taken) < k:
        order = jax.random.permutation(jax.random.fold_in(jax.random.key(seed), rnd), cols.shape[1])
        rnd += 1
        for j in np.asarray(order):
            free = [i for i in np.argsort(-cols[:, j], kind="stable") if i not in taken]
            taken.append(int(free[0]))
            owner.append(int(j))
            if len(taken) == k:
                break
    return taken, owner


def test_rds_is_round_robin_over_torch_cosines(tiny):
    hf, model = tiny
    pool, targets = _examples(23, 1, "p"), _examples(3, 2, "t")
    sel = baselines.select_baseline("rds", model, pool, targets, 7, seed=3, batch_size=4)
    e = np.stack([_torch_rds(hf, x) for x in pool])
    t = np.stack([_torch_rds(hf, x) for x in targets])
    cols = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    rows, owners = _round_robin_reference(cols, 7, 3)
    assert sel.rows.tolist() == rows
    assert sel.owners == [targets[j].id for j in owners]
    np.testing.assert_allclose(sel.scores, cols.max(axis=1), atol=1e-5)
    np.testing.assert_allclose(sel.weights[sel.rows], 1 / 7)
    assert sel.weights.sum() == pytest.approx(1.0)


def test_random_full_mid_ppl_and_errors(tiny):
    _, model = tiny
    pool, targets = _examples(15, 4, "p"), _examples(2, 5, "t")
    a = baselines.select_baseline("random", model, pool, targets, 5, seed=7)
    b = baselines.select_baseline("random", model, pool, targets, 5, seed=7)
    c = baselines.select_baseline("random", model, pool, targets, 5, seed=8)
    assert a.rows.tolist() == b.rows.tolist() != c.rows.tolist()
    assert len(set(a.rows.tolist())) == 5
    full = baselines.select_baseline("full", model, pool, targets, 3)
    assert full.rows.tolist() == list(range(15)) and full.weights.sum() == pytest.approx(1.0)
    mid = baselines.select_baseline("mid-ppl", model, pool, targets, 5)
    losses = baselines.sample_features(model, pool, "loss")[:, 0]
    assert mid.rows.tolist() == baselines.mid_ppl_rows(losses, 5).tolist()
    with pytest.raises(ValueError, match="between 1 and the pool size 15"):
        baselines.select_baseline("random", model, pool, targets, 16)
    with pytest.raises(ValueError, match="unknown method"):
        baselines.select_baseline("less", model, pool, targets, 3)
    with pytest.raises(data.DataError, match="target set is empty"):
        baselines.select_baseline("rds", model, pool, [], 3)
