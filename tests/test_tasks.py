"""Task recipes from local files in the HF datasets' exact formats, the Tulu V2 pool, and a real
fine-tune: SmolLM2-135M on pool rows lowers its loss."""

import json
from pathlib import Path

import pytest

from idjax import data as D
from idjax import evaluate as E
from idjax import tasks as K
from idjax.data import DataError

TASKS = Path(__file__).parent / "fixtures" / "tasks"


def rows(name):
    return [json.loads(x) for x in (TASKS / name).read_text().splitlines() if x.strip()]


def write(path, items):
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def test_gsm8k_from_one_file_cuts_target_from_the_front():
    t = K.load_task("gsm8k", TASKS / "gsm8k.jsonl", n_target=2)
    assert t.metric == "exact_match" and len(t.target) == 2 and len(t.items) == 4
    first = t.target[0]
    assert first["task"] == "gsm8k" and [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert "<<" not in first["messages"][1]["content"] and first["messages"][1]["content"].endswith("#### 10")
    assert [it.reference for it in t.items] == ["105", "7", "850", "150"]
    assert {r["id"] for r in t.target}.isdisjoint(it.id for it in t.items)
    assert K.load_task("gsm8k", TASKS / "gsm8k.jsonl", n_target=2, limit=1).items == t.items[:1]
    whole = K.load_task("gsm8k", TASKS / "gsm8k.jsonl", with_target=False)  # `idjax eval`: every row
    assert whole.target == [] and len(whole.items) == 6


def test_gsm8k_target_file_and_score(monkeypatch):
    t = K.load_task("gsm8k", TASKS / "gsm8k.jsonl", target=TASKS / "gsm8k.jsonl", n_target=3)
    assert len(t.target) == 3 and len(t.items) == 6  # a separate target file leaves the eval set whole
    canned = ["so #### 10", "16", "it is 100", "#### 7", "850 stamps", "no idea"]
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: canned)
    assert t.score(None, None) == {"exact_match": pytest.approx(4 / 6)}


def test_mmlu_directory_with_dev_and_test_splits(monkeypatch):
    t = K.load_task("mmlu", TASKS / "mmlu")
    assert t.metric == "accuracy" and len(t.target) == 3 and len(t.items) == 5
    it = t.items[2]
    user = it.prompt[0]["content"]
    assert "about astronomy" in user and "\nB. Jupiter\n" in user
    assert it.options == ["A", "B", "C", "D"] and it.reference == 1 and it.answer == "B"
    assert t.target[0]["messages"][1]["content"] == "B"
    only = K.load_task("mmlu", TASKS / "mmlu", subjects=["astronomy"])
    assert len(only.target) == 1 and len(only.items) == 2
    seen = {}

    def fake_mc(model, tok, prompts, options, answers, batch_size):
        seen.update(prompts=prompts, options=options, answers=answers)
        return {"accuracy": 0.4, "predictions": []}

    monkeypatch.setattr(E, "multiple_choice_accuracy", fake_mc)
    assert t.score(None, None) == {"accuracy": 0.4}
    assert seen["answers"] == [0, 2, 1, 3, 1] and seen["options"][0] == ["A", "B", "C", "D"]


def test_squad_rows_and_f1(monkeypatch):
    t = K.load_task("squad", TASKS / "squad.jsonl", n_target=1)
    assert t.metric == "f1" and len(t.target) == 1 and len(t.items) == 4
    it = t.items[0]
    assert it.id == "squad-sq002" and it.reference == ["The Nile"]
    assert "Question: Which river" in it.prompt[0]["content"]
    assert "The Nile is often regarded" in it.prompt[0]["content"]
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: ["Nile", "in 1937", "eight", "Antarctic"])
    got = t.score(None, None)
    # EM: Nile, Antarctic -> 2/4; F1: 1, 2/3 ("in 1937" vs "1937"), 2/3 ("eight" vs "eight years"), 1
    assert got["exact_match"] == pytest.approx(50.0)
    assert got["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3 + 1) / 4)


def test_humaneval_canonical_solutions_pass(monkeypatch):
    t = K.load_task("humaneval", TASKS / "humaneval.jsonl", n_target=1)
    assert t.metric == "pass@1" and [r["id"] for r in t.target] == ["HumanEval/0"]
    assert [it.id for it in t.items] == ["HumanEval/1", "HumanEval/2", "HumanEval/3"]
    with pytest.raises(ValueError, match="allow_code_execution"):
        t.score(None, None)
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: [it.answer for it in t.items])
    assert t.score(None, None, allow_code_execution=True) == {"pass@1": 1.0}
    wrong = ["    return 0\n", "```python\ndef is_even(n):\n    return n % 2 == 0\n```", "    return s\n"]
    monkeypatch.setattr(E, "generate_answers", lambda *a, **k: wrong)
    assert t.score(None, None, allow_code_execution=True) == {"pass@1": pytest.approx(1 / 3)}


