"""FNet (Lee-Thorp et al. 2022, "Mixing Tokens with Fourier Transforms"): the token mixer is the
real part of a 2-D discrete Fourier transform over the token and hidden axes, Re(F_N X F_D), with
no parameters; learned positions, mean pooling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.models.image import TokenClassifier, TokenConfig, register_image_family


@dataclass
class FNetConfig(TokenConfig):
    family: str = "fnet"


class FourierMixer(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # the FFT in at least fp32 under autocast
        return torch.fft.fft2(wide, dim=(-2, -1)).real.to(x.dtype)


class FNet(TokenClassifier):
    def __init__(self, cfg: FNetConfig):
        super().__init__(cfg, lambda c: FourierMixer(), positions="learned")


register_image_family("fnet", FNetConfig, FNet)
