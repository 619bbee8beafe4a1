"""PPO on a tiny chat run: the value head and PPO-ptx ride one forward of the policy, rollouts give
the policy's old log-probs and values, their returns are the per-token rewards (score at the last
token, KL penalty on every token) summed as GAE defines them, beta adapts and travels in the
checkpoint, a reward model scores whole answers, the CLI runs a tiny recipe and refuses bad input."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from adl_cli.data.tasks import make_task


@pytest.fixture(autouse=True)
def _no_peak(monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)


RECIPE = """
name = "p"
[init]
from = "{base}"
[data]
tasks = ["addition", "reverse"]
operand_digits = 2
eval_examples = 6
[ppo]
samples = 2
max_new_tokens = 6
eval_prompts = 4
kl_target = 0.5
kl_horizon = 100
{extra}
[train]
steps = 3
batch_size = 3
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
    path = tmp_path / "p.toml"
    path.write_text(RECIPE.format(base=chat_run.as_posix(), extra=extra), encoding="utf-8")
    return path


def _rollouts(chat_run, scorer=None, **cfg):
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.ppo import ActorCritic, PPORollouts, PPOSection
    from adl_cli.runs import load_run

    run, ref = load_run(chat_run), load_run(chat_run)
    model = ActorCritic(run.model.eval())
    with torch.no_grad():  # values that are not all zero, so the returns' bookkeeping is seen
        model.value_head.weight.copy_(0.3 * torch.randn(model.value_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    tasks = {"addition": make_task("addition", operand_digits=2)}
    section = PPOSection(**{"samples": 2, "max_new_tokens": 5, **cfg})
    source = PPORollouts(model, lambda: ref.model.eval(), ChatTemplate.of(run.tokenizer), tasks, section, 3, 7, contextlib.nullcontext, scorer=scorer)
    return model, source


def test_whiten_and_last_positions():
    from adl_cli.methods.rlhf.ppo import last_positions, whiten

    x = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 5.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = whiten(x, mask)
    vals = w[mask]
    assert abs(vals.mean()) < 1e-6 and abs(vals.pow(2).mean() - 1) < 1e-4 and (w[~mask] == 0).all()
    assert last_positions(mask).tolist() == [2, 1]


def test_the_value_head_and_ptx_ride_one_forward_of_the_policy(chat_run):
    from adl_cli.methods.rlhf.ppo import ActorCritic
    from adl_cli.runs import load_run

    policy = load_run(chat_run).model.eval()
    ac = ActorCritic(policy)
    x = torch.randint(0, policy.config.vocab_size, (2, 9))
    y = torch.randint(0, policy.config.vocab_size, (2, 9))
    with torch.no_grad():
        logits, values, lm = ac(x, (x, y))
        assert torch.allclose(logits, policy(x)[0], atol=1e-5)
        assert values.shape == (2, 9) and (values == 0).all()  # a zero head: no opinion before training
        assert torch.allclose(lm, policy(x, y)[1], atol=1e-5)
        assert ac(x)[2] is None


def test_rollouts_hold_the_policys_log_probs_and_returns_as_gae_defines_them(chat_run):
    from adl_cli.methods.rlhf.rollouts import completion_logps

    model, source = _rollouts(chat_run, kl_coef=0.3, lam=1.0, gamma=1.0, whiten=False)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from its reference, so the KL penalty is not 0
        model.policy.lm_head.weight.add_(0.05 * torch.randn_like(model.policy.lm_head.weight))
    a = source(0, 0, 0, 1)
    mask = a["targets"] != -100
    assert a["inputs"].shape[0] == 6 and (mask.sum(1) >= 1).all()
    with torch.no_grad():
        lp = completion_logps(model.policy, a["inputs"], a["targets"])
        ref = completion_logps(source.reference(), a["inputs"], a["targets"])
        values = model(a["inputs"])[1]
    assert torch.allclose(lp[mask], a["old_logps"][mask], atol=1e-5)
    assert torch.allclose(values[mask], a["old_values"][mask], atol=1e-5)
    assert (values[mask].abs() > 0).all() and a["stats"]["kl"] != 0
    # gamma = lambda = 1: the return at every answer token is what is still to come, the score at
    # the end minus beta x the KL (k1) of the tokens from there on; the advantage is return - value
    k1 = (lp - ref) * mask
    togo = k1.flip(1).cumsum(1).flip(1)
    scores = []
    for r in range(6):
        per_token = (a["returns"][r] + 0.3 * togo[r])[mask[r]]
        assert torch.allclose(per_token, per_token[0].expand_as(per_token), atol=1e-4)
        scores.append(float(per_token[0]))
    assert all(min(abs(x - v) for v in (0.0, 0.2, 1.0, 1.2)) < 1e-4 for x in scores)  # correct + 0.2 x format
    assert sum(scores) / 6 == pytest.approx(float(a["stats"]["reward"]), abs=1e-5)
    assert torch.allclose(a["returns"][mask], (a["advantages"] + a["old_values"])[mask], atol=1e-5)
    assert (a["returns"][~mask] == 0).all() and (a["advantages"][~mask] == 0).all()
    # the PPO loss on these rollouts moves the policy (not only the value head)
    from adl_cli.methods.rlhf.ppo import ppo_loss

    model.train()
    loss, metrics = ppo_loss(source.cfg)(model, a)
    loss.backward()
    assert model.policy.transformer.h[0].attn.q_proj.weight.grad.abs().max() > 0 and metrics["clip_fraction"] == 0


def test_with_the_policy_equal_to_its_reference_the_kl_is_zero_and_adaptive_beta_falls(chat_run):
    model, source = _rollouts(chat_run, kl_coef=0.1, kl_target=1.0, kl_horizon=60)
    a = source(0, 0, 0, 1)
    assert abs(float(a["stats"]["kl"])) < 1e-5
    again = _rollouts(chat_run, kl_coef=0.1, kl_target=1.0, kl_horizon=60)[1](0, 0, 0, 1)  # the same questions and draws
    assert torch.equal(again["inputs"], a["inputs"]) and torch.equal(again["advantages"], a["advantages"])
    # KL 0 is below the target: beta shrinks by the rule's largest step, 0.2 x answers / horizon
    assert source.beta == pytest.approx(0.1 * (1 - 0.2 * 6 / 60))
    state = source.state_dict()
    other = _rollouts(chat_run, kl_coef=0.1, kl_target=1.0, kl_horizon=60)[1]
    other.load_state_dict(state)
    assert other.beta == source.beta and other.kl.beta == source.beta
    fixed = _rollouts(chat_run, kl_coef=0.1)[1]
    fixed(0, 0, 0, 1)
    assert fixed.beta == 0.1


def test_a_reward_model_scores_each_whole_answer_at_its_last_token(chat_run):
    from adl_cli.models.reward import from_language_model
    from adl_cli.runs import load_run

    rm = from_language_model(load_run(chat_run).model).eval()
    with torch.no_grad():
        rm.score.weight.normal_()
    _, source = _rollouts(chat_run, scorer=rm, kl_coef=0.0, lam=1.0, whiten=False)
    a = source(0, 0, 0, 1)
    mask = a["targets"] != -100
    expect = []
    for r in range(len(mask)):
        last = int(mask[r].nonzero().max())
        ids = torch.cat([a["inputs"][r, : last + 1], a["targets"][r, last:last + 1]])[None]
        with torch.no_grad():
            expect.append(float(rm(ids, last=torch.tensor([last + 1]))))
    assert a["stats"]["reward"] == pytest.approx(sum(expect) / len(expect), abs=1e-4)
    # normalised: the starting policy's own answers score mean 0, std 1, and every score is moved alike
    norm = source.normalize_scores(answers=16)
    assert norm["answers"] == 16 and norm["reward_scale"] > 0
    from adl_cli.methods.rlhf.rollouts import draw_problems, rollout_seed, sample_answers

    problems, owners = draw_problems(source.tasks, 8, source.seed, "ppo:normalise")
    got = sample_answers(source.model.policy, source.template, source.tasks, problems, owners, n=2, temperature=1.0, max_new_tokens=5,
                         seed=rollout_seed(source.seed, -1, 0, 0), autocast=contextlib.nullcontext)
    scored = source.scores(got, "cpu")
    assert abs(float(scored.mean())) < 1e-4 and float(scored.std()) == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(scored * norm["reward_scale"] + norm["reward_shift"], source.scores(got, "cpu", raw=True), atol=1e-5)
    assert source.state_dict()["reward_shift"] == norm["reward_shift"]


def test_ppo_runs_through_the_cli_changes_the_policy_and_resumes_with_its_beta(chat_run, tmp_path, capsys):
    from adl_cli.cli import main
    from adl_cli.runs import load_run

    recipe = _write(tmp_path, chat_run, "ptx_coef = 0.5\nptx_rows = 2")
    out = tmp_path / "run"
    try:
        main(["rlhf", "ppo", str(recipe), "--out", str(out), "--no-progress"])
    except SystemExit as e:
        assert not e.code
    text = capsys.readouterr().out
    assert "greedy exact match on held-out problems" in text and "sampled held-out answer" in text and "target 0.5" in text
    assert (out / "rl.png").exists() and (out / "report.md").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 3
    assert all(k in train[0] for k in ("reward", "accuracy", "format", "length", "kl", "kl_coef", "clip_fraction", "value_loss",
                                       "explained_var", "ptx_loss"))
    betas = [r["kl_coef"] for r in train]
    assert betas[0] == pytest.approx(0.05) and betas[1] != betas[0]  # adaptive
    s = json.loads((out / "summary.json").read_text())
    assert s["kind"] == "ppo" and s["exact_match"]["addition"]["paired"]["n"] == 6 and s["sampled_kl"] is not None
    assert s["sampled_reward"]["reverse"]["before"]["n"] == 6
    base, tuned = load_run(chat_run).model.state_dict(), load_run(out).model.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in base.items())
    try:
        main(["report", str(out)])
    except SystemExit as e:
        assert not e.code
    assert "PPO run p" in capsys.readouterr().out  # adl report shows the run's own report
    try:
        main(["rlhf", "ppo", str(recipe), "--out", str(out), "--no-progress", "--resume", "--force", "--set", "train.steps=4"])
    except SystemExit as e:
        assert not e.code
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    # resumed from step 2's checkpoint: step 3's beta is the one the first run used at step 3
    assert len(train) == 4 and train[2]["kl_coef"] == pytest.approx(betas[2])


@pytest.mark.parametrize("sets,message", [
    (["ppo.samples=0"], "ppo.samples must be >= 1"),
    (["ppo.lam=1.5"], "ppo.lam must be in [0, 1]"),
    (["ppo.temperature=0"], "ppo.temperature must be > 0"),
    (["ppo.kl_coef=-1"], "ppo.kl_coef must be >= 0"),
    (["ppo.reward=nowhere"], "nowhere"),
    (["ppo.ptx_coef=1", "ppo.ptx_data=nowhere/*.txt"], "nowhere"),
])
def test_bad_ppo_settings_get_one_clear_line(chat_run, tmp_path, capsys, sets, message):
    from adl_cli.cli import main

    argv = ["rlhf", "ppo", str(_write(tmp_path, chat_run)), "--out", str(tmp_path / "x"), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code and message in err and "Traceback" not in err


def test_a_language_model_run_is_refused_as_the_reward(chat_run, tmp_path, capsys):
    from adl_cli.cli import main

    argv = ["rlhf", "ppo", str(_write(tmp_path, chat_run)), "--out", str(tmp_path / "x"), "--no-progress", "--set", f"ppo.reward={chat_run.as_posix()}"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code and "is not a reward run" in err


def test_a_lora_policy_trains_its_adapters_and_the_value_head_against_its_base(chat_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from adl_cli.cli import main

    out = tmp_path / "lora"
    try:
        main(["rlhf", "ppo", str(_write(tmp_path, chat_run)), "--out", str(out), "--no-progress", "--no-base", "--set", "method=lora",
              "--set", "lora.r=4", "--set", "lora.alpha=8", "--set", "train.checkpoint_every=0", "--set", "ppo.ptx_coef=1"])
    except SystemExit as e:
        assert not e.code
    assert (out / "adapter.safetensors").exists() and not (out / "model.safetensors").exists()
    tensors = load_file(out / "adapter.safetensors")
    # B starts at 0: the adapters trained (the tiny model earns no reward, so PPO-ptx's LM loss moves them)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in tensors.items())
    assert not any("value_head" in k for k in tensors)  # the value head is training machinery, not part of the policy
    s = json.loads((out / "summary.json").read_text())
    assert s["method"] == "lora" and s["trainable_parameters"] < s["parameters"] // 5 and s["sampled_kl"] is not None
