"""Batches of static shapes for jitted code: it must see a handful of shapes, never one per sample.

Two batchings of tokenized examples (data.Example):
- `make_batches`: rows grouped into power-of-two length buckets, shuffled within them by a seed; training
  uses it (its results depend on that random batch composition);
- `sorted_batches`: rows sorted by length and cut into consecutive batches, each padded to the smallest of
  `length_ladder`'s lengths (4 per octave); the selection passes use it, since their rows are independent.
`collect_rows` puts per-row results back in the examples' order; `real_token_fraction` counts the padding.

A length-sorted batch can also carry `loss_positions`: the positions whose next token carries loss, so
the lm-head and the cross-entropy run there only (grads.hidden_loss_sums), not at prompt and padding
positions. Their count per padded length comes from `head_plan`, one per length for a whole pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from idjax.data import Example

IGNORE_INDEX = -100  # label of tokens that carry no loss (PyTorch / HF convention)


def default_buckets(max_length: int, min_length: int = 64) -> tuple[int, ...]:
    """Powers of two from min_length, capped by max_length: few compiles, at most 2x padding."""
    if max_length < 1 or min_length < 1:
        raise ValueError(f"lengths must be >= 1, got max_length={max_length}, min_length={min_length}")
    out, b = [], min_length
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


def example_buckets(examples: Sequence[Example], *, tight: bool = False) -> tuple[int, ...]:
    """Length buckets that hold every example: powers of two from 64 up to the power of two that holds
    the longest (training and evaluation: the same shapes across runs and datasets, so compilations
    are reused). tight=True (the selection stages): the last bucket is the longest example's length
    and the first min(64, longest), so no row is padded past the longest sample of the set."""
    longest = max(len(e.input_ids) for e in examples)
    if tight:
        return _tight_buckets(longest)
    return default_buckets(max(64, 1 << (longest - 1).bit_length()))


def _tight_buckets(longest: int) -> tuple[int, ...]:
    return default_buckets(max(longest, 1), min_length=min(64, longest))


def bucket_for(length: int, buckets: Iterable[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    buckets = tuple(buckets)
    fits = [b for b in buckets if b >= length]
    if not fits:
        raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}; "
                         "tokenize with max_length <= the largest bucket")
    return min(fits)


@dataclass
class Batch:
    """A fixed-shape batch [batch_size, bucket]; padding rows have sample_mask False, index and position -1."""

    input_ids: np.ndarray  # int32 [B, L], right-padded with pad_id
    attention_mask: np.ndarray  # int32 [B, L]
    labels: np.ndarray  # int32 [B, L]
    sample_mask: np.ndarray  # bool [B]
    indices: np.ndarray  # int64 [B], Example.index (the record's row in its file) or -1
    positions: np.ndarray  # int64 [B], place in the examples given to make_batches, or -1
    total: int  # how many examples that make_batches call was given (its batches hold them all)
    # int32 [B, R]: per row, the positions t with labels[t + 1] != -100 in order, then -1; None: all positions
    loss_positions: np.ndarray | None = None

    @property
    def bucket(self) -> int:
        return self.input_ids.shape[1]


def loss_positions(labels) -> np.ndarray:
    """The positions t of a row whose next token carries loss (labels[t + 1] != -100), in order."""
    return np.flatnonzero(np.asarray(labels)[1:] != IGNORE_INDEX)


def _collate(chunk: Sequence[tuple[int, Example]], batch_size: int, length: int, pad_id: int, total: int,
             head: int | None = None) -> Batch:
    positions = None
    if head is not None and head < length - 1:
        positions = np.full((batch_size, head), -1, np.int32)
        for r, (_, ex) in enumerate(chunk):
            where = loss_positions(ex.labels)
            if len(where) > head:
                raise ValueError(f"a row has {len(where)} loss positions, more than the {head} its batch of "
                                 f"{length} tokens computes the lm-head at (head_plan)")
            positions[r, :len(where)] = where
    ids = np.full((batch_size, length), pad_id, np.int32)
    att = np.zeros((batch_size, length), np.int32)
    lab = np.full((batch_size, length), IGNORE_INDEX, np.int32)
    mask = np.zeros(batch_size, bool)
    idx = np.full(batch_size, -1, np.int64)
    pos = np.full(batch_size, -1, np.int64)
    for r, (p, ex) in enumerate(chunk):
        n = len(ex.input_ids)
        ids[r, :n], att[r, :n], lab[r, :n] = ex.input_ids, 1, ex.labels
        mask[r], idx[r], pos[r] = True, ex.index, p
    return Batch(ids, att, lab, mask, idx, pos, total, positions)


def bucket_heads(examples: Sequence[Example], buckets: Iterable[int]) -> dict[int, int]:
    """{bucket: lm-head positions} for make_batches: head_length of the most loss positions of any row in
    the bucket, so each bucket still compiles one shape."""
    buckets = tuple(buckets)
    most: dict[int, int] = {}
    for ex in examples:
        b = bucket_for(len(ex.input_ids), buckets)
        most[b] = max(most.get(b, 0), len(loss_positions(ex.labels)))
    return {b: head_length(m, b) for b, m in most.items()}


def make_batches(examples: Sequence[Example], batch_size: int, buckets: Iterable[int], *, pad_id: int,
                 shuffle: bool = False, seed: int = 0, heads: Mapping[int, int] | None = None) -> list[Batch]:
    """Group examples by bucket and pad to [batch_size, bucket], so jitted code compiles once per bucket.

    Each example appears exactly once; the last batch of a bucket is filled with masked rows.
    Without shuffle, batches come bucket by bucket in input order; with it, the examples within
    a bucket and the batch order are permuted by `seed` (same seed, same batches). heads: {bucket: lm-head
    positions} (bucket_heads): those buckets' batches carry loss_positions; None: none do.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    buckets = sorted(set(buckets))
    groups: dict[int, list[tuple[int, Example]]] = {}
    for p, ex in enumerate(examples):
        groups.setdefault(bucket_for(len(ex.input_ids), buckets), []).append((p, ex))
    rng = np.random.default_rng(seed)
    batches = []
    for b in sorted(groups):
        exs = groups[b]
        if shuffle:
            exs = [exs[i] for i in rng.permutation(len(exs))]
        batches += [_collate(exs[k:k + batch_size], batch_size, b, pad_id, len(examples), (heads or {}).get(b))
                    for k in range(0, len(exs), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def length_ladder(longest: int, *, min_length: int = 64, steps_per_octave: int = 4,
                  multiple: int = 16) -> tuple[int, ...]:
    """The padded lengths of length-sorted batches: min(min_length, longest), then `steps_per_octave`
    lengths per doubling rounded up to a multiple of `multiple`, the last `longest`. A sorted batch is
    padded to the smallest that holds its longest row: at most 2^(1/steps) padding (19% for 4), at the
    cost of steps * log2(longest / min_length) + 1 compiled shapes (17 from 64 to 1024)."""
    if longest < 1:
        raise ValueError(f"longest must be >= 1, got {longest}")
    out, i = {min(min_length, longest), longest}, 1
    while (b := min_length * 2 ** (i / steps_per_octave)) < longest:
        out.add(min(longest, -(-int(np.ceil(b)) // multiple) * multiple))
        i += 1
    return tuple(sorted(out))


def sorted_plan(lengths, batch_size: int, ladder: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """(positions, padded length) of each length-sorted batch: the rows by length (stable), cut into
    consecutive batches of batch_size, each padded to the smallest ladder length holding its longest row.
    Only the last batch has padding rows."""
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(lengths, kind="stable")
    return [(order[k:k + batch_size], bucket_for(int(lengths[order[min(k + batch_size, len(order)) - 1]]), ladder))
            for k in range(0, len(order), batch_size)]


def chunked_plan(lengths, batch_size: int, ladder: Sequence[int], chunk_rows: int | None = None):
    """(row indices into `lengths`, padded length) of every length-sorted batch, each chunk of chunk_rows rows
    batched on its own as the resumable passes do (sorted_plan per chunk; None: one chunk)."""
    lengths = np.asarray(lengths, np.int64)
    chunk_rows = chunk_rows or max(len(lengths), 1)
    for lo in range(0, len(lengths), chunk_rows):
        for pos, length in sorted_plan(lengths[lo:lo + chunk_rows], batch_size, ladder):
            yield lo + pos, length


def head_length(most: int, length: int) -> int:
    """How many positions the lm-head runs at in a batch padded to `length` whose rows have at most `most`
    loss positions: `most` rounded up to a quarter of the length (a multiple of 16), so a pass compiles few
    shapes; length - 1 (every position) when that is not fewer."""
    quarter = -(-max(16, -(-length // 4)) // 16) * 16
    return min(length - 1, -(-max(most, 1) // quarter) * quarter)


def head_plan(lengths, counts, batch_size: int, ladder: Sequence[int], *,
              chunk_rows: int | None = None) -> dict[int, int]:
    """{padded length: lm-head positions} for the length-sorted batches of rows with these lengths and loss
    position counts (each chunk of chunk_rows rows batched on its own, as the resumable passes do): one
    head_length per padded length, of the most loss positions of any row in any batch of that length, so
    every chunk of a pass compiles the same shapes."""
    counts = np.asarray(counts, np.int64)
    most: dict[int, int] = {}
    for rows, length in chunked_plan(lengths, batch_size, ladder, chunk_rows):
        most[length] = max(most.get(length, 0), int(counts[rows].max()))
    return {length: head_length(m, length) for length, m in most.items()}


def head_fraction(lengths, counts, batch_size: int, ladder: Sequence[int], heads: Mapping[int, int], *,
                  chunk_rows: int | None = None) -> float:
    """Loss positions / the positions the lm-head runs at, over the length-sorted batches (as head_plan)."""
    computed = sum(batch_size * min(heads.get(length, length - 1), length - 1)
                   for _, length in chunked_plan(lengths, batch_size, ladder, chunk_rows))
    return float(np.sum(counts) / computed) if computed else 1.0


def sorted_batches(examples: Sequence[Example], batch_size: int, *, pad_id: int,
                   ladder: Sequence[int] | None = None, heads: Mapping[int, int] | None = None) -> list[Batch]:
    """Batches of similar lengths (sorted_plan; default ladder: length_ladder of the longest example), for
    the passes whose rows are independent (embeddings, gradients, features): far less padding than
    make_batches' power-of-two buckets. collect_rows puts the rows back in the examples' order.

    heads: {padded length: lm-head positions} (head_plan; default: the plan of these examples alone). A
    batch whose head is shorter than its length - 1 carries loss_positions."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(e.input_ids) for e in examples]
    if ladder is None:
        ladder = length_ladder(max(lengths))
    if heads is None:
        heads = head_plan(lengths, [len(loss_positions(e.labels)) for e in examples], batch_size, ladder)
    return [_collate([(int(p), examples[p]) for p in pos], batch_size, length, pad_id, len(examples),
                     heads.get(length))
            for pos, length in sorted_plan(lengths, batch_size, ladder)]


def real_token_fraction(lengths, batch_size: int, ladder: Sequence[int] | None = None, *,
                        chunk_rows: int | None = None) -> float:
    """Real tokens / computed tokens of the length-sorted batches of `lengths` (each chunk of chunk_rows
    rows batched on its own, as the resumable passes do); ladder None: power-of-two buckets as
    make_batches with example_buckets(tight=True) would pad them."""
    lengths = np.asarray(lengths, np.int64)
    if ladder is not None:
        computed = sum(batch_size * length for _, length in chunked_plan(lengths, batch_size, ladder, chunk_rows))
        return float(lengths.sum() / computed) if computed else 1.0
    chunk_rows = chunk_rows or max(len(lengths), 1)
    buckets = _tight_buckets(int(lengths.max()))
    computed = 0
    for lo in range(0, len(lengths), chunk_rows):
        sizes: dict[int, int] = {}
        for n in lengths[lo:lo + chunk_rows]:
            b = bucket_for(int(n), buckets)
            sizes[b] = sizes.get(b, 0) + 1
        computed += sum(-(-count // batch_size) * batch_size * b for b, count in sizes.items())
    return float(lengths.sum() / computed) if computed else 1.0


def collect_rows(batches: Sequence[Batch], fn, *, desc: str | None = None, progress: bool = True) -> np.ndarray:
    """fn(batch) -> per-row values [B, ...] of every batch, gathered as [n, ...] in the order of the
    examples make_batches was given (padding rows dropped).

    `batches` must be all the batches of one make_batches call: rows are placed by Batch.positions,
    never by Example.index, so skipped records or a subset of a pool cannot push a row out of range.
    """
    from tqdm.auto import tqdm

    if not batches:
        raise ValueError("no batches")
    n = batches[0].total
    positions = np.concatenate([b.positions[b.sample_mask] for b in batches])
    if {b.total for b in batches} != {n} or not np.array_equal(np.sort(positions), np.arange(n)):
        raise ValueError(f"batches must be all the batches of one make_batches call ({len(positions)} rows "
                         f"at positions that are not 0..{n - 1})")
    out = None
    for b in tqdm(batches, desc=desc, unit="batch", disable=None if progress and desc else True):
        values = np.asarray(fn(b))
        if out is None:
            out = np.zeros((n, *values.shape[1:]), values.dtype)
        out[b.positions[b.sample_mask]] = values[: len(b.sample_mask)][b.sample_mask]
    return out
