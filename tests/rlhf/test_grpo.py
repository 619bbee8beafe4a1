"""GRPO on a tiny chat run: verifiers score answer and format apart, rollouts are reproducible and
their old log-probs are the policy's, the trainer changes the policy, the CLI runs a tiny recipe
and refuses bad settings in one line."""

from __future__ import annotations

import json

import pytest
import torch

from adl_cli.data.tasks import Problem, make_task


@pytest.fixture(autouse=True)
def _no_peak(monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)


@pytest.mark.parametrize("task,text,right,formatted", [
    ("addition", "579", True, True),
    ("addition", " 579 ", True, True),
    ("addition", "The answer is 579", True, False),  # the verifier reads the last integer; the format wants it bare
    ("addition", "578", False, True),
    ("addition", "", False, False),
    ("reverse", "cba", True, True),
    ("reverse", "cb\na", False, False),
])
def test_verifiers_score_the_answer_and_the_format_apart(task, text, right, formatted):
    t = make_task(task)
    problem = Problem(task, "What is 123 + 456?", "579", "579") if task == "addition" else Problem(task, "Reverse the letters: abc", "cba", "cba")
    assert t.verify(text, problem) == right
    assert t.follows_format(text) == formatted
    pad = make_task("addition", scratchpad=True)
    assert pad.follows_format("3+6+0=9 carry 0; so 123 + 456 = 579") and not pad.follows_format("579 it is")


RECIPE = """
name = "g"
[init]
from = "{base}"
[data]
tasks = ["addition", "reverse"]
operand_digits = 2
eval_examples = 6
[grpo]
group = 4
max_new_tokens = 6
eval_prompts = 4
{extra}
[train]
steps = 3
batch_size = 2
precision = "fp32"
lr = 1e-3
min_lr = 1e-4
warmup = 1
eval_every = 2
checkpoint_every = 2
log_every = 1
seed = 3
"""


def _write(tmp_path, chat_run, extra=""):
    path = tmp_path / "g.toml"
    path.write_text(RECIPE.format(base=chat_run.as_posix(), extra=extra), encoding="utf-8")
    return path


def test_rollouts_are_reproducible_and_their_old_logps_are_the_policys(chat_run, tmp_path):
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.grpo import GRPOSection, Rollouts
    from adl_cli.methods.rlhf.rollouts import completion_logps
    from adl_cli.runs import load_run

    run = load_run(chat_run)
    tasks = {"addition": make_task("addition", operand_digits=2)}
    import contextlib

    cfg = GRPOSection(group=4, max_new_tokens=5, iterations=2)  # old log-probs are kept when rollouts serve several updates
    a = Rollouts(run.model, ChatTemplate.of(run.tokenizer), tasks, cfg, 3, 7, contextlib.nullcontext)(0, 0, 0, 1)
    b = Rollouts(run.model, ChatTemplate.of(run.tokenizer), tasks, cfg, 3, 7, contextlib.nullcontext)(0, 0, 0, 1)
    assert torch.equal(a["inputs"], b["inputs"]) and torch.equal(a["advantages"], b["advantages"])
    assert a["inputs"].shape[0] == 12 and a["advantages"].view(3, 4).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        lp = completion_logps(run.model.eval(), a["inputs"], a["targets"])
    mask = a["targets"] != -100
    assert torch.allclose(lp[mask], a["old_logps"][mask], atol=1e-5)
    assert (mask.sum(1) >= 1).all()


