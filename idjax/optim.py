"""Optimizer update models, docs/method.md section 2: optax state -> (a, b, eta).

One optimizer step on the weighted gradient g = G^T w is modeled as the affine map
delta = -eta * (a * g + b), with per-parameter pytrees a and b read from the optimizer state
after warm-up. The same OptimizerSpec builds the optax optimizer that training uses, so the
state and the model cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from idjax.io import write_text
from idjax.models import CheckpointError

logger = logging.getLogger(__name__)

from idjax.configs import OPTIMIZERS as NAMES, SCHEDULES  # declared with the training recipes


@dataclass(frozen=True)
class OptimizerSpec:
    """What idjax trains with; JSON-serialisable so warm-up can save it next to its state.

    schedule: "constant" (after an optional linear warm-up), "linear" or "cosine" (linear
    warm-up over warmup_steps from 0 to learning_rate, then decay to 0 at total_steps).
    momentum / nesterov apply to "sgd" only (Adam's momentum is b1; nesterov=True there means
    NAdam). weight_decay: decoupled for "adamw"; for "sgd" and "adam" it is L2 decay added to
    the gradient before the optimizer. clip_norm: global-norm clipping applied first.
    """

    name: str
    learning_rate: float
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    clip_norm: float | None = None

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"OptimizerSpec: {msg}")

        need(self.name in NAMES, f"name must be one of {NAMES}, got {self.name!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(math.isfinite(self.learning_rate) and self.learning_rate >= 0,
             f"learning_rate must be finite and >= 0, got {self.learning_rate}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.schedule != "constant":
            need(self.total_steps > self.warmup_steps,
                 f"schedule {self.schedule!r} decays to 0 at total_steps, which must exceed "
                 f"warmup_steps; got total_steps={self.total_steps}, warmup_steps={self.warmup_steps}")
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"need 0 <= b1, b2 < 1, got {self.b1}, {self.b2}")
        need(self.eps >= 0, f"eps must be >= 0, got {self.eps}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.name == "sgd" or self.momentum == 0,
             f"momentum is for sgd; {self.name} uses b1 (got momentum={self.momentum})")
        need(self.name != "sgd" or not self.nesterov or self.momentum > 0,
             "nesterov=True needs momentum > 0 for sgd")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.clip_norm is None or self.clip_norm > 0, f"clip_norm must be > 0, got {self.clip_norm}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OptimizerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"OptimizerSpec.from_dict: unknown fields {unknown}; known: {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as e:  # a missing required field
            raise ValueError(f"OptimizerSpec.from_dict: {e}") from None

    def lr_schedule(self) -> optax.Schedule:
        lr, warm = self.learning_rate, self.warmup_steps
        if self.schedule == "constant":
            return optax.warmup_constant_schedule(0.0, lr, warm) if warm else optax.constant_schedule(lr)
        if self.schedule == "cosine":
            return optax.warmup_cosine_decay_schedule(0.0, lr, warm, self.total_steps)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warm),
             optax.linear_schedule(lr, 0.0, self.total_steps - warm)], [warm])

    def build(self) -> optax.GradientTransformation:
        sched = self.lr_schedule()
        parts = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm else []
        if self.weight_decay and self.name != "adamw":
            parts.append(optax.add_decayed_weights(self.weight_decay))
        if self.name == "sgd":
            parts.append(optax.sgd(sched, self.momentum or None, self.nesterov))
        elif self.name == "adam":
            parts.append(optax.adam(sched, self.b1, self.b2, self.eps, nesterov=self.nesterov))
        else:
            parts.append(optax.adamw(sched, self.b1, self.b2, self.eps,
                                     weight_decay=self.weight_decay, nesterov=self.nesterov))
        return optax.chain(*parts)


@dataclass
class UpdateModel:
    """The predicted step delta = -eta * (a * g + b); a None means 1, b None means 0.

    A pytree (a, b, eta are data, name is static), so it can be passed into jitted code.
    """

    a: Any
    b: Any
    eta: float
    name: str

    def precondition(self, g):
        """a * g: what the step does to the gradient before the shift b (D_a in docs/method.md)."""
        return g if self.a is None else jax.tree.map(lambda a, x: a * x, self.a, g)

    def step(self, g):
        """The predicted parameter update for gradient pytree g."""
        ag = self.precondition(g)
        u = ag if self.b is None else jax.tree.map(lambda x, b: x + b, ag, self.b)
        return jax.tree.map(lambda x: -self.eta * x, u)


jax.tree_util.register_dataclass(UpdateModel, data_fields=["a", "b", "eta"], meta_fields=["name"])


def _find(state, cls) -> list:
    return [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


def _f32(x: jax.Array) -> jax.Array:
    """At least float32, whatever the state dtype (bf16 moments are upcast)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_like(tree, params, what: str):
    """Raise unless `tree` (from the state) has the structure and shapes of params."""
    if params is None:
        return
    ts, ps = jax.tree.structure(tree), jax.tree.structure(params)
    if ts != ps:
        raise ValueError(f"update_model: the optimizer state's {what} does not match params:\n"
                         f"  state:  {ts}\n  params: {ps}")
    for (path, s), p in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params)):
        if jnp.shape(s) != jnp.shape(p):
            raise ValueError(f"update_model: state {what}{jax.tree_util.keystr(path)} has shape "
                             f"{jnp.shape(s)} but the parameter has {jnp.shape(p)}")


