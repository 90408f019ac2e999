"""Evaluation: target loss / perplexity, generated-answer exact match, multiple choice, SQuAD F1.

Why these: the selection objective is the target loss (docs/method.md 1), so it is always reported;
the task metrics are what the paper's tables report (GSM8k exact match, MMLU accuracy by option
log-likelihood, SQuAD F1/EM, HumanEval pass@1). Every model call is jitted per length bucket.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import string
from functools import partial
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from idjax import data as D
from idjax.grads import hidden_loss_sums
from idjax.tasks import Task, gsm8k_answer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loss


@partial(jax.jit, static_argnums=0)
def _loss_sums(graphdef, state, ids, mask, labels, positions):
    """Per-row summed response-token loss and token count (float32); the lm-head at `positions` only."""
    model = nnx.merge(graphdef, state)
    return hidden_loss_sums(model, model.hidden_states(ids, mask)[0], labels, positions=positions)


def token_loss_sums(model, examples: Sequence[D.Example], *, batch_size: int = 8, buckets=None,
                    pad_id: int = 0, desc: str = "loss") -> tuple[np.ndarray, np.ndarray]:
    """(summed loss, response-token count) per example, in the order of `examples` (float64 on host). The
    lm-head runs at the loss positions of each bucket (data.bucket_heads), not at every position."""
    if not examples:
        raise D.DataError("nothing to evaluate: no examples")
    if buckets is None:
        buckets = D.example_buckets(examples)
    graphdef, state = nnx.split(model)

    def sums_counts(b):
        s, c = _loss_sums(graphdef, state, b.input_ids, b.attention_mask, b.labels, b.loss_positions)
        return np.stack([np.asarray(s, np.float64), np.asarray(c, np.float64)], axis=1)

    batches = D.make_batches(examples, batch_size, buckets, pad_id=pad_id, heads=D.bucket_heads(examples, buckets))
    out = D.collect_rows(batches, sums_counts, desc=desc)
    return out[:, 0], out[:, 1]


def target_loss(model, examples: Sequence[D.Example], *, batch_size: int = 8, buckets=None,
                pad_id: int = 0) -> dict:
    """{"loss": mean over samples of each sample's mean token loss (L_T, docs/method.md 1),
    "token_loss": mean over all response tokens, "perplexity": exp(token_loss), "samples", "tokens"}."""
    sums, counts = token_loss_sums(model, examples, batch_size=batch_size, buckets=buckets, pad_id=pad_id)
    per_sample = sums / np.maximum(counts, 1)
    token_loss = float(sums.sum() / max(counts.sum(), 1))
    return {"loss": float(per_sample.mean()), "token_loss": token_loss,
            "perplexity": float(math.exp(min(token_loss, 700.0))), "samples": len(examples),
            "tokens": int(counts.sum())}


# ----------------------------------------------------------------------------- answer extraction and scoring


def exact_match(predictions: Sequence[str], references: Sequence[str],
                extractor: Callable[[str], str | None] = lambda s: s.strip()) -> float:
    """Fraction of predictions whose extracted answer equals the reference's (None never matches)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return 0.0
    hits = 0
    for p, r in zip(predictions, references):
        a, b = extractor(p), extractor(r)
        hits += a is not None and a == b
    return hits / len(predictions)


def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def squad_f1(prediction: str, truth: str) -> float:
    """Token-overlap F1 between normalised answers (the official SQuAD v1.1 script)."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = collections.Counter(p) & collections.Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def squad_em(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict:
    """{"exact_match", "f1"} in percent: per question the max over its gold answers, then the mean."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        return {"exact_match": 0.0, "f1": 0.0}
    em = [max(squad_em(p, g) for g in gold) for p, gold in zip(predictions, answers)]
    f1 = [max(squad_f1(p, g) for g in gold) for p, gold in zip(predictions, answers)]
    return {"exact_match": 100.0 * float(np.mean(em)), "f1": 100.0 * float(np.mean(f1))}


# ----------------------------------------------------------------------------- generation


