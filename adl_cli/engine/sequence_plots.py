"""The sequence benchmark's figure: what each model scores, how fast it trains and decodes, and
what its decode state holds as the sequence grows."""

from __future__ import annotations

from pathlib import Path

from adl_cli.engine.plots import _pyplot, _save


def bench_sequence_figure(report: dict, path: Path) -> Path:
    plt = _pyplot()
    rows = report["rows"]
    names = [r["model"] for r in rows]
    fig, (score, speed, memory) = plt.subplots(1, 3, figsize=(13, 4.2))
    if report["task"] == "lm":
        bpb = [r["scores"]["0"] for r in rows]
        score.bar(names, bpb, color="tab:blue")
        for i, v in enumerate(bpb):
            score.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        score.set_ylabel("validation bits per byte (lower is better)")
        score.set_ylim(min(bpb) * 0.9, max(bpb) * 1.05)
    else:
        lengths = report["lengths"]
        for r in rows:
            points = [(n, 100 * r["scores"][str(n)]) for n in lengths if r["scores"].get(str(n)) is not None]
            if points:
                score.plot(*zip(*points), marker="o", label=r["model"])
        score.set_xscale("log", base=2)
        score.set_xticks(lengths, [f"{n}" for n in lengths])
        score.minorticks_off()
        score.set_xlabel(f"task length (trained at {lengths[0]})")
        score.set_ylabel("accuracy on the answers (%)")
        score.legend(fontsize=7)
    score.tick_params(axis="x", labelsize=7)
    x = range(len(rows))
    speed.bar([i - 0.2 for i in x], [r["tokens_per_s"] for r in rows], width=0.4, label="training")
    speed.bar([i + 0.2 for i in x], [r["decode_tokens_per_s"] or 0 for r in rows], width=0.4, label="greedy decoding (batch 1)")
    speed.set_xticks(list(x), names, fontsize=7)
    speed.set_yscale("log")
    speed.set_ylabel("tokens per second (log)")
    speed.legend(fontsize=7)
    for r in rows:
        points = sorted((int(n), b / 1024) for n, b in r["state_bytes"].items())
        memory.plot(*zip(*points), marker="o", label=r["model"])
    memory.set_xscale("log", base=2)
    ticks = sorted({int(n) for r in rows for n in r["state_bytes"]})
    memory.set_xticks(ticks, [str(n) for n in ticks])
    memory.minorticks_off()
    memory.set_yscale("log")
    memory.set_xlabel("tokens in the sequence")
    memory.set_ylabel("decode state per sequence (KiB, log)")
    memory.legend(fontsize=7)
    budget = report["budget"]
    spent = f"{budget['budget_seconds']:g} s of training each" if budget.get("budget_seconds") else "equal steps"
    fig.suptitle(f"{report['task']}: {spent}, median of {report['seeds']} seed(s)", fontsize=10)
    for ax in (score, speed, memory):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