def _the_one(state, cls, spec: OptimizerSpec):
    found = _find(state, cls)
    if len(found) != 1:
        raise ValueError(
            f"update_model: spec {spec.name!r} needs exactly one {cls.__name__} in opt_state, found "
            f"{len(found)}; was the state made by OptimizerSpec(...).build() with this same spec?")
    return found[0]


def _decay(b, params, wd: float, factor: float = 1.0):
    """b + factor * wd * theta (L2 / decoupled weight decay enters the step affinely)."""
    if not wd:
        return b
    if params is None:
        raise ValueError("update_model: weight_decay > 0 needs params (b contains wd * theta)")
    decay = jax.tree.map(lambda p: factor * wd * _f32(jnp.asarray(p)), params)
    return decay if b is None else jax.tree.map(jnp.add, b, decay)


def update_model(spec: OptimizerSpec | None, opt_state=None, params=None) -> UpdateModel:
    """Read (a, b, eta) of the next step from an optax state built by spec.build().

    spec None: plain GD with eta = 1 (a = 1, b = 0); scores are divided by eta anyway.
    opt_state None: the freshly initialised state (models the first step; needs params).
    Call it outside jit: eta is a Python float, schedule(count) at the step being modeled.

    Adam / AdamW, c = count of steps taken: alpha1 = b1/(1-b1^(c+1)),
    alpha2 = (1-b1)/(1-b1^(c+1)), a = alpha2/(sqrt(v_hat)+eps),
    b = alpha1*m/(sqrt(v_hat)+eps) + wd*theta, v_hat = b2*v/(1-b2^(c+1)). The paper freezes v
    (docs/method.md 2, Deviations); we drop only the new (1-b2) g^2 term and keep the b2 decay that
    the real step applies to v, so the model is exact as g -> 0 and its error is O(g^2) relative
    ((1-b2) g^2 / (2 b2 v)).
    NAdam (nesterov=True) is modeled exactly with its own alpha1, alpha2.
    SGD, momentum mu, state m: a = 1, b = mu*m + wd*theta; Nesterov SGD is modeled exactly:
    a = 1+mu, b = mu^2*m + (1+mu)*wd*theta.
    Not modeled: clip_norm (exact while the weighted gradient's global norm <= clip_norm) and
    "adam" with weight_decay > 0 (decay folded into g before Adam is not affine in g: rejected).
    """
    if spec is None:
        return UpdateModel(a=None, b=None, eta=1.0, name="gd")
    if spec.name == "adam" and spec.weight_decay:
        raise ValueError(
            "update_model: 'adam' with weight_decay > 0 folds L2 decay into the gradient before "
            "Adam's normalisation, so the step is not affine in g and cannot be modeled; train "
            "with name='adamw' (decoupled weight decay) instead.")
    if spec.clip_norm:
        logger.info("update_model ignores clip_norm=%s: exact while |g| <= clip_norm", spec.clip_norm)
    if opt_state is None:
        if params is None:
            raise ValueError("update_model: pass opt_state (after warm-up) or params (first step)")
        opt_state = spec.build().init(params)

    traces = _find(opt_state, optax.TraceState)
    count = None
    if spec.name == "sgd":
        if _find(opt_state, optax.ScaleByAdamState):
            raise ValueError("update_model: spec is 'sgd' but opt_state holds a ScaleByAdamState; "
                             "pass the spec the state was trained with")
        mu = spec.momentum
        if mu:
            m = _the_one(opt_state, optax.TraceState, spec).trace
            _check_like(m, params, "momentum trace")
            if spec.nesterov:
                a = jax.tree.map(lambda t: jnp.full(jnp.shape(t), 1 + mu, _f32(t).dtype), m)
                b = _decay(jax.tree.map(lambda t: mu * mu * _f32(t), m), params, spec.weight_decay, 1 + mu)
            else:
                a, b = None, _decay(jax.tree.map(lambda t: mu * _f32(t), m), params, spec.weight_decay)
        elif traces:
            raise ValueError("update_model: spec has momentum=0 but opt_state holds a TraceState")
        else:
            a, b = None, _decay(None, params, spec.weight_decay)
        name = "sgd-nesterov" if spec.nesterov else ("sgd-momentum" if mu else "sgd")
    else:
        st = _the_one(opt_state, optax.ScaleByAdamState, spec)
        if traces:
            raise ValueError(f"update_model: spec is {spec.name!r} but opt_state also holds a "
                             "TraceState (SGD momentum); pass the spec the state was trained with")
        _check_like(st.mu, params, "Adam mu")
        _check_like(st.nu, params, "Adam nu")
        count = int(st.count)
        if count == 0:
            logger.warning("update_model: Adam has taken no step (v = 0), so a = alpha2/eps is "
                           "huge and scores are meaningless; warm up first")
        a, b = _adam_terms(spec, count, st.mu, st.nu)
        b = _decay(b, params, spec.weight_decay)
        name = spec.name + ("-nesterov" if spec.nesterov else "")

    eta = _eta(spec, opt_state, count)
    return UpdateModel(a=a, b=b, eta=eta, name=name)


