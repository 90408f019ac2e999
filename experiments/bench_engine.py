"""Engine throughput benchmark (issue 3): idjax vs PyTorch on SmolLM2-135M, float32, CPU.

One run, the same samples for every method:
  * per-example gradients (normalised, Rademacher sketch of --proj-dim or "none"):
      idjax PerExampleGradients (vmap(grad) over batches of 8, jitted)
      vs (a) torch.autograd per sample, batch size 1, blockwise torch Rademacher projection
      vs (b) torch.func functional_call + vmap(grad) over the same padded batches of 8
  * JVP embeddings (first --blocks blocks + final norm, --tangents Gaussian tangents):
      idjax JVPEmbedder vs torch.func.jvp per sample, one tangent at a time
  * the machine's float32 matmul peak (jitted jnp.dot 2048x2048, best of several) and idjax's
    achieved FLOP/s as a fraction of it (6*N*tokens for a gradient, 4*N_trunc*tokens for a jvp,
    tokens = real, non-pad tokens of the sample).

    python experiments/bench_engine.py --samples 24 --proj-dim 1024 --params 'mlp\\.down_proj'

The markdown table is printed and appended to experiments/RESULTS.md (--no-record to skip); --json PATH
also writes the figures as JSON (experiments/device_suite.sh reads it). The torch baselines run on CUDA
when torch sees a GPU (--torch-device), in float32 like idjax.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from idjax import data, models  # noqa: E402
from idjax.embed import EmbedConfig, JVPEmbedder  # noqa: E402
from idjax.grads import GradientConfig, PerExampleGradients  # noqa: E402
from idjax.sketch import Projector  # noqa: E402

IGNORE = -100


# ----------------------------------------------------------------------------- data


def docstring_records(n: int) -> list[dict]:
    """Chat records built from the standard library's own docstrings (no model generation)."""
    mods = ["json", "os.path", "textwrap", "itertools", "functools", "re", "shutil", "random",
            "statistics", "string", "heapq", "bisect", "fnmatch", "glob", "base64", "difflib",
            "copy", "math", "operator", "collections"]
    recs, seen = [], set()
    for name in mods:
        mod = importlib.import_module(name)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr)
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or len(doc) < 80 or doc in seen:
                continue
            seen.add(doc)
            recs.append({"id": f"{name}.{attr}", "messages": [
                {"role": "user", "content": f"Explain this Python function: {name}.{attr}"},
                {"role": "assistant", "content": doc[:700]},
            ]})
    # Interleave modules so short and long docstrings (both buckets) are represented.
    rng = np.random.default_rng(0)
    order = rng.permutation(len(recs))
    return [recs[i] for i in order[:n]]


# ----------------------------------------------------------------------------- helpers


def throughput(fn, items, n: int, repeats: int, label: str) -> float:
    """Samples/s of fn(item) over all items (fn must block until done), median of `repeats` passes."""
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        ts.append(time.perf_counter() - t0)
    rate = n / float(np.median(ts))
    print(f"{label}: {rate:.2f} samples/s", flush=True)
    return rate


def warm_up(fn, batches) -> dict[int, float]:
    """Compile + first call of fn, once per length bucket: seconds per bucket."""
    first = {}
    for b in batches:
        if b.bucket not in first:
            t0 = time.perf_counter()
            fn(b)
            first[b.bucket] = time.perf_counter() - t0
    return first


def matmul_peak(n: int = 2048, tries: int = 10) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, b).block_until_ready()
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def torch_name(name: str) -> str:
    """HF parameter name -> the idjax path style the --params regex is written against."""
    name = re.sub(r"^model\.", "", name)
    name = re.sub(r"layers\.\d+\.", "layers.", name)
    name = name.replace("embed_tokens.weight", "embed_tokens.embedding")
    return re.sub(r"(proj)\.weight$", r"\1.kernel", name)


