"""Distillation losses against their formulas: the T^2-scaled KL's gradient is T (q - p), forward and
reverse KL vanish for equal logits and match a dense reference, top-k teachers renormalise."""

import pytest
import torch

from adl_cli.nn.distill import TopK, distill_loss, hidden_loss


def _reference_kl(a_logits, b_logits, T):
    """KL(softmax(a / T) || softmax(b / T)) per row, in float64 from the definition."""
    p = torch.softmax(a_logits.double() / T, -1)
    q = torch.softmax(b_logits.double() / T, -1)
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
def test_gradient_of_the_scaled_forward_kl_is_T_times_q_minus_p(T):
    torch.manual_seed(0)
    s = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 50, dtype=torch.float64)
    loss = distill_loss(s, t, kind="forward_kl", temperature=T)
    loss.backward()
    p, q = torch.softmax(t / T, -1), torch.softmax(s.detach() / T, -1)
    # the loss is a mean over the 6 tokens: each token's gradient is T (q - p) / 6
    assert torch.allclose(s.grad, T * (q - p) / 6, atol=1e-6)


def test_forward_and_reverse_kl_match_the_definition_and_vanish_for_equal_logits():
    torch.manual_seed(1)
    s, t = torch.randn(3, 4, 40), torch.randn(3, 4, 40)
    T = 2.0
    fwd = distill_loss(s, t, kind="forward_kl", temperature=T)
    rev = distill_loss(s, t, kind="reverse_kl", temperature=T)
    assert fwd.item() == pytest.approx(T ** 2 * _reference_kl(t, s, T).mean().item(), rel=1e-5)
    assert rev.item() == pytest.approx(T ** 2 * _reference_kl(s, t, T).mean().item(), rel=1e-5)
    assert fwd.item() != pytest.approx(rev.item(), rel=1e-3)  # KL is not symmetric
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert distill_loss(s, s.clone(), kind=kind, temperature=T).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, 0] = True  # only the first token of each row counts
    got = distill_loss(s, t, kind="forward_kl", temperature=T, mask=mask)
    assert got.item() == pytest.approx(T ** 2 * _reference_kl(t[:, 0], s[:, 0], T).mean().item(), rel=1e-5)


def test_jsd_sits_between_its_ends_and_is_symmetric_at_one_half():
    torch.manual_seed(2)
    s, t = torch.randn(5, 30), torch.randn(5, 30)
    a = distill_loss(s, t, kind="jsd", beta=0.5)
    b = distill_loss(t, s, kind="jsd", beta=0.5)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    assert 0 < a.item() < min(distill_loss(s, t, kind="forward_kl").item(), distill_loss(s, t, kind="reverse_kl").item())
    assert a.item() <= torch.log(torch.tensor(2.0)).item()  # JSD(1/2) is at most log 2


def test_a_top_k_teacher_is_the_full_one_renormalised_over_its_k_tokens():
    torch.manual_seed(3)
    s, t = torch.randn(4, 100), torch.randn(4, 100)
    t[:, :5] += 8.0  # the teacher puts nearly all its mass on 5 tokens
    top = TopK.of(t, 5)
    cut = distill_loss(s, top, kind="forward_kl")
    # over those 5 tokens: KL(p_5 || q renormalised to the same 5), by the definition
    ref = _reference_kl(t.gather(-1, top.ids), s.gather(-1, top.ids), 1.0).mean()
    assert cut.item() == pytest.approx(ref.item(), rel=1e-5)


def test_hidden_matching_trains_the_projection():
    torch.manual_seed(4)
    hs, ht = torch.randn(2, 8, 16), torch.randn(2, 8, 24)
    proj = torch.nn.Linear(16, 24)
    loss = hidden_loss(hs, ht, proj)
    loss.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert loss.item() == pytest.approx((proj(hs) - ht).pow(2).mean().item(), rel=1e-5)


def test_bad_arguments_are_clear_errors():
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="must be one of forward_kl, reverse_kl, jsd"):
        distill_loss(s, s, kind="kl")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        distill_loss(s, s, temperature=0)
