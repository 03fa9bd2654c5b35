"""A small module for CPU compile tests: compiles in seconds where a UNet takes minutes."""

from __future__ import annotations

import torch
from torch import nn


class Conv(nn.Module):
    """Latents in, latents out, with a down- and an up-sampling (the UNet's size constraints in small)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.down(x))
        return self.up(nn.functional.interpolate(y, scale_factor=2.0, mode="nearest"))