def _adam_terms(spec: OptimizerSpec, count: int, mu, nu):
    """a and the momentum part of b for (N)Adam at step count + 1, v decayed but no new g^2.

    Bias corrections go through optax's own tree.bias_correction, in the same order of
    operations as scale_by_adam: 1 - b2^t is a float32 cancellation (~1e-5 relative error at
    early steps) and the model should reproduce optax's step, rounding included.

    One parameter at a time: the formulas' dozen temporaries then exist for one leaf only, not for
    the whole model (for SmolLM2-135M, whole trees of them added ~2.5 GB to the peak memory). The
    operations are the same, but XLA may round optax's jitted bias correction 1 ulp differently for
    a single leaf than for a whole tree.
    """
    leaves, treedef = jax.tree.flatten(mu)
    pairs = [_adam_leaf(spec, count, m, v) for m, v in zip(leaves, treedef.flatten_up_to(nu))]
    return treedef.unflatten([a for a, _ in pairs]), treedef.unflatten([b for _, b in pairs])


def _adam_leaf(spec: OptimizerSpec, count: int, mu, nu):
    """_adam_terms of one parameter's moments (any pytree works; it is given single arrays)."""
    b1, b2 = spec.b1, spec.b2
    t = jnp.asarray(count + 1, jnp.int32)
    bc = optax.tree.bias_correction
    mu, nu = jax.tree.map(_f32, mu), jax.tree.map(_f32, nu)
    ones = jax.tree.map(jnp.ones_like, mu)
    scaled = lambda c, tree: jax.tree.map(lambda x: c * x, tree)
    if spec.nesterov:  # optax: mu_hat = b1 * bc(m_new, t + 1) + (1 - b1) * bc(g, t)
        m_part = scaled(b1, bc(scaled(b1, mu), b1, t + 1))
        g_part = jax.tree.map(jnp.add, scaled(b1, bc(scaled(1 - b1, ones), b1, t + 1)),
                              bc(scaled(1 - b1, ones), b1, t))
    else:               # optax: mu_hat = bc(b1 * m + (1 - b1) * g, t)
        m_part, g_part = bc(scaled(b1, mu), b1, t), bc(scaled(1 - b1, ones), b1, t)
    denom = jax.tree.map(lambda v: jnp.sqrt(v) + spec.eps, bc(scaled(b2, nu), b2, t))
    a = jax.tree.map(jnp.divide, g_part, denom)
    b = jax.tree.map(jnp.divide, m_part, denom)
    return a, b


def _eta(spec: OptimizerSpec, opt_state, fallback_count: int | None) -> float:
    """schedule(count) at the step being modeled, count read from the schedule's own state."""
    sched = _find(opt_state, optax.ScaleByScheduleState)
    if len(sched) > 1:
        raise ValueError(f"update_model: opt_state holds {len(sched)} ScaleByScheduleStates, expected one")
    if sched:
        count = int(sched[0].count)
        if fallback_count is not None and fallback_count != count:
            logger.warning("update_model: schedule count %d != Adam count %d", count, fallback_count)
    elif fallback_count is not None:
        count = fallback_count
    elif spec.schedule == "constant" and not spec.warmup_steps:
        count = 0
    else:
        raise ValueError("update_model: no schedule count in opt_state (no ScaleByScheduleState) "
                         f"for schedule {spec.schedule!r}; build the optimizer with spec.build()")
    return float(spec.lr_schedule()(count))


