"""adl scaling through the real entry point: a quick sweep, both fits, JSON, figure, resume."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, write_tiny_recipe):
    from adl_cli.cli import main

    root = tmp_path_factory.mktemp("scaling")
    recipe = write_tiny_recipe(root)
    args = ["scaling", recipe, "--quick", "--out", root / "sweep", "--json", root / "fit.json", "--plot", root / "fit.png", "--bootstrap", "20"]
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code
    return root, recipe


def test_quick_sweep_trains_every_planned_run_and_fits(sweep):
    root, _ = sweep
    data = json.loads((root / "fit.json").read_text())
    runs = data["runs"]
    assert len(runs) >= 7 and len({r["params"] for r in runs}) == 3 and len({r["budget"] for r in runs}) == 3
    from adl_cli.runs import load_run

    for r in runs:
        summary = json.loads((root / "sweep" / r["name"] / "summary.json").read_text())
        assert summary["steps"] == r["steps"] and summary["tokens"] == r["tokens"]  # D is what was trained
        assert summary["parameters"] == r["params"] == sum(p.numel() for p in load_run(root / "sweep" / r["name"]).model.parameters())
        assert r["flops"] == pytest.approx(6 * r["params"] * r["tokens"])
        assert r["tokens"] == pytest.approx(r["budget"] / (6 * r["params"]), rel=0.5 / r["steps"] + 1e-9)  # C/6N, rounded to whole steps
        assert summary["val_loss"] == r["val_loss"]
    smallest = min(runs, key=lambda r: r["params"])
    assert sorted(r["steps"] for r in runs if r["params"] == smallest["params"]) == pytest.approx([40, 80, 160], rel=0.05)  # budgets to 2 digits
    fit = data["fit"]
    assert all(v == v and v > 0 for v in fit.values())  # finite, positive constants
    for key, (low, high) in data["intervals_95"].items():
        assert low <= high
    optimal = data["compute_optimal"]
    assert all(o["n"] * o["d"] * 6 == pytest.approx(o["flops"]) for o in optimal)
    assert data["holdout"]["runs"] and data["holdout"]["flops_cut"] < min(x["flops"] for x in data["holdout"]["runs"])
    assert (root / "fit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_finished_sweep_resumes_without_training_and_refuses_without_resume(sweep, capsys, run):
    root, recipe = sweep
    stamps = {p: os.stat(p).st_mtime_ns for p in (root / "sweep").glob("*/model.safetensors")}
    code, _, err = run(["scaling", recipe, "--quick", "--out", root / "sweep", "--bootstrap", "0"], capsys)
    assert code == 2 and "--resume" in err and "not empty" in err
    code, text, err = run(["scaling", recipe, "--quick", "--out", root / "sweep", "--resume", "--bootstrap", "0"], capsys)
    assert code == 0, err
    assert text.count("finished earlier") == len(stamps) and "approach 3" in text.replace("\n", " ")
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # nothing retrained
    budgets = ",".join(sorted({f"{r['budget']:g}" for r in json.loads((root / "fit.json").read_text())["runs"]}))
    code, _, err = run(["scaling", recipe, "--quick", "--budgets", budgets, "--out", root / "sweep", "--resume", "--bootstrap", "0",
                        "--set", "model.tie_embeddings=false"], capsys)
    assert code == 2 and "the recipe or the grid changed" in err and "--force" in err  # a changed plan refuses before anything is lost
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize("args, message", [
    (["--sizes", "2x"], "--sizes takes LAYERSxWIDTH"),
    (["--sizes", "2x64"], "at least 2 different shapes"),
    (["--budgets", "1e9,abc"], "--budgets takes FLOP counts"),
    (["--budgets", "-1e9"], "positive FLOP counts"),
    (["--params", "some"], "--params must be total or non-embedding"),
    (["--budgets", "1e3,2e3"], "a fit needs at least 5"),
    (["--holdout", "0.7"], "--holdout must be in"),
    (["--max-epochs", "0"], "--max-epochs must be > 0"),
])
def test_bad_sweeps_are_one_line_errors(tiny_recipe, tmp_path, capsys, run, args, message):
    code, _, err = run(["scaling", tiny_recipe, "--quick", "--out", tmp_path / "s"] + args, capsys)
    assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "s").exists()


def test_runs_that_would_repeat_their_text_are_left_out(tiny_recipe):
    from adl_cli.data.tokens import load_tokens
    from adl_cli.methods.pretrain import load_pretrain_recipe
    from adl_cli.methods.scaling_sweep import plan

    available = len(load_tokens(load_pretrain_recipe(tiny_recipe).data).train)
    shapes = [(1, 32), (1, 48), (1, 64)]
    every, notes = plan(tiny_recipe, [], shapes, None, min_steps=1, max_epochs=None)
    assert not notes
    epochs = sorted(r.tokens / available for r in every)
    cap = epochs[len(epochs) // 2]
    kept, notes = plan(tiny_recipe, [], shapes, None, min_steps=1, max_epochs=cap)
    assert [r.name for r in kept] == [r.name for r in every if r.tokens <= cap * available]
    assert 0 < len(kept) < len(every) and len(notes) == len(every) - len(kept)
    assert all("epochs of the" in n and "max_epochs" in n for n in notes)


def test_the_cli_names_what_it_left_out(tiny_recipe, tmp_path, capsys, run):
    code, text, err = run(["scaling", tiny_recipe, "--quick", "--max-epochs", "0.001", "--out", tmp_path / "s"], capsys)
    assert code == 2 and "a fit needs at least 5" in err
    assert "left out:" in text and "epochs of the" in text and "raise --max-epochs" in " ".join(text.split())
    code, text, err = run(["scaling", tiny_recipe, "--quick", "--max-epochs", "0.001", "--out", tmp_path / "s", "--set", "data.corpus_repeat=2"], capsys)
    assert code == 2 and "data.corpus_repeat = 2 repeats" in " ".join(text.split())