def leaf_layout(named, selected) -> list[tuple[tuple, list[tuple[int, bool]]]]:
    """For each leaf of idjax's selected params (jax.tree.leaves order): (shape, [(index into
    `named`, transpose?) ...] by layer).

    idjax stacks layers on a leading axis and stores linear kernels as [in, out]; HF keeps one
    [out, in] tensor per layer.
    """
    out = []
    for path, leaf in nnx.to_flat_state(selected):
        dotted = ".".join(map(str, path))
        members = []
        for i, (nm, _) in enumerate(named):
            if torch_name(nm) == dotted:
                layer = re.search(r"layers\.(\d+)\.", nm)
                members.append((int(layer.group(1)) if layer else -1, i))
        shape = tuple(np.shape(leaf.get_value() if hasattr(leaf, "get_value") else leaf))
        out.append((shape, [(i, dotted.endswith(".kernel")) for _, i in sorted(members)]))
    shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(selected)]
    if shapes != [s for s, _ in out]:
        raise RuntimeError(f"leaf order differs between nnx.to_flat_state and jax.tree.leaves: {shapes}")
    return out


def idjax_layout(named, selected) -> list[tuple[int, bool]]:
    """(index into `named`, transpose?) in the order idjax flattens its selected parameters:
    concatenating torch gradients in this order gives the same flat vector as idjax's, so
    per-sample gradients can be compared coordinate by coordinate."""
    return [member for _, members in leaf_layout(named, selected) for member in members]


