"""The synthetic sequence tasks: every answer is a function of the input (a solver written from
the task's definition scores 100%, and a solver missing the point scores near chance), only
answer positions are scored, batches are a function of the seed, and the spec's sizes hold."""

from __future__ import annotations

import pytest
import torch

from adl_cli.data.sequence_tasks import SEQUENCE_TASKS, make_task


def _solve(name, task, x):
    """The answers read off the input by the task's definition, (n, answers)."""
    if name == "selective_copy":
        body = x[:, : x.shape[1] - task.k]
        return torch.stack([row[row > 0] for row in body])
    if name == "recall":
        keys, values, query = x[:, 0:-1:2], x[:, 1:-1:2], x[:, -1:]
        return values.gather(1, (keys == query).float().argmax(1, keepdim=True))
    if name == "parity":
        return (x[:, :-1].sum(1, keepdim=True)) % 2
    return x[:, : task.k]  # noisy_copy


@pytest.mark.parametrize("name,length", [("selective_copy", 64), ("recall", 20), ("parity", 33), ("noisy_copy", 40)])
def test_answers_follow_from_the_input_and_only_they_are_scored(name, length):
    task = make_task(name)
    spec = task.spec(length)
    x, y = task.batch(50, length, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (50, spec.seq_len) and int(x.max()) < spec.vocab_size and int(x.min()) >= 0
    scored = y != -100
    assert (scored.sum(1) == spec.answers).all()
    answers = y[scored].view(50, spec.answers)
    assert torch.equal(_solve(name, task, x), answers)
    x2, y2 = task.batch(50, length, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a function of the seed
    assert not torch.equal(x, task.batch(50, length, torch.Generator().manual_seed(2))[0])


def test_the_answers_are_not_guessable_from_position_alone():
    """Selective copy's data sit at random places: reading the first k positions (noisy copy's
    rule) scores near chance; parity's answer is balanced."""
    task = make_task("selective_copy")
    x, y = task.batch(400, 64, torch.Generator().manual_seed(0))
    wrong = (x[:, : task.k] == y[:, -task.k:]).float().mean()
    assert wrong < 0.2  # mostly blanks there
    _, y = make_task("parity").batch(2000, 31, torch.Generator().manual_seed(0))
    assert 0.45 < y[:, -1].float().mean() < 0.55


def test_bad_lengths_are_value_errors():
    with pytest.raises(ValueError, match="length >= k"):
        make_task("selective_copy").batch(2, 8, torch.Generator())
    with pytest.raises(ValueError, match="distinct key-value pairs"):
        make_task("recall").batch(2, 100, torch.Generator())
    assert SEQUENCE_TASKS.names() == ["noisy_copy", "parity", "recall", "selective_copy"]
