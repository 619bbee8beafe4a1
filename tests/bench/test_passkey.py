"""Passkey trials: their shape, and the score of a model that knows every answer and of one that
knows none."""

from __future__ import annotations

import numpy as np
import torch

from adl_cli.bench.passkey import passkey_accuracy, passkey_trials
from adl_cli.data.tokenizer import Tokenizer

TOK = Tokenizer("bytes")
VAL = np.frombuffer(("def f(x):\n    return x + 1\n" * 200).encode(), dtype=np.uint8).astype(np.int64)


def test_trials_hide_the_key_once_in_filler_and_ask_for_it_at_the_end():
    trials = passkey_trials(TOK, VAL, 128, 6, seed=1)
    depths = set()
    for ids, n in trials:
        assert len(ids) == 129 and n == 5
        text = TOK.decode(ids)
        key = text[-5:]
        assert key.isdigit() and text.count(f"pass_key = {key}\n") == 1 and text.endswith(f"assert pass_key == {key}")
        depths.add(text.index("pass_key = "))
    assert len(depths) > 1  # the key is hidden at different depths


class _Oracle(torch.nn.Module):
    """Logits that put all mass on the true next token of each trial (looked up by its prefix)."""

    def __init__(self, trials, right: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.next = {tuple(ids[:-1]): ids[1:] for ids, _ in trials}
        self.right = right

    def forward(self, x):
        out = torch.zeros(*x.shape, 256)
        for b, row in enumerate(x.tolist()):
            target = torch.tensor(self.next[tuple(row)])
            if not self.right:
                target = (target + 1) % 256
            out[b, torch.arange(len(row)), target] = 1.0
        return out, None


def test_a_model_that_knows_the_answers_scores_one_and_one_that_does_not_zero():
    trials = passkey_trials(TOK, VAL, 64, 5, seed=3)
    assert passkey_accuracy(_Oracle(trials, True), TOK, VAL, 64, 5, seed=3, batch=2) == 1.0
    assert passkey_accuracy(_Oracle(trials, False), TOK, VAL, 64, 5, seed=3, batch=2) == 0.0
