"""Training: one step against a hand-written jax.grad + optax reference, weights, accumulation,
LoRA, bfloat16, bit-exact resume, warm-up state for the update model, SmolLM2 loss, CLI errors."""

import contextlib
import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from idjax import data as D
from idjax import memory
from idjax import train as T
from idjax.checkpoint import restore_checkpoint
from idjax.grads import sample_losses
from idjax.lora import LoraConfig
from idjax.models import CausalLM, CheckpointError, ModelConfig
from idjax.models.modeling import abstract_model
from idjax.optim import OptimizerSpec, load_optimizer_state, update_model
from idjax.selection_file import read_selection
from idjax.sharding import param_name

TASKS = Path(__file__).parent / "fixtures" / "tasks"
CFG = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=16, eos_token_ids=(1,), pad_token_id=0)


@functools.cache
def tiny(seed=0, config=CFG):
    """One model per (seed, config): training never modifies its input model (tested below)."""
    return CausalLM(config, rngs=nnx.Rngs(seed))


def synthetic(n=10, seed=0, lo=10, hi=40, vocab=97):
    """Random token examples whose second half is the response."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(lo, hi))
        ids = rng.integers(2, vocab, k).astype(np.int32)
        labels = ids.copy()
        labels[: k // 2] = D.IGNORE_INDEX
        out.append(D.Example(i, f"s{i}", None, ids, labels, False))
    return out


def params_of(model):
    return nnx.split(model, nnx.Param, ...)[1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reference(graphdef, spec, params, rest, ids, mask, labels, weights, real_rows):
    def loss(p):
        l = sample_losses(nnx.merge(graphdef, p, rest), ids, mask, labels)
        return jnp.sum(weights * l) / real_rows

    value, grads = jax.value_and_grad(loss)(params)
    tx = spec.build()
    updates, _ = tx.update(grads, tx.init(params), params)
    return value, optax.apply_updates(params, updates)


def reference_step(model, spec, batch, weights):
    """The textbook step: jax.grad of the weighted objective's minibatch estimate, sum_i w_i l_i over the
    batch's n real rows divided by n, then the optax update."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value, new = _reference(graphdef, spec, params, rest, batch.input_ids, batch.attention_mask, batch.labels,
                            jnp.asarray(weights, jnp.float32), float(batch.sample_mask.sum()))
    return float(value), new


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    """atol 1e-5 = 0.1% of the learning rate: Adam's first step is lr * g / (|g| + eps), which turns
    float32 rounding in a near-zero gradient entry into a visible (but tiny) step difference."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def first_batch(examples, rows, length=64):
    return D.make_batches(examples, rows, (length,), pad_id=0)[0]


# One recipe for most tests, so they share compilations (a tiny model's step compiles in ~7 s on 2 cores).
SPEC = OptimizerSpec("adamw", 1e-2, schedule="cosine", total_steps=8, weight_decay=0.1, clip_norm=1.0)
B64 = (64,)


@pytest.mark.parametrize("at_loss_positions", [False, True])
def test_one_step_equals_reference(at_loss_positions):
    """One step against the textbook step (its lm-head at every position); the trainer's batch with loss
    positions (as train.epoch_batches makes them) runs its lm-head at fewer than its 63 positions."""
    model = tiny()
    exs = synthetic(3)
    heads = D.bucket_heads(exs, B64) if at_loss_positions else None
    batch = D.make_batches(exs, 4, B64, pad_id=0, heads=heads)[0]  # 3 samples + 1 padding row
    assert (batch.loss_positions is not None) == at_loss_positions
    assert not at_loss_positions or batch.loss_positions.shape[1] < 63
    w = batch.sample_mask.astype(np.float32)
    ref_loss, ref_params = reference_step(model, SPEC, batch, w)
    trainer = T.Trainer(model, T.TrainConfig(SPEC, batch_size=4))
    state, m = trainer.step(trainer.init_state(), batch)
    assert float(m["loss"]) == pytest.approx(ref_loss, rel=1e-6)
    assert_trees_close(state.trainable, ref_params)
    assert int(state.step) == 1


def test_weighted_loss_is_the_mean_of_weighted_losses():
    model = tiny()
    batch = first_batch(synthetic(4), 4)
    w = np.array([0.5, 2.0, 0.0, 1.5], np.float32)
    ref_loss, ref_params = reference_step(model, SPEC, batch, w)
    # independent check of the value: per-sample losses by a numpy loop over tokens
    logits = np.asarray(model(batch.input_ids, batch.attention_mask), np.float64)
    per = []
    for r in range(4):
        lp = logits[r] - np.log(np.exp(logits[r] - logits[r].max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits[r].max(-1, keepdims=True)
        toks = [(t, batch.labels[r, t + 1]) for t in range(batch.bucket - 1) if batch.labels[r, t + 1] != -100]
        per.append(-np.mean([lp[t, y] for t, y in toks]))
    assert ref_loss == pytest.approx(float(np.dot(w, per) / 4), rel=1e-5)  # 4 real rows, not sum(w)
    trainer = T.Trainer(model, T.TrainConfig(SPEC, batch_size=4))
    state, m = trainer.step(trainer.init_state(), batch, w)
    assert float(m["loss"]) == pytest.approx(ref_loss, rel=1e-6)
    assert_trees_close(state.trainable, ref_params)
    # weights are not normalised per step: 10x the weights is 10x the loss and, under plain SGD, 10x the step
    sgd = OptimizerSpec("sgd", 1.0)  # a large step, so the float32 parameter differences are precise
    plain = T.Trainer(model, T.TrainConfig(sgd, batch_size=4))
    before = jax.tree.leaves(params_of(model))
    moves = []
    for scale in (1, 10):
        s2, m2 = plain.step(plain.init_state(), batch, scale * w)
        assert float(m2["loss"]) == pytest.approx(scale * ref_loss, rel=1e-5)
        moves.append([np.asarray(a) - np.asarray(b) for a, b in zip(jax.tree.leaves(s2.trainable), before)])
    for small, big in zip(*moves):
        np.testing.assert_allclose(big, 10 * small, rtol=1e-3, atol=1e-5)
    # padding rows get no weight whatever is passed, and are not counted among the rows
    padded = first_batch(synthetic(3), 4)
    _, m3 = trainer.step(trainer.init_state(), padded, np.array([1.0, 1.0, 1.0, 50.0], np.float32))
    _, m4 = trainer.step(trainer.init_state(), padded)
    assert float(m3["loss"]) == float(m4["loss"])


def test_weights_are_rescaled_to_mean_one_and_uniform_weights_change_nothing():
    """train() trains on the global objective: the weights rescaled to mean 1 over the training rows, so
    uniform weights give exactly the unweighted run, and only the weights' ratios matter."""
    exs = synthetic(6, seed=2)
    config = T.TrainConfig(SPEC, batch_size=2, steps=3, buckets=B64)
    plain = T.train(tiny(), exs, config, progress=False)
    uniform = T.train(tiny(), exs, config, weights=np.full(6, 3.0), progress=False)
    assert [r["loss"] for r in uniform.history] == [r["loss"] for r in plain.history]
    _tree_equal(uniform.state.trainable, plain.state.trainable)
    w = np.array([0.5, 2.0, 1.0, 0.25, 1.5, 0.75])
    one = T.train(tiny(), exs, config, weights=w, progress=False)
    four = T.train(tiny(), exs, config, weights=4 * w, progress=False)
    assert [r["loss"] for r in four.history] == [r["loss"] for r in one.history]
    assert [r["loss"] for r in one.history] != [r["loss"] for r in plain.history]
    with pytest.raises(ValueError, match="every training example has weight 0"):
        T.train(tiny(), exs, config, weights=np.zeros(6), progress=False)


