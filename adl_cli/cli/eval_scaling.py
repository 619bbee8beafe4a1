"""`adl eval RUN --task T --samples N`: accuracy against answers sampled per problem (pass@k,
majority vote, best-of-k by a reward model) beside greedy decoding, as a table and a figure."""

from __future__ import annotations

from pathlib import Path


def scaling_report(run, run_dir: Path, names: list[str], examples: int, samples: int, temperature: float, reward_path: Path | None,
                   seed: int, plot: Path | None, as_json: bool) -> None:
    import json

    from rich.table import Table

    from adl_cli.console import console
    from adl_cli.data.tasks import TASKS, make_task, split_problems
    from adl_cli.errors import AdlError
    from adl_cli.methods.inference_scaling import sample_scaling
    from adl_cli.methods.sft import task_settings

    if examples < 1:
        raise AdlError(f"--examples must be >= 1, got {examples}")
    for name in names:
        TASKS.get(name)
    reward = None
    if reward_path is not None:
        from adl_cli.methods.rlhf.common import disable_dropout
        from adl_cli.methods.rlhf.reward import load_reward

        reward = disable_dropout(load_reward(reward_path, run.tokenizer).model).eval()
    split_seed, options = task_settings(run_dir)
    results = []
    for name in names:
        t = make_task(name, **options)
        problems = split_problems(t, examples, held_out=True, seed=split_seed)
        results.append(sample_scaling(run.model, run.tokenizer, t, problems, samples=samples, temperature=temperature, seed=seed,
                                      reward_model=reward).to_dict())
    if plot is not None:
        _figure(results, plot, f"adl eval {run_dir.name}: accuracy against samples per problem (temperature {temperature:g})")
    if as_json:
        print(json.dumps({"run": str(run_dir), "split_seed": split_seed, "reward_model": None if reward_path is None else str(reward_path),
                          **options, "tasks": results}))
        return
    for r in results:
        cols = ["k", "pass@k", "majority@k"] + (["best-of-k (reward)"] if reward is not None else [])
        t = Table(*cols, title=f"{r['task']}: {r['n']} held-out problems, greedy {r['greedy']:.1%}, one sample {r['sample_accuracy']:.1%}",
                  title_justify="left")
        for row in r["rows"]:
            t.add_row(str(row["k"]), f"{row['pass']:.1%}", f"{row['majority']:.1%}", *([f"{row['best_of']:.1%}"] if reward is not None else []))
        console.print(t)
        p = r["majority_vs_greedy"]
        console.print(f"majority@{samples} - greedy: {p['gain']:+.1%} (95% CI {p['ci95'][0]:+.1%} to {p['ci95'][1]:+.1%}, paired, n = {p['n']})",
                      highlight=False)
    if plot is not None:
        console.print(f"[dim]figure: {plot}[/]", highlight=False)


def _figure(results: list[dict], path: Path, title: str) -> None:
    from adl_cli.engine.plots import series_figure

    panels = {}
    for r in results:
        lines = {"pass@k (a verifier picks)": [(x["k"], x["pass"]) for x in r["rows"]],
                 "majority@k (self-consistency)": [(x["k"], x["majority"]) for x in r["rows"]]}
        if "best_of" in r["rows"][0]:
            lines["best-of-k (reward model picks)"] = [(x["k"], x["best_of"]) for x in r["rows"]]
        ks = [x["k"] for x in r["rows"]]
        lines["baseline: greedy"] = [(ks[0], r["greedy"]), (ks[-1], r["greedy"])]
        panels[f"{r['task']} (n = {r['n']})"] = lines
    series_figure(path, {}, title=title, xlabel="samples per problem k", ylabel="accuracy", logx=True, panels=panels)
