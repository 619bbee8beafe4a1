"""Inference-time scaling: pass@k against its definition (all k-subsets), majority vote's ties, the
table's figures against a slow recount from the sampled answers, sampled answers that do not depend
on the batch, and `adl eval --samples` through the CLI with its bad inputs."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from adl_cli.data.tasks import make_task, split_problems


@pytest.mark.parametrize("n,c", [(5, 0), (5, 1), (5, 3), (6, 6), (8, 2)])
def test_pass_at_k_is_the_share_of_k_subsets_holding_a_correct_sample(n, c):
    from adl_cli.methods.inference_scaling import pass_at_k

    outcomes = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
        subsets = list(itertools.combinations(range(n), k))
        slow = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(slow)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_ignores_missing_answers_and_breaks_ties_by_first_seen():
    from adl_cli.methods.inference_scaling import majority, sample_budgets

    assert majority(["3", None, "4", "4", "3"]) == "3"
    assert majority([None, "7", "5", "5"]) == "5"
    assert majority([None, None]) is None
    assert sample_budgets(8) == [1, 2, 4, 8] and sample_budgets(6) == [1, 2, 4, 6] and sample_budgets(1) == [1]


def test_sampled_answers_do_not_depend_on_the_batch(chat_run):
    from adl_cli.inference.sampling import SamplingParams
    from adl_cli.methods.exact_match import answers
    from adl_cli.runs import load_run

    run = load_run(chat_run)
    task = make_task("addition", operand_digits=2)
    problems = split_problems(task, 5, held_out=True, seed=0)
    params = SamplingParams(temperature=1.0)
    a = answers(run.model.eval(), run.tokenizer, task, problems, n=3, params=params, seed=4, batch_size=64)
    b = answers(run.model, run.tokenizer, task, problems, n=3, params=params, seed=4, batch_size=3)  # one problem a batch
    assert [[c.tokens for c in g] for g in a] == [[c.tokens for c in g] for g in b]
    c = answers(run.model, run.tokenizer, task, problems, n=3, params=params, seed=5)
    assert [[x.tokens for x in g] for g in a] != [[x.tokens for x in g] for g in c]


def test_the_scaling_table_matches_a_recount_of_the_samples(chat_run):
    from adl_cli.methods.exact_match import exact_match
    from adl_cli.methods.inference_scaling import sample_scaling
    from adl_cli.models.reward import from_language_model
    from adl_cli.runs import load_run

    run = load_run(chat_run)
    model = run.model.eval()
    task = make_task("addition", operand_digits=2)
    problems = split_problems(task, 6, held_out=True, seed=0)
    rm = from_language_model(model).eval()
    with torch.no_grad():
        rm.score.weight.normal_(generator=torch.Generator().manual_seed(0))
    s = sample_scaling(model, run.tokenizer, task, problems, samples=4, temperature=1.5, seed=1, reward_model=rm)
    d = s.to_dict()
    assert [r["k"] for r in d["rows"]] == [1, 2, 4]
    assert d["greedy"] == exact_match(model, run.tokenizer, task, problems).accuracy
    # k = n: pass@n is "any sample right"; k = 1: the mean sample accuracy
    assert d["rows"][-1]["pass"] == pytest.approx(sum(any(c) for c in s.correct) / 6)
    assert d["rows"][0]["pass"] == pytest.approx(d["sample_accuracy"])
    assert d["rows"][0]["majority"] == pytest.approx(d["sample_accuracy"])  # a vote of one is the sample
    for row in d["rows"]:
        k = row["k"]
        votes, picks = [], []
        for p, finals, correct, r in zip(problems, s.finals, s.correct, s.rewards):
            for lo in range(0, 4 - k + 1, k):  # disjoint blocks of k samples
                seen = [f for f in finals[lo:lo + k] if f is not None]
                best = max(seen, key=lambda f: (seen.count(f), -seen.index(f))) if seen else None
                votes.append((best == p.final) / (4 // k))
                picks.append(correct[lo + max(range(k), key=lambda j: r[lo + j])] / (4 // k))
        assert row["majority"] == pytest.approx(sum(votes) / 6)
        assert row["best_of"] == pytest.approx(sum(picks) / 6)
    # the reward model's scores are its own reading of prompt + answer
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.inference.sampling import SamplingParams
    from adl_cli.methods.exact_match import answers

    got = answers(model, run.tokenizer, task, problems[:1], n=4, params=SamplingParams(temperature=1.5), seed=1)
    ids = ChatTemplate.of(run.tokenizer).question(problems[0].question) + list(got[0][2].tokens)
    with torch.no_grad():
        assert s.rewards[0][2] == pytest.approx(float(rm(torch.tensor([ids]), last=torch.tensor([len(ids) - 1]))), abs=1e-5)


def test_eval_samples_through_the_cli_prints_the_table_and_draws_the_figure(chat_run, tmp_path, capsys):
    from adl_cli.cli import main

    png = tmp_path / "s.png"
    argv = ["eval", str(chat_run), "--task", "addition", "--examples", "5", "--samples", "4", "--plot", str(png)]
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code
    out = capsys.readouterr().out
    assert "pass@k" in out and "majority@4 - greedy" in out and png.exists()
    with pytest.raises(SystemExit) as e:  # the figure is not replaced without --force
        main(argv)
    assert e.value.code and "exists" in capsys.readouterr().err
    try:
        main(["eval", str(chat_run), "--task", "addition", "--examples", "5", "--samples", "2", "--json"])
    except SystemExit as e:
        assert not e.code
    d = json.loads(capsys.readouterr().out)
    assert d["tasks"][0]["samples"] == 2 and len(d["tasks"][0]["rows"]) == 2


@pytest.mark.parametrize("extra,message", [
    (["--samples", "-1"], "--samples must be >= 0"),
    (["--plot", "x.png"], "go with --samples"),
    (["--samples", "2", "--temperature", "0"], "--temperature must be > 0"),
    (["--samples", "2", "--plot", "x.txt"], "ending in .png"),
    (["--samples", "2", "--reward-model", "nowhere"], "nowhere"),
])
def test_bad_sampling_options_get_one_clear_line(chat_run, capsys, extra, message):
    from adl_cli.cli import main

    with pytest.raises(SystemExit) as e:
        main(["eval", str(chat_run), "--task", "addition", "--examples", "3", *extra])
    err = capsys.readouterr().err
    assert e.value.code and message in err and "Traceback" not in err
