"""Speculative and prompt-lookup decoding: greedy output equal to the target's, the sampled
rule exact by enumeration, and the target's distribution kept end to end."""

import itertools

import pytest
import torch

from adl_cli.errors import AdlError
from adl_cli.inference.engine import generate_batch
from adl_cli.inference.sampling import SamplingParams
from adl_cli.inference.speculative import acceptance_probability, lookup_drafts, residual, speculative_generate, verify
from adl_cli.methods.generate import generate
from adl_cli.models.gpt import GPT, GPTConfig


def _gpt(seed, vocab=40, block=48, layers=2, width=32, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=2, n_embd=width, **kw)).eval()


@pytest.mark.parametrize("lookahead", [1, 3, 6])
def test_greedy_speculative_output_is_the_targets_greedy_output(lookahead):
    target, draft = _gpt(0), _gpt(1, layers=1, width=16)
    prompt = torch.randint(0, 40, (1, 7), generator=torch.Generator().manual_seed(2))
    want = generate(target, prompt, 30, temperature=0)
    got, stats = speculative_generate(target, prompt, 30, draft=draft, lookahead=lookahead)
    assert torch.equal(got, want) and stats.new_tokens == 30
    assert stats.target_forwards <= 30 and stats.drafted > 0
    same, stats = speculative_generate(target, prompt, 30, draft=target, lookahead=lookahead)  # a perfect draft
    assert torch.equal(same, want) and stats.acceptance == 1.0
    assert stats.target_forwards == -(-30 // (lookahead + 1))  # k + 1 tokens a pass


def test_prompt_lookup_is_exact_and_saves_passes_on_copied_text():
    target = _gpt(3, vocab=20, block=64)
    prompt = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(4))
    want = generate(target, prompt, 40, temperature=0)
    got, stats = speculative_generate(target, prompt, 40, lookup_ngram=3, lookahead=4)
    assert torch.equal(got, want)
    # a target whose greedy continuation repeats: lookup drafts from its own output get accepted
    cycle = want[0, -8:].tolist()
    loop = torch.tensor([cycle * 3])
    base = generate(target, loop, 16, temperature=0)
    got, stats = speculative_generate(target, loop, 16, lookup_ngram=3, lookahead=4)
    assert torch.equal(got, base)
    assert lookup_drafts([1, 2, 3, 9, 1, 2, 3], 3, 2) == [9, 1, 2] and lookup_drafts([1, 2, 3], 2, 2) == []


def test_the_acceptance_rule_reproduces_the_target_distribution_exactly():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        p = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64) * 2, 0)
        q[int(torch.randint(0, 5, (), generator=g))] = 0.0  # a token the draft never proposes
        q = q / q.sum()
        for proposer in (q, None):  # a draft model; a point mass (prompt lookup) on each token
            out = torch.zeros(5, dtype=torch.float64)
            for d in range(5):
                qd = proposer if proposer is not None else torch.nn.functional.one_hot(torch.tensor(d), 5).double()
                weight = proposer[d] if proposer is not None else p[d]  # lookup: enumerate d with any weight summing to 1
                a = acceptance_probability(p, qd, d)
                out += weight * ((1 - a) * residual(p, qd))
                out[d] += weight * a
            assert torch.allclose(out, p, atol=1e-12)


@torch.no_grad()
def test_sampled_speculative_decoding_keeps_the_targets_distribution():
    target, draft = _gpt(6, vocab=4, block=8, layers=1, width=8), _gpt(7, vocab=4, block=8, layers=1, width=8)
    with torch.no_grad():  # sharper, different distributions: the test can tell them apart
        target.transformer.wte.weight.mul_(8.0)
        draft.transformer.wte.weight.mul_(8.0)
    prompt = torch.tensor([[1]])
    exact = {}
    p1 = torch.softmax(target(prompt)[0][0, -1].double(), 0)
    for a, b in itertools.product(range(4), repeat=2):
        p2 = torch.softmax(target(torch.tensor([[1, a]]))[0][0, -1].double(), 0)
        exact[(a, b)] = float(p1[a] * p2[b])
    params = SamplingParams(temperature=1.0)
    n = 3000
    g = torch.Generator().manual_seed(8)
    counts = dict.fromkeys(exact, 0)
    for _ in range(n):
        out, _ = speculative_generate(target, prompt, 2, draft=draft, lookahead=2, params=params, generator=g)
        counts[tuple(out[0, 1:].tolist())] += 1
    q1 = torch.softmax(draft(prompt)[0][0, -1].double(), 0)
    assert (q1 - p1).abs().max() > 0.1  # the draft is a different distribution
    for key, pk in exact.items():
        sd = (pk * (1 - pk) / n) ** 0.5
        assert abs(counts[key] / n - pk) <= 5 * sd + 1e-9, (key, counts[key] / n, pk)


def test_bad_speculative_requests_are_clear_errors():
    target = _gpt(0)
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(AdlError, match="one of them"):
        speculative_generate(target, prompt, 4)
    with pytest.raises(AdlError, match="vocabulary"):
        speculative_generate(target, prompt, 4, draft=_gpt(1, vocab=41))
    with pytest.raises(AdlError, match="lookahead must be >= 1"):
        speculative_generate(target, prompt, 4, lookup_ngram=2, lookahead=0)
    with pytest.raises(AdlError, match="repetition_penalty"):
        speculative_generate(target, prompt, 4, lookup_ngram=2, params=SamplingParams(repetition_penalty=1.2))
    with pytest.raises(AdlError, match="cannot"):
        speculative_generate(_gpt(2, attention="window", attention_options={"window": 8}), prompt, 4, lookup_ngram=2)
    with pytest.raises(AdlError, match="context"):
        speculative_generate(target, prompt, 4, draft=_gpt(1, block=16))


@pytest.mark.parametrize("proposer", ["draft", "lookup"])
def test_past_the_context_speculative_decoding_slides_as_plain_decoding_does(proposer):
    target = _gpt(2)
    prompt = torch.randint(0, 40, (1, 45), generator=torch.Generator().manual_seed(3))
    kw = {"draft": _gpt(5, layers=1)} if proposer == "draft" else {"lookup_ngram": 2}
    out, stats = speculative_generate(target, prompt, 40, lookahead=3, **kw)
    plain = generate_batch(target, prompt.tolist(), 40)[0].tokens
    assert stats.slides >= 2 and out[0, 45:].tolist() == plain
