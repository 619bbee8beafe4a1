"""MLP-Mixer (Tolstikhin et al. 2021): attention replaced by an MLP across patches. Each block mixes
tokens (an MLP applied to every channel's column of patch values, weights shared across
channels) then channels (an MLP per patch); no positions (the token MLP's weights are
position-specific), mean pooling."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adl_cli.models.image import TokenClassifier, TokenConfig, register_image_family
from adl_cli.nn.vision import MLP


@dataclass
class MixerConfig(TokenConfig):
    family: str = "mixer"
    token_hidden: int = 64  # the token-mixing MLP's hidden width


class TokenMixing(nn.Module):
    """y[b, n, d] = MLP over n of x[b, :, d]: the same MLP for every channel d."""

    def __init__(self, tokens: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = MLP(tokens, hidden, dropout)

    def forward(self, x):
        return self.mlp(x.transpose(1, 2)).transpose(1, 2)


class Mixer(TokenClassifier):
    def __init__(self, cfg: MixerConfig):
        super().__init__(cfg, lambda c: TokenMixing(c.grid * c.grid, c.token_hidden, c.dropout))


register_image_family("mixer", MixerConfig, Mixer)
