"""SETR-PUP style dense-prediction heads, one per task, as in M3ViT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from m3vit.model.config import ModelConfig, Task, head_upsample_stages


class PUPHead(nn.Module):
    """Tokens (without CLS) as a (H/p, W/p) map; stages of 3x3 conv + BN + ReLU + 2x bilinear
    upsample; a 1x1 conv to the task's channels before the last upsample."""

    def __init__(self, cfg: ModelConfig, task: Task):
        super().__init__()
        self.grid = cfg.grid
        self.img_size = cfg.img_size
        c = cfg.head_channels
        n = head_upsample_stages(cfg)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cfg.dim if i == 0 else c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
            for i in range(n)
        )
        self.classifier = nn.Conv2d(c, task.channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, _, d = tokens.shape
        x = tokens[:, 1:].transpose(1, 2).reshape(b, d, *self.grid)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.classifier(x)
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            # Patch sizes that are not a power of two end off the input grid; resample onto it.
            x = F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)
        return x
