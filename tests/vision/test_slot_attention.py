"""Slot attention against its definition: a set function of the inputs, equivariant in the slots,
attention a distribution over the slots, the update a weighted mean (an explicit loop checks it);
FG-ARI against scikit-learn; the k-means baseline; `adl vision` on a tiny sprites recipe."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from adl_cli.methods.objects import fg_ari, kmeans_masks
from adl_cli.models import build_model
from adl_cli.models.slots import SlotAttention, SlotConfig

TOL = dict(atol=2e-5, rtol=1e-4)  # fp32, reductions over a few dozen terms


@pytest.fixture
def module():
    torch.manual_seed(0)
    return SlotAttention(dim=16, input_dim=12, iters=3, hidden=32).eval()


def test_equivariant_to_permuting_slots_and_invariant_to_permuting_inputs(module):
    x, s = torch.randn(2, 20, 12), torch.randn(2, 4, 16)
    slots, attn = module(x, s)
    perm = torch.tensor([2, 0, 3, 1])
    slots_p, attn_p = module(x, s[:, perm])
    torch.testing.assert_close(slots_p, slots[:, perm], **TOL)
    torch.testing.assert_close(attn_p, attn[:, :, perm], **TOL)
    order = torch.randperm(20)
    slots_q, attn_q = module(x[:, order], s)
    torch.testing.assert_close(slots_q, slots, **TOL)
    torch.testing.assert_close(attn_q, attn[:, order], **TOL)
    assert not torch.allclose(slots[:, 0], slots[:, 1])  # the slots differ: the checks are not vacuous


def test_attention_is_a_distribution_over_slots_and_the_update_is_its_weighted_mean(module):
    x, s = torch.randn(1, 10, 12), torch.randn(1, 3, 16)
    slots, attn = module(x, s)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 10), **TOL)
    # one round by hand: every slot's update is sum_n a[n, k] v_n / sum_n a[n, k]
    one = SlotAttention(16, 12, iters=1, hidden=32).eval()
    one.load_state_dict(module.state_dict())
    out, a = one(x, s)
    xn = one.norm_inputs(x[0])
    k, v = one.k(xn), one.v(xn)
    q = one.q(one.norm_slots(s[0]))
    expect = []
    for j in range(3):
        logits = torch.stack([torch.stack([k[n] @ q[i] / 4.0 for i in range(3)]) for n in range(10)])  # sqrt(16) = 4
        w = torch.softmax(logits, dim=1)[:, j] + one.eps
        update = sum(w[n] * v[n] for n in range(10)) / w.sum()
        h = one.gru(update[None], s[0, j][None])[0]
        expect.append(h + one.mlp(one.norm_mlp(h)))
    torch.testing.assert_close(out[0], torch.stack(expect), **TOL)


def test_autoencoder_masks_sum_to_one_and_blend_the_slots():
    cfg = SlotConfig(slots=3, dim=16, width=8, encoder_layers=1, decoder_hidden=16).with_data(8, 3, 3)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    d = model.decompose(torch.rand(2, 3, 8, 8))
    torch.testing.assert_close(d["masks"].sum(1), torch.ones(2, 8, 8), **TOL)
    torch.testing.assert_close(d["recon"], (d["masks"][:, :, None] * d["colours"]).sum(1), **TOL)
    torch.testing.assert_close(model(torch.ones(1, 3, 8, 8)), model(torch.ones(1, 3, 8, 8)))  # eval: the slots' noise is fixed


def test_fg_ari_equals_scikit_learn_on_the_foreground():
    g = torch.Generator().manual_seed(0)
    true = torch.randint(0, 4, (12, 6, 6), generator=g)
    pred = torch.randint(0, 5, (12, 6, 6), generator=g)
    pred[0] = true[0]  # identical partitions
    pred[1] = (true[1] + 1) % 4  # the same partition, relabelled
    true[2] = (true[2] > 0).long()  # one object only ...
    pred[2] = 3  # ... and one segment: both trivial
    ours = fg_ari(true, pred)
    for i in range(12):
        fg = true[i] > 0
        assert abs(float(ours[i]) - adjusted_rand_score(true[i][fg].numpy(), pred[i][fg].numpy())) < 1e-6
    assert ours[0] == 1 and ours[1] == 1 and ours[2] == 1


def test_kmeans_on_colour_separates_objects_of_distinct_colours():
    img = torch.zeros(1, 3, 8, 8)
    true = torch.zeros(1, 8, 8, dtype=torch.long)
    img[0, 0, :3, :3], true[0, :3, :3] = 1.0, 1
    img[0, 2, 5:, 4:], true[0, 5:, 4:] = 1.0, 2
    assert float(fg_ari(true, kmeans_masks(img, 3))[0]) == 1.0


SLOTS = """
name = "s"
[model]
family = "slots"
slots = 3
dim = 16
width = 8
encoder_layers = 1
decoder_hidden = 16
[data]
set = "sprites"
size = 8
n = 60
[train]
steps = 3
batch_size = 8
lr = 1e-3
warmup = 1
eval_every = 0
checkpoint_every = 0
log_every = 1
precision = "fp32"
"""


def test_adl_vision_trains_a_slot_autoencoder_and_scores_its_masks(tmp_path, capsys, run):
    p = tmp_path / "s.toml"
    p.write_text(SLOTS)
    code, out, err = run(["vision", p, "--out", tmp_path / "run", "--json", "--no-progress"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["objective"] == "reconstruct" and s["test"]["n"] == 12 and -1 <= s["test"]["fg_ari"]["mean"] <= 1
    assert [b["name"] for b in s["baselines"]] == ["k-means on pixel colour", "k-means on pixel colour + position"]
    assert {"slots.png"} <= set(s["figures"]) and (tmp_path / "run" / "slots.png").exists()
    assert "FG-ARI" in (tmp_path / "run" / "report.md").read_text()
    # recomputed from the saved model: the summary scores the saved weights
    from adl_cli.data.images import load_images, split
    from adl_cli.methods.objects import object_scores
    from adl_cli.runs import load_run

    test = split(load_images("sprites", size=8, n=60)).test
    assert abs(object_scores(load_run(tmp_path / "run").model, test)["fg_ari"]["mean"] - s["test"]["fg_ari"]["mean"]) < 1e-9
    # a set without masks is refused in one line, before anything is written
    code, _, err = run(["vision", p, "--set", "data.set=digits", "--out", tmp_path / "run2", "--no-progress"], capsys)
    assert code != 0 and "object masks" in err and "Traceback" not in err and not (tmp_path / "run2").exists()