def test_grad_accum_equals_the_big_batch():
    model = tiny()
    batch = first_batch(synthetic(3), 4)
    w = np.array([1.0, 3.0, 0.5, 7.0], np.float32)  # the 4th row is padding: ignored
    big = T.Trainer(model, T.TrainConfig(SPEC, batch_size=4))
    acc = T.Trainer(model, T.TrainConfig(SPEC, batch_size=2, grad_accum=2))
    s1, m1 = big.step(big.init_state(), batch, w)
    s2, m2 = acc.step(acc.init_state(), batch, w)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert_trees_close(s1.trainable, s2.trainable)


def test_a_step_that_does_not_fit_runs_in_more_microbatches(caplog):
    """The memory plan: where the compiled step needs more than the device has (by the compiler's own
    memory analysis), the step runs in more microbatches or with remat, and is the same step."""
    model = tiny()
    batch = first_batch(synthetic(8, lo=100, hi=128), 8, length=128)
    w = np.linspace(0.5, 2.0, 8).astype(np.float32)
    roomy = T.Trainer(model, T.TrainConfig(SPEC, batch_size=8, device_memory=1 << 40))
    s1, m1 = roomy.step(roomy.init_state(), batch, w)
    micro, compiled = roomy.plans[8, 128]
    assert micro == 1
    whole = memory.compiled_bytes(compiled)
    tight = T.Trainer(model, T.TrainConfig(SPEC, batch_size=8, device_memory=whole))
    with caplog.at_level("INFO", logger="idjax.memory"):
        s2, m2 = tight.step(tight.init_state(), batch, w)
    micro, compiled = tight.plans[8, 128]
    assert memory.compiled_bytes(compiled) <= memory.HEADROOM * whole < whole
    assert micro > 1 or "remat" in caplog.text
    assert "training step on 8 rows of 128 tokens" in caplog.text
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-6)
    assert_trees_close(s1.trainable, s2.trainable)


