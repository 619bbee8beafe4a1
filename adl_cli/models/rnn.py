"""Recurrent language models: stacked RNN, GRU or LSTM layers (``model.cell``) between a token
embedding and a tied head, a family ``adl pretrain`` trains and the engine decodes.

``model.impl``: ``fast`` runs torch's fused ``nn.RNN/GRU/LSTM`` (cuDNN on a GPU), ``teaching`` the
cells written out in nn/recurrent.py, one time step at a time; both hold the same parameters
(``weight_ih_l{i}`` ...), so a run trained with one loads into the other. Decoding carries each
layer's h (and c) instead of a key/value cache: ``RecurrentState``. A left-padded prompt is run
from its first real token (rows with padding are prefilled one by one), so batches equal each
prompt alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.models import FAMILIES, Family, ModelConfig
from adl_cli.models.lm import LMConfig, TiedLM
from adl_cli.nn.recurrent import GATES, RecurrentCell, torch_layer


@dataclass
class RNNConfig(LMConfig, ModelConfig):
    family: str = "rnn"
    cell: str = "lstm"  # rnn | gru | lstm
    impl: str = "fast"  # fast (torch's fused layers) | teaching (the cells written out)
    n_layer: int = 2
    n_embd: int = 128
    dropout: float = 0.0
    block_size: int = 256  # the training length (and the decode window the engine slides)
    vocab_multiple: int = 64
    vocab_size: int = 0
    attention = "none (recurrent)"  # (pretrain's log line)
    recurrent = True

    @property
    def label(self) -> str:
        return self.cell

    def validate(self) -> None:
        self.require_positive("n_layer", "n_embd", "block_size", "vocab_multiple")
        if self.cell not in GATES:
            raise ValueError(f"model.cell must be one of {', '.join(GATES)}, got '{self.cell}'")
        if self.impl not in ("fast", "teaching"):
            raise ValueError(f"model.impl must be fast or teaching, got '{self.impl}'")
        if not 0.0 <= self.dropout < 1.0 or self.vocab_size < 0:
            raise ValueError("model.dropout must be in [0, 1) and model.vocab_size >= 0")



class RecurrentState:
    """Per layer: h (B, H), or (h, c) for an LSTM."""

    can_be_static = False
    can_truncate = False  # a recurrent state cannot go back

    def __init__(self, model: RNNLM, batch: int, max_len: int):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.reset()

    def reset(self) -> None:
        self.layers = [None] * self.model.config.n_layer
        self.length, self.pad = 0, None

    def reorder(self, index: torch.Tensor) -> None:
        pick = lambda s: None if s is None else (tuple(t.index_select(0, index) for t in s) if isinstance(s, tuple) else s.index_select(0, index))  # noqa: E731
        self.layers = [pick(s) for s in self.layers]
        self.batch = len(index)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)

    def nbytes(self) -> int:
        """The state's bytes (the same before the first step, which allocates it, as after)."""
        cfg = self.model.config
        per_layer = (2 if cfg.cell == "lstm" else 1) * self.batch * cfg.n_embd
        return cfg.n_layer * per_layer * self.model.wte.weight.element_size()


class RNNLM(TiedLM):
    def __init__(self, cfg: RNNConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.tie(cfg.vocab_size, cfg.n_embd)
        self.cells = nn.ModuleList(RecurrentCell(cfg.cell, cfg.n_embd, cfg.n_embd) for _ in range(cfg.n_layer))
        self._fused = [torch_layer(cfg.cell, cfg.n_embd, cfg.n_embd) for _ in range(cfg.n_layer)]  # not submodules: no parameters of ours
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.n_embd)
        nn.init.normal_(self.wte.weight, std=0.02)

    def _layer(self, i: int, x: torch.Tensor, state):
        cell = self.cells[i]
        if self.config.impl == "teaching":
            return cell(x, state)
        hidden = None
        if state is not None:
            hidden = (state[0][None], state[1][None]) if cell.kind == "lstm" else state[None]
        # torch's fused layer run on this cell's own parameters (the template holds none of the model's)
        weights = {f"{name}_l0": getattr(cell, name) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
        out, h = torch.func.functional_call(self._fused[i], weights, (x, hidden))
        return out, ((h[0][0], h[1][0]) if cell.kind == "lstm" else h[0])

    def _run(self, x: torch.Tensor, states: list | None):
        new = []
        for i in range(len(self.cells)):
            x, s = self._layer(i, x, None if states is None else states[i])
            x = self.drop(x)
            new.append(s)
        return self.norm(x), new

    def hidden(self, idx: torch.Tensor, state: RecurrentState | None = None) -> torch.Tensor:
        x = self.drop(self.wte(idx))
        if state is None:
            return self._run(x, None)[0]
        if state.length == 0 and state.pad is not None:  # rows with left padding start at their first real token
            outs, layers = [], []
            for r in range(idx.shape[0]):
                p = int(state.pad[r])
                h, s = self._run(x[r:r + 1, p:], None)
                outs.append(F.pad(h, (0, 0, p, 0)))
                layers.append(s)
            state.layers = [_stack([row[i] for row in layers]) for i in range(len(self.cells))]
            h = torch.cat(outs)
        else:
            h, state.layers = self._run(x, None if state.length == 0 else state.layers)
        state.length += idx.shape[1]
        return h

    def setup_cache(self, batch: int, max_len: int | None = None, *, dtype=None, device=None) -> RecurrentState:
        return RecurrentState(self, batch, max_len or self.config.block_size)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 x the weights' multiply-adds per token (input and recurrent matrices, the tied head)."""
        cfg = self.config
        return 6 * (cfg.n_layer * 2 * GATES[cfg.cell] * cfg.n_embd * cfg.n_embd + cfg.n_embd * cfg.vocab_size)


def _stack(states: list):
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states))
    return torch.cat(states)


FAMILIES.register("rnn")(Family(RNNConfig, build=RNNLM))
