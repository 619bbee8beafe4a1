"""Slot attention (Locatello et al. 2020, "Object-Centric Learning with Slot Attention") as an
object-discovery autoencoder.

A small CNN encodes the image into a feature per pixel, plus a learned map of the pixel's
coordinates (the "soft position embedding" of 4 numbers: x, y, 1 - x, 1 - y). K slots, drawn
per image from a learned Gaussian, then compete for the pixels for ``iters`` rounds:

    attn[n, k] = softmax over the slots k of  q(slot_k) . k(input_n) / sqrt(D)
    update_k   = sum_n attn[n, k] v(input_n) / sum_n attn[n, k]      (a weighted mean)
    slot_k     = GRU(update_k, slot_k);  slot_k += MLP(LayerNorm(slot_k))

The softmax runs over the slots, not the inputs: each pixel hands out one unit of attention
among the slots, so slots compete to explain it. A decoder draws every slot on its own, per pixel
from the slot and the pixel's coordinates (the spatial broadcast decoder with 1x1 convolutions,
i.e. an MLP of the slot plus a map of the coordinates), as a colour and an alpha logit; a softmax over the slots of the alphas gives each
slot's mask, and the image is the masks' blend of the slots' colours. Trained to reconstruct the
image (mean squared error); the masks are the segmentation, scored by the adjusted Rand index
over the foreground pixels (methods/objects.py).

Slots are a set: permuting the initial slots permutes the outputs, and permuting the inputs
(features with their positions) leaves the slots unchanged (tests check both). In eval mode the
initial slots' noise comes from a fixed seed, so scores are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adl_cli.models.image import ImageConfig, ImageModel, _init, register_image_family
from adl_cli.nn.vision import MLP


@dataclass
class SlotConfig(ImageConfig):
    family: str = "slots"
    slots: int = 5  # the objects it can separate, background included
    dim: int = 64  # slot width
    iters: int = 3  # rounds of competition
    width: int = 32  # encoder channels (and the input features' width)
    encoder_layers: int = 3  # 3x3 convolutions, ReLU, full resolution
    decoder_hidden: int = 64  # width of the per-pixel decoder MLP (two hidden layers)
    mlp_ratio: float = 2.0
    eps: float = 1e-8  # added to the attention before the weighted mean
    objective = "reconstruct"

    def validate(self) -> None:
        super().validate()
        for name in ("slots", "dim", "iters", "width", "encoder_layers", "decoder_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_ratio <= 0 or self.eps <= 0:
            raise ValueError("model.mlp_ratio and model.eps must be > 0")


class SlotAttention(nn.Module):
    """Slots (B, K, D) compete for inputs (B, N, E); returns the slots and the last round's
    attention (B, N, K), a distribution over the slots for every input."""

    def __init__(self, dim: int, input_dim: int, iters: int, hidden: int, eps: float = 1e-8):
        super().__init__()
        self.iters, self.eps, self.scale = iters, eps, dim ** -0.5
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(input_dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.k, self.v = nn.Linear(input_dim, dim, bias=False), nn.Linear(input_dim, dim, bias=False)
        self.q = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, inputs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, k_slots, d = slots.shape
        x = self.norm_inputs(inputs)
        k, v = self.k(x), self.v(x)
        attn = inputs.new_zeros(b, inputs.shape[1], k_slots)
        for _ in range(self.iters):
            prev = slots
            q = self.q(self.norm_slots(slots))
            attn = (k @ q.transpose(1, 2) * self.scale).softmax(-1)  # (B, N, K): over the slots
            w = attn + self.eps
            updates = (w / w.sum(1, keepdim=True)).transpose(1, 2) @ v  # (B, K, D): weighted means of the values
            slots = self.gru(updates.reshape(-1, d), prev.reshape(-1, d)).view(b, k_slots, d)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


def coordinate_grid(size: int) -> torch.Tensor:
    """(size * size, 4): each pixel's (y, x, 1 - y, 1 - x) in [0, 1], row-major."""
    c = torch.linspace(0.0, 1.0, size)
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    g = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    return torch.cat([g, 1.0 - g], dim=1)


class SlotAutoencoder(ImageModel):
    def __init__(self, cfg: SlotConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        layers: list[nn.Module] = []
        c = cfg.channels
        for _ in range(cfg.encoder_layers):
            layers += [nn.Conv2d(c, cfg.width, 3, padding=1), nn.ReLU(inplace=True)]
            c = cfg.width
        self.encoder = nn.Sequential(*layers)
        self.register_buffer("grid", coordinate_grid(cfg.image_size), persistent=False)
        self.enc_pos = nn.Linear(4, cfg.width)
        self.enc_mlp = nn.Sequential(nn.LayerNorm(cfg.width), nn.Linear(cfg.width, cfg.width), nn.ReLU(inplace=True),
                                     nn.Linear(cfg.width, cfg.width))
        self.mu = nn.Parameter(torch.randn(1, 1, cfg.dim) * cfg.dim ** -0.5)
        self.log_sigma = nn.Parameter(torch.full((1, 1, cfg.dim), math.log(cfg.dim ** -0.5)))
        self.slot_attention = SlotAttention(cfg.dim, cfg.width, cfg.iters, int(cfg.dim * cfg.mlp_ratio), cfg.eps)
        h = cfg.decoder_hidden
        # the decoder's first layer on (slot + a linear map of the coordinates) is W slot + (a linear map of
        # the coordinates): computed per slot and per pixel, then broadcast, not per (slot, pixel)
        self.dec_slot, self.dec_pos = nn.Linear(cfg.dim, h), nn.Linear(4, h, bias=False)
        self.decoder = nn.Sequential(nn.ReLU(), nn.Linear(h, h), nn.ReLU(inplace=True), nn.Linear(h, cfg.channels + 1))
        self.apply(_init)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, width): per-pixel features with their positions."""
        f = self.encoder(x).flatten(2).transpose(1, 2)
        return self.enc_mlp(f + self.enc_pos(self.grid))

    def initial_slots(self, b: int, device, dtype) -> torch.Tensor:
        shape = (b, self.config.slots, self.config.dim)
        if self.training:
            noise = torch.randn(shape, device=device, dtype=dtype)
        else:  # reproducible scores
            noise = torch.randn(shape, generator=torch.Generator(device=device).manual_seed(0), device=device, dtype=dtype)
        return self.mu + self.log_sigma.exp() * noise

    def decompose(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reconstruction (B, C, H, W), each slot's mask (B, K, H, W; summing to 1 over K) and
        colours (B, K, C, H, W), and slot attention's last attention (B, H*W, K)."""
        b, c, h, w = x.shape
        slots, attn = self.slot_attention(self.encode(x), self.initial_slots(b, x.device, x.dtype))
        out = self.decoder(self.dec_slot(slots)[:, :, None] + self.dec_pos(self.grid)[None, None])  # (B, K, H*W, C + 1)
        k = slots.shape[1]
        colours = out[..., :c].permute(0, 1, 3, 2).reshape(b, k, c, h, w)
        masks = out[..., c].softmax(1).reshape(b, k, h, w)
        return {"recon": (masks[:, :, None] * colours).sum(1), "masks": masks, "colours": colours, "attn": attn}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decompose(x)["recon"]

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(x).float(), x.float())


register_image_family("slots", SlotConfig, SlotAutoencoder)
