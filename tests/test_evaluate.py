"""Evaluation: target loss against a numpy loop, GSM8k extraction, SQuAD F1/EM by hand, multiple
choice against a brute-force loop, code execution, and `idjax eval`."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from idjax import data as D
from idjax import evaluate as E
from idjax.models import CausalLM, ModelConfig

TASKS = Path(__file__).parent / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def tok():
    from idjax.models import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2-135m"))


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random Llama over the SmolLM2 vocabulary."""
    config = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                         num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True,
                         eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    return CausalLM(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward(model):
    """One jitted forward at a fixed width (right padding leaves real tokens' logits unchanged)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, ids, mask: nnx.merge(graphdef, s)(ids, mask))

    def run(ids, width=128):
        x = np.zeros((1, width), np.int32)
        m = np.zeros((1, width), np.int32)
        x[0, :len(ids)], m[0, :len(ids)] = ids, 1
        return np.asarray(fn(state, x, m), np.float64)[0, :len(ids)]

    return run


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- loss


def test_target_loss_equals_a_numpy_loop(model, tok, forward):
    records = D.read_records(TASKS / "tulu_v2.jsonl")[:6]
    exs, _ = D.tokenize(records, tok, max_length=128)
    heads = D.bucket_heads(exs, D.example_buckets(exs))
    assert any(h < b - 1 for b, h in heads.items())  # the lm-head runs at fewer positions than the bucket's
    got = E.target_loss(model, exs, batch_size=4, pad_id=tok.pad_token_id)
    per, tot, cnt = [], 0.0, 0
    for e in exs:
        lp = log_softmax(forward(e.input_ids))
        nll = [-lp[t, e.labels[t + 1]] for t in range(len(e.input_ids) - 1) if e.labels[t + 1] != -100]
        per.append(np.mean(nll))
        tot, cnt = tot + np.sum(nll), cnt + len(nll)
    assert got["samples"] == len(exs) and got["tokens"] == cnt
    assert got["loss"] == pytest.approx(np.mean(per), rel=1e-5)
    assert got["token_loss"] == pytest.approx(tot / cnt, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(tot / cnt), rel=1e-5)
    with pytest.raises(D.DataError, match="nothing to evaluate"):
        E.target_loss(model, [])


# ----------------------------------------------------------------------------- answers and scores


@pytest.mark.parametrize("text, want", [
    ("Tom has 12 apples.\nAfter eating 2 he has 10.\n#### 10", "10"),
    ("so the total is 1,200 - 350 = 850\n#### 850", "850"),
    ("#### $1,234.50", "1234.5"),
    ("#### -7 apples (not 3)", "-7"),
    ("The answer is 18.00.", "18"),
    ("He pays 3 dollars, then 4, so 7.", "7"),
    ("no number here", None),
    ("Answer: 0.5", "0.5"),
])
def test_gsm8k_extractor(text, want):
    assert E.gsm8k_answer(text) == want


def test_exact_match_with_an_extractor():
    preds = ["so 5 + 5 = 10", "#### 7", "I think 3", "nothing"]
    refs = ["work\n#### 10", "#### 8", "#### 3", "#### 1"]
    assert E.exact_match(preds, refs, E.gsm8k_answer) == 0.5
    assert E.exact_match([" a "], ["a"]) == 1.0
    with pytest.raises(ValueError):
        E.exact_match(["a"], [])


def test_squad_normalisation_f1_and_em_by_hand():
    assert E.normalize_answer("The  Black-Sea, coast!") == "blacksea coast"
    # "the Black Sea coast" vs "Black Sea": tokens {black, sea, coast} vs {black, sea}
    # precision 2/3, recall 1 -> F1 = 2 * (2/3) / (5/3) = 0.8; EM 0
    assert E.squad_f1("the Black Sea coast", "Black Sea") == pytest.approx(0.8)
    assert E.squad_em("the Black Sea coast", "Black Sea") == 0.0
    assert E.squad_em("Nile!", "The Nile") == 1.0
    assert E.squad_f1("an apple", "banana") == 0.0
    # repeated tokens count with multiplicity: common = {red: 1, blue: 1}, P = R = 2/3
    assert E.squad_f1("red red blue", "red blue blue") == pytest.approx(2 / 3)
    got = E.squad_scores(["the Black Sea coast", "1937", "a bridge"],
                         [["the Black Sea", "Black Sea"], ["in 1937", "1937"], ["eight years"]])
    assert got["exact_match"] == pytest.approx(100 / 3)
    assert got["f1"] == pytest.approx(100 * (0.8 + 1.0 + 0.0) / 3)


# ----------------------------------------------------------------------------- multiple choice


def test_multiple_choice_matches_a_brute_force_loop(model, tok, forward):
    prompts = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Pick a colour.", "Capital of France?")]
    options = [["4", "5", "6", "7"], ["red", "green", "a shade of blue"], ["Paris", "Lyon"]]
    answers = [1, 2, 0]
    got = E.option_logliks(model, tok, prompts, options, batch_size=4)
    brute = []
    for msgs, opts in zip(prompts, options):
        ctx = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ctx_ids = tok(ctx, add_special_tokens=False)["input_ids"]
        row = []
        for o in opts:
            cont = tok(o, add_special_tokens=False)["input_ids"]
            lp = log_softmax(forward(ctx_ids + cont))
            row.append(sum(lp[len(ctx_ids) - 1 + k, c] for k, c in enumerate(cont)))
        brute.append(row)
    for g, b in zip(got, brute):
        np.testing.assert_allclose(g, b, rtol=1e-5, atol=1e-4)
    acc = E.multiple_choice_accuracy(model, tok, prompts, options, answers, batch_size=4)
    want = np.mean([int(np.argmax(b)) == a for b, a in zip(brute, answers)])
    assert acc["accuracy"] == pytest.approx(want)
    assert acc["predictions"] == [int(np.argmax(b)) for b in brute]


def test_generate_answers_pads_the_last_batch(model, tok):
    convs = [[{"role": "user", "content": f"Say {w}."}] for w in ("one", "two", "three")]
    out = E.generate_answers(model, tok, convs, max_new_tokens=3, batch_size=2)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert E.generate_answers(model, tok, convs[:1], max_new_tokens=3, batch_size=2) == out[:1]


# ----------------------------------------------------------------------------- code


def test_code_extraction_and_execution():
    prompt = "def add(a, b):\n    \"\"\"Sum.\"\"\"\n"
    test = "def check(f):\n    assert f(2, 3) == 5\n"
    body = E.extract_code("    return a + b\n", prompt, "add")
    assert body.startswith(prompt)
    assert E.run_python_tests(body + "\n" + test + "\ncheck(add)\n")
    fenced = E.extract_code("Here:\n```python\ndef add(a, b):\n    return a - b\n```\nDone.", prompt, "add")
    assert "return a - b" in fenced and not E.run_python_tests(fenced + "\n" + test + "\ncheck(add)\n")
    assert not E.run_python_tests("while True: pass", timeout=1.0)


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    from idjax.models import save

    return save(model, tmp_path_factory.mktemp("m") / "tiny", tok)


def run_cli(*argv):
    from idjax.cli import main

    return main([str(a) for a in argv])


def test_cli_eval_loss_matches_the_api(model_dir, model, tok, capsys):
    assert run_cli("eval", "--model", model_dir, "--data", TASKS / "tulu_v2.jsonl", "--batch-size", 4,
                   "--max-length", 128) == 0
    out = json.loads(capsys.readouterr().out)
    exs, _ = D.tokenize(D.read_records(TASKS / "tulu_v2.jsonl"), tok, max_length=128)
    ref = E.target_loss(model, exs, batch_size=4, pad_id=tok.pad_token_id)
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert out["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-6)
    assert out["samples"] == 16 and out["task"] is None


def test_cli_eval_mmlu_prints_loss_and_accuracy(model_dir, capsys):
    assert run_cli("eval", "--model", model_dir, "--data", TASKS / "mmlu", "--task", "mmlu",
                   "--batch-size", 4) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "accuracy" and 0.0 <= out["accuracy"] <= 1.0
    assert out["samples"] == 5 and out["loss"] > 0


@pytest.mark.parametrize("task, data, keys", [
    ("gsm8k", "gsm8k.jsonl", {"exact_match"}),
    ("squad", "squad.jsonl", {"exact_match", "f1"}),
])
def test_cli_eval_generated_answers(model_dir, task, data, keys, capsys):
    assert run_cli("eval", "--model", model_dir, "--data", TASKS / data, "--task", task, "--limit", 2,
                   "--batch-size", 2, "--max-new-tokens", 4) == 0
    out = json.loads(capsys.readouterr().out)
    assert keys <= set(out) and out["samples"] == 2 and out["task"] == task
    assert all(0 <= out[k] <= 100 for k in keys)


@pytest.mark.parametrize("argv, code, msg", [
    (["--data", "nope.jsonl"], 1, "does not exist"),
    ([], 2, "--data"),
    (["--task", "humaneval", "--data", TASKS / "humaneval.jsonl"], 2, "--allow-code-execution"),
    (["--task", "gsm8k", "--data", TASKS / "squad.jsonl"], 1, "squad.jsonl:1: field 'answer'"),
])
def test_cli_eval_errors(model_dir, argv, code, msg, capsys):
    assert run_cli("eval", "--model", model_dir, *argv) == code
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
