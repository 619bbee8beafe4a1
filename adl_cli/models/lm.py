"""What the language-model families beside the GPT share (Perceiver AR, Mamba, the RNNs).

``LMConfig``: the vocabulary comes from the tokenizer (``with_vocab`` rounds it up to
``vocab_multiple``); validated on construction; the fields the pretraining command's log line
reads of a GPT, with neutral defaults. ``TiedLM``: a model whose ``hidden(idx, state)`` gives the final hidden
states of its last positions, read out by a head tied to the token embedding ``wte``; its
``forward`` is the one every command calls: (logits, None), or (None, the mean cross-entropy of
those positions against the same positions of the targets, -100 left out).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


class LMConfig:
    vocab_multiple: int
    vocab_size: int
    # what the pretraining command's log lines read of a language model (a family overrides what it has)
    n_head = 0
    attention = "none"
    position = "none"
    mtp_heads = 0
    recurrent = False  # True: reads any length from a constant-size state (no positions, no cache)

    @property
    def label(self) -> str:
        """The model's name in tables (a family with variants names the variant)."""
        return self.family

    def __post_init__(self):
        self.validate()

    def require_positive(self, *names: str) -> None:
        """ValueError naming the first of these fields below 1."""
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")

    def with_vocab(self, vocab_size: int):
        return dataclasses.replace(self, vocab_size=math.ceil(vocab_size / self.vocab_multiple) * self.vocab_multiple)


class TiedLM(nn.Module):
    wte: nn.Embedding
    lm_head: nn.Linear

    def tie(self, vocab_size: int, width: int) -> None:
        """The token table and the head that reads it back out (one matrix)."""
        if vocab_size < 1:
            raise ValueError("model.vocab_size is set from the tokenizer: build from config.with_vocab(size)")
        self.wte = nn.Embedding(vocab_size, width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def hidden(self, idx: torch.Tensor, state=None) -> torch.Tensor:  # pragma: no cover - families override
        raise NotImplementedError

    def through_blocks(self, idx: torch.Tensor, state=None) -> torch.Tensor:
        """The recurrent families' ``hidden``: the embeddings through ``self.blocks`` (each
        ``block(x, keep, layer_state)``) and ``self.norm_f``. ``state`` (a decode state with
        ``layers``, ``length`` and ``pad``) is continued and advanced; on its first call a
        left-padded batch passes ``keep`` (False at the padding) so that padding leaves it alone."""
        keep = None
        if state is not None and state.pad is not None and state.length == 0:
            keep = torch.arange(idx.shape[1], device=idx.device)[None] >= state.pad[:, None]
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, keep, None if state is None else state.layers[i])
        if state is not None:
            state.length += idx.shape[1]
        return self.norm_f(x)

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, idx, targets=None, state=None):
        h = self.hidden(idx, state)
        if targets is None:
            return self.logits(h), None
        y = targets[:, -h.shape[1]:]
        return None, F.cross_entropy(self.logits(h).flatten(0, 1).float(), y.flatten(), ignore_index=-100)
