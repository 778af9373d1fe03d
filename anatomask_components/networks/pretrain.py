"""AnatoMask / SparK pretraining network: sparse STU-Net encoder, densify, reconstruction decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn

from anatomask_components.networks.decoders import LightDecoder, SimpleDecoder
from anatomask_components.networks.sparse import (
    NormPooling,
    SparseSTUNetEncoder,
    masked_instance_norm,
    upsample_patch_mask,
)
from anatomask_components.networks.stunet import STUNet
from anatomask_components.patches import mask_to_visible_grid, patch_grid

__all__ = ["AnatoMaskPretrainModel"]

ENCODER_PREFIX = "sparse_encoder.sp_cnn."


class AnatoMaskPretrainModel(nn.Module):
    """Sparse STU-Net encoder with SparK's densify step and a reconstruction decoder.

    Args:
        in_channels: input channels (1 for CT).
        size: STU-Net preset (``S``, ``B``, ``L``, ``H``) unless ``depths`` and ``dims`` are given.
        depths: blocks per stage of a custom STU-Net.
        dims: widths per stage of a custom STU-Net.
        strides: STU-Net strides (default: the TotalSegmentator plan).
        num_stages: encoder stages to pretrain: 5 (reference, total stride 16) or all 6.
        decoder: ``"hierarchical"`` (SparK's LightDecoder fed by 4 densified levels) or ``"simple"``
            (two conv blocks on the deepest features, paper Table 1).
        backend: sparse encoder backend, ``"dense"`` (masked dense convs) or ``"spconv"``.
        norm_pooling: sparse instance-norm statistics over the batch (reference) or per ``"sample"``.
        hierarchy: number of densified levels fed to the hierarchical decoder.

    Forward input: ``x`` ``(B, C, H, W, D)`` and ``mask`` ``(B, L)`` bool (True = masked) over the
    ``patch_size`` grid in raster order. Output: reconstruction ``(B, C, H, W, D)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        size: str = "B",
        depths: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        strides: Sequence[Sequence[int] | int] | None = None,
        num_stages: int = 5,
        decoder: Literal["hierarchical", "simple"] = "hierarchical",
        backend: Literal["dense", "spconv"] = "dense",
        norm_pooling: NormPooling = "batch",
        hierarchy: int = 4,
    ) -> None:
        super().__init__()
        stunet = STUNet(in_channels, 1, size=size, depths=depths, dims=dims, strides=strides)
        self.in_channels = in_channels
        self.norm_pooling = norm_pooling
        self.sparse_encoder = SparseSTUNetEncoder.from_stunet(stunet, num_stages, backend, norm_pooling)
        cumulative = self.sparse_encoder.cumulative_strides
        widths = self.sparse_encoder.widths
        patch = self.patch_size
        # the deepest stage of each distinct resolution, coarsest first
        by_resolution = {stride: i for i, stride in enumerate(cumulative)}
        levels = sorted(by_resolution.values(), key=lambda i: -math.prod(cumulative[i]))
        if decoder == "hierarchical":
            if len(set(patch)) != 1:
                raise ValueError(f"the hierarchical decoder needs an isotropic mask unit, got {patch}.")
            self.dense_decoder = LightDecoder(widths[levels[0]], patch[0], in_channels)
            levels = levels[: min(hierarchy, len(self.dense_decoder.dec))]
            for i, stage in enumerate(levels):
                if cumulative[stage] != tuple(p // 2**i for p in patch):
                    raise ValueError(
                        f"stage {stage} has stride {cumulative[stage]}; level {i} of the hierarchical "
                        f"decoder needs {tuple(p // 2**i for p in patch)}."
                    )
        elif decoder == "simple":
            self.dense_decoder = SimpleDecoder(widths[levels[0]], patch, in_channels)
            levels = levels[:1]
        else:
            raise ValueError(f"unknown decoder {decoder!r}; choose 'hierarchical' or 'simple'.")
        self.decoder_type = decoder
        self.level_stages = levels
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        for i, (stage, d_width) in enumerate(zip(levels, self.dense_decoder.level_widths)):
            e_width = widths[stage]
            token = nn.Parameter(torch.zeros(1, e_width, 1, 1, 1))
            nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(nn.InstanceNorm3d(e_width, affine=True))
            if i == 0 and e_width == d_width:
                proj = nn.Identity()
            else:
                k = 1 if i == 0 else 3
                proj = nn.Conv3d(e_width, d_width, kernel_size=k, padding=k // 2)
                nn.init.trunc_normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)
            self.densify_projs.append(proj)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """Mask unit (the encoder's total stride)."""
        return self.sparse_encoder.patch_size

    def num_patches(self, spatial_shape: Sequence[int]) -> int:
        """Number of mask units ``L`` of a crop."""
        return math.prod(patch_grid(spatial_shape, self.patch_size))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(x.shape[2:], self.patch_size)
        visible = mask_to_visible_grid(mask, grid)
        features = self.sparse_encoder(x, visible)
        cumulative = self.sparse_encoder.cumulative_strides
        to_dec = []
        for stage, norm, token, proj in zip(
            self.level_stages, self.densify_norms, self.mask_tokens, self.densify_projs
        ):
            factor = [p // s for p, s in zip(self.patch_size, cumulative[stage])]
            vis = upsample_patch_mask(visible, factor)
            feat = masked_instance_norm(features[stage], vis, norm, self.norm_pooling)
            to_dec.append(proj(torch.where(vis, feat, token.to(feat.dtype))))
        return self.dense_decoder(to_dec)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The pretrained encoder under official STU-Net keys (``conv_blocks_context.*``)."""
        return {k: v.detach().clone() for k, v in self.sparse_encoder.sp_cnn.state_dict().items()}