# ----------------------------------------------------------------------------- optimizer state on disk


def _key(path) -> str:
    """A key path as Orbax names it on disk ("opt_state.1.0.mu.layers.mlp.up_proj.kernel.value")."""
    out = []
    for k in path:
        out.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    return ".".join(out)


def check_shapes(directory: Path, target, what: str) -> None:
    """Compare a saved tree's array shapes with `target` before restoring, so a mismatch is one
    clear line naming the first differing arrays (and Orbax is never asked to restore it)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer() as c:
            saved_tree = c.metadata(directory.absolute()).item_metadata.tree
    except Exception as e:
        raise CheckpointError(f"{directory}: unreadable checkpoint ({type(e).__name__}: {e})") from e
    saved = {_key(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(saved_tree)}
    want = {_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(target)}
    order = lambda k: (not k.startswith("trainable"), k)  # noqa: E731  parameters before optimizer moments
    problems = [f"{k}: checkpoint {saved[k]}, here {want[k]}" for k in sorted(want.keys() & saved.keys(), key=order)
                if saved[k] != want[k]]
    problems += [f"{k}: missing from the checkpoint" for k in sorted(want.keys() - saved.keys(), key=order)]
    problems += [f"{k}: not in this {what}" for k in sorted(saved.keys() - want.keys(), key=order)]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{directory}: the checkpoint does not match this {what}: "
                              f"{'; '.join(problems[:3])}{more}")


def save_optimizer_state(out_dir: str | os.PathLike, spec: OptimizerSpec, opt_state, step: int,
                         extra: dict | None = None) -> Path:
    """Write optimizer.json (the OptimizerSpec) and opt_state/ (Orbax) so selection can rebuild (a, b, eta)."""
    import orbax.checkpoint as ocp

    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    target = out / "opt_state"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    # One tensorstore array per leaf, not OCDBT: OCDBT buffered a copy of the whole state while writing
    # (+0.9 GB of peak memory for SmolLM2-135M's Adam moments, +0.3 GB this way). load_optimizer_state
    # reads both layouts.
    with ocp.Checkpointer(ocp.StandardCheckpointHandler(use_ocdbt=False)) as ckptr:
        ckptr.save(target, args=ocp.args.StandardSave(opt_state))
    write_text(out / "optimizer.json", json.dumps({"spec": spec.to_dict(), "step": int(step), **(extra or {})},
                                                  indent=2))
    return out


def load_optimizer_state(path: str | os.PathLike, params, *, keep=None, mesh=None) -> tuple[OptimizerSpec, Any]:
    """(spec, opt_state) of a warm-up or training run, shaped like `params`.

    params: the model or its Param state (`nnx.state(model, nnx.Param)`); the state is restored in
    float32 over the same tree, ready for `optim.update_model(spec, opt_state, params)`.
    keep: a State of some of the parameters (grads.split_params): the state of the others is not read
    at all (Orbax placeholders), so selection over a parameter subset never holds the whole model's
    moments; their places hold `...`, for grads.restrict to cut away.
    mesh: with fsdp > 1, every array is restored sharded by the FSDP rules (never whole on one device).
    Raises CheckpointError when the directory holds no optimizer state or it does not fit params.
    """
    import orbax.checkpoint as ocp

    from idjax import sharding as shd

    p = Path(path).absolute()
    meta_file, state_dir = p / "optimizer.json", p / "opt_state"
    if not meta_file.exists() or not state_dir.is_dir():
        raise CheckpointError(f"{p}: no optimizer state (expected optimizer.json and opt_state/ written by "
                              "`idjax warmup` or `idjax train`)")
    try:
        spec = OptimizerSpec.from_dict(json.loads(meta_file.read_text())["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: not a valid optimizer description ({e})") from None
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    f32 = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), params)
    target = jax.eval_shape(spec.build().init, f32)
    check_shapes(state_dir, target, "model")
    names = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(params)}
    kept = names if keep is None else {".".join(map(str, path)) for path, _ in nnx.to_flat_state(keep)}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf_target(path, x):
        name = shd.param_name(path)
        mirrored = next((n for n in names if name == n or name.endswith("." + n)), None)
        if mirrored is not None and mirrored not in kept:
            return ocp.PLACEHOLDER
        sharding = shd.param_sharding(name, x.shape, mesh) if shd.active(mesh) else default
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    target = jax.tree_util.tree_map_with_path(leaf_target, target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            opt_state = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
    except Exception as e:
        raise CheckpointError(f"{state_dir}: the optimizer state does not match this model "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from e
    return spec, opt_state