@pytest.mark.parametrize("task, row, where", [
    ("gsm8k", {"question": "q", "answer": "no final line"}, "field 'answer': has no '####"),
    ("gsm8k", {"question": 3, "answer": "#### 1"}, "field 'question': expected str"),
    ("mmlu", {"question": "q", "subject": "s", "choices": ["a", "b"], "answer": 5}, "field 'answer'"),
    ("mmlu", {"question": "q", "subject": "s", "choices": "ab", "answer": 0}, "field 'choices'"),
    ("squad", {"id": "x", "context": "c", "question": "q", "answers": {"text": [], "answer_start": []}},
     "field 'answers.text'"),
    ("humaneval", {"task_id": "t", "prompt": "p", "test": "t", "entry_point": "f"}, "field 'canonical_solution'"),
])
def test_bad_rows_name_file_line_and_field(tmp_path, task, row, where):
    good = {"gsm8k": rows("gsm8k.jsonl")[0], "mmlu": rows("mmlu/test.jsonl")[0], "squad": rows("squad.jsonl")[0],
            "humaneval": rows("humaneval.jsonl")[0]}[task]
    f = write(tmp_path / "bad.jsonl", [good, good | {"id": "other", "task_id": "other"}, row])
    with pytest.raises(DataError, match=f"bad.jsonl:3: {where}"):
        K.load_task(task, f, n_target=1)


def test_missing_sources_and_offline_hub(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        K.load_task("gsm8k", tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="no file for split 'test'"):
        K.load_task("mmlu", tmp_path)
    with pytest.raises(DataError, match="cannot give both"):
        K.load_task("gsm8k", write(tmp_path / "one.jsonl", rows("gsm8k.jsonl")[:1]))
    with pytest.raises(ValueError, match="unknown task"):
        K.load_task("boolq", tmp_path)
    # conftest sets HF_HUB_OFFLINE=1: the hub is unreachable, and the error says what to do instead
    with pytest.raises(DataError, match="could not load openai/gsm8k/main.*local file"):
        K.load_task("gsm8k")


def test_tulu_pool_and_task_records_feed_the_pipeline(tmp_path, smollm2_tokenizer):
    pool = D.read_records(TASKS / "tulu_v2.jsonl")
    assert len(pool) == 16 and pool[0]["id"] == "flan_v2_0" and pool[0]["task"] == "flan_v2"
    t = K.load_task("squad", TASKS / "squad.jsonl", n_target=2)
    path = K.write_jsonl(tmp_path / "target.jsonl", t.target)
    again = D.read_records(path)
    assert again == t.target
    for recs in (again, t.eval_records, pool):
        exs, stats = D.tokenize(recs, smollm2_tokenizer, max_length=512)
        assert stats.n_kept == len(recs) and not stats.skipped_no_response


def test_smollm2_loss_decreases(smollm2):
    from idjax import train as T
    from idjax.optim import OptimizerSpec

    model, tok = smollm2
    exs, _ = D.tokenize(D.read_records(TASKS / "tulu_v2.jsonl"), tok, max_length=128)
    exs = [e for e in exs if len(e.input_ids) <= 64]
    assert len(exs) >= 12
    probe = exs[:8]
    before = E.target_loss(model, probe, batch_size=8, buckets=(64,), pad_id=tok.pad_token_id)["loss"]
    config = T.TrainConfig(OptimizerSpec("adamw", 1e-4, clip_norm=1.0), batch_size=4, steps=5, buckets=(64,))
    result = T.train(model, exs, config, tokenizer=tok, progress=False)
    after = E.target_loss(result.model, probe, batch_size=8, buckets=(64,), pad_id=tok.pad_token_id)["loss"]
    print(f"SmolLM2-135M: target loss {before:.4f} -> {after:.4f}; step losses",
          [round(r["loss"], 4) for r in result.history])
    assert after < 0.8 * before
