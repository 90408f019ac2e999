"""`idjax demo --quick` end to end on the embedded SmolLM2: outputs, the comparison, and resumption.

The demo is `idjax run` on its configuration plus the random comparison, so a second demo reuses
every stage of the first."""

import json
import logging
import math
from pathlib import Path

from idjax.cli import main
from idjax.demo import DATA_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reuse_lines(caplog):
    """{store kind: (reused, computed)} from idjax.store.compute_missing's log lines."""
    out = {}
    for rec in caplog.records:
        msg = rec.getMessage()
        if rec.name == "idjax.store" and "chunk(s) reused" in msg:
            kind = msg.split(":", 1)[0]
            reused, computed = msg.split(":", 1)[1].split(" chunk(s) reused, ")
            out[kind] = (int(reused), int(computed.split()[0]))
    return out


def test_demo_quick_and_resume(tmp_path, caplog, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--out", str(out)]
    caplog.set_level(logging.INFO)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "target loss" in printed and "| stage" in printed and "| pool domain" in printed
    assert _reuse_lines(caplog) == {"embed pool": (0, 1), "landmark gradients": (0, 1)}

    report = json.loads((out / "demo.json").read_text())
    for key in ("task", "model", "settings", "pool", "k", "landmarks", "loss", "eval", "composition",
                "selected_ids", "random_ids", "timings_s", "selection_timings_s", "reused", "win", "files"):
        assert key in report, key
    assert report["task"] == "definitions"
    k = report["k"]
    assert k >= 1 and len(report["selected_ids"]) == len(report["random_ids"]) == k
    for name in ("before", "selected", "random"):
        assert math.isfinite(report["loss"][name]) and report["loss"][name] > 0
    for which in ("selected", "random"):
        assert sum(d["count"] for d in report["composition"][which].values()) == k
    assert not any(report["reused"].values())

    # selection.jsonl: k rows {index, id, score, weight} naming distinct pool rows
    pool = [json.loads(line) for line in (DATA_DIR / "pool.jsonl").read_text().splitlines()]
    assert report["files"]["selection"] == str(out / "select" / "selection.jsonl")
    rows = [json.loads(line) for line in (out / "select" / "selection.jsonl").read_text().splitlines()]
    assert len(rows) == k and len({r["id"] for r in rows}) == k
    assert [r["id"] for r in rows] == report["selected_ids"]
    for r in rows:
        assert pool[r["index"]]["id"] == r["id"]
        assert math.isfinite(r["score"]) and r["weight"] >= 0
    assert (out / "select" / "selection.meta.json").exists()
    assert json.loads((out / "run.json").read_text())["summary"]["eval"]["after"] == report["loss"]["selected"]

    png = (out / "demo.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    # A second run reuses every stage (it does not even open the store) and gives the same answer.
    caplog.clear()
    assert main(argv) == 0
    capsys.readouterr()
    assert _reuse_lines(caplog) == {}
    for stage in ("data", "warmup", "select", "train", "eval"):
        assert f"stage {stage}: cached" in caplog.text
    again = json.loads((out / "demo.json").read_text())
    assert all(again["reused"].values()), again["reused"]
    assert again["selected_ids"] == report["selected_ids"] and again["random_ids"] == report["random_ids"]
    assert again["loss"] == report["loss"]
    assert again["timings_s"]["warmup"] < report["timings_s"]["warmup"]


def test_demo_bad_flags_are_usage_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--k-fraction", "1.5"]) == 2
    assert "--k-fraction" in capsys.readouterr().err
    assert not any(Path(tmp_path).iterdir())
