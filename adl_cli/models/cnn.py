"""A small convolutional baseline for the image labs: stages of two 3x3 convolutions (batch norm,
ReLU) with 2x2 max pooling between stages while the image is larger than 2 pixels, global average
pooling, a linear head."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adl_cli.models.image import ImageConfig, ImageModel, register_image_family


@dataclass
class CNNConfig(ImageConfig):
    family: str = "cnn"
    widths: list[int] = field(default_factory=lambda: [32, 64])

    def validate(self) -> None:
        super().validate()
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"model.widths must be a non-empty list of positive widths, got {self.widths}")


class CNN(ImageModel):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        layers: list[nn.Module] = []
        c, size = cfg.channels, cfg.image_size
        for i, w in enumerate(cfg.widths):
            if i and size > 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            for _ in range(2):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.body = nn.Sequential(*layers)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(c, cfg.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.body(x).mean((2, 3)))


register_image_family("cnn", CNNConfig, CNN)
