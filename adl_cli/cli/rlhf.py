"""adl rlhf: learning from preferences and rewards. `reward` trains a Bradley-Terry reward model, `dpo`
a policy by DPO / IPO / conservative DPO, `ppo` a policy by PPO with a value head (verifier or
reward-model rewards), `grpo` a policy by group-relative RL on verifiable tasks, `pairs` lists the
built-in preference sets."""

from __future__ import annotations

from pathlib import Path

import typer

from adl_cli.cli.common import default_out, resolve_recipe, set_option

rlhf_app = typer.Typer(help="Learn from preferences and rewards: reward models, DPO, PPO, GRPO.", no_args_is_help=True)

RECIPE_HELP = "Recipe TOML or a shipped recipe's name ({names}); it starts from a chat run (init.from: an SFT run such as runs/addition)."


def _out_option():
    return typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>).")


def _resume_option():
    return typer.Option(False, "--resume", help="Continue from the run folder's latest checkpoint.")


def _force_option():
    return typer.Option(False, "--force", help="Replace the run already in --out, or resume with changed settings.")


def _progress_option():
    return typer.Option(True, "--progress/--no-progress", help="Show the live progress bar.")


@rlhf_app.command("reward")
def reward(
    recipe: str = typer.Argument(..., help=RECIPE_HELP.format(names="reward"), show_default=False),
    set_: list[str] = set_option(),
    out: Path = _out_option(),
    resume: bool = _resume_option(),
    force: bool = _force_option(),
    progress: bool = _progress_option(),
) -> None:
    """Train a reward model on preference pairs: [bold]adl rlhf reward reward[/] (from runs/addition)"""
    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.methods.rlhf.reward import load_reward_recipe, run_reward

    path = resolve_recipe(Path(recipe), command="rlhf")
    rec = load_reward_recipe(path, set_)
    out = out or default_out(path, rec.name)
    if is_main_env():
        console.print(f"[bold]adl rlhf reward[/] {path} -> {out}", highlight=False)
    outcome = run_reward(rec, out, resume=resume, force=force, progress=progress, log=console.print)
    if outcome.main and outcome.summary:
        s = outcome.summary
        _figure(out, f"adl rlhf reward {out.name}")
        _pair_table("reward model", s, {src: a for src, a in (s["heldout"] or {}).get("by_source", {}).items()})
        h = s["heldout"]
        if h:
            console.print(f"held-out loss {h['val_loss']:.3f}, pair accuracy {h['val_accuracy']:.1%}, margin r_w - r_l {h['val_margin']:.2f}; "
                          f"{s['steps']} steps in {s['train_wall_s']:.0f} s", highlight=False)
        console.print(f"[dim]run folder: {out} (report.md, loss.png, preference.png, summary.json, model.safetensors of family 'reward')[/]", highlight=False)


