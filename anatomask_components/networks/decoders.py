"""Reconstruction decoders for masked image modelling (docs/method.md §5, paper Table 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from anatomask_components.patches import unpatchify

__all__ = ["LightDecoder", "PatchLossHead", "SimpleDecoder", "UpBlock"]


def _init_decoder(module: nn.Module) -> None:
    """SparK's decoder initialisation: truncated normal convolutions, He for transposed ones."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class UpBlock(nn.Module):
    """ConvTranspose3d(k4, s2, p1) -> conv3 -> BN -> ReLU6 -> conv3 -> BN."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_sample = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=4, stride=2, padding=1)
        self.conv = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm3d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """SparK's hierarchical decoder: each up-block first adds the densified skip of its resolution.

    Args:
        width: input width (the deepest encoder width); it halves at every up-block.
        upsample_ratio: total upsampling, a power of two (the mask unit, 16).
        out_channels: reconstructed channels (the input's).

    Forward input: list of densified features, coarsest first; entry ``i`` has ``width / 2**i``
    channels at ``2**i`` times the coarsest resolution (missing entries may be ``None``).
    Forward output: ``(B, out_channels, H, W, D)``.
    """

    def __init__(self, width: int = 512, upsample_ratio: int = 16, out_channels: int = 1) -> None:
        super().__init__()
        n = round(math.log2(upsample_ratio))
        if 2**n != upsample_ratio:
            raise ValueError(f"upsample_ratio must be a power of two, got {upsample_ratio}.")
        if width % 2**n:
            raise ValueError(f"width {width} cannot be halved {n} times.")
        self.width = width
        channels = [width // 2**i for i in range(n + 1)]
        self.dec = nn.ModuleList(UpBlock(cin, cout) for cin, cout in zip(channels[:-1], channels[1:]))
        self.proj = nn.Conv3d(channels[-1], out_channels, kernel_size=1)
        _init_decoder(self)

    @property
    def level_widths(self) -> list[int]:
        """Width expected for each skip input, coarsest first."""
        return [self.width // 2**i for i in range(len(self.dec))]

    def forward(self, to_dec: Sequence[torch.Tensor | None]) -> torch.Tensor:
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec) and to_dec[i] is not None:
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)


class SimpleDecoder(nn.Module):
    """The paper's Table 1 baseline: two conv blocks on the deepest features, no skips.

    Each voxel of the deepest feature map (one per mask unit) predicts its whole patch through a 1x1
    convolution to ``out_channels * prod(patch_size)`` values, rearranged into the patch.

    Args:
        width: input width (the deepest encoder width).
        patch_size: the mask unit.
        out_channels: reconstructed channels.
    """

    def __init__(
        self, width: int = 512, patch_size: Sequence[int] = (16, 16, 16), out_channels: int = 1
    ) -> None:
        super().__init__()
        self.width = width
        self.patch_size = tuple(patch_size)
        self.blocks = nn.Sequential(
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU6(inplace=True),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU6(inplace=True),
        )
        self.proj = nn.Conv3d(width, out_channels * math.prod(self.patch_size), kernel_size=1)
        _init_decoder(self)

    @property
    def level_widths(self) -> list[int]:
        return [self.width]

    def forward(self, to_dec: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.proj(self.blocks(to_dec[0]))
        # (B, P*C, h, w, d) -> (B, L, P*C): one row per patch, in raster order
        patches = x.flatten(2).transpose(1, 2)
        return unpatchify(patches, self.patch_size, x.shape[2:])


class PatchLossHead(nn.Module):
    """A light loss predictor: one value per mask unit from the deepest densified features.

    conv3 -> BN -> ReLU6 -> conv1 to one channel. The deepest level has one voxel per mask unit, so the
    output holds one predicted loss per patch; the 3^3 kernel lets it look at the neighbouring patches.
    A cheaper alternative to HPM's second decoder (docs/method.md §12.1).

    Args:
        width: channels of the deepest densified level.

    Forward input: ``(B, width, h, w, d)``. Output: ``(B, h * w * d)`` in raster order (``d`` fastest).
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            nn.Conv3d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU6(inplace=True),
            nn.Conv3d(width, 1, kernel_size=1),
        )
        _init_decoder(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).flatten(1)
