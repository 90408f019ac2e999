"""Tests for idjax.store: round trips, resume after errors and SIGKILL, fingerprints, corruption,
several writers, and numpy-like views."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from idjax.io import fingerprint
from idjax.store import ArrayStore, FillStats, StoreError, compute_missing

ROOT = Path(__file__).resolve().parents[1]


def _data(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _open(path, full, chunk_rows=4, fp=None, **kw):
    return ArrayStore.open(path, shape=full.shape, dtype=full.dtype, chunk_rows=chunk_rows,
                           fingerprint={"model": "m0", "data": "d0"} if fp is None else fp, **kw)


def _fill(store, full):
    return compute_missing(store, lambda a, b: full[a:b], desc="test")


def _chunk_files(path):
    return sorted(p.name for p in Path(path).iterdir() if p.name.startswith("chunk-"))


def _temp_files(path):
    return sorted(p.name for p in Path(path).iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("row_shape,dtype", [((3,), np.float32), ((2, 3), np.float16),
                                             ((2, 3), ml_dtypes.bfloat16), ((5,), np.int32)])
def test_round_trip_with_short_last_chunk(tmp_path, row_shape, dtype):
    full = _data((10, *row_shape), dtype)
    store = _open(tmp_path / "s", full)
    assert store.num_chunks == 3 and store.chunk_range(2) == (8, 10) and store.missing() == [0, 1, 2]
    assert _fill(store, full) == FillStats(reused=0, computed=3)

    again = ArrayStore.open(tmp_path / "s", create=False)  # a reader that checks nothing
    assert again.shape == full.shape and again.dtype == np.dtype(dtype) and again.complete
    out = again.to_array()
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.view(np.uint8), full.view(np.uint8))  # bitwise
    last = again.read_chunk(2)
    assert isinstance(last, np.memmap) or isinstance(last.base, np.memmap)
    assert last.shape == (2, *row_shape)

    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "idjax-array-store" and manifest["version"] == 2
    assert manifest["shape"] == [10, *row_shape] and manifest["dtype"] == np.dtype(dtype).name
    assert manifest["chunk_rows"] == 4 and manifest["num_chunks"] == 3
    # Chunk files are plain .npy that load without pickles; ml_dtypes rows are stored as raw uints.
    raw = np.load(tmp_path / "s" / "chunk-000000.npy", allow_pickle=False)
    assert raw.dtype.kind in "fiu" and raw.shape == (4, *row_shape)


def test_bfloat16_npy_has_no_type_code_so_bits_are_stored_as_uint16(tmp_path):
    full = _data((6, 2), ml_dtypes.bfloat16)
    store = _open(tmp_path, full, chunk_rows=6)
    store.write(0, full)
    raw = np.load(store.chunk_path(0), allow_pickle=False)
    assert raw.dtype == np.uint16
    np.testing.assert_array_equal(raw.view(ml_dtypes.bfloat16).astype(np.float32), full.astype(np.float32))


def test_unsupported_dtypes_are_refused(tmp_path):
    for dtype in (object, "U5", [("a", "f4")]):
        with pytest.raises(StoreError, match="cannot be stored"):
            ArrayStore.open(tmp_path / "s", shape=(4,), dtype=dtype, chunk_rows=2)


def test_empty_store_is_complete(tmp_path):
    store = ArrayStore.open(tmp_path / "s", shape=(0, 3), dtype="float32", chunk_rows=4)
    assert store.num_chunks == 0 and store.complete and store.to_array().shape == (0, 3)


# ----------------------------------------------------------------------------- writing checks

def test_write_checks_shape_dtype_and_finiteness(tmp_path):
    full = _data((10, 3))
    store = _open(tmp_path, full)
    with pytest.raises(StoreError, match=r"chunk 2 .*needs shape \(2, 3\)"):
        store.write(2, full[:4])
    istore = ArrayStore.open(tmp_path / "i", shape=(4, 3), dtype="int32", chunk_rows=4)
    with pytest.raises(StoreError, match="cannot store float32 rows as int32"):
        istore.write(0, full[:4])

    bad = full[:4].copy()
    bad[2, 1] = np.nan
    with pytest.raises(StoreError, match=r"1 row\(s\) with NaN or inf .*first rows \[2\]"):
        store.write(0, bad)
    assert not store.done(0) and _chunk_files(tmp_path) == [] and _temp_files(tmp_path) == []
    store.write(0, bad, allow_nonfinite=True)
    assert np.isnan(store.read_chunk(0)[2, 1])

    # float64 casts down (same_kind); overflow to inf in float16 is caught after the cast.
    half = ArrayStore.open(tmp_path / "h", shape=(4, 3), dtype="float16", chunk_rows=4)
    half.write(0, full[:4].astype(np.float64))
    with pytest.raises(StoreError, match="NaN or inf"):
        half.write(0, np.full((4, 3), 1e6))


# ----------------------------------------------------------------------------- resume

def test_resume_after_error_computes_only_missing_chunks(tmp_path):
    full = _data((18, 2, 3))  # 5 chunks of 4, the last of 2
    reference = _open(tmp_path / "ref", full)
    _fill(reference, full)

    calls = []

    def failing(a, b):
        if len(calls) == 2:
            raise RuntimeError("boom")
        calls.append(a)
        return full[a:b]

    with pytest.raises(RuntimeError, match="boom"):
        compute_missing(_open(tmp_path / "s", full), failing)
    assert _chunk_files(tmp_path / "s") == ["chunk-000000.npy", "chunk-000001.npy"]

    computed = []

    def counting(a, b):
        computed.append((a, b))
        return full[a:b]

    store = _open(tmp_path / "s", full)
    assert store.missing() == [2, 3, 4]
    assert compute_missing(store, counting) == FillStats(reused=2, computed=3)
    assert computed == [(8, 12), (12, 16), (16, 18)]
    np.testing.assert_array_equal(store.to_array(), reference.to_array())
    assert compute_missing(store, counting) == FillStats(reused=5, computed=0)


def test_keyboard_interrupt_keeps_finished_chunks(tmp_path, caplog):
    full = _data((12, 3))

    def interrupted(a, b):
        if a == 4:
            raise KeyboardInterrupt
        return full[a:b]

    with caplog.at_level(logging.WARNING, logger="idjax.store"), pytest.raises(KeyboardInterrupt):
        compute_missing(_open(tmp_path, full), interrupted, desc="embed")
    assert "embed interrupted after computing 1 chunk" in caplog.text and "re-run to resume" in caplog.text
    assert _chunk_files(tmp_path) == ["chunk-000000.npy"] and _temp_files(tmp_path) == []
    store = _open(tmp_path, full)
    assert _fill(store, full) == FillStats(reused=1, computed=2)
    np.testing.assert_array_equal(store.to_array(), full)


_KILLED_WRITER = """
import sys, time
import numpy as np
from idjax.store import ArrayStore, compute_missing