@rlhf_app.command("dpo")
def dpo(
    recipe: str = typer.Argument(..., help=RECIPE_HELP.format(names="dpo, dpo-lora, ipo, cdpo"), show_default=False),
    set_: list[str] = set_option(),
    out: Path = _out_option(),
    resume: bool = _resume_option(),
    force: bool = _force_option(),
    base: bool = typer.Option(True, "--base/--no-base", help="Also measure how often the starting run's greedy reply is the chosen answer (built-in sets)."),
    progress: bool = _progress_option(),
) -> None:
    """Align a chat run by direct preference optimisation: [bold]adl rlhf dpo dpo[/] (from runs/addition)"""
    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.methods.rlhf.dpo import load_dpo_recipe, run_dpo

    path = resolve_recipe(Path(recipe), command="rlhf")
    rec = load_dpo_recipe(path, set_)
    out = out or default_out(path, rec.name)
    if is_main_env():
        console.print(f"[bold]adl rlhf dpo[/] {path} ({rec.dpo.loss}, {rec.method}) -> {out}", highlight=False)
    outcome = run_dpo(rec, out, resume=resume, force=force, progress=progress, log=console.print, evaluate_base=base)
    if outcome.main and outcome.summary:
        s = outcome.summary
        _figure(out, f"adl rlhf dpo {out.name} ({rec.dpo.loss})")
        h = s["heldout"] or {}
        _pair_table("DPO", s, h.get("by_source", {}))
        if h:
            kl = "-" if s.get("sampled_kl") is None else f"{s['sampled_kl']:.3f}"
            margins = s["margin_by_eval"]
            rise = f"; held-out margin {margins[0][1]:.2f} at step {margins[0][0]} -> {margins[-1][1]:.2f}" if len(margins) > 1 else ""
            console.print(f"held-out preference accuracy {h['val_accuracy']:.1%}, reward margin {h['val_margin']:.3f}, "
                          f"KL to the reference {kl} nats per sampled answer{rise}; {s['steps']} steps in {s['train_wall_s']:.0f} s", highlight=False)
        for smp in ((s["chosen_match"].get("after") or {}).get("samples") or [])[:3]:
            from rich.markup import escape

            mark = "[green]chosen[/]" if smp["match"] else "[red]other[/]"
            console.print(f"  {escape(smp['prompt'])} -> {escape(smp['reply'])} ({mark})", highlight=False)
        what = "model.safetensors" if rec.method == "full" else "adapter.safetensors + adapter.json naming its base"
        console.print(f"[dim]run folder: {out} (report.md, loss.png, preference.png, summary.json, {what}, reference_logps.safetensors); "
                      f"talk to it: adl chat {out}[/]", highlight=False)


@rlhf_app.command("grpo")
def grpo(
    recipe: str = typer.Argument(..., help=RECIPE_HELP.format(names="grpo, grpo-scratchpad").replace("runs/addition", "runs/sft-tiny"), show_default=False),
    set_: list[str] = set_option(),
    out: Path = _out_option(),
    resume: bool = _resume_option(),
    force: bool = _force_option(),
    base: bool = typer.Option(True, "--base/--no-base", help="Also measure the starting run's exact match on the same held-out problems (the paired gain)."),
    progress: bool = _progress_option(),
) -> None:
    """Reinforce a chat run on verifiable tasks with group-relative advantages: [bold]adl rlhf grpo grpo[/]"""
    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.methods.rlhf.grpo import load_grpo_recipe, run_grpo

    path = resolve_recipe(Path(recipe), command="rlhf")
    rec = load_grpo_recipe(path, set_)
    out = out or default_out(path, rec.name)
    if is_main_env():
        console.print(f"[bold]adl rlhf grpo[/] {path} ({rec.grpo.loss_type}, {rec.method}) -> {out}", highlight=False)
    outcome = run_grpo(rec, out, resume=resume, force=force, progress=progress, log=console.print, evaluate_base=base)
    if outcome.main and outcome.summary:
        from adl_cli.engine.plots import loss_figure
        from adl_cli.engine.report import read_metrics

        s = outcome.summary
        rows = read_metrics(out / "metrics.jsonl")
        loss_figure(rows, out / "loss.png", title=f"adl rlhf grpo {out.name}")
        _rl_figure(rows, out / "rl.png", f"adl rlhf grpo {out.name}", start=s.get("exact_start"))
        _exact_table(s)
        _last_step(s, ("reward", "accuracy", "format", "length", "kl", "clip_fraction", "flat_groups"))
        console.print(f"[dim]run folder: {out} (report.md, rl.png, loss.png, summary.json, metrics.jsonl); talk to it: adl chat {out}[/]", highlight=False)


