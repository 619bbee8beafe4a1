"""SFT's parts: the vocabulary grows with mean-initialised rows, Wilson intervals, exact match scoring."""

from __future__ import annotations

import random

import pytest
import torch

from adl_cli.data.chat import ChatTemplate, TemplateSection
from adl_cli.data.tasks import make_task
from adl_cli.methods.exact_match import exact_match, wilson
from adl_cli.runs import init_from, load_run


def test_new_token_rows_are_the_mean_of_the_old_ones(bpe_run):
    base = load_run(bpe_run)
    tok, template = ChatTemplate.attach(base.tokenizer, TemplateSection())
    old, new = base.tokenizer.vocab_size, tok.vocab_size
    cfg = base.config.with_vocab(new)
    assert cfg.vocab_size > base.config.vocab_size  # 320 ids padded to 320: four more need more rows
    model, _ = init_from(bpe_run, cfg, new_tokens=(old, new))
    for name in ("transformer.wte.weight", "lm_head.weight"):
        before, after = base.model.state_dict()[name], model.state_dict()[name]
        torch.testing.assert_close(after[:old], before[:old], rtol=0, atol=0)
        mean = before[:old].mean(0)
        for i in range(old, new):
            torch.testing.assert_close(after[i], mean)
    # old tokens keep their logits: the new rows change nothing the base could say
    x = torch.tensor([base.tokenizer.encode("The with statement").tolist()])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0][..., :old], base.model(x)[0][..., :old], atol=1e-5, rtol=1e-5)


def test_wilson_interval_matches_the_formula_values():
    # reference values from the closed form (Wilson 1927), z = 1.96
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(0, 10)
    assert lo == 0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(900, 1000)
    assert lo == pytest.approx(0.8798, abs=1e-4) and hi == pytest.approx(0.9171, abs=1e-4)


def test_exact_match_counts_what_the_verifier_accepts(monkeypatch, bpe_run):
    """Scoring is the verifier's on the decoded reply: feed the engine fixed replies, half right."""
    base = load_run(bpe_run)
    tok, template = ChatTemplate.attach(base.tokenizer.with_single_digits(), TemplateSection())
    task = make_task("addition", operand_digits=2)
    rng = random.Random(0)
    problems = [task.draw(rng) for _ in range(6)]
    from adl_cli.inference.engine import Completion

    def fake_generate(model, prompts, budget, params, **kw):
        out = []
        for i, p in enumerate(prompts):
            prob = problems[[template.prompt([{"role": "user", "content": q.question}]) for q in problems].index(list(p))]
            reply = prob.final if i % 2 == 0 else str(int(prob.final) + 1)
            ids = tok.encode(reply).tolist() + [template.end_id]
            out.append(Completion(list(p), ids, finish="eos", text=tok.decode(ids[:-1])))
        return out

    monkeypatch.setattr("adl_cli.methods.exact_match.generate_batch", fake_generate)
    score = exact_match(base.model, tok, task, problems, batch_size=4)
    assert score.n == 6 and score.correct == 3 and score.stopped == 6  # rows 0 and 2 of the first batch, 0 of the second
