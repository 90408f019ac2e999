"""Task recipes of the paper's experiments: GSM8k, MMLU, SQuAD, HumanEval.

Each recipe turns rows in the HF dataset's own format into
  - a target set: a few query samples as chat records, RDS+ style (selection's --target), and
  - an evaluation set: chat records with the gold answer (for the target loss) plus what the
    task metric needs (reference answer, options, unit tests).
Rows come from a local file in the HF format (JSONL, JSON or Parquet; a directory holds one file
per split) or, when online, from the HF hub. The pool is Tulu V2 (`allenai/tulu-v2-sft-mixture`),
which data.read_records reads as it is.

Target-set choices (documented because the paper leaves them open): GSM8k, the first 8 train
problems with their chain-of-thought answers; MMLU, the dev split (5 per subject); SQuAD, the first
500 train questions with their context; HumanEval (one split only), the first 10 problems with
their canonical solutions, which are then left out of the evaluation set.

This module only reads and builds tasks; their metrics (Task.score) are evaluate.score_task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from idjax.data import DataError

log = logging.getLogger(__name__)

_LETTERS = "ABCDEFGHIJ"
_CALC = re.compile(r"<<[^<>]*>>")  # GSM8k calculator annotations: noise for a language model


# ----------------------------------------------------------------------------- reading rows


def _field_error(where: str, fld: str, msg: str) -> DataError:
    return DataError(f"{where}: field '{fld}': {msg}")


def _file_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a JSONL / JSON array / Parquet file; `where` is 'file:line'."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"{path}:{i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return [(f"{path}:{i}", r) for i, r in enumerate(json.loads(text), 1)]
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: field '<row>': malformed JSON: {e.msg} (column {e.colno})") from None
    return rows


def _split_file(directory: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".json", ".parquet"):
        for name in (f"{split}{suffix}", f"{split}-00000-of-00001{suffix}"):
            if (directory / name).is_file():
                return directory / name
    return None


def read_rows(source: str | os.PathLike | None, split: str, hub: tuple[str, str | None]) -> list[tuple[str, dict]]:
    """Rows of one split: a local file, a directory with `<split>.jsonl|json|parquet`, or the HF hub."""
    if source is not None:
        p = Path(source)
        if p.is_dir():
            f = _split_file(p, split)
            if f is None:
                raise DataError(f"{p}: no file for split {split!r} (expected {split}.jsonl, .json or .parquet)")
            p = f
        elif not p.exists():
            raise DataError(f"{p}: path does not exist")
        rows = _file_rows(p)
        if not rows:
            raise DataError(f"{p}: contains no rows")
        return rows
    name, config = hub
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # offline, no such dataset or split: all mean "cannot read it"
        raise DataError(f"could not load {name}{'/' + config if config else ''} split {split!r} from the HF hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline machines must "
                        "pass a local file in the dataset's format") from e
    return [(f"{name}:{split}:{i}", dict(r)) for i, r in enumerate(ds, 1)]


def _need(where: str, row: Any, fields: dict[str, type | tuple]) -> dict:
    if not isinstance(row, dict):
        raise _field_error(where, "<row>", f"expected an object, got {type(row).__name__}")
    for f, typ in fields.items():
        v = row.get(f)
        if v is None or not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
            got = "missing" if v is None else f"{type(v).__name__} {str(v)[:40]!r}"
            want = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
            raise _field_error(where, f, f"expected {want}, got {got}")
    return row


# ----------------------------------------------------------------------------- the task object


@dataclasses.dataclass
class EvalItem:
    """One evaluation question: the prompt conversation and what its metric compares against."""

    id: str
    prompt: list[dict]  # messages up to the assistant's answer
    answer: str  # the gold assistant message (its loss is the target loss)
    reference: Any = None  # gsm8k: final number; mmlu: option index; squad: gold answers; humaneval: test dict
    options: list[str] | None = None


@dataclasses.dataclass
class Task:
    """A target set for selection and an evaluation set with its metric."""

    name: str
    metric: str
    target: list[dict]  # chat records {"id", "messages", "task"}
    items: list[EvalItem]

    @property
    def eval_records(self) -> list[dict]:
        """The evaluation questions with their gold answers, as chat records (for the target loss)."""
        return [{"id": it.id, "messages": it.prompt + [{"role": "assistant", "content": it.answer}],
                 "task": self.name} for it in self.items]

    def score(self, model, tokenizer, **kw) -> dict:
        """The task metric(s) of `model`, e.g. {"exact_match": 0.25} (evaluate.score_task)."""
        from idjax.evaluate import score_task  # imported here: evaluation builds on tasks, not the reverse

        return score_task(self, model, tokenizer, **kw)


def _take(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


# ----------------------------------------------------------------------------- GSM8k

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.0' -> '18'; None when it is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return None
    if not math.isfinite(v):
        return None
    return str(int(v)) if v == int(v) else repr(v)


def gsm8k_answer(text: str) -> str | None:
    """The final number of a GSM8k-style answer: the text after the last '####', else the last number."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        nums = _NUMBER.findall(tail)
        if nums:
            return normalize_number(nums[0])
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None