@rlhf_app.command("ppo")
def ppo(
    recipe: str = typer.Argument(..., help=RECIPE_HELP.format(names="ppo").replace("runs/addition", "runs/sft-tiny"), show_default=False),
    set_: list[str] = set_option(),
    out: Path = _out_option(),
    resume: bool = _resume_option(),
    force: bool = _force_option(),
    base: bool = typer.Option(True, "--base/--no-base", help="Also measure the starting run on the same held-out problems (exact match and sampled reward)."),
    progress: bool = _progress_option(),
) -> None:
    """Reinforce a chat run by PPO with a value head, GAE and a KL penalty: [bold]adl rlhf ppo ppo[/]"""
    from adl_cli.console import console
    from adl_cli.engine.distributed import is_main_env
    from adl_cli.methods.rlhf.ppo import load_ppo_recipe, run_ppo

    path = resolve_recipe(Path(recipe), command="rlhf")
    rec = load_ppo_recipe(path, set_)
    out = out or default_out(path, rec.name)
    if is_main_env():
        console.print(f"[bold]adl rlhf ppo[/] {path} (reward: {rec.ppo.reward}, {rec.method}) -> {out}", highlight=False)
    outcome = run_ppo(rec, out, resume=resume, force=force, progress=progress, log=console.print, evaluate_base=base)
    if outcome.main and outcome.summary:
        from rich.table import Table

        from adl_cli.engine.plots import loss_figure
        from adl_cli.engine.report import read_metrics

        s = outcome.summary
        rows = read_metrics(out / "metrics.jsonl")
        loss_figure(rows, out / "loss.png", title=f"adl rlhf ppo {out.name}")
        _rl_figure(rows, out / "rl.png", f"adl rlhf ppo {out.name}", kl_target=rec.ppo.kl_target, start=s.get("exact_start"))
        _exact_table(s)
        if s["sampled_reward"]:
            t = Table("task", "n", "reward before", "after", "accuracy before", "after",
                      title=f"one answer sampled per held-out problem (temperature {rec.ppo.temperature:g})", title_justify="left")
            for name, e in s["sampled_reward"].items():
                b, a = e["before"], e["after"]
                t.add_row(name, str(a["n"]), "-" if not b else f"{b['reward']:.3f}", f"{a['reward']:.3f}",
                          "-" if not b else f"{b['accuracy']:.1%}", f"{a['accuracy']:.1%}")
            console.print(t)
        if s["sampled_kl"] is not None:
            target = f" (target {s['kl_target']:g}: {'within' if s['sampled_kl'] <= s['kl_target'] else 'above'})" if s["kl_target"] else ""
            console.print(f"KL(policy || reference) per sampled held-out answer: {s['sampled_kl']:.3f} nats{target}; final beta {s['final_kl_coef']:.4g}",
                          highlight=False)
        _last_step(s, ("reward", "accuracy", "format", "length", "kl", "clip_fraction", "value_loss", "explained_var"))
        what = "model.safetensors" if rec.method == "full" else "adapter.safetensors + adapter.json naming its base"
        console.print(f"[dim]run folder: {out} (report.md, rl.png, loss.png, summary.json, metrics.jsonl, {what}); talk to it: adl chat {out}[/]",
                      highlight=False)


def _exact_table(s: dict) -> None:
    from rich.table import Table

    from adl_cli.console import console

    t = Table("task", "n", "before", "after", "paired gain (95% CI)", title="greedy exact match on held-out problems", title_justify="left")
    for name, e in s["exact_match"].items():
        b, a, p = e["before"], e["after"], e["paired"]
        gain = "-" if not p else f"{p['gain']:+.1%} ({p['ci95'][0]:+.1%} to {p['ci95'][1]:+.1%})"
        t.add_row(name, str(a["n"]), "-" if not b else f"{b['accuracy']:.1%}", f"{a['accuracy']:.1%}", gain)
    console.print(t)


def _last_step(s: dict, shown: tuple[str, ...]) -> None:
    from adl_cli.console import console

    last = s.get("last_step") or {}
    console.print("last step: " + ", ".join(f"{k} {last[k]:.3g}" for k in shown if k in last) + f"; {s['steps']} steps in {s['train_wall_s']:.0f} s",
                  highlight=False)


