"""ViT: a transformer encoder over image patches (Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words"). Patches embedded by one linear map, a class token or mean pooling, learned or fixed 2-D
sine-cosine positions (or none: then, with mean pooling, the model is a function of the set of
patches, invariant to their order; a test checks it)."""

from __future__ import annotations

from dataclasses import dataclass

from adl_cli.models.image import TokenClassifier, TokenConfig, register_image_family
from adl_cli.nn.vision import SelfAttention


@dataclass
class ViTConfig(TokenConfig):
    family: str = "vit"
    heads: int = 4
    pool: str = "cls"  # cls | mean
    positions: str = "learned"  # learned | sincos | none

    def validate(self) -> None:
        super().validate()
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"model.pool must be cls or mean, got '{self.pool}'")
        if self.positions not in ("learned", "sincos", "none"):
            raise ValueError(f"model.positions must be learned, sincos or none, got '{self.positions}'")
        if self.dim % self.heads:
            raise ValueError(f"model.heads {self.heads} must divide model.dim {self.dim}")


class ViT(TokenClassifier):
    def __init__(self, cfg: ViTConfig):
        super().__init__(cfg, lambda c: SelfAttention(c.dim, c.heads, c.dropout), positions=cfg.positions, pool=cfg.pool,
                         cls_token=cfg.pool == "cls")

    def attention_maps(self, x):
        """Per block: the attention weights (B, heads, N, N) on ``x``."""
        for b in self.blocks:
            b.mixer.keep = True
        try:
            self.tokens(x)
            return [b.mixer.map for b in self.blocks]
        finally:
            for b in self.blocks:
                b.mixer.keep, b.mixer.map = False, None


register_image_family("vit", ViTConfig, ViT)
