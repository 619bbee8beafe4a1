"""What the image model families share: the config base and the patch-token classifier.

An image family's config (the recipe's ``[model]``) extends ``ImageConfig``; the image size, the
channels and the classes come from the data (``with_data``), the rest from the recipe. ViT,
MLP-Mixer, PoolFormer and FNet are one ``TokenClassifier``: patches -> (+ positions) -> blocks
of (token mixer, MLP) -> norm -> pool -> linear head; each family supplies its token mixer. A
family registers itself with ``register_image_family`` (``language_model=False``: the language
commands refuse it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from adl_cli.models import FAMILIES, Family, ModelConfig
from adl_cli.nn.vision import PatchEmbed, Residual, sincos_2d


@dataclass
class ImageConfig(ModelConfig):
    family: str = "vit"
    image_size: int = 0  # set from the data (0 in a recipe: the checks that need it wait for the data)
    channels: int = 0  # set from the data
    num_classes: int = 0  # set from the data
    dropout: float = 0.0
    objective = "classify"  # what the family learns: classify (logits), or reconstruct (an autoencoder with masks)

    def with_data(self, image_size: int, channels: int, num_classes: int):
        """This config for images of ``image_size`` x ``image_size`` with ``channels``, ``num_classes`` classes."""
        return dataclasses.replace(self, image_size=image_size, channels=channels, num_classes=num_classes)

    def validate(self) -> None:
        for name in ("image_size", "channels", "num_classes"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TokenConfig(ImageConfig):
    """The patch-token families' common shape."""

    patch: int = 2
    dim: int = 64
    depth: int = 4
    mlp_ratio: float = 2.0

    def validate(self) -> None:
        super().validate()
        for name in ("patch", "dim", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size and self.image_size % self.patch:
            raise ValueError(f"model.patch {self.patch} must divide the image size {self.image_size}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def mlp_hidden(self) -> int:
        return max(1, int(round(self.dim * self.mlp_ratio)))


class ImageModel(nn.Module):
    """Base of every image model: ``forward(images) -> logits``; ``features`` the pooled
    representation before the head."""

    config: ImageConfig

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - families override
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class TokenClassifier(ImageModel):
    """patches -> positions -> blocks (mixer + MLP) -> norm -> pool -> head."""

    def __init__(self, cfg: TokenConfig, mixer, *, positions: str = "none", pool: str = "mean", cls_token: bool = False, norm=nn.LayerNorm):
        super().__init__()
        cfg.validate()
        self.config, self.pool = cfg, pool
        self.embed = PatchEmbed(cfg.image_size, cfg.patch, cfg.channels, cfg.dim)
        n = self.embed.n_patches
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cls_token else None
        if positions == "learned":
            self.pos = nn.Parameter(torch.randn(1, n, cfg.dim) * 0.02)
        elif positions == "sincos":
            self.register_buffer("pos", sincos_2d(cfg.grid, cfg.dim)[None], persistent=False)
        elif positions == "none":
            self.pos = None
        else:
            raise ValueError(f"model.positions must be learned, sincos or none, got '{positions}'")
        self.blocks = nn.ModuleList(Residual(cfg.dim, mixer(cfg), cfg.mlp_hidden, cfg.dropout, norm) for _ in range(cfg.depth))
        self.norm = norm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(_init)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N [+1], dim): the last block's tokens, normalised (the class token first if any)."""
        t = self.embed(x)
        if self.pos is not None:
            t = t + self.pos
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1)
        for block in self.blocks:
            t = block(t)
        return self.norm(t)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        return t[:, 0] if self.pool == "cls" else t[:, 1 if self.cls is not None else 0:].mean(1)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def register_image_family(name: str, config: type, build) -> None:
    def checked(cfg):
        if not (cfg.image_size and cfg.channels and cfg.num_classes):
            raise ValueError("the image size, channels and classes come from the data: build from config.with_data(size, channels, classes)")
        return build(cfg)

    FAMILIES.register(name)(Family(config, build=checked, language_model=False))
