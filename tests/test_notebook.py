"""notebooks/quickstart.ipynb runs end to end (nbclient) on the embedded SmolLM2, in a small configuration."""

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"

# Appended to the notebook's `parameters` cell: a 32-row pool, 64-token samples (one length bucket,
# so one compilation per stage), one batch of landmarks, a 256-dim sketch, embeddings through 1 block.
SMALL = {
    "POOL_LIMIT": 32, "TARGET_LIMIT": 2, "MAX_LENGTH": 64, "K_FRACTION": 0.1, "LANDMARKS": 0.2,
    "PROJ_DIM": 256, "EMBED_DIM": 128, "EMBED_BLOCKS": 1, "BATCH_SIZE": 8,
}

# Appended to the notebook: the values its cells left behind, as one JSON line.
CHECK = """
import json, sys
print("NOTEBOOK-RESULT " + json.dumps({
    "executable": sys.executable, "k": K, "pool": len(pool), "rows": [int(r) for r in selection.rows],
    "landmarks": len(selection.landmarks), "scores_finite": bool(np.isfinite(selection.scores).all()),
    "weight_sum": float(selection.weights.sum()), "table": TOP_TABLE, "composition": COMPOSITION,
    "kept": KEPT, "store": str(STORE), "online": ONLINE,
}))
"""


def _outputs(cell, kind):
    return [o for o in cell.get("outputs", []) if o.get("output_type") in kind]


def test_quickstart_notebook(tmp_path, monkeypatch):
    # The committed notebook keeps the outputs of a real run (so it reads well unexecuted): small, error-free.
    assert NOTEBOOK.stat().st_size < 300_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert not [o for c in nb.cells if c.cell_type == "code" for o in _outputs(c, {"error"})]
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged `parameters`"
    names = {line.split("=")[0].strip() for line in params[0].source.splitlines() if "=" in line}
    assert set(SMALL) <= names, f"parameters the test sets but the notebook lacks: {set(SMALL) - names}"
    overrides = {**SMALL, "STORE_DIR": str(tmp_path / "store")}
    params[0].source += "\n# tests/test_notebook.py\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    nb.cells.append(nbformat.v4.new_code_cell(CHECK))

    # A kernelspec named python3 that runs *this* interpreter (the test venv's), found first through
    # JUPYTER_PATH: no user- or system-wide Jupyter setup is used or needed.
    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / "python3")
    jupyter_path = [str(tmp_path / "jupyter"), os.environ.get("JUPYTER_PATH", "")]
    monkeypatch.setenv("JUPYTER_PATH", os.pathsep.join(p for p in jupyter_path if p))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    # The kernel's own inline backend (Agg-rendered, headless) is what puts figures into the outputs.
    monkeypatch.delenv("MPLBACKEND", raising=False)

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error

    errors = [o for c in nb.cells if c.cell_type == "code" for o in _outputs(c, {"error"})]
    assert not errors
    text = "".join(o.get("text", "") for o in _outputs(nb.cells[-1], {"stream"}))
    line = next(s for s in text.splitlines() if s.startswith("NOTEBOOK-RESULT "))
    result = json.loads(line.removeprefix("NOTEBOOK-RESULT "))

    assert Path(result["executable"]).resolve() == Path(sys.executable).resolve()
    assert result["store"] == str(tmp_path / "store") and any((tmp_path / "store").iterdir())
    k, n = result["k"], result["pool"]
    assert 24 <= n <= SMALL["POOL_LIMIT"] and k == max(1, round(SMALL["K_FRACTION"] * n))
    rows = result["rows"]
    assert len(rows) == k and len(set(rows)) == k and all(0 <= r < n for r in rows)
    assert result["landmarks"] == round(SMALL["LANDMARKS"] * n)
    assert result["scores_finite"] and abs(result["weight_sum"] - 1) < 1e-4
    assert sum(p for p, _ in result["composition"].values()) == n
    assert sum(s for _, s in result["composition"].values()) == k
    assert 0.0 <= result["kept"] <= 1.0
    # The online-selection step: one compilation for all its steps, and the target loss went down.
    online = result["online"]
    assert online["compilations"] == 1 and online["steps"] == 3
    assert online["after"] < online["before"]

    table = result["table"]
    assert [t["rank"] for t in table] == list(range(1, min(10, k) + 1))
    assert [t["score"] for t in table] == sorted((t["score"] for t in table), reverse=True)
    assert all(len(t["prompt"]) <= 80 and t["id"] for t in table)

    # The table and the plots are in the outputs: one markdown table, and the landmark PCA plus the
    # score histogram / composition figure.
    markdown = [o["data"]["text/markdown"] for c in nb.cells if c.cell_type == "code"
                for o in _outputs(c, {"display_data"}) if "text/markdown" in o.get("data", {})]
    assert len(markdown) == 1 and markdown[0].startswith("| rank | id | domain | score |")
    assert markdown[0].count("\n") == len(table) + 1
    for t in table:
        assert t["id"] in markdown[0]
    images = [o for c in nb.cells if c.cell_type == "code" for o in _outputs(c, {"display_data"})
              if "image/png" in o.get("data", {})]
    assert len(images) == 2
