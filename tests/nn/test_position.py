import math

import pytest
import torch

from adl_cli.models.gpt import GPT, GPTConfig
from adl_cli.nn.position import POSITIONS, alibi_slopes, swapped_position, with_position

DIMS = dict(n_embd=32, head_dim=16, n_head=2, block_size=16)


def make(name, **options):
    return POSITIONS.get(name)(**DIMS, **options)


def test_rope_depends_only_on_relative_position_and_keeps_norms():
    torch.manual_seed(0)
    rope = make("rope")
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        return (rope.rotate(q, torch.tensor([m])) * rope.rotate(k, torch.tensor([n]))).sum().item()

    for m, n in [(3, 1), (9, 7), (40, 38)]:  # the last pair is past block_size
        assert score(m, n) == pytest.approx(score(2, 0), abs=1e-5)
    x = torch.randn(2, 3, 5, 16)
    rotated = rope.rotate(x, torch.arange(20, 25))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


@pytest.mark.parametrize("name", ["pi", "ntk", "yarn"])
def test_scaled_rope_at_scale_one_is_rope(name):
    x = torch.randn(1, 2, 6, 16)
    pos = torch.arange(10, 16)
    scaled, plain = make(name, scale=1.0), make("rope")
    torch.testing.assert_close(scaled.inv_freq, plain.inv_freq)
    assert scaled.attention_factor == 1.0
    torch.testing.assert_close(scaled.rotate(x, pos), plain.rotate(x, pos))


def test_pi_and_ntk_frequencies():
    base = make("rope").inv_freq.double()
    torch.testing.assert_close(make("pi", scale=4.0).inv_freq.double(), base / 4)
    ntk = make("ntk", scale=4.0).inv_freq.double()
    assert ntk[0].item() == pytest.approx(1.0)  # the fastest pair is untouched
    # theta_i' = theta_i * s^(-2i/(D-2)): the slowest pair (i = D/2 - 1) is interpolated by s.
    assert ntk[-1].item() == pytest.approx(base[-1].item() / 4, rel=1e-5)


