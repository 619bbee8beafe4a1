"""adl rlhf reward / dpo / pairs through the real entry point: tiny recipes from a chat run, the
files they write, resume, and bad input answered in one line."""

from __future__ import annotations

import json

import pytest

DATA = """
[data]
sets = ["arithmetic", "format"]
train_pairs = 16
val_pairs = 4
operand_digits = 2
"""
TRAIN = """
[train]
steps = 2
batch_size = 4
precision = "fp32"
lr = 1e-3
min_lr = 1e-4
warmup = 1
eval_every = 1
checkpoint_every = 1
log_every = 1
seed = 3
"""


def _recipe(root, kind, base, extra=""):
    head = f'name = "{kind}"\n' + ("[dpo]\nkl_prompts = 2\nkl_tokens = 3\nmatch_prompts = 2\n" if kind == "dpo" else "")
    path = root / f"{kind}.toml"
    path.write_text(f'{head}{extra}\n[init]\nfrom = "{base.as_posix()}"\n{DATA}{TRAIN}', encoding="utf-8")
    return path


def _run(argv, capsys):
    from adl_cli.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _no_peak(monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)


@pytest.mark.parametrize("kind", ["reward", "dpo"])
def test_each_command_runs_a_tiny_recipe_end_to_end_and_resumes(kind, chat_run, tmp_path, capsys):
    recipe = _recipe(tmp_path, kind, chat_run)
    out = tmp_path / "run"
    code, text, err = _run(["rlhf", kind, str(recipe), "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert "held-out pair accuracy beside the length-only baselines" in text and "arithmetic" in text
    for f in ("summary.json", "report.md", "loss.png", "metrics.jsonl", "recipe.toml", "tokenizer.json", "model.safetensors"):
        assert (out / f).exists(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == kind and summary["steps"] == 2
    assert "prefer shorter" in (out / "report.md").read_text()
    if kind == "dpo":
        assert (out / "reference_logps.safetensors").exists() and summary["sampled_kl"] is not None and summary["ref_kl"] is not None
    code, text, err = _run(["report", str(out)], capsys)  # adl report shows the run's own report
    assert code == 0 and ("Reward model" if kind == "reward" else "DPO run") in text and "shorter" in text, err
    # the folder is not replaced without --force, and a run resumes to more steps
    code, _, err = _run(["rlhf", kind, str(recipe), "--out", str(out), "--no-progress"], capsys)
    assert code != 0 and "--force" in err and "Traceback" not in err
    code, text, err = _run(["rlhf", kind, str(recipe), "--out", str(out), "--no-progress", "--resume", "--force", "--set", "train.steps=3"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_pairs_lists_the_built_in_sets(capsys):
    code, text, _ = _run(["rlhf", "pairs"], capsys)
    assert code == 0 and "arithmetic" in text and "format" in text


@pytest.mark.parametrize("kind,sets,message", [
    ("dpo", ["dpo.loss=kto"], "dpo.loss must be one of dpo, ipo"),
    ("dpo", ["dpo.beta=0"], "dpo.beta must be > 0"),
    ("dpo", ["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "applies to dpo.loss = 'dpo' only"),
    ("dpo", ["method=adapter"], "method must be one of full, lora, dora, qlora"),
    ("dpo", ["dpo.reference=nowhere/run"], "dpo.reference nowhere/run: no run folder there"),
    ("reward", ['data.sets=["nope"]'], "nope"),
    ("reward", ["margin=-1"], "margin must be >= 0"),
    ("reward", ["init.from=nowhere/run"], "init.from nowhere/run: no run folder there"),
])
def test_bad_settings_get_one_clear_line(kind, sets, message, chat_run, tmp_path, capsys):
    recipe = _recipe(tmp_path, kind, chat_run)
    argv = ["rlhf", kind, str(recipe), "--out", str(tmp_path / "x"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = _run(argv, capsys)
    assert code != 0 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3


def test_a_malformed_preference_file_names_its_line(chat_run, tmp_path, capsys):
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n', encoding="utf-8")
    recipe = _recipe(tmp_path, "reward", chat_run)
    code, _, err = _run(["rlhf", "reward", str(recipe), "--out", str(tmp_path / "x"), "--no-progress", "--set", f'data.files=["{pairs.as_posix()}"]'], capsys)
    assert code != 0 and f"{pairs}:2: missing field 'rejected'" in err.replace("\n", "")
