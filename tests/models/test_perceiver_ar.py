"""Perceiver AR against its definition: causal (token j never changes a prediction at a position
before j), the prefix reaches the latents through the cross-attention, the latents are the last
positions; incremental decoding (a token history, left padding) gives the full forward's logits;
the sliding evaluation scores every token once with at least N - M of context."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adl_cli.data.tokens import split_windows
from adl_cli.models import build_model
from adl_cli.models.perceiver_ar import PerceiverARConfig

TOL = dict(atol=1e-5, rtol=1e-4)  # fp32; the same reductions in both orders


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(PerceiverARConfig(block_size=16, latents=6, n_layer=2, n_head=2, n_embd=16).with_vocab(50)).eval()


def test_causal_and_the_prefix_reaches_every_latent(model):
    idx = torch.randint(0, 50, (1, 16))
    logits = model(idx)[0]  # (1, 6, V): positions 10..15
    assert logits.shape == (1, 6, 64)
    for j in range(10, 16):  # change token j: predictions at positions < j stay
        changed = idx.clone()
        changed[0, j] = (changed[0, j] + 1) % 50
        other = model(changed)[0]
        torch.testing.assert_close(other[:, : j - 10], logits[:, : j - 10], **TOL)
        assert not torch.allclose(other[:, j - 10], logits[:, j - 10])
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 50  # a prefix token (not a latent) moves every latent's prediction
    other = model(changed)[0]
    assert all(not torch.allclose(other[0, i], logits[0, i]) for i in range(6))


def test_loss_is_the_latents_cross_entropy(model):
    idx, y = torch.randint(0, 50, (2, 16)), torch.randint(0, 50, (2, 16))
    logits = model(idx)[0]
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, -6:].flatten())
    torch.testing.assert_close(model(idx, y)[1], ref, **TOL)


def test_decoding_from_a_history_gives_the_full_forwards_logits(model):
    from adl_cli.inference.engine import generate_batch

    seq = torch.randint(0, 50, (1, 20))
    state = model.setup_cache(1, 32)
    h = model.hidden(seq[:, :9], state)
    for t in range(9, 20):  # one token at a time, past the context (the window slides over the history)
        h = model.hidden(seq[:, t:t + 1], state)
        window = seq[:, max(0, t + 1 - 16):t + 1]
        torch.testing.assert_close(model.logits(h[:, -1]), model(window)[0][:, -1], **TOL)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11]]  # left-padded in one batch = each prompt alone
    together = generate_batch(model, prompts, 12)
    for p, row in zip(prompts, together):
        assert generate_batch(model, [p], 12)[0].tokens == row.tokens


def test_sliding_windows_score_each_token_once_with_context():
    tokens = np.arange(100)
    seen = []
    for x, y in split_windows(tokens, 16, 4, score_last=6):
        for row_x, row_y in zip(x, y):
            keep = (row_y != -100).nonzero().flatten().tolist()
            assert all(p >= 10 for p in keep)  # at least 16 - 6 = 10 tokens before each scored one
            seen += row_y[keep].tolist()
            assert torch.equal(row_y[keep], row_x[keep] + 1)
    assert sorted(seen) == list(range(11, 100))  # targets 11..99 once each (the first 10 never)
    plain = [t for _, y in split_windows(tokens, 16, 4) for t in y[y != -100].tolist()]
    assert sorted(plain) == list(range(1, 100))  # without score_last: every target once, as before


def test_bad_configs_are_value_errors():
    with pytest.raises(ValueError, match="latents"):
        PerceiverARConfig(block_size=8, latents=9)
    with pytest.raises(ValueError, match="multiple of model.n_head"):
        PerceiverARConfig(n_embd=10, n_head=4)


def test_adl_pretrain_trains_it_and_generate_and_eval_read_it(tmp_path, small_corpus, capsys, run):
    recipe = tmp_path / "par.toml"
    recipe.write_text(f"""
name = "par"
sample_prompt = "The "
sample_tokens = 6
[model]
family = "perceiver_ar"
block_size = 32
latents = 8
n_layer = 1
n_head = 2
n_embd = 16
[data]
corpus = "{small_corpus.as_posix()}"
tokenizer = "bytes"
[train]
steps = 4
batch_size = 4
eval_every = 0
eval_batches = 2
checkpoint_every = 2
log_every = 1
""")
    out = tmp_path / "run"
    code, _, err = run(["pretrain", recipe, "--out", out, "--no-progress"], capsys)
    assert code == 0, err
    import json

    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 4 and s["tokens"] == 4 * 4 * 32 and math.isfinite(s["val_loss"])
    greedy = ["generate", out, "--prompt", "The ", "-n", "12", "-t", "0"]
    code, plain, err = run(greedy, capsys)
    assert code == 0 and plain.startswith("The "), err
    for extra in (["--draft", out], ["--lookup", "2"]):  # rolled back by truncating the history: the same greedy text
        code, text, err = run(greedy + extra, capsys)
        assert code == 0 and text == plain, err
    code, text, err = run(["eval", out, "--json"], capsys)
    assert code == 0, err
    assert json.loads(text)["context"] == 32
