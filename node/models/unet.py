"""A compact 3-D U-Net with residual blocks (torch; training only, inference runs its ONNX export)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResBlock", "UNet3D"]


class ResBlock(nn.Module):
    """conv-norm-act-conv-norm + (projected) skip, then act. Instance norm: batch sizes are tiny."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm3d(cout, affine=True)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm3d(cout, affine=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False),
                                   nn.InstanceNorm3d(cout, affine=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class UNet3D(nn.Module):
    """``depth`` resolution levels, widths base·2^level (capped), ``blocks`` residual blocks per level.

    Input (B, C, z, y, x) with every spatial size a multiple of ``size_divisor``; output logits
    (B, classes, z, y, x).
    """

    def __init__(self, in_channels: int, out_channels: int, base: int = 8, depth: int = 3, blocks: int = 1,
                 max_channels: int = 128) -> None:
        super().__init__()
        widths = [min(base * 2 ** i, max_channels) for i in range(depth)]
        self.encoders = nn.ModuleList()
        cin = in_channels
        for level, w in enumerate(widths):
            stage = [ResBlock(cin, w, stride=1 if level == 0 else 2)] + [ResBlock(w, w) for _ in range(blocks - 1)]
            self.encoders.append(nn.Sequential(*stage))
            cin = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in range(depth - 1, 0, -1):
            self.ups.append(nn.ConvTranspose3d(widths[level], widths[level - 1], 2, stride=2))
            stage = [ResBlock(2 * widths[level - 1], widths[level - 1])] + \
                [ResBlock(widths[level - 1], widths[level - 1]) for _ in range(blocks - 1)]
            self.decoders.append(nn.Sequential(*stage))
        self.head = nn.Conv3d(widths[0], out_channels, 1)
        self.size_divisor = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips[:-1])):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.head(x)
