"""idjax.select against straightforward reference implementations."""

import jax
import numpy as np
import pytest

from idjax.select import (
    per_task, round_robin, task_budgets, token_budget_cap, top_k, top_k_lexicographic, within_token_budget,
)


def _permutations(key, t):
    """Round r's order of the t targets: jax.random.permutation(fold_in(key, r), t), r = 0, 1, ..."""
    r = 0
    while True:
        yield np.asarray(jax.random.permutation(jax.random.fold_in(key, r), t))
        r += 1


def _naive_round_robin(cols, k, seed, allowed):
    """The definition, with a full sort of every column."""
    taken, out = ~allowed.copy(), []
    orders = [sorted(range(len(cols)), key=lambda r: (-cols[r, j], r)) for j in range(cols.shape[1])]
    rounds = _permutations(jax.random.key(seed), cols.shape[1])
    while len(out) < k:
        for j in next(rounds):
            row = next(r for r in orders[j] if not taken[r])
            taken[row] = True
            out.append(row)
            if len(out) == k:
                break
    return np.asarray(out)


def test_top_k_matches_sort_with_ties_and_candidates():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 50).astype(np.float32)  # many ties
    cand = rng.random(50) > 0.3
    ref = [r for r in sorted(range(50), key=lambda r: (-s[r], r)) if cand[r]][:7]
    np.testing.assert_array_equal(top_k(s, 7, candidates=cand), ref)
    with pytest.raises(ValueError, match="larger than the pool"):
        top_k(s, int(cand.sum()) + 1, candidates=cand)
    with pytest.raises(ValueError, match="NaN"):
        top_k(np.array([1.0, np.nan]), 1)


def test_lexicographic_breaks_zero_weight_ties_by_score():
    w = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    s = np.array([9.0, 1.0, 3.0, 2.0, 5.0])
    np.testing.assert_array_equal(top_k_lexicographic(w, s, 4), [3, 1, 0, 4])


@pytest.mark.parametrize("n,t,k", [(30, 4, 12), (40, 1, 40), (25, 7, 5), (60, 3, 59)])
def test_round_robin_matches_definition(n, t, k):
    rng = np.random.default_rng(n + t + k)
    cols = rng.normal(size=(n, t)).round(1)  # ties across and within columns
    allowed = np.ones(n, bool)
    if k < n - 3:
        allowed[rng.choice(n, 3, replace=False)] = False
    got, owner = round_robin(cols, k, seed=5, candidates=allowed, return_owner=True)
    np.testing.assert_array_equal(got, _naive_round_robin(cols, k, 5, allowed))
    assert len(set(got.tolist())) == k and allowed[got].all()
    # each column's picks are in its own order, and owners take turns
    counts = np.bincount(owner, minlength=t)
    assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("t", [1, 2])
def test_round_robin_ties_at_the_depth_cut_go_to_lower_rows(t):
    """Each column ranks only its top k rows; rows tied with the k-th must be cut by row position."""
    rng = np.random.default_rng(t)
    for _ in range(5):
        cols = rng.normal(size=(120, t)).round(0)  # a few values, many ties at the cut
        allowed = rng.random(120) > 0.2
        got = round_robin(cols, 30, seed=2, candidates=allowed)
        np.testing.assert_array_equal(got, _naive_round_robin(cols, 30, 2, allowed))


def test_round_robin_visits_targets_in_a_seeded_random_order():
    cols = np.repeat(np.linspace(1, 0, 20)[:, None], 5, axis=1)  # identical targets
    r0, o0 = round_robin(cols, 10, seed=0, return_owner=True)
    r1, o1 = round_robin(cols, 10, seed=1, return_owner=True)
    np.testing.assert_array_equal(r0, np.arange(10))  # rows in global order whoever takes them
    assert sorted(o0[:5].tolist()) == list(range(5)) and sorted(o0[5:].tolist()) == list(range(5))
    assert o0.tolist() != o1.tolist()
    np.testing.assert_array_equal(round_robin(cols, 10, seed=0, return_owner=True)[1], o0)


def test_task_budgets_and_per_task():
    assert task_budgets(["b", "a", "b", "c"], 8) == {"a": 3, "b": 3, "c": 2}
    with pytest.raises(ValueError, match="smaller than the number of target tasks"):
        task_budgets(["a", "b", "c"], 2)
    rng = np.random.default_rng(3)
    cols = rng.normal(size=(40, 4))
    tasks = ["x", "y", "x", "y"]
    rows, owner = per_task(cols, tasks, 10)
    assert owner == ["x"] * 5 + ["y"] * 5 and len(set(rows.tolist())) == 10
    # x takes the top 5 of its mean; y the top 5 of its mean among what is left
    np.testing.assert_array_equal(rows[:5], top_k(cols[:, [0, 2]].mean(1), 5))
    left = np.ones(40, bool)
    left[rows[:5]] = False
    np.testing.assert_array_equal(rows[5:], top_k(cols[:, [1, 3]].mean(1), 5, candidates=left))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_budget_is_the_longest_prefix_within_the_budget(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 300, 50)
    order = rng.permutation(50)
    budget = int(rng.integers(300, 3000))
    want, total = [], 0
    for r in order:  # the definition: rows in selection order while the running total fits
        if total + tokens[r] > budget:
            break
        want.append(int(r))
        total += tokens[r]
    assert within_token_budget(order, tokens, budget).tolist() == want
    # the cap: the most rows any order fits, the shortest first; ranking that many rows is enough
    cap = token_budget_cap(tokens, budget)
    assert sum(sorted(tokens)[:cap]) <= budget < sum(sorted(tokens)[:cap + 1])
    assert within_token_budget(order[:cap], tokens, budget).tolist() == want
    with pytest.raises(ValueError, match="smaller than the shortest sample"):
        token_budget_cap(tokens, int(tokens.min()) - 1)
    with pytest.raises(ValueError, match="smaller than the first selected row"):
        within_token_budget(order, tokens, int(tokens[order[0]]) - 1)
