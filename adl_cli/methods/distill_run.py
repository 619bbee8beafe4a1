"""adl distill's run: the student with its teacher, the same student from scratch (``--scratch``),
and the three compared on the same held-out data (the text's val split, or the tasks' held-out
problems). The objective and the recipes are methods/distill.py's."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adl_cli.errors import AdlError
from adl_cli.methods.distill import Distiller, is_task_recipe, load_distill_recipe
from adl_cli.methods.sft import SFTRecipe


def _plain(recipe):
    """The same recipe without [teacher] and [distill]: the student trained from scratch."""
    from adl_cli.methods.pretrain import PretrainRecipe
    from adl_cli.methods.sft import SFTRecipe

    cls = SFTRecipe if is_task_recipe(recipe) else PretrainRecipe
    return cls(**{f.name: getattr(recipe, f.name) for f in dataclasses.fields(cls)})


def _check_twin(recipe, scratch: Path) -> None:
    """A finished scratch run is compared only if it trained what the student trained (its model,
    data, training and starting point), so that only the teacher differs."""
    from adl_cli.methods.pretrain import _flat, load_pretrain_recipe
    from adl_cli.methods.sft import load_sft_recipe
    from adl_cli.recipe import recipe_dict

    try:
        theirs = (load_sft_recipe if is_task_recipe(recipe) else load_pretrain_recipe)(scratch / "recipe.toml")
    except AdlError as e:
        raise AdlError(f"--scratch {scratch}: cannot read its recipe ({e}); retrain it with --force") from None
    keys = ("init", "data", "train", "template") if is_task_recipe(recipe) else ("init", "model", "data", "train")
    ours, other = recipe_dict(_plain(recipe)), recipe_dict(theirs)
    a = _flat({k: ours.get(k) for k in keys})
    b = _flat({k: other.get(k) for k in keys})
    skip = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.eval_batches", "data.eval_examples_during")
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in skip]
    if diff:
        detail = ", ".join(f"{k} {b.get(k)!r} (the student: {a.get(k)!r})" for k in diff[:3])
        raise AdlError(f"--scratch {scratch} was trained with another recipe ({detail}); give another folder, or retrain it with --force")


def _finished(run_dir: Path) -> bool:
    return (Path(run_dir) / "model.safetensors").exists() and (Path(run_dir) / "summary.json").exists()


def train_run(recipe, out: Path, *, objective=None, resume: bool = False, force: bool = False, progress: bool | None = True,
              log=print):
    """One training run of a text or a task recipe, with ``objective`` or plain cross-entropy."""
    from adl_cli.methods.pretrain import load_pretrain_recipe, run_pretrain
    from adl_cli.methods.sft import load_sft_recipe, run_sft

    task = isinstance(recipe, SFTRecipe)
    load = load_distill_recipe if objective is not None else (load_sft_recipe if task else load_pretrain_recipe)
    if task:
        return run_sft(recipe, out, resume=resume, force=force, progress=progress, log=log, evaluate_base=False, objective=objective,
                       load=load)
    return run_pretrain(recipe, out, resume=resume, force=force, progress=progress, log=log, objective=objective, load=load)


def run_distill(recipe, out: Path, *, scratch: Path | None = None, resume: bool = False, force: bool = False,
                progress: bool | None = True, log=print) -> dict[str, Any]:
    """Train the student with the teacher (and, with ``scratch``, the same student without it, unless
    that folder already holds the finished run); then compare the three on the same held-out data.
    Returns the comparison (also written to OUT/distill.json and OUT/report.md)."""
    import json
    import time

    from adl_cli.fileio import atomic_write

    holder: dict[str, Distiller] = {}

    def objective(tok, cfg, device):
        holder["d"] = Distiller(recipe.teacher.run, recipe.distill, tokenizer=tok, student_cfg=cfg, device=device, seed=recipe.train.seed,
                                log=log)
        return holder["d"]

    if scratch is not None and Path(scratch).resolve() == Path(out).resolve():
        raise AdlError("--scratch must be another folder than --out")
    reuse = scratch is not None and _finished(scratch) and not force
    if reuse:  # checked before the student trains
        _check_twin(recipe, Path(scratch))
    t0 = time.perf_counter()
    outcome = train_run(recipe, out, objective=objective, resume=resume, force=force, progress=progress, log=log)
    if not outcome.main:
        return {}
    seconds = {"distilled": time.perf_counter() - t0}
    if scratch is not None:
        if reuse:
            log(f"scratch: {scratch} holds a finished run of the same recipe; comparing with it (--force retrains it)")
        else:
            log(f"scratch: the same student without the teacher -> {scratch}")
            t1 = time.perf_counter()
            train_run(_plain(recipe), scratch, force=force, progress=progress, log=log)
            seconds["scratch"] = time.perf_counter() - t1
    report = compare(recipe, Path(out), scratch, holder.get("d"), log=log)
    report["seconds"] = seconds
    atomic_write(Path(out) / "distill.json", json.dumps(report, indent=1))
    atomic_write(Path(out) / "report.md", report_markdown(report))
    return report


def compare(recipe, out: Path, scratch: Path | None, distiller: Distiller | None, *, log=print) -> dict[str, Any]:
    """Teacher, distilled student and scratch student on the same held-out data: the text's val
    split (loss, bits per byte: adl eval's figures), or the tasks' held-out problems (exact match)."""
    import json

    from adl_cli.runs import load_run

    runs = {"teacher": Path(recipe.teacher.run), "distilled": out}
    if scratch is not None:
        runs["scratch"] = Path(scratch)
    rows: dict[str, dict[str, Any]] = {}
    student = load_run(out)
    for name, path in runs.items():
        run = student if name == "distilled" else load_run(path)
        params = sum(p.numel() for p in {id(p): p for p in run.model.parameters()}.values())
        summary = json.loads((path / "summary.json").read_text()) if (path / "summary.json").exists() else {}
        rows[name] = {"run": str(path), "parameters": params, "tokens": summary.get("tokens_seen", summary.get("tokens")),
                      "train_s": summary.get("train_wall_s")}
        if is_task_recipe(recipe):
            rows[name]["tasks"] = _exact(run, out)
        else:
            from adl_cli.methods.evaluate import evaluate_tokens, evaluation_tokens

            tokens, what = evaluation_tokens(student, None, "val")  # the student's split: every run scores the same tokens
            r = evaluate_tokens(run.model, student.tokenizer, tokens, text=what)
            rows[name].update({"val_loss": r.loss, "val_bits_per_byte": r.bits_per_byte, "val_tokens": r.tokens})
    return {"kind": "tasks" if is_task_recipe(recipe) else "text", "distill": dataclasses.asdict(recipe.distill),
            "teacher": str(recipe.teacher.run), "rows": rows, "stats": dict(distiller.stats) if distiller else {}}


def _exact(run, student_dir: Path) -> dict[str, Any]:
    """Exact match on the student's held-out problems of each of its tasks."""
    from adl_cli.data.tasks import make_task, split_problems
    from adl_cli.methods.exact_match import exact_match
    from adl_cli.methods.sft import task_settings

    seed, options = task_settings(student_dir)
    recipe = _task_list(student_dir)
    out = {}
    for name in recipe["tasks"]:
        task = make_task(name, **options)
        problems = split_problems(task, recipe["examples"], held_out=True, seed=seed)
        out[name] = exact_match(run.model, run.tokenizer, task, problems, keep_samples=0).to_dict()
    return out


def _task_list(run_dir: Path) -> dict[str, Any]:
    """The tasks and held-out problem count of a task run's recipe."""
    recipe = load_distill_recipe(Path(run_dir) / "recipe.toml")
    return {"tasks": list(recipe.data.tasks), "examples": recipe.data.eval_examples or 500}


def report_markdown(report: dict[str, Any]) -> str:
    d = report["distill"]
    lines = [f"# adl distill: {report['rows']['distilled']['run']}", "",
             f"teacher {report['teacher']}; loss {d['loss']}, T = {d['temperature']:g}, alpha = {d['alpha']:g}"
             + (f", top {d['top_k']}" if d["top_k"] else "") + (f", hidden x{d['hidden']:g}" if d["hidden"] else "")
             + (f", on-policy {d['on_policy']:.0%}" if d["on_policy"] else ""), ""]
    if report["kind"] == "text":
        lines += ["| model | parameters | val loss | val bits/byte | train tokens | train s |", "|---|---|---|---|---|---|"]
        for name, r in report["rows"].items():
            lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.4f} | "
                         f"{r['tokens'] or '-'} | {r['train_s'] or 0:.0f} |")
    else:
        names = list(next(iter(report["rows"].values()))["tasks"])
        lines += ["| model | parameters | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for name, r in report["rows"].items():
            cells = [f"{r['tasks'][t]['accuracy']:.1%} ({r['tasks'][t]['ci95'][0]:.1%}-{r['tasks'][t]['ci95'][1]:.1%})" for t in names]
            lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
