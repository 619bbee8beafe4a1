"""Run folders through the CLI: nothing finished is replaced without --force, resume is exact with
dropout (mid-run kills past the warmup, and an end-of-run checkpoint continued), changed recipes
are refused on --resume, and the recipe that governed the first steps is kept."""

import json
import shutil

from adl_cli.engine.checkpoint import latest_checkpoint

DROPOUT = ["--set", "model.dropout=0.1", "--set", "train.precision=fp32", "--set", "train.log_every=1",
           "--set", "train.eval_every=5", "--set", "train.checkpoint_every=5", "--set", "train.keep_checkpoints=10", "--no-progress"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def test_an_existing_run_is_refused_then_replaced_with_force(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    assert run(["pretrain", tiny_recipe, "--out", out, "--no-progress"], capsys)[0] == 0
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(["pretrain", out / "recipe.toml", "--set", "train.steps=2", "--no-progress"], capsys)
    assert code == 2 and "already holds a run" in err and "--force" in err and "--resume" in err
    assert (out / "model.safetensors").read_bytes() == before  # untouched
    code, _, err = run(["pretrain", out / "recipe.toml", "--set", "train.steps=2", "--force", "--no-progress"], capsys)
    assert code == 0, err
    assert max(losses(out)) == 2 and sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-2"]


def test_resume_refuses_changed_settings_and_keeps_the_old_recipe(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    assert run(["pretrain", tiny_recipe, "--out", out, "--no-progress"], capsys)[0] == 0
    code, _, err = run(["pretrain", out / "recipe.toml", "--resume", "--set", "train.steps=8", "--set", "train.lr=1e-2"], capsys)
    assert code == 2 and "train.lr" in err and "--force" in err
    assert "steps = 6" in (out / "recipe.toml").read_text()  # not rewritten
    code, text, err = run(["pretrain", out / "recipe.toml", "--resume", "--set", "train.steps=8", "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming from step 6" in text and "schedule is recomputed" in text
    assert "steps = 8" in (out / "recipe.toml").read_text() and "steps = 6" in (out / "recipe.until-step-6.toml").read_text()


def test_resume_is_exact_with_dropout_after_a_mid_run_kill(tiny_recipe, tmp_path, capsys, run):
    full = tmp_path / "full"
    assert run(["pretrain", tiny_recipe, "--out", full, "--set", "train.steps=20", *DROPOUT], capsys)[0] == 0
    # what `kill -9` right after the step-10 checkpoint (an evaluation step, past the warmup) leaves behind
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    for name in ("model.safetensors", "summary.json", "report.md"):
        (killed / name).unlink()
    for step in (15, 20):
        shutil.rmtree(killed / "checkpoints" / f"step-{step}")
    (killed / "checkpoints" / "latest").write_text("step-10\n")
    code, _, err = run(["pretrain", killed / "recipe.toml", "--resume", "--no-progress"], capsys)
    assert code == 0, err
    a, b = losses(full), losses(killed)
    assert a == b  # bit-identical from step 11 on


def test_resume_from_the_end_of_run_checkpoint_is_exact(tiny_recipe, tmp_path, capsys, run):
    """12 steps, then --resume to 20, equals 20 steps at once (warmup covers both: same schedule)."""
    opts = [*DROPOUT, "--set", "train.warmup=40", "--set", "train.eval_every=4", "--set", "train.checkpoint_every=5"]
    full, short = tmp_path / "full", tmp_path / "short"
    assert run(["pretrain", tiny_recipe, "--out", full, "--set", "train.steps=20", *opts], capsys)[0] == 0
    assert run(["pretrain", tiny_recipe, "--out", short, "--set", "train.steps=12", *opts], capsys)[0] == 0
    code, _, err = run(["pretrain", short / "recipe.toml", "--resume", "--set", "train.steps=20", "--no-progress"], capsys)
    assert code == 0, err
    assert losses(full) == losses(short)


def test_resume_from_a_named_checkpoint(tiny_recipe, tmp_path, capsys, run):
    out = tmp_path / "run"
    assert run(["pretrain", tiny_recipe, "--out", out, "--set", "train.steps=12", *DROPOUT], capsys)[0] == 0
    first = losses(out)
    code, text, err = run(["pretrain", out / "recipe.toml", "--resume-from", out / "checkpoints" / "step-5", "--no-progress"], capsys)
    assert code == 0, err and "resuming from step 5" in text
    assert losses(out) == first and latest_checkpoint(out).name == "step-12"
    code, _, err = run(["pretrain", out / "recipe.toml", "--resume-from", out, "--no-progress"], capsys)
    assert code == 2 and "not a checkpoint folder" in err
