"""idjax vs a PyTorch implementation of first-order Influence Distillation (issue 8, item 3).

The PyTorch side is written the way the authors' reference code works: per-sample torch.autograd
with batch size 1 (pool, landmark and target gradients), JVP embeddings with torch.func.jvp one
sample and one tangent at a time, RBF kernel ridge regression (KRR) propagation in torch, cosine
scores against the mean target gradient, torch.topk. The idjax side is
pipeline.select_samples with the same configuration (plain GD update model, order 1):
exact=True (every sample a landmark) for the exact-score comparison, and with landmarks for the
full pipeline.

Everything that is not the framework is shared, so that the difference is the framework only:
  * model: SmolLM2-135M-Instruct in float32 (torch loads idjax's own conversion of the GGUF,
    `idjax convert`, written once to experiments/.store/hf-smollm2);
  * data: the first --limit rows of idjax/assets/demo/pool.jsonl and the target set
    idjax/assets/demo/targets/<task>.jsonl, tokenized once with idjax.data.tokenize (identical
    input_ids / labels, response-only loss);
  * parameter subset (--params, default the MLP down_proj weights);
  * THE SKETCH: torch gradients are flattened in idjax's parameter order (layers stacked, linear
    kernels transposed to [in, out]), L2-normalised in torch, converted to numpy and projected
    with idjax's own Projector (same kind, k and seed). The authors' code uses its own random
    projection; here the projection is shared so that gradients, JVPs, propagation and selection
    are what is compared. Its time is reported separately in the torch column;
  * JVP tangents: idjax's tangents (idjax.embed.random_tangents) converted to the HF layout;
  * landmarks: uniform without replacement with numpy default_rng(seed), as choose_landmarks.

Reported in one run: agreement (Spearman of exact scores, max abs diff, top-k overlap; the same for
propagated scores) and time per stage for both, with idjax's compile time measured separately
(a jax.monitoring listener sums tracing, lowering and XLA compile time per pipeline stage) and
each idjax configuration run twice (first call = compile + run; second call = steady state).

    python experiments/torch_compare.py --limit 48 --torch-threads 1

The markdown section is appended to experiments/RESULTS.md (--no-record to only print); --json PATH also
writes the figures as JSON (experiments/device_suite.sh reads it). The torch side runs on CUDA when torch
sees a GPU (--torch-device), float32; the shared sketch then copies each gradient to the host.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from bench_engine import leaf_layout, torch_device, torch_name, torch_synchronizer, write_json  # noqa: E402
from bench_pool import StageClock  # noqa: E402
from idjax import data, models, pipeline  # noqa: E402
from idjax.embed import JVPEmbedder  # noqa: E402
from idjax.grads import split_params  # noqa: E402
from idjax.landmarks import spearman  # noqa: E402
from idjax.sketch import Projector  # noqa: E402
from idjax.store import ArrayStore  # noqa: E402

DEMO = ROOT / "idjax" / "assets" / "demo"
HF_DIR = ROOT / "experiments" / ".store" / "hf-smollm2"
log = logging.getLogger("torch_compare")


# ----------------------------------------------------------------------------- idjax timing


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (VmHWM), GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_idjax(model, pool, targets, config, clock, keep_dir=None):
    """select_samples once: (Selection, stage seconds, compile seconds per stage, wall seconds)."""
    clock.reset()
    t0 = time.perf_counter()
    sel = pipeline.select_samples(model, pool, targets, config, store_dir=keep_dir)
    wall = time.perf_counter() - t0
    log.info("select_samples: %.1f s, peak RSS so far %.2f GiB", wall, peak_rss_gib())
    return sel, dict(sel.info["timings_s"]), dict(clock.compile), wall


# ----------------------------------------------------------------------------- torch side


class TorchInfluence:
    """First-order Influence Distillation in PyTorch, per sample, batch size 1."""

    def __init__(self, hf, hf_trunc, selected, projector, params_rx, torch, device):
        self.torch, self.hf, self.projector, self.device = torch, hf, projector, device
        self.sync = torch_synchronizer(device, torch)
        rx = re.compile(params_rx) if params_rx else None
        for p in hf.parameters():
            p.requires_grad_(False)
        self.named = [(nm, p) for nm, p in hf.named_parameters() if rx is None or rx.search(torch_name(nm))]
        self.params = [p for _, p in self.named]
        for p in self.params:
            p.requires_grad_(True)
        self.layout = leaf_layout(self.named, selected)
        self.treedef = jax.tree.structure(selected)
        self.dim = sum(p.numel() for p in self.params)
        self.base = hf_trunc.model  # embeddings + first B blocks + final norm
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.sketch_s = 0.0
        self.norm_error = {}  # id(example) -> Tensor.norm() / accurate norm - 1

    def _ids(self, ex):
        t = self.torch
        return (t.as_tensor(ex.input_ids[None].astype(np.int64), device=self.device),
                t.as_tensor(ex.labels[None].astype(np.int64), device=self.device))

    def flat_grad(self, ex):
        """The gradient of the sample's mean response-token loss, flattened in idjax's order."""
        ids, lab = self._ids(ex)
        loss = self.hf(input_ids=ids, labels=lab).loss  # HF: shifted CE, mean over labels != -100
        grads = self.torch.autograd.grad(loss, self.params)
        return self.torch.cat([(grads[i].T if tr else grads[i]).reshape(-1)
                               for _, members in self.layout for i, tr in members])

    def sketch(self, flat):
        """idjax's Projector on the torch vector (numpy, reshaped to idjax's leaves); timed apart, after
        the device has finished the gradient (which is torch's time, not the sketch's)."""
        self.sync()
        t0 = time.perf_counter()
        x = flat.detach().cpu().numpy()
        leaves, off = [], 0
        for shape, _ in self.layout:
            size = int(np.prod(shape))
            leaves.append(x[off:off + size].reshape(shape))
            off += size
        out = np.asarray(self.projector.project(jax.tree.unflatten(self.treedef, leaves)))
        self.sketch_s += time.perf_counter() - t0
        return out

    def gradients(self, examples):
        """[n, k] sketches of the L2-normalised per-sample gradients (the cosine variant).

        The norm is sqrt((g * g).sum()): torch's float32 Tensor.norm() on CPU accumulates in one
        float32 register per lane and is off by ~0.1-0.5% at this size (26.5M coordinates; pytorch
        issues #169237, #151761), which would perturb every cosine by a per-sample factor. Its
        error is recorded (norm_error) so its effect on the scores can be reported.
        """
        out = np.zeros((len(examples), self.projector.dim), np.float32)
        for r, ex in enumerate(examples):
            g = self.flat_grad(ex)
            norm = (g * g).sum().sqrt()
            self.norm_error[ex.index] = float(g.norm()) / float(norm) - 1.0
            out[r] = self.sketch(g / norm.clamp_min(1e-30))
        return out

    def target(self, targets):
        """(sketch of g_T, ||g_T||): g_T the mean of the target samples' gradients, one at a time."""
        acc = None
        for ex in targets:
            g = self.flat_grad(ex)
            acc = g if acc is None else acc + g
        v = acc / len(targets)
        return self.sketch(v).astype(np.float64), float(v.double().norm())

    def set_tangents(self, embedder):
        """idjax's JVP tangents (shaped like its truncated model) in the HF layout, as torch tensors."""
        t = self.torch
        flat = {}
        for path, leaf in nnx.to_flat_state(embedder.tangents):
            flat[".".join(map(str, path))] = np.asarray(leaf.get_value() if hasattr(leaf, "get_value") else leaf)
        self.tangents = []
        for k in range(embedder.config.num_tangents):
            tk = {}
            for nm, p in self.base.named_parameters():
                key = torch_name(nm)
                if key not in flat:
                    raise RuntimeError(f"no idjax tangent for HF parameter {nm} ({key})")
                x = flat[key][k]
                layer = re.search(r"layers\.(\d+)\.", nm)
                if layer:
                    x = x[int(layer.group(1))]
                if key.endswith(".kernel"):
                    x = x.T
                tk[nm] = t.from_numpy(np.array(x, np.float32)).to(self.device)  # a writable copy
                if tuple(tk[nm].shape) != tuple(p.shape):
                    raise RuntimeError(f"tangent for {nm}: {tuple(tk[nm].shape)} vs {tuple(p.shape)}")
            self.tangents.append(tk)
        self.primals = {nm: p.detach() for nm, p in self.base.named_parameters()}
        proj = embedder.projection
        self.embed_projection = None if proj is None else t.from_numpy(np.asarray(proj)).to(self.device)

    def embed(self, ex):
        """[K * d_model] (or projected): d/de of the last token's final-normed hidden state along
        each tangent, torch.func.jvp one tangent at a time."""
        from torch.func import functional_call, jvp

        ids, _ = self._ids(ex)

        def f(params):
            return functional_call(self.base, params, (), {"input_ids": ids}).last_hidden_state[0, -1]

        out = self.torch.cat([jvp(f, (self.primals,), (v,))[1] for v in self.tangents])
        return out if self.embed_projection is None else out @ self.embed_projection

    def embeddings(self, examples):
        return self.torch.stack([self.embed(ex) for ex in examples])


def torch_krr(torch, e, landmarks, values, delta):
    """C @ values for RBF KRR: C = K(E, E_L) (K_LL + delta * mean(diag K_LL) I)^-1, bandwidth = median
    distance between distinct landmarks (distances on data centred at the landmark mean); landmark
    rows keep their exact values. Returns (propagated [N], bandwidth)."""
    dev = e.device
    lm = torch.as_tensor(landmarks, device=dev)
    el = e[lm]
    mu = el.mean(0)
    x, xl = e - mu, el - mu

    def sqdist(a, b):
        return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)

    d2 = sqdist(xl, xl)
    d2.fill_diagonal_(0.0)
    iu = torch.triu_indices(len(lm), len(lm), 1, device=dev)
    s = float(torch.quantile(d2[iu[0], iu[1]].double().sqrt(), 0.5))  # numpy-style median
    a = torch.exp(-d2 / (2 * s * s))
    a = a + delta * a.diagonal().mean() * torch.eye(len(lm), device=dev)
    chol = torch.linalg.cholesky(a)
    v = torch.as_tensor(values, dtype=torch.float32, device=dev)[:, None]
    alpha = torch.cholesky_solve(v, chol)
    out = (torch.exp(-sqdist(x, xl) / (2 * s * s)) @ alpha)[:, 0]
    out[lm] = v[:, 0]
    return out.double().cpu().numpy(), s