def test_yarn_inverse_frequencies_follow_the_paper():
    """The paper's ramp, written out: linear in the pair index between the floored and ceiled
    pair indices that turn beta_fast and beta_slow times in the training length."""
    dim, theta, s, L, alpha, beta = 64, 10000.0, 4.0, 2048, 1.0, 32.0

    def turning(b):  # the pair index whose wavelength fits b times into L
        return dim * math.log(L / (b * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = max(math.floor(turning(beta)), 0), min(math.ceil(turning(alpha)), dim - 1)
    expected = []
    for i in range(dim // 2):
        freq = theta ** (-2 * i / dim)
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        gamma = 1.0 - ramp  # 1 = keep (extrapolate), 0 = interpolate by s
        expected.append((1 - gamma) * freq / s + gamma * freq)
    yarn = POSITIONS.get("yarn")(
        n_embd=128, head_dim=dim, n_head=2, block_size=L, scale=s, original_max_position=L, beta_fast=beta, beta_slow=alpha
    )
    assert yarn.inv_freq.tolist() == pytest.approx(expected, rel=1e-6)
    # All three regimes occur for these settings.
    assert expected[0] == pytest.approx(1.0) and expected[-1] == pytest.approx(theta ** (-(dim - 2) / dim) / s)
    factor = 0.1 * math.log(s) + 1
    assert yarn.attention_factor == pytest.approx(factor)
    x = torch.randn(1, 1, 3, dim)
    out = yarn.rotate(x, torch.arange(3))
    torch.testing.assert_close(out.norm(dim=-1), factor * x.norm(dim=-1))


@pytest.mark.parametrize("dim, theta, s, L, beta_fast, beta_slow", [
    (64, 1e4, 4.0, 2048, 32.0, 1.0), (128, 5e5, 8.0, 8192, 32.0, 1.0), (32, 1e4, 2.0, 512, 16.0, 2.0), (16, 1e4, 4.0, 12, 32.0, 1.0),
])
def test_yarn_matches_transformers(dim, theta, s, L, beta_fast, beta_slow):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import _compute_yarn_parameters

    cfg = transformers.LlamaConfig(hidden_size=dim * 2, num_attention_heads=2, max_position_embeddings=int(L * s),
                                   rope_parameters={"rope_type": "yarn", "rope_theta": theta, "factor": s, "original_max_position_embeddings": L,
                                                    "beta_fast": beta_fast, "beta_slow": beta_slow})
    ref, attention_factor = _compute_yarn_parameters(cfg, "cpu")
    yarn = POSITIONS.get("yarn")(n_embd=dim * 2, head_dim=dim, n_head=2, block_size=L, theta=theta, scale=s,
                                 original_max_position=L, beta_fast=beta_fast, beta_slow=beta_slow)
    torch.testing.assert_close(yarn.inv_freq.float(), ref.float(), rtol=1e-5, atol=0)
    assert yarn.attention_factor == pytest.approx(attention_factor, rel=1e-6)


def test_alibi_slopes():
    assert alibi_slopes(8) == [2.0**-h for h in range(1, 9)]
    # H = 6: the 4-head slopes, then every other slope of the 8-head sequence.
    assert alibi_slopes(6) == [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]


def test_alibi_bias_shape_and_values():
    alibi = make("alibi")
    bias = alibi.bias(4, torch.tensor([5]), torch.arange(6))  # one decoding step
    assert bias.shape == (4, 1, 6)
    slopes = alibi_slopes(4)
    for h in range(4):
        assert bias[h, 0].tolist() == pytest.approx([-slopes[h] * (5 - j) for j in range(6)])
    full = alibi.bias(2, torch.arange(3), torch.arange(3))
    assert full.shape == (2, 3, 3) and full.diagonal(dim1=1, dim2=2).abs().sum() == 0


def test_sinusoidal_equals_formula_also_past_block_size():
    sin = make("sinusoidal")
    pos = torch.tensor([0, 1, 7, 15, 16, 100])
    got = sin.embed(pos)
    for row, p in enumerate(pos.tolist()):
        for i in range(16):
            angle = p / 10000 ** (2 * i / 32)
            assert got[row, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert got[row, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_bad_options_name_the_option_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'scael'.*scale"):
        make("yarn", scael=2.0)
    with pytest.raises(ValueError, match="'scale' must be >= 1"):
        make("pi", scale=0.5)
    with pytest.raises(ValueError, match="'theta' must be a number"):
        make("rope", theta="big")
    with pytest.raises(ValueError, match="no option 'scale'"):
        make("alibi", scale=2.0)


def tiny_gpt(position, **options):
    cfg = GPTConfig(
        vocab_size=40, block_size=12, n_layer=2, n_head=2, n_embd=16, attention="naive",
        position=position, position_options=options,
    )
    return GPT(cfg)


POSITION_CASES = [
    ("none", {}), ("learned", {}), ("sinusoidal", {}), ("rope", {}), ("pi", {"scale": 2.0}),
    ("ntk", {"scale": 2.0}), ("yarn", {"scale": 4.0, "original_max_position": 12}), ("alibi", {}),
]


@pytest.mark.parametrize("name,options", POSITION_CASES)
def test_gpt_trains_and_decodes_with_each_position(name, options):
    torch.manual_seed(0)
    model = tiny_gpt(name, **options)
    idx = torch.randint(0, 40, (2, 12))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.eval()
    length = 12 if name == "learned" else 20  # non-learned positions go past block_size
    seq = torch.randint(0, 40, (2, length))
    with torch.no_grad():
        full, _ = model(seq)
        state = model.setup_cache(2, length)
        steps = [model(seq[:, :5], state=state)[0]]
        steps += [model(seq[:, t : t + 1], state=state)[0] for t in range(5, length)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_with_position_swaps_rope_variants_and_back():
    torch.manual_seed(0)
    model = tiny_gpt("rope").eval()
    seq = torch.randint(0, 40, (1, 30))
    with torch.no_grad():
        before = model(seq)[0]
        with swapped_position(model, "yarn", scale=4.0) as pos:
            assert model.config.position == "yarn" and pos.options["original_max_position"] == 12
            during = model(seq)[0]
        after = model(seq)[0]
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    old = with_position(model, "pi", scale=2.0)
    assert old.name == "rope" and model.config.position_options == {"scale": 2.0}
    with pytest.raises(ValueError, match="without retraining"):
        with_position(tiny_gpt("learned"), "rope")
    with pytest.raises(ValueError, match="without retraining"):
        with_position(model, "alibi")
