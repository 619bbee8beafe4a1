"""New token rows that train beside an adapter, through peft's trainable tokens.

Fine-tuning a run on chat data adds the template's markers to its tokenizer (``data.chat``):
the embedding table and the head grow by a few rows, each starting at the mean of the old rows
(``runs.init_from``). Those rows must learn (four identical rows cannot tell ``<|user|>`` from
``<|end|>``), but training the whole table would undo the point of an adapter. peft's trainable
tokens keep a small delta for the chosen rows only (k x d parameters) and use the table with
those rows replaced. With tied embeddings (GPT-2) the head shares the input table's delta; with
untied ones (the main job) the head has a delta of its own.

peft finds the tie through the model's config (``tie_word_embeddings``), its
``_tied_weights_keys`` and ``get_input_embeddings``, which adl's GPT does not carry as
transformers' models do; ``_peft_view`` lends it them while peft injects the layers. An adapter
run stores the deltas beside its adapter tensors (``token_tensors``) and the row ids in its
``adapter.json`` (``token_rows``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from adl_cli.errors import AdlError

DELTA = "trainable_tokens_delta"


@contextlib.contextmanager
def _peft_view(model: nn.Module):
    cfg = model.config
    tied = bool(getattr(cfg, "tie_embeddings", False))

    class _Config:  # what peft reads of a transformers config
        def to_dict(self):
            return {**cfg.to_dict(), "tie_word_embeddings": tied}

    model.__dict__["config"] = _Config()
    model.__dict__["_tied_weights_keys"] = {"lm_head.weight": "transformer.wte.weight"} if tied else None
    model.__dict__["get_input_embeddings"] = lambda: model.transformer.wte
    try:
        yield tied
    finally:
        model.__dict__["config"] = cfg
        del model.__dict__["_tied_weights_keys"], model.__dict__["get_input_embeddings"]


def add_token_rows(model: nn.Module, ids: list[int]) -> nn.Module:
    """``model`` whose embedding (and head) rows ``ids`` train through a delta; nothing else changes."""
    from peft import inject_adapter_in_model
    from peft.tuners.trainable_tokens import TrainableTokensConfig

    with _peft_view(model) as tied:
        cfg = TrainableTokensConfig(target_modules=["wte"] if tied else ["wte", "lm_head"], token_indices=list(ids))
        model = inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        if DELTA in name:
            p.requires_grad_(True)
    return model


def token_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The rows' deltas, named by their layer (``transformer.wte.trainable_tokens_delta``, ...)."""
    return {name.rsplit(".", 1)[0]: p.detach().contiguous() for name, p in model.named_parameters() if DELTA in name}


def restore(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """An adapter run's token rows (``config["token_rows"]``), when it has some, with their deltas."""
    ids = config.get("token_rows")
    if not ids:
        return model
    model = add_token_rows(model, ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if DELTA in name:
                key = name.rsplit(".", 1)[0]
                if key not in tensors or tensors[key].shape != p.shape:
                    raise AdlError(f"the adapter's token rows do not fit this model ({key})")
                p.copy_(tensors[key])
    return model