# ----------------------------------------------------------------------------- main


def overlap(a, b) -> float:
    return len(set(map(int, a)) & set(map(int, b))) / len(a)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=96, help="the first N rows of the pool")
    ap.add_argument("--pool", default=str(DEMO / "pool.jsonl"))
    ap.add_argument("--task", default="definitions", help="target set idjax/assets/demo/targets/<task>.jsonl")
    ap.add_argument("--target-limit", type=int, default=None, help="the first N target rows (default all 16)")
    ap.add_argument("--params", default=r"mlp\.down_proj", help="regex over idjax parameter paths")
    ap.add_argument("--proj-dim", type=int, default=4096)
    ap.add_argument("--proj-kind", default="srht", choices=("srht", "rademacher", "gaussian"))
    ap.add_argument("--landmarks", type=float, default=0.1, help="fraction (< 1) or count of landmarks")
    ap.add_argument("--k", type=float, default=0.1, help="selection budget, a fraction of the pool")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="idjax batch size")
    ap.add_argument("--microbatch", type=int, default=4, help="idjax samples per vmapped gradient "
                    "(fewer: less memory; idjax's automatic choice for down_proj is 8)")
    ap.add_argument("--calls", type=int, default=2, choices=(1, 2), help="select_samples calls per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads (default: every CPU). On a machine shared with other jobs, 1 is "
                    "several times faster for batch-1 loops: many small ops, each an OpenMP region")
    ap.add_argument("--hf-dir", default=str(HF_DIR), help="HF safetensors copy of the model for torch")
    ap.add_argument("--scratch-dir", default=str(ROOT / "experiments" / ".store"),
                    help="where idjax's array stores live during the run (removed after it)")
    ap.add_argument("--torch-device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    ap.add_argument("--skip-landmarks", action="store_true", help="exact comparison only")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    for name in ("idjax", "torch_compare"):
        logging.getLogger(name).setLevel(logging.INFO)
    clock = StageClock()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    device = torch_device(args.torch_device, torch)
    log.info("torch on %s; jax backend %s", device, jax.default_backend())
    t_start = time.perf_counter()

    # ---------------------------------------------------------------- shared inputs
    model, tok = models.load("smollm2-135m", dtype="float32")
    hf_dir = Path(args.hf_dir)
    if not (hf_dir / "config.json").exists():
        log.info("writing the HF copy of the model to %s", hf_dir)
        models.save(model, hf_dir, tok)
    records = data.read_records(args.pool, limit=args.limit)
    pool, pstats = data.tokenize(records, tok, max_length=args.max_length, source=args.pool)
    target_file = DEMO / "targets" / f"{args.task}.jsonl"
    targets, _ = data.tokenize(data.read_records(target_file, limit=args.target_limit), tok,
                               max_length=args.max_length, source=str(target_file))
    n, t = len(pool), len(targets)
    k = max(1, round(args.k * n))
    lens = np.array([len(e.input_ids) for e in pool])
    log.info("pool %d samples (%d tokens, mean %.1f, max %d), %d targets, k = %d", n, lens.sum(), lens.mean(),
             lens.max(), t, k)

    common = dict(k=k, params=args.params, proj_dim=args.proj_dim, proj_kind=args.proj_kind, seed=args.seed,
                  batch_size=args.batch_size, microbatch=args.microbatch, normalize=True, order=1, landmark_method="random",
                  propagation="krr")
    cfg_exact = pipeline.SelectConfig(exact=True, **common)
    cfg_lm = pipeline.SelectConfig(landmarks=args.landmarks, **common)
    projector = Projector(args.proj_kind, args.proj_dim, seed=args.seed)

    # ---------------------------------------------------------------- idjax
    Path(args.scratch_dir).mkdir(parents=True, exist_ok=True)
    keep = Path(tempfile.mkdtemp(prefix="torch-compare-", dir=args.scratch_dir))
    runs = {}
    try:
        log.info("idjax exact, call 1 (compiles)")
        runs["exact1"] = run_idjax(model, pool, targets, cfg_exact, clock, keep / "exact")
        if args.calls == 2:
            log.info("idjax exact, call 2")
            runs["exact2"] = run_idjax(model, pool, targets, cfg_exact, clock)
        if not args.skip_landmarks:
            log.info("idjax landmarks, call 1 (compiles)")
            runs["lm1"] = run_idjax(model, pool, targets, cfg_lm, clock, keep / "landmarks")
            if args.calls == 2:
                log.info("idjax landmarks, call 2")
                runs["lm2"] = run_idjax(model, pool, targets, cfg_lm, clock)
        sel_exact = runs["exact1"][0]
        g_idjax = ArrayStore.open(sel_exact.info["stores"]["gradients"], create=False).to_array()
        e_idjax = None
        if not args.skip_landmarks:
            e_idjax = ArrayStore.open(runs["lm1"][0].info["stores"]["embeddings"], create=False).to_array()
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    for key in ("exact2", "lm2"):
        if key in runs and runs[key][0].rows.tolist() != runs[key[:-1] + "1"][0].rows.tolist():
            log.warning("idjax %s: the two calls selected different rows", key[:-1])

    # ---------------------------------------------------------------- torch
    log.info("loading the HF model from %s (peak RSS so far %.2f GiB)", hf_dir, peak_rss_gib())
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()
    ecfg = cfg_lm.embed
    if getattr(ecfg, "pooling", "last") != "last":
        raise SystemExit(f"the torch JVP embedding implements last-token features only, not {ecfg.pooling!r}")
    tcfg = AutoConfig.from_pretrained(str(hf_dir))
    tcfg.num_hidden_layers = ecfg.num_blocks
    if getattr(tcfg, "layer_types", None):
        tcfg.layer_types = tcfg.layer_types[:ecfg.num_blocks]
    # SDPA's CPU kernel has no forward-mode AD: the JVP model uses eager attention.
    hf_trunc = AutoModelForCausalLM.from_pretrained(str(hf_dir), config=tcfg, dtype=torch.float32,
                                                    attn_implementation="eager").to(device).eval()
    _, selected, _ = split_params(model, args.params)
    ti = TorchInfluence(hf, hf_trunc, selected, projector, args.params, torch, device)
    tt = {}  # torch stage -> (torch seconds, sketch seconds)

    def timed(name, fn):
        s0, t0 = ti.sketch_s, time.perf_counter()
        out = fn()
        ti.sync()
        total = time.perf_counter() - t0
        tt[name] = (total - (ti.sketch_s - s0), ti.sketch_s - s0)
        log.info("torch %s: %.1f s (of which idjax sketch %.1f s); peak RSS so far %.2f GiB", name, total,
                 tt[name][1], peak_rss_gib())
        return out

    # warm-up outside the clocks: torch's first backward, and the sketch's compilation (idjax code)
    t0 = time.perf_counter()
    ti.gradients(pool[:1])
    ti.sync()
    torch_warm = time.perf_counter() - t0
    ti.sketch_s = 0.0

    g_torch = timed("pool gradients", lambda: ti.gradients(pool))
    v_proj, v_norm = timed("target gradient", lambda: ti.target(targets))

    def exact_scores():
        return (torch.from_numpy(g_torch).double() @ torch.from_numpy(v_proj)).numpy() / v_norm

    s_torch = timed("exact scores", exact_scores)
    rows_torch = timed("select (exact)", lambda: torch.topk(torch.from_numpy(s_torch), k).indices.numpy())

    res = {}
    if not args.skip_landmarks:
        emb = JVPEmbedder(model, ecfg)
        ti.set_tangents(emb)
        del emb
        ti.embed(pool[0])  # warm-up
        ti.sync()
        e_torch = timed("embeddings", lambda: ti.embeddings(pool))
        num = cfg_lm.num_landmarks(n)
        lm_torch = timed("landmark choice",
                         lambda: np.sort(np.random.default_rng(args.seed).choice(n, size=num, replace=False)))
        g_l = timed("landmark gradients", lambda: ti.gradients([pool[int(i)] for i in lm_torch]))

        def propagate():
            p_l = g_l.astype(np.float64) @ v_proj
            p, s = torch_krr(torch, e_torch, lm_torch, p_l.astype(np.float32), cfg_lm.delta)
            return p / v_norm, s

        (s_lm_torch, bw_torch) = timed("propagation", propagate)
        rows_lm_torch = timed("select (landmarks)",
                              lambda: torch.topk(torch.from_numpy(s_lm_torch), k).indices.numpy())
        res.update(e_torch=e_torch.cpu().numpy(), lm=lm_torch, s_lm=s_lm_torch, rows_lm=rows_lm_torch, bw=bw_torch)
    rss_gb = peak_rss_gib()
    total_s = time.perf_counter() - t_start

    # ---------------------------------------------------------------- agreement
    s_idjax = sel_exact.scores
    err = np.array([ti.norm_error[e.index] for e in pool])
    s_naive = s_torch / (1.0 + err)  # torch scores had the gradients been normalised with Tensor.norm()
    rows_naive = np.argsort(-s_naive, kind="stable")[:k]
    cos = np.sum(g_idjax * g_torch, 1) / np.linalg.norm(g_idjax, axis=1) / np.linalg.norm(g_torch, axis=1)
    agreement = {  # the figures for --json; the table below formats the same numbers
        "exact_spearman": spearman(s_idjax, s_torch),
        "exact_max_abs_diff": float(np.max(np.abs(s_idjax - s_torch))),
        "exact_topk_overlap": overlap(sel_exact.rows, rows_torch),
        "gradients_max_abs_diff": float(np.max(np.abs(g_idjax - g_torch))),
        "gradients_min_cosine": float(cos.min()),
        "torch_norm_relative_error_min_max": [float(err.min()), float(err.max())],
    }
    agree = [
        ("exact scores: Spearman idjax vs torch", f"{agreement['exact_spearman']:.6f}"),
        ("exact scores: max abs diff (range of the scores)",
         f"{agreement['exact_max_abs_diff']:.2e} ({s_idjax.min():.3f} .. {s_idjax.max():.3f})"),
        (f"exact: top-{k} (top {args.k:.0%}) overlap", f"{agreement['exact_topk_overlap']:.2f}"),
        ("projected per-sample gradients: max abs diff (rows have norm ~1)",
         f"{agreement['gradients_max_abs_diff']:.2e}"),
        ("projected per-sample gradients: min cosine idjax vs torch", f"{agreement['gradients_min_cosine']:.7f}"),
        (f"torch float32 `Tensor.norm()` relative error on these gradients ({device.type.upper()}), min .. max",
         f"{err.min():+.2e} .. {err.max():+.2e}"),
        ("exact scores with torch gradients normalised by `Tensor.norm()`: Spearman vs idjax / max abs diff / "
         f"top-{k} overlap",
         f"{spearman(s_idjax, s_naive):.6f} / {np.max(np.abs(s_idjax - s_naive)):.2e} / "
         f"{overlap(sel_exact.rows, rows_naive):.2f}"),
    ]
    if not args.skip_landmarks:
        sel_lm = runs["lm1"][0]
        same_lm = np.array_equal(sel_lm.landmarks, res["lm"])
        rest = np.setdiff1d(np.arange(n), res["lm"])
        rel = np.linalg.norm(e_idjax - res["e_torch"], axis=1) / np.linalg.norm(e_idjax, axis=1)
        bw_idjax = sel_lm.info.get("propagation", {}).get("bandwidth", float("nan"))
        agreement.update({
            "embeddings_max_relative_row_diff": float(rel.max()),
            "same_landmarks": bool(same_lm),
            "krr_bandwidth_idjax_torch": [float(bw_idjax), float(res["bw"])],
            "propagated_spearman": spearman(sel_lm.scores, res["s_lm"]),
            "propagated_spearman_non_landmark": spearman(sel_lm.scores[rest], res["s_lm"][rest]),
            "propagated_max_abs_diff": float(np.max(np.abs(sel_lm.scores - res["s_lm"]))),
            "propagated_topk_overlap": overlap(sel_lm.rows, res["rows_lm"]),
            "propagated_vs_exact_spearman_non_landmark_idjax_torch": [spearman(sel_lm.scores[rest], s_idjax[rest]),
                                                                      spearman(res["s_lm"][rest], s_torch[rest])],
        })
        agree += [
            ("JVP embeddings: max relative row difference, norm(E_idjax - E_torch) / norm(E_idjax)",
             f"{agreement['embeddings_max_relative_row_diff']:.2e}"),
            (f"landmarks: the same {len(res['lm'])} indices", str(same_lm)),
            ("KRR bandwidth idjax / torch", f"{bw_idjax:.6g} / {res['bw']:.6g}"),
            ("propagated scores: Spearman idjax vs torch (all rows)", f"{agreement['propagated_spearman']:.6f}"),
            ("propagated scores: Spearman idjax vs torch (non-landmark rows)",
             f"{agreement['propagated_spearman_non_landmark']:.6f}"),
            ("propagated scores: max abs diff", f"{agreement['propagated_max_abs_diff']:.2e}"),
            (f"propagated: top-{k} overlap idjax vs torch", f"{agreement['propagated_topk_overlap']:.2f}"),
            ("(for scale, not a framework comparison) propagated vs exact scores, Spearman on non-landmark "
             "rows: idjax / torch", "{:.3f} / {:.3f}".format(
                 *agreement["propagated_vs_exact_spearman_non_landmark_idjax_torch"])),
        ]

    # ---------------------------------------------------------------- speed table
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731

    def ratio(a, b):
        return "-" if a is None or b is None or max(a, b) < 0.05 else f"{a / b:.2f}"

    def cells(path, stage, tsec, tsketch=0.0):
        """idjax call 1, compile 1, call 2, compile 2, idjax excl. compile, torch, two ratios."""
        c1 = runs[path + "1"][1].get(stage), runs[path + "1"][2].get(stage, 0.0)
        c2 = (runs[path + "2"][1].get(stage), runs[path + "2"][2].get(stage, 0.0)) if path + "2" in runs \
            else (None, None)
        steady = min(x - c for x, c in (c1, c2) if x is not None)
        steady = max(steady, 0.0)
        if tsec is None:
            tcell = "-"
        else:
            tcell = f"{tsec:.2f}" + (f" ({tsec - tsketch:.2f} + sketch {tsketch:.2f})" if tsketch > 0.005 else "")
        return [fmt(c1[0]), f"{c1[1]:.1f}", fmt(c2[0]), "-" if c2[1] is None else f"{c2[1]:.1f}", fmt(steady),
                tcell, ratio(c1[0], tsec), ratio(steady, tsec)]

    def row(label, path, stage, tkeys):
        got = [tt[x] for x in tkeys if x in tt]
        tsec = sum(a + b for a, b in got) if got else None
        return "| " + " | ".join([label] + cells(path, stage, tsec, sum(b for _, b in got))) + " |"

    totals = {}  # path -> the select_samples figures of its total row, for --json

    def total_row(label, path, tkeys):
        tsec = sum(sum(tt[x]) for x in tkeys)
        walls = [runs[r][3] for r in (path + "1", path + "2") if r in runs]
        comps = [sum(runs[r][2].values()) for r in (path + "1", path + "2") if r in runs]
        steady = min(w - c for w, c in zip(walls, comps))
        totals["exact" if path == "exact" else "landmarks"] = {
            "idjax_wall_s": walls, "idjax_compile_s": comps, "idjax_excl_compile_s": steady,
            "torch_plus_sketch_s": tsec, "torch_stages": list(tkeys)}
        return "| " + " | ".join([label, f"{walls[0]:.2f}", f"{comps[0]:.1f}",
                                  f"{walls[1]:.2f}" if len(walls) > 1 else "-",
                                  f"{comps[1]:.1f}" if len(comps) > 1 else "-", f"{steady:.2f}",
                                  f"{tsec:.2f}", ratio(walls[0], tsec), ratio(steady, tsec)]) + " |"

    table = ["| stage | idjax call 1 | compile in call 1 | idjax call 2 | compile in call 2 | idjax excl. compile "
             "| torch (torch + shared sketch) | idjax/torch, call 1 | idjax/torch, excl. compile |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| **exact path** (every sample a landmark, N = {n}) | | | | | | | | |",
             row(f"pool gradients ({n} samples)", "exact", "gradients", ["pool gradients"]),
             row(f"target gradient ({t} samples)", "exact", "targets", ["target gradient"]),
             row("scores (G v / \\|\\|v\\|\\|)", "exact", "propagate", ["exact scores"]),
             row("first-order weights (idjax only)", "exact", "weights", []),
             row(f"select top-{k}", "exact", "select", ["select (exact)"]),
             total_row("total (idjax: select_samples wall)", "exact",
                       ["pool gradients", "target gradient", "exact scores", "select (exact)"])]
    if not args.skip_landmarks:
        num = len(res["lm"])
        table += [
            f"| **landmark path** ({num} landmarks, random, KRR) | | | | | | | | |",
            row(f"JVP embeddings ({n} samples, {ecfg.num_blocks} blocks, {ecfg.num_tangents} tangents)", "lm", "embed",
                ["embeddings"]),
            row("landmark choice", "lm", "landmarks", ["landmark choice"]),
            row(f"landmark gradients ({num} samples)", "lm", "gradients", ["landmark gradients"]),
            row(f"target gradient ({t} samples; torch: the run above, done once)", "lm", "targets",
                ["target gradient"]),
            row("propagation (KRR fit + apply)", "lm", "propagate", ["propagation"]),
            row("first-order weights (idjax only)", "lm", "weights", []),
            row(f"select top-{k}", "lm", "select", ["select (landmarks)"]),
            total_row("total (idjax: select_samples wall)", "lm",
                      ["embeddings", "landmark choice", "landmark gradients", "target gradient", "propagation",
                       "select (landmarks)"])]
    # ---------------------------------------------------------------- report
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    import flax

    cmd = "python experiments/torch_compare.py " + " ".join(
        f"'{a}'" if any(c in a for c in "\\|*()") else a for a in (sys.argv[1:] if argv is None else argv))
    load = os.getloadavg()
    desc = [
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; whole run {total_s:.0f} s, "
        f"peak RSS {rss_gb:.1f} GiB",
        f"- machine: {os.cpu_count()} CPUs (`nproc`), {cpu.split(':', 1)[-1].strip()}; jax backend "
        f"{jax.default_backend()}, torch device {device}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} on {os.cpu_count()} cores (a load above the core count means other jobs shared the "
        "machine: absolute times are then noisy and both frameworks were slowed)",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}",
        f"- model: SmolLM2-135M-Instruct float32 (torch: `idjax convert` of the same GGUF); gradients w.r.t. "
        f"`{args.params}` ({ti.dim:,} parameters), L2-normalised, then the shared idjax {args.proj_kind} sketch, "
        f"k = {args.proj_dim}, seed {args.seed}; plain GD update model, first order, cosine scores against the "
        "mean target gradient",
        f"- data: first {args.limit} rows of idjax/assets/demo/pool.jsonl ({n} kept, {int(lens.sum())} tokens, "
        f"mean {lens.mean():.1f}, max {lens.max()}), target `{args.task}` ({t} samples), tokenized once with "
        f"idjax.data.tokenize (max_length {args.max_length}); budget k = {k}",
        f"- idjax: pipeline.select_samples (batch {args.batch_size}, microbatch {args.microbatch}), each "
        f"configuration called {args.calls}x in one process; 'compile' = JAX tracing + lowering + XLA compile "
        "seconds inside the stage (a jax.monitoring listener); 'excl. compile' = the smaller over the calls of "
        "stage time minus its compile time. torch: per sample, batch size 1, one untimed warm-up sample "
        f"({torch_warm:.1f} s, including the first compile of the shared sketch); the torch column is "
        "torch time + time in the shared idjax sketch (numpy conversion + Projector.project); torch has no "
        "compile step",
    ]
    text = "\n".join(desc) + "\n\nAgreement:\n\n| quantity | value |\n|---|---|\n" + "\n".join(
        f"| {a} | {b} |" for a, b in agree) + "\n\nTime per stage (seconds):\n\n" + "\n".join(table) + "\n"
    print("\n" + text, flush=True)
    if args.json:
        write_json(args.json, {
            "command": cmd, "args": vars(args), "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "torch_device": str(device),
            "torch_threads": torch.get_num_threads(), "pool": n, "pool_tokens": int(lens.sum()), "targets": t,
            "k": k, "whole_run_s": total_s, "peak_rss_gib": rss_gb, "torch_warm_up_s": torch_warm,
            "agreement": agreement, "totals": totals,
            "idjax_calls": {key: {"wall_s": wall, "stages_s": stages, "compile_s": compile_s}
                            for key, (_, stages, compile_s, wall) in runs.items()},
            "torch_stages": {name: {"torch_s": a, "sketch_s": b} for name, (a, b) in tt.items()}})
    if not args.no_record:
        out = ROOT / "experiments" / "RESULTS.md"
        with out.open("a") as fh:  # one write: another job may append to the same file
            fh.write(f"\n## idjax vs a PyTorch Influence Distillation (issue 8, {datetime.date.today()})\n\n" + text)
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