def test_lora_base_untouched_and_zero_b_is_the_base_model(tmp_path):
    model = tiny()
    base = jax.tree.map(np.array, params_of(model))
    exs = synthetic(8)
    batch = first_batch(exs, 4)
    full = T.Trainer(model, T.TrainConfig(SPEC, batch_size=4))  # its step reports the base model's loss
    base_loss = float(full.step(full.init_state(), batch)[1]["loss"])
    config = T.TrainConfig(SPEC, batch_size=4, steps=4, buckets=B64, lora=LoraConfig(rank=4, alpha=8.0))
    trainer = T.Trainer(model, config)
    state = trainer.init_state()
    assert set(state.trainable) == {f"layers.{m}.{p}.kernel" for m, ps in
                                    (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                                    for p in (f"{x}_proj" for x in ps)}
    state, m = trainer.step(state, batch)
    assert float(m["loss"]) == pytest.approx(base_loss, rel=1e-6)  # B = 0: the base model at step 0

    result = T.train(model, exs, config, out_dir=tmp_path / "run", progress=False)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(result.trainer.base)):
        np.testing.assert_array_equal(x, np.asarray(y))  # frozen base, bit for bit
    merged = {param_name(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params_of(result.model))}
    flat_base = {param_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(base)}
    changed = {k for k in merged if not np.array_equal(merged[k], flat_base[k])}
    assert changed == set(result.state.trainable)  # only the adapted kernels move
    ad = result.state.trainable["layers.mlp.up_proj.kernel"]
    expect = flat_base["layers.mlp.up_proj.kernel"] + 2.0 * np.einsum("lir,lro->lio", ad["a"], ad["b"])
    np.testing.assert_allclose(merged["layers.mlp.up_proj.kernel"], expect, rtol=1e-5, atol=1e-6)
    # the export is a plain HF checkpoint of the merged weights
    from idjax.models import load

    again, _ = load(tmp_path / "run", tokenizer=False)
    _tree_equal(params_of(again), params_of(result.model))
    assert not (tmp_path / "run" / "opt_state").exists()  # no full-model optimizer state for LoRA


def test_bfloat16_compute_keeps_float32_masters():
    model = tiny()
    batch = first_batch(synthetic(4), 4)
    f32 = T.Trainer(model, T.TrainConfig(SPEC, batch_size=4))
    bf16 = T.Trainer(model, T.TrainConfig(SPEC, batch_size=4, compute_dtype="bfloat16"))
    _, m32 = f32.step(f32.init_state(), batch)
    s16, m16 = bf16.step(bf16.init_state(), batch)
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])  # really computed in bfloat16
    assert {x.dtype for x in jax.tree.leaves(s16.trainable)} == {jnp.dtype(jnp.float32)}