def _rl_figure(rows: list, path: Path, title: str, kl_target: float = 0.0, start: dict | None = None) -> None:
    """rl.png: the sampled answers' reward, accuracy and format rate, held-out greedy exact match,
    KL to the reference, and the share of groups with equal rewards (GRPO) or the value head's
    explained variance (PPO), by step; ``start``: the starting run's exact match, drawn at step 0."""
    from adl_cli.engine.plots import series_figure

    def pts(key):
        return [(r["step"], r[key]) for r in rows if key in r]

    exact = {k.removeprefix("exact_"): pts(k) for k in sorted({k for r in rows for k in r if k.startswith("exact_")})}
    for name, acc in (start or {}).items():  # the starting run on the same problems, at step 0
        exact[name] = [(0, acc)] + exact.get(name, [])
    panels = {"sampled answers": {"reward": pts("reward"), "accuracy": pts("accuracy"), "format rate": pts("format")},
              "held-out greedy exact match (the evaluation problems)": exact or {"-": []},
              "KL(policy || reference), k3 per token": {"kl": pts("kl")},
              "groups with equal rewards (no signal)": {"share": pts("flat_groups")}}
    if any("explained_var" in r for r in rows):  # PPO: KL per answer (k1 summed) beside its target and beta; the value head
        kl = {"sampled answers": pts("kl")}
        steps = [x for x, _ in pts("kl")]
        if kl_target and steps:
            kl[f"target {kl_target:g}"] = [(steps[0], kl_target), (steps[-1], kl_target)]
        panels.pop("KL(policy || reference), k3 per token")
        panels.pop("groups with equal rewards (no signal)")
        panels["KL(policy || reference), nats per answer"] = kl
        panels["KL coefficient beta and value head"] = {"beta": pts("kl_coef"), "explained variance": pts("explained_var")}
    series_figure(path, {}, title=title, xlabel="optimizer step", ylabel="", panels=panels)


@rlhf_app.command("pairs")
def pairs() -> None:
    """List the built-in preference sets with one pair each: [bold]adl rlhf pairs[/]"""
    import random

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.data.preferences import PAIR_SETS
    from adl_cli.data.tasks import make_task

    t = Table("set", "prompt", "chosen", "rejected", "what differs", title="built-in preference sets (data.sets)", title_justify="left")
    problem = make_task("addition").draw(random.Random(0))
    for name in PAIR_SETS.names():
        kind = PAIR_SETS.get(name)()
        p = kind.pair(problem, random.Random(1))
        t.add_row(name, p.prompt[-1]["content"], p.chosen, p.rejected, kind.description)
    console.print(t)
    console.print("[dim]your own: data.files = [\"pairs.jsonl\"], one {\"prompt\", \"chosen\", \"rejected\"} object a line[/]")


def _figure(out: Path, title: str) -> None:
    """loss.png (the loss curve) and preference.png: pair accuracy, reward margin and (DPO) KL to
    the reference, per logging step on training batches and per evaluation on held-out pairs."""
    from adl_cli.engine.plots import loss_figure, series_figure
    from adl_cli.engine.report import read_metrics

    rows = read_metrics(out / "metrics.jsonl")
    loss_figure(rows, out / "loss.png", title=title)

    def pts(key):
        return [(r["step"], r[key]) for r in rows if key in r]

    panels = {"pair accuracy (chosen scored above rejected)": {"training batches": pts("accuracy"), "held-out pairs": pts("val_accuracy")},
              "reward margin (chosen - rejected)": {"training batches": pts("margin"), "held-out pairs": pts("val_margin")}}
    if any("ref_kl" in r or "sampled_kl" in r for r in rows):
        panels["KL(policy || reference), nats per answer"] = {"training batches' chosen answers": pts("ref_kl"),
                                                              "answers sampled from the policy (held-out prompts)": pts("sampled_kl")}
    series_figure(out / "preference.png", {}, title=title, xlabel="optimizer step", ylabel="", panels=panels)


def _pair_table(what: str, s: dict, accuracy: dict) -> None:
    from rich.table import Table

    from adl_cli.console import console

    t = Table("set", "pairs", what, "shorter", "longer", title="held-out pair accuracy beside the length-only baselines", title_justify="left")
    n = (s.get("heldout") or {}).get("n_by_source", {})
    for src, acc in accuracy.items():
        b = s["length_baselines"].get(src, {})
        t.add_row(src, str(n.get(src, "-")), f"{acc:.1%}", f"{b.get('shorter', float('nan')):.1%}", f"{b.get('longer', float('nan')):.1%}")
    console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(rlhf_app, name="rlhf", rich_help_panel="Train")
