"""The decoding layout: linear weights stored transposed, (in, out), for inference.

A decoding step multiplies one row (or a few) by every weight matrix. Stored (out, in), as
nn.Linear keeps it, each output needs a dot product over a whole row; stored (in, out), the step
streams the matrix row by row, each input scaling a contiguous row of outputs. On this project's
2-core CPUs the second reads memory faster: at 3072 x 768, one row, 17.7 against 24.7 ms for 40
matrices (377 MB, read from memory), and 20-40% less time at 4 rows; the 50257 x 768 output head
18.2 against 22.4 ms (benchmarks/RESULTS.md, "the decoding layout").

``decode_layout(model)`` swaps every nn.Linear for a DecodeLinear holding the transposed copy (the
float weights are replaced, not duplicated). A head tied to the token embedding keeps one table:
the embedding reads its rows as columns of the transposed table (one column per token). The
model is then for inference: ``.weight`` of a swapped layer is a read-only view.
"""

from __future__ import annotations

import torch
from torch import nn


class DecodeLinear(nn.Module):
    def __init__(self, linear: nn.Linear, weight_t: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.weight_t = nn.Parameter(w.t().contiguous() if weight_t is None else weight_t, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) weight, as a view of the stored (in, out) one."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = rows @ self.weight_t if self.bias is None else torch.addmm(self.bias, rows, self.weight_t)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, stored transposed"


class DecodeEmbedding(nn.Module):
    """An embedding table read from a transposed (dim, vocab) tensor it shares with the output head."""

    def __init__(self, weight_t: torch.Tensor):
        super().__init__()
        self.weight_t = weight_t  # the head's parameter; registered there

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_t.index_select(1, idx.reshape(-1)).t().reshape(*idx.shape, self.weight_t.shape[0])


def decode_layout(model: nn.Module) -> int:
    """Swap the model's nn.Linear layers (quantized ones are left as they are) for DecodeLinear, in
    place; a head tied to an nn.Embedding shares its transposed table with it. Returns how many."""
    tied: dict[int, tuple[nn.Module, str]] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Embedding):
                tied[id(child.weight)] = (parent, name)
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in swaps:
        new = DecodeLinear(child)
        embedding = tied.get(id(child.weight))
        setattr(parent, name, new)
        if embedding is not None:  # the tied table: one (dim, vocab) tensor for both
            setattr(embedding[0], embedding[1], DecodeEmbedding(new.weight_t))
    return len(swaps)


__all__ = ["DecodeEmbedding", "DecodeLinear", "decode_layout"]
