"""The patch-token families against their definitions: patch embedding is a strided convolution,
ViT without positions pools a set, Mixer's token MLP is an einsum over patches, PoolFormer's
mixer sends a constant to 0, FNet's mixing is Re(F_N X F_D) with explicit DFT matrices."""

from __future__ import annotations

import math

import torch
from torch import nn

from adl_cli.models import build_model
from adl_cli.models.fnet import FourierMixer
from adl_cli.models.mixer import MixerConfig, TokenMixing
from adl_cli.models.poolformer import PoolMixer
from adl_cli.models.vit import ViTConfig
from adl_cli.nn.vision import PatchEmbed, SelfAttention, sincos_2d


def test_patch_embedding_by_unfold_and_linear_equals_a_strided_convolution():
    torch.manual_seed(0)
    pe = PatchEmbed(12, 3, 2, 16)
    conv = nn.Conv2d(2, 16, kernel_size=3, stride=3)
    with torch.no_grad():
        conv.weight.copy_(pe.proj.weight.view(16, 2, 3, 3))
        conv.bias.copy_(pe.proj.bias)
    x = torch.randn(4, 2, 12, 12)
    ref = conv(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
    torch.testing.assert_close(pe(x), ref, rtol=1e-5, atol=1e-5)


def _permute_patches(x, p, perm):
    b, c, h, w = x.shape
    g = h // p
    patches = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c, p, p)[:, perm]
    return patches.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def test_vit_without_positions_and_with_mean_pooling_is_invariant_to_permuting_patches():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    perm = torch.randperm(16)
    models = [build_model(ViTConfig(positions=p, pool="mean", dim=32, depth=2, heads=4).with_data(8, 1, 10)).eval() for p in ("none", "learned")]
    with torch.no_grad():  # weights large enough that the logits are far from 0
        for m in models:
            for w in m.parameters():
                w.normal_(0, 0.3)
    free, placed = models
    torch.testing.assert_close(free(_permute_patches(x, 2, perm)), free(x), rtol=1e-4, atol=1e-4)
    moved = (placed(_permute_patches(x, 2, perm)) - placed(x)).abs().max()
    assert moved > 1e-2  # positions break the symmetry (100x the tolerance above)


def test_attention_map_path_equals_the_fused_kernel_and_rows_sum_to_one():
    torch.manual_seed(0)
    att = SelfAttention(32, 4).eval()
    x = torch.randn(2, 9, 32)
    fused = att(x)
    att.keep = True
    explicit = att(x)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(att.map.sum(-1), torch.ones(2, 4, 9))


def test_mixer_token_mlp_is_an_einsum_over_the_patch_axis():
    torch.manual_seed(0)
    tm = TokenMixing(16, 24)
    x = torch.randn(2, 16, 8)  # (B, N patches, D channels)
    w1, b1, w2, b2 = tm.mlp.fc1.weight, tm.mlp.fc1.bias, tm.mlp.fc2.weight, tm.mlp.fc2.bias
    hidden = torch.nn.functional.gelu(torch.einsum("hn,bnd->bhd", w1, x) + b1[None, :, None])
    ref = torch.einsum("nh,bhd->bnd", w2, hidden) + b2[None, :, None]
    torch.testing.assert_close(tm(x), ref, rtol=1e-5, atol=1e-5)
    m = build_model(MixerConfig(dim=16, depth=1, token_hidden=8).with_data(8, 1, 10))
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_poolformer_mixer_maps_a_constant_to_zero_and_averages_neighbours():
    mixer = PoolMixer(4, 3)
    const = torch.full((2, 16, 5), 1.7)
    torch.testing.assert_close(mixer(const), torch.zeros_like(const))
    x = torch.zeros(1, 16, 1)
    x[0, 5, 0] = 9.0  # grid position (1, 1): its 3x3 neighbourhood is fully inside
    y = mixer(x)[0, :, 0].reshape(4, 4)
    assert math.isclose(float(y[1, 1]), 9.0 / 9 - 9.0, rel_tol=1e-6)
    assert math.isclose(float(y[0, 0]), 9.0 / 4, rel_tol=1e-6)  # a corner averages its 4 in-grid neighbours


def _dft(n):
    k = torch.arange(n, dtype=torch.float64)
    return torch.exp(-2j * math.pi * torch.outer(k, k) / n)


def test_fnet_mixing_equals_the_real_part_of_explicit_dft_matrices():
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    ref = (_dft(6).to(torch.complex128) @ x.to(torch.complex128) @ _dft(10)).real
    torch.testing.assert_close(FourierMixer()(x), ref, rtol=1e-9, atol=1e-9)


def test_sincos_positions_split_rows_and_columns():
    p = sincos_2d(4, 16).reshape(4, 4, 16)
    assert torch.equal(p[0, :, :8], p[0, :1, :8].expand(4, 8))  # first half: a function of the row only
    assert torch.equal(p[:, 0, 8:], p[:1, 0, 8:].expand(4, 8))  # second half: of the column only
    assert len({tuple(v.tolist()) for v in p.reshape(16, 16)}) == 16  # every patch its own code


def test_perceiver_without_position_features_sees_a_set_of_pixels():
    from adl_cli.models.perceiver import PerceiverConfig, fourier_features

    torch.manual_seed(0)
    x = torch.rand(2, 3, 6, 6)
    perm = torch.randperm(36)
    shuffled = x.reshape(2, 3, 36)[:, :, perm].reshape(2, 3, 6, 6)
    models = [build_model(PerceiverConfig(positions=p, latents=8, dim=16, heads=2, depth=1, rounds=3).with_data(6, 3, 4)).eval()
              for p in ("none", "fourier")]
    with torch.no_grad():
        for m in models:
            for w in m.parameters():
                w.normal_(0, 0.3)
    free, placed = models
    torch.testing.assert_close(free(shuffled), free(x), rtol=1e-4, atol=1e-4)
    assert (placed(shuffled) - placed(x)).abs().max() > 1e-3  # Fourier features tell the pixels apart (10x the tolerance)
    assert len(free.rounds) == 2  # rounds after the first share one set of weights
    maps = free.cross_attention_maps(x)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 8))  # each latent's weights over the pixels sum to 1
    f = fourier_features(6, 4)
    assert f.shape == (36, 2 * (2 * 4 + 1)) and torch.equal(f[:, 0], torch.linspace(-1, 1, 6).repeat_interleave(6))