path, marker = sys.argv[1], sys.argv[2]
full = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
store = ArrayStore.open(path, shape=full.shape, dtype="float32", chunk_rows=4, fingerprint={"k": 1})
original = np.lib.format.write_array
calls = []

def stuck_writer(f, array, **kw):
    # The 4th chunk: write a partial (valid-looking but short) file, then hang until killed.
    calls.append(1)
    if len(calls) == 4:
        original(f, array[:1], **kw)
        f.flush()
        open(marker, "w").close()
        time.sleep(60)
    return original(f, array, **kw)

np.lib.format.write_array = stuck_writer
compute_missing(store, lambda a, b: full[a:b])
"""


def test_sigkill_mid_write_leaves_only_complete_chunks(tmp_path):
    path, marker = tmp_path / "s", tmp_path / "mid-write"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path), str(marker)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the writer never reached chunk 3"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(_temp_files(path)) == 1  # the killed write, under its temporary name
    assert _chunk_files(path) == [f"chunk-00000{i}.npy" for i in range(3)]

    full = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    store = ArrayStore.open(path, shape=full.shape, dtype="float32", chunk_rows=4, fingerprint={"k": 1})
    assert _temp_files(path) == []  # a dead writer's leftover is cleaned on open
    assert store.missing() == [3, 4]
    assert _fill(store, full) == FillStats(reused=3, computed=2)
    np.testing.assert_array_equal(store.to_array(), full)


def test_stale_temp_files_of_other_hosts_are_removed_fresh_ones_kept(tmp_path):
    full = _data((8, 2))
    _open(tmp_path, full)
    old = tmp_path / ".chunk-000000.npy.other-host.123.ab12.tmp"
    fresh = tmp_path / ".chunk-000001.npy.other-host.123.cd34.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store = _open(tmp_path, full)
    assert not old.exists() and fresh.exists()  # another host may still be writing `fresh`
    assert store.missing() == [0, 1]


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprint_mismatch_overwrite_and_reuse(tmp_path):
    full = _data((8, 2))
    store = _open(tmp_path, full, fp={"model": "m0", "data": "d0", "config": [1, 2]})
    store.write(0, full[:4])

    same = _open(tmp_path, full, fp={"config": (1, 2), "data": "d0", "model": "m0"})  # order, tuple
    assert same.done(0) and same.missing() == [1]

    with pytest.raises(StoreError) as err:
        _open(tmp_path, full, fp={"model": "m1" * 40, "data": "d0", "config": [1, 2], "seed": 3})
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "fingerprint['model'] \"m0\" (store) != \"m1m1" in msg and "..." in msg
    assert "fingerprint['seed'] <absent> (store) != 3 (now)" in msg
    assert "'data'" not in msg and "'config'" not in msg
    assert "another --store directory" in msg and "overwrite=True" in msg

    with pytest.raises(StoreError, match=r"chunk_rows 4 \(store\) != 2 \(now\)"):
        _open(tmp_path, full, chunk_rows=2)
    with pytest.raises(StoreError, match=r"shape \[8, 2\] \(store\) != \[9, 2\] \(now\)"):
        _open(tmp_path, _data((9, 2)))

    fresh = _open(tmp_path, full, fp={"model": "m1"}, overwrite=True)
    assert fresh.missing() == [0, 1] and fresh.fingerprint == {"model": "m1"}
    assert _chunk_files(tmp_path) == []
    assert _open(tmp_path, full, fp={"model": "m1"}).missing() == [0, 1]


def test_fingerprint_function_is_stable_and_discriminating():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": (1, 2), "a": 1})
    assert fingerprint({"a": 1}) == "ba03a8468995a733"  # pinned: stores made today stay reusable
    assert len(fingerprint("x")) == 16 and len(fingerprint("x", length=64)) == 64
    a = np.arange(6, dtype=np.float32)
    assert fingerprint(a) == fingerprint(a.copy()) == fingerprint(a.astype(">f4"))
    distinct = [fingerprint(x) for x in (a, a.reshape(2, 3), a.astype(np.float16),
                                         a.astype(ml_dtypes.bfloat16), a.tobytes(), b"1", "1", 1)]
    assert len(set(distinct)) == len(distinct)
    assert fingerprint({"w": a}) != fingerprint({"w": a + 1})
    assert fingerprint(np.int64(3)) == fingerprint(3)
    with pytest.raises(TypeError, match="not JSON-able"):
        fingerprint({"x": object()})


# ----------------------------------------------------------------------------- corruption

def test_checksums_catch_flipped_bits_and_overwritten_rows(tmp_path, caplog):
    """A byte flipped inside the data and a chunk overwritten with NaN or with other finite numbers (same
    size, valid header) are each reported with the file and recomputed; the store then equals the data."""
    full = _data((20, 6))
    _fill(_open(tmp_path, full), full)
    header = (tmp_path / "chunk-000000.npy").stat().st_size - 4 * 6 * 4 - 24  # .npy header length
    damage = {
        1: lambda b: b[:header + 37] + bytes([b[header + 37] ^ 0x10]) + b[header + 38:],
        2: lambda b: b[:header] + np.full(24, np.nan, np.float32).tobytes() + b[header + 96:],
        4: lambda b: b[:header] + _data((4, 6), seed=9).tobytes() + b[header + 96:],
    }
    for i, edit in damage.items():
        f = tmp_path / f"chunk-{i:06d}.npy"
        f.write_bytes(edit(f.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="idjax.store"):
        store = _open(tmp_path, full)
        assert store.missing() == [1, 2, 4]
    for i in damage:
        assert f"chunk {i} file chunk-{i:06d}.npy is unusable (checksum mismatch" in caplog.text
    computed = []
    compute_missing(store, lambda a, b: computed.append(a) or full[a:b])
    assert computed == [4, 8, 16]
    np.testing.assert_array_equal(_open(tmp_path, full).to_array(), full)
    # chunks stay plain .npy files: numpy reads them, trailer and all
    np.testing.assert_array_equal(np.load(tmp_path / "chunk-000001.npy"), full[4:8])


def test_a_lost_manifest_is_rebuilt_and_keeps_only_its_own_chunks(tmp_path, caplog):
    full = _data((12, 2))
    store = _open(tmp_path / "s", full)
    compute_missing(store, lambda a, b: full[a:b], chunks=[0, 2])
    (tmp_path / "s" / "manifest.json").unlink()
    with caplog.at_level(logging.WARNING, logger="idjax.store"):
        again = _open(tmp_path / "s", full)
    assert "manifest.json is missing; rebuilt" in caplog.text and again.missing() == [1]
    computed = []
    compute_missing(again, lambda a, b: computed.append(a) or full[a:b])
    assert computed == [4]
    np.testing.assert_array_equal(again.to_array(), full)
    # the same files under another fingerprint: the trailers say they were made for something else
    (tmp_path / "s" / "manifest.json").unlink()
    other = _open(tmp_path / "s", full, fp={"model": "m1", "data": "d0"})
    assert other.missing() == [0, 1, 2] and "computed for another fingerprint" in caplog.text
    # a directory with other files and no manifest is still refused
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and has no manifest.json"):
        _open(tmp_path / "t", full)


def test_version_1_stores_still_open(tmp_path):
    """Stores written before checksums (no trailer): chunks are checked by header and size, and reused."""
    full = _data((8, 3))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format": "idjax-array-store", "version": 1, "shape": [8, 3], "dtype": "float32", "chunk_rows": 4,
        "num_chunks": 2, "fingerprint": {"model": "m0", "data": "d0"}, "created": ""}))
    np.save(tmp_path / "chunk-000000.npy", full[:4], allow_pickle=False)
    store = _open(tmp_path, full)
    assert store.missing() == [1]
    _fill(store, full)
    np.testing.assert_array_equal(store.to_array(), full)
    assert (tmp_path / "chunk-000001.npy").stat().st_size == (tmp_path / "chunk-000000.npy").stat().st_size


def test_corrupt_chunk_files_count_as_missing(tmp_path, caplog):
    full = _data((16, 3))
    _fill(_open(tmp_path, full), full)
    truncated = tmp_path / "chunk-000001.npy"
    truncated.write_bytes(truncated.read_bytes()[:-7])
    np.save(tmp_path / "chunk-000002.npy", full[:3], allow_pickle=False)  # wrong shape
    (tmp_path / "chunk-000003.npy").write_bytes(b"not a numpy file")

    with caplog.at_level(logging.WARNING, logger="idjax.store"):
        store = _open(tmp_path, full)
    assert store.missing() == [1, 2, 3] and store.corrupt == [1, 2, 3]
    assert "truncated" in caplog.text and "shape (3, 3), expected (4, 3)" in caplog.text
    with pytest.raises(StoreError, match=r"chunk 1 \(rows 4:8\) .*unusable.*re-run"):
        store.read_chunk(1)

    computed = []
    compute_missing(store, lambda a, b: computed.append(a) or full[a:b])
    assert computed == [4, 8, 12] and store.corrupt == []
    np.testing.assert_array_equal(store.to_array(), full)


@pytest.mark.parametrize("text,match", [("{not json", "cannot parse"), ("[1, 2]", "not a JSON object"),
                                        ('{"format": "other"}', "format is 'other'")])
def test_corrupt_manifest_raises_and_overwrite_recovers(tmp_path, text, match):
    full = _data((8, 2))
    _fill(_open(tmp_path, full), full)
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(StoreError, match=f"corrupt store manifest .*manifest.json: {match}"):
        _open(tmp_path, full)
    store = _open(tmp_path, full, overwrite=True)
    assert store.missing() == [0, 1]


def test_manifest_with_inconsistent_fields_raises(tmp_path):
    full = _data((8, 2))
    _open(tmp_path, full)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["num_chunks"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="num_chunks 7 does not match"):
        ArrayStore.open(tmp_path, create=False)


def test_missing_chunk_read_and_missing_store(tmp_path):
    full = _data((8, 2))
    store = _open(tmp_path / "s", full)
    store.write(0, full[:4])
    np.testing.assert_array_equal(store.rows(1, 3), full[1:3])
    with pytest.raises(StoreError, match=r"chunk 1 \(rows 4:8\) .*never written; 1 of 2 chunks are missing"):
        store.rows(2, 6)
    with pytest.raises(StoreError, match="no array store at"):
        ArrayStore.open(tmp_path / "nothing", create=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty and has no manifest.json"):
        _open(tmp_path / "busy", full)
    with pytest.raises(StoreError, match="needs chunk_rows"):
        ArrayStore.open(tmp_path / "new", shape=(8, 2), dtype="float32")


# ----------------------------------------------------------------------------- several writers

def test_two_writers_fill_disjoint_chunks_of_one_store(tmp_path):
    full = _data((30, 4))
    results = {}

    def writer(p):  # each "process" opens the store itself: the creation races too
        store = _open(tmp_path, full, chunk_rows=3)
        results[p] = compute_missing(store, lambda a, b: full[a:b], chunks=range(p, store.num_chunks, 2))

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: FillStats(0, 5), 1: FillStats(0, 5)}
    store = _open(tmp_path, full, chunk_rows=3)
    assert store.complete and _temp_files(tmp_path) == []
    np.testing.assert_array_equal(store.to_array(), full)


def test_open_uses_a_store_another_process_created_between_its_checks(tmp_path, monkeypatch):
    """The race the two-writer test hits now and then: the manifest appears after open() found none but before
    it lists the directory; open() must take that store, not refuse a "non-empty directory"."""
    full = _data((8, 2))
    real_iterdir, raced = Path.iterdir, []

    def iterdir(self):
        if self == tmp_path and not raced:
            raced.append(None)
            raced[0] = _open(tmp_path, full)  # the other process, inside our open()
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    store = _open(tmp_path, full)
    assert raced[0] is not None and store.num_chunks == raced[0].num_chunks == 2 and store.missing() == [0, 1]


def test_compute_missing_skips_chunks_another_writer_finished(tmp_path):
    full = _data((12, 2))
    mine, theirs = _open(tmp_path, full), _open(tmp_path, full)
    assert mine.missing() == [0, 1, 2]
    theirs.write(1, full[4:8])
    assert compute_missing(mine, lambda a, b: full[a:b]) == FillStats(reused=1, computed=2)


# ----------------------------------------------------------------------------- views

def test_view_indexes_like_numpy(tmp_path):
    full = _data((23, 2, 3))
    store = _open(tmp_path, full, chunk_rows=5)
    _fill(store, full)
    x = store.view()
    assert len(x) == 23 and x.shape == full.shape and x.dtype == full.dtype and x.ndim == 3
    mask = np.random.default_rng(1).random(23) < 0.4
    keys = [slice(2, 17), slice(None, None, 3), slice(-5, None), slice(17, 2, -2), slice(5, 5),
            slice(20, 40), 7, -1, np.int64(4), np.array([13, 0, 13, 4, 22]), [3, -2], np.array([], int),
            np.array([[1, 2], [20, 0]]), mask, (slice(3, 9), 1), (np.array([8, 1]), slice(None), 0), (6, 1, 2)]
    for key in keys:
        np.testing.assert_array_equal(x[key], full[key], err_msg=repr(key))
    np.testing.assert_array_equal(np.asarray(x), full)
    for a in range(0, 23, 4):  # the chunked loop that code written for arrays runs
        np.testing.assert_array_equal(x[a:a + 4], full[a:a + 4])
    np.testing.assert_array_equal(store.take([22, 0, 5]), full[[22, 0, 5]])
    with pytest.raises(IndexError):
        x[23]
    with pytest.raises(IndexError):
        store.take([0, -24])


def test_manifest_creation_race_keeps_the_first(tmp_path):
    """Two processes creating one store at once: the loser adopts the winner's manifest."""
    from idjax.store_format import publish_manifest

    path = tmp_path / "manifest.json"
    assert publish_manifest(path, {"who": "first"}) is True
    assert publish_manifest(path, {"who": "second"}) is False
    assert json.loads(path.read_text()) == {"who": "first"} and _temp_files(tmp_path) == []


def test_atomic_writes_leave_no_temp_files(tmp_path):
    """idjax.io: a failed write keeps the old file; a directory is published whole or not at all."""
    from idjax.io import atomic_directory, atomic_write, write_text

    f = tmp_path / "a.json"
    write_text(f, "old")

    def fail(out):
        out.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(f, fail)
    assert f.read_text() == "old" and _temp_files(tmp_path) == []
    d = tmp_path / "cache"
    atomic_directory(d, lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("1")))
    assert (d / "x").read_text() == "1"
    with pytest.raises(OSError):  # another writer published it first: theirs is kept
        atomic_directory(d, lambda tmp: (tmp.mkdir(), (tmp / "y").write_text("2")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "cache"] and not (d / "y").exists()
