"""Advantages, the clipped surrogate and its token weights, value loss and KL estimators
(nn/policy_gradient.py) against their formulas written out."""

from __future__ import annotations

import pytest
import torch

from adl_cli.nn.policy_gradient import (AdaptiveKL, clipped_token_loss, gae, group_advantages, kl_k1, kl_k3, policy_loss, token_weights,
                                        value_loss)


def _batch(seed=0, B=3, T=6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 2, 4])[:B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    return g, mask, lengths


def test_gae_with_gamma_and_lambda_1_is_the_return_to_go_minus_the_value():
    g, mask, lengths = _batch()
    r = torch.randn(3, 6, generator=g) * mask
    v = torch.randn(3, 6, generator=g) * mask
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    for i, n in enumerate(lengths.tolist()):
        for t in range(n):
            assert adv[i, t].item() == pytest.approx(r[i, t:n].sum().item() - v[i, t].item(), abs=1e-5)
            assert ret[i, t].item() == pytest.approx(r[i, t:n].sum().item(), abs=1e-5)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_gae_equals_its_recursion():
    g, mask, lengths = _batch(1)
    r, v = torch.randn(3, 6, generator=g) * mask, torch.randn(3, 6, generator=g) * mask
    gamma, lam = 0.9, 0.8
    adv, _ = gae(r, v, mask, gamma=gamma, lam=lam)
    for i, n in enumerate(lengths.tolist()):
        want, nxt = 0.0, 0.0
        for t in range(n - 1, -1, -1):
            delta = r[i, t].item() + gamma * (v[i, t + 1].item() if t + 1 < n else 0.0) - v[i, t].item()
            want = delta + gamma * lam * want
            assert adv[i, t].item() == pytest.approx(want, abs=1e-5)


def test_at_ratio_1_the_clipped_objective_is_the_unclipped_one_and_the_bounds_are_asymmetric():
    a = torch.tensor([[1.5, -2.0, 0.7]])
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    loss, clipped = clipped_token_loss(lp, lp.clone(), a, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(loss, -a) and not clipped.any()
    # far above 1 with a positive advantage: held at 1 + eps_high; far below with a negative one: at 1 - eps_low
    up, c_up = clipped_token_loss(torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.tensor([2.0]), eps_low=0.2, eps_high=0.28)
    down, c_down = clipped_token_loss(torch.tensor([[-1.0]]), torch.tensor([[0.0]]), torch.tensor([-2.0]), eps_low=0.2, eps_high=0.28)
    assert up.item() == pytest.approx(-1.28 * 2.0) and c_up.all()
    assert down.item() == pytest.approx(0.8 * 2.0) and c_down.all()
    # the pessimistic side is never clipped: a ratio far above 1 with a negative advantage counts in full
    worse, c = clipped_token_loss(torch.tensor([[0.0]]), torch.tensor([[-1.0]]), torch.tensor([-2.0]))
    assert worse.item() == pytest.approx(2.0 * torch.e) and not c.any()


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_per_token_gradient_weights_match_their_formulas_on_unequal_lengths(loss_type):
    g, mask, lengths = _batch(2)
    B, T = mask.shape
    lp = (torch.randn(B, T, generator=g) - 2).requires_grad_(True)
    adv = torch.randn(B, generator=g)
    loss, _ = policy_loss(lp, lp.detach(), adv, mask, loss_type=loss_type)
    loss.backward()
    for i in range(B):
        for t in range(T):
            if loss_type == "grpo":
                w = 1.0 / (B * lengths[i].item()) if t < lengths[i] else 0.0
            elif loss_type == "dapo":
                w = 1.0 / lengths.sum().item() if t < lengths[i] else 0.0
            else:
                w = 1.0 / (B * T) if t < lengths[i] else 0.0
            assert lp.grad[i, t].item() == pytest.approx(-adv[i].item() * w, abs=1e-6)  # at ratio 1, d l_t / d logp_t = -A
    assert torch.allclose(token_weights(mask, loss_type).sum(1) > 0, torch.ones(B, dtype=torch.bool))
    with pytest.raises(ValueError, match="loss type"):
        token_weights(mask, "ppo2")


def test_group_advantages_sum_to_zero_and_a_flat_group_gives_zero():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0])
    for scale in (True, False):
        for rloo in (False, True):
            a = group_advantages(r, 4, scale=scale, rloo=rloo)
            assert torch.isfinite(a).all()
            assert a.view(3, 4).sum(1).abs().max() < 1e-5
            assert a[4:8].abs().max() == 0  # equal rewards: no signal
    a = group_advantages(r, 4, scale=True)
    grp = r[:4]
    assert torch.allclose(a[:4], (grp - grp.mean()) / (grp.std() + 1e-6), atol=1e-5)


def test_rloo_baseline_excludes_the_sample_itself():
    r = torch.tensor([3.0, 1.0, 0.0, 2.0])
    a = group_advantages(r, 4, scale=False, rloo=True)
    for i in range(4):
        others = torch.cat([r[:i], r[i + 1:]])
        assert a[i].item() == pytest.approx(r[i].item() - others.mean().item())
    # leave-one-out is the mean-baseline advantage scaled by n / (n - 1)
    assert torch.allclose(a, group_advantages(r, 4, scale=False) * 4 / 3)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(5), 2)


def test_kl_estimators_are_zero_at_the_reference_and_k3_is_never_negative():
    g = torch.Generator().manual_seed(4)
    lp = -torch.rand(100, generator=g) * 5
    assert kl_k1(lp, lp).abs().max() == 0 and kl_k3(lp, lp).abs().max() == 0
    ref = -torch.rand(100, generator=g) * 5
    assert (kl_k3(lp, ref) >= 0).all()
    # on samples of pi, the mean of k1 and of k3 both estimate KL(pi || q): check on a small categorical
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    draws = torch.multinomial(p, 200000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum().item()
    assert kl_k3(p.log()[draws], q.log()[draws]).mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_k1(p.log()[draws], q.log()[draws]).mean().item() == pytest.approx(exact, abs=0.01)


def test_value_loss_clips_around_the_old_values():
    mask = torch.ones(1, 2)
    old, ret = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])
    v = torch.tensor([[1.0, 0.1]])
    # token 0: unclipped error 0, clipped (0.2 - 1)^2 = 0.64 -> 0.64; token 1: (0.1 + 1)^2 = 1.21 both
    assert value_loss(v, old, ret, mask, clip=0.2).item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)


def test_the_adaptive_kl_coefficient_follows_the_target():
    c = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert c.update(12.0, 10) == pytest.approx(0.1 * 1.02)  # the error is clipped at +0.2
    c = AdaptiveKL(0.1, target=6.0, horizon=100)
    assert c.update(3.0, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert AdaptiveKL(0.1, 6.0).update(6.0, 50) == pytest.approx(0.1)
