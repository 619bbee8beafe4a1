"""The sampling rules against slow, one-token-at-a-time references, and the draw against the
distribution it claims to draw from."""

import math

import pytest
import torch

from adl_cli.errors import AdlError
from adl_cli.inference.sampling import (
    SamplingParams, apply_repetition_penalty, filter_logits, process_logits, sample_next, token_logprobs,
)


def _kept_reference(row: list[float], top_k=None, top_p=None, min_p=None) -> set[int]:
    """Which ids survive, by the definitions, one filter after another, in plain Python."""
    kept = set(range(len(row)))
    if top_k is not None:
        kth = sorted(row, reverse=True)[top_k - 1]
        kept = {i for i in kept if row[i] >= kth}
    if top_p is not None and top_p < 1:
        z = max(row[i] for i in kept)
        mass = {i: math.exp(row[i] - z) for i in kept}
        total = sum(mass.values())
        before, keep = 0.0, set()
        for i in sorted(kept, key=lambda i: -row[i]):
            if before < top_p:
                keep.add(i)
            before += mass[i] / total
        kept = keep
    if min_p is not None:
        z = max(row[i] for i in kept)
        total = sum(math.exp(row[i] - z) for i in kept)
        top = 1.0 / total
        kept = {i for i in kept if math.exp(row[i] - z) / total >= min_p * top}
    return kept


@pytest.mark.parametrize("top_k, top_p, min_p", [(None, None, 0.1), (5, None, None), (None, 0.7, None), (8, 0.9, 0.05), (None, None, 0.5)])
def test_filters_keep_exactly_the_defined_sets(top_k, top_p, min_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 20, generator=g, dtype=torch.float64) * 2
    out = filter_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p)
    for b in range(6):
        kept = {i for i in range(20) if math.isfinite(out[b, i].item())}
        assert kept == _kept_reference(logits[b].tolist(), top_k, top_p, min_p)
        assert int(logits[b].argmax()) in kept and torch.equal(out[b][list(kept)], logits[b][list(kept)])  # kept logits untouched


def test_repetition_penalty_matches_its_definition_per_row():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0], [1.0, 1.0, -2.0, 4.0, -0.5]])
    history = torch.tensor([[1, 2, 2, -1], [0, 3, 0, 4]])  # -1: padding; repeats count once
    out = apply_repetition_penalty(logits, history, 2.0)
    expect = logits.clone()
    for b, row in enumerate(history.tolist()):
        for i in {t for t in row if t >= 0}:
            z = logits[b, i].item()
            expect[b, i] = z / 2.0 if z > 0 else z * 2.0
    assert torch.equal(out, expect)
    assert out[0, 0] == 2.0 and out[0, 4] == 1.0  # id 0 is not penalised by row 0's padding
    assert torch.equal(apply_repetition_penalty(logits, history, 1.0), logits)


def test_greedy_is_argmax_and_the_draw_follows_the_processed_distribution():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0, 1.5, 0.0]])
    tokens, logp = sample_next(logits, SamplingParams(temperature=0))
    assert tokens.tolist() == [1] and logp.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 1].item())
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.95, min_p=0.05)
    probs = torch.softmax(process_logits(logits, params), -1)[0]
    n = 40_000
    g = torch.Generator().manual_seed(1)
    draws, logps = sample_next(logits.expand(n, -1), params, generator=g)
    counts = torch.bincount(draws, minlength=6).double() / n
    sd = (probs * (1 - probs) / n).sqrt()
    assert torch.all((counts - probs).abs() <= 5 * sd + 1e-12)  # binomial: 5 standard deviations
    assert counts[probs == 0].sum() == 0  # a filtered token is never drawn
    assert torch.allclose(logps, probs.log()[draws].float(), atol=1e-6)
    again, _ = sample_next(logits.expand(n, -1), params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, draws)  # seeded


def test_token_logprobs_are_log_softmax_at_the_tokens():
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    tokens = torch.tensor([[0, 6, 3], [2, 2, 5]])
    ref = torch.log_softmax(logits.float(), -1)
    out = token_logprobs(logits, tokens)
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    assert all(out[b, t] == ref[b, t, tokens[b, t]] for b in range(2) for t in range(3))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(min_p=1.5), "min_p must be in"),
    (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(AdlError, match=message):
        SamplingParams(**kwargs).validate()
