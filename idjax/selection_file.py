"""The selection file: what `idjax select` writes and `idjax train --selection` reads.

    OUT             JSONL rows {"index", "id", "score", "weight", "response_tokens"} in selection order, plus
                    "by" (the target id or task that took the row) for round-robin and per-task selections
    OUT.meta.json   the configuration, timings, stores and solver report of the selection, and its response
                    tokens

Both files are written atomically (idjax.io), so a killed run never leaves a half selection that
training would read. Rows are matched to the training data by id, never by position.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from idjax.data import DataError, Example
from idjax.io import write_text

log = logging.getLogger(__name__)


def meta_path(out) -> Path:
    """Where the sidecar of the selection file `out` goes."""
    return Path(out).with_suffix(".meta.json")


def write_selection(selection, pool: Sequence[Example], out, extra: dict | None = None) -> Path:
    """JSONL rows {"index", "id", "score", "weight", "response_tokens"} in selection order (+ "by": who
    took it), and a sidecar <out>.meta.json with selection.info, `extra`, the count and the response
    tokens of the selection (what it trains on: selections of equal k can differ severalfold in tokens);
    returns the sidecar's path.

    selection: a pipeline.Selection (rows, scores, weights, owners, info); `pool` the examples its
    rows point into.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines, tokens = [], 0
    for r, row in enumerate(selection.rows):
        ex = pool[int(row)]
        n = ex.response_tokens
        tokens += n
        item = {"index": int(ex.index), "id": ex.id, "score": float(selection.scores[row]),
                "weight": float(selection.weights[row]), "response_tokens": n}
        if selection.owners is not None:
            item["by"] = selection.owners[r]
        lines.append(json.dumps(item))
    write_text(out, "\n".join(lines) + "\n")
    meta = meta_path(out)
    write_text(meta, json.dumps({**selection.info, **(extra or {}), "selected": len(selection.rows),
                                 "response_tokens": tokens}, indent=2, default=str))
    return meta


def read_selection(path, records: list[dict], weighted: bool):
    """Keep the records a selection file names, in its order; their weights when `weighted`.

    Rows are matched to the data by id, and ids missing from the data are an error (the file
    belongs to other data). Returns (records, weights or None).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: selection file does not exist")
    by_id = {r["id"]: r for r in records}
    chosen, weights, missing, seen, unweighted = [], [], [], set(), 0
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: field '<row>': malformed JSON: {e.msg}") from None
        if not isinstance(row, dict) or row.get("id") is None:
            raise DataError(f"{p}:{n}: field 'id': missing (selection rows are {{index, id, score, weight}})")
        rid = str(row["id"])
        if rid in seen:
            raise DataError(f"{p}:{n}: field 'id': duplicate id {rid!r}")
        seen.add(rid)
        if rid not in by_id:
            missing.append(rid)
            continue
        unweighted += "weight" not in row
        w = row.get("weight", 1.0)
        if weighted and (isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf")):
            raise DataError(f"{p}:{n}: field 'weight': expected a finite number >= 0, got {w!r}")
        chosen.append(by_id[rid])
        weights.append(float(w) if weighted else 1.0)
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise DataError(f"{p}: {len(missing)} selected ids are not in the training data: "
                        f"{', '.join(missing[:5])}{more} (was the selection made from another file?)")
    if not chosen:
        raise DataError(f"{p}: selects no samples")
    if weighted and unweighted == len(chosen):
        raise DataError(f"{p}: no row has a 'weight' field; --weighted needs the weights `idjax select` writes")
    if weighted and unweighted:
        log.warning("%s: %d of %d rows have no 'weight' field; --weighted trains them with weight 1.0", p,
                    unweighted, len(chosen))
    if weighted and not sum(weights) > 0:
        raise DataError(f"{p}: every weight is 0; nothing to train on with --weighted")
    return chosen, (weights if weighted else None)


__all__ = ["write_selection", "read_selection", "meta_path"]
