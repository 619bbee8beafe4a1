"""Figures as PNG files (matplotlib, no display): a run's loss and learning rate, and the
benchmarks' series by length. Every figure is written atomically (a reader never sees half a PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adl_cli.errors import AdlError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdlError("plots need matplotlib (pip install matplotlib)") from None
    return plt


def _save(fig, path: Path) -> Path:
    from adl_cli.fileio import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise AdlError(f"{path}: plots are written as PNG; give a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def loss_figure(rows: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Train loss at every logging step, validation loss (and its EMA) at every evaluation, and the
    learning rate on a second axis, against the optimizer step."""
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not train:
        raise AdlError("no logged training steps to plot (metrics.jsonl has no 'loss' rows)")
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(*zip(*train), color="tab:blue", lw=1.2, label="train loss (training mode, per logging interval)")
    for key, style in (("val_loss", dict(color="tab:orange", marker="o")), ("ema_val_loss", dict(color="tab:green", marker="s"))):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), lw=1.5, ms=4, label=key.replace("_", " ") + " (eval mode)", **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)" if any("tokens_per_s" in r for r in rows) else "loss")
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    handles, labels = ax.get_legend_handles_labels()
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:gray", lw=1, ls="--", label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def series_figure(path: Path, series: dict[str, list[tuple[float, float]]], *, title: str, xlabel: str, ylabel: str,
                  logx: bool = False, logy: bool = False, panels: dict[str, dict[str, list[tuple[float, float]]]] | None = None,
                  hline: float | None = None) -> Path:
    """One line per series (x, y), or several panels side by side (``panels``: panel title -> series)."""
    plt = _pyplot()
    groups = panels or {title: series}
    fig, axes = plt.subplots(1, len(groups), figsize=(6.2 * len(groups), 4.2), squeeze=False)
    for ax, (name, lines) in zip(axes[0], groups.items()):
        palette = plt.cm.tab20.colors if len(lines) > 10 else plt.cm.tab10.colors  # no two series share a colour
        for i, (label, pts) in enumerate(lines.items()):
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            style = dict(color="black", lw=2.2, zorder=3) if label.startswith("baseline") else dict(color=palette[i % len(palette)], lw=1.4)
            ax.plot(*zip(*pts), marker="o", ms=4, label=label, **style)
        if hline is not None:
            ax.axhline(hline, color="gray", lw=0.8, ls=":")
        from matplotlib.ticker import FuncFormatter

        plain = FuncFormatter(lambda v, _: f"{v:g}")
        if logx:
            ax.set_xscale("log", base=2)
            xs = sorted({x for pts in lines.values() for x, y in pts if y is not None})
            ax.set_xticks(xs)
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        if logy:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        ax.set_xlabel(xlabel)
        if not panels:
            ax.set_ylabel(ylabel)
        ax.set_title(name if panels else title, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        if len(lines) > 6:  # many series: the legend beside the axes, not over the lines
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        else:
            ax.legend(fontsize=8)
    if panels:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def scaling_figure(path: Path, runs: list[dict[str, Any]], *, frontier: list[tuple[float, float]], minima: list[dict[str, Any]],
                   parabolas: list[dict[str, Any]], title: str) -> Path:
    """Two panels. Left: final validation loss against training compute (log), one colour per model
    size (its runs joined in order of tokens), the fitted law's compute-optimal frontier, and the
    IsoFLOP minima. Right: the IsoFLOP profiles, loss against N per budget with their parabolas
    (``parabolas``: budget, and the curve's points) and minima."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.4, 4.6))
    sizes = sorted({r["params"] for r in runs})
    colours = plt.cm.viridis([i / max(1, len(sizes) - 1) * 0.9 for i in range(len(sizes))])
    for n, colour in zip(sizes, colours):
        pts = sorted((r["flops"], r["val_loss"]) for r in runs if r["params"] == n)
        label = next(f"{r['n_layer']}x{r['n_embd']} ({n / 1e6:.2f}M)" for r in runs if r["params"] == n)
        left.plot(*zip(*pts), marker="o", ms=4, lw=1.2, color=colour, label=label)
    if frontier:
        left.plot(*zip(*frontier), color="black", lw=2, ls="--", label="fitted law: compute-optimal", zorder=4)
    if minima:
        left.scatter([m["flops"] for m in minima], [m["loss"] for m in minima], marker="*", s=140, color="crimson",
                     zorder=5, label="IsoFLOP minima")
    left.set_xscale("log")
    left.set_xlabel("training compute C = 6 N D (FLOPs)")
    left.set_ylabel("val loss (nats per token)")
    left.set_title("loss against compute", fontsize=10)
    left.grid(alpha=0.3, which="both")
    left.legend(fontsize=8)
    budgets = sorted({r["budget"] for r in runs})
    bcolours = plt.cm.plasma([i / max(1, len(budgets) - 1) * 0.85 for i in range(len(budgets))])
    for c, colour in zip(budgets, bcolours):
        pts = sorted((r["params"], r["val_loss"]) for r in runs if r["budget"] == c)
        right.plot(*zip(*pts), marker="o", ms=4, lw=0, color=colour, label=f"C = {c:.3g}")
        curve = next((p["points"] for p in parabolas if p["budget"] == c), None)
        if curve:
            right.plot(*zip(*curve), lw=1.2, color=colour)
        m = next((m for m in minima if abs(m["flops"] / c - 1) < 0.05), None)
        if m:
            right.scatter([m["n_opt"]], [m["loss"]], marker="*", s=140, color=colour, edgecolor="black", zorder=5)
    right.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in (left, right):  # ticks at 1, 2 and 5 of each decade, written 2e+12: minor labels collide on a short log axis
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    right.set_xlabel("parameters N")
    right.set_title("IsoFLOP profiles (stars: minima)", fontsize=10)
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def quantization_figure(path: Path, report) -> Path:
    """adl bench-quantize: quality against size (perplexity change and KL to fp32 against bits per
    parameter, one point a method) and decode speed, side by side."""
    plt = _pyplot()
    rows = report.rows
    base = rows[0]
    colours = {"adl": "tab:blue", "bitsandbytes": "tab:orange", "torchao": "tab:green", "reference": "black"}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    for r in rows:
        c = colours.get(r.by, "gray")
        ax1.scatter(r.bits_per_parameter, 100 * (r.perplexity / base.perplexity - 1), color=c, s=28, zorder=3)
        ax1.annotate(r.name, (r.bits_per_parameter, 100 * (r.perplexity / base.perplexity - 1)), fontsize=7, xytext=(3, 3),
                     textcoords="offset points")
        if r is not base:
            ax2.scatter(r.bits_per_parameter, max(r.kl, 1e-9), color=c, s=28, zorder=3)
            ax2.annotate(r.name, (r.bits_per_parameter, max(r.kl, 1e-9)), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.axhline(0, color="gray", lw=0.8, ls=":")
    ax1.set_xlabel("stored bits per parameter")
    ax1.set_ylabel("perplexity vs fp32 (%)")
    ax1.set_title("quality against size", fontsize=10)
    ax2.set_yscale("log")
    ax2.set_xlabel("stored bits per parameter")
    ax2.set_ylabel("KL(fp32 || quantized), nats per token")
    ax2.set_title("distance to the float model", fontsize=10)
    names = [r.name for r in rows]
    ax3.barh(names, [r.decode_tok_s for r in rows], color=[colours.get(r.by, "gray") for r in rows])
    ax3.invert_yaxis()
    ax3.set_xlabel(f"decode tokens/s (batch 1, {report.decode.get('threads', '?')} threads)")
    ax3.set_title("decode speed", fontsize=10)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colours.items() if any(r.by == k for r in rows)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.04))
    extra = f", outlier channels x{report.outliers['scale']:g} injected" if report.outliers else ""
    fig.suptitle(f"adl bench-quantize {report.run}: {report.tokens:,} tokens of {report.text}{extra}", fontsize=11)
    return _save(fig, path)