def test_grpo_runs_through_the_cli_changes_the_policy_and_resumes(chat_run, tmp_path, capsys):
    from adl_cli.cli import main
    from adl_cli.runs import load_run

    recipe = _write(tmp_path, chat_run)
    out = tmp_path / "run"
    try:
        main(["rlhf", "grpo", str(recipe), "--out", str(out), "--no-progress"])
    except SystemExit as e:
        assert not e.code
    text = capsys.readouterr().out
    assert "greedy exact match on held-out problems" in text and "paired gain" in text
    assert (out / "rl.png").exists() and (out / "report.md").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 3 and all(k in train[0] for k in ("reward", "accuracy", "format", "length", "kl", "clip_fraction", "flat_groups"))
    assert any("exact_addition" in r for r in rows)
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "grpo" and s["exact_match"]["addition"]["paired"]["n"] == 6
    base, tuned = load_run(chat_run).model.state_dict(), load_run(out).model.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in base.items())
    try:
        main(["rlhf", "grpo", str(recipe), "--out", str(out), "--no-progress", "--resume", "--force", "--set", "train.steps=4"])
    except SystemExit as e:
        assert not e.code
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


@pytest.mark.parametrize("sets,message", [
    (["grpo.group=1"], "grpo.group must be >= 2"),
    (["grpo.loss_type=ppo"], "grpo.loss_type must be one of grpo, dapo, dr_grpo"),
    (["grpo.advantage=mean"], "grpo.advantage must be group or rloo"),
    (["grpo.temperature=0"], "grpo.temperature must be > 0"),
    (['data.tasks=["nope"]'], "nope"),
])
def test_bad_grpo_settings_get_one_clear_line(chat_run, tmp_path, capsys, sets, message):
    from adl_cli.cli import main

    argv = ["rlhf", "grpo", str(_write(tmp_path, chat_run)), "--out", str(tmp_path / "x"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code and message in err and "Traceback" not in err


def test_with_iterations_the_same_rollouts_serve_consecutive_steps(chat_run):
    import contextlib

    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.grpo import GRPOSection, Rollouts
    from adl_cli.runs import load_run

    run = load_run(chat_run)
    source = Rollouts(run.model, ChatTemplate.of(run.tokenizer), {"addition": make_task("addition", operand_digits=2)},
                      GRPOSection(group=2, max_new_tokens=3, iterations=2), 2, 0, contextlib.nullcontext)
    a, b, c = source(0, 0, 0, 1), source(1, 0, 0, 1), source(2, 0, 0, 1)
    assert a is b and c is not a


def test_with_one_update_per_rollout_no_old_logps_are_computed(chat_run):
    import contextlib

    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.grpo import GRPOSection, Rollouts
    from adl_cli.runs import load_run

    run = load_run(chat_run)
    batch = Rollouts(run.model, ChatTemplate.of(run.tokenizer), {"addition": make_task("addition", operand_digits=2)},
                     GRPOSection(group=2, max_new_tokens=3), 2, 0, contextlib.nullcontext)(0, 0, 0, 1)
    assert "old_logps" not in batch  # the loss uses its own log-probs, detached: ratio 1, no extra forward


def test_rollouts_through_the_cache_equal_uncached_greedy_decoding(chat_run):
    """The rollouts' batched, left-padded, KV-cached decoding writes what a plain loop writes that
    re-reads the whole sequence at every step and takes the argmax."""
    import contextlib

    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.rollouts import draw_problems, sample_answers
    from adl_cli.runs import load_run

    run = load_run(chat_run)
    model = run.model.eval()
    template = ChatTemplate.of(run.tokenizer)
    tasks = {"addition": make_task("addition", operand_digits=2), "reverse": make_task("reverse")}
    problems, owners = draw_problems(tasks, 6, 0, "cache-test")
    got = sample_answers(model, template, tasks, problems, owners, n=1, temperature=0.0, max_new_tokens=8, seed=0, autocast=contextlib.nullcontext)
    stop = template.stop_ids
    for r, p in enumerate(problems):
        ids = list(template.question(p.question))
        written = []
        with torch.no_grad():
            for _ in range(8):
                nxt = int(model(torch.tensor([ids]))[0][0, -1].argmax())
                written.append(nxt)
                ids.append(nxt)
                if nxt in stop:
                    break
        mask = got.targets[r] != -100
        assert got.targets[r][mask].tolist() == written
        assert got.inputs[r, : len(ids) - 1].tolist() == ids[:-1]