def test_epochs_and_steps_per_epoch():
    exs = synthetic(10)
    config = T.TrainConfig(SPEC, batch_size=2, grad_accum=2, epochs=2.5, buckets=(32, 64))
    lengths = [len(e.input_ids) for e in exs]
    per_bucket = [sum(1 for n in lengths if n <= 32), sum(1 for n in lengths if n > 32)]
    spe = sum(-(-n // 4) for n in per_bucket if n)
    assert T.steps_per_epoch(exs, config) == spe
    assert T.total_steps(exs, config) == int(np.ceil(2.5 * spe))
    # every example appears exactly once per epoch, and the order depends on (seed, epoch)
    e0 = T.epoch_batches(exs, config, 0, pad_id=0)
    e1 = T.epoch_batches(exs, config, 1, pad_id=0)
    assert sorted(int(i) for b in e0 for i in b.indices if i >= 0) == list(range(10))
    assert [b.indices.tolist() for b in e0] != [b.indices.tolist() for b in e1]
    assert [b.indices.tolist() for b in e0] == [b.indices.tolist() for b in T.epoch_batches(exs, config, 0, 0)]


def _tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@contextlib.contextmanager
def ctrl_c_after(steps: int, monkeypatch):
    """Inside the block, Trainer.step raises KeyboardInterrupt (Ctrl-C) after `steps` steps."""
    real_step, calls = T.Trainer.step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(T.Trainer, "step", step)
    try:
        yield
    finally:
        monkeypatch.setattr(T.Trainer, "step", real_step)


def test_resume_is_bit_exact_and_logs_metrics(tmp_path, monkeypatch):
    exs = synthetic(10, seed=1)
    w = np.linspace(0.5, 2.0, 10)
    config = T.TrainConfig(SPEC, batch_size=2, grad_accum=2, steps=8, checkpoint_every=3, keep_checkpoints=2,
                           buckets=B64)
    before = jax.tree.map(np.array, params_of(tiny()))
    straight = T.train(tiny(), exs, config, weights=w, out_dir=tmp_path / "a", progress=False)
    _tree_equal(before, params_of(tiny()))  # the input model is never modified (its arrays are copied)

    with ctrl_c_after(4, monkeypatch), pytest.raises(KeyboardInterrupt):  # the interrupted run checkpoints step 4
        T.train(tiny(), exs, config, weights=w, out_dir=tmp_path / "b", progress=False)
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
    resumed = T.train(tiny(), exs, config, weights=w, out_dir=tmp_path / "b", resume=tmp_path / "b",
                      progress=False)
    assert int(resumed.state.step) == 8 and len(resumed.history) == 4
    assert resumed.history[-1]["loss"] == straight.history[-1]["loss"]
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[4:]]
    _tree_equal(resumed.state.trainable, straight.state.trainable)
    _tree_equal(resumed.state.opt_state, straight.state.opt_state)
    kept = sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [6, 8]  # every 3 steps and at the end, the last 2 kept

    # metrics.jsonl: one row per step, continued across the interruption
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows == straight.history
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["lr"] for r in rows] == pytest.approx([float(SPEC.lr_schedule()(k)) for k in range(8)])
    assert all({"loss", "tokens", "seconds", "tokens_per_s", "grad_norm", "epoch"} <= set(r) for r in rows)
    log = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert log == list(range(1, 9))


