"""A tiny non-GPT model family, registered by the tests only (run folders, the trainer)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adl_cli.models import FAMILIES, Family, ModelConfig


@dataclass
class TinyMLPConfig(ModelConfig):
    """A non-GPT family, registered by the tests only."""

    family: str = "tiny-mlp"
    width: int = 8
    classes: int = 3

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError(f"model.width must be >= 1, got {self.width}")


class TinyMLP(nn.Module):
    def __init__(self, cfg: TinyMLPConfig):
        super().__init__()
        self.config = cfg
        self.net = nn.Sequential(nn.Linear(4, cfg.width), nn.ReLU(), nn.Linear(cfg.width, cfg.classes))

    def forward(self, x):
        return self.net(x)


def register_tiny_family() -> None:
    if "tiny-mlp" not in FAMILIES:
        FAMILIES.register("tiny-mlp")(Family(TinyMLPConfig, build=TinyMLP, language_model=False))
