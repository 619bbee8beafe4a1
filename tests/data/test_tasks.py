"""Built-in SFT tasks: verifiers accept references and reject perturbed answers; splits are disjoint and seeded."""

from __future__ import annotations

import random
import re

import pytest

from adl_cli.data.tasks import TASKS, addition_steps, last_integer, make_task, split_problems


def _perturbed(task, problem, rng) -> list[str]:
    """Wrong replies: the final answer changed, or cut short."""
    out = []
    if task.numeric:
        wrong = int(problem.final) + rng.choice([-1, 1, 10])
        out.append(problem.answer[: problem.answer.rfind(problem.final)] + str(wrong))
        out.append(f"{problem.final} then {wrong}")  # the last number counts
        out.append("no number at all")
    else:
        chars = list(problem.final)
        i = rng.randrange(len(chars))
        chars[i] = "X" if chars[i] != "X" else "Y"
        out += ["".join(chars), problem.final[:-1], problem.final + " extra"]
    return out


@pytest.mark.parametrize("name", TASKS.names())
@pytest.mark.parametrize("scratchpad", [False, True])
def test_verifier_accepts_references_and_rejects_perturbations(name, scratchpad):
    task = make_task(name, scratchpad=scratchpad)
    rng = random.Random(0)
    for _ in range(50):
        p = task.draw(rng)
        assert task.verify(p.answer, p), (p.question, p.answer)
        assert task.verify(f"  {p.answer}\n", p)
        for wrong in _perturbed(task, p, rng):
            assert not task.verify(wrong, p), (p.question, wrong)


@pytest.mark.parametrize("name", TASKS.names())
def test_train_and_held_out_problems_are_disjoint_and_seeded(name):
    task = make_task(name)
    held = split_problems(task, 40, held_out=True, seed=3)
    train = split_problems(task, 400, held_out=False, seed=3)
    assert held and train
    assert not {p.question for p in held} & {p.question for p in train}
    assert len({p.question for p in held}) == len(held)  # an evaluation set has no repeats
    assert [p.question for p in split_problems(task, 40, held_out=True, seed=3)] == [p.question for p in held]
    assert [p.question for p in split_problems(task, 40, held_out=True, seed=4)] != [p.question for p in held]


def test_addition_operands_are_uniform_in_range():
    task = make_task("addition", operand_digits=3)
    probs = split_problems(task, 2000, held_out=False, seed=0)
    ops = [int(x) for p in probs for x in re.findall(r"\d+", p.question)]
    assert min(ops) >= 0 and max(ops) <= 999
    assert sum(o < 100 for o in ops) / len(ops) == pytest.approx(0.1, abs=0.03)  # 100 of 1000 values
    for p in probs[:200]:
        a, b = map(int, re.findall(r"\d+", p.question))
        assert int(p.final) == a + b


def test_scratchpad_steps_are_the_column_sums():
    rng = random.Random(1)
    for _ in range(200):
        a, b = rng.randrange(10 ** 4), rng.randrange(10 ** 4)
        steps = addition_steps(a, b)
        digits = [int(m) for m in re.findall(r"=(\d+) carry", steps)]
        assert int("".join(str(d % 10) for d in reversed(digits))) == a + b
    p = make_task("multiplication", scratchpad=True).draw(random.Random(2))
    a, b = map(int, re.findall(r"\d+", p.question))
    assert int(p.final) == a * b and p.answer.endswith(f"= {a * b}")


def test_last_integer_reads_the_final_number():
    assert last_integer("3+4=7 carry 0; so 12 + 30 = 42") == "42"
    assert last_integer("007") == "7"
    assert last_integer("none") is None


def test_the_held_out_loss_problems_are_held_out_too():
    task = make_task("addition")
    train = {p.question for p in split_problems(task, 3000, held_out=False, seed=5)}
    loss_side = split_problems(task, 300, held_out=True, seed=5, stream="loss")
    evaluation = split_problems(task, 300, held_out=True, seed=5)
    assert not train & {p.question for p in loss_side}
    assert [p.question for p in loss_side] != [p.question for p in evaluation]
    assert all(task.held_out(p, 5) for p in loss_side)


def test_short_operands_put_small_numbers_into_training_only_where_asked():
    uniform = make_task("addition", operand_digits=3)
    mixed = make_task("addition", operand_digits=3, short_operands=0.5)
    ops = lambda t: [int(x) for p in split_problems(t, 2000, held_out=False, seed=0) for x in re.findall(r"\d+", p.question)]  # noqa: E731
    small = lambda xs: sum(x < 10 for x in xs) / len(xs)  # noqa: E731
    assert small(ops(uniform)) == pytest.approx(0.01, abs=0.01)
    assert small(ops(mixed)) == pytest.approx(0.5 / 3 + 0.5 * 0.01, abs=0.03)  # a third of the short draws have one digit
    assert max(ops(mixed)) <= 999
    held = split_problems(mixed, 50, held_out=True, seed=0)
    assert not {p.question for p in held} & {p.question for p in split_problems(mixed, 3000, held_out=False, seed=0)}


def test_the_multiplication_scratchpad_splits_either_operand_and_its_steps_are_right():
    task = make_task("multiplication", scratchpad=True)
    rng = random.Random(3)
    split_first = split_second = 0
    for _ in range(300):
        p = task.draw(rng)
        a, b = map(int, re.findall(r"\d+", p.question))
        steps, total = p.answer.split("; ")
        partial = [tuple(map(int, m)) for m in re.findall(r"(\d+) \* (\d+) = (\d+)", steps)]
        assert all(x * y == z for x, y, z in partial)
        assert sum(z for _, _, z in partial) == a * b and total.endswith(f"= {a * b}")
        kept = {x for x, _, _ in partial}
        split_first += kept == {b} and a != b
        split_second += kept == {a} and a != b
    assert split_first > 50 and split_second > 50  # both derivations are taught