def test_resume_rejects_missing_and_mismatched_checkpoints(tmp_path):
    exs = synthetic(6)
    config = T.TrainConfig(SPEC, batch_size=4, steps=2, buckets=B64)
    T.train(tiny(), exs, config, out_dir=tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        T.train(tiny(), exs, config, out_dir=tmp_path / "x", resume=tmp_path / "nothing", progress=False)
    with pytest.raises(CheckpointError, match="batch_size"):
        T.train(tiny(), exs, T.TrainConfig(SPEC, batch_size=3, steps=2, buckets=B64), out_dir=tmp_path / "a",
                resume=tmp_path / "a", progress=False)
    with pytest.raises(CheckpointError, match="earlier run"):
        T.train(tiny(), exs, config, out_dir=tmp_path / "a", progress=False)
    # same recipe, different model shape (shapes only: nothing is computed before the check)
    other = abstract_model(ModelConfig(**{**CFG.__dict__, "hidden_size": 32, "head_dim": 8}))
    with pytest.raises(CheckpointError, match="different run"):
        T.train(other, exs, config, out_dir=tmp_path / "a", resume=tmp_path / "a", progress=False)
    # and without the fingerprint, Orbax's shape mismatch becomes a CheckpointError too
    template = T.Trainer(other, config).abstract_state()
    with pytest.raises(CheckpointError, match="does not match"):
        restore_checkpoint(tmp_path / "a", template)
    state, meta = restore_checkpoint(tmp_path / "a", T.Trainer(tiny(), config).abstract_state())
    assert int(state.step) == 2 and meta["epoch"] == 1 and meta["position"] == 0


def test_warmup_state_gives_the_adam_update_model(tmp_path):
    spec = SPEC
    pool = synthetic(40, seed=3)
    chosen = T.warmup_subset(len(pool), 0.1, seed=7)
    assert len(chosen) == 4 and list(chosen) == list(T.warmup_subset(40, 0.1, seed=7))
    exs = [pool[i] for i in chosen]
    result = T.warmup(tiny(), exs, None, T.TrainConfig(spec, batch_size=4, steps=3, seed=7, buckets=B64),
                      tmp_path / "w",
                      pool_size=40, fraction=0.1)
    from idjax.models import load

    model, _ = load(tmp_path / "w", tokenizer=False)
    params = params_of(model)
    loaded_spec, opt_state = load_optimizer_state(tmp_path / "w", model)
    assert loaded_spec == spec
    _tree_equal(opt_state, result.state.opt_state)
    um = update_model(loaded_spec, opt_state, params)
    # the formula of docs/method.md 2 on the saved state, in numpy
    adam, = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
             if isinstance(x, optax.ScaleByAdamState)]
    c = int(adam.count)
    assert c == 3
    t = c + 1
    a1, a2 = spec.b1 / (1 - spec.b1**t), (1 - spec.b1) / (1 - spec.b1**t)
    for m, v, p, a, b in zip(jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu), jax.tree.leaves(params),
                             jax.tree.leaves(um.a), jax.tree.leaves(um.b)):
        m, v, p = (np.asarray(x, np.float64) for x in (m, v, p))
        denom = np.sqrt(spec.b2 * v / (1 - spec.b2**t)) + spec.eps
        np.testing.assert_allclose(np.asarray(a), a2 / denom, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(b), a1 * m / denom + spec.weight_decay * p, rtol=1e-4, atol=1e-6)
    assert um.eta == pytest.approx(float(spec.lr_schedule()(3)))
    # selection over a parameter subset reads only that subset's moments, and gets the same a, b for it
    from idjax.grads import restrict, split_params
    from idjax.stages import read_update_model

    selected = split_params(model, "down_proj")[1]
    sub = read_update_model(tmp_path / "w", model, params="down_proj")
    _tree_equal(sub.a, restrict(um.a, selected))
    _tree_equal(sub.b, restrict(um.b, selected))
    assert sub.eta == um.eta
    _, partial = load_optimizer_state(tmp_path / "w", model, keep=selected)
    skipped = [x for x in jax.tree.leaves(partial) if x is Ellipsis]
    assert len(skipped) == 2 * (len(jax.tree.leaves(params)) - len(jax.tree.leaves(selected)))  # mu and nu
    meta = json.loads((tmp_path / "w" / "warmup.json").read_text())
    assert meta["ids"] == [e.id for e in exs] and meta["steps"] == 3
    # a model of another shape is refused
    with pytest.raises(CheckpointError, match="does not match"):
        load_optimizer_state(tmp_path / "w", abstract_model(ModelConfig(**{**CFG.__dict__, "num_layers": 3})))
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_optimizer_state(tmp_path, model)


