"""Chat data for idjax: read, validate and tokenize with prompt masking.

Why this module is strict: selection scores every sample of a pool, so one bad row found late
wastes hours of gradients. Rows are validated up front and every error names file, row and field.
Batching into static shapes is idjax/batching.py; its names are importable from here too.
"""
from __future__ import annotations

import json
import logging
import os
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from idjax.batching import (  # noqa: F401 (data.make_batches etc.: the batching half of the data API)
    IGNORE_INDEX, Batch, bucket_for, bucket_heads, collect_rows, default_buckets, example_buckets, head_fraction,
    head_length, head_plan, length_ladder, loss_positions, make_batches, real_token_fraction, sorted_batches,
    sorted_plan,
)
from idjax.io import fingerprint

log = logging.getLogger(__name__)

ROLES = ("user", "assistant", "system")
_LOCAL_SUFFIXES = {".jsonl", ".json", ".parquet", ".gz", ".arrow", ".txt", ".csv"}


class DataError(ValueError):
    """Bad input data; the message names file, line (1-based row) and field so it can be fixed."""


def _err(file: str, line: int, fld: str, msg: str) -> DataError:
    return DataError(f"{file}:{line}: field '{fld}': {msg}")


def _first_line(e: BaseException) -> str:
    lines = [t.strip() for t in str(e).splitlines() if t.strip()]
    return lines[0] if lines else type(e).__name__


def _show(v) -> str:
    return "null/missing" if v is None else f"{type(v).__name__} {reprlib.repr(v)}"


# ----------------------------------------------------------------------------- reading


