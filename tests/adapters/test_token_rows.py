"""New token rows beside an adapter (peft's trainable tokens on adl's GPT): the model starts as
its base, only the chosen rows change, the fused loss sees them, tied heads share them, and
merging folds them into the tables."""

from __future__ import annotations

import pytest
import torch

from adl_cli.adapters.lora import LoraSection, add_lora, merge
from adl_cli.adapters.tokens import add_token_rows, token_tensors
from adl_cli.models.gpt import GPT, GPTConfig

V, NEW = 64, [60, 61, 62, 63]
X = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
X[0, :4] = torch.tensor(NEW)  # every new token read (its input row gets a gradient) and predicted
Y = torch.roll(X, -1, 1)


def _model(tied: bool, chunk: int = 0):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_embeddings=tied, loss_chunk_rows=chunk)).eval()


def _effective(model):
    """(input table, output table) the model computes with (rows replaced by their deltas)."""
    wte, head = model.transformer.wte, model.lm_head
    return wte.get_merged_weights(wte.active_adapters), model.head_weight()


def _train(model, steps=4):
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(X, Y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("tied", [True, False])
def test_rows_start_at_the_base_and_only_they_change(tied):
    base = _model(tied)
    with torch.no_grad():
        want = base(X)[0]
    model = add_lora(add_token_rows(_model(tied), NEW), LoraSection(r=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        torch.testing.assert_close(model(X)[0], want, rtol=0, atol=0)
    deltas = token_tensors(model)
    assert set(deltas) == ({"transformer.wte.trainable_tokens_delta"} | (set() if tied else {"lm_head.trainable_tokens_delta"}))
    _train(model)
    with torch.no_grad():
        wte, head = _effective(model)
    old_wte, old_head = base.transformer.wte.weight, base.lm_head.weight
    keep = [i for i in range(V) if i not in NEW]
    assert torch.equal(wte[keep], old_wte[keep]) and torch.equal(head[keep], old_head[keep])
    assert (wte[NEW] - old_wte[NEW]).abs().amax(1).gt(0).all()  # every new row moved
    if tied:
        assert torch.equal(wte, head)  # the head shares the input rows' delta
    else:
        assert not torch.equal(wte[NEW], head[NEW])


@pytest.mark.parametrize("tied", [True, False])
def test_fused_loss_sees_the_rows(tied):
    """The chunked (fused) loss and the plain logits loss agree with trained token rows."""
    fused = add_token_rows(_model(tied, chunk=8), NEW)
    with torch.no_grad():
        for name, p in fused.named_parameters():
            if "delta" in name:
                p.normal_()
    plain_loss = torch.nn.functional.cross_entropy(fused(X)[0].flatten(0, 1), Y.flatten())
    torch.testing.assert_close(fused(X, Y)[1], plain_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_merge_folds_rows_and_adapters(tied):
    model = _train(add_lora(add_token_rows(_model(tied), NEW), LoraSection(r=4, targets=["q_proj", "c_fc"])))
    with torch.no_grad():
        want = model(X)[0]
        merged = merge(model)
        assert isinstance(merged.transformer.wte, torch.nn.Embedding) and isinstance(merged.lm_head, torch.nn.Linear)
        torch.testing.assert_close(merged(X)[0], want, rtol=1e-5, atol=1e-5)
    assert (merged.lm_head.weight is merged.transformer.wte.weight) == tied
