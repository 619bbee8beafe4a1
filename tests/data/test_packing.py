"""Packing supervised examples: per-example losses equal unpacked ones, no attention across examples,
positions restart, masked prompts contribute nothing, the truncation policy, resumable batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adl_cli.data.packing import IGNORE, Example, RowBatches, collate, make_example, pack, unpacked
from adl_cli.models import build_model
from adl_cli.models.gpt import GPTConfig
from adl_cli.nn.attention.mask import segment_positions


def _examples(n=9, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(3, 12))
        ids = rng.integers(0, vocab, L + 1)
        prompt = int(rng.integers(1, L))
        trained = [False] * prompt + [True] * (L + 1 - prompt)
        out.append(make_example(ids.tolist(), trained, 32, "drop"))
    return out


def _model(position="learned", attention="sdpa"):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=56, vocab_multiple=8, position=position,
                    attention=attention, loss_chunk_rows=0)
    return build_model(cfg).eval()


def _token_losses(model, x, y, seg=None):
    logits = model(x, segment_ids=seg)[0]
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="none").view(y.shape)


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
@pytest.mark.parametrize("attention", ["sdpa", "naive", "flash"])
def test_packed_losses_equal_each_example_alone(position, attention):
    model = _model(position, attention)
    examples = _examples()
    rows = pack(examples, 32, seed=1)
    assert len(rows) < len(examples)  # several examples share a row
    with torch.no_grad():
        packed = _token_losses(model, rows.inputs, rows.targets, rows.segments)
        alone = [_token_losses(model, torch.from_numpy(e.inputs)[None], torch.from_numpy(e.targets)[None])[0] for e in examples]
    seen = 0
    for r in range(len(rows)):
        seg = rows.segments[r]
        for s in range(int(seg[rows.lengths[r] - 1]) + 1):
            where = (seg == s).nonzero().flatten()
            k = next(i for i, e in enumerate(examples) if len(e) == len(where) and np.array_equal(e.inputs, rows.inputs[r, where].numpy()))
            got = packed[r, where]
            want = alone[k]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            seen += 1
    assert seen == len(examples)


def test_no_token_attends_across_examples():
    """The gradient of one example's outputs with respect to another example's inputs is zero."""
    model = _model()
    rows = pack(_examples(4), 32, seed=0)
    r = int(torch.argmax(rows.segments.max(dim=1).values))  # a row holding several examples
    x = model.transformer.wte(rows.inputs[r:r + 1]).detach().requires_grad_(True)
    seg = rows.segments[r:r + 1]
    h = model._blocks(x, segment_positions(seg)[0], None, None, seg)
    last = int(seg[0, rows.lengths[r] - 1])
    h[0, seg[0] == last].sum().backward()
    assert x.grad[0, seg[0] != last].abs().max() == 0
    assert x.grad[0, seg[0] == last].abs().max() > 0


def test_positions_restart_per_example():
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 0]]


def test_masked_prompt_targets_contribute_nothing():
    """Changing what the prompt positions would predict leaves the loss unchanged; the loss is the
    mean over answer targets alone (the slow reference)."""
    model = _model()
    ex = _examples(1)[0]
    x = torch.from_numpy(ex.inputs)[None]
    y = torch.from_numpy(ex.targets)[None]
    prompt = y == IGNORE
    with torch.no_grad():
        loss = model(x, y)[1]
        other = torch.where(prompt, torch.randint(0, 50, y.shape), y)  # prompt targets filled with other ids ...
        loss_other = model(x, other.masked_fill(prompt, IGNORE))[1]  # ... and masked again
        logits = model(x)[0][0]
        ref = torch.stack([-torch.log_softmax(logits[t], -1)[y[0, t]] for t in range(y.shape[1]) if y[0, t] != IGNORE]).mean()
    assert loss == loss_other
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_truncation_drops_or_cuts_the_prompt_from_the_left():
    ids = list(range(40))
    trained = [False] * 30 + [True] * 10
    assert make_example(ids, trained, 32, "drop") is None
    ex = make_example(ids, trained, 32, "left")
    assert len(ex) == 32 and ex.inputs[0] == 40 - 33 and (ex.targets != IGNORE).sum() == 10
    assert make_example(ids, [False] * 5 + [True] * 35, 32, "left") is None  # the answer alone does not fit
    assert make_example([1, 2], [False, False], 32, "drop") is None  # nothing to train


def test_pack_keeps_every_example_once_and_pads_in_its_own_segment():
    examples = _examples(30, seed=2)
    rows = pack(examples, 32, seed=0)
    assert int(rows.lengths.sum()) == sum(len(e) for e in examples)
    assert int((rows.targets != IGNORE).sum()) == sum(e.trained for e in examples)
    for r in range(len(rows)):
        n = int(rows.lengths[r])
        assert (rows.targets[r, n:] == IGNORE).all()
        if n < 32:
            assert (rows.segments[r, n:] > rows.segments[r, n - 1]).all()


def test_row_batches_count_tokens_and_resume():
    examples = _examples(40, seed=3)
    rows = unpacked(examples, 32)
    b = RowBatches(rows, 4, 1, seed=0)
    first = [b(step, 0, 0, 1) for step in range(3)]
    assert b.tokens_seen == sum(f["tokens"] for f in first)
    state = b.state_dict()
    nxt = b(3, 0, 0, 1)
    again = RowBatches(rows, 4, 1, seed=0)
    again.load_state_dict(state)
    other = again(3, 0, 0, 1)
    assert torch.equal(nxt["inputs"], other["inputs"]) and again.tokens_seen == b.tokens_seen


def test_collate_trims_to_the_longest_row():
    examples = [Example(np.arange(5), np.arange(5)), Example(np.arange(9), np.arange(9))]
    rows = unpacked(examples, 32)
    batch = collate(rows, torch.tensor([0, 1]))
    assert batch["inputs"].shape == (2, 9) and batch["tokens"] == 14 and "segments" not in batch
