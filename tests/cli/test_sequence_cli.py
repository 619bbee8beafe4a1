"""adl sequence through the real entry point: each kind of family trains on a task and is scored on
its answers at the training and longer lengths (a fixed-context model only within its context);
a resumed run equals an uninterrupted one; bad input is one line."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adl_cli.runs import load_run

RECIPE = """
name = "s"
[model]
{model}
vocab_multiple = 8
[task]
name = "{task}"
length = {length}
eval_lengths = [{longer}]
eval_examples = 32
options = {options}
[train]
steps = {steps}
batch_size = 8
lr = 3e-3
warmup = 1
eval_every = 0
checkpoint_every = {ck}
log_every = 2
precision = "fp32"
"""
MODELS = {"gpt": 'family = "gpt"\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 24',
          "mamba": 'family = "mamba"\nn_layer = 1\nn_embd = 16\nd_state = 4\nblock_size = 64',
          "lstm": 'family = "rnn"\ncell = "lstm"\nn_layer = 1\nn_embd = 16\nblock_size = 64',
          "gru": 'family = "rnn"\ncell = "gru"\nn_layer = 1\nn_embd = 16\nblock_size = 64',
          "mamba2": 'family = "mamba2"\nn_layer = 1\nn_embd = 16\nd_state = 4\nheaddim = 8\nblock_size = 64',
          "mlstm": 'family = "mlstm"\nn_layer = 1\nn_embd = 16\nn_head = 2\nblock_size = 64',
          "slstm": 'family = "slstm"\nn_layer = 1\nn_embd = 16\nn_head = 2\nblock_size = 64'}


def _write(tmp_path, fam, task="selective_copy", length=12, longer=24, steps=4, ck=0):
    p = tmp_path / f"{fam}.toml"
    options = "{ k = 4, data_vocab = 6 }" if task == "selective_copy" else "{}"
    p.write_text(RECIPE.format(model=MODELS[fam], task=task, length=length, longer=longer, steps=steps, ck=ck, options=options))
    return p


@pytest.mark.parametrize("fam", sorted(MODELS))
def test_each_family_trains_and_is_scored_at_two_lengths(fam, tmp_path, capsys, run):
    parity = fam in ("lstm", "slstm")
    code, out, err = run(["sequence", _write(tmp_path, fam, task="parity" if parity else "selective_copy", length=9 if parity else 12,
                                             longer=18 if parity else 24), "--out", tmp_path / "run", "--json", "--no-progress"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["family"] == fam  # the table names the cell, not the rnn family
    first, second = s["scores"]
    assert first["length"] in (12, 9) and 0 <= first["accuracy"] <= 1 and first["examples"] == 32
    if fam == "gpt":  # 24 + 4 markers: 28 tokens exceed its context of 24
        assert "exceed model.block_size 24" in second["skipped"]
    else:
        assert "accuracy" in second
    from adl_cli.data.sequence_tasks import make_task
    from adl_cli.methods.sequence import task_scores

    model = load_run(tmp_path / "run").model
    task = make_task(s["task"], **({"k": 4, "data_vocab": 6} if s["task"] == "selective_copy" else {}))
    assert abs(task_scores(model, task, first["length"], 32)["accuracy"] - first["accuracy"]) < 1e-12  # the saved model was scored


def test_resume_equals_an_uninterrupted_run(tmp_path, capsys, run):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run(["sequence", _write(tmp_path, "mamba", steps=6, ck=3), "--out", full, "--no-progress"], capsys)[0] == 0
    shutil.copytree(full, killed)
    for name in ("model.safetensors", "summary.json", "report.md"):
        (killed / name).unlink()
    shutil.rmtree(killed / "checkpoints" / "step-6")
    (killed / "checkpoints" / "latest").write_text("step-3\n")
    code, _, err = run(["sequence", killed / "recipe.toml", "--out", killed, "--resume", "--no-progress"], capsys)
    assert code == 0, err
    a, b = load_run(full).model.state_dict(), load_run(killed).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_one_line(tmp_path, capsys, run):
    p = _write(tmp_path, "gpt")
    for sets, message in ((["task.name=sorting"], "task.name must be one of"), (["task.length=40"], "longer than model.block_size"),
                          (["task.options={k = 30}"], "length >= k"), (["task.options={colour = 1}"], "task.options"),
                          (["model.family=vit"], "unknown key 'model.n_layer'")):
        args = ["sequence", p, "--out", tmp_path / "bad", "--no-progress"] + [a for s in sets for a in ("--set", s)]
        code, _, err = run(args, capsys)
        assert code == 2 and message in err and "Traceback" not in err, (sets, err)
        assert not (tmp_path / "bad").exists()
    vit = tmp_path / "vit.toml"
    vit.write_text(RECIPE.format(model='family = "vit"', task="parity", length=8, longer=16, steps=2, ck=0, options="{}").replace("vocab_multiple = 8\n", ""))
    code, _, err = run(["sequence", vit, "--out", tmp_path / "bad", "--no-progress"], capsys)
    assert code == 2 and "not a language model" in err and not (tmp_path / "bad").exists(), err



def test_the_lm_task_is_a_pretraining_run_scored_in_bits_per_byte(tmp_path, small_corpus, capsys, run):
    p = tmp_path / "lm.toml"
    options = f'{{ corpus = "{small_corpus.as_posix()}", tokenizer = "bytes" }}'
    p.write_text(RECIPE.format(model=MODELS["mamba2"], task="lm", length=32, longer=64, steps=4, ck=0, options=options))
    out = tmp_path / "run"
    code, stdout, err = run(["sequence", p, "--out", out, "--json", "--no-progress"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["task"] == "lm" and s["family"] == "mamba2" and s["steps"] == 4
    pretrained = json.loads((out / "summary.json").read_text())  # an adl pretrain run folder
    assert s["scores"] == [{"length": 32, "bits_per_byte": pretrained["val_bits_per_byte"]}] and 0 < pretrained["val_bits_per_byte"] < 8
    assert load_run(out).model.config.block_size == 32
    code, table, err = run(["sequence", p, "--out", tmp_path / "again", "--no-progress"], capsys)
    assert code == 0 and "bits per byte" in table, err
    code, _, err = run(["sequence", p, "--out", tmp_path / "bad", "--set", "task.options={colour = 1}", "--no-progress"], capsys)
    assert code == 2 and "the lm task takes [data] keys" in err and not (tmp_path / "bad").exists(), err
