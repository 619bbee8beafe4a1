"""Rich output shared by every command: consoles, the run summary table, a terminal loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from adl_cli.console import console

from adl_cli.errors import AdlError



def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if not Path(path).exists():
        return rows
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise AdlError(f"{path}:{n} is not valid JSON") from None
    return rows


def loss_curve(rows: list[dict[str, Any]], width: int = 64, height: int = 12) -> str:
    """Train loss as a block plot ('*' train, 'o' validation), log-free, with axis labels."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    pts = train + val
    if len(pts) < 2:
        return "(not enough points for a curve)"
    s_min, s_max = min(p[0] for p in pts), max(p[0] for p in pts)
    y_min, y_max = min(p[1] for p in pts), max(p[1] for p in pts)
    if y_max - y_min < 1e-9:
        y_max = y_min + 1.0
    grid = [[" "] * width for _ in range(height)]

    def put(step, y, ch):
        x = 0 if s_max == s_min else round((step - s_min) / (s_max - s_min) * (width - 1))
        row = round((y_max - y) / (y_max - y_min) * (height - 1))
        if grid[row][x] == " " or ch == "o":
            grid[row][x] = ch

    # average train points that fall in the same column so noise does not fill the plot
    cols: dict[int, list[float]] = {}
    for step, y in train:
        x = 0 if s_max == s_min else round((step - s_min) / (s_max - s_min) * (width - 1))
        cols.setdefault(x, []).append(y)
    for x, ys in cols.items():
        y = sum(ys) / len(ys)
        row = round((y_max - y) / (y_max - y_min) * (height - 1))
        grid[row][x] = "*"
    for step, y in val:
        put(step, y, "o")
    lines = []
    for i, row in enumerate(grid):
        label = y_max - i * (y_max - y_min) / (height - 1)
        lines.append(f"{label:7.3f} |" + "".join(row))
    lines.append(" " * 8 + "+" + "-" * width)
    left, right = f"step {s_min}", f"step {s_max}"
    lines.append(" " * 9 + left + " " * max(1, width - len(left) - len(right)) + right)
    lines.append(" " * 9 + "* train loss   o val loss")
    return "\n".join(lines)


def _fmt(v: Any, kind: str = "") -> str:
    if v is None:
        return "-"
    if kind == "pct":
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        if kind == "int":
            return f"{v:,.0f}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _wall(s: dict[str, Any]) -> str:
    if s.get("wall_s") is None:
        return "-"
    if s.get("resumed") is not None:
        return f"{s.get('train_wall_s', 0):.1f} s training in all; this session (from step {s['resumed']}) {s['wall_s']:.1f} s end to end"
    return f"{s['wall_s']:.1f} s end to end ({s.get('train_wall_s', 0):.1f} s training)"


def summary_table(s: dict[str, Any], title: str = "run summary") -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("parameters", _fmt(s.get("parameters"))),
        ("steps", _fmt(s.get("steps"))),
        ("tokens seen", _fmt(s.get("tokens"))),
        ("tokens/s (median)", _fmt(s.get("tokens_per_s"), "int")),
        ("model FLOPs utilisation", _fmt(s.get("mfu"), "pct") + f" of the measured {s.get('mfu_peak_dtype', 'float32')} matmul peak" if s.get("mfu") is not None else "-"),
        ("train loss (nats/token)", _fmt(s.get("train_loss")) + " (mean of the last 10% of logged steps, training mode)" if s.get("train_loss") is not None else "-"),
        ("val loss (nats/token)", _fmt(s.get("val_loss")) + (f" over {s['val_tokens']:,} held-out tokens" if s.get("val_tokens") else "")),
        *([("train loss, eval mode", _fmt(s["train_eval_loss"]) + f" (same windowing; gap {s['val_loss'] - s['train_eval_loss']:+.3f})")]
          if s.get("train_eval_loss") is not None and s.get("val_loss") is not None else []),
        ("val bits per byte", _fmt(s.get("val_bits_per_byte"))),
        *([("EMA val loss (nats/token)", _fmt(s["ema_val_loss"]))] if s.get("ema_val_loss") is not None else []),
        ("unigram baseline loss", _fmt(s.get("unigram_loss")) + " nats/token" if s.get("unigram_loss") is not None else "-"),
        ("wall time", _wall(s)),
        ("precision / optimizer", f"{s.get('precision')} / {s.get('optimizer')}" + (f", {s['optimizer_schedule']} schedule" if s.get("optimizer_schedule") else "")),
        ("attention / compile", f"{s.get('attention')} / " + (f"yes ({s['compile_s']:.1f} s first step)" if s.get("compile_s") else "no")),
        ("device", f"{s.get('device')} x {s.get('world_size', 1)}" + (f" ({s['parallel']})" if s.get("parallel") not in (None, "none") else "")),
        ("global batch", f"{s['global_batch_tokens']:,} tokens (grad_accum {s.get('grad_accum', 1)})" if s.get("global_batch_tokens") else "-"),
        ("tokenizer", _fmt(s.get("tokenizer"))),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json (one clear error when it is missing or unreadable)."""
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        raise AdlError(f"{run_dir} has no summary.json: the run has not finished (or is not an adl run folder)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise AdlError(f"cannot read {path}: {e}") from None


def render_run(run_dir: Path, summary: dict[str, Any] | None = None, out: Console | None = None) -> str:
    """Print the summary, loss curve and sample of a run; return the same as Markdown."""
    run_dir = Path(run_dir)
    out = out or console
    if summary is None:
        summary = read_summary(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    curve = loss_curve(rows)
    out.print(summary_table(summary, title=f"adl run: {run_dir}"))
    out.print("[bold]loss curve[/]")
    out.print(curve, highlight=False, markup=False)
    if summary.get("sample"):
        out.print("[bold]sample[/]")
        out.print(summary["sample"], highlight=False, markup=False)
    md = [f"# adl run `{run_dir.name}`", "", "| metric | value |", "|---|---|"]
    for k, v in summary.items():
        if k != "sample":
            md.append(f"| {k} | {_fmt(v)} |")
    md += ["", "## Loss curve", "", "```", curve, "```", "", "## Sample", "", "```", summary.get("sample", ""), "```", ""]
    return "\n".join(md)