def _gsm8k_item(where: str, row: dict, id_: str) -> EvalItem:
    row = _need(where, row, {"question": str, "answer": str})
    if "####" not in row["answer"]:
        raise _field_error(where, "answer", "has no '#### <final answer>' line (not the GSM8k format)")
    answer = _CALC.sub("", row["answer"]).strip()
    return EvalItem(id_, [{"role": "user", "content": row["question"].strip()}], answer, gsm8k_answer(answer))


# ----------------------------------------------------------------------------- MMLU


def _mmlu_item(where: str, row: dict, id_: str) -> EvalItem:
    row = _need(where, row, {"question": str, "subject": str, "choices": (list, tuple), "answer": (int, str)})
    choices = list(row["choices"])
    if not 2 <= len(choices) <= len(_LETTERS) or not all(isinstance(c, str) for c in choices):
        raise _field_error(where, "choices", f"expected 2-{len(_LETTERS)} strings, got {choices!r}"[:200])
    ans = row["answer"]
    idx = _LETTERS.index(ans.strip().upper()) if isinstance(ans, str) and ans.strip().upper() in _LETTERS \
        else ans if isinstance(ans, int) else -1
    if not 0 <= idx < len(choices):
        raise _field_error(where, "answer", f"expected an option index 0-{len(choices) - 1} or a letter, got {ans!r}")
    letters = _LETTERS[:len(choices)]
    subject = row["subject"].replace("_", " ")
    text = (f"The following is a multiple choice question about {subject}.\n\n{row['question'].strip()}\n"
            + "".join(f"{letter}. {c}\n" for letter, c in zip(letters, choices))
            + "Answer with the letter of the correct option.")
    return EvalItem(id_, [{"role": "user", "content": text}], letters[idx], idx, list(letters))


# ----------------------------------------------------------------------------- SQuAD


def _squad_item(where: str, row: dict, id_: str) -> EvalItem:
    row = _need(where, row, {"id": (str, int), "context": str, "question": str, "answers": dict})
    texts = row["answers"].get("text")
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise _field_error(where, "answers.text", f"expected a non-empty list of strings, got {texts!r}"[:200])
    text = (f"{row['context'].strip()}\n\nAnswer the question with a short span from the passage above.\n"
            f"Question: {row['question'].strip()}")
    return EvalItem(f"squad-{row['id']}", [{"role": "user", "content": text}], texts[0], list(texts))


# ----------------------------------------------------------------------------- HumanEval


def _humaneval_item(where: str, row: dict, id_: str) -> EvalItem:
    row = _need(where, row, {"task_id": str, "prompt": str, "canonical_solution": str, "test": str,
                             "entry_point": str})
    user = f"Complete the following Python function.\n\n```python\n{row['prompt']}```"
    answer = f"```python\n{row['prompt']}{row['canonical_solution']}```"
    ref = {k: row[k] for k in ("prompt", "test", "entry_point")}
    return EvalItem(row["task_id"], [{"role": "user", "content": user}], answer, ref)


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Recipe:
    hub: tuple[str, str | None]
    target_split: str | None  # None: the target is cut from the evaluation split
    eval_split: str
    n_target: int | None  # None: the whole target split
    metric: str
    item: Callable[[str, dict, str], EvalItem]


