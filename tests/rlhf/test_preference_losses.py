"""The preference losses against their formulas written out (nn/preference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from adl_cli.nn.preference import bradley_terry_loss, loss_at_reference, preference_loss


def _logps(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20 + 1) for _ in range(4)]


def test_dpo_at_the_reference_is_log_2_for_every_pair():
    pw, pl, _, _ = _logps()
    for kind in ("dpo", "ipo"):
        for eps in ((0.0, 0.2) if kind == "dpo" else (0.0,)):
            loss, m = preference_loss(pw, pl, pw.clone(), pl.clone(), beta=0.3, kind=kind, label_smoothing=eps)
            assert loss.item() == pytest.approx(loss_at_reference(kind, 0.3), abs=1e-6)
            assert m["margin"].item() == 0 and m["accuracy"].item() == 0  # a tie is not a preference
    assert loss_at_reference("dpo", 0.3) == pytest.approx(math.log(2))
    assert loss_at_reference("ipo", 0.5) == pytest.approx(1.0)


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
def test_dpo_conservative_and_ipo_equal_their_formulas(beta):
    pw, pl, rw, rl = _logps(seed=1)
    h = [(a - b) - (c - d) for a, b, c, d in zip(pw.tolist(), rw.tolist(), pl.tolist(), rl.tolist())]
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    dpo = sum(-math.log(sig(beta * x)) for x in h) / len(h)
    eps = 0.1
    cdpo = sum(-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h) / len(h)
    ipo = sum((x - 1 / (2 * beta)) ** 2 for x in h) / len(h)
    assert preference_loss(pw, pl, rw, rl, beta=beta)[0].item() == pytest.approx(dpo, rel=1e-6)
    assert preference_loss(pw, pl, rw, rl, beta=beta, label_smoothing=eps)[0].item() == pytest.approx(cdpo, rel=1e-6)
    assert preference_loss(pw, pl, rw, rl, beta=beta, kind="ipo")[0].item() == pytest.approx(ipo, rel=1e-6)
    _, m = preference_loss(pw, pl, rw, rl, beta=beta)
    assert m["reward_chosen"].item() == pytest.approx(beta * (pw - rw).mean().item(), rel=1e-6)
    assert m["margin"].item() == pytest.approx(beta * sum(h) / len(h), rel=1e-6)
    assert m["accuracy"].item() == pytest.approx(sum(x > 0 for x in h) / len(h))


def test_bradley_terry_is_shift_invariant_and_equals_its_formula():
    g = torch.Generator().manual_seed(3)
    rw, rl = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    loss, m = bradley_terry_loss(rw, rl, margin=0.5)
    want = sum(math.log1p(math.exp(-(a - b - 0.5))) for a, b in zip(rw.tolist(), rl.tolist())) / 32
    assert loss.item() == pytest.approx(want, rel=1e-6)
    for shift in (-7.0, 3.25, 1e3):
        assert bradley_terry_loss(rw + shift, rl + shift, margin=0.5)[0].item() == pytest.approx(loss.item(), rel=1e-9)
    assert m["accuracy"].item() == pytest.approx((rw > rl).double().mean().item())


def test_bad_settings_are_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="preference loss"):
        preference_loss(x, x, x, x, beta=0.1, kind="kto")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(x, x, x, x, beta=0.0)


class Bigram(torch.nn.Module):
    """A toy language model: the logits of the next token are a row of a table picked by the current one."""

    def __init__(self, vocab=12):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)) * 0.1)

    def forward(self, idx):
        return self.table[idx], None


def test_the_dpo_gradient_raises_the_chosen_answer_and_lowers_the_rejected():
    from adl_cli.data.packing import IGNORE
    from adl_cli.methods.rlhf.common import answer_logps, split_pair

    model = Bigram()
    # prompt 1 2, chosen 3 4 (end 5), rejected 6 7 (end 5): inputs read ids[:-1], targets ids[1:] on the answer
    ids = [[1, 2, 3, 4, 5], [1, 2, 6, 7, 5]]
    inputs = torch.tensor([r[:-1] for r in ids])
    targets = torch.tensor([[IGNORE] + r[2:] for r in ids])
    with torch.no_grad():
        ref_w, ref_l = split_pair(answer_logps(model, inputs, targets))
    before = (ref_w.item(), ref_l.item())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        pw, pl = split_pair(answer_logps(model, inputs, targets))
        loss, _ = preference_loss(pw, pl, ref_w, ref_l, beta=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pw, pl = split_pair(answer_logps(model, inputs, targets))
    assert pw.item() > before[0] and pl.item() < before[1]
    assert preference_loss(pw, pl, ref_w, ref_l, beta=0.5)[0].item() < math.log(2)


def test_token_kl_is_the_divergence_of_the_two_distributions_on_masked_positions():
    from adl_cli.methods.rlhf.common import token_kl

    g = torch.Generator().manual_seed(5)
    p, q = torch.randn(2, 3, 7, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    got = token_kl(p, q, mask)
    want = torch.zeros(2, dtype=torch.float64)
    for r in range(2):
        for t in range(3):
            if mask[r, t]:
                pp, qq = p[r, t].softmax(-1), q[r, t].softmax(-1)
                want[r] += (pp * (pp.log() - qq.log())).sum()
    assert torch.allclose(got.double(), want, atol=1e-5) and (got >= 0).all()
    assert token_kl(p, p, mask).abs().max() < 1e-6
