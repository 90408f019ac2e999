"""README.md's Python examples, run as written on a pool and a target set where tokenize() skips records."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "idjax" / "assets" / "demo"

# Run after README's code, in the same namespace: rows must line up with `examples` / `pool`.
CHECKS = """
import numpy as np
skipped = {"empty-answer", "long-prompt"}
assert stats.n_records == len(records) and set(stats.skipped_no_response) == skipped
assert emb.shape == (len(examples), 2 * 576) and G.shape == (len(examples), 4096)
for i in (0, len(examples) // 2, len(examples) - 1):   # row i is example i, computed on its own
    (one,) = data.make_batches([examples[i]], 8, data.default_buckets(128), pad_id=tok.pad_token_id)
    np.testing.assert_allclose(G[i], np.asarray(grads(one)[0])[0], rtol=1e-4, atol=1e-6)
    assert records[examples[i].index]["id"] == examples[i].id
sel_rows = [int(r) for r in sel.rows]
assert len(sel_rows) == len(set(sel_rows)) == 10
sel_examples = [pool[r] for r in sel_rows]
assert all(records[e.index]["id"] == e.id for e in sel_examples) and not skipped & {e.id for e in sel_examples}
# the jitted selection equals the host shells on each landmark draw
assert rows.shape == (4, 5) and len({tuple(np.asarray(l)) for l in landmarks}) > 1
for i in range(4):
    lm = np.asarray(landmarks[i])
    p_host = idjax.Propagator.fit(emb, lm, kind="krr", delta=1e-2).apply(G[lm] @ np.asarray(v), progress=False)
    np.testing.assert_array_equal(np.asarray(rows[i]), idjax.top_k(p_host, 5))
    np.testing.assert_allclose(float(np.asarray(weights[i]).sum()), 1.0, rtol=1e-5)
print("README-OK")
"""


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_readme_python_examples_run(tmp_path):
    blocks = _python_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3, "README lost its Python examples"
    read = lambda f: [json.loads(line) for line in f.read_text().splitlines() if line.strip()]  # noqa: E731
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "cut off"}]
    empty = [{"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}]
    pool = read(DEMO / "pool.jsonl")[::60][:12]  # k = 10 in README: 12 rows keep the test short
    pool = [{"id": "empty-answer", "messages": empty}, *pool[:6], {"id": "long-prompt", "messages": long_prompt},
            *pool[6:]]
    _write(tmp_path / "pool.jsonl", pool)
    targets = read(DEMO / "targets" / "definitions.jsonl")[:3]
    _write(tmp_path / "target.jsonl", [{"id": "t-empty", "messages": empty}, *targets])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    warm = subprocess.run([sys.executable, "-m", "idjax.cli", "warmup", "--data", "pool.jsonl", "--out", "warmup_dir",
                           "--fraction", "0.25", "--steps", "1", "--batch-size", "4", "--max-length", "128"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    script = tmp_path / "readme.py"
    script.write_text("\n".join(blocks) + CHECKS, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Paris" in proc.stdout and "README-OK" in proc.stdout
    assert (tmp_path / "out" / "smollm2" / "config.json").is_file()