RECIPES: dict[str, Recipe] = {
    "gsm8k": Recipe(("openai/gsm8k", "main"), "train", "test", 8, "exact_match", _gsm8k_item),
    "mmlu": Recipe(("cais/mmlu", "all"), "dev", "test", None, "accuracy", _mmlu_item),
    "squad": Recipe(("rajpurkar/squad", None), "train", "validation", 500, "f1", _squad_item),
    "humaneval": Recipe(("openai/openai_humaneval", None), None, "test", 10, "pass@1", _humaneval_item),
}
TASKS = tuple(RECIPES)


def _items(recipe: Recipe, name: str, split: str, rows: list[tuple[str, dict]]) -> list[EvalItem]:
    items = [recipe.item(where, row, f"{name}-{split}-{i}") for i, (where, row) in enumerate(rows)]
    seen: set[str] = set()
    for (where, _), it in zip(rows, items):
        if it.id in seen:
            raise _field_error(where, "id", f"duplicate id {it.id!r}")
        seen.add(it.id)
    return items


def load_task(name: str, data: str | os.PathLike | None = None, *, target: str | os.PathLike | None = None,
              n_target: int | None = None, limit: int | None = None, subjects: list[str] | None = None,
              with_target: bool = True) -> Task:
    """Build task `name` from local files in the HF format, or from the HF hub when `data` is None.

    data: the evaluation split (a file), or a directory with one file per split. target: the
    target split's file; without it, a directory's target-split file, else the hub's target split;
    when neither exists (a lone local file, or HumanEval), the target is the first n_target rows of
    the evaluation file and they are left out of the evaluation set. limit: keep the first `limit`
    evaluation items. subjects (MMLU): keep only these subjects. with_target=False: evaluation
    only (every row is evaluated, nothing is read or cut for a target set).
    """
    key = name.lower()
    if key not in RECIPES:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    rec = RECIPES[key]
    n_target = rec.n_target if n_target is None else n_target
    eval_rows = read_rows(data, rec.eval_split, rec.hub)
    if subjects is not None:
        eval_rows = [(w, r) for w, r in eval_rows if isinstance(r, dict) and r.get("subject") in subjects]
    items = _items(rec, key, rec.eval_split, eval_rows)
    if not with_target:
        items = items if limit is None else items[:limit]
        if not items:
            raise DataError(f"task {key}: empty evaluation set")
        return Task(key, rec.metric, [], items)

    target_rows = None
    if target is not None:
        target_rows = read_rows(target, rec.target_split or rec.eval_split, rec.hub)
    elif rec.target_split is not None:
        local_dir = data is not None and Path(data).is_dir()
        if data is None or (local_dir and _split_file(Path(data), rec.target_split)):
            target_rows = read_rows(data, rec.target_split, rec.hub)
    if target_rows is not None:
        if subjects is not None:
            target_rows = [(w, r) for w, r in target_rows if isinstance(r, dict) and r.get("subject") in subjects]
        target_items = _take(_items(rec, key, rec.target_split or rec.eval_split, target_rows), n_target)
    else:
        k = len(items) - 1 if n_target is None else min(n_target, len(items) - 1)
        if k < 1:
            raise DataError(f"{data}: {len(items)} rows cannot give both a target set and an evaluation set")
        target_items, items = items[:k], items[k:]
        log.info("%s: the first %d rows of %s are the target set, the other %d the evaluation set",
                 key, k, data or rec.hub[0], len(items))
    if limit is not None:
        items = items[:limit]
    if not target_items or not items:
        raise DataError(f"task {key}: empty {'target' if not target_items else 'evaluation'} set")
    target_records = [{"id": it.id, "messages": it.prompt + [{"role": "assistant", "content": it.answer}],
                       "task": key} for it in target_items]
    return Task(key, rec.metric, target_records, items)


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write chat records (e.g. a task's target set for `idjax select --target`)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return p