def torch_device(choice: str, torch):
    """'auto' = CUDA when torch sees a GPU (the device suite's baselines should not be CPU-bound there)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def torch_synchronizer(device, torch):
    """A function that waits for the device: CUDA kernels run asynchronously, so a timed call must wait."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def torch_rademacher_project(flat, k: int, block: int, seed: int, torch):
    """flat [d] @ R [d, k] / sqrt(k), R +-1 generated block by block (32 signs per int32 word), on flat's device."""
    dev = flat.device
    out = torch.zeros(k, dtype=torch.float32, device=dev)
    words = -(-k // 32)
    shifts = torch.arange(32, dtype=torch.int32, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    for s in range(0, flat.numel(), block):
        x = flat[s:s + block]
        w = torch.randint(-2**31, 2**31, (x.numel(), words), dtype=torch.int32, generator=g, device=dev)
        bits = ((w.unsqueeze(-1) >> shifts) & 1).reshape(x.numel(), words * 32)[:, :k]
        out += x @ (1.0 - 2.0 * bits.to(torch.float32))
    return out / math.sqrt(k)


# ----------------------------------------------------------------------------- benchmark


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--proj-dim", default="1024", help='sketch dimension k, or "none" (no projection)')
    ap.add_argument("--params", default="norm", help="regex over parameter paths (idjax style, e.g. "
                    "'mlp\\.down_proj'); '' = all parameters. Default 'norm' (the RMSNorm weights): on a "
                    "2-core CPU the k=1024 sketch of all 134M parameters takes minutes per batch")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per method (median)")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tangents", type=int, default=2)
    ap.add_argument("--block-size", type=int, default=2**14, help="sketch rows generated at a time")
    ap.add_argument("--skip", default="", help="comma list of: torch_loop,torch_vmap,embed")
    ap.add_argument("--torch-device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: every CPU; "
                    "1 is several times faster for the batch-1 loop on a machine shared with other jobs)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the figures to PATH as JSON")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    proj = None if args.proj_dim == "none" else int(args.proj_dim)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    device = torch_device(args.torch_device, torch)
    sync = torch_synchronizer(device, torch)

    print("loading models ...", flush=True)
    model, tok = models.load("smollm2-135m", dtype="float32")
    path = models.resolve("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.to(device).eval()
    print(f"torch baselines on {device}; jax backend {jax.default_backend()}", flush=True)

    recs = docstring_records(args.samples)
    examples, _ = data.tokenize(recs, tok, max_length=128)
    # As the selection passes batch them: length-sorted, each batch padded to the next ladder length, with the
    # loss positions (the lm-head and the cross-entropy run there only, as the loss needs them).
    batches = data.sorted_batches(examples, 8, pad_id=tok.pad_token_id)
    n = len(examples)
    lens = np.array([len(e.input_ids) for e in examples])
    tokens = int(lens.sum())
    buckets = sorted({b.bucket for b in batches})
    print(f"{n} samples, {tokens} tokens (mean {lens.mean():.1f}), {len(batches)} batches, buckets {buckets}")

    notes = []
    results = {}
    peak = matmul_peak()
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s")

    # ------------------------------------------------------------------ gradients: idjax
    projector = Projector("none" if proj is None else "rademacher", proj or 1, block_size=args.block_size)
    peg = PerExampleGradients(model, projector, GradientConfig(params=args.params, normalize=True))
    n_sel = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(peg.selected))
    N = model.config.num_params
    print(f"gradient w.r.t. {n_sel:,} of {N:,} parameters; projection {args.proj_dim}")
    def idjax_grads(b):
        return jax.block_until_ready(peg(b)[0])

    first = warm_up(idjax_grads, batches)
    print(f"idjax grads warm-up (compile + 1 batch) per bucket: {first}", flush=True)
    results["grad_idjax"] = throughput(idjax_grads, batches, n, args.repeats, "idjax grads")
    idjax_out = peg.run(batches)  # rows in the order of `examples`

    # ------------------------------------------------------------------ gradients: torch loop
    rx = re.compile(args.params) if args.params else None
    named = [(nm, p) for nm, p in hf.named_parameters() if rx is None or rx.search(torch_name(nm))]
    tparams = [p for _, p in named]
    for p in hf.parameters():
        p.requires_grad_(False)
    for p in tparams:
        p.requires_grad_(True)
    n_sel_t = sum(p.numel() for p in tparams)
    if n_sel_t != n_sel:
        notes.append(f"torch selects {n_sel_t:,} parameters, idjax {n_sel:,} (tied embedding counted once in torch)")

    layout = idjax_layout(named, peg.selected)
    if len(layout) != len(named):
        notes.append(f"{len(named) - len(layout)} torch parameters have no idjax counterpart in the layout")

    def torch_one(ex):
        ids = torch.as_tensor(ex.input_ids[None].astype(np.int64), device=device)
        lab = torch.as_tensor(ex.labels[None].astype(np.int64), device=device)
        loss = hf(input_ids=ids, labels=lab).loss  # mean CE over response tokens (shifted)
        grads = torch.autograd.grad(loss, tparams)
        flat = torch.cat([(grads[i].T if t else grads[i]).reshape(-1) for i, t in layout])
        flat = flat / flat.norm().clamp_min(1e-30)
        if proj is None:
            return flat
        return torch_rademacher_project(flat, proj, args.block_size, 0, torch)

    if "torch_loop" not in skip:
        torch_one(examples[0])  # warm-up
        sync()
        outs = {}

        def torch_loop(ex):
            outs[ex.index] = torch_one(ex)
            sync()

        results["grad_torch_loop"] = throughput(torch_loop, examples, n, args.repeats, "torch loop grads")
        if proj is not None:
            # Different PRNGs => different sketches; the norms of normalized sketches still agree
            # in expectation (~1 +- sqrt(2/k)), a weak sanity check that both compute a gradient.
            a = np.linalg.norm(idjax_out, axis=1)
            notes.append(f"sketch norms (should be ~1): idjax {a.mean():.3f}+-{a.std():.3f}; torch "
                         f"{np.mean([float(v.norm()) for v in outs.values()]):.3f}")
        else:
            cos = [float(np.dot(idjax_out[p], outs[e.index].cpu().numpy())) for p, e in enumerate(examples)]
            notes.append(f"idjax vs torch per-sample normalized gradient cosine: min {min(cos):.5f}")

    # ------------------------------------------------------------------ gradients: torch.func vmap
    if "torch_vmap" not in skip:
        from torch.func import functional_call, grad, vmap

        sel = {nm: p.detach() for nm, p in named}

        def loss_fn(params, ids, mask, lab):
            out = functional_call(hf, params, (), {"input_ids": ids[None], "attention_mask": mask[None]})
            logits = out.logits[0, :-1]
            tgt = lab[1:]
            m = tgt != IGNORE
            lp = torch.log_softmax(logits, -1)
            picked = torch.gather(lp, -1, torch.where(m, tgt, 0)[:, None])[:, 0]
            return -(picked * m).sum() / m.sum().clamp_min(1)

        def per_sample(params, ids, mask, lab):
            g = grad(loss_fn)(params, ids, mask, lab)
            flat = torch.cat([g[nm].reshape(-1) for nm in sel])
            return flat / flat.norm().clamp_min(1e-30)

        vg = vmap(per_sample, in_dims=(None, 0, 0, 0))

        def vbatch(b):
            ids = torch.as_tensor(b.input_ids.astype(np.int64), device=device)
            mask = torch.as_tensor(b.attention_mask.astype(np.int64), device=device)
            lab = torch.as_tensor(b.labels.astype(np.int64), device=device)
            g = vg(sel, ids, mask, lab)
            if proj is not None:
                g = torch.stack([torch_rademacher_project(r, proj, args.block_size, 0, torch) for r in g])
            sync()
            return g

        try:
            vbatch(batches[0])  # warm-up
            results["grad_torch_vmap"] = throughput(vbatch, batches, n, args.repeats, "torch.func vmap grads")
            if proj is not None:
                notes.append("torch.func vmap computes the 8 gradients batched, then projects each row "
                             "(the projection is not vmapped: regenerating signs per row as in the loop)")
        except Exception as e:  # record honestly
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            results["grad_torch_vmap"] = None
            notes.append(f"torch.func vmap over HF Llama failed: {msg}")
            print("torch.func vmap failed:\n" + traceback.format_exc(limit=3), flush=True)

    # ------------------------------------------------------------------ JVP embeddings
    if "embed" not in skip:
        emb = JVPEmbedder(model, EmbedConfig(num_blocks=args.blocks, num_tangents=args.tangents))
        n_trunc = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(emb.params))
        def idjax_embed(b):
            return jax.block_until_ready(emb(b))

        warm_up(idjax_embed, batches)
        results["emb_idjax"] = throughput(idjax_embed, batches, n, args.repeats, "idjax embeddings")

        from torch.func import functional_call, jvp

        for p in hf.parameters():
            p.requires_grad_(False)
        base = hf.model  # LlamaModel: embeddings + blocks + final norm
        # SDPA's CPU flash kernel has no forward-mode AD ("not implemented"): use eager attention.
        hf.set_attn_implementation("eager")
        del base.layers[args.blocks:]
        base.config.num_hidden_layers = args.blocks
        if hasattr(base.config, "layer_types") and base.config.layer_types:
            base.config.layer_types = base.config.layer_types[:args.blocks]
        tp = {nm: p.detach() for nm, p in base.named_parameters()}
        g = torch.Generator().manual_seed(0)
        tangents = [{nm: torch.randn(p.shape, generator=g).to(device) for nm, p in tp.items()}
                    for _ in range(args.tangents)]

        def torch_embed(ex):
            ids = torch.as_tensor(ex.input_ids[None].astype(np.int64), device=device)

            def f(params):
                h = functional_call(base, params, (), {"input_ids": ids}).last_hidden_state
                return h[0, -1]

            out = torch.cat([jvp(f, (tp,), (v,))[1] for v in tangents])
            sync()
            return out

        torch_embed(examples[0])
        results["emb_torch_loop"] = throughput(torch_embed, examples, n, args.repeats, "torch jvp embeddings")

    # ------------------------------------------------------------------ report
    def fmt(x, unit=""):
        return "failed" if x is None else f"{x:.2f}{unit}"

    g_flops = 6 * N * tokens / n  # per sample
    lines = ["| method | samples/s | idjax speed-up | achieved GFLOP/s | fraction of matmul peak |",
             "|---|---|---|---|---|"]
    gi = results["grad_idjax"]
    lines.append(f"| gradients: idjax PerExampleGradients (vmap, batch 8) | {gi:.2f} | 1.00x | "
                 f"{gi * g_flops / 1e9:.1f} | {gi * g_flops / peak:.1%} |")
    for key, label in [("grad_torch_loop", "gradients: torch.autograd per sample (batch 1)"),
                       ("grad_torch_vmap", "gradients: torch.func functional_call + vmap(grad) (batch 8)")]:
        if key in results:
            v = results[key]
            lines.append(f"| {label} | {fmt(v)} | {fmt(None if v is None else gi / v, 'x')} | "
                         f"{fmt(None if v is None else v * g_flops / 1e9)} | "
                         f"{'-' if v is None else f'{v * g_flops / peak:.1%}'} |")
    if "emb_idjax" in results:
        e_flops = 4 * n_trunc * tokens / n
        ei, et = results["emb_idjax"], results["emb_torch_loop"]
        lines.append(f"| JVP embeddings: idjax JVPEmbedder (batch 8 x K={args.tangents}) | {ei:.2f} | 1.00x | "
                     f"{ei * e_flops / 1e9:.1f} | {ei * e_flops / peak:.1%} |")
        lines.append(f"| JVP embeddings: torch.func.jvp per sample, one tangent at a time | {et:.2f} | "
                     f"{ei / et:.2f}x | {et * e_flops / 1e9:.1f} | {et * e_flops / peak:.1%} |")
    table = "\n".join(lines)

    targets = []
    if "grad_torch_loop" in results:
        s = gi / results["grad_torch_loop"]
        targets.append(f"gradients >= 1.5x the per-sample loop: {s:.2f}x -> {'MET' if s >= 1.5 else 'NOT MET'}")
    if "emb_idjax" in results:
        s = results["emb_idjax"] / results["emb_torch_loop"]
        targets.append(f"JVP embeddings >= 3x the per-sample loop: {s:.2f}x -> {'MET' if s >= 3 else 'NOT MET'}")

    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    import flax
    import transformers
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + [
        f"'{a}'" if any(c in a for c in "\\|*()") else a for a in sys.argv[1:]])
    desc = [
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {os.cpu_count()} CPUs (`nproc`), {cpu.split(':', 1)[-1].strip()}; shared with other jobs "
        "during the run, so absolute numbers are noisy",
        f"- versions: python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"jax backend {jax.default_backend()}, torch device {device}",
        f"- model: SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to float32), N = {N:,} "
        f"(config.num_params); gradient w.r.t. {n_sel:,} parameters"
        f"{'' if not args.params else f' matching `{args.params}`'}; projection: "
        f"{'none' if proj is None else f'Rademacher k={proj}, block {args.block_size}'}; L2-normalized",
        f"- data: {n} chat records built from Python standard-library docstrings, {tokens} tokens "
        f"(mean {lens.mean():.1f}, max_length 128), {len(batches)} batches of 8 in buckets {buckets}; "
        f"timed passes: {args.repeats} (median), after a warm-up that compiles",
        f"- matmul peak (jitted float32 jnp.dot 2048x2048, best of 10): {peak / 1e9:.1f} GFLOP/s; "
        f"FLOPs: 6*N*tokens per gradient, 4*N_trunc*tokens per jvp (N_trunc = "
        f"{n_trunc if 'emb_idjax' in results else 0:,}, blocks={args.blocks}, includes the 28M embedding "
        "table, which costs a gather not a matmul, so these fractions are upper estimates); tokens = "
        "real (non-pad) tokens",
        "- idjax compile + first batch per bucket (s): "
        + ", ".join(f"{k}: {v:.1f}" for k, v in first.items() if v is not None),
    ]
    text = "\n".join(desc) + "\n\n" + table + "\n\n" + "\n".join(f"- {t}" for t in targets + notes) + "\n"
    print("\n" + text)
    if args.json:
        write_json(args.json, {
            "command": cmd, "args": vars(args), "jax_backend": jax.default_backend(),
            "jax_devices": [str(d) for d in jax.devices()], "torch_device": str(device),
            "torch_threads": torch.get_num_threads(), "samples": n, "tokens": tokens, "batches": len(batches),
            "matmul_peak_flops": peak, "params_selected": n_sel, "samples_per_s": results,
            "idjax_speedup": {key: (None if results.get(base) is None else results[mine] / results[base])
                              for key, mine, base in [("gradients_vs_torch_loop", "grad_idjax", "grad_torch_loop"),
                                                      ("gradients_vs_torch_vmap", "grad_idjax", "grad_torch_vmap"),
                                                      ("embeddings_vs_torch_loop", "emb_idjax", "emb_torch_loop")]
                              if base in results},
            "idjax_compile_first_batch_s": {str(k): v for k, v in first.items()},
            "targets": targets, "notes": notes})
    if not args.no_record:
        out = ROOT / "experiments" / "RESULTS.md"
        head = "" if out.exists() else "# Experiment results\n"
        with out.open("a") as fh:
            fh.write(head + "\n## Engine throughput (issue 3)\n\n" + text)
        print(f"appended to {out}")


def json_ready(x):
    """numpy scalars as Python numbers, NaN / inf as null: strict JSON that any reader parses."""
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (np.generic, np.ndarray)):
        return json_ready(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path, record: dict) -> None:
    """The run's figures for scripts (experiments/device_suite.sh); the markdown stays the human record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(record), indent=1, default=str, allow_nan=False) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
