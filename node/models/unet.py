"""A compact 3-D U-Net with residual blocks (torch; training only, inference runs its ONNX export).

With ``dropout`` > 0 it has channel dropout (``Dropout3d``) at its *sites*: after the bottleneck
and after each decoder stage. Monte-Carlo dropout needs those masks at inference, where an ONNX
graph has dropout off, so ``MaskedUNet`` exports a second graph that takes one channel mask per
site as an input: the caller draws the masks (seeded, reproducible) and every patch of one pass
uses the same sub-network.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResBlock", "UNet3D", "MaskedUNet"]


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
                 max_channels: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
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
        self.dropout_rate = dropout
        self.drop = nn.Dropout3d(dropout) if dropout else nn.Identity()
        # channels at each dropout site: the bottleneck, then each decoder stage's output
        self.dropout_sites = [widths[-1]] + [widths[level - 1] for level in range(depth - 1, 0, -1)] \
            if dropout else []

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``masks`` (one (1, C, 1, 1, 1) tensor per site, already scaled by 1/(1-p)) replace
        the random dropout by these fixed sub-networks."""
        def site(t: torch.Tensor, i: int) -> torch.Tensor:
            return t * masks[i] if masks is not None else self.drop(t)

        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = site(x, 0)
        for i, (up, dec, skip) in enumerate(zip(self.ups, self.decoders, reversed(skips[:-1])), start=1):
            x = site(dec(torch.cat([up(x), skip], dim=1)), i)
        return self.head(x)


class MaskedUNet(nn.Module):
    """``net`` with its dropout masks as explicit inputs (``image, mask0, mask1, ...``): the graph
    exported for Monte-Carlo dropout passes. All-ones masks give exactly the plain network."""

    def __init__(self, net: UNet3D) -> None:
        super().__init__()
        if not net.dropout_sites:
            raise ValueError("the network has no dropout: nothing to sample")
        self.net = net

    def forward(self, x: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        return self.net(x, list(masks))