def _normalize(row, file: str, stem: str, line: int) -> dict:
    """One accepted row -> {"id", "messages", "task"}; anything else -> DataError naming the field."""
    if not isinstance(row, dict):
        raise _err(file, line, "<row>", f"expected an object with 'messages' or 'prompt'/'completion', got {_show(row)}")
    msgs = row.get("messages")
    if msgs is None and (row.get("prompt") is not None or row.get("completion") is not None):
        for k in ("prompt", "completion"):
            if not isinstance(row.get(k), str):
                raise _err(file, line, k, f"expected a string, got {_show(row.get(k))}")
        msgs = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    elif msgs is None:
        raise _err(file, line, "messages", "missing (chat records need 'messages', plain ones 'prompt' and 'completion')")
    if not isinstance(msgs, (list, tuple)):
        raise _err(file, line, "messages", f"expected a list of {{role, content}} objects, got {_show(msgs)}")
    if not msgs:
        raise _err(file, line, "messages", "is empty")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _err(file, line, f"messages[{i}]", f"expected an object with 'role' and 'content', got {_show(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise _err(file, line, f"messages[{i}].role", f"expected one of {'/'.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise _err(file, line, f"messages[{i}].content", f"expected a string, got {_show(content)}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _err(file, line, "messages", "has no assistant turn, so there is nothing to train on")
    rid = row.get("id")
    if rid is None:
        rid = f"{stem}:{line}"
    elif isinstance(rid, bool) or not isinstance(rid, (str, int, np.integer)):
        raise _err(file, line, "id", f"expected a string or integer, got {_show(rid)}")
    task = row.get("task")
    task_field = "task" if task is not None else "dataset"  # Tulu V2 names the source dataset
    task = task if task is not None else row.get("dataset")
    if task is not None and not isinstance(task, str):
        raise _err(file, line, task_field, f"expected a string, got {_show(task)}")
    return {"id": str(rid), "messages": out, "task": task}


def _decode(raw: bytes, name: str, line: int) -> str:
    encoding = "utf-8-sig" if line == 1 else "utf-8"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        # Columns count characters, as json's own colno and editors do; e.start counts bytes.
        column = len(e.object[:e.start].decode(encoding)) + 1
        raise _err(name, line, "<row>", f"not UTF-8 text (byte {e.object[e.start]:#04x} at column {column}); "
                                        "is this a binary file?") from None


def _jsonl_rows(path: Path, name: str) -> Iterator[tuple[int, object]]:
    """Rows of a JSON-lines file (blank lines skipped, numbering kept); a .json array also works.

    Lines are decoded one by one, so a non-UTF-8 byte is reported on its own line.
    """
    with open(path, "rb") as f:
        if path.suffix == ".json" and f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            f.seek(0)
            text = "".join(_decode(raw, name, n) for n, raw in enumerate(f, 1))
            try:
                yield from enumerate(json.loads(text), 1)
            except json.JSONDecodeError as e:
                raise _err(name, e.lineno, "<row>", f"malformed JSON: {e.msg} (column {e.colno})") from None
            return
        f.seek(0)
        for n, raw in enumerate(f, 1):
            text = _decode(raw, name, n)
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise _err(name, n, "<row>", f"malformed JSON: {e.msg} (column {e.colno})") from None
            yield n, row


def _rows(source, split: str, limit: int | None) -> Iterator[tuple[int, object]]:
    """(line, row) pairs from whatever `source` is; imports heavy libraries only when needed."""
    path, name = Path(source), str(source)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise DataError(f"{name}: a directory, but not a HF datasets directory written by save_to_disk "
                            f"({type(e).__name__}: {_first_line(e)}); pass a .jsonl or .parquet file") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r} (available: {', '.join(ds)})")
            ds = ds[split]
        yield from enumerate(ds, 1)
    elif path.suffix == ".parquet" and path.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        n = 0
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
            for batch in batches:
                for row in batch.to_pylist():
                    n += 1
                    yield n, row
        except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, corrupt page, unreadable
            where = f"{name}: after row {n}" if n else name
            raise DataError(f"{where}: not a readable Parquet file ({_first_line(e)})") from None
    elif path.exists():
        yield from _jsonl_rows(path, name)
    elif path.is_absolute() or path.suffix in _LOCAL_SUFFIXES or name.count("/") > 1 or name.startswith("."):
        raise DataError(f"{name}: path does not exist")
    else:
        import datasets

        try:  # stream when only the first rows are wanted, to avoid downloading a whole pool
            ds = datasets.load_dataset(name, split=split, streaming=limit is not None)
        except Exception as e:  # offline, unreachable, or no such dataset: all mean "cannot read"
            raise DataError(f"{name}: path does not exist and the hub was unreachable or has no such "
                            f"dataset ({type(e).__name__}: {_first_line(e)})") from e
        yield from enumerate(ds, 1)


def read_records(source: str | os.PathLike, *, split: str = "train", limit: int | None = None) -> list[dict]:
    """Read and validate chat records from .jsonl/.json, .parquet, a save_to_disk directory or the hub.

    Returns [{"id": str, "messages": [{"role", "content"}], "task": str | None}]; fails on the first
    bad row with a DataError naming file, line and field, before any expensive work starts.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    name = str(source)
    stem = Path(name.rstrip("/")).stem
    records: list[dict] = []
    seen: dict[str, int] = {}
    if limit == 0:
        return records
    for line, row in _rows(source, split, limit):
        rec = _normalize(row, name, stem, line)
        if rec["id"] in seen:
            raise _err(name, line, "id", f"duplicate id {rec['id']!r} (first seen on line {seen[rec['id']]})")
        seen[rec["id"]] = line
        records.append(rec)
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise DataError(f"{name}: contains no records")
    return records


# ----------------------------------------------------------------------------- tokenizing


@dataclass(frozen=True, eq=False)  # eq=False: arrays make field-wise == ambiguous
class Example:
    """One tokenized sample. labels are aligned with input_ids (HF convention: the loss shifts)."""

    index: int  # position in the records passed to tokenize()
    id: str
    task: str | None
    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L], IGNORE_INDEX on every non-assistant token
    truncated: bool

    @property
    def response_tokens(self) -> int:
        """The tokens the example trains on: its labelled tokens after the next-token shift."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """A hash of ids and tokens (labels included): stores, caches and checkpoints made from other data
    must never be reused."""
    return fingerprint([(e.id, fingerprint(e.input_ids), fingerprint(e.labels)) for e in examples])


def records_fingerprint(records: Sequence[dict]) -> str:
    """A hash of the records as read (each one's JSON with sorted keys), streamed: seconds for 10^5 rows."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides tokenize()'s output: the tokenizer's model (vocabulary, merges,
    normaliser), its added and special tokens and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = fingerprint(backend.to_str().encode()) if backend is not None else \
        f"{type(tokenizer).__name__}:{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    return fingerprint({"model": model, "chat_template": getattr(tokenizer, "chat_template", None),
                        "special": sorted(int(i) for i in getattr(tokenizer, "all_special_ids", []))})


@dataclass
class TokenizeStats:
    """What tokenize() dropped or cut, so callers can report it instead of silently losing data."""

    n_records: int
    n_kept: int
    n_truncated: int  # among kept examples
    skipped_no_response: list[str] = field(default_factory=list)  # ids with no trainable token


