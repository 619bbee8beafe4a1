"""The engine: a left-padded batch equals each prompt alone (also past the context, where rows
slide their own windows), N samples share a prefill, rows stop on their own, log-probabilities
are the model's own."""

from __future__ import annotations

import pytest
import torch

from adl_cli.errors import AdlError
from adl_cli.inference.engine import StopStrings, generate_batch, row_generators, score
from adl_cli.inference.sampling import SamplingParams
from adl_cli.models.gpt import GPT, GPTConfig, padding_bias

VARIANTS = [("sdpa", "learned", {}), ("sdpa", "rope", {}), ("naive", "alibi", {}), ("flash", "sinusoidal", {}),
            ("mla", "rope", {}), ("sdpa", "rope", {"window": 5})]
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]]


def _gpt(attention="sdpa", position="learned", options=None, seed=0, vocab=50, block=24):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=2, n_head=4, n_embd=32, attention=attention,
                         position=position, attention_options=options or {})).eval()


@pytest.mark.parametrize("attention, position, options", VARIANTS)
def test_a_padded_batch_equals_each_prompt_alone_also_past_the_context(attention, position, options):
    m = _gpt(attention, position, options)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.3)
    batch = generate_batch(m, PROMPTS, 40, params, generator=row_generators(7, len(PROMPTS)), logprobs=True)  # 40 > the 24-token context
    for i, prompt in enumerate(PROMPTS):
        alone = generate_batch(m, [prompt], 40, params, generator=row_generators(7 + i, 1), logprobs=True)[0]
        assert batch[i].tokens == alone.tokens
        torch.testing.assert_close(torch.tensor(batch[i].logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=1e-5)


def test_greedy_rows_and_their_log_probabilities_equal_a_full_recompute():
    m = _gpt()
    done = generate_batch(m, PROMPTS[:2], 8, logprobs=True)
    for c in done:
        seq = list(c.prompt)
        for tok, lp in zip(c.tokens, c.logprobs):
            with torch.no_grad():
                logits = m(torch.tensor([seq]))[0][0, -1]
            assert tok == int(logits.argmax())
            assert abs(lp - float(torch.log_softmax(logits, -1)[tok])) < 1e-5
            seq.append(tok)
    scored = score(m, [c.prompt for c in done], [c.tokens for c in done])  # given continuations, one cache-free pass
    assert sum(scored, []) == pytest.approx(sum((c.logprobs for c in done), []), abs=1e-5)


def test_n_samples_share_the_prefill_and_equal_separate_runs():
    m = _gpt(position="rope")
    params = SamplingParams(temperature=1.2, top_k=20)
    shared = generate_batch(m, PROMPTS[:2], 12, params, n=3, generator=row_generators(0, 6))
    assert [c.prompt for c in shared] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    for r, c in enumerate(shared):
        assert c.tokens == generate_batch(m, [c.prompt], 12, params, generator=row_generators(r, 1))[0].tokens
    assert len({tuple(c.tokens) for c in shared[:3]}) > 1  # the samples differ


def decode(ids):
    return "".join(chr(97 + i % 26) for i in ids)


def test_each_row_stops_on_its_own_at_eos_or_a_stop_string():
    m = _gpt()
    alone = [generate_batch(m, [p], 10)[0].tokens for p in PROMPTS[:3]]
    stop = decode(alone[0][3:5])  # row 0 writes this at its 4th and 5th new tokens
    assert stop not in decode(alone[1]) + decode(alone[2])
    j, eos = next((j, t) for j, t in enumerate(alone[2]) if t not in alone[0][:5] + alone[1])  # only row 2 emits it
    done = generate_batch(m, PROMPTS[:3], 10, eos_id=eos, stop=[stop], decode=decode)
    first = decode(alone[0]).index(stop)
    assert (done[0].finish, done[0].stop, done[0].text) == ("stop", stop, decode(alone[0])[:first])
    assert done[0].tokens == alone[0][: len(done[0].tokens)] and len(done[0].tokens) <= 5
    assert (done[1].finish, done[1].tokens, done[1].text) == ("length", alone[1], decode(alone[1]))
    assert (done[2].finish, done[2].tokens, done[2].text) == ("eos", alone[2][: j + 1], decode(alone[2][:j]))


def test_stop_strings_hold_back_what_may_begin_one():
    stops = StopStrings(["\n\n", "END"])
    assert stops.held_back("abc\n") == 1 and stops.held_back("abcEN") == 2 and stops.held_back("abc") == 0
    assert stops.find("xxEND", 3) == (2, "END") and stops.find("xxEN", 3) is None
    with pytest.raises(AdlError, match="empty"):
        StopStrings([""])


def test_the_padding_mask_lets_real_queries_see_real_keys_only():
    bias = padding_bias(torch.tensor([0, 2]), 0, 4)
    real = bias[1, 0] == 0
    assert bias.shape == (2, 1, 4, 4) and bool((bias[0] == 0).all())
    assert real[2:, :2].sum() == 0 and bool(real[2:, 2:].all()) and bool(real[:2, :2].all())  # padding sees padding only


def test_bad_prompts_are_refused():
    m = _gpt()
    with pytest.raises(AdlError, match="prompt 2 is empty"):
        generate_batch(m, [[1], []], 4)
    with pytest.raises(AdlError, match="more than the model's context of 24"):
        generate_batch(m, [list(range(25))], 4)
    with pytest.raises(AdlError, match="positions, more than the context"):
        score(m, [[1] * 20], [[2] * 10])


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "sinusoidal"])
def test_static_decoding_steps_equal_the_dynamic_cache_with_padding(position):
    from adl_cli.inference.engine import last_logits, prefill

    m = _gpt(position=position)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    dynamic, static = m.setup_cache(2, 20), m.setup_cache(2, 20)
    with torch.no_grad():
        a, _ = prefill(m, dynamic, prompts)
        b, _ = prefill(m, static, prompts)
        static.make_static()
        for t in range(10):
            nxt = a.argmax(-1)[:, None]
            a = last_logits(m, nxt, dynamic)
            b = last_logits(m, nxt, static)  # full buffers, unwritten rows and padding masked
            static.advance()
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        chunk = torch.tensor([[3, 4, 5], [6, 7, 8]])  # several tokens a step (speculative verification)
        a, b = m(chunk, state=dynamic)[0], m(chunk, state=static)[0]
        static.advance(3)
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        static.truncate(15)  # a rolled-back draft moves the position tensor too
        dynamic.truncate(15)
        torch.testing.assert_close(last_logits(m, chunk[:, :1], static), last_logits(m, chunk[:, :1], dynamic), atol=2e-5, rtol=1e-5)
    assert int(static.position) == 15


def test_compiled_decoding_gives_the_eager_tokens():
    m = _gpt(position="rope")
    eager = generate_batch(m, PROMPTS[:2], 12, SamplingParams(temperature=0.0))
    compiled = generate_batch(m, PROMPTS[:2], 12, SamplingParams(temperature=0.0), compile=True)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
    from adl_cli.inference.speculative import speculative_generate

    draft = _gpt(position="rope", seed=3)
    prompt = torch.tensor([PROMPTS[3]])
    plain = generate_batch(m, prompt.tolist(), 30)[0].tokens  # past the 24-token context: slides too
    out, stats = speculative_generate(m, prompt, 30, draft=draft, lookahead=3, compile=True)
    assert out[0, prompt.shape[1]:].tolist() == plain and stats.slides >= 1