def render_prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's answer (chat template if there is one)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_answers(model, tokenizer, conversations: Sequence[Sequence[dict]], *, max_new_tokens: int = 256,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers, batch by batch (the last batch is padded with repeats: one compile per shape)."""
    from tqdm.auto import tqdm

    from idjax.models import generate
    from idjax.models.generate import stop_ids

    prompts = [render_prompt(tokenizer, c) for c in conversations]
    eos, pad = stop_ids(model, tokenizer), tokenizer.pad_token_id or 0
    out: list[str] = []
    for k in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=None):
        chunk = prompts[k:k + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        tokens = generate(model, padded, max_new_tokens=max_new_tokens, eos_ids=eos, pad_id=pad)
        out += [tokenizer.decode(t, skip_special_tokens=True) for t in tokens[:len(chunk)]]
    return out


# ----------------------------------------------------------------------------- multiple choice


def option_logliks(model, tokenizer, prompts: Sequence[Sequence[dict]], options: Sequence[Sequence[str]], *,
                   batch_size: int = 8) -> list[np.ndarray]:
    """Summed log-likelihood of each option's tokens as the assistant's answer to each prompt.

    The option is tokenized on its own and appended to the prompt tokens, so every option is
    scored on the same context.
    """
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts for {len(options)} option lists")
    examples, owner = [], []
    for q, (msgs, opts) in enumerate(zip(prompts, options)):
        ctx = render_prompt(tokenizer, msgs)
        for o, text in enumerate(opts):
            cont = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not cont:
                raise ValueError(f"question {q}: option {o} ({text!r}) has no tokens")
            ids = np.asarray(ctx + cont, np.int32)
            labels = np.full_like(ids, D.IGNORE_INDEX)
            labels[len(ctx):] = ids[len(ctx):]
            examples.append(D.Example(len(examples), f"{q}:{o}", None, ids, labels, False))
            owner.append((q, o))
    sums, _ = token_loss_sums(model, examples, batch_size=batch_size, pad_id=tokenizer.pad_token_id or 0,
                              desc="options")
    out = [np.zeros(len(o)) for o in options]
    for (q, o), s in zip(owner, sums):
        out[q][o] = -s
    return out


def multiple_choice_accuracy(model, tokenizer, prompts, options, answers: Sequence[int], *,
                             batch_size: int = 8) -> dict:
    """{"accuracy", "predictions"}: the option with the highest log-likelihood is the model's answer."""
    ll = option_logliks(model, tokenizer, prompts, options, batch_size=batch_size)
    preds = [int(np.argmax(x)) for x in ll]
    acc = float(np.mean([p == a for p, a in zip(preds, answers)])) if preds else 0.0
    return {"accuracy": acc, "predictions": preds}


# ----------------------------------------------------------------------------- code execution


def run_python_tests(program: str, timeout: float = 10.0) -> bool:
    """True when `program` exits 0 in a fresh Python subprocess within `timeout` seconds.

    This runs model-written code: callers must have the user's consent (--allow-code-execution).
    """
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        try:
            r = subprocess.run([sys.executable, "-I", "-c", program], cwd=d, capture_output=True, timeout=timeout,
                               env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"})
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


def extract_code(completion: str, prompt: str, entry_point: str) -> str:
    """The program to test: the fenced code block if any; prefixed with the prompt unless it defines entry_point."""
    blocks = re.findall(r"```(?:python|py)?\n(.*?)(?:```|$)", completion, flags=re.S)
    code = blocks[0] if blocks else completion
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.M):
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return imports + "\n" + code
    return prompt + code


# ----------------------------------------------------------------------------- task metrics (Task.score)


def _score_gsm8k(task: Task, model, tokenizer, *, batch_size=8, max_new_tokens=256, **_) -> dict:
    preds = generate_answers(model, tokenizer, [it.prompt for it in task.items], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    hits = [gsm8k_answer(p) == it.reference for p, it in zip(preds, task.items)]
    return {"exact_match": float(np.mean(hits))}


def _score_mmlu(task: Task, model, tokenizer, *, batch_size=8, **_) -> dict:
    r = multiple_choice_accuracy(model, tokenizer, [it.prompt for it in task.items],
                                 [it.options for it in task.items], [it.reference for it in task.items],
                                 batch_size=batch_size)
    return {"accuracy": r["accuracy"]}


def _score_squad(task: Task, model, tokenizer, *, batch_size=8, max_new_tokens=64, **_) -> dict:
    preds = generate_answers(model, tokenizer, [it.prompt for it in task.items], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    return squad_scores(preds, [it.reference for it in task.items])


def _score_humaneval(task: Task, model, tokenizer, *, batch_size=8, max_new_tokens=512,
                     allow_code_execution=False, **_) -> dict:
    if not allow_code_execution:
        raise ValueError("humaneval's pass@1 runs model-written code on this machine; pass "
                         "--allow-code-execution (allow_code_execution=True) to accept that")
    preds = generate_answers(model, tokenizer, [it.prompt for it in task.items], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    passed = []
    for p, it in zip(preds, task.items):
        ref = it.reference
        program = (extract_code(p, ref["prompt"], ref["entry_point"]) + "\n\n" + ref["test"]
                   + f"\n\ncheck({ref['entry_point']})\n")
        passed.append(run_python_tests(program))
    return {"pass@1": float(np.mean(passed))}


_SCORERS: dict[str, Callable[..., dict]] = {"gsm8k": _score_gsm8k, "mmlu": _score_mmlu, "squad": _score_squad,
                                            "humaneval": _score_humaneval}


def score_task(task: Task, model, tokenizer, **kw) -> dict:
    """The metric(s) of `task` (tasks.load_task) for `model`, e.g. {"exact_match": 0.25}.

    kw: batch_size, max_new_tokens; humaneval also needs allow_code_execution=True (it runs the
    model's code on this machine)."""
    return _SCORERS[task.name](task, model, tokenizer, **kw)
