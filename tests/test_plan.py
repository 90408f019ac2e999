"""`idjax plan`: memory plans from the compiler's own analysis, for models that exist only as a config.

The 8B test compiles abstractly (no weights) on 8 forced CPU devices in a subprocess. Its reference is
arithmetic that does not share the code under test: a fine-tuning step must hold at least the float32
master weights and both AdamW moments (12 bytes per parameter) spread over the fsdp devices, and a
per-example gradient at least the bfloat16 weights (2 bytes per parameter) spread the same way.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from idjax import plan
from idjax.options import parse_bytes
from idjax.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = Path(__file__).parent / "fixtures" / "configs"
GiB = 1 << 30

EIGHT_DEVICES = textwrap.dedent("""
    import json, math, sys
    import jax
    from idjax import models, plan, sharding as shd

    config = models.load_config(sys.argv[1])
    out = {"parameters": config.num_params}
    for fsdp in (8, 1):
        mesh = shd.make_mesh(8 // fsdp, fsdp, devices=jax.devices())
        report = plan.plan(config, mesh, pool=200_000, max_length=256, device_memory=80 * (1 << 30),
                           batch_size=8, dtype="bfloat16", stages=("gradients", "train"))
        out[fsdp] = report
        graphdef, state = plan.abstract_model_state(config, mesh, "bfloat16")
        out[f"largest_block_{fsdp}"] = max(math.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(state))
    print("RESULT " + json.dumps(out))
""")


def test_an_8b_plan_fits_with_fsdp8_and_not_with_fsdp1(tmp_path):
    script = tmp_path / "plan8.py"
    script.write_text(EIGHT_DEVICES)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script), str(CONFIGS / "llama-3.1-8b.json")], capture_output=True,
                          text=True, timeout=1200, cwd=ROOT, env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    res = json.loads(line[0][len("RESULT "):])
    n = res["parameters"]
    assert 7.9e9 < n < 8.1e9
    fits8, fits1 = res["8"], res["1"]
    stage8 = {s["stage"]: s for s in fits8["stages"]}
    stage1 = {s["stage"]: s for s in fits1["stages"]}
    assert fits8["fits"] and not fits1["fits"]
    assert stage8["gradients"]["fits"] and stage8["train"]["fits"]
    assert not stage1["gradients"]["fits"] and not stage1["train"]["fits"]
    # the compiler's numbers against the arithmetic floor (bytes per device)
    assert stage8["train"]["bytes_per_device"] >= 12 * n / 8
    assert stage1["train"]["bytes_per_device"] >= 12 * n
    assert stage8["gradients"]["bytes_per_device"] >= 2 * n / 8
    assert stage1["gradients"]["bytes_per_device"] >= 2 * n
    # every leaner setting was tried before the 1-device verdict, and none fit
    assert [name for name, _ in stage1["train"]["tried"]] == [
        "1 microbatch", "1 microbatch, activations split by rows", "1 microbatch, remat",
        "1 microbatch, remat, activations split by rows"]
    # with fsdp=8 no device holds a whole large matrix: the largest block is an eighth of a stacked kernel
    # (bf16 weights, the lm-head's [4096, 128256] or a layer stack of [32, 4096, 14336])
    assert res["largest_block_8"] * 8 <= 32 * 4096 * 14336 and res["largest_block_1"] == 32 * 4096 * 14336


ROWS_LAYOUT = textwrap.dedent("""
    import json
    import jax
    from idjax import plan, sharding as shd
    from idjax.models import ModelConfig

    config = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=256, intermediate_size=1024, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=False)
    mesh = shd.make_mesh(1, 8, devices=jax.devices())
    out = {}
    for budget in (1 << 40, 200 << 20):
        report = plan.plan(config, mesh, pool=1000, max_length=512, device_memory=budget, batch_size=8,
                           stages=("embed",), embed_dim=4096)
        out[budget] = report["stages"][0]
    print("RESULT " + json.dumps(out))
""")


def test_the_embedding_plan_splits_activations_by_rows_when_the_partitioners_layout_does_not_fit(tmp_path):
    """On 8 forced CPU devices (FSDP, 1 row of 512 tokens each) the partitioner keeps every row's activations
    on every device; sharding.constrain_rows under the mesh splits them. The compiler's memory analysis must
    see the split layout far leaner, and the plan must keep the partitioner's layout while it fits and
    take the split one when it does not."""
    script = tmp_path / "rows.py"
    script.write_text(ROWS_LAYOUT)
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=env)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    roomy, tight = json.loads(line[0][len("RESULT "):]).values()
    assert roomy["setting"] == "2 blocks, 2 tangents" and len(roomy["tried"]) == 1
    (first, partitioner), (split, rows) = tight["tried"]
    assert first == "2 blocks, 2 tangents"
    assert split == tight["setting"] == "2 blocks, 2 tangents, activations split by rows"
    # one float32 [8 rows, 512, 1024] MLP activation of the whole batch is 16 MiB: the partitioner's layout
    # holds several on each device (more than the 200 MiB budget allows), the split one an eighth of the rows
    assert partitioner > 0.9 * (200 << 20) and rows < partitioner / 3 and tight["fits"], tight


def test_plan_command_on_a_small_config(capsys):
    """The CLI end to end on Llama-3.2-1B's config, one device: every stage compiled, a table, a verdict,
    store sizes from the pool size; too little memory gives the verdict that names the stage."""
    argv = ["plan", "--model", str(CONFIGS / "llama-3.2-1b.json"), "--pool", "1000", "--max-length", "64",
            "--device-memory", "200GB", "--batch-size", "2", "--proj-dim", "256", "--embed-dim", "256", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in report["stages"]] == list(plan.STAGES) and report["fits"]
    embedding = 128256 * 2048 * 4  # float32: the embedding matrix alone is an argument of every stage
    for s in report["stages"]:
        floor = embedding if s["stage"] == "embed" else 4 * report["parameters"]
        assert s["bytes_per_device"] >= floor, s
        assert s["flops_per_sample"] > 0
    assert report["stores_bytes"] == {"embeddings": 1000 * 256 * 4, "landmark gradients": 100 * 256 * 4}
    assert main(argv[:-1] + ["--stages", "train", "--device-memory", "1GB"]) == 0
    text = capsys.readouterr().out
    assert "| train |" in text and "does NOT fit: train needs" in text


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * GiB and parse_bytes("16 GiB") == 16 * GiB
    assert parse_bytes("512MB") == 512 << 20 and parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")
