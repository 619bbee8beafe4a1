"""Axial attention and Swin against their definitions: axial = full attention restricted to the
same row / column; Swin's windows round-trip, its shifted-window mask is the hand-built region
mask, and one unshifted window over the whole grid is global attention with the relative bias."""

from __future__ import annotations

import math

import torch

from adl_cli.models import build_model
from adl_cli.models.axial import AxialAttention, AxialConfig
from adl_cli.models.swin import SwinBlock, SwinConfig, WindowAttention, relative_index, shift_mask, window_partition, window_reverse
from adl_cli.nn.vision import SelfAttention


def _masked_full(att: SelfAttention, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The same attention over all N tokens, each query seeing only the keys ``allowed[i]``."""
    bias = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    return att(x, bias=bias)


def test_axial_attention_equals_full_attention_restricted_to_rows_and_columns():
    torch.manual_seed(0)
    g, d = 5, 16
    ax = AxialAttention(g, d, 4).eval()
    x = torch.randn(2, g * g, d)
    row = torch.arange(g * g) // g
    col = torch.arange(g * g) % g
    torch.testing.assert_close(ax.along_rows(x), _masked_full(ax.row, x, row[:, None] == row[None]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ax.along_columns(x), _masked_full(ax.col, x, col[:, None] == col[None]), rtol=1e-5, atol=1e-5)
    y = x + ax.along_rows(x)
    torch.testing.assert_close(x + ax(x), y + ax.along_columns(y))  # row, then column, each with its residual
    m = build_model(AxialConfig(dim=16, depth=1, heads=2).with_data(8, 1, 10))
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_window_partition_and_reverse_round_trip():
    x = torch.randn(2, 8, 12, 3)
    w = window_partition(x, 4)
    assert w.shape == (2 * 2 * 3, 16, 3)
    assert torch.equal(w[1], x[0, 0:4, 4:8].reshape(16, 3))  # the second window of the first row of windows
    assert torch.equal(window_reverse(w, 4, 8, 12), x)


def test_shifted_window_mask_equals_the_hand_built_region_mask():
    h = w = 8
    ws, s = 4, 2
    got = shift_mask(h, w, ws, s)
    # by hand: after rolling by -s, a token at rolled (i, j) came from ((i + s) % h, (j + s) % w); two
    # tokens of one window may attend iff the roll wrapped neither or both of them, on each axis
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    wrapped = torch.stack([ii >= h - s, jj >= w - s], dim=-1).long()  # (h, w, 2)
    win = window_partition(wrapped[None], ws)  # (windows, ws^2, 2)
    same = (win[:, :, None] == win[:, None, :]).all(-1)
    expected = torch.zeros(same.shape).masked_fill(~same, float("-inf"))
    assert torch.equal(got, expected)
    assert (got[0] == 0).all() and (got[-1] != 0).any()  # the first window is whole, the last joins 4 regions


def test_one_window_over_the_grid_is_global_attention_with_the_relative_bias():
    torch.manual_seed(0)
    res, dim, heads = 4, 12, 3
    block = SwinBlock(dim, heads, res, window=8, shift=True, mlp_ratio=2.0, dropout=0.0).eval()
    assert block.shift == 0 and block.ws == res  # a window as large as the grid: no shift
    att: WindowAttention = block.attn
    with torch.no_grad():
        att.table.normal_()
    x = torch.randn(2, res * res, dim)
    q, k, v = att.qkv(x).view(2, res * res, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    bias = att.table[relative_index(res)].permute(2, 0, 1)
    weights = ((q @ k.transpose(-2, -1)) / math.sqrt(dim // heads) + bias).softmax(-1)
    ref = att.proj((weights @ v).transpose(1, 2).reshape(2, res * res, dim))
    torch.testing.assert_close(att(x), ref, rtol=1e-5, atol=1e-5)
    # the bias of a pair depends only on its offset: (0,0)->(1,2) and (1,1)->(2,3) share an entry
    idx = relative_index(res)
    assert idx[0, 1 * res + 2] == idx[1 * res + 1, 2 * res + 3] and idx[0, 0] == idx[5, 5]


def test_swin_stages_merge_patches():
    m = build_model(SwinConfig(dim=12, depths=[2, 1], heads=[3, 3], window=4).with_data(8, 1, 10))
    x = torch.rand(2, 1, 8, 8)
    assert m(x).shape == (2, 10)
    assert m.layers[2].res == 8 and m.layers[3].res == 4  # 8x8 tokens, then 4x4 after the merge
    assert m.layers[1].shift == 2 and m.layers[3].shift == 0  # shifted in stage 1, one window in stage 2


def test_window_attention_maps_give_each_window_one_unit_per_query_back_in_place():
    """What a token receives, summed over a window, is the window's query count (each query's
    weights sum to 1), in shifted blocks too once the roll is undone; an image's bright spot
    stays where the image has it."""
    torch.manual_seed(0)
    cfg = SwinConfig(patch=1, dim=8, depths=[2], heads=[2], window=4).with_data(8, 1, 2)
    model = build_model(cfg).eval()
    x = torch.rand(3, 1, 8, 8)
    maps = model.window_attention_maps(x)
    assert [b.shift for b, _ in maps] == [0, 2]
    for block, grid in maps:
        assert grid.shape == (3, 8, 8)
        torch.testing.assert_close(grid.sum((1, 2)), torch.full((3,), 64.0), atol=1e-4, rtol=1e-5)
    unshifted = maps[0][1]
    for wy in range(2):  # without the shift each 4x4 window's tokens receive its 16 queries' weights
        for wx in range(2):
            torch.testing.assert_close(unshifted[:, 4 * wy:4 * wy + 4, 4 * wx:4 * wx + 4].sum((1, 2)), torch.full((3,), 16.0), atol=1e-4, rtol=1e-5)
    assert all(b.attn.map is None and not b.attn.keep for b, _ in maps)  # nothing kept after the call