def test_an_interrupted_warmup_resumes_on_a_rerun_and_leaves_no_checkpoints(tmp_path, monkeypatch):
    """Ctrl-C inside a warm-up: re-running it into the same directory continues from the checkpoint and
    ends where the uninterrupted warm-up ends; a finished warm-up keeps only the model and its optimizer
    state; a re-run with another recipe is refused with a way out."""
    from idjax.configs import WarmupRecipe
    from idjax.stages import warm_up

    exs = synthetic(12, seed=4)
    recipe = WarmupRecipe(steps=4, lr=1e-3, batch_size=2, checkpoint_every=1, fraction=0.5)
    straight = warm_up(tiny(), exs, None, recipe, tmp_path / "a", pool_size=24)
    assert not (tmp_path / "a" / "checkpoints").exists()
    assert (tmp_path / "a" / "opt_state").is_dir() and (tmp_path / "a" / "warmup.json").is_file()

    with ctrl_c_after(3, monkeypatch), pytest.raises(KeyboardInterrupt):
        warm_up(tiny(), exs, None, recipe, tmp_path / "b", pool_size=24)
    assert max(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == 3
    with pytest.raises(CheckpointError, match=r"different run.*delete .*checkpoints to start over"):
        warm_up(tiny(), exs, None, dataclasses.replace(recipe, lr=2e-3), tmp_path / "b", pool_size=24)
    resumed = warm_up(tiny(), exs, None, recipe, tmp_path / "b", pool_size=24)
    assert [r["step"] for r in resumed.history] == [4]
    assert resumed.history[0]["loss"] == straight.history[-1]["loss"]
    _tree_equal(resumed.state.trainable, straight.state.trainable)
    _tree_equal(load_optimizer_state(tmp_path / "b", tiny())[1], load_optimizer_state(tmp_path / "a", tiny())[1])
    assert not (tmp_path / "b" / "checkpoints").exists()
    # killed inside its first save: nothing finished to resume from, so it starts over
    (tmp_path / "c" / "checkpoints" / "1.orbax-checkpoint-tmp-7").mkdir(parents=True)
    again = warm_up(tiny(), exs, None, recipe, tmp_path / "c", pool_size=24)
    assert len(again.history) == 4 and again.history[-1]["loss"] == straight.history[-1]["loss"]
    assert not (tmp_path / "c" / "checkpoints").exists()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama with the SmolLM2 tokenizer, saved as an HF directory."""
    from idjax.models import load_tokenizer, resolve, save

    tok = load_tokenizer(resolve("smollm2-135m"))
    config = ModelConfig(**{**CFG.__dict__, "vocab_size": len(tok), "tie_word_embeddings": True, "num_layers": 1,
                            "eos_token_ids": (tok.eos_token_id,), "pad_token_id": tok.pad_token_id})
    path = tmp_path_factory.mktemp("tiny") / "model"
    save(CausalLM(config, rngs=nnx.Rngs(0)), path, tok)
    return path


def run_cli(*argv):
    from idjax.cli import main

    return main([str(a) for a in argv])


def test_cli_warmup_train_selection_resume(tiny_dir, tmp_path, capsys):
    pool = f"{TASKS}/tulu_v2.jsonl"
    assert run_cli("warmup", "--model", tiny_dir, "--data", pool, "--out", tmp_path / "w", "--fraction", "0.25",
                   "--steps", 2, "--batch-size", 2, "--lr", 1e-3, "--max-length", 64) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 4 and out["steps"] == 2
    assert not (tmp_path / "w" / "checkpoints").exists()  # only an unfinished warm-up keeps them
    spec, state = load_optimizer_state(tmp_path / "w", __import__("idjax").models.load(tmp_path / "w")[0])
    assert spec.name == "adamw" and int(state[-1][0].count) == 2  # clip, then adamw

    # the warm-up directory is both the model and the optimizer state of a selection (AdamW update model)
    sel = tmp_path / "sel.jsonl"
    assert run_cli("select", "--model", tmp_path / "w", "--optimizer-state", tmp_path / "w", "--train", pool,
                   "--target-task", "gsm8k", "--target", f"{TASKS}/gsm8k.jsonl", "--k", 3, "--exact", "--proj-dim", 64, "--max-length", 64,
                   "--out", sel) == 0
    capsys.readouterr()
    meta = json.loads(sel.with_suffix(".meta.json").read_text())
    assert meta["update_model"] == "adamw" and meta["selected"] == 3
    chosen = [json.loads(line) for line in sel.read_text().splitlines()]
    assert abs(sum(r["weight"] for r in chosen) - 1) < 1e-5  # first-order weights live on the top k
    args = ["train", "--model", tmp_path / "w", "--data", pool, "--selection", sel, "--weighted", "--out",
            tmp_path / "t", "--steps", 4, "--batch-size", 1, "--lr", 1e-3, "--checkpoint-every", 2,
            "--lora-rank", 2, "--max-length", 64]
    assert run_cli(*args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 4 and out["samples"] == 3 and out["weighted"]
    # the result loads with idjax and with transformers, with the same (LoRA-merged) weights
    import transformers

    from idjax.models import load

    ours, _ = load(tmp_path / "t", tokenizer=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "t")
    sd = hf.state_dict()
    np.testing.assert_array_equal(sd["model.layers.0.mlp.up_proj.weight"].numpy(),
                                  np.asarray(ours.layers.mlp.up_proj.kernel[...])[0].T)
    warm, _ = load(tmp_path / "w", tokenizer=False)
    assert not np.array_equal(np.asarray(warm.layers.mlp.up_proj.kernel[...]),
                              np.asarray(ours.layers.mlp.up_proj.kernel[...]))  # LoRA moved it
    np.testing.assert_array_equal(np.asarray(warm.embed_tokens.embedding[...]),
                                  np.asarray(ours.embed_tokens.embedding[...]))  # not adapted: unchanged
    # resuming a finished run is a no-op that still exports
    assert run_cli(*args, "--resume", tmp_path / "t") == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4


@pytest.mark.parametrize("case", ["missing-resume", "mismatched-resume", "empty-data", "unknown-ids",
                                  "weighted-without-selection", "missing-model"])
def test_cli_bad_input(case, tiny_dir, tmp_path, capsys):
    pool = f"{TASKS}/tulu_v2.jsonl"
    base = ["train", "--model", tiny_dir, "--data", pool, "--out", tmp_path / "o", "--steps", 1, "--lr", 1e-3,
            "--schedule", "constant", "--batch-size", 2, "--max-length", 64]
    if case == "missing-resume":
        argv, code, msg = base + ["--resume", tmp_path / "nope"], 1, "no checkpoints"
    elif case == "mismatched-resume":
        assert run_cli(*base) == 0
        capsys.readouterr()
        argv, code, msg = base[:-4] + ["--batch-size", 4, "--max-length", 64, "--resume", tmp_path / "o"], 1, \
            "different run"
    elif case == "empty-data":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("\n")
        argv, code, msg = ["train", "--model", tiny_dir, "--data", empty, "--out", tmp_path / "o"], 1, "no records"
    elif case == "unknown-ids":
        sel = tmp_path / "sel.jsonl"
        sel.write_text(json.dumps({"index": 0, "id": "cot_0", "score": 1, "weight": 1}) + "\n"
                       + json.dumps({"index": 99, "id": "not-there", "score": 0, "weight": 1}) + "\n")
        argv, code, msg = base + ["--selection", sel], 1, "not-there"
    elif case == "weighted-without-selection":
        argv, code, msg = base + ["--weighted"], 2, "--selection"
    else:
        argv, code, msg = ["train", "--model", tmp_path / "none", "--data", pool, "--out", tmp_path / "o"], 1, \
            "no such checkpoint"
    assert run_cli(*argv) == code
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_donated_model_and_no_final_checkpoint(tmp_path):
    """donate_model trains the model's own float32 arrays (no copy) to the copying trainer's result, bit for
    bit; final_checkpoint=False writes the model and optimizer state but no checkpoint."""
    exs = synthetic(8, seed=3)
    config = T.TrainConfig(SPEC, batch_size=2, steps=3, buckets=B64)
    copied = T.train(tiny(), exs, config, progress=False)
    model = tiny()
    donated = T.train(model, exs, config, out_dir=tmp_path / "w", final_checkpoint=False, donate_model=True,
                      progress=False)
    _tree_equal(donated.state.trainable, copied.state.trainable)
    assert [r["loss"] for r in donated.history] == [r["loss"] for r in copied.history]
    assert any(x.is_deleted() for x in jax.tree.leaves(params_of(model)))  # its arrays were donated
    assert not (tmp_path / "w" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "w" / "checkpoints").iterdir())
    assert (tmp_path / "w" / "opt_state").is_dir() and (tmp_path / "w" / "config.json").is_file()


def test_weighted_selection_without_weights_is_refused_or_warned(tmp_path, caplog):
    records = [{"id": f"r{i}", "messages": []} for i in range(3)]
    sel = tmp_path / "sel.jsonl"
    sel.write_text("".join(json.dumps({"index": i, "id": f"r{i}"}) + "\n" for i in range(2)))
    with pytest.raises(ValueError, match="no row has a 'weight' field"):
        read_selection(sel, records, weighted=True)
    assert read_selection(sel, records, weighted=False)[1] is None  # unweighted: weights are not read
    sel.write_text(json.dumps({"index": 0, "id": "r0", "weight": 0.5}) + "\n" + json.dumps({"index": 1, "id": "r1"}))
    with caplog.at_level("WARNING", logger="idjax.train"):
        _, w = read_selection(sel, records, weighted=True)
    assert w == [0.5, 1.0] and "1 of 2 rows have no 'weight' field" in caplog.text