def _render(msgs: list[dict], tokenizer, where: str) -> tuple[str, list[tuple[int, int]]]:
    """Full chat text and the character span of each trainable assistant turn.

    The span of turn i runs from the end of render(messages[:i], generation prompt) to the end of
    render(messages[:i+1]), so role headers and generation prompts stay masked whatever the template.
    Turns with empty content and a conversation-opening assistant turn (no context) are not trained.
    """
    def apply(m, gen=False):
        try:
            return tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja raise_exception(...) from templates that reject a conversation
            raise DataError(f"{where}: field 'messages': the chat template rejected it: {e}") from e

    full = apply(msgs)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant" or i == 0 or not m["content"].strip():
            continue
        pre = apply(msgs[:i], gen=True)
        upto = full if i == len(msgs) - 1 else apply(msgs[: i + 1])
        if not (upto.startswith(pre) and full.startswith(upto)):
            raise ValueError(
                f"{where}: the chat template is not prefix-stable (rendering messages[:{i}] is not a "
                "prefix of the full conversation, e.g. it rewrites earlier turns), so assistant tokens "
                "cannot be located; use a template that renders each turn independently")
        spans.append((len(pre), len(upto)))
    return full, spans


def _token_spans(tokenizer, text, spans, offsets) -> list[tuple[int, int]]:
    """Character spans -> token spans. A token belongs to the span its first character is in."""
    if offsets is not None:
        starts = np.array([a for a, _ in offsets])
        return [(int(np.searchsorted(starts, a)), int(np.searchsorted(starts, b))) for a, b in spans]
    out = []  # slow tokenizer without offsets: token counts of the rendered prefixes
    for a, b in spans:
        s, e = (len(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (a, b))
        out.append((s, e))
    return out


def tokenize(records: Sequence[dict], tokenizer, *, max_length: int = 1024, source: str = "<records>",
             start: int = 0, report: bool = True) -> tuple[list[Example], TokenizeStats]:
    """Chat-template each record and train only on assistant content plus its end-of-turn token.

    Whitespace the template puts after the end-of-turn token (ChatML's "\\n") is masked too: the
    model stops at the end-of-turn token, so that text is never generated. Sequences longer than
    max_length keep their start; samples left with no trainable token are skipped and reported
    (report_stats; report=False leaves that to the caller). start: the row of records[0] in its file
    (a share of a larger set), for Example.index, line numbers in errors and default ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template; prompt masking needs "
                         "one (use an instruct tokenizer or set tokenizer.chat_template)")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    from tqdm.auto import tqdm

    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    stem = Path(source).stem
    examples, stats = [], TokenizeStats(len(records), 0, 0)
    fast = getattr(tokenizer, "is_fast", False)  # fast tokenizers give character offsets
    chunk = 512  # batch the Rust tokenizer; also the progress granularity
    for c0 in tqdm(range(0, len(records), chunk), desc="tokenize", unit_scale=chunk, disable=None):
        recs = [_normalize(r, source, stem, start + c0 + k + 1) for k, r in enumerate(records[c0:c0 + chunk])]
        rendered = [_render(r["messages"], tokenizer, f"{source}:{start + c0 + k + 1}") for k, r in enumerate(recs)]
        texts = [t for t, _ in rendered]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=fast)
        for k, (rec, (text, spans)) in enumerate(zip(recs, rendered)):
            ids = np.asarray(enc["input_ids"][k], np.int32)
            labels = np.full_like(ids, IGNORE_INDEX)
            for s, e in _token_spans(tokenizer, text, spans, enc["offset_mapping"][k] if fast else None):
                last = max((j for j in range(s, e) if int(ids[j]) in special), default=None)
                if last is not None and not tokenizer.decode(ids[last + 1:e].tolist()).strip():
                    e = last + 1
                labels[s:e] = ids[s:e]
            truncated = len(ids) > max_length
            ids, labels = ids[:max_length], labels[:max_length]
            if not (labels != IGNORE_INDEX).any():
                stats.skipped_no_response.append(rec["id"])
                continue
            stats.n_truncated += truncated
            examples.append(Example(start + c0 + k, rec["id"], rec["task"], ids, labels, truncated))
    stats.n_kept = len(examples)
    if report:
        report_stats(stats, source, max_length)
    return examples, stats


def report_stats(stats: TokenizeStats, source: str, max_length: int) -> None:
    """Log what tokenize() truncated and skipped (the warnings a user must see on every run)."""
    if stats.n_truncated:
        log.warning("%s: truncated %d of %d samples to max_length=%d (their ends carry no loss)",
                    source, stats.n_truncated, stats.n_records, max_length)
    if stats.skipped_no_response:
        ids = stats.skipped_no_response
        log.warning("%s: skipped %d samples with no assistant token left to train on (empty answer or "
                    "cut off by max_length=%d): %s%s", source, len(ids), max_length,
                    ", ".join(ids[:20]), " ..." if len(ids) > 20 else "")


def merge_stats(parts: Sequence[TokenizeStats]) -> TokenizeStats:
    """The statistics of consecutive shares of one set, as one tokenize() call over all of it gives."""
    return TokenizeStats(sum(p.n_records for p in parts), sum(p.n_kept for p in parts),
                         sum(p.n_truncated for p in parts), [i for p in parts for i in p.skipped_no_response])
