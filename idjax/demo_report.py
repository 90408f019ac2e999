"""The demo's report: the table `idjax demo` prints and the figure it saves (demo.png), from the
dictionary `demo.run_demo` returns and writes to demo.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from idjax.io import atomic_write


def save_plot(report: dict, path) -> Path:
    """demo.png: target loss of before / random / selected, and the domain mix of both subsets."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.6]})
    names = ["before\n(warmed-up)", f"random {report['k']}", f"selected {report['k']}"]
    losses = [report["loss"]["before"], report["loss"]["random"], report["loss"]["selected"]]
    bars = ax1.bar(names, losses, color=["#9e9e9e", "#f4a259", "#3c7dc4"])
    for b, v in zip(bars, losses):
        ax1.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=9)
    ax1.set_ylim(0, 1.12 * max(losses))
    ax1.set_ylabel("target loss (eval set, lower is better)")
    ax1.set_title(f"{report['task']}: eval loss after {report['settings']['train_steps']} steps")

    domains = report["pool"]["domains"]
    comp = report["composition"]
    x = np.arange(len(domains))
    width = 0.27
    for j, (which, color) in enumerate([("pool", "#9e9e9e"), ("random", "#f4a259"), ("selected", "#3c7dc4")]):
        vals = [100 * comp[which][d]["fraction"] for d in domains]
        ax2.bar(x + (j - 1) * width, vals, width, label=which, color=color)
    ax2.set_xticks(x, domains, fontsize=9)
    ax2.set_ylabel("% of the subset")
    ax2.set_ylim(0, 100)
    ax2.set_title(f"domain mix: k = {report['k']} of {report['pool']['examples']} pool samples")
    ax2.legend(fontsize=9)
    fig.suptitle(f"idjax demo: Influence Distillation on {report['model']} ({report['landmarks']} landmarks)",
                 fontsize=11)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return path


def _row(cells, widths, aligns) -> str:
    return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, aligns)) + " |"


def _table(header, rows, aligns) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, aligns)) + "|"
    return "\n".join([_row(header, widths, aligns), sep, *(_row([str(c) for c in r], widths, aligns) for r in rows)])


def format_report(report: dict) -> str:
    """The demo's summary as markdown tables (pastes into a README)."""
    s, t, st = report["settings"], report["timings_s"], report["selection_timings_s"]
    reused = report["reused"]

    def secs(name, flag=None):
        v = t.get(name)
        text = "-" if v is None else f"{v:.1f}"
        return text + (" (reused)" if flag and reused.get(flag) else "")

    n = report["pool"]["examples"]
    head = (f"idjax demo: task `{report['task']}`, {report['model']} on {report['device']}; pool {n} samples "
            f"({len(report['pool']['domains'])} domains), k = {report['k']} ({100 * report['k'] / n:.0f}%), "
            f"{report['landmarks']} random landmarks, warm-up {report['warmup']['steps']} AdamW steps on "
            f"{report['warmup']['samples']} samples, fine-tuning {s['train_steps']} AdamW steps of "
            f"{s['batch_size']} (lr {s['lr']:g}), max {s['max_length']} tokens")
    sub = ", ".join(f"{k} {v:.1f}" for k, v in st.items())
    stages = [
        ["read + tokenize data", secs("data", "data")],
        ["warm-up", secs("warmup", "warmup")],
        [f"selection ({sub})", secs("select", "select")],
        ["fine-tune on selection", secs("train", "train")],
        ["evaluate before + after", secs("eval", "eval")],
        ["fine-tune on random subset + evaluate", secs("random", "random")],
        ["total", secs("total")],
    ]
    loss = report["loss"]
    b = loss["before"]
    losses = [["warmed-up (before)", f"{b:.4f}", ""],
              [f"fine-tuned on random {report['k']}", f"{loss['random']:.4f}", f"{loss['random'] - b:+.4f}"],
              [f"fine-tuned on selected {report['k']}", f"{loss['selected']:.4f}", f"{loss['selected'] - b:+.4f}"]]
    comp = report["composition"]
    mix = [[d] + [f"{100 * comp[w][d]['fraction']:.0f}% ({comp[w][d]['count']})"
                  for w in ("pool", "selected", "random")] for d in report["pool"]["domains"]]
    verdict = (f"selection beats random by {report['win']:.4f} nats of {report['task']} target loss"
               if report["win"] > 0 else
               f"selection does NOT beat random: random is better by {-report['win']:.4f} nats of "
               f"{report['task']} target loss")
    return "\n\n".join([
        head,
        _table(["stage", "seconds"], stages, "lr"),
        _table(["model", f"{report['task']} eval loss ({report['eval_samples']} samples)", "vs before"], losses, "lrr"),
        _table(["pool domain", "pool", "selected", "random"], mix, "lrrr"),
        verdict + f"; files in {Path(report['files']['json']).parent}/ (demo.json, demo.png, select/selection.jsonl)",
    ])
